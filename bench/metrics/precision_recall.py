"""Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes them (dit.md E.5).

Each point's manifold radius is its squared distance to the k-th nearest neighbour in its own set,
the point itself counted (so column k of the partitioned row, k = 3). Precision is the fraction of
samples inside at least one reference ball, recall the fraction of references inside at least one
sample ball, ``<=`` on squared distances.

Evaluator quirks reproduced here:
- distances are computed block by block (10000 x 10000) from float16 copies of the features (squares,
  norms, dot products and their sum all float16); only a block holding a non-finite float16 entry is
  redone in float32, so the fallback decision is per block and the block sizes matter;
- radii therefore carry float16 quantisation, and a point's distance to itself need not be 0.

Two engines compute the blocks. ``tf`` (the default) runs the evaluator's own distance graph in a TF
session, so it is bit-identical to the evaluator on the same TF build and device (checked on CPU
against evaluator.py itself). ``torch`` is the fast path for a GPU: float16 operands, float32
accumulation, one rounding to float16, which is how we understand TF's GPU kernels (not verified
here). TF's CPU float16 sums round in an order of their own, so on a CPU the two engines' radii
differ by up to ~1% and P/R by up to ~3e-3.
"""
from __future__ import annotations

import contextlib

import numpy as np

from bench.errors import UserError

NHOOD_SIZE = 3  # k of the evaluator's ManifoldEstimator (nhood_sizes=(3,))
# The evaluator's block sizes: they decide which distances fall back to float32, so they are protocol.
ROW_BATCH_SIZE = 10000
COL_BATCH_SIZE = 10000


class FeatureShapeError(UserError):
    """Feature arrays that cannot be compared (wrong rank, different widths, too few points)."""


ENGINES = ("tf", "torch")


def _torch_device(device):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@contextlib.contextmanager
def _ieee_float32():
    # A float32 fallback block must be true float32: TF32 (switched on by DiT's sampling scripts)
    # would round the features to 10 mantissa bits.
    import torch

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class TorchDistances:
    """Distance blocks in torch with TF's GPU roundings: float32 accumulation, one float16 rounding."""

    def __init__(self, device=None):
        self.device = _torch_device(device)

    def __call__(self, u, v):
        import torch

        with _ieee_float32():
            u16, v16 = u.half(), v.half()
            # Products of two float16 numbers are exact in float32, so these are float32 sums rounded
            # once to float16, which is what TF's half-precision GPU kernels return.
            norm_u = (u16 * u16).float().sum(1).half()[:, None]
            norm_v = (v16 * v16).float().sum(1).half()[None, :]
            dot = (u16.float() @ v16.float().T).half()
            d16 = torch.clamp_min((norm_u - 2 * dot) + norm_v, 0.0)
            if bool(torch.isfinite(d16).all()):
                return d16.float()
            u, v = u.float(), v.float()
            return torch.clamp_min(((u * u).sum(1)[:, None] - 2 * (u @ v.T)) + (v * v).sum(1)[None, :], 0.0)

    def close(self):
        pass


class TFDistances:
    """The evaluator's own distance graph (cast to float16, tf.cond to float32) in a TF1 session.

    Bit-identical to the evaluator on the same TF build and device; on a CPU, TF's float16 sums are
    not plain float32 accumulations, so this is the engine that reproduces a CPU evaluator run.
    """

    device = None  # blocks come in and go out as CPU torch tensors

    def __init__(self, tf_device: str | None = None):
        from bench.metrics.tf_session import import_tf, session

        tf = import_tf()
        graph = tf.Graph()
        with graph.as_default():
            self._u = tf.placeholder(tf.float32, shape=[None, None])
            self._v = tf.placeholder(tf.float32, shape=[None, None])

            def squared(u, v):
                norm_u = tf.reshape(tf.reduce_sum(tf.square(u), 1), [-1, 1])
                norm_v = tf.reshape(tf.reduce_sum(tf.square(v), 1), [1, -1])
                return tf.maximum(norm_u - 2 * tf.matmul(u, v, False, True) + norm_v, 0.0)

            d16 = squared(tf.cast(self._u, tf.float16), tf.cast(self._v, tf.float16))
            self._dist = tf.cond(tf.reduce_all(tf.math.is_finite(d16)),
                                 lambda: tf.cast(d16, tf.float32), lambda: squared(self._u, self._v))
        self._sess = session(graph, tf_device)

    def __call__(self, u, v):
        import torch

        out = self._sess.run(self._dist, {self._u: u.numpy(), self._v: v.numpy()})
        return torch.from_numpy(out)

    def close(self):
        self._sess.close()


