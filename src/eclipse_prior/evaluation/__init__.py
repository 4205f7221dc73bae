"""Embedding-level evaluation of priors (no decoding needed)."""

from eclipse_prior.evaluation.embedding_metrics import METRIC_DESCRIPTIONS, evaluate_prior, format_metrics

__all__ = ["METRIC_DESCRIPTIONS", "evaluate_prior", "format_metrics"]
