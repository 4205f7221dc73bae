"""eclipse-prior: train, evaluate and run ECLIPSE text-to-image priors and their baselines."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Heavy imports (torch, diffusers) are deferred until first use so the CLI starts fast.
_LAZY = {
    "EclipsePrior": "eclipse_prior.models",
    "DiffusionPrior": "eclipse_prior.models",
    "load_prior": "eclipse_prior.models",
}

if TYPE_CHECKING:
    from eclipse_prior.models import DiffusionPrior, EclipsePrior, load_prior  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eclipse_prior' has no attribute {name!r}")


__all__ = ["EclipsePrior", "DiffusionPrior", "load_prior", "__version__"]
