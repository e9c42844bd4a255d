"""The IDDPM Gaussian diffusion as DiT uses it (shared/reference/dit.md B, G.7-G.11).

The sampling and loss checks compare against a plain float64 NumPy re-derivation of the textbook
formulas written here (not the module's algebra); hard-coded lists and numbers come from dit.md or
from running facebookresearch/DiT@ed81ce2's ``diffusion`` package.
"""
import math

import numpy as np
import pytest
import torch

from bench.diffusion import (
    GaussianDiffusion, LossType, ModelMeanType, ModelVarType, create_diffusion,
    discretized_gaussian_log_likelihood, get_named_beta_schedule, normal_kl, space_timesteps,
)
from bench.errors import UserError

# ---------------------------------------------------------------------------------------------
# Respacing (dit.md B.4)


def test_respacing_lists_match_the_official_code():
    cases = {
        "7": [0, 166, 333, 500, 666, 832, 999],  # 832.5 rounds half-to-even down
        "ddim25": list(range(0, 1000, 40)),
        "ddim50": list(range(0, 1000, 20)),
        "ddim7": [0, 143, 286, 429, 572, 715, 858],
        "10,15,20": [0, 37, 74, 111, 148, 185, 222, 259, 296, 333,
                     334, 358, 381, 405, 429, 453, 476, 500, 524, 547, 571, 595, 619, 642, 666,
                     667, 684, 702, 719, 737, 754, 772, 789, 807, 824, 842, 859, 877, 894, 912,
                     929, 947, 964, 982, 999],
    }
    for spec, expected in cases.items():
        assert create_diffusion(spec).timestep_map.tolist() == expected, spec
        assert sorted(space_timesteps(1000, spec)) == expected, spec


@pytest.mark.parametrize("spec, head, tail", [
    ("250", [0, 4, 8, 12, 16, 20, 24, 28], [987, 991, 995, 999]),
    ("50", [0, 20, 41, 61, 82, 102], [938, 958, 979, 999]),
    ("25", [0, 42, 83, 125, 166, 208], [874, 916, 957, 999]),
])
def test_section_respacing_uses_an_accumulated_float_stride(spec, head, tail):
    n = int(spec)
    got = create_diffusion(spec).timestep_map.tolist()
    assert len(got) == n and got[:len(head)] == head and got[-len(tail):] == tail
    # Independent form: sequential float64 partial sums (np.cumsum) and numpy's half-to-even rounding.
    positions = np.concatenate([[0.0], np.cumsum(np.full(n - 1, 999 / (n - 1)))])
    assert got == np.round(positions).astype(int).tolist()


def test_empty_respacing_keeps_every_step_and_model_sees_integer_timesteps():
    for spec in ("", None, "1000", "ddim1000"):
        d = create_diffusion(spec)
        assert d.num_timesteps == 1000 and d.timestep_map.tolist() == list(range(1000))
    assert create_diffusion("").timestep_map.dtype == np.int64


@pytest.mark.parametrize("spec", ["ddim3000", "ddim1", "ddim0", "1001", "600,600", "abc", "ddimx",
                                  "10,,5", "-5", "1"])
def test_impossible_respacings_are_user_errors(spec):
    with pytest.raises(UserError) as info:
        create_diffusion(spec)
    assert isinstance(info.value, ValueError)  # the official code raises ValueError too
    assert spec in str(info.value) or "at least 2 steps" in str(info.value)


def test_ddim_stride_search_excludes_the_full_length_like_the_official_code():
    with pytest.raises(ValueError, match="ddim1"):  # a stride of 1000 is never tried
        space_timesteps(1000, "ddim1")
    assert space_timesteps(1000, "ddim2") == {0, 500}
    assert space_timesteps(1000, [10, 0, 5]) == space_timesteps(1000, "10,0,5")  # an empty section is allowed


def test_bad_schedules_are_user_errors():
    with pytest.raises(UserError, match="unknown noise schedule"):
        create_diffusion("", noise_schedule="cosine")
    with pytest.raises(UserError, match=r"\(0, 1\]"):  # 10 steps scale the linear betas up to 2.0
        create_diffusion("", diffusion_steps=10)


