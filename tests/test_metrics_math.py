"""The ADM evaluator's maths (dit.md E.3-E.5) as a specification: FID, Inception Score, precision/recall.

Where the maths fixes a number (Gaussians with a closed-form distance, one-hot softmax, integer point
sets whose distances float16 holds exactly) the tests assert it; where the evaluator's numerics are
the point (float32 mean, eps fallback, imaginary rule, float16 distances, per-block fallback) the
tests pin that behaviour.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from bench.errors import UserError
from bench.metrics import fid as fid_mod
from bench.metrics import frechet_distance, inception_score, manifold_radii, precision_recall, statistics
from bench.metrics.fid import FIDError
from bench.metrics.precision_recall import FeatureShapeError, pairwise_distances

ENGINES = ("tf", "torch")


def _spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def _fid_by_eigh(mu1, s1, mu2, s2):
    """Independent closed form: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) for PSD S1, S2."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


# ---------------------------------------------------------------------------------------------- FID

def test_fid_scalar_gaussians():
    # N(0, 4) vs N(3, 1): 3^2 + (2 - 1)^2 = 10.
    assert frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([3.0]), np.array([[1.0]])) == pytest.approx(10, rel=1e-12)


def test_fid_commuting_gaussians_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_fid_general_gaussians_match_eigh_closed_form_and_are_symmetric():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
    s1, s2 = _spd(rng, 64), _spd(rng, 64)
    d12, d21 = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu2, s2, mu1, s1)
    assert d12 == pytest.approx(_fid_by_eigh(mu1, s1, mu2, s2), rel=1e-9)
    assert d12 == pytest.approx(d21, rel=1e-10)
    assert d12 > 0


def test_fid_zero_for_identical_statistics():
    rng = np.random.default_rng(2)
    mu, s = rng.normal(size=32), _spd(rng, 32)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)


def test_fid_rank_deficient_covariances():
    # 10 points in 32 dimensions: both covariances have rank 9, as FID-10 on 2048-d features would.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 0.5
    (mu1, s1), (mu2, s2) = statistics(x), statistics(y)
    assert np.linalg.matrix_rank(s1) == 9
    value = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(value)
    assert value == pytest.approx(_fid_by_eigh(mu1, s1, mu2, s2), rel=1e-6)
    # Singular diagonal covariances with a known answer: sum (sqrt(a) - sqrt(b))^2 over the support.
    a, b = np.array([0.0, 0.0, 4.0, 1.0]), np.array([0.0, 9.0, 1.0, 0.0])
    assert frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), abs=1e-6)


def test_statistics_float32_mean_and_unbiased_float64_covariance():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    mu, sigma = statistics(x)
    assert mu.dtype == np.float32 and sigma.dtype == np.float64  # the evaluator's dtypes
    assert np.array_equal(mu, np.mean(x, axis=0))
    centred = x.astype(np.float64) - x.astype(np.float64).mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-12)


