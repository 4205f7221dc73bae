"""The ECLIPSE prior: a non-diffusion transformer mapping (noise, CLIP text) to a CLIP image embedding."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

from eclipse_prior.models.network import PriorNetworkMixin, PriorOutput, _randn
from eclipse_prior.models.presets import resolve_preset


class EclipsePrior(PriorNetworkMixin, ConfigMixin):
    """The released ECLIPSE network: diffusers `PriorTransformer` without the time embedding.

    Config fields and state-dict keys are those of `ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior` and
    `ECLIPSE-Community/ECLIPSE_Karlo_Prior`, so their weights load here strictly and ours load into the
    authors' class. Their config says `_class_name: "PriorTransformer"`; diffusers then drops the keys that
    only a diffusion PriorTransformer has, so `EclipsePrior.from_pretrained` reads it unchanged.

    Sequence: [L text states -> Linear] + [pooled text_embeds -> Linear] + [noise -> proj_in] + [prd token],
    plus a learned positional embedding; causal mask plus the tokenizer padding mask; the prd token's output
    -> norm_out -> proj_to_clip_embeddings is the raw image embedding. `clip_mean`/`clip_std` are stored
    (the checkpoints hold them) but never applied, and frozen. With a padding mask the outputs equal the
    authors' class; without one we still apply the causal mask (theirs then applies no mask at all), so a
    model trains and infers the same way whether or not a caller passes the tokenizer mask.

    Pooled-only mode (`num_embeddings=0`, `encoder_hid_proj_type=None`): the network sees only the pooled
    text embedding. Stores are far cheaper (one vector per caption instead of L x D states) and training is
    about 10x faster (4 tokens instead of 80), but the per-token information that binds attributes to their
    objects ("red cube and blue ball" vs "blue cube and red ball") is available only through the pooled vector.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 32,
        attention_head_dim: int = 64,
        num_layers: int = 20,
        embedding_dim: int = 768,
        num_embeddings: int = 77,
        additional_embeddings: int = 3,
        dropout: float = 0.0,
        norm_in_type: str | None = None,
        embedding_proj_norm_type: str | None = None,
        encoder_hid_proj_type: str | None = "linear",
        added_emb_type: str | None = "prd",
        embedding_proj_dim: int | None = None,
        clip_embed_dim: int | None = None,
    ):
        super().__init__()
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
        )

    @classmethod
    def from_preset(
        cls,
        name: str,
        embedding_dim: int | None = None,
        num_embeddings: int | None = None,
        pooled_only: bool = False,
    ) -> EclipsePrior:
        """A randomly initialised prior of a named size (see `eclipse_prior.models.PRESETS`)."""
        return cls(**resolve_preset(name, embedding_dim, num_embeddings, pooled_only))

    def forward(
        self,
        hidden_states: torch.Tensor,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PriorOutput | tuple[torch.Tensor]:
        """Noise (B, E), pooled text (B, E), text states (B, L, E), mask (B, L) -> image embedding (B, E)."""
        out = self._run_network(hidden_states, proj_embedding, encoder_hidden_states, attention_mask)
        if not return_dict:
            return (out,)
        return PriorOutput(predicted_image_embedding=out)

    def _predict(
        self,
        text_embeds: torch.Tensor,
        text_states: torch.Tensor | None,
        text_mask: torch.Tensor | None,
        generator: torch.Generator | None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if noise is None:
            noise = _randn(tuple(text_embeds.shape), generator, text_embeds)
        noise = noise.to(text_embeds.device, text_embeds.dtype)
        if not self.uses_text_states:
            text_states, text_mask = None, None
        return self._run_network(noise, text_embeds, text_states, text_mask)

    def training_prediction(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass g(eps, text) with fresh noise; `image_embeds` is unused (the loss compares against it).

        Text states are ignored in pooled-only mode, so one training loop serves both modes. `noise` may be
        passed instead of drawn (a multi-process trainer draws it per global sample).
        """
        return self._predict(text_embeds, text_states, text_mask, generator, noise)

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
        """Raw image embeddings in one pass; steps and guidance are accepted for a uniform API and ignored."""
        dtype = self.dtype
        text_embeds = text_embeds.to(self.device, dtype)
        if text_states is not None:
            text_states = text_states.to(self.device, dtype)
        if text_mask is not None:
            text_mask = text_mask.to(self.device)
        return self._predict(text_embeds, text_states, text_mask, generator)