# ---------------------------------------------------------------------------------------------
# Schedules (dit.md B.1, B.4)


def _reference_process(timestep_map):
    """abar, abar_prev, beta of the respaced linear schedule, re-derived step by step."""
    raw = np.linspace(1e-4, 0.02, 1000)
    abar_full = np.cumprod(1.0 - raw)
    abar = abar_full[np.asarray(timestep_map)]
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return abar, abar_prev, 1.0 - abar / abar_prev


def test_linear_schedule_endpoints_and_the_recomputed_betas_quirk():
    raw = get_named_beta_schedule("linear", 1000)
    assert raw.dtype == np.float64 and raw[0] == 1e-4 and raw[-1] == 0.02 and len(raw) == 1000
    assert get_named_beta_schedule("linear", 250)[[0, -1]].tolist() == [4e-4, 0.08]
    d = create_diffusion("")
    # Betas recomputed from abar ratios even for "": off by float error only (dit.md B.4).
    assert d.betas[0] == 9.999999999998899e-05
    assert d.betas[-1] == 0.020000000000000018
    deviation = np.abs(d.betas - raw)
    assert deviation.max() <= 1.7e-16 and deviation.max() > 0
    assert d.alphas_cumprod[-1] == pytest.approx(4.035829765375676e-05, rel=1e-12)
    spaced = create_diffusion("250")
    assert spaced.betas[1] == pytest.approx(0.0005990655644756426, rel=1e-12)
    assert spaced.betas[-1] == pytest.approx(0.07751934499235003, rel=1e-12)
    abar, abar_prev, beta = _reference_process(spaced.timestep_map)
    np.testing.assert_allclose(spaced.alphas_cumprod, abar, rtol=1e-13)
    np.testing.assert_allclose(spaced.betas, beta, rtol=1e-12)


def test_tables_follow_their_definitions():
    d = create_diffusion("250")
    abar, abar_prev, beta = _reference_process(d.timestep_map)
    post_var = beta * (1 - abar_prev) / (1 - abar)
    expected = {
        "alphas_cumprod_prev": abar_prev,
        "alphas_cumprod_next": np.append(abar[1:], 0.0),
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - abar),
        "log_one_minus_alphas_cumprod": np.log(1 - abar),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - abar) / abar),
        "posterior_variance": post_var,
        "posterior_mean_coef1": beta * np.sqrt(abar_prev) / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar),
    }
    for name, value in expected.items():
        table = getattr(d, name)
        assert table.dtype == np.float64 and table.shape == (250,), name
        np.testing.assert_allclose(table, value, rtol=1e-11, atol=1e-15, err_msg=name)
    clipped = d.posterior_log_variance_clipped
    assert post_var[0] == 0 and clipped[0] == clipped[1]  # quirk G.9
    np.testing.assert_allclose(clipped[1:], np.log(post_var[1:]), rtol=1e-12)


def test_cosine_schedule():
    betas = get_named_beta_schedule("squaredcos_cap_v2", 1000)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    assert betas[0] == pytest.approx(1 - f(0.001) / f(0.0), rel=1e-12)
    assert betas[500] == pytest.approx(1 - f(0.501) / f(0.5), rel=1e-12)
    assert betas[-1] == 0.999  # capped at max_beta
    d = create_diffusion("ddim50", noise_schedule="squaredcos_cap_v2")
    assert d.num_timesteps == 50 and np.all((d.betas > 0) & (d.betas <= 1))


# ---------------------------------------------------------------------------------------------
# A tiny deterministic model: a fixed linear map of (x, original t) with 2C output channels.


class LinearModel:
    def __init__(self, learn_sigma=True):
        self.learn_sigma = learn_sigma
        self.calls = []

    def __call__(self, x, t, **kwargs):
        self.calls.append((t.clone(), kwargs))
        tt = t.to(x.dtype).view(-1, 1, 1, 1)
        eps = 0.4 * x + tt / 2000
        return torch.cat([eps, 0.3 * x + tt / 1500 - 0.5], 1) if self.learn_sigma else eps


def _np_model(x, orig_t):
    return 0.4 * x + orig_t / 2000, 0.3 * x + orig_t / 1500 - 0.5


