"""Frechet distance between two feature sets, as dgm-eval computes it (docs/method.md §9)."""

from __future__ import annotations

import logging

import numpy as np
from scipy import linalg

log = logging.getLogger(__name__)


def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean and unbiased (N - 1) covariance of features ``[N, D]`` (dgm-eval ``compute_statistics``)."""
    feats = np.asarray(feats.detach().cpu() if hasattr(feats, "detach") else feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {feats.shape}")
    return np.atleast_1d(feats.mean(axis=0)), np.atleast_2d(np.cov(feats, rowvar=False))


def _as_statistics(x) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(x, (tuple, list)) and len(x) == 2:
        mu, sigma = (np.atleast_1d(np.asarray(x[0], np.float64)), np.atleast_2d(np.asarray(x[1], np.float64)))
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"statistics must be (mu [D], sigma [D, D]), got {mu.shape}, {sigma.shape}")
        return mu, sigma
    return feature_statistics(x)


def frechet_distance(feats1, feats2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2) (dgm-eval ``compute_FD_with_stats``).

    Each argument is a feature array ``[N, D]`` or precomputed statistics ``(mu, sigma)``. When
    sqrtm is not finite (singular product), ``eps I`` is added to both covariances and it is
    retried; a complex result keeps its real part if the diagonal's imaginary part is within
    1e-3 of zero, otherwise ValueError.
    """
    mu1, sigma1 = _as_statistics(feats1)
    mu2, sigma2 = _as_statistics(feats2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning("fd calculation produces singular product; adding %s to diagonal of cov estimates", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
