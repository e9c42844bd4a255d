"""Per-sample randomness: sample ``i`` of a run takes everything random from ``(seed, i)`` alone.

The official scripts seed each rank with ``global_seed * world_size + rank`` and draw a batch at a
time (dit.md §C.2), so the images depend on the batch size and on the number of GPUs. Here each
sample owns a generator derived from ``(seed, i)`` through NumPy's ``SeedSequence`` (a well-mixed
hash, so neighbouring indices get unrelated streams). From it the sample draws, in order, its initial
latent and then one Gaussian per denoising step. Labels come from a separate stream. The result: the
same images for any batch size, any process count, and after any resume.

Cost: one small ``randn`` per sample per step, on the sampling device.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bench.errors import UserError

LABEL_POLICIES = ("random", "balanced")

# Stream identifiers mixed into the SeedSequence entropy so the label and noise streams of a sample
# are independent of each other.
_NOISE_STREAM = 0
_LABEL_STREAM = 1
_BALANCE_STREAM = 2


def _derive(seed: int, *words: int) -> int:
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    state = np.random.SeedSequence([seed, *words]).generate_state(2, dtype=np.uint32)
    # 63 bits: a positive int every torch generator accepts.
    return (int(state[0]) << 31) ^ (int(state[1]) & 0x7FFFFFFF)


def sample_labels(seed: int, indices: Sequence[int], num_classes: int, num_samples: int,
                  policy: str = "random") -> np.ndarray:
    """Class labels of the given sample indices (int64).

    ``random``: each label uniform over the classes (DiT's default), drawn from ``(seed, i)``.
    ``balanced``: exactly ``num_samples // num_classes`` per class (the first ``num_samples % num_classes``
    classes get one more), in an order shuffled by the seed; depends on ``num_samples``, which is
    part of the protocol.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= num_samples):
        raise ValueError("sample index out of range")
    if policy == "random":
        return np.array(
            [np.random.Generator(np.random.PCG64(_derive(seed, _LABEL_STREAM, int(i)))).integers(num_classes)
             for i in indices], dtype=np.int64)
    if policy == "balanced":
        order = np.random.default_rng(_derive(seed, _BALANCE_STREAM, num_samples)).permutation(num_samples)
        return (order[indices] % num_classes).astype(np.int64)
    raise UserError(f"unknown label policy {policy!r}; choose one of {', '.join(LABEL_POLICIES)}")


class SampleNoise:
    """The Gaussian streams of a batch of samples: initial latents, then one draw per step.

    ``initial()`` must be called first, then ``step(k, x)`` for k = 0, 1, ... — this is the
    ``noise_fn`` protocol of ``bench.diffusion``'s loops. When the model runs with classifier-free
    guidance the loop's batch is twice the number of samples; the second (unconditional) half is
    never read by the model (dit.md §A.7), so it gets a copy of the first half.
    """

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"):
        self.indices = [int(i) for i in indices]
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.generators = []
        for i in self.indices:
            g = torch.Generator(device=self.device)
            g.manual_seed(_derive(seed, _NOISE_STREAM, i))
            self.generators.append(g)
        self._next_step = -1

    def _draw(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device) for g in self.generators])

    def initial(self) -> torch.Tensor:
        if self._next_step != -1:
            raise RuntimeError("initial latents are drawn once, before any step")
        self._next_step = 0
        return self._draw()

    def step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if step != self._next_step:
            raise RuntimeError(f"noise for step {step} requested, expected step {self._next_step}")
        self._next_step += 1
        noise = self._draw()
        if x.shape[0] == 2 * noise.shape[0]:
            noise = torch.cat([noise, noise], dim=0)
        elif x.shape[0] != noise.shape[0]:
            raise RuntimeError(f"batch of {x.shape[0]} rows for {noise.shape[0]} samples")
        return noise.to(dtype=x.dtype)

    __call__ = step