def _ref_step(kind, x, j, timestep_map, z, clip, eta=0.0):
    """One reverse step from the textbook formulas (learned-range variance), float64."""
    abar, abar_prev, beta = _reference_process(timestep_map)
    a, ap, b = abar[j], abar_prev[j], beta[j]
    eps, v = _np_model(x, timestep_map[j])
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip:
        x0 = np.clip(x0, -1, 1)
    if kind == "ddpm":
        mean = np.sqrt(ap) * b / (1 - a) * x0 + np.sqrt(1 - b) * (1 - ap) / (1 - a) * x
        k = max(j, 1)  # the clipped posterior log-variance borrows step 1 at step 0
        min_log = np.log(beta[k] * (1 - abar_prev[k]) / (1 - abar[k]))
        frac = (v + 1) / 2
        log_var = frac * np.log(b) + (1 - frac) * min_log
        return mean + (j > 0) * np.exp(0.5 * log_var) * z, x0
    eps_hat = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    sigma = eta * np.sqrt((1 - ap) / (1 - a)) * np.sqrt(1 - a / ap)
    return np.sqrt(ap) * x0 + np.sqrt(1 - ap - sigma ** 2) * eps_hat + (j > 0) * sigma * z, x0


SHAPE = (2, 3, 4, 4)


def _draws(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(n)]


@pytest.mark.parametrize("clip", [False, True])
def test_p_sample_and_ddim_sample_match_the_formulas(clip):
    d = create_diffusion("10")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64) * 1.5
    z = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for j in (0, 1, 5, 9):
        t = torch.full((2,), j)
        for kind, fn, kw in [("ddpm", d.p_sample, {}), ("ddim", d.ddim_sample, {"eta": 0.0}),
                             ("ddim", d.ddim_sample, {"eta": 0.7})]:
            out = fn(LinearModel(), x, t, clip_denoised=clip, noise=z, **kw)
            want, want_x0 = _ref_step(kind, x.numpy(), j, d.timestep_map, z.numpy(), clip, **kw)
            assert out["sample"].dtype == torch.float64
            # Not closer than ~1e-5: the coefficients are float32 (G.8) and DDIM forms
            # sqrt(1 - abar_prev) from them in float32, which loses digits when abar_prev ~ 1.
            np.testing.assert_allclose(out["sample"].numpy(), want, rtol=2e-6, atol=2e-5)
            np.testing.assert_allclose(out["pred_xstart"].numpy(), want_x0, rtol=2e-6, atol=2e-6)
            # float32 inputs give the same step to float32 precision
            out32 = fn(LinearModel(), x.float(), t, clip_denoised=clip, noise=z.float(), **kw)
            np.testing.assert_allclose(out32["sample"].numpy(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip", [False, True])
def test_sampling_loops_match_the_formulas(clip):
    d = create_diffusion("ddim10")
    draws = _draws(10, seed=1)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for kind, loop, kw in [("ddpm", d.p_sample_loop, {}), ("ddim", d.ddim_sample_loop, {"eta": 0.5})]:
        got = loop(LinearModel(), SHAPE, noise=x_T, clip_denoised=clip,
                   noise_fn=lambda step, x: draws[step], **kw)
        x = x_T.numpy()
        for step, j in enumerate(range(9, -1, -1)):
            x, _ = _ref_step(kind, x, j, d.timestep_map, draws[step].numpy(), clip, **kw)
        np.testing.assert_allclose(got.numpy(), x, rtol=1e-5, atol=1e-5)


def test_coefficients_are_rounded_to_float32_even_for_float64_inputs():
    # Quirk G.8: the official _extract_into_tensor casts the float64 tables to float32.
    d = create_diffusion("")
    x0 = torch.linspace(-1, 1, 2 * 8, dtype=torch.float64).reshape(2, 8)
    noise = torch.linspace(2, -2, 2 * 8, dtype=torch.float64).reshape(2, 8)
    t = torch.tensor([3, 777])
    got = d.q_sample(x0, t, noise)
    a = d.sqrt_alphas_cumprod[[3, 777]].astype(np.float32).astype(np.float64)[:, None]
    s = d.sqrt_one_minus_alphas_cumprod[[3, 777]].astype(np.float32).astype(np.float64)[:, None]
    assert got.dtype == torch.float64
    assert np.array_equal(got.numpy(), a * x0.numpy() + s * noise.numpy())
    exact = d.sqrt_alphas_cumprod[[3, 777]][:, None] * x0.numpy() + \
        d.sqrt_one_minus_alphas_cumprod[[3, 777]][:, None] * noise.numpy()
    assert not np.array_equal(got.numpy(), exact)
    np.testing.assert_allclose(got.numpy(), exact, rtol=1e-6)


def test_fixed_variances_and_start_x_prediction():
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 5])
    large = create_diffusion("", learn_sigma=False)
    assert large.model_var_type == ModelVarType.FIXED_LARGE
    out = large.p_mean_variance(LinearModel(learn_sigma=False), x, t)
    assert out["variance"].shape == SHAPE
    assert out["variance"][0].unique().tolist() == [np.float32(large.posterior_variance[1])]
    assert out["variance"][1].unique().tolist() == [np.float32(large.betas[5])]
    small = create_diffusion("", learn_sigma=False, sigma_small=True)
    out = small.p_mean_variance(LinearModel(learn_sigma=False), x, t)
    assert out["log_variance"][0].unique().tolist() == [np.float32(small.posterior_log_variance_clipped[1])]
    assert out["variance"][1].unique().tolist() == [np.float32(small.posterior_variance[5])]
    # START_X: the model output is x_0 itself (clamped only when asked)
    sx = create_diffusion("", predict_xstart=True)
    assert sx.model_mean_type == ModelMeanType.START_X
    out = sx.p_mean_variance(LinearModel(), x, t, clip_denoised=False)
    assert torch.equal(out["pred_xstart"], 0.4 * x + torch.tensor([0.0, 5 / 2000]).view(-1, 1, 1, 1))
    out = sx.p_mean_variance(LinearModel(), x, t, clip_denoised=True,
                             denoised_fn=lambda x0: x0 * 10)  # denoised_fn runs before the clamp
    assert out["pred_xstart"].abs().max() == 1


