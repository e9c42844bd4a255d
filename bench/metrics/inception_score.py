"""Inception Score from the 1008-way softmax, the ADM evaluator's way (dit.md E.4).

Consecutive splits of ``split_size`` rows (a short last split counts as a full one), per split
exp(mean_i KL(p_i || mean p)), then the plain mean over splits. Sample order therefore matters a
little. The arithmetic keeps the softmax's dtype (float32 from either backend), as the evaluator.
"""
from __future__ import annotations

import numpy as np

from bench.errors import UserError

SPLIT_SIZE = 5000


class SoftmaxError(UserError, ValueError):
    """A softmax array that is not N x classes probabilities."""


def inception_score(softmax, split_size: int = SPLIT_SIZE) -> float:
    probs = np.asarray(softmax)
    if probs.ndim != 2 or len(probs) == 0:
        raise SoftmaxError(f"softmax must be a non-empty N x classes array, got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise SoftmaxError(f"softmax must be floating point probabilities, got {probs.dtype}")
    if split_size < 1:
        raise SoftmaxError(f"split_size must be positive, got {split_size}")
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        # The evaluator takes no care of p == 0 and returns NaN; 0 log 0 = 0 is the limit, and every
        # entry with p > 0 is computed exactly as the evaluator does, so its finite results are kept.
        kl = np.where(part > 0, kl, 0).astype(kl.dtype, copy=False)
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return float(np.mean(scores))