def test_fid_eps_offset_only_when_sqrtm_is_not_finite(monkeypatch):
    calls = []
    real_sqrtm = fid_mod.linalg.sqrtm

    def flaky_sqrtm(m):
        calls.append(m.copy())
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)

    monkeypatch.setattr(fid_mod.linalg, "sqrtm", flaky_sqrtm)
    a, b = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 0.0])
    with pytest.warns(RuntimeWarning, match="adding 1e-06"):
        value = frechet_distance(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    eps = 1e-6
    # Offset covariances inside the root, the original traces outside it: the evaluator's formula.
    expected = 3 + a.sum() + b.sum() - 2 * np.sum(np.sqrt((a + eps) * (b + eps)))
    assert value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(calls[1], np.diag((a + eps) * (b + eps)))

    # A finite root is used as is: no offset, no warning.
    calls.clear()
    monkeypatch.setattr(fid_mod.linalg, "sqrtm", lambda m: calls.append(m) or real_sqrtm(m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet_distance(np.zeros(3), np.diag(a + 1), np.ones(3), np.diag(b + 1))
    assert len(calls) == 1


@pytest.mark.parametrize("diag_imag, ok", [(5e-4, True), (-9.9e-4, True), (2e-3, False)])
def test_fid_imaginary_rule_looks_at_the_diagonal_only(monkeypatch, diag_imag, ok):
    root = np.diag([2.0, 1.0]).astype(complex)
    root[0, 0] += 1j * diag_imag
    root[0, 1] += 0.5j  # large off-diagonal imaginary parts do not matter to the evaluator
    monkeypatch.setattr(fid_mod.linalg, "sqrtm", lambda m: root)
    args = (np.zeros(2), np.diag([4.0, 1.0]), np.zeros(2), np.diag([1.0, 1.0]))
    if ok:
        assert frechet_distance(*args) == pytest.approx(5 + 2 - 2 * 3)
    else:
        with pytest.raises(FIDError, match="imaginary component"):
            frechet_distance(*args)


def test_fid_rejects_mismatched_or_broken_statistics():
    with pytest.raises(FIDError, match="length"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FIDError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))
    assert issubclass(FIDError, UserError) and issubclass(FIDError, ValueError)


# ----------------------------------------------------------------------------------------------- IS

def _one_hot(classes, n_classes=1008):
    p = np.zeros((len(classes), n_classes), np.float32)
    p[np.arange(len(classes)), classes] = 1
    return p


def test_is_of_uniform_softmax_is_one():
    assert inception_score(np.full((300, 1008), 1 / 1008, np.float32)) == pytest.approx(1.0, abs=1e-5)


def test_is_of_balanced_one_hot_is_the_number_of_classes():
    # 0 log 0 = 0: where the evaluator would return NaN, the limit is taken.
    assert inception_score(_one_hot(np.arange(1000) % 10)) == pytest.approx(10, rel=1e-5)


def test_is_consecutive_splits_and_a_short_last_split_counts_in_full():
    # 12,000 rows -> splits of 5000, 5000, 2000 with 10, 5 and 2 classes: IS = (10 + 5 + 2) / 3.
    classes = np.concatenate([np.arange(5000) % 10, np.arange(5000) % 5, np.arange(2000) % 2])
    probs = _one_hot(classes, 16)
    assert inception_score(probs) == pytest.approx(17 / 3, rel=1e-5)
    # One split of all rows: exp(entropy of the class frequencies), the textbook one-hot answer.
    freq = np.bincount(classes) / len(classes)
    assert inception_score(probs, split_size=12000) == pytest.approx(np.exp(-np.sum(freq * np.log(freq))), rel=1e-5)
    # Order matters: the same rows shuffled give another score (the evaluator does not shuffle).
    shuffled = probs[np.random.default_rng(0).permutation(len(probs))]
    assert abs(inception_score(shuffled) - 17 / 3) > 1


def test_is_is_bit_identical_to_the_evaluators_expression():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(7000, 1008)).astype(np.float32) * 3
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    scores = []  # the evaluator's float32 arithmetic, written out
    for i in range(0, len(probs), 5000):
        part = probs[i:i + 5000]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert inception_score(probs) == float(np.mean(scores))
    # ... and equals the textbook exp(E KL) to float32 accuracy.
    p64 = probs.astype(np.float64)
    ref = np.mean([np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1))) for q in (p64[:5000], p64[5000:])])
    assert inception_score(probs) == pytest.approx(ref, rel=1e-5)


def test_is_rejects_non_probability_arrays():
    with pytest.raises(UserError, match="N x classes"):
        inception_score(np.ones(10, np.float32))
    with pytest.raises(UserError, match="floating"):
        inception_score(np.ones((4, 3), np.int64))