# ---------------------------------------------------------------------------------------------
# The model call and the random draws


def test_model_gets_original_timesteps_and_kwargs():
    d = create_diffusion("ddim25")
    model = LinearModel()
    d.ddim_sample_loop(model, SHAPE, noise=torch.zeros(SHAPE),
                       model_kwargs={"y": torch.tensor([1, 1000]), "cfg_scale": 4.0})
    assert [t.tolist() for t, _ in model.calls] == [[s, s] for s in range(960, -1, -40)]
    assert all(t.dtype == torch.int64 for t, _ in model.calls)
    assert all(kw["cfg_scale"] == 4.0 and kw["y"].tolist() == [1, 1000] for _, kw in model.calls)
    # an int32 t stays int32 on the way to the model, still mapped to the original indices
    model = LinearModel()
    d.p_sample(model, torch.zeros(SHAPE), torch.tensor([24, 3], dtype=torch.int32), noise=torch.zeros(SHAPE))
    (t, _), = model.calls
    assert t.dtype == torch.int32 and t.tolist() == [960, 120]


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_noise_fn_controls_every_draw(loop):
    d = create_diffusion("ddim8")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    draws, other = _draws(8, 5, torch.float32), _draws(8, 6, torch.float32)
    seen = []

    def noise_fn(step, x):
        seen.append((step, x.clone()))
        return draws[step]

    progressive = getattr(d, loop + "_progressive")(LinearModel(), SHAPE, noise=x_T, noise_fn=noise_fn,
                                                    **({"eta": 1.0} if loop.startswith("ddim") else {}))
    outs = list(progressive)
    assert [s for s, _ in seen] == list(range(8))  # one draw per step, the last step included
    assert torch.equal(seen[0][1], x_T)
    for k in range(1, 8):  # the draw's x is the step's input, the previous step's sample
        assert torch.equal(seen[k][1], outs[k - 1]["sample"])

    run = lambda ds, **kw: getattr(d, loop)(LinearModel(), SHAPE, noise=x_T,
                                            noise_fn=lambda s, x: ds[s], **kw)
    if loop == "p_sample_loop":
        assert torch.equal(run(draws), outs[-1]["sample"])
        assert torch.equal(run(draws), run(draws))
        assert not torch.allclose(run(draws), run(other))
    else:
        assert torch.equal(run(draws, eta=1.0), outs[-1]["sample"])
        assert not torch.allclose(run(draws, eta=1.0), run(other, eta=1.0))
        # eta = 0 still draws once per step (as officially) but the draws cannot change the result
        seen.clear()
        assert torch.equal(d.ddim_sample_loop(LinearModel(), SHAPE, noise=x_T, noise_fn=noise_fn),
                           run(other, eta=0.0))
        assert [s for s, _ in seen] == list(range(8))


