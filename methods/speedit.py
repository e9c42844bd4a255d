"""SpeeDiT / SpeeD: asymmetric timestep sampling and change-aware loss weights for DiT training.

Wang et al., "A Closer Look at Time Steps is Worthy of Triple Speed-Up for Diffusion Model Training"
(arXiv 2405.17403). The paper splits the forward process by how fast ``sqrt(1 - abar_t)`` changes:
steps where it still changes ("meaningful" steps, t < tau) are drawn more often, and the steps where
it has converged are mirrored back into that region ("dual" sampling). The MSE term of DiT's hybrid
loss is weighted per sample by its own timestep; the variational-bound term is left alone.
Sampling and the model are plain DiT. Facts: shared/reference/speedit.md.

Two variants, chosen by name:

``"primary"`` (1zeryu/SpeeDiT at 439c555, the code of the published 3.3x plot; speedit.md §2-§4)
    g_t = gradient(sqrt(1 - abar))_t (central differences, one-sided at the ends),
    tau = meaningful_steps = first t with g_t < 1e-4, plus one (642 for DiT's 1000-step linear schedule),
    p_t proportional to tanh(1e6 (g_t - 1e-4)) + 1.5 (a soft step: 2.5 before ~641, 0.5 after),
    w_t = P2 weight 1 / (1 + SNR_t) with k = gamma = 1, i.e. 1 - abar_t.

``"nus"`` (NUS-HPC-AI-Lab/SpeeD ``Speed_IDDPM``, the paper's code link, Oct 2024; speedit.md §9)
    p_t = k for t < tau, 1 otherwise, L1-normalised in float32 as the official code does
    (the dual map still uses meaningful_steps = 642, not tau). ``weighting``:
    "ours"    w_t = kappa + (1 - 2 kappa) minmax(gradient(1 - abar))_t for t < tau, 1 for t >= tau,
              kappa = 1 - lam (bell-shaped, peak at t = 219; the jump to 1 past tau is the official
              behaviour, kept although it looks unintended);
    "p2"      1 / (1 + SNR_t), as the primary variant;
    "theory"  the "ours" min-max form with kappa = 0.2 on every t;
    "min_snr" meant as min(SNR_t, 5) / (SNR_t + 1), but the official ``.min(axis=1)[0]`` picks the
              first row, giving min(SNR_0, 5) / (SNR_t + 1) = 5 (1 - abar_t); reproduced as written;
    "none"    no weight (the official "lognorm" placeholder and unknown names mean this).
    ``sampling``: "ours" (dual batches, as the primary), "no_dual" (n draws from p), "uniform".
    Defaults k=2, lam=0.6, tau=700 are the values every published NUS config uses (the class's own
    defaults k=1, lam=5 would give negative weights).

Batches (both variants, speedit.md §3): ``n // 2 + 1`` draws from p with replacement, then the duals
of the first draws, ``dual(t) = tau - t if t < tau else t - tau``, the concatenation cut to n. The last
two base draws of an even batch are unpaired and n <= 2 has no dual; reproduced, not "fixed".
The official code draws from torch's global CPU generator; pass ``generator`` to draw reproducibly.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import UserError
from bench.plugins import Method

VARIANTS = ("primary", "nus")
NUS_WEIGHTINGS = ("ours", "p2", "theory", "min_snr", "none")
NUS_SAMPLINGS = ("ours", "no_dual", "uniform")
# The threshold on gradient(sqrt(1 - abar)) that defines the meaningful steps and centres the tanh
# step of p (primary code; its first version used 5e-5 for tau, fixed to 1e-4 the same day).
GRADIENT_THRESHOLD = 1e-4
# Speed_IDDPM's "min_snr" clamp and "theory" kappa: constants in the official code.
MIN_SNR_GAMMA = 5
THEORY_KAPPA = 0.2


class SpeeDiT:
    """SpeeDiT's timestep distribution ``p``, loss ``weights`` and batch sampler on one diffusion.

    Build it on the *training* diffusion (1000 steps, no respacing); on a respaced process the same
    rules give other numbers (meaningful_steps = 189 at 250 steps), as the official code would.
    """

    def __init__(self, diffusion, variant: str = "primary", *, k: float | None = None,
                 lam: float | None = None, tau: int | None = None, weighting: str | None = None,
                 sampling: str | None = None):
        if variant not in VARIANTS:
            raise UserError(f"unknown SpeeDiT variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.num_timesteps = int(diffusion.num_timesteps)
        alphas_cumprod = np.asarray(diffusion.alphas_cumprod, dtype=np.float64)
        sqrt_one_minus = np.sqrt(1.0 - alphas_cumprod)
        # Both official variants define the meaningful steps (and so the dual map) this way.
        self.meaningful_steps = int(np.argmax(np.gradient(sqrt_one_minus) < GRADIENT_THRESHOLD)) + 1
        snr = 1.0 / (1 - alphas_cumprod) - 1
        p2 = 1 / (1 + snr)  # P2 weight with k = gamma = 1; rounding as the official 1 / (k + snr) ** gamma

        if variant == "primary":
            given = {"k": k, "lam": lam, "tau": tau, "weighting": weighting, "sampling": sampling}
            extra = [name for name, value in given.items() if value is not None]
            if extra:
                raise UserError(f"{', '.join(extra)} only apply to SpeeDiT variant 'nus'; "
                                "drop them or pass variant='nus'")
            self.k = self.lam = None
            self.tau = self.meaningful_steps
            self.weighting, self.sampling = "p2", "ours"
            # torch.gradient and torch.tanh, as the official code, so p matches it to the last bit.
            gradient = torch.gradient(torch.from_numpy(sqrt_one_minus))[0]
            self.p = F.normalize(torch.tanh(1e6 * (gradient - GRADIENT_THRESHOLD)) + 1.5, p=1, dim=0)
            self._draw_p = self.p
            self.weights = p2
            return

        self.k = 2 if k is None else k
        self.lam = 0.6 if lam is None else lam
        self.tau = 700 if tau is None else int(tau)
        self.weighting = "ours" if weighting is None else weighting
        self.sampling = "ours" if sampling is None else sampling
        if self.weighting not in NUS_WEIGHTINGS:
            raise UserError(f"unknown SpeeD weighting {self.weighting!r}; choose one of {', '.join(NUS_WEIGHTINGS)}")
        if self.sampling not in NUS_SAMPLINGS:
            raise UserError(f"unknown SpeeD sampling {self.sampling!r}; choose one of {', '.join(NUS_SAMPLINGS)}")
        if not 0 <= self.tau <= self.num_timesteps:
            raise UserError(f"tau = {self.tau} must lie in 0..{self.num_timesteps} (the diffusion's steps)")
        if self.k <= 0:
            raise UserError(f"k = {self.k} must be positive: it is the probability ratio before tau")
        # float32, as the official torch.tensor(..., dtype=float32); stored exactly in float64.
        steps = torch.tensor([self.k] * self.tau + [1] * (self.num_timesteps - self.tau), dtype=torch.float32)
        self._draw_p = F.normalize(steps, p=1, dim=0)  # drawn in float32, so seeded draws match
        self.p = self._draw_p.double()
        change = np.gradient(1 - alphas_cumprod)  # of 1 - abar, not its square root (official)
        if self.weighting == "ours":
            bell = _minmax_weights(change, 1 - self.lam)
            self.weights = np.concatenate([bell[: self.tau], np.ones(self.num_timesteps - self.tau)])
        elif self.weighting == "theory":
            self.weights = _minmax_weights(change, THEORY_KAPPA)
        elif self.weighting == "min_snr":
            snr_sqrt_form = (np.sqrt(alphas_cumprod) / sqrt_one_minus) ** 2
            self.weights = min(snr_sqrt_form[0], MIN_SNR_GAMMA) / (snr_sqrt_form + 1)
        elif self.weighting == "p2":
            self.weights = p2
        else:
            self.weights = None

    def dual_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The dual of each step: mirrored inside [1, tau] below tau, shifted to the start above it."""
        tau = self.meaningful_steps
        return torch.where(t < tau, tau - t, t - tau)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None):
        """A batch of n training timesteps (int64, CPU) and their per-sample MSE weights.

        Weights are ``weights[t]`` cast to float32, exactly what the official loss multiplies the
        squared error with; None when the weighting is "none".
        """
        if n < 1:
            raise ValueError(f"a batch needs at least one sample, got n = {n}")
        if self.sampling == "uniform":
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator)
        elif self.sampling == "no_dual":
            t = torch.multinomial(self._draw_p, n, replacement=True, generator=generator)
        else:
            base = torch.multinomial(self._draw_p, n // 2 + 1, replacement=True, generator=generator)
            t = torch.cat([base, self.dual_timesteps(base)])[:n]
        return t, self.per_sample_weights(t)

    def per_sample_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        if self.weights is None:
            return None
        return torch.from_numpy(self.weights).to(t.device)[t].float()

    def marginal(self, n: int) -> np.ndarray:
        """Exact distribution of one timestep of an n-sample batch (speedit.md §3, P_n).

        ``((n//2 + 1) p + (n - n//2 - 1) q) / n`` where q is p pushed through the dual map.
        """
        p = self.p.numpy()
        if self.sampling == "uniform":
            return np.full(self.num_timesteps, 1.0 / self.num_timesteps)
        if self.sampling == "no_dual":
            return p.copy()
        q = np.zeros_like(p)
        np.add.at(q, self.dual_timesteps(torch.arange(self.num_timesteps)).numpy(), p)
        base = min(n // 2 + 1, n)
        return (base * p + (n - base) * q) / n


class SpeeDiTTrainHook:
    """What the training loop asks of SpeeDiT: each batch's timesteps and MSE weights.

    The loop passes the weights on as ``training_losses(..., mse_weight=w)``, which multiplies the
    per-sample MSE only (the vb term stays unweighted, speedit.md §4).
    """

    def __init__(self, diffusion, variant: str = "primary", **options):
        self.speedit = SpeeDiT(diffusion, variant, **options)

    def sample_timesteps(self, n: int, device=None, generator: torch.Generator | None = None):
        # p lives on the CPU and the draws use a CPU generator, as officially; moved afterwards.
        t, weights = self.speedit.sample_timesteps(n, generator=generator)
        return t.to(device), (None if weights is None else weights.to(device))


# `dit-bench reproduce speedit`: plain data read by bench/reproduce.py. The paper's claim is a convergence
# ratio (~3x fewer iterations to the same FID); the tiny preset trains the proxy DiT-T6/4 with and without
# the primary SpeeDiT hook for the same steps and reads the ratio off the proxy-FID curves. No paper preset:
# its protocol (400k-step DiT-XL/2 runs on ImageNet) is not something this harness should start unasked.
RECIPES = {
    "tiny": {
        "kind": "training", "model": "DiT-T6/4", "image_size": 16, "num_classes": 10, "vae": "identity",
        "reference": "proxy:digits-heldout", "evaluator": "proxy",
        "hooks": ["speedit"],
        "train": {"global_batch_size": 64, "steps": 1200, "lr": 1e-3, "ema_decay": 0.995, "ckpt_every": 200,
                  "seed": 0},
        "sampling": {"sampler": "ddim", "steps": "ddim25", "cfg_scale": 1.0, "num_samples": 200,
                     "labels": "balanced", "precision": "fp32", "batch_size": 100},
    },
}


METHOD = Method(
    name="speedit",
    title="SpeeDiT: asymmetric timestep sampling and change-aware loss weighting",
    paper="https://arxiv.org/abs/2405.17403",
    train_hooks={
        "speedit": SpeeDiTTrainHook,
        "speedit-nus": functools.partial(SpeeDiTTrainHook, variant="nus"),
    },
    recipes=RECIPES,
)


def _minmax_weights(change: np.ndarray, kappa: float) -> np.ndarray:
    # Speed_IDDPM's form and operation order, so results match it to the last bit.
    return kappa + (1 - 2 * kappa) * (change - change.min()) / (change.max() - change.min())
