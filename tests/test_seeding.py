"""Per-sample determinism: what sample i gets depends on (seed, i) alone."""
import numpy as np
import pytest
import torch

from bench import seeding
from bench.errors import UserError


def test_random_labels_depend_only_on_seed_and_index():
    all_at_once = seeding.sample_labels(7, range(50), 10, 50)
    piecewise = np.concatenate([seeding.sample_labels(7, range(a, b), 10, 50) for a, b in ((0, 3), (3, 31), (31, 50))])
    reversed_order = seeding.sample_labels(7, range(49, -1, -1), 10, 50)[::-1]
    assert np.array_equal(all_at_once, piecewise)
    assert np.array_equal(all_at_once, reversed_order)
    assert all_at_once.min() >= 0 and all_at_once.max() < 10
    assert not np.array_equal(all_at_once, seeding.sample_labels(8, range(50), 10, 50))


def test_random_labels_are_roughly_uniform():
    labels = seeding.sample_labels(0, range(20000), 10, 20000)
    counts = np.bincount(labels, minlength=10)
    # 20000 draws over 10 classes: each count ~ 2000 +- 42 (1 sd); 5 sd is a bound that a uniform draw passes.
    assert np.all(np.abs(counts - 2000) < 5 * 42.4)


def test_balanced_labels_are_exact_and_seeded():
    labels = seeding.sample_labels(3, range(1000), 10, 1000, policy="balanced")
    assert np.array_equal(np.bincount(labels), np.full(10, 100))
    assert np.array_equal(labels[200:300], seeding.sample_labels(3, range(200, 300), 10, 1000, policy="balanced"))
    assert not np.array_equal(labels, seeding.sample_labels(4, range(1000), 10, 1000, policy="balanced"))
    uneven = seeding.sample_labels(3, range(13), 5, 13, policy="balanced")
    assert sorted(np.bincount(uneven).tolist()) == [2, 2, 3, 3, 3]


def test_unknown_policy_and_negative_seed_are_user_errors():
    with pytest.raises(UserError):
        seeding.sample_labels(0, range(3), 10, 3, policy="stratified")
    with pytest.raises(UserError):
        seeding.SampleNoise(-1, [0], (1, 2, 2))


def _noise_trace(indices, steps=3, shape=(4, 3, 3)):
    noise = seeding.SampleNoise(11, indices, shape)
    x = torch.zeros(len(indices), *shape)
    return [noise.initial()] + [noise.step(k, x) for k in range(steps)]


def test_noise_is_independent_of_batching():
    whole = _noise_trace(list(range(8)))
    parts = [_noise_trace([0, 1, 2]), _noise_trace([3, 4, 5]), _noise_trace([6, 7])]
    for k in range(len(whole)):
        assert torch.equal(whole[k], torch.cat([p[k] for p in parts]))
    # Streams differ between samples and between steps.
    assert not torch.equal(whole[0][0], whole[0][1])
    assert not torch.equal(whole[1][0], whole[2][0])


def test_noise_steps_must_come_in_order_and_cfg_rows_are_doubled():
    noise = seeding.SampleNoise(0, [5, 6], (1, 2, 2))
    with pytest.raises(RuntimeError):
        noise.step(0, torch.zeros(2, 1, 2, 2))
    z = noise.initial()
    drawn = noise.step(0, torch.zeros(4, 1, 2, 2, dtype=torch.float64))
    assert drawn.shape == (4, 1, 2, 2) and drawn.dtype == torch.float64
    assert torch.equal(drawn[:2], drawn[2:])
    with pytest.raises(RuntimeError):
        noise.step(5, torch.zeros(2, 1, 2, 2))
    assert z.shape == (2, 1, 2, 2)
