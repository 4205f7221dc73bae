"""`TrainConfig`: every knob of `eclipse-prior train`, settable from YAML and overridable by flags.

Defaults target a single small machine (batch 64); the paper's recipe (batch 1024 on 4 GPUs, LR 5e-5, ~60k
steps) is one YAML away. Each field's help says why its default was chosen.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields
from typing import Literal

from eclipse_prior.config import _check_value
from eclipse_prior.errors import ConfigError

Objective = Literal["eclipse", "projection", "diffusion", "ridge", "residual", "image-contrastive", "hard-negatives"]


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """Resolved training configuration; saved as RUN_DIR/config.yaml so a run records exactly what it used."""

    data: str = field(default="", metadata=_h("embedding store folder written by `eclipse-prior embed`"))
    out: str = field(default="", metadata=_h("run folder (config, checkpoints, logs, prior/)"))
    objective: Objective = field(
        default="eclipse",
        metadata=_h("eclipse = projection + lam*InfoNCE vs texts; projection = lam 0; diffusion = "
                    "Diffusion-Baseline; ridge = closed-form linear map of the pooled text embedding; residual = "
                    "that linear map + a transformer correction (eclipse loss); image-contrastive = projection + "
                    "lam*symmetric InfoNCE vs the batch's true images; hard-negatives = the same vs the images of "
                    "each caption's --hard-negatives nearest captions"),
    )
    preset: str = field(
        default="small",
        metadata=_h("network preset (depth/heads): kandinsky22, karlo, small, tiny; width and text length "
                    "come from the store"),
    )
    init_from: str | None = field(
        default=None, metadata=_h("start from a saved prior (run dir, export folder or hub id) instead of random")
    )
    offline: bool = field(default=False, metadata=_h("never contact the model hub (for --init-from)"))
    lam: float = field(default=0.2, metadata=_h("weight of the contrastive term (paper: 0.2, best 0.2-0.4)"))
    tau: float = field(
        default=0.01,
        metadata=_h("InfoNCE temperature on cosine similarities (not published; CLIP's final 0.01, "
                    "= eclipse_prior.losses.DEFAULT_TAU, whose docstring says why)"),
    )
    hard_negatives: int = field(
        default=4, metadata=_h("hard-negatives objective: negatives per row (nearest other captions in the batch)")
    )
    ridge_alpha: float = field(
        default=1e-3,
        metadata=_h("ridge / residual: L2 penalty of the linear map, relative to the mean eigenvalue of the "
                    "text embeddings' second-moment matrix"),
    )
    steps: int = field(default=10000, metadata=_h("optimizer steps in total"))
    batch_size: int = field(default=64, metadata=_h("samples per process per micro-batch"))
    lr: float = field(
        default=1e-4,
        metadata=_h("peak AdamW learning rate (paper: 5e-5 at batch 1024; 1e-4 is the diffusers prior "
                    "script's default for small batches)"),
    )
    warmup_steps: int = field(default=500, metadata=_h("linear LR warm-up steps before the cosine decay"))
    weight_decay: float = field(default=0.01, metadata=_h("AdamW weight decay on matrices (not biases/norms)"))
    grad_accum: int = field(default=1, metadata=_h("micro-batches per optimizer step"))
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata=_h("autocast dtype (bf16 works on CPUs with AMX; fp16 needs a GPU)")
    )
    compile: bool = field(
        default=False,
        metadata=_h("torch.compile the prior's forward (accelerate's dynamo backend); off by default: on a CPU it "
                    "gained nothing in fp32 for minutes of compilation, 1.4x for bf16 runs of the small network "
                    "(README Speed, section 7); GPU figures pending"),
    )
    grad_clip: float = field(default=1.0, metadata=_h("max global gradient norm (0 disables)"))
    ema_decay: float = field(
        default=0.9999, metadata=_h("EMA decay (warmed up as min(decay, (1+n)/(10+n)); 0 disables)")
    )
    checkpoint_every: int = field(default=1000, metadata=_h("steps between checkpoints"))
    keep_checkpoints: int = field(default=3, metadata=_h("how many recent checkpoints to keep"))
    val_every: int = field(default=1000, metadata=_h("steps between validations on the store's val split (0: off)"))
    val_max_samples: int = field(default=2048, metadata=_h("cap on val rows scored per validation"))
    val_steps: int = field(
        default=25, metadata=_h("diffusion prior sampling steps in validation (ECLIPSE ignores it; paper: 25)")
    )
    val_guidance: float = field(
        default=4.0, metadata=_h("diffusion prior guidance scale in validation (ECLIPSE ignores it; paper: 4.0)")
    )
    val_decoder: str | None = field(
        default=None,
        metadata=_h("decoder (kandinsky22, karlo, hub id or folder) that decodes --val-prompts with the EMA prior "
                    "and logs the images to the tracker and RUN/val_images/ (off when unset)"),
    )
    val_prompts: str | None = field(default=None, metadata=_h("text file of validation prompts, one per line"))
    val_clip: str | None = field(
        default=None, metadata=_h("CLIP for the validation images' text side (default: the store's CLIP)")
    )
    val_images_every: int = field(
        default=0, metadata=_h("steps between validation images (0: with --val-every, or only at the end)")
    )
    val_image_steps: int = field(default=25, metadata=_h("decoder steps of the validation images"))
    val_image_guidance: float | None = field(
        default=None, metadata=_h("decoder guidance of the validation images (default: the decoder's)")
    )
    log_every: int = field(default=50, metadata=_h("steps between loss log lines"))
    seed: int = field(default=0, metadata=_h("seed of weights, data order and noise"))
    pooled_only: bool = field(
        default=False,
        metadata=_h("ignore per-token text states (~10x faster, cheaper stores; weaker text conditioning)"),
    )
    allow_normalized_store: bool = field(
        default=False,
        metadata=_h("train on an L2-normalised store (clip-retrieval); decoders expect raw embeddings"),
    )
    verify_store: bool = field(default=True, metadata=_h("check shard checksums and finiteness before training"))
    resume: bool = field(
        default=False,
        metadata=_h("continue the run in --out from its latest readable checkpoint (an error if --out holds no run)"),
    )
    allow_changed_data: bool = field(
        default=False,
        metadata=_h("with --resume: continue even if the store changed since the run started (other rows, "
                    "CLIP or normalisation; default: refuse)"),
    )
    progress: bool = field(default=True, metadata=_h("progress bar (plain periodic lines when not on a terminal)"))
    num_workers: int = field(default=1, metadata=_h("batches prefetched by a background thread (0: none)"))
    report_to: Literal["tensorboard", "wandb", "none"] = field(
        default="tensorboard", metadata=_h("experiment tracker (through accelerate)")
    )

    def check(self) -> None:
        """Reject values that would fail later in a less readable way."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # library callers bypass the flag/YAML checks: the same type and nan/inf check
            _check_value(f.name, getattr(self, f.name), hints[f.name])
        if not self.data:
            raise ConfigError("train needs --data STORE")
        if not self.out:
            raise ConfigError("train needs --out RUN_DIR")
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "log_every": self.log_every,
            "val_max_samples": self.val_max_samples,
            "val_steps": self.val_steps,
            "val_image_steps": self.val_image_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.lr <= 0 or self.tau <= 0:
            raise ConfigError(f"lr and tau must be > 0, got lr={self.lr} tau={self.tau}")
        non_negative = {
            "lam": self.lam,
            "warmup_steps": self.warmup_steps,
            "val_every": self.val_every,
            "num_workers": self.num_workers,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "val_guidance": self.val_guidance,
            "val_images_every": self.val_images_every,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not 0 <= self.seed < 2**63:  # torch and numpy seeds: non-negative, 64-bit
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.val_decoder and not self.val_prompts:
            raise ConfigError("--val-decoder needs --val-prompts FILE (one prompt per line)")
        if self.hard_negatives < 1 or self.ridge_alpha < 0:
            raise ConfigError("hard_negatives must be >= 1 and ridge_alpha >= 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
