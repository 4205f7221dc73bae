"""Prior networks: ECLIPSE (released layout), the Diffusion-Baseline, linear and residual priors; presets, loading."""

from eclipse_prior.models.diffusion import DiffusionPrior
from eclipse_prior.models.eclipse import EclipsePrior
from eclipse_prior.models.linear import LinearPrior, ResidualPrior
from eclipse_prior.models.loading import load_prior
from eclipse_prior.models.presets import PRESETS

__all__ = ["DiffusionPrior", "EclipsePrior", "LinearPrior", "PRESETS", "ResidualPrior", "load_prior"]
