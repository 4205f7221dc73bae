"""Uncertainty and preference statistics for the image benchmark.

Images of one prompt are not independent (same text, one prior), so confidence intervals resample prompts with all
their images (a cluster bootstrap); resampling single images would make the intervals too narrow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap percentile interval."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[object] | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval; with ``groups``, whole groups are resampled.

    The interval is the plain ``[alpha/2, 1 - alpha/2]`` quantiles of the resampled means, not moved to contain the
    sample mean.

    The statistic of a resample is the mean over all its values (so groups with more images weigh more, exactly as
    the benchmark's mean over images does). Deterministic for a given ``seed``.
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    mean = float(vals.mean())
    if groups is None:
        keys = np.arange(vals.size)
    else:
        if len(groups) != vals.size:
            raise ValueError("groups must give one label per value")
        _, keys = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    n_groups = int(keys.max()) + 1
    sums = np.bincount(keys, weights=vals, minlength=n_groups)
    counts = np.bincount(keys, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_groups, size=(n_resamples, n_groups))
    stats = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    # the raw percentile interval: it may exclude the sample mean (skewed data, few resamples), and saying so is
    # more honest than stretching it
    return Interval(mean=mean, low=float(low), high=float(high), n=int(vals.size))


def win_rate(scores_a: Sequence[float] | np.ndarray, scores_b: Sequence[float] | np.ndarray) -> float:
    """Share of paired items (same prompt, same seed) where A scores higher than B; a tie counts half."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError("win_rate needs two non-empty score arrays paired item by item")
    return float(((a > b) + 0.5 * (a == b)).mean())


def win_rate_matrix(scores: Mapping[str, Sequence[float] | np.ndarray]) -> dict[str, dict[str, float | None]]:
    """``m[a][b]``: how often prior ``a`` beats prior ``b`` on the same items (None on the diagonal).

    ``m[a][b] + m[b][a] == 1`` for every pair.
    """
    names = list(scores)
    return {a: {b: (None if a == b else win_rate(scores[a], scores[b])) for b in names} for a in names}