# ---------------------------------------------------------------------------------------------- P/R
# Points on a line in 8-d, integer coordinates: every squared distance is an integer below 2048,
# exact in float16, so the evaluator's answer can be worked out by hand.
REF_LINE = [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
SAMPLE_LINE = [0, 1, 2, 3, 7, 20, 21, 22, 23]
# k=3 radii, self counted: e.g. ref 0 -> distances 0, 1, 4, 9 -> 9; ref 4 -> 0, 1, 4, 9 -> 9.
REF_RADII = [9, 4, 4, 4, 9, 9, 4, 4, 4, 9]
# Precision: samples 0..3 sit on references; sample 7 is 9 from ref 4 (radius 9: "<=" counts);
# 20..23 are 36+ from ref 14 (radius 9). -> 5/9.
# Recall: refs 0..4 are near samples 0..3; sample 7 has radius 36 (neighbours 3, 2, 1 at 16, 25, 36)
# and covers refs 10..13 (13 at exactly 36); ref 14 is 49 from 7 and 36 from 20 (radius 9). -> 9/10.
EXPECTED_PR = (5 / 9, 9 / 10)


def _line(positions, dim=8, scale=1.0):
    x = np.zeros((len(positions), dim), np.float32)
    x[:, 0] = np.asarray(positions, np.float32) * scale
    return x


@pytest.mark.parametrize("engine", ENGINES)
def test_pr_on_points_with_known_answer(engine):
    ref, sample = _line(REF_LINE), _line(SAMPLE_LINE)
    np.testing.assert_array_equal(manifold_radii(ref, engine=engine), REF_RADII)
    assert precision_recall(ref, sample, engine=engine) == pytest.approx(EXPECTED_PR, abs=1e-12)
    # Swapping the roles swaps the answers' meaning, not the machinery.
    p, r = precision_recall(sample, ref, engine=engine)
    assert (p, r) == pytest.approx((EXPECTED_PR[1], EXPECTED_PR[0]), abs=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
def test_pr_block_sizes_do_not_matter_without_overflow(engine):
    ref, sample = _line(REF_LINE), _line(SAMPLE_LINE)
    assert precision_recall(ref, sample, row_batch_size=3, col_batch_size=4, engine=engine) == pytest.approx(EXPECTED_PR)


@pytest.mark.parametrize("engine", ENGINES)
def test_pr_float16_overflow_falls_back_to_float32(engine):
    # Scaled by 300, squared distances reach 23^2 * 90000 > 65504: float16 overflows, float32 is exact.
    ref, sample = _line(REF_LINE, scale=300), _line(SAMPLE_LINE, scale=300)
    np.testing.assert_array_equal(manifold_radii(ref, engine=engine), np.asarray(REF_RADII) * 90000.0)
    assert precision_recall(ref, sample, engine=engine) == pytest.approx(EXPECTED_PR, abs=1e-12)
    d = pairwise_distances(ref[:3], sample[-2:], engine=engine)
    np.testing.assert_array_equal(d, (np.array([[22, 23], [21, 22], [20, 21]]) * 300.0) ** 2)


@pytest.mark.parametrize("engine", ENGINES)
def test_pr_self_distance_need_not_be_zero_in_float16(engine):
    # |u|^2 sums float16-rounded squares, u.u sums exact products: the two roundings can differ.
    x = np.random.default_rng(6).uniform(0, 3, (200, 2048)).astype(np.float32)
    self_dist = np.diag(pairwise_distances(x, x, engine=engine))
    assert (self_dist > 0).any() and self_dist.max() <= 8  # a few float16 ulps of |u|^2 ~ 6000


@pytest.mark.parametrize("engine", ENGINES)
def test_pr_float16_path_quantises_and_fallback_is_per_block(engine):
    rng = np.random.default_rng(6)
    small = rng.uniform(0, 1, (6, 64)).astype(np.float32)  # norms ~ 20: float16 is taken
    big = small[:2] + 100  # norms ~ 6e5: any block touching these overflows in float16
    exact = ((small[:, None, :].astype(np.float64) - small[None].astype(np.float64)) ** 2).sum(-1)

    d16 = pairwise_distances(small, small, engine=engine)
    assert not np.allclose(d16, exact, rtol=0, atol=1e-6)
    np.testing.assert_allclose(d16, exact, atol=0.05)  # ... but within float16 resolution of norms ~ 20

    feats = np.concatenate([small, big])
    k3 = lambda d: np.partition(d, 3, axis=1)[:, 3]  # noqa: E731
    # One 8 x 8 block holds the big points: the whole block is float32, so small points' radii are too.
    one_block = manifold_radii(feats, engine=engine)
    np.testing.assert_allclose(one_block[:6], k3(exact), rtol=1e-4)
    # 6-row blocks: the small-vs-small block stays float16, so the same radii come out quantised.
    blocked = manifold_radii(feats, row_batch_size=6, col_batch_size=6, engine=engine)
    np.testing.assert_array_equal(blocked[:6], k3(np.concatenate([d16, pairwise_distances(small, big, engine=engine)], 1)))
    assert not np.array_equal(blocked[:6], one_block[:6])


def test_pr_engines_agree_on_realistic_features():
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(20, 32))
    proj = rng.normal(size=(32, 256)) / 6
    def feats(n, shift):
        z = centres[rng.integers(0, 20, n)] + rng.normal(size=(n, 32)) * 0.8 + shift
        return np.log1p(np.exp(z @ proj)).astype(np.float32)
    ref, sample = feats(400, 0.0), feats(300, 0.1)
    p_tf, r_tf = precision_recall(ref, sample, engine="tf")
    p_t, r_t = precision_recall(ref, sample, engine="torch")
    assert 0.2 < p_tf < 0.98 and 0.2 < r_tf < 0.98  # a non-trivial case
    # The engines differ only in float16 rounding of the norms: a handful of boundary points at most.
    assert abs(p_tf - p_t) <= 3 / 300 and abs(r_tf - r_t) <= 3 / 400


def test_pr_rejects_bad_feature_sets():
    with pytest.raises(FeatureShapeError, match="same network layer"):
        precision_recall(np.zeros((10, 4), np.float32), np.zeros((10, 5), np.float32), engine="torch")
    with pytest.raises(FeatureShapeError, match="more than 3 points"):
        manifold_radii(np.zeros((3, 4), np.float32), engine="torch")
    with pytest.raises(UserError, match="distance engine"):
        precision_recall(np.zeros((10, 4), np.float32), np.zeros((10, 4), np.float32), engine="jax")