def test_default_draws_follow_the_official_order():
    # Official order: x_T = randn(shape), then one randn_like(x) per step after the model call.
    d = create_diffusion("ddim6")
    for loop, kw in [(d.p_sample_loop, {}), (d.ddim_sample_loop, {"eta": 1.0})]:
        torch.manual_seed(7)
        default = loop(LinearModel(), SHAPE, **kw)
        torch.manual_seed(7)
        replay = loop(LinearModel(), SHAPE, noise_fn=lambda s, x: torch.randn_like(x), **kw)
        assert torch.equal(default, replay)


def test_samples_do_not_depend_on_batch_size():
    d = create_diffusion("ddim8")
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    draws = _draws(8, 9, torch.float32)
    both = d.p_sample_loop(LinearModel(), SHAPE, noise=x_T, noise_fn=lambda s, x: draws[s])
    first = d.p_sample_loop(LinearModel(), (1, *SHAPE[1:]), noise=x_T[:1],
                            noise_fn=lambda s, x: draws[s][:1])
    assert torch.equal(both[:1], first)


def test_bad_draws_and_a_bound_module_forward():
    d = create_diffusion("ddim4")
    with pytest.raises(ValueError, match="shape"):
        d.p_sample_loop(LinearModel(), SHAPE, noise_fn=lambda s, x: torch.zeros(3))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t, y):
            return torch.cat([self.scale * x, torch.zeros_like(x)], 1)

    net = Net()
    out = d.p_sample_loop(net.forward, SHAPE, model_kwargs={"y": None},
                          noise_fn=lambda s, x: torch.zeros_like(x))
    assert out.shape == SHAPE and out.device.type == "cpu" and not out.requires_grad


# ---------------------------------------------------------------------------------------------
# Training loss (dit.md B.5, G.10)


def _phi(x):  # the tanh approximation of the normal CDF
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _ref_losses(d, x0, t, noise):
    """mse and vb (bits) per sample from the formulas, float64, learned-range variance."""
    abar, abar_prev, beta = _reference_process(d.timestep_map)
    mse, vb = [], []
    for i, j in enumerate(t):
        a, ap, b = abar[j], abar_prev[j], beta[j]
        xt = np.sqrt(a) * x0[i] + np.sqrt(1 - a) * noise[i]
        eps, v = _np_model(xt[None], d.timestep_map[j])
        eps, v = eps[0], v[0]
        mse.append(np.mean((noise[i] - eps) ** 2))
        c1, c2 = np.sqrt(ap) * b / (1 - a), np.sqrt(1 - b) * (1 - ap) / (1 - a)
        x0_hat = (xt - np.sqrt(1 - a) * eps) / np.sqrt(a)
        k = max(j, 1)
        min_log = np.log(beta[k] * (1 - abar_prev[k]) / (1 - abar[k]))
        log_var = (v + 1) / 2 * np.log(b) + (1 - v) / 2 * min_log
        mu_q, mu_p = c1 * x0[i] + c2 * xt, c1 * x0_hat + c2 * xt
        kl = 0.5 * (-1 + log_var - min_log + np.exp(min_log - log_var) + (mu_q - mu_p) ** 2 * np.exp(-log_var))
        sd = np.exp(0.5 * log_var)
        upper, lower = _phi((x0[i] - mu_p + 1 / 255) / sd), _phi((x0[i] - mu_p - 1 / 255) / sd)
        logp = np.where(x0[i] < -0.999, np.log(np.maximum(upper, 1e-12)),
                        np.where(x0[i] > 0.999, np.log(np.maximum(1 - lower, 1e-12)),
                                 np.log(np.maximum(upper - lower, 1e-12))))
        vb.append((-np.mean(logp) if j == 0 else np.mean(kl)) / np.log(2))
    return np.array(mse), np.array(vb), np.mean(kl) / np.log(2)


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand((n, *SHAPE[1:]), generator=g, dtype=torch.float64) * 2 - 1)
    x0[:, 0, 0, 0], x0[:, 0, 0, 1] = -1.0, 1.0  # the open edge bins of the decoder
    return x0, torch.randn(x0.shape, generator=g, dtype=torch.float64)


