"""The paper's Diffusion-Baseline: the same transformer plus a timestep token, trained as an x0-predicting DDPM."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from eclipse_prior.errors import ConfigError
from eclipse_prior.models.network import PriorNetworkMixin, PriorOutput, _rand, _randn
from eclipse_prior.models.presets import resolve_preset


def _twice(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else torch.cat([x, x])


class DiffusionPrior(PriorNetworkMixin, ConfigMixin):
    """Diffusion-Baseline of the paper: ECLIPSE's network with diffusers PriorTransformer's time embedding.

    State-dict keys are exactly diffusers `PriorTransformer`'s. Training: DDPM linear beta schedule over
    `num_train_timesteps` (1000), the network predicts x0 (the raw image embedding) from x_t, and the text
    condition is replaced by the null condition with probability `cond_drop_prob` (0.1). Sampling: DDPM
    ancestral steps (`num_inference_steps`, trailing spacing so the first step starts from pure noise) with
    classifier-free guidance on the x0 prediction.

    Null condition = all-zero pooled text embedding and text states with every text token masked. Zeros add no
    parameters (so the state dict stays PriorTransformer's and DDP sees no parameter that a batch without
    dropped rows leaves gradient-free), need no CLIP at sampling time, and lie far from any real (raw,
    unnormalised) CLIP text embedding, so the network cannot confuse them with a caption. Masking the tokens
    also hides the caption length.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 32,
        attention_head_dim: int = 64,
        num_layers: int = 20,
        embedding_dim: int = 768,
        num_embeddings: int = 77,
        additional_embeddings: int = 4,
        dropout: float = 0.0,
        time_embed_act_fn: str = "silu",
        norm_in_type: str | None = None,
        embedding_proj_norm_type: str | None = None,
        encoder_hid_proj_type: str | None = "linear",
        added_emb_type: str | None = "prd",
        time_embed_dim: int | None = None,
        embedding_proj_dim: int | None = None,
        clip_embed_dim: int | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        cond_drop_prob: float = 0.1,
    ):
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ConfigError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        inner_dim = num_attention_heads * attention_head_dim
        # Created first so the parameter order matches diffusers' PriorTransformer.
        self.time_proj = Timesteps(inner_dim, True, 0)
        self.time_embedding = TimestepEmbedding(
            inner_dim, time_embed_dim or inner_dim, out_dim=inner_dim, act_fn=time_embed_act_fn
        )
        self._build_network(
            num_attention_heads,
            attention_head_dim,
            num_layers,
            embedding_dim,
            num_embeddings,
            additional_embeddings,
            dropout,
            norm_in_type,
            embedding_proj_norm_type,
            encoder_hid_proj_type,
            added_emb_type,
            embedding_proj_dim,
            clip_embed_dim,
            time_token=True,
        )
        self.noise_scheduler = self._make_scheduler()

    def _make_scheduler(self) -> DDPMScheduler:
        """The training/sampling schedule: linear betas, x0 ("sample") prediction, no clipping of raw embeds."""
        return DDPMScheduler(
            num_train_timesteps=self.config.num_train_timesteps,
            beta_start=self.config.beta_start,
            beta_end=self.config.beta_end,
            beta_schedule="linear",
            prediction_type="sample",
            clip_sample=False,
            timestep_spacing="trailing",
        )

    @classmethod
    def from_preset(
        cls,
        name: str,
        embedding_dim: int | None = None,
        num_embeddings: int | None = None,
        pooled_only: bool = False,
    ) -> DiffusionPrior:
        """A randomly initialised Diffusion-Baseline of a named size (same sizes as `EclipsePrior`)."""
        return cls(**resolve_preset(name, embedding_dim, num_embeddings, pooled_only))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PriorOutput | tuple[torch.Tensor]:
        """x_t (B, E), timestep (scalar or (B,)), pooled text, text states, mask -> predicted x0 (B, E)."""
        batch_size = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)
        t = t.expand(batch_size) if t.numel() == 1 else t
        time_embeddings = self.time_embedding(self.time_proj(t).to(hidden_states.dtype))
        out = self._run_network(hidden_states, proj_embedding, encoder_hidden_states, attention_mask, time_embeddings)
        if not return_dict:
            return (out,)
        return PriorOutput(predicted_image_embedding=out)

    def _condition(
        self,
        text_embeds: torch.Tensor,
        text_states: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        drop: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Replace rows where `drop` is True by the null condition (zeros, every text token masked)."""
        if self.uses_text_states and text_states is None:
            raise ConfigError("this prior needs per-token text states (store built with --text-states)")
        text_embeds = text_embeds.masked_fill(drop[:, None], 0.0)
        if not self.uses_text_states:
            return text_embeds, None, None
        if text_mask is None:
            text_mask = torch.ones(text_states.shape[:2], dtype=torch.bool, device=text_states.device)
        text_states = text_states.masked_fill(drop[:, None, None], 0.0)
        text_mask = text_mask.bool() & ~drop[:, None]
        return text_embeds, text_states, text_mask

    def training_prediction(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise `image_embeds` at uniform random timesteps, drop conditions, return the predicted x0.

        Draws (timesteps, noise, dropout) from `generator` in that order, so a seeded run is reproducible.
        A caller may pass any of them instead (a multi-process trainer draws them per global sample, so that
        N processes reproduce one process exactly); a passed value skips its draw.
        """
        batch = image_embeds.shape[0]
        gen_device = generator.device if generator is not None else image_embeds.device
        if timesteps is None:
            timesteps = torch.randint(
                0, self.config.num_train_timesteps, (batch,), generator=generator, device=gen_device
            )
        t = timesteps.to(image_embeds.device)
        if noise is None:
            noise = _randn(tuple(image_embeds.shape), generator, image_embeds)
        noise = noise.to(image_embeds.device, image_embeds.dtype)
        if drop is None:
            drop = _rand((batch,), generator, image_embeds) < self.config.cond_drop_prob
        drop = drop.to(image_embeds.device)
        x_t = self.noise_scheduler.add_noise(image_embeds, noise, t)
        text_embeds, text_states, text_mask = self._condition(text_embeds, text_states, text_mask, drop)
        return self(x_t, t, text_embeds, text_states, text_mask).predicted_image_embedding

    @torch.no_grad()
    def generate_embeds(
        self,
        text_embeds: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 4.0,
    ) -> torch.Tensor:
        """Sample raw image embeddings with `num_inference_steps` DDPM steps and classifier-free guidance.

        guidance_scale 1 uses the conditional prediction only; the unconditional one is the null condition.
        """
        if num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        device, dtype = self.device, self.dtype
        batch = text_embeds.shape[0]
        text_embeds = text_embeds.to(device, dtype)
        if not self.uses_text_states:
            text_states, text_mask = None, None
        if text_states is not None:
            text_states = text_states.to(device, dtype)
        if text_mask is not None:
            text_mask = text_mask.to(device)
        guided = guidance_scale != 1.0
        if guided:  # one batch: first half null condition, second half the captions
            drop = torch.arange(2 * batch, device=device) < batch
            cond = self._condition(_twice(text_embeds), _twice(text_states), _twice(text_mask), drop)
        else:
            keep = torch.zeros(batch, dtype=torch.bool, device=device)
            cond = self._condition(text_embeds, text_states, text_mask, keep)

        scheduler = self._make_scheduler()
        scheduler.set_timesteps(num_inference_steps, device=device)
        x = _randn((batch, self.config.embedding_dim), generator, text_embeds) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = torch.cat([x, x]) if guided else x
            pred = self(inp, t, *cond).predicted_image_embedding
            if guided:
                uncond, conditional = pred.chunk(2)
                pred = uncond + guidance_scale * (conditional - uncond)
            x = scheduler.step(pred, t, x, generator=generator).prev_sample
        return x
