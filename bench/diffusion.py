"""Gaussian diffusion (IDDPM / ADM) exactly as DiT configures it.

One module for the maths every method shares: beta schedules, timestep respacing, q(x_t | x_0), the
learned-range variance, the hybrid training loss (eps-MSE + variational bound) and the DDPM / DDIM
sampling loops. Numbers match facebookresearch/DiT's ``diffusion/`` package, quirks included (they are
named where they are reproduced; see shared/reference/dit.md B and G.7-G.11). On top of the official
behaviour it adds two hooks the benchmark needs:

* ``noise_fn(step, x)`` in the sampling loops, so every random draw can come from per-sample seeds;
* ``mse_weight`` in ``training_losses``, so SpeeDiT / EDT can weight the MSE term per sample.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Iterator

import numpy as np
import torch

from bench.errors import UserError


class DiffusionConfigError(UserError, ValueError):
    """An impossible schedule or respacing (a ValueError too, as the official code raises)."""


class ModelMeanType(enum.Enum):
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the added noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # DiT's copy treats it exactly like LEARNED_RANGE (quirk kept)
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t
    LEARNED_RANGE = enum.auto()  # log-interpolation between the two, driven by the model's second half


class LossType(enum.Enum):
    MSE = enum.auto()  # eps-MSE (+ vb when the variance is learned): what DiT trains with
    RESCALED_MSE = enum.auto()  # same, vb scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the bound times num_timesteps (an estimate of the full VLB)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# --------------------------------------------------------------------------------------------------
# Schedules and respacing


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous abar(s), s in [0, 1], capped at ``max_beta``."""
    steps = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
                     for i in range(steps)], dtype=np.float64)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The float64 betas of the "linear" (Ho et al., rescaled to any length) or cosine schedule."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine schedule, s = 0.008
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise DiffusionConfigError(
        f"unknown noise schedule {schedule_name!r}; use 'linear' or 'squaredcos_cap_v2'")


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """The original timesteps a respaced process keeps (dit.md B.4).

    ``section_counts`` is "ddimN" (the smallest integer stride from 0 giving exactly N steps), or
    comma-separated counts / a list of ints: the process is cut into that many near-equal parts and
    each part is strided with an accumulated float stride and Python's round-half-to-even, so "7"
    keeps 832 (from 832.5), not 833.
    """
    spec_text = repr(section_counts)
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            desired = _parse_count(spec[len("ddim"):], section_counts)
            # The official search tries strides 1 .. num_timesteps-1 only, so "ddim1" is impossible.
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise DiffusionConfigError(
                f"respacing {section_counts!r}: no integer stride gives exactly {desired} of "
                f"{num_timesteps} steps; choose another DDIM step count")
        section_counts = [_parse_count(part, section_counts) for part in spec.split(",")]
    if not section_counts:
        raise DiffusionConfigError("respacing needs at least one step count, e.g. '250' or 'ddim50'")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 0:
            raise DiffusionConfigError(f"respacing {spec_text}: step counts cannot be negative")
        if count > size:
            raise DiffusionConfigError(
                f"respacing {spec_text}: cannot take {count} steps from a section of {size} of the "
                f"{num_timesteps} steps; ask for fewer steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride  # accumulated, not i * stride: the float error is part of the spec
        start += size
    return set(kept)


def _parse_count(text: str, spec) -> int:
    try:
        return int(text)
    except ValueError:
        raise DiffusionConfigError(
            f"cannot read timestep respacing {spec!r}; use e.g. '250', 'ddim50' or '10,15,20'") from None


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=1000) -> "GaussianDiffusion":
    """DiT's factory: "" or None keeps every step (still respaced, so betas are recomputed)."""
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return GaussianDiffusion(
        betas=get_named_beta_schedule(noise_schedule, diffusion_steps),
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
    )


