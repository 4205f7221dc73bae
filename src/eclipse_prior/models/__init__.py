"""Prior networks: ECLIPSE (released layout) and the Diffusion-Baseline, plus presets and loading."""

from eclipse_prior.models.eclipse import EclipsePrior
from eclipse_prior.models.presets import PRESETS

__all__ = ["EclipsePrior", "PRESETS"]
