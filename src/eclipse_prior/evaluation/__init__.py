"""Evaluation of priors: embedding metrics (`embedding_metrics`) and, beside it, the image benchmark.

Names are imported lazily so that importing one submodule does not pull in the others (or torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eclipse_prior.evaluation.embedding_metrics import METRIC_DESCRIPTIONS, evaluate_prior, format_metrics

_LAZY = {"METRIC_DESCRIPTIONS", "evaluate_prior", "format_metrics"}


def __getattr__(name: str):
    if name in _LAZY:
        from eclipse_prior.evaluation import embedding_metrics

        return getattr(embedding_metrics, name)
    raise AttributeError(f"module 'eclipse_prior.evaluation' has no attribute {name!r}")


__all__ = ["METRIC_DESCRIPTIONS", "evaluate_prior", "format_metrics"]
