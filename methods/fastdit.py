"""fast-DiT: DiT's training made cheaper without changing what is learned (chuanyangjin/fast-DiT).

Four tricks, each a train hook (reference/dit.md §D.2, the README table in §D.3):

``grad-ckpt``   gradient checkpointing: every transformer block is recomputed in the backward pass instead
                of keeping its activations (fast-DiT wraps each block call in ``torch.utils.checkpoint``;
                same weights, same numbers). Needs a model with a ``gradient_checkpointing`` switch.
``amp-bf16``    mixed precision: the forward under autocast; bf16 needs no loss scaling.
``amp-fp16``    fp16 autocast with dynamic loss scaling (what ``accelerate launch --mixed_precision fp16``
                gives fast-DiT: torch's GradScaler with its default settings). The EMA stays fp32.
``tf32``        TF32 matmuls and convolutions on (official train.py sets both flags at import);
``no-tf32``     both off (fast-DiT's train_tf32_disabled.py, and the DiT README's timing setting).
``features``    train on VAE latents extracted once by ``dit-bench extract-features`` (fast-DiT's
                extract_features.py): no VAE in the training loop.

fast-DiT's own quirks are not reproduced: its Accelerate script never seeds torch, logs the local loss
divided by the process count without an all-reduce (2-GPU logs show half the loss), and its multi-GPU
extraction lets every rank write the same file names. Pre-extraction freezes the flip and the posterior
sample of every image for all epochs; ``extract-features --mode both-flips`` keeps the flip random.
"""
from __future__ import annotations

import functools

import torch

from bench.plugins import Method, PluginError


class GradientCheckpointing:
    """Recompute each block in the backward pass: activation memory for compute."""

    def __init__(self, diffusion=None):
        pass

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not hasattr(model, "gradient_checkpointing"):
            raise PluginError(f"grad-ckpt needs a model with a gradient_checkpointing switch; "
                              f"{type(model).__name__} has none")
        model.gradient_checkpointing = True
        return model


class MixedPrecision:
    """The forward under autocast in bf16 or fp16; fp16 gradients go through a dynamic loss scaler."""

    def __init__(self, diffusion=None, precision: str = "bf16"):
        if precision not in ("bf16", "fp16"):
            raise PluginError(f"mixed precision is bf16 or fp16, not {precision!r}")
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float16

    def autocast(self, device: torch.device):
        return torch.autocast(device_type=torch.device(device).type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device):
        # fp16's narrow exponent underflows small gradients; bf16 has fp32's range and needs no scaling.
        return torch.amp.GradScaler(torch.device(device).type) if self.precision == "fp16" else None


class TF32:
    """TF32 for CUDA matmuls and cuDNN convolutions, on or off."""

    settings = ("tf32",)
    # Not listed among a result's hooks: it shows as the run's precision ("tf32" vs "fp32"), as
    # reference_results state it.
    record_name = None

    def __init__(self, diffusion=None, enabled: bool = True):
        self.enabled = bool(enabled)

    def configure_backends(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.enabled
        torch.backends.cudnn.allow_tf32 = self.enabled


class PreExtractedFeatures:
    """Read latents written by ``dit-bench extract-features`` instead of encoding images every step."""

    data_mode = "features"
    def __init__(self, diffusion=None):
        pass



# `dit-bench reproduce fastdit`: plain data read by bench/reproduce.py ("training-speed": bench.speed's
# training rows, every configuration timed in one run; ratios against the first, "ckpt", as in the README
# table, whose speed-ups are against train_baseline.py = grad-ckpt + TF32).
_FAST_DIT_CONFIGS = ["ckpt", "amp", "features", "all", "plain", "grad-ckpt+amp-bf16"]
RECIPES = {
    # The README table's protocol: DiT-XL/2 at 256 px, global batch 128, VAE in the loop where fast-DiT has it.
    "paper": {
        "kind": "training-speed", "models": ["DiT-XL/2"], "image_size": 256, "num_classes": 1000, "vae": "ema",
        "global_batch_size": 128, "train_configs": _FAST_DIT_CONFIGS, "reference_gpu": "A100",
        "assets": ["sd-vae-ft-ema"],
        "expects_gpu": "fast-DiT's table is DiT-XL/2 at global batch 128 on one A100; on a CPU each step takes "
                       "minutes (hours for the whole run)",
    },
    # The proxy DiT-T6/4 (declared by dit's tiny recipe) on 16 px images in pixel space.
    "tiny": {
        "kind": "training-speed", "proxy": True, "models": ["DiT-T6/4"], "image_size": 16, "num_classes": 10,
        "vae": "identity", "global_batch_size": 64, "train_configs": _FAST_DIT_CONFIGS, "warmup": 2, "repeats": 5,
        "notes": [
            "The VAE is the identity here, so 'features' (pre-extracted latents) removes no work: no gain is "
            "expected, unlike fast-DiT's table where it removes the VAE encoder from every step.",
            "amp is fast-DiT's fp16 autocast with loss scaling; on a CPU fp16 matmuls are emulated, so it is "
            "expected to be slower, not faster; 'grad-ckpt+amp-bf16' shows bf16 beside it.",
            "Gradient checkpointing trades compute for activation memory: 'plain' (no checkpointing) is expected "
            "to be faster than the 'ckpt' baseline (a speed-up above 1).",
            "bench.compare marks every published train speed-up 'not comparable' here (CPU vs 1-2 A100s, batch 64 "
            "vs 128): a CPU ratio does not test a GPU claim. The published ratios stand beside the measured ones "
            "for reading; the paper preset on an A100 is what gets verdicts.",
        ],
    },
}

METHOD = Method(
    name="fastdit",
    title="fast-DiT: gradient checkpointing, mixed precision, TF32 and VAE-feature pre-extraction",
    paper="https://github.com/chuanyangjin/fast-DiT",
    train_hooks={
        "grad-ckpt": GradientCheckpointing,
        "amp-bf16": functools.partial(MixedPrecision, precision="bf16"),
        "amp-fp16": functools.partial(MixedPrecision, precision="fp16"),
        "tf32": TF32,
        "no-tf32": functools.partial(TF32, enabled=False),
        "features": PreExtractedFeatures,
    },
    recipes=RECIPES,
)