# --------------------------------------------------------------------------------------------------
# Densities (module functions, as in the official diffusion_utils)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats; scalars broadcast."""
    like = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(like)
                        for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of Phi(x) the official decoder likelihood uses (not erf)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log P(x) in nats for data on 256 bins of width 2/255 over [-1, 1], the edge bins open.

    DiT applies it to VAE latents too, which are not 8-bit data (dit.md B.5 quirk).
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
                         f"log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _extract(table: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] shaped (B, 1, ..., 1), cast to float32 like the official _extract_into_tensor.

    Quirk G.8: the float64 tables are rounded to float32 before they meet any tensor, so float64
    inputs are multiplied by float32-rounded coefficients; reproduced for bit-parity.
    """
    values = torch.from_numpy(table).to(t.device)[t].float()
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _draw_like(noise, x: torch.Tensor) -> torch.Tensor:
    """This step's N(0, I) draw: a given tensor, a callable of x, or (None) randn_like as officially."""
    if noise is None:
        return torch.randn_like(x)
    draw = noise(x) if callable(noise) else noise
    if not isinstance(draw, torch.Tensor) or draw.shape != x.shape:
        got = tuple(draw.shape) if isinstance(draw, torch.Tensor) else type(draw).__name__
        raise ValueError(f"noise for this step must be a tensor of shape {tuple(x.shape)}, got {got}")
    return draw


