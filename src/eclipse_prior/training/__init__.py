"""Training of ECLIPSE and baseline priors on embedding stores (`eclipse-prior train`).

`train` is imported lazily: the CLI reads `TrainConfig` to build its flags, and that must not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eclipse_prior.training.config import TrainConfig

if TYPE_CHECKING:
    from eclipse_prior.training.trainer import train


def __getattr__(name: str):
    if name == "train":
        from eclipse_prior.training.trainer import train

        return train
    raise AttributeError(f"module 'eclipse_prior.training' has no attribute {name!r}")


__all__ = ["TrainConfig", "train"]
