"""Prior networks: ECLIPSE (released layout) and the Diffusion-Baseline, plus presets and loading."""

from eclipse_prior.models.diffusion import DiffusionPrior
from eclipse_prior.models.eclipse import EclipsePrior
from eclipse_prior.models.loading import load_prior
from eclipse_prior.models.presets import PRESETS

__all__ = ["DiffusionPrior", "EclipsePrior", "PRESETS", "load_prior"]
