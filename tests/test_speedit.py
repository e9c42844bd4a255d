"""SpeeDiT's training-time timestep distribution, dual batches and MSE weights.

Numbers from shared/reference/speedit.md (computed from the official code on DiT's 1000-step linear
schedule): tau = 642, the plateaus of p, its mass below tau, the P2 weights 1 - abar, the batch
composition n//2+1 + duals, and the marginal P_n of a timestep in a batch (its §3 table).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from bench.diffusion import create_diffusion
from bench.errors import UserError
from methods.speedit import METHOD, SpeeDiT, SpeeDiTTrainHook


@pytest.fixture(scope="module")
def training_diffusion():
    return create_diffusion("")  # DiT trains on all 1000 steps


@pytest.fixture(scope="module")
def speedit(training_diffusion):
    return SpeeDiT(training_diffusion)


# ------------------------------------------------------------------------------------------ constants
def test_meaningful_steps(speedit):
    assert speedit.meaningful_steps == 642
    assert SpeeDiT(create_diffusion("250")).meaningful_steps == 189  # the same rule on a respaced process


def test_p_is_a_soft_step_from_2_5_to_0_5(speedit):
    p = speedit.p
    assert p.dtype == torch.float64 and p.shape == (1000,)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-15)
    assert p[0].item() == pytest.approx(1.40236e-3, rel=1e-5)
    assert p[999].item() == pytest.approx(2.80473e-4, rel=1e-5)
    assert (p[:627] == p[0]).all() and (p[659:] == p[999]).all()  # exactly flat: 627 and 341 entries
    assert p[626] == p[0] and p[627] < p[0] and p[658] > p[999]
    unnormalised = (p / p[0] * 2.5).numpy()  # p~_0 is exactly 2.5
    np.testing.assert_allclose(unnormalised[640:643], [2.25365, 1.32889, 0.63424], rtol=1e-5)
    assert p[:642].sum().item() == pytest.approx(0.899506, abs=1e-6)


def test_p_matches_an_independent_numpy_recomputation(training_diffusion, speedit):
    # np.gradient has the same edge handling as torch.gradient: central inside, one-sided at the ends.
    g = np.gradient(np.sqrt(1.0 - training_diffusion.alphas_cumprod))
    assert g[0] == pytest.approx(4.829e-3, rel=1e-3) and g[999] == pytest.approx(4.118e-7, rel=1e-3)
    assert g[640] == pytest.approx(1.00981e-4, rel=1e-5) and g[641] == pytest.approx(9.98272e-5, rel=1e-5)
    p = np.tanh(1e6 * (g - 1e-4)) + 1.5
    np.testing.assert_allclose(speedit.p.numpy(), p / p.sum(), rtol=1e-12, atol=0)


def test_weights_are_p2_with_k_1_gamma_1(training_diffusion, speedit):
    w = speedit.weights
    assert w.dtype == np.float64 and w.shape == (1000,)
    np.testing.assert_allclose(w, 1.0 - training_diffusion.alphas_cumprod, rtol=0, atol=2e-16)
    assert w[0] == pytest.approx(1.0e-4, rel=1e-9) and w[999] == pytest.approx(0.99996, abs=1e-5)
    assert w[1] == pytest.approx(2.2e-4, rel=1e-3) and w[100] == pytest.approx(0.1049, abs=1e-4)
    assert (np.diff(w) > 0).all()


# ------------------------------------------------------------------------------------------ batches
def test_dual_map(speedit):
    t = torch.tensor([0, 1, 300, 641, 642, 643, 999])
    assert speedit.dual_timesteps(t).tolist() == [642, 641, 342, 1, 0, 1, 357]


@pytest.mark.parametrize("n, base", [(1, 1), (2, 2), (7, 4), (8, 5)])
def test_batch_is_base_draws_then_duals_of_the_first(speedit, n, base):
    ours, reference = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
    t, w = speedit.sample_timesteps(n, generator=ours)
    draws = torch.multinomial(speedit.p, n // 2 + 1, replacement=True, generator=reference)
    assert torch.equal(ours.get_state(), reference.get_state())  # exactly n//2 + 1 draws were made
    assert t.dtype == torch.int64 and t.shape == (n,)
    assert torch.equal(t[:base], draws[:base])
    assert torch.equal(t[base:], speedit.dual_timesteps(draws[: n - base]))
    assert w.dtype == torch.float32 and torch.equal(w, torch.from_numpy(speedit.weights[t.numpy()]).float())


def test_exact_marginal_reproduces_the_reference_table(speedit):
    t = np.arange(1000)
    table = {  # n: P(t >= 642), P(t >= 440), E[w_t], E[t]  (speedit.md §3)
        1: (0.1005, 0.3830, 0.6148, 370.5), 2: (0.1005, 0.3830, 0.6148, 370.5),
        7: (0.0580, 0.3408, 0.5863, 343.4), 8: (0.0633, 0.3461, 0.5898, 346.8),
        32: (0.0540, 0.3369, 0.5836, 340.9),
    }
    for n, expected in table.items():
        P = speedit.marginal(n)
        got = (P[642:].sum(), P[440:].sum(), (P * speedit.weights).sum(), (P * t).sum())
        # The table is rounded to 4 digits (E[t] to 0.1).
        assert all(abs(a - b) <= tol for a, b, tol in zip(got, expected, (5e-5, 5e-5, 5e-5, 0.05))), (n, got)


def test_drawn_timesteps_follow_the_exact_marginal(speedit):
    g = torch.Generator().manual_seed(0)
    n, batches = 7, 20000
    t = torch.cat([speedit.sample_timesteps(n, generator=g)[0] for _ in range(batches)]).numpy()
    counts = np.bincount(t, minlength=1000)
    assert stats.chisquare(counts, speedit.marginal(n) * len(t)).pvalue > 1e-3
    # The same test rejects the neighbouring hypotheses, so it can fail.
    assert stats.chisquare(counts, speedit.p.numpy() * len(t)).pvalue < 1e-12  # no duals
    assert stats.chisquare(counts, np.full(1000, len(t) / 1000)).pvalue < 1e-12  # DiT's uniform t


def test_weights_multiply_each_samples_mse_by_its_own_t(training_diffusion):
    hook = SpeeDiTTrainHook(training_diffusion)
    t, w = hook.sample_timesteps(8, "cpu", torch.Generator().manual_seed(3))
    assert t.device.type == "cpu" and w.shape == (8,)
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(8, 4, 4, 4, generator=g), torch.randn(8, 4, 4, 4, generator=g)

    def model(x, t, **kwargs):  # a fixed learned-sigma "model": eps guess and variance channels
        return torch.cat([0.5 * x, torch.tanh(x)], dim=1)

    plain = training_diffusion.training_losses(model, x0, t, noise=noise)
    weighted = training_diffusion.training_losses(model, x0, t, noise=noise, mse_weight=w)
    torch.testing.assert_close(weighted["loss"], w * plain["mse"] + plain["vb"], rtol=1e-6, atol=0)
    expected_w = torch.tensor(1.0 - training_diffusion.alphas_cumprod[t.numpy()], dtype=torch.float32)
    torch.testing.assert_close(w, expected_w, rtol=1e-6, atol=0)
    # Per sample: reversing the batch reverses the weights with it.
    assert torch.equal(hook.speedit.per_sample_weights(t.flip(0)), w.flip(0))


def test_registered_as_train_hooks(training_diffusion):
    assert set(METHOD.train_hooks) == {"speedit", "speedit-nus"}
    primary = METHOD.train_hooks["speedit"](training_diffusion)
    nus = METHOD.train_hooks["speedit-nus"](training_diffusion, k=5)
    assert primary.speedit.variant == "primary" and nus.speedit.variant == "nus" and nus.speedit.k == 5


# ------------------------------------------------------------------------------------------ NUS variant
def test_nus_hard_step_p(training_diffusion):
    s = SpeeDiT(training_diffusion, "nus")  # k=2, tau=700: the published configs
    assert s.p.dtype == torch.float64
    np.testing.assert_allclose(s.p[:700].numpy(), 1 / 850, rtol=1e-7)
    np.testing.assert_allclose(s.p[700:].numpy(), 1 / 1700, rtol=1e-7)
    assert (s.p[:700] == s.p[0]).all() and (s.p[700:] == s.p[999]).all()
    k5 = SpeeDiT(training_diffusion, "nus", k=5)
    assert k5.p[0].item() == pytest.approx(1.3158e-3, rel=1e-4)
    assert k5.p[999].item() == pytest.approx(2.6316e-4, rel=1e-4)


def test_nus_duals_still_use_meaningful_steps_not_tau(training_diffusion):
    s = SpeeDiT(training_diffusion, "nus")
    assert (s.meaningful_steps, s.tau) == (642, 700)
    t, _ = s.sample_timesteps(7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t[4:], torch.where(t[:3] < 642, 642 - t[:3], t[:3] - 642))


def test_nus_ours_weighting_is_bell_shaped_then_one(training_diffusion):
    w = SpeeDiT(training_diffusion, "nus", lam=0.6).weights
    assert w[:700].max() == pytest.approx(0.6, abs=1e-15) and int(np.argmax(w[:700])) == 219
    assert w[:700].min() == pytest.approx(0.4072, abs=1e-4)
    assert (w[700:] == 1.0).all()


def test_nus_other_weightings(training_diffusion):
    one_minus_abar = 1.0 - training_diffusion.alphas_cumprod
    theory = SpeeDiT(training_diffusion, "nus", weighting="theory").weights
    assert (theory.min(), theory.max()) == pytest.approx((0.2, 0.8), abs=1e-15) and int(np.argmax(theory)) == 219
    np.testing.assert_allclose(SpeeDiT(training_diffusion, "nus", weighting="p2").weights, one_minus_abar,
                               rtol=0, atol=2e-16)
    # Intended min(SNR, 5)/(SNR + 1); the official indexing takes SNR_0's clamp for every t.
    np.testing.assert_allclose(SpeeDiT(training_diffusion, "nus", weighting="min_snr").weights,
                               5 * one_minus_abar, rtol=1e-12)
    none = SpeeDiT(training_diffusion, "nus", weighting="none")
    assert none.weights is None and none.sample_timesteps(3)[1] is None


def test_nus_sampling_options(training_diffusion):
    no_dual = SpeeDiT(training_diffusion, "nus", sampling="no_dual")
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    t, _ = no_dual.sample_timesteps(6, generator=g1)
    assert torch.equal(t, torch.multinomial(no_dual.p.float(), 6, replacement=True, generator=g2))
    np.testing.assert_array_equal(no_dual.marginal(6), no_dual.p.numpy())
    uniform = SpeeDiT(training_diffusion, "nus", sampling="uniform")
    np.testing.assert_array_equal(uniform.marginal(6), np.full(1000, 1e-3))


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="fast"), "unknown SpeeDiT variant"),
    (dict(variant="primary", k=2), "only apply to SpeeDiT variant 'nus'"),
    (dict(variant="nus", weighting="lognormal"), "unknown SpeeD weighting"),
    (dict(variant="nus", sampling="clts"), "unknown SpeeD sampling"),
    (dict(variant="nus", tau=1001), "tau = 1001"),
])
def test_bad_options_are_user_errors(training_diffusion, kwargs, message):
    with pytest.raises(UserError, match=message):
        SpeeDiT(training_diffusion, **kwargs)