def test_training_losses_are_mse_plus_vb_with_the_decoder_nll_at_t0():
    d = create_diffusion("")
    x0, noise = _batch(10)
    t = torch.tensor([0, 1, 500, 999])
    terms = d.training_losses(LinearModel(), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"} and terms["loss"].shape == (4,)
    assert terms["loss"].dtype == torch.float64  # float64 inputs work end to end
    mse, vb, _ = _ref_losses(d, x0.numpy(), t.tolist(), noise.numpy())
    np.testing.assert_allclose(terms["mse"].numpy(), mse, rtol=1e-6)
    np.testing.assert_allclose(terms["vb"].numpy(), vb, rtol=1e-4)
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])
    # at t == 0 the term is the decoder NLL, not the KL (which would be a different number)
    _, _, kl_at_0 = _ref_losses(d, x0.numpy()[:1], [0], noise.numpy()[:1])
    assert abs(terms["vb"][0].item() - kl_at_0) > 0.1 * abs(kl_at_0)
    # float32 inputs: same numbers at float32 precision
    terms32 = d.training_losses(LinearModel(), x0.float(), t, noise=noise.float())
    np.testing.assert_allclose(terms32["loss"].numpy(), terms["loss"].numpy(), rtol=1e-3)


def test_vb_trains_only_the_variance_half():
    d = create_diffusion("")
    x0, noise = _batch(11)
    t = torch.tensor([0, 3, 400, 998])
    a, b = torch.nn.Parameter(torch.tensor(0.4, dtype=torch.float64)), \
        torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    model = lambda x, t: torch.cat([a * x, b * x], 1)
    terms = d.training_losses(model, x0, t, noise=noise)
    grad_a_loss, grad_b_loss = torch.autograd.grad(terms["loss"].sum(), [a, b], retain_graph=True)
    grad_a_mse, = torch.autograd.grad(terms["mse"].sum(), [a], retain_graph=True)
    grad_b_vb, = torch.autograd.grad(terms["vb"].sum(), [b])
    assert torch.equal(grad_a_loss, grad_a_mse) and grad_b_loss == grad_b_vb and grad_b_vb != 0


