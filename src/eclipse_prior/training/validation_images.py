"""Pictures during training: decode a fixed grid of prompts with the EMA prior and log it to the tracker.

As diffusers' training scripts log validation images, ``train --val-decoder D --val-prompts FILE`` decodes the
same prompts with the same seeds every ``--val-images-every`` steps, so the images change only because the prior
did. The decoder and CLIP are loaded once, before the first step (a decoder that does not fit the prior fails
then, in one line, not after an hour); each round swaps in the current EMA weights. Grids also land in
``RUN/val_images/step-NNNNNNN.png`` with the prompts in ``RUN/val_images/prompts.txt``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eclipse_prior.errors import ConfigError
from eclipse_prior.training.config import TrainConfig


def native_size(pipe: Any, kind: str) -> int:
    """The size a decoder was trained at: Kandinsky's UNet sample size times the MoVQ scale; Karlo's fixed size."""
    if kind == "karlo":
        return int(pipe.image_size)
    sample = pipe.unet.config.sample_size
    scale = 2 ** (len(pipe.movq.config.block_out_channels) - 1)
    return int(sample * scale) if isinstance(sample, int) else 512


class ValidationImages:
    """The validation decoder of one run; ``log(prior, step, accelerator)`` decodes and logs one round."""

    def __init__(self, cfg: TrainConfig, store_clip_id: str, prior: nn.Module, run_dir: Path, device: Any) -> None:
        from eclipse_prior.pipelines.generate import GenerationSettings, load_pipeline, read_prompts

        self.prompts = read_prompts(cfg.val_prompts)
        self.seed = cfg.seed
        self.every = cfg.val_images_every or cfg.val_every
        self.out = run_dir / "val_images"
        with tempfile.TemporaryDirectory() as tmp:  # load_pipeline takes a prior folder: the initial weights
            prior.save_pretrained(tmp, safe_serialization=True)
            self.loaded = load_pipeline(
                tmp, cfg.val_decoder, cfg.val_clip or store_clip_id, device=str(device).split(":")[0],
                local_files_only=True if cfg.offline else None,
            )
        size = native_size(self.loaded.pipe, self.loaded.kind)
        self.settings = GenerationSettings(steps=cfg.val_image_steps, guidance=cfg.val_image_guidance,
                                           prior_steps=cfg.val_steps, prior_guidance=cfg.val_guidance,
                                           height=None if self.loaded.kind == "karlo" else size,
                                           width=None if self.loaded.kind == "karlo" else size
                                           ).resolved(self.loaded)

    def due(self, step: int, last: int) -> bool:
        """Every ``every`` steps, and at the last step (only there when ``every`` is 0)."""
        return step == last or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def images(self, prior: nn.Module) -> list[np.ndarray]:
        """One (H, W, 3) uint8 image per prompt; prompt i always uses seed + i."""
        from eclipse_prior.pipelines.generate import _decode

        pipe = self.loaded.pipe
        pipe.register_modules(prior=prior)
        was_training = prior.training
        prior.eval()
        out = []
        for i, prompt in enumerate(self.prompts):
            gen = torch.Generator("cpu").manual_seed(self.seed + i)
            embeds = pipe.prepare_embeds(prompt, None, gen, self.settings.prior_steps, self.settings.prior_guidance)
            out.append(np.asarray(_decode(self.loaded, embeds, gen, self.settings).convert("RGB")))
        prior.train(was_training)
        return out

    def log(self, prior: nn.Module, step: int, accelerator: Any) -> Path:
        """Decode the grid, write it as a PNG and send it to every tracker; returns the PNG."""
        from PIL import Image

        from eclipse_prior.outputs import write_text_atomic
        from eclipse_prior.pipelines.generate import _atomic_write, make_grid

        images = self.images(prior)
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "prompts.txt", "".join(p + "\n" for p in self.prompts))
        grid = make_grid([Image.fromarray(a) for a in images], len(images))
        path = self.out / f"step-{step:07d}.png"
        _atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("val_images", np.stack(images), step, dataformats="NHWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"val_images": [wandb.Image(a, caption=f"{i}: {p}")
                                            for i, (a, p) in enumerate(zip(images, self.prompts, strict=True))]},
                            step=step)
        return path


def validation_images(cfg: TrainConfig, store: Any, prior: nn.Module, run_dir: Path, device: Any
                      ) -> ValidationImages | None:
    """The run's validation decoder, or None when --val-decoder is not set."""
    if not cfg.val_decoder:
        return None
    if not cfg.val_prompts:
        raise ConfigError("--val-decoder needs --val-prompts FILE (one prompt per line)")
    return ValidationImages(cfg, store.clip_id, prior, run_dir, device)