# --------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion over ``num_timesteps`` steps.

    With ``use_timesteps`` the process keeps only those original steps (betas recomputed from abar
    ratios, dit.md B.4) and the model is always called with the original integer timesteps
    ``timestep_map[t]``. ``create_diffusion`` always passes it, as DiT's SpacedDiffusion does.
    """

    def __init__(self, *, betas, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType, use_timesteps=None):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        base = np.asarray(betas, dtype=np.float64)
        self.original_num_steps = len(base)
        if use_timesteps is None:
            betas, self.timestep_map = base, np.arange(len(base), dtype=np.int64)
        else:
            kept = sorted(set(int(i) for i in use_timesteps))
            if len(kept) < 2 or kept[0] < 0 or kept[-1] >= len(base):
                raise DiffusionConfigError(
                    f"a diffusion needs at least 2 steps within 0..{len(base) - 1}, got {kept}; "
                    "ask for more sampling steps")
            abar = np.cumprod(1.0 - base)[kept]
            betas = 1.0 - abar / np.append(1.0, abar[:-1])
            self.timestep_map = np.array(kept, dtype=np.int64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise DiffusionConfigError("betas must be a 1-D array with values in (0, 1]; "
                                       "use more diffusion steps or another schedule")
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log borrows element 1 there (quirk G.9).
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self._log_betas = np.log(betas)
        # FIXED_LARGE starts at the posterior variance (a better decoder likelihood), quirk G.9.
        self._large_variance = np.append(self.posterior_variance[1], betas[1:])
        self._log_large_variance = np.log(self._large_variance)
        self._map_cache: dict = {}
        # The official code copies each float64 table to the device at every use (a synchronising
        # host-to-device copy, ~8 per step). Kept so by default: the paper protocol times the official path.
        # The fast path keeps the tables on the device instead; the values, and the images, are the same.
        self.tables_on_device = False
        self._table_cache: dict = {}
        self._one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod  # a table, so it can be cached too

    def _extract(self, table: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if not self.tables_on_device:
            return _extract(table, t, ndim)
        key = (id(table), t.device)
        cached = self._table_cache.get(key)
        if cached is None or cached[0] is not table:  # the table object itself is kept: ids are never reused
            cached = self._table_cache[key] = (table, torch.from_numpy(table).to(t.device))
        values = cached[1][t].float()
        return values.reshape(values.shape + (1,) * (ndim - values.ndim))

    # -- the model call ---------------------------------------------------------------------------

    def _run_model(self, model, x, t, model_kwargs):
        """Call ``model(x, timestep_map[t], **model_kwargs)``, keeping t's device and integer dtype."""
        if not self.tables_on_device:  # built at every call, as officially (a copy, and a sync, per step)
            return model(x, torch.as_tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t],
                         **(model_kwargs or {}))
        key = (t.device, t.dtype)
        if key not in self._map_cache:
            self._map_cache[key] = torch.as_tensor(self.timestep_map, device=t.device, dtype=t.dtype)
        return model(x, self._map_cache[key][t], **(model_kwargs or {}))

    # -- forward process --------------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        n = x_start.ndim
        mean = self._extract(self.sqrt_alphas_cumprod, t, n) * x_start
        variance = self._extract(self._one_minus_alphas_cumprod, t, n).expand(x_start.shape)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, n).expand(x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (noise ~ N(0, I) when not given)."""
        noise = _draw_like(noise, x_start)
        n = x_start.ndim
        return (self._extract(self.sqrt_alphas_cumprod, t, n) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, n) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ")
        n = x_t.ndim
        mean = (self._extract(self.posterior_mean_coef1, t, n) * x_start
                + self._extract(self.posterior_mean_coef2, t, n) * x_t)
        variance = self._extract(self.posterior_variance, t, n).expand(x_t.shape)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, n).expand(x_t.shape)
        return mean, variance, log_variance

    def _predict_xstart_from_eps(self, x_t, t, eps):
        n = x_t.ndim
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t
                - self._extract(self.sqrt_recipm1_alphas_cumprod, t, n) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        n = x_t.ndim
        return ((self._extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart)
                / self._extract(self.sqrt_recipm1_alphas_cumprod, t, n))

    # -- reverse process --------------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """p(x_{t-1} | x_t) from the model: dict of mean, variance, log_variance, pred_xstart, extra.

        A model returning a tuple ``(output, extra)`` has ``extra`` passed through, as officially.
        """
        output = self._run_model(model, x, t, model_kwargs)
        extra = None
        if isinstance(output, tuple):
            output, extra = output
        out = self._p_from_output(output, x, t, clip_denoised, denoised_fn)
        out["extra"] = extra
        return out

    def _p_from_output(self, output, x, t, clip_denoised, denoised_fn):
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        n = x.ndim
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if output.shape != (B, 2 * C, *x.shape[2:]):
                raise ValueError(f"a learned-sigma model must return {2 * C} channels "
                                 f"(shape {(B, 2 * C, *x.shape[2:])}), got {tuple(output.shape)}")
            output, var_values = torch.split(output, C, dim=1)
            # v in [-1, 1] spans [beta~_t, beta_t] in log space; v is not clamped (dit.md B.2).
            min_log = self._extract(self.posterior_log_variance_clipped, t, n)
            max_log = self._extract(self._log_betas, t, n)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                table, log_table = self._large_variance, self._log_large_variance
            else:
                table, log_table = self.posterior_variance, self.posterior_log_variance_clipped
            variance = self._extract(table, t, n).expand(x.shape)
            log_variance = self._extract(log_table, t, n).expand(x.shape)

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = output
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart}

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                 noise=None):
        """One ancestral DDPM step x_t -> x_{t-1}; no noise is added at t == 0.

        ``noise``: the step's N(0, I) draw (a tensor like x, or a callable ``x -> tensor`` evaluated
        after the model call); None draws ``torch.randn_like(x)`` at the official point.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        noise = _draw_like(noise, x)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                    eta=0.0, noise=None):
        """One DDIM step (eq. 12 of Song et al.); a draw is made even when eta == 0, as officially."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        # eps is re-derived from the (possibly clipped) x_0 prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        n = x.ndim
        alpha_bar = self._extract(self.alphas_cumprod, t, n)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, n)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        noise = _draw_like(noise, x)
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                     + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        nonzero = (t != 0).float().view(-1, *([1] * (n - 1)))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None,
                            model_kwargs=None, eta=0.0):
        """Deterministic DDIM inversion x_t -> x_{t+1} (eta must be 0)."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is the deterministic path only: eta must be 0")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised,
                                   denoised_fn=denoised_fn, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract(self.alphas_cumprod_next, t, x.ndim)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # -- loops ------------------------------------------------------------------------------------

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                      model_kwargs=None, device=None, progress=False, noise_fn=None):
        """The final sample of ``p_sample_loop_progressive``."""
        final = None
        for final in self.p_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, noise_fn=noise_fn):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                  denoised_fn=None, model_kwargs=None, device=None, progress=False,
                                  noise_fn=None) -> Iterator[dict]:
        """Ancestral sampling from t = num_timesteps - 1 down to 0, yielding each step's dict.

        ``noise`` is the starting x_T (else ``torch.randn(*shape)``). ``noise_fn(step, x)``, step 0 at
        the noisiest step, supplies each step's draw (one per step, the last step included);
        None draws ``torch.randn_like(x)`` exactly where the official loop does.
        """
        return self._loop(self.p_sample, model, shape, noise, device, progress, noise_fn,
                          clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                          model_kwargs=model_kwargs)

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, noise_fn=None):
        """The final sample of ``ddim_sample_loop_progressive``."""
        final = None
        for final in self.ddim_sample_loop_progressive(
                model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                model_kwargs=model_kwargs, device=device, progress=progress, eta=eta,
                noise_fn=noise_fn):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True,
                                     denoised_fn=None, model_kwargs=None, device=None,
                                     progress=False, eta=0.0, noise_fn=None) -> Iterator[dict]:
        """DDIM sampling, yielding each step's dict; draws as in ``p_sample_loop_progressive``."""
        return self._loop(self.ddim_sample, model, shape, noise, device, progress, noise_fn,
                          clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                          model_kwargs=model_kwargs, eta=eta)

    def _loop(self, step_fn, model, shape, noise, device, progress, noise_fn, **step_kwargs):
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _loop_device(model, noise, device)
        x = noise if noise is not None else torch.randn(*shape, device=device)
        indices = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from rich.progress import track  # a declared dependency, unlike the official tqdm
            indices = track(indices, description="sampling")
        for step, i in enumerate(indices):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            draw = None if noise_fn is None else (lambda like, step=step: noise_fn(step, like))
            with torch.no_grad():
                out = step_fn(model, x, t, noise=draw, **step_kwargs)
            yield out
            x = out["sample"]

    # -- training ---------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One variational-bound term in bits: KL(q || p) for t > 0, the decoder NLL at t == 0."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised,
                                   model_kwargs=model_kwargs)
        return {"output": self._vb_bits(out, x_start, x_t, t), "pred_xstart": out["pred_xstart"]}

    def _vb_bits(self, out, x_start, x_t, t):
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, mse_weight=None):
        """Per-sample training losses at timesteps t: dict with "loss" and, for MSE types, "mse"
        (and "vb" when the variance is learned).

        DiT's hybrid loss (dit.md B.5): loss = mse + vb, where vb is the variational bound in bits
        computed with the eps half detached, so it trains only the variance half.

        ``mse_weight`` (shape (N,), optional) multiplies the per-sample MSE before vb is added:
        loss = mse_weight * mse + vb, the way SpeeDiT and EDT's min-SNR weight only the MSE term.
        The returned "mse" (and "vb") stay unweighted, so logs compare across methods.
        """
        noise = _draw_like(noise, x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            if mse_weight is not None:
                raise ValueError("mse_weight needs an MSE loss type; this diffusion trains on the KL bound")
            terms["loss"] = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        output = self._run_model(model, x_t, t, model_kwargs)
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if output.shape != (B, 2 * C, *x_t.shape[2:]):
                raise ValueError(f"a learned-sigma model must return {2 * C} channels, "
                                 f"got shape {tuple(output.shape)}")
            output, var_values = torch.split(output, C, dim=1)
            frozen = torch.cat([output.detach(), var_values], dim=1)
            out = self._p_from_output(frozen, x_t, t, clip_denoised=False, denoised_fn=None)
            terms["vb"] = self._vb_bits(out, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                # The official "divide by 1000" that keeps vb from swamping the MSE term.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        target = x_start if self.model_mean_type == ModelMeanType.START_X else noise
        if output.shape != target.shape:
            raise ValueError(f"model output {tuple(output.shape)} does not match the target "
                             f"{tuple(target.shape)}")
        terms["mse"] = mean_flat((target - output) ** 2)
        weighted = terms["mse"]
        if mse_weight is not None:
            mse_weight = torch.as_tensor(mse_weight).to(weighted)
            if mse_weight.shape not in ((), weighted.shape):
                raise ValueError(f"mse_weight must be a scalar or have shape {tuple(weighted.shape)} "
                                 f"(one weight per sample), got {tuple(mse_weight.shape)}")
            weighted = mse_weight * weighted
        terms["loss"] = weighted + terms["vb"] if "vb" in terms else weighted
        return terms


def _loop_device(model, noise, device):
    """The sampling device: given, else the model's (also for a bound forward), else noise's, else CPU."""
    if device is not None:
        return torch.device(device)
    owner = getattr(model, "__self__", model)
    parameters = getattr(owner, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return noise.device if noise is not None else torch.device("cpu")
