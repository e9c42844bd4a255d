"""Fréchet distance between Gaussian fits of features: FID on pool_3, sFID on mixed_6/conv (dit.md E.3).

The ADM evaluator's numerics, reproduced because FID differences of 1e-3 are what papers compare:
- statistics: the mean keeps the features' dtype (float32 for Inception features, so a float32
  accumulation), the covariance is ``np.cov`` (float64, N-1 denominator);
- sqrtm of the plain product sigma1 @ sigma2; only if that result holds a non-finite entry are both
  covariances offset by eps * I and the root recomputed;
- a complex root is accepted, real part kept, when every diagonal imaginary part is within 1e-3 of 0;
  otherwise the distance is refused.
SciPy >= 1.16 returns a real root where older versions returned a complex one with a ~0 imaginary
part; the trace is the same. ``disp`` (deprecated in 1.16, gone in 1.18) is never passed.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from bench.errors import UserError

EPS = 1e-6  # the evaluator's diagonal offset for a singular product
IMAGINARY_ATOL = 1e-3  # the evaluator's tolerance on the diagonal of the root's imaginary part


class FIDError(UserError, ValueError):
    """Statistics that give no Fréchet distance (shape mismatch, NaN, a truly complex root)."""


def statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a features matrix (rows are images) the way the evaluator fits them."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise FIDError(f"FID statistics need a 2-D features array with at least 2 rows, got shape {features.shape}")
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def _sqrtm(m: np.ndarray) -> np.ndarray:
    # The evaluator silences SciPy's "singular matrix" notice (disp=False); its own rule follows.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(m)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = EPS) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)), the evaluator's way.

    The evaluator calls it with the samples' statistics first and the reference's second.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise FIDError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape} (features of different layers?)")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise FIDError(f"covariances of shape {sigma1.shape} and {sigma2.shape} do not match means of "
                       f"length {mu1.shape[0]}")
    for name, x in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(x).all():
            raise FIDError(f"{name} holds NaN or inf; the features it came from are broken")

    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm of a singular product; adding {eps} to the covariance diagonals (as the "
                      f"ADM evaluator does)", RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise FIDError(f"sqrt(sigma1 sigma2) has an imaginary component of {np.max(np.abs(covmean.imag)):.3g} "
                           f"(the ADM evaluator refuses these statistics too)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
