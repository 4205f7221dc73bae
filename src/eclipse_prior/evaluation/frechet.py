"""Frechet distance between two feature sets (FID's formula), on DINOv2 features or, optionally, Inception's.

FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), each set summarised by its mean and covariance. DINOv2 features
need only transformers; the classic Inception FID is computed through torchmetrics (which needs torch-fidelity and
its Inception weights) only when those are installed: they are not dependencies of this package.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image
from scipy import linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, rowvar=False) covariance of an (N, D) feature array; N >= 2."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature array with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance of two Gaussians. A near-singular product (few samples, wide features) gets ``eps`` added to
    both diagonals before the matrix square root, as pytorch-fid does, instead of returning a complex number."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError("the two feature sets have different widths")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # numerical noise from sqrtm; the true root of a PSD product is real
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def frechet_distance_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between two (N, D) feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_frechet(
    generated: Iterable[Image.Image], reference: Iterable[Image.Image]
) -> tuple[float | None, str]:
    """Classic FID on Inception features via torchmetrics, when it and its dependencies are usable.

    Returns (value, note): value None with the reason when torchmetrics, torch-fidelity or the Inception weights are
    missing, so the caller can report the skip rather than fail the whole benchmark.
    """
    try:
        import torch
        from torchmetrics.image.fid import FrechetInceptionDistance
    except (ImportError, ModuleNotFoundError) as err:
        return None, f"Inception FID skipped: torchmetrics with torch-fidelity not installed ({err})"
    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=False)
        for images, real in ((reference, True), (generated, False)):
            for im in images:
                pixels = torch.from_numpy(
                    np.asarray(im.convert("RGB").resize((299, 299)), dtype=np.uint8).copy()
                )
                metric.update(pixels.permute(2, 0, 1).unsqueeze(0), real=real)
        return float(metric.compute()), "torchmetrics FrechetInceptionDistance (2048-d pool features)"
    except (OSError, RuntimeError, ValueError) as err:  # e.g. Inception weights not downloadable offline
        return None, f"Inception FID skipped: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
