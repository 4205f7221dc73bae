"""Training of ECLIPSE and baseline priors on embedding stores (`eclipse-prior train`)."""

from eclipse_prior.training.config import TrainConfig
from eclipse_prior.training.trainer import train

__all__ = ["TrainConfig", "train"]