def distance_engine(engine: str = "tf", device=None):
    """``tf``: the evaluator's graph (its numbers, bit for bit); ``torch``: the fast path for a GPU."""
    if engine not in ENGINES:
        raise UserError(f"unknown distance engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return TFDistances() if engine == "tf" else TorchDistances(device)


def pairwise_distances(u, v, engine: str = "torch", device=None) -> np.ndarray:
    """Squared distances of one block, float32: the float16 result unless any entry of it overflowed."""
    import torch

    dist = distance_engine(engine, device)
    try:
        dev = dist.device or torch.device("cpu")
        as_t = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)  # noqa: E731
        return dist(as_t(u), as_t(v)).cpu().numpy()
    finally:
        dist.close()


def _as_features(name: str, x) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise FeatureShapeError(f"{name} must be a non-empty 2-D array (points x features), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise FeatureShapeError(f"{name} must be floating point, got {x.dtype}")
    return x


def manifold_radii(features, *, k: int = NHOOD_SIZE, row_batch_size: int = ROW_BATCH_SIZE,
                   col_batch_size: int = COL_BATCH_SIZE, engine: str = "tf", device=None) -> np.ndarray:
    """Squared distance of every point to its k-th neighbour in its own set (itself counted as 0th)."""
    feats = _as_features("features", features)
    dist = distance_engine(engine, device)
    try:
        return _radii(dist, _tensor(feats, dist), k, row_batch_size, col_batch_size)
    finally:
        dist.close()


def _tensor(x: np.ndarray, dist):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dist.device or "cpu")


def _radii(dist, x, k: int, row_batch_size: int, col_batch_size: int) -> np.ndarray:
    import torch

    if len(x) <= k:
        raise FeatureShapeError(f"manifold radii with k={k} need more than {k} points, got {len(x)}")
    radii = np.empty(len(x), dtype=np.float32)
    for r0 in range(0, len(x), row_batch_size):
        rows = x[r0:r0 + row_batch_size]
        # The (k+1)-th smallest value of each row (the evaluator's partition(kth=0..k)[:, k]): the k+1
        # smallest of every column block, then of those, so a 10k x 50k row block is never held whole.
        nearest = []
        for c0 in range(0, len(x), col_batch_size):
            block = dist(rows, x[c0:c0 + col_batch_size])
            nearest.append(torch.topk(block, min(k + 1, block.shape[1]), dim=1, largest=False).values)
        nearest = torch.cat(nearest, dim=1)
        radii[r0:r0 + len(rows)] = torch.topk(nearest, k + 1, dim=1, largest=False).values[:, k].cpu().numpy()
    return radii


def precision_recall(ref_features, sample_features, *, k: int = NHOOD_SIZE,
                     row_batch_size: int = ROW_BATCH_SIZE, col_batch_size: int = COL_BATCH_SIZE,
                     engine: str = "tf", device=None) -> tuple[float, float]:
    """(precision, recall) of samples against references, the ADM evaluator's way.

    ``engine`` picks who computes the distance blocks (see the module notes); ``device`` is the torch
    device of the ``torch`` engine (default: CUDA when torch sees a GPU).
    """
    import torch

    ref = _as_features("ref_features", ref_features)
    sample = _as_features("sample_features", sample_features)
    if ref.shape[1] != sample.shape[1]:
        raise FeatureShapeError(f"reference features are {ref.shape[1]}-d but sample features are "
                                f"{sample.shape[1]}-d; both must come from the same network layer")
    dist = distance_engine(engine, device)
    try:
        ref_t, sample_t = _tensor(ref, dist), _tensor(sample, dist)
        ref_r = torch.from_numpy(_radii(dist, ref_t, k, row_batch_size, col_batch_size)).to(ref_t.device)
        sample_r = torch.from_numpy(_radii(dist, sample_t, k, row_batch_size, col_batch_size)).to(ref_t.device)
        ref_covered = torch.zeros(len(ref), dtype=torch.bool, device=ref_t.device)  # inside a sample ball
        sample_covered = torch.zeros(len(sample), dtype=torch.bool, device=ref_t.device)  # inside a ref ball
        # Rows are references, columns samples: the evaluator's blocking for this pass.
        for r0 in range(0, len(ref), row_batch_size):
            r1 = r0 + row_batch_size
            for c0 in range(0, len(sample), col_batch_size):
                c1 = c0 + col_batch_size
                block = dist(ref_t[r0:r1], sample_t[c0:c1])
                ref_covered[r0:r1] |= (block <= sample_r[None, c0:c1]).any(dim=1)
                sample_covered[c0:c1] |= (block <= ref_r[r0:r1, None]).any(dim=0)
    finally:
        dist.close()
    precision = float(np.mean(sample_covered.cpu().numpy().astype(np.float64)))
    recall = float(np.mean(ref_covered.cpu().numpy().astype(np.float64)))
    return precision, recall