def test_mse_weight_multiplies_only_the_mse_term():
    d = create_diffusion("")
    x0, noise = _batch(12)
    t = torch.tensor([0, 10, 600, 999])
    plain = d.training_losses(LinearModel(), x0, t, noise=noise)
    w = torch.tensor([0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    weighted = d.training_losses(LinearModel(), x0, t, noise=noise, mse_weight=w)
    assert torch.equal(weighted["mse"], plain["mse"]) and torch.equal(weighted["vb"], plain["vb"])
    assert torch.equal(weighted["loss"], w * plain["mse"] + plain["vb"])
    assert not torch.equal(weighted["loss"], plain["loss"])
    with pytest.raises(ValueError, match="mse_weight"):
        d.training_losses(LinearModel(), x0, t, noise=noise, mse_weight=torch.ones(4, 1))
    fixed = create_diffusion("", learn_sigma=False)
    out = fixed.training_losses(LinearModel(False), x0, t, noise=noise, mse_weight=w)
    assert set(out) == {"loss", "mse"} and torch.equal(out["loss"], w * out["mse"])


def test_loss_types():
    x0, noise = _batch(13)
    t = torch.tensor([0, 50, 150, 249])
    fixed = create_diffusion("250", learn_sigma=False).training_losses(
        LinearModel(False), x0, t, noise=noise)
    assert set(fixed) == {"loss", "mse"} and torch.equal(fixed["loss"], fixed["mse"])
    mse = create_diffusion("250")
    assert mse.loss_type == LossType.MSE
    rescaled = create_diffusion("250", rescale_learned_sigmas=True)
    assert rescaled.loss_type == LossType.RESCALED_MSE
    plain = mse.training_losses(LinearModel(), x0, t, noise=noise)
    scaled = rescaled.training_losses(LinearModel(), x0, t, noise=noise)
    torch.testing.assert_close(scaled["vb"], plain["vb"] * 0.25, rtol=1e-15, atol=0)  # 250 / 1000
    kl = create_diffusion("250", use_kl=True)
    assert kl.loss_type == LossType.RESCALED_KL
    out = kl.training_losses(LinearModel(), x0, t, noise=noise)
    assert set(out) == {"loss"}
    torch.testing.assert_close(out["loss"], plain["vb"] * 250, rtol=1e-12, atol=0)
    vb = mse._vb_terms_bpd(LinearModel(), x0, mse.q_sample(x0, t, noise), t, clip_denoised=False)
    torch.testing.assert_close(vb["output"], plain["vb"], rtol=1e-12, atol=0)


def test_density_functions():
    zero = torch.zeros(3, dtype=torch.float64)
    assert torch.equal(normal_kl(zero, zero, zero, zero), zero)
    # KL(N(0, 1) || N(1, e)) = 0.5 * (-1 + 1 + 1/e + 1/e)
    assert normal_kl(zero, 0.0, 1.0, 1.0)[0].item() == pytest.approx(math.exp(-1), rel=1e-12)
    # the bin probability is close to the exact normal one (tanh CDF approximation)
    from scipy.stats import norm
    x = torch.tensor([-1.0, -0.2, 0.0, 0.5, 1.0], dtype=torch.float64)
    means, log_scales = torch.full_like(x, 0.1), torch.full_like(x, math.log(0.05))
    got = discretized_gaussian_log_likelihood(x, means=means, log_scales=log_scales).exp().numpy()
    xs, mu, sd = x.numpy(), 0.1, 0.05
    exact = norm.cdf((xs - mu + 1 / 255) / sd) - norm.cdf((xs - mu - 1 / 255) / sd)
    exact[0] = norm.cdf((xs[0] - mu + 1 / 255) / sd)
    exact[-1] = 1 - norm.cdf((xs[-1] - mu - 1 / 255) / sd)
    np.testing.assert_allclose(got, np.maximum(exact, 1e-12), rtol=0.05, atol=1e-4)
    assert got[0] == pytest.approx(1e-12, rel=1e-6)  # log clamped at 1e-12 far in the tail


def test_gaussian_diffusion_without_respacing_uses_raw_betas():
    raw = get_named_beta_schedule("linear", 1000)
    d = GaussianDiffusion(betas=raw, model_mean_type=ModelMeanType.EPSILON,
                          model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.MSE)
    assert np.array_equal(d.betas, raw) and d.timestep_map.tolist() == list(range(1000))


def test_tables_kept_on_the_device_give_the_same_samples_without_a_copy_per_step(monkeypatch):
    """The fast path keeps the float64 tables resident instead of copying them at every use (official)."""
    def model(x, t, y=None):  # learned sigma: eps and the variance interpolation, both depending on x and t
        return torch.cat([torch.tanh(x) * (t.view(-1, 1, 1, 1) / 1000.0), torch.sin(x)], dim=1)

    copies = []
    real = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: copies.append(a.shape) or real(a))
    runs = {}
    for resident in (False, True):
        diffusion = create_diffusion("5")
        diffusion.tables_on_device = resident
        torch.manual_seed(0)
        copies.clear()
        for sampler in ("p_sample_loop", "ddim_sample_loop"):
            runs[resident, sampler] = getattr(diffusion, sampler)(model, (2, 3, 4, 4), noise=torch.randn(2, 3, 4, 4),
                                                                  clip_denoised=False)
        runs[resident, "copies"] = len(copies)
    for sampler in ("p_sample_loop", "ddim_sample_loop"):
        assert torch.equal(runs[True, sampler], runs[False, sampler])
    # ~8 table reads per step over 2 x 5 steps officially; once per table when resident
    assert runs[False, "copies"] >= 60 and runs[True, "copies"] <= 12
