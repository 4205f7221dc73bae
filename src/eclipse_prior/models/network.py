"""The transformer shared by both priors, laid out exactly like diffusers' `PriorTransformer`.

Attribute names are the state-dict keys of the released ECLIPSE checkpoints (and of diffusers'
PriorTransformer), so both classes build their modules through `_build_network` and read the token
sequence through `_run_network`. Written here rather than subclassed because the released ECLIPSE config
has no time-embedding fields, and ConfigMixin saves every `__init__` argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from eclipse_prior.errors import ConfigError


@dataclass
class PriorOutput(BaseOutput):
    """Same field as diffusers' PriorTransformerOutput (defined here: importing that module loads every
    diffusers transformer, seconds of start-up for nothing)."""

    predicted_image_embedding: torch.Tensor


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible), moved to `like`'s device/dtype."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like.device, like.dtype)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) draws on the generator's device, moved to `like`'s device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


class PriorNetworkMixin(ModelMixin):
    """Token assembly and transformer shared by `EclipsePrior` and `DiffusionPrior` (no config of its own)."""

    def _build_network(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        num_layers: int,
        embedding_dim: int,
        num_embeddings: int,
        additional_embeddings: int,
        dropout: float,
        norm_in_type: str | None,
        embedding_proj_norm_type: str | None,
        encoder_hid_proj_type: str | None,
        added_emb_type: str | None,
        embedding_proj_dim: int | None,
        clip_embed_dim: int | None,
        time_token: bool = False,
    ) -> None:
        # Tokens after the text states: pooled text, [time], input, [prd]. Checked here rather than at the
        # first forward, where a wrong value would surface as a shape error.
        expected = 2 + int(time_token) + int(added_emb_type == "prd")
        if additional_embeddings != expected:
            raise ConfigError(
                f"additional_embeddings is {additional_embeddings} but this network adds {expected} tokens "
                f"(pooled text{', time' if time_token else ''}, input{', prd' if added_emb_type == 'prd' else ''})"
            )
        inner_dim = num_attention_heads * attention_head_dim
        embedding_proj_dim = embedding_proj_dim or embedding_dim
        clip_embed_dim = clip_embed_dim or embedding_dim
        self.additional_embeddings = additional_embeddings

        self.proj_in = nn.Linear(embedding_dim, inner_dim)
        if embedding_proj_norm_type is None:
            self.embedding_proj_norm = None
        elif embedding_proj_norm_type == "layer":
            self.embedding_proj_norm = nn.LayerNorm(embedding_proj_dim)
        else:
            raise ConfigError(f"unsupported embedding_proj_norm_type {embedding_proj_norm_type!r} (None or 'layer')")
        self.embedding_proj = nn.Linear(embedding_proj_dim, inner_dim)

        if encoder_hid_proj_type is None:
            self.encoder_hidden_states_proj = None
        elif encoder_hid_proj_type == "linear":
            self.encoder_hidden_states_proj = nn.Linear(embedding_dim, inner_dim)
        else:
            raise ConfigError(f"unsupported encoder_hid_proj_type {encoder_hid_proj_type!r} (None or 'linear')")

        seq_len = num_embeddings + additional_embeddings
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq_len, inner_dim))
        if added_emb_type == "prd":
            self.prd_embedding = nn.Parameter(torch.zeros(1, 1, inner_dim))
        elif added_emb_type is None:
            self.prd_embedding = None
        else:
            raise ConfigError(f"unsupported added_emb_type {added_emb_type!r} (None or 'prd')")

        self.transformer_blocks = nn.ModuleList(
            [
                BasicTransformerBlock(
                    inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    dropout=dropout,
                    activation_fn="gelu",
                    attention_bias=True,
                )
                for _ in range(num_layers)
            ]
        )
        if norm_in_type == "layer":
            self.norm_in = nn.LayerNorm(inner_dim)
        elif norm_in_type is None:
            self.norm_in = None
        else:
            raise ConfigError(f"unsupported norm_in_type {norm_in_type!r} (None or 'layer')")
        self.norm_out = nn.LayerNorm(inner_dim)
        self.proj_to_clip_embeddings = nn.Linear(inner_dim, clip_embed_dim)

        causal = torch.full((seq_len, seq_len), -10000.0).triu_(1)[None]
        self.register_buffer("causal_attention_mask", causal, persistent=False)

        # Kept only so the state dict matches the released checkpoints (they are never applied). Frozen:
        # DDP refuses parameters that never receive a gradient.
        self.clip_mean = nn.Parameter(torch.zeros(1, clip_embed_dim), requires_grad=False)
        self.clip_std = nn.Parameter(torch.zeros(1, clip_embed_dim), requires_grad=False)

    @property
    def uses_text_states(self) -> bool:
        """False in pooled-only mode: the network then takes no per-token text states."""
        return self.encoder_hidden_states_proj is not None

    def _run_network(
        self,
        hidden_states: torch.Tensor,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        time_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[text states] + [pooled text] + [time] + [input] + [prd] -> transformer -> read at the last token.

        The causal mask is always applied (with an all-ones padding mask when none is given), so a model
        behaves the same whether or not the caller passes the tokenizer mask.
        """
        batch_size = hidden_states.shape[0]
        num_embeddings = self.config.num_embeddings
        if proj_embedding.shape[-1] != self.config.embedding_dim:
            raise ConfigError(
                f"pooled text embeddings have width {proj_embedding.shape[-1]} but the prior has width "
                f"{self.config.embedding_dim}"
            )
        if self.encoder_hidden_states_proj is None:
            if encoder_hidden_states is not None:
                raise ConfigError("this prior is pooled-only (num_embeddings=0) and takes no per-token text states")
        else:
            if encoder_hidden_states is None:
                raise ConfigError("this prior needs per-token text states (store built with --text-states)")
            if tuple(encoder_hidden_states.shape[1:]) != (num_embeddings, self.config.embedding_dim):
                raise ConfigError(
                    f"text states have shape {tuple(encoder_hidden_states.shape[1:])} but the prior expects "
                    f"({num_embeddings}, {self.config.embedding_dim}) (text length, width)"
                )

        if self.embedding_proj_norm is not None:
            proj_embedding = self.embedding_proj_norm(proj_embedding)
        tokens = []
        if self.encoder_hidden_states_proj is not None:
            tokens.append(self.encoder_hidden_states_proj(encoder_hidden_states))
        tokens.append(self.embedding_proj(proj_embedding)[:, None, :])
        if time_embeddings is not None:
            tokens.append(time_embeddings[:, None, :])
        x = self.proj_in(hidden_states)
        tokens.append(x[:, None, :])
        if self.prd_embedding is not None:
            tokens.append(self.prd_embedding.to(x.dtype).expand(batch_size, -1, -1))
        x = torch.cat(tokens, dim=1)
        x = x + self.positional_embedding.to(x.dtype)

        if self.encoder_hidden_states_proj is not None and attention_mask is not None:
            pad = (1 - attention_mask.to(x.dtype)) * -10000.0
        else:
            pad = x.new_zeros(batch_size, num_embeddings)
        pad = F.pad(pad, (0, self.additional_embeddings), value=0.0)
        mask = (pad[:, None, :] + self.causal_attention_mask).to(x.dtype)
        mask = mask.repeat_interleave(self.config.num_attention_heads, dim=0)

        if self.norm_in is not None:
            x = self.norm_in(x)
        for block in self.transformer_blocks:
            x = block(x, attention_mask=mask)
        x = self.norm_out(x)
        # The prd token is last; without one (added_emb_type None) the input token is last.
        return self.proj_to_clip_embeddings(x[:, -1])
