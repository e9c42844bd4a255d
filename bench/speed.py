"""`dit-bench speed`: how fast models sample and train, method beside baseline, under one stated protocol.

What is measured, for every model x precision x batch (GitHub issue 5):
* sampling: the denoising loop (transformer + the sampler's arithmetic, VAE excluded: FasterDiffusion's
  definition, reference/fasterdiffusion.md §8), the VAE decode on its own, and end to end (noise, loop,
  decode, uint8 on the host); latency at fixed batches and throughput at a saturating batch found by
  doubling (an out-of-memory batch steps down, and the row says so);
* every sample hook beside the baseline (the same model, no hook) in the same run: the hook's row carries
  ``speedup`` over the baseline and the FLOP-bound ideal, the latter from the hook's optional
  ``ideal_speedup()`` or, when it offers none, from counting the MACs of one sampling loop (torch's FLOP
  counter; on the meta device when the model is too large to run on the CPU);
* training: steps/s and peak memory of one optimiser step (forward, loss, backward, AdamW, EMA; bench/training.py)
  at a global batch, in each of fast-DiT's configurations (dit.md §D.2) or any list of train hooks.

Two protocols; a record holds one, so paper and fast numbers never share a row:
* ``paper``: the official code path (``p_sample_loop(model.forward_with_cfg, ...)``), fp32 with TF32 on CUDA,
  torch's default attention (what timm's Attention calls), no compilation, FasterDiffusion's batch of 8 labels
  timed once after 2 warm-ups. Papers are compared with these numbers.
* ``fast``: the best this harness does on the device: bf16 autocast (fp32 off CUDA), fused SDPA (flash /
  cuDNN / efficient, never the math kernel), ``torch.compile`` of the repeated blocks (regional compilation,
  so sample hooks that run a slice of the blocks are compiled too), CUDA graphs with compile mode
  ``reduce-overhead``, large batches.

Weights are random: speed does not depend on them. The harness never names a method: hooks come from the
plug-in registry and describe themselves (``ideal_speedup()``, ``protocol_card()``, ``reset()``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from bench import plugins
from bench.errors import UserError
from bench.timing import PROTOCOLS, TimingProtocol, TimingStats, is_out_of_memory

PROTOCOL_NAMES = ("paper", "fast")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
SAMPLERS = ("ddpm", "ddim")
# "default": whatever torch picks (the official code's timm Attention calls SDPA the same way);
# "fused": flash, cuDNN or memory-efficient kernels only; "explicit": two visible matmuls (old timm).
ATTENTION_CHOICES = ("default", "fused", "flash", "cudnn", "efficient", "math", "explicit")
CUDA_ONLY_ATTENTION = ("cudnn", "efficient")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# DiT's sample.py and FasterDiffusion's timing script sample these 8 labels (dit.md §C.1, fasterdiffusion.md §8)
# from torch.manual_seed(3407); the timing script's guidance scale is 4.0.
OFFICIAL_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
OFFICIAL_SEED = 3407
PAPER_CFG_SCALE = 4.0
FAST_CFG_SCALE = 1.5  # DiT's FID setting; the time does not depend on the scale, only on guidance being on
PAPER_BATCH = 8

FAST_TIMING = TimingProtocol(
    name="dit-bench-fast", warmup=2, repeats=5, images_per_call=1, statistic="median", excludes=("vae_decode",),
    source="bench/speed.py", notes="the denoising loop on a batch, synchronised on both ends; images_per_call is "
                                   "the batch size; VAE decode and end to end are timed separately")

# fast-DiT's train_options/ scripts as train-hook lists (dit.md §D.2). TF32 is on in all but the last;
# "all" is the top-level train.py, the README table's fastest row (§D.3).
TRAIN_CONFIGS = {
    "plain": ("tf32",),  # train_original.py: the official train.py, no tricks (out of memory at 128 on an A100)
    "ckpt": ("grad-ckpt", "tf32"),  # train_baseline.py
    "amp": ("grad-ckpt", "amp-fp16", "tf32"),  # train_amp.py: Accelerate --mixed_precision fp16
    "features": ("grad-ckpt", "features", "tf32"),  # train_features.py: pre-extracted VAE latents
    "all": ("grad-ckpt", "amp-fp16", "features", "tf32"),  # train.py
    "no-tf32": ("grad-ckpt", "no-tf32"),  # train_tf32_disabled.py
    # Not fast-DiT's: dit-bench's fast protocol for training. bf16 autocast on pre-extracted latents, no
    # checkpointing; measure_train_config adds the run's torch.compile of the blocks and attention kernels.
    "fast": ("amp-bf16", "features", "tf32"),
}
FAST_TRAIN_CONFIG = "fast"
FAST_DIT_GLOBAL_BATCH = 128  # the README table's batch (dit.md §D.3)


class SpeedError(UserError):
    """A speed request that cannot be measured as asked."""


# ------------------------------------------------------------------------------------------ the request
@dataclass
class SpeedConfig:
    """What ``dit-bench speed`` measures. ``None`` fields take the protocol's and the device's defaults."""

    models: tuple[str, ...] = ("DiT-XL/2",)
    hooks: tuple[str, ...] = ()
    hook_options: dict = field(default_factory=dict)
    protocol: str = "fast"
    precisions: tuple[str, ...] | None = None
    batches: tuple[int | str, ...] | None = None
    steps: int = 250
    sampler: str = "ddpm"
    cfg_scale: float | None = None
    image_size: int = 256
    num_classes: int = 1000
    vae: str = "none"
    vae_batch: int = 32
    attention: str | None = None
    compile: bool | None = None
    # Inductor's default: max-autotune benchmarks GEMM configurations again for every batch shape the saturating
    # search visits (about 11), minutes each; ask for it with --compile-mode when the time is there.
    compile_mode: str = "default"
    warmup: int | None = None
    repeats: int | None = None
    max_batch: int | None = None
    search_steps: int = 10
    reference_gpu: str | None = None
    sample: bool = True
    train: bool = False
    train_configs: tuple[str, ...] | None = None
    global_batch_size: int = FAST_DIT_GLOBAL_BATCH
    official_code: str | None = None  # a checkout of the official repository, timed beside (bench/official.py)
    warnings: list[str] = field(default_factory=list)

    def card(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("warnings")
        return out


def parse_batches(values) -> tuple[int | str, ...]:
    """``["1", "8", "auto"]`` -> ``(1, 8, "auto")``."""
    out: list[int | str] = []
    for value in values:
        text = str(value).strip().lower()
        if text == "auto":
            out.append("auto")
            continue
        try:
            batch = int(text)
        except ValueError:
            batch = 0
        if batch < 1:
            raise SpeedError(f"--batch {value!r}: use a positive integer or 'auto'")
        out.append(batch)
    return tuple(dict.fromkeys(out))


def resolve(config: SpeedConfig, device: torch.device) -> SpeedConfig:
    """The protocol's defaults filled in, and every combination the protocol forbids refused."""
    c = dataclasses.replace(config, warnings=list(config.warnings))
    if c.protocol not in PROTOCOL_NAMES:
        raise SpeedError(f"--protocol {c.protocol!r}: use one of {', '.join(PROTOCOL_NAMES)}")
    if not c.models:
        raise SpeedError("name at least one --model (see `dit-bench models`)")
    for name in c.models:  # unknown names and incompatible hooks fail here, before anything is built
        family = plugins.get_model(name).family
        for hook in c.hooks:
            plugins.get_hook("sample_hooks", hook, family)
    if c.sampler not in SAMPLERS:
        raise SpeedError(f"--sampler {c.sampler!r}: use one of {', '.join(SAMPLERS)}")
    if c.steps < 2:  # a respaced diffusion keeps at least its first and last step
        raise SpeedError(f"--steps must be at least 2, got {c.steps}")
    paper = c.protocol == "paper"
    cuda = device.type == "cuda"
    # Off CUDA, fp32 is the fast precision: most CPUs emulate bf16 matmuls at a fraction of the fp32 rate.
    c.precisions = tuple(dict.fromkeys(c.precisions or (("bf16" if not paper else "tf32") if cuda else "fp32",)))
    for p in c.precisions:
        if p not in PRECISIONS:
            raise SpeedError(f"--precision {p!r}: use one of {', '.join(PRECISIONS)}")
    c.batches = parse_batches(c.batches) if c.batches else ((PAPER_BATCH,) if paper else (1, 8, "auto"))
    if c.cfg_scale is None:
        c.cfg_scale = PAPER_CFG_SCALE if paper else FAST_CFG_SCALE
    if c.cfg_scale < 1.0:
        raise SpeedError(f"--cfg-scale {c.cfg_scale} < 1 (DiT's convention: 1 = no guidance)")
    if c.attention is None:
        c.attention = "fused" if (cuda and not paper) else "default"
    if c.attention not in ATTENTION_CHOICES:
        raise SpeedError(f"--attention {c.attention!r}: use one of {', '.join(ATTENTION_CHOICES)}")
    if c.attention in CUDA_ONLY_ATTENTION and not cuda:
        raise SpeedError(f"--attention {c.attention} is a CUDA kernel; on {device.type} use default, fused (flash "
                         "there), flash, math or explicit")
    if c.compile is None:
        c.compile = cuda and not paper  # compiling on a CPU takes longer than most CPU runs
    if c.compile_mode not in COMPILE_MODES:
        raise SpeedError(f"--compile-mode {c.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
    timing = PROTOCOLS["fasterdiffusion"] if paper else FAST_TIMING
    c.warmup = timing.warmup if c.warmup is None else c.warmup
    c.repeats = timing.repeats if c.repeats is None else c.repeats
    if c.warmup < 0 or c.repeats < 1:
        raise SpeedError(f"need --warmup >= 0 and --repeats >= 1, got {c.warmup} and {c.repeats}")
    c.max_batch = c.max_batch or (1024 if cuda else 64)
    if c.search_steps < 1 or c.vae_batch < 1 or c.global_batch_size < 1:
        raise SpeedError("--search-steps, --vae-batch and --global-batch-size must be at least 1")

    if paper:
        # The paper protocol is the official code path; anything faster belongs to --protocol fast.
        bad = [p for p in c.precisions if p not in ("fp32", "tf32")]
        if bad:
            raise SpeedError(f"the paper protocol runs fp32 with TF32 (DiT's and FasterDiffusion's scripts), not "
                             f"{bad[0]}; use --protocol fast for {bad[0]}")
        if c.compile:
            raise SpeedError("the paper protocol times the official, uncompiled code; drop --compile or use "
                             "--protocol fast")
        if c.attention not in ("default", "explicit"):
            raise SpeedError(f"the paper protocol uses the official attention (torch's default SDPA as timm calls "
                             f"it, or 'explicit'), not {c.attention!r}; use --protocol fast to pick SDPA kernels")
        if any(b != PAPER_BATCH for b in c.batches):
            c.warnings.append(f"the papers time a batch of {PAPER_BATCH} labels; other batches under the paper "
                              "protocol are not comparable with their numbers")
    if c.compile and not cuda:
        if c.compile_mode == "reduce-overhead":
            raise SpeedError("compile mode 'reduce-overhead' records CUDA graphs and needs a CUDA device; use "
                             "--compile-mode default on this device")
        c.warnings.append(f"torch.compile on {device.type} builds C++ kernels: minutes of warm-up, and not the "
                          "GPU path the fast protocol is about")
    if c.compile and c.compile_mode in CUDA_GRAPH_MODES and c.hooks:
        raise SpeedError(f"compile mode {c.compile_mode!r} records CUDA graphs of the whole forward, which sample "
                         "hooks replace; time hooks with --compile-mode default or max-autotune-no-cudagraphs")
    if "tf32" in c.precisions and not cuda:
        c.warnings.append(f"TF32 exists on CUDA only: on {device.type} 'tf32' runs plain fp32 matmuls")
    if c.official_code is not None:
        from bench.official import OfficialCodeError

        if not Path(c.official_code).expanduser().is_dir():
            raise OfficialCodeError(f"--official-code {c.official_code}: no such folder")
        if not c.sample:
            raise SpeedError("--official-code times the official sampler; it needs --sample")
    if c.train and c.train_configs:  # None: every fast-DiT configuration the data allows (run_training)
        c.train_configs = tuple(dict.fromkeys(c.train_configs))
        for name in c.train_configs:
            train_hook_names(name)
    return c


def train_hook_names(config_name: str) -> tuple[str, ...]:
    """A fast-DiT configuration's train hooks, or ``hook+hook+...`` for any other combination."""
    if config_name in TRAIN_CONFIGS:
        return TRAIN_CONFIGS[config_name]
    names = tuple(n.strip() for n in config_name.split("+") if n.strip())
    if "+" not in config_name and config_name not in _train_hook_registry():
        raise SpeedError(f"--train-config {config_name!r}: use one of {', '.join(TRAIN_CONFIGS)} or train hooks "
                         "joined by '+', e.g. grad-ckpt+amp-bf16+features")
    return names


def _train_hook_registry() -> set[str]:
    return {name for method in plugins.methods().values() for name in method.train_hooks}


# ------------------------------------------------------------------------------------------ device settings
@contextlib.contextmanager
def backend_flags():
    """Restore TF32 and cuDNN settings afterwards: precisions switch them per row."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def set_precision(precision: str) -> None:
    """TF32 on for 'tf32' (and under autocast, for the few fp32 matmuls left there); off for true fp32."""
    tf32 = precision in ("tf32", "bf16", "fp16")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def matmul_precision(precision: str, device: torch.device) -> str:
    """What the matmuls run at, the denominator MFU needs: 'tf32' is plain fp32 off CUDA."""
    return "fp32" if precision == "tf32" and device.type != "cuda" else precision


def autocast(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def attention_context(choice: str):
    """SDPA kernel selection for the enclosed calls (``torch.nn.attention.sdpa_kernel``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from bench.layers import explicit_attention

    if choice == "default":
        return contextlib.nullcontext()
    if choice == "explicit":
        return explicit_attention()
    backends = {
        # torch picks among these by its own priority; without MATH a shape no fused kernel takes is an error,
        # not a silent slow path.
        "fused": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH],
    }[choice]
    return sdpa_kernel(backends)


# Compile modes that record CUDA graphs. A graph's outputs live until its next replay, so one graph per block
# would overwrite block i's output while block i+1 reads it (pytorch#152887): these compile the whole forward.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_model(model: nn.Module, mode: str) -> str:
    """``torch.compile`` the model in place for ``mode``; returns what was compiled, for the run's notes.

    Without CUDA graphs each block of the model's block lists is compiled (regional compilation): the blocks
    share one code object, so they share one compiled graph per input shape, and a sample hook that runs a
    slice of the blocks (``run_blocks(tokens, c, start, stop)``) runs compiled code too. With CUDA graphs
    the top-level ``forward`` is the region, one graph per step (resolve() keeps hooks out of that mode).
    """
    import torch._dynamo

    config = torch._dynamo.config
    # One graph per batch shape and autocast dtype: the saturating-batch search alone visits about 11, EDT's
    # stages multiply that. Running out of graphs must fail the row, not silently fall back to eager code.
    for name, floor in (("recompile_limit", 512), ("cache_size_limit", 512), ("accumulated_recompile_limit", 8192),
                        ("accumulated_cache_size_limit", 8192)):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), floor))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            setattr(config, name, True)
    if mode in CUDA_GRAPH_MODES:
        model.forward = torch.compile(model.forward, mode=mode, dynamic=False)  # forward_with_cfg calls it
        return "the whole forward (CUDA graphs)"
    lists = [child for child in model.children() if isinstance(child, nn.ModuleList)]
    blocks = [block for blocks in lists for block in blocks]
    if not blocks:  # no repeated blocks: the whole forward is the region
        blocks = [model]
    for block in blocks:
        block.compile(mode=mode, dynamic=False)
    return f"{len(blocks)} repeated blocks"


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ the sampling loop
def sample_loop(denoiser, diffusion, z: torch.Tensor, y: torch.Tensor, cfg_scale: float, sampler: str = "ddpm",
                max_steps: int | None = None) -> torch.Tensor:
    """The official sampling call on prepared inputs: ``p_sample_loop(model.forward_with_cfg, ...)``.

    ``z``, ``y`` already hold both guidance halves when ``cfg_scale > 1`` ([z; z], [labels; null]), as
    sample.py builds them. ``max_steps`` stops after that many steps (the batch-size search only needs the
    rate of a step, and the same shapes as the full loop).
    """
    if hasattr(denoiser, "reset"):
        denoiser.reset()  # a hook with per-run state starts at step 0
    if cfg_scale > 1.0:
        fn, kwargs = denoiser.forward_with_cfg, {"y": y, "cfg_scale": cfg_scale}
    else:
        fn, kwargs = denoiser.forward, {"y": y}
    shape = tuple(z.shape)
    own_loop = getattr(denoiser, "sample_loop", None)  # a hook that replaces the DDPM loop (bench/sampling.py)
    if own_loop is not None:
        if sampler != "ddpm" or max_steps is not None:
            raise SpeedError("a sample hook with its own loop times whole DDPM loops only: use --sampler ddpm "
                             "and fixed batches (the auto search times partial loops)")
        return own_loop(diffusion, shape, noise=z, model_kwargs=kwargs, clip_denoised=False, device=z.device)
    if max_steps is None:
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
        return loop(fn, shape, noise=z, clip_denoised=False, model_kwargs=kwargs, device=z.device, progress=False)
    loop = diffusion.p_sample_loop_progressive if sampler == "ddpm" else diffusion.ddim_sample_loop_progressive
    out = None
    for k, out in enumerate(loop(fn, shape, noise=z, clip_denoised=False, model_kwargs=kwargs, device=z.device)):
        if k + 1 >= max_steps:
            break
    return out["sample"]


def official_inputs(batch: int, latent_shape: tuple[int, int, int], num_classes: int, cfg_scale: float,
                    device: torch.device, seed: int = OFFICIAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """The timing script's inputs: noise from ``seed``, the 8 official labels (cycled), null labels for CFG."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, *latent_shape, generator=generator).to(device)
    labels = [OFFICIAL_LABELS[i % len(OFFICIAL_LABELS)] % num_classes for i in range(batch)]
    y = torch.tensor(labels, device=device)
    if cfg_scale > 1.0:
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.full_like(y, num_classes)], 0)
    return z, y


def time_official_sampler(model, diffusion, device: torch.device | str, *, latent_shape=(4, 32, 32),
                          num_classes: int = 1000, cfg_scale: float = PAPER_CFG_SCALE, batch: int = PAPER_BATCH,
                          warmup: int = 2, repeats: int = 1) -> dict:
    """FasterDiffusion's timing of the official DiT sampler (fasterdiffusion.md §8), in DiT's own calls.

    TF32 on, ``torch.manual_seed(3407)`` noise for the 8 labels, ``[z; z]`` with null labels, then the wall
    time of one ``diffusion.p_sample_loop(model.forward_with_cfg, ...)`` after ``warmup`` untimed runs,
    VAE excluded, divided by the batch. This is the paper protocol in one function, for a GPU session to put
    beside the official repository's script on the same GPU.
    """
    from bench.timing import measure, speed_metrics

    device = torch.device(device)
    z, y = official_inputs(batch, tuple(latent_shape), num_classes, cfg_scale, device)
    kwargs = {"y": y, "cfg_scale": cfg_scale} if cfg_scale > 1.0 else {"y": y}
    fn = model.forward_with_cfg if cfg_scale > 1.0 else model.forward
    with backend_flags(), torch.no_grad():
        set_precision("tf32")
        stats = measure(lambda: diffusion.p_sample_loop(fn, tuple(z.shape), noise=z, clip_denoised=False,
                                                        model_kwargs=kwargs, device=device, progress=False),
                        warmup=warmup, repeats=repeats, device=device)
    return {"stats": stats, "metrics": speed_metrics(stats, batch),
            "protocol": dataclasses.replace(PROTOCOLS["fasterdiffusion"], warmup=warmup, repeats=repeats,
                                            images_per_call=batch).to_dict()}


# ------------------------------------------------------------------------------------------ one model, built
@dataclass
class Denoiser:
    """The baseline (``hook`` None) or one sample hook around the model."""

    label: str  # "baseline" or the hook's name
    hook: str | None
    method: str  # the plug-in that contributes it (for the record's subject)
    module: Any
    ideal_speedup: float | None = None
    ideal_source: str | None = None
    card: dict = field(default_factory=dict)


@dataclass
class SamplingSetup:
    """A built model with its diffusion and decoder, and the settings of the rows being measured."""

    spec: plugins.ModelSpec
    model: nn.Module
    diffusion: Any
    decoder: Any  # None with --vae none
    latent_shape: tuple[int, int, int]
    model_overrides: dict
    config: SpeedConfig
    device: torch.device
    precision: str = "fp32"

    @property
    def rows_per_image(self) -> int:
        return 2 if self.config.cfg_scale > 1.0 else 1

    def inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return official_inputs(batch, self.latent_shape, self.config.num_classes, self.config.cfg_scale, self.device)

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """No autograd, the row's autocast and the chosen attention kernels, around every timed call."""
        with torch.no_grad(), autocast(self.precision, self.device), attention_context(self.config.attention):
            yield

    def loop(self, denoiser, z, y, max_steps: int | None = None) -> torch.Tensor:
        with self.running():
            return sample_loop(denoiser, self.diffusion, z, y, self.config.cfg_scale, self.config.sampler, max_steps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE on chunks of ``--vae-batch`` latents (a 256-image batch at once would not fit)."""
        with self.running():
            chunks = [self.decoder.decode(chunk) for chunk in latents.split(self.config.vae_batch)]
        return torch.cat(chunks)

    def end_to_end(self, denoiser, batch: int):
        """Noise and labels, the loop, the decode, uint8 images on the host: what a sampling script does."""
        from bench.sampling import to_uint8

        z, y = self.inputs(batch)
        latents = self.loop(denoiser, z, y)[:batch].float()
        return to_uint8(self.decode(latents))


def model_owner(model_name: str) -> str:
    return next((m.name for m in plugins.methods().values() if any(s.name == model_name for s in m.models)), "")


def hook_owner(hook_name: str) -> str:
    return next((m.name for m in plugins.methods().values() if hook_name in m.sample_hooks), hook_name)


def build_setup(model_name: str, config: SpeedConfig, device: torch.device) -> SamplingSetup:
    """Random-weight model and decoder; ``--vae none`` keeps the latent geometry of the SD VAE (8x, 4 channels)."""
    from bench.diffusion import create_diffusion
    from bench.loading import load_denoiser

    decoder = None
    downsample, channels = 8, 4
    if config.vae != "none":
        from bench.vae import load_vae

        decoder = load_vae(config.vae, device, allow_random=True)
        downsample, channels = decoder.downsample, decoder.latent_channels
    model, spec, _ = load_denoiser(model_name, None, config.image_size, config.num_classes, device,
                                   latent_downsample=downsample, random_weights=True, in_channels=channels)
    latent = config.image_size // downsample
    diffusion = create_diffusion(str(config.steps), learn_sigma=getattr(model, "learn_sigma", True))
    # The paper protocol keeps the official per-step table copies (each a device sync); fast keeps them resident.
    diffusion.tables_on_device = config.protocol == "fast"
    overrides = {"input_size": latent, "num_classes": config.num_classes, "in_channels": channels}
    return SamplingSetup(spec, model, diffusion, decoder, (channels, latent, latent), overrides, config, device)


def build_denoisers(setup: SamplingSetup) -> list[Denoiser]:
    """The baseline and every requested sample hook, each built the way bench/sampling.py builds hooks."""
    config = setup.config
    out = [Denoiser("baseline", None, model_owner(setup.spec.name), setup.model, card={"key_steps": "all"})]
    for name in config.hooks:
        module = _make_hook(name, setup.model, setup.spec, setup.diffusion.num_timesteps, config.hook_options)
        ideal, source = declared_ideal_speedup(module)
        card = module.protocol_card() if callable(getattr(module, "protocol_card", None)) else {"key_steps": None}
        out.append(Denoiser(name, name, hook_owner(name), module, ideal, source, dict(card)))
    return out


def _make_hook(name: str, model, spec, num_steps: int, hook_options: dict):
    # The sample-hook contract of bench/sampling.py: factory(model, num_steps=..., **options).
    factory = plugins.get_hook("sample_hooks", name, spec.family)
    return factory(model, num_steps=num_steps, **hook_options.get(name, {}))


def declared_ideal_speedup(hook) -> tuple[float | None, str | None]:
    """The hook's own FLOP-bound speed-up over the baseline, if it states one."""
    value = getattr(hook, "ideal_speedup", None)
    if callable(value):
        value = value()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value), "declared by the hook (ideal_speedup())"
    return None, None


# ------------------------------------------------------------------------------------------ compute
def forward_macs(setup: SamplingSetup) -> int:
    """MACs of one forward at batch 1: the model's analytic count, else counted on the meta device."""
    from bench.flops import count_macs_torch

    spec, kwargs = setup.spec, setup.spec.kwargs(**setup.model_overrides)
    if spec.macs is not None:
        return int(spec.macs(kwargs))
    with torch.device("meta"):
        model = spec.builder(**kwargs).eval()
    c, h, w = setup.latent_shape
    x = torch.zeros(1, c, h, w, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    return count_macs_torch(model, x, t, torch.zeros(1, dtype=torch.long, device="meta"))


# Below this many MACs per sampling loop, counting on the CPU with real numbers is quicker than on the meta
# device, whose shape functions are mostly Python (about 20x slower per op than a tiny CPU kernel).
CPU_COUNT_MAX_MACS = 5e10


def count_sampling_macs(spec: plugins.ModelSpec, model_overrides: dict, diffusion, hook: str | None,
                        hook_options: dict, cfg_scale: float, sampler: str = "ddpm", num_classes: int = 1000,
                        on: str | torch.device = "meta") -> int:
    """MACs of one full sampling loop for one image (both guidance rows), as torch's FLOP counter sees them.

    ``on="meta"``: tensors carry shapes only, so the cost is dispatch, not arithmetic (about a minute for
    DiT-XL/2 at 250 steps on a slow CPU); ``on="cpu"`` runs the arithmetic (right for small models).
    Attention runs as explicit matmuls so the counter sees it, as bench.flops.count_macs_torch does.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from bench.flops import FLOPS_PER_MAC
    from bench.layers import explicit_attention

    where = torch.device(on)
    with torch.random.fork_rng(devices=[]), torch.device(where):
        torch.manual_seed(0)
        model = spec.build(**model_overrides).eval()
    denoiser = model if hook is None else _make_hook(hook, model, spec, diffusion.num_timesteps, hook_options)
    kwargs = spec.kwargs(**model_overrides)
    channels, size = kwargs.get("in_channels", 4), kwargs["input_size"]
    z, y = official_inputs(1, (channels, size, size), num_classes, cfg_scale, where)
    with torch.random.fork_rng(devices=[]), torch.no_grad(), explicit_attention(), \
            FlopCounterMode(display=False) as counter:
        sample_loop(denoiser, diffusion, z, y, cfg_scale, sampler)
    return counter.get_total_flops() // FLOPS_PER_MAC


def attach_ideal_speedups(setup: SamplingSetup, denoisers: list[Denoiser], say: Callable[[str], None]) -> None:
    """Hooks that state no ideal get one from counted MACs: baseline loop MACs / hook loop MACs."""
    missing = [d for d in denoisers if d.hook is not None and d.ideal_speedup is None]
    if not missing:
        return
    c = setup.config
    on = "cpu" if forward_macs(setup) * setup.rows_per_image * c.steps <= CPU_COUNT_MAX_MACS else "meta"
    if on == "meta":
        say(f"counting the sampling MACs of {', '.join(d.label for d in missing)} on the meta device (a minute or "
            "more for a large model): these hooks declare no ideal_speedup()")
    started = time.perf_counter()
    base = count_sampling_macs(setup.spec, setup.model_overrides, setup.diffusion, None, {}, c.cfg_scale,
                               c.sampler, c.num_classes, on=on)
    for d in missing:
        macs = count_sampling_macs(setup.spec, setup.model_overrides, setup.diffusion, d.hook, c.hook_options,
                                   c.cfg_scale, c.sampler, c.num_classes, on=on)
        d.ideal_speedup, d.ideal_source = base / macs, f"counted MACs of one sampling loop (torch FLOP counter, {on})"
    say(f"counted the sampling MACs of {', '.join(d.label for d in missing)} on {on} "
        f"({time.perf_counter() - started:.1f} s): these hooks declare no ideal_speedup()")


# ------------------------------------------------------------------------------------------ measuring a row
@dataclass
class SampleRow:
    """One model x method x precision x batch, as measured."""

    model: str
    denoiser: Denoiser
    precision: str
    batch_size: int | None
    batch_policy: str  # "fixed" or "auto"
    outcome: str = "ok"  # or "out of memory"
    message: str = ""
    loop: TimingStats | None = None
    vae: TimingStats | None = None
    end_to_end: TimingStats | None = None
    memory: dict = field(default_factory=dict)
    power: dict = field(default_factory=dict)
    saturation: dict | None = None
    macs_per_image: float | None = None
    mfu: dict | None = None
    metrics: dict = field(default_factory=dict)


def _windows(device: torch.device):
    from bench.telemetry import PeakMemory, PowerSampler

    return PeakMemory(device), PowerSampler.for_device(device)


def measure_fixed(setup: SamplingSetup, denoiser: Denoiser, batch: int, policy: str = "fixed") -> SampleRow:
    """Loop, VAE decode and end to end at one batch size; an out-of-memory batch becomes a row that says so."""
    from bench.timing import measure

    c, device = setup.config, setup.device
    row = SampleRow(setup.spec.name, denoiser, setup.precision, batch, policy)
    try:
        z, y = setup.inputs(batch)
        peak, power = _windows(device)
        row.loop = measure(lambda: setup.loop(denoiser.module, z, y), warmup=c.warmup, repeats=c.repeats,
                           device=device, during=(peak, power))
        row.memory, row.power = peak.to_dict(), power.result(images=batch * c.repeats)
        if setup.decoder is not None:
            c_, h, w = setup.latent_shape
            latents = torch.randn(batch, c_, h, w, generator=torch.Generator().manual_seed(0)).to(device)
            row.vae = measure(lambda: setup.decode(latents), warmup=c.warmup, repeats=c.repeats, device=device)
            row.end_to_end = measure(lambda: setup.end_to_end(denoiser.module, batch), warmup=1, repeats=c.repeats,
                                     device=device)
    except Exception as exc:  # noqa: BLE001 - only allocator failures become a row; the rest propagate
        if not is_out_of_memory(exc):
            raise
        row.outcome, row.message = "out of memory", f"batch {batch} ran out of memory on {device}"
    if hasattr(denoiser.module, "reset"):
        denoiser.module.reset()  # drop per-run state (a feature cache) before the next row allocates
    if row.outcome != "ok":
        _release(device)
    return row


def measure_auto(setup: SamplingSetup, denoiser: Denoiser) -> SampleRow:
    """Throughput at the batch where doubling stops paying (bench.timing.find_saturating_batch), then the
    full measurement there. The search times ``--search-steps`` steps of the same loop per trial."""
    from bench.timing import TimingError, find_saturating_batch

    c, device = setup.config, setup.device
    steps = min(c.search_steps, c.steps)

    def run(batch: int):
        z, y = setup.inputs(batch)
        return setup.loop(denoiser.module, z, y, max_steps=steps)

    try:
        found = find_saturating_batch(run, start=1, max_batch=c.max_batch, warmup=1, repeats=min(3, c.repeats),
                                      device=device)
    except TimingError as exc:  # even batch 1 does not fit
        row = SampleRow(setup.spec.name, denoiser, setup.precision, None, "auto", "out of memory", str(exc))
        _release(device)
        return row
    row = measure_fixed(setup, denoiser, found.batch_size, policy="auto")
    row.saturation = {**found.to_dict(), "search_steps": steps}
    row.saturation["stats"].pop("samples_s", None)
    if found.stopped_by == "out_of_memory":
        row.message = found.message
    return row


# ------------------------------------------------------------------------------------------ the official code
OFFICIAL_LABEL = "official code"
OFFICIAL_PRECISION = "tf32"  # DiT's sample.py and sample_ddp.py turn TF32 on; timm's attention is torch's default
PAPER_TOLERANCE = 0.05  # issue 5: the paper protocol stays within 5% of the official code's time


def measure_official_code(setup: SamplingSetup,
                          say: Callable[[str], None]) -> tuple[list[SampleRow], SamplingSetup]:
    """The official sampler (``--official-code DIR``) on this setup's device, weights, inputs and batches.

    The official class gets dit-bench's random weights with ``strict=True`` and must give the same forward;
    it then runs its own diffusion code at its own settings (fp32 with TF32, default attention, no compile,
    no VAE), under the same timing statistics and batch rules as dit-bench's rows, before those rows run.
    Returns the rows and the setup they ran under (for their records).
    """
    from bench import official

    c = setup.config
    code = official.load(c.official_code, setup.spec)
    twin = official.build_twin(code, setup.spec, setup.model_overrides, setup.model)
    z, y = setup.inputs(2)
    difference = official.forward_difference(setup.model, twin, z, y)
    say(f"{setup.spec.name}: the official {code.paths['model']} from {code.folder} takes dit-bench's weights "
        f"(strict); one fp32 forward agrees to {difference:.1e} of its scale")
    if difference > official.FORWARD_TOLERANCE:
        c.warnings.append(f"{setup.spec.name}: dit-bench's forward differs from the official code's by "
                          f"{difference:.1e} of its scale (tolerance {official.FORWARD_TOLERANCE:.0e})")
        say(c.warnings[-1])
    card = {"code": "official", "official_code": {**code.card(), "forward_relative_difference": difference}}
    denoiser = Denoiser(OFFICIAL_LABEL, None, model_owner(setup.spec.name), twin, card=card)
    as_official = dataclasses.replace(
        setup, diffusion=code.create_diffusion(str(c.steps)), decoder=None, precision=OFFICIAL_PRECISION,
        config=dataclasses.replace(c, attention="default", compile=False, vae="none"))
    set_precision(OFFICIAL_PRECISION)
    rows = [measure_auto(as_official, denoiser) if batch == "auto" else measure_fixed(as_official, denoiser, batch)
            for batch in c.batches]
    denoiser.module = twin = None  # rows keep their settings, not the official model's memory
    _release(setup.device)
    return rows, as_official


def matching_official(row: SampleRow, official_rows: list[SampleRow]) -> SampleRow | None:
    """The official row a dit-bench row is compared with: the same fixed batch, or both saturating."""
    for off in official_rows:
        if off.outcome == "ok" and off.batch_policy == row.batch_policy and \
                (row.batch_policy == "auto" or off.batch_size == row.batch_size):
            return off
    return None


def check_paper_parity(row: SampleRow, official_row: SampleRow, config: SpeedConfig) -> None:
    """The paper protocol exists to time what the official code times: say so when it does not."""
    off_by = row.metrics["s_per_image"] / official_row.metrics["s_per_image"] - 1
    if config.protocol == "paper" and abs(off_by) > PAPER_TOLERANCE:
        message = (f"{row.model} batch {row.batch_size}: the paper protocol's time is {off_by:+.1%} off the "
                   f"official code's (tolerance ±{PAPER_TOLERANCE:.0%})")
        row.message = "; ".join(filter(None, (row.message, message)))


def finish_metrics(row: SampleRow, setup: SamplingSetup, base_macs: float, forward: int, gpu_name: str | None,
                   baseline: SampleRow | None) -> dict:
    """The row's record metrics (bench/results.py names; extra names carry their unit)."""
    from bench import flops

    c = setup.config
    m: dict[str, float | None] = {"gmacs": flops.macs_to_gmacs(forward), "gflops": flops.macs_to_gflops(forward)}
    row.metrics = m
    if row.outcome != "ok":
        return m
    batch = row.batch_size
    m.update(latency_s=row.loop.median_s, s_per_image=row.loop.median_s / batch,
             images_per_s=batch / row.loop.median_s, steps_per_s=c.steps / row.loop.median_s)
    if row.vae is not None:
        m.update(vae_decode_s_per_image=row.vae.median_s / batch,
                 end_to_end_s_per_image=row.end_to_end.median_s / batch,
                 end_to_end_images_per_s=batch / row.end_to_end.median_s)
    m.update(peak_memory_mb=row.memory.get("peak_memory_mb"), reserved_memory_mb=row.memory.get("reserved_memory_mb"),
             joules_per_image=row.power.get("joules_per_image"))
    ideal = row.denoiser.ideal_speedup
    row.macs_per_image = base_macs if row.denoiser.hook is None else (base_macs / ideal if ideal else None)
    if row.macs_per_image is not None:
        util = flops.mfu(flops.flops_per_s(row.macs_per_image, m["s_per_image"]), gpu_name,
                         matmul_precision(row.precision, setup.device))
        m["mfu"] = util.value
        row.mfu = util.to_dict()
    if row.denoiser.hook is not None:
        m["ideal_speedup"] = ideal
        if baseline is not None and baseline.outcome == "ok":
            # Same batch: time ratio. Auto batches may differ between the two: throughput ratio.
            m["speedup"] = m["images_per_s"] / (baseline.batch_size / baseline.loop.median_s)
    row.metrics = m
    return m


# ------------------------------------------------------------------------------------------ records
def _timing_card(config: SpeedConfig, batch: int | None) -> dict:
    base = PROTOCOLS["fasterdiffusion"] if config.protocol == "paper" else FAST_TIMING
    return dataclasses.replace(base, warmup=config.warmup, repeats=config.repeats,
                               images_per_call=batch or 0).to_dict()


def sample_protocol(row: SampleRow, setup: SamplingSetup, gpu_name: str | None) -> dict:
    c, device = setup.config, setup.device
    card = {
        "name": c.protocol, "sampler": c.sampler, "steps": c.steps, "cfg_scale": c.cfg_scale,
        "batch_size": row.batch_size, "batch_policy": row.batch_policy, "precision": row.precision,
        "matmul_precision": matmul_precision(row.precision, device), "attention": c.attention,
        "compile": c.compile, "compile_mode": c.compile_mode if c.compile else None, "vae": c.vae,
        "vae_batch": c.vae_batch if setup.decoder is not None else None, "image_size": c.image_size,
        "num_gpus": 1 if device.type == "cuda" else 0, "device_type": device.type, "gpu": gpu_name,
        "reference_gpu": c.reference_gpu, "framework": "pytorch", "random_weights": True,
        "labels": "official 8, cycled", "noise_seed": OFFICIAL_SEED,
        "sample_hooks": [row.denoiser.hook] if row.denoiser.hook else [],
        "hook_options": c.hook_options.get(row.denoiser.hook, {}) if row.denoiser.hook else {},
        "timed": "denoising loop (transformer + sampler arithmetic), VAE excluded; VAE decode and end to end "
                 "(noise, loop, decode, uint8 on the host) timed separately",
        "timing": _timing_card(c, row.batch_size),
    }
    card.update(row.denoiser.card)  # a hook's own protocol facts (key_steps, ...)
    return card


def _subject(row: SampleRow, image_size: int) -> dict:
    hooks = [row.denoiser.hook] if row.denoiser.hook else []
    return {"method": row.denoiser.method, "model": row.model, "resolution": image_size, "hooks": {"sample": hooks}}


def sample_record(row: SampleRow, baseline: SampleRow | None, setup: SamplingSetup, gpu_name: str | None,
                  environment: dict, warnings: list[str]) -> dict:
    from bench import results

    base = None
    if baseline is not None:
        base = {"subject": _subject(baseline, setup.config.image_size),
                "protocol": {"batch_size": baseline.batch_size, "key_steps": "all", "sample_hooks": [],
                             "hook_options": {}},
                "metrics": {k: v for k, v in baseline.metrics.items() if k not in ("speedup", "ideal_speedup")}}
    notes = list(warnings)
    if row.message:
        notes.append(row.message)
    if row.denoiser.hook and row.denoiser.card.get("key_steps", "") is None:
        notes.append(f"hook {row.denoiser.hook!r} states no protocol_card(): its key steps are unknown to the record")
    extra = {"timings": {k: (v.to_dict() if v is not None else None) for k, v in
                         (("loop", row.loop), ("vae_decode", row.vae), ("end_to_end", row.end_to_end))},
             "memory": row.memory, "power": row.power, "saturation": row.saturation, "outcome": row.outcome,
             "macs_per_image": row.macs_per_image, "ideal_speedup_source": row.denoiser.ideal_source,
             "mfu": row.mfu}
    return results.make_record("speed", _subject(row, setup.config.image_size), sample_protocol(row, setup, gpu_name),
                               row.metrics, baseline=base, warnings=notes, extra=extra, environment=environment)


# ------------------------------------------------------------------------------------------ sampling, all rows
def planned_image_steps(config: SpeedConfig, n_denoisers: int) -> int:
    """Image-steps the fixed-batch rows will run (an auto batch counted as 8; its search comes on top)."""
    images = sum(b for b in config.batches if b != "auto") + (8 if "auto" in config.batches else 0)
    return config.steps * images * (config.warmup + config.repeats) * n_denoisers * len(config.precisions)


def estimate_sampling_seconds(setup: SamplingSetup, n_denoisers: int) -> float:
    """One timed forward (an image with its guidance row) times the planned image-steps, counting every hook
    at the baseline's cost: the order of magnitude, before hours go into a CPU run."""
    z, y = setup.inputs(1)
    t = torch.zeros(len(z), dtype=torch.long, device=setup.device)
    with setup.running():
        setup.model(z, t, y)  # warm
        started = time.perf_counter()
        setup.model(z, t, y)
        if setup.device.type == "cuda":
            torch.cuda.synchronize(setup.device)
    return (time.perf_counter() - started) * planned_image_steps(setup.config, n_denoisers)


def run_sampling(config: SpeedConfig, device: torch.device, environment: dict, gpu_name: str | None,
                 say: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every sampling row of the request, as result records (hook rows carry their baseline)."""
    records = []
    for model_name in config.models:
        setup = build_setup(model_name, config, device)
        setup.precision = config.precisions[0]
        estimate = estimate_sampling_seconds(setup, 1 + len(config.hooks))
        if estimate > 120:
            say(f"{model_name} on {device}: this will take about {_duration(estimate)} or more "
                f"({config.steps} steps, batches {', '.join(map(str, config.batches))}, "
                f"{config.warmup} warm-up + {config.repeats} timed runs each)")
        forward = forward_macs(setup)
        base_macs = forward * setup.rows_per_image * config.steps
        official_rows: list[SampleRow] = []
        if config.official_code:
            official_rows, as_official = measure_official_code(setup, say)
            for row in official_rows:
                finish_metrics(row, as_official, base_macs, forward, gpu_name, None)
                if row.message:
                    say(f"{model_name} {OFFICIAL_LABEL}: {row.message}")
                records.append(sample_record(row, None, as_official, gpu_name, environment, config.warnings))
        if config.compile:
            region = compile_model(setup.model, config.compile_mode)
            say(f"{model_name}: torch.compile (mode {config.compile_mode}) on {region}; "
                "compilation happens in the warm-up runs")
        denoisers = build_denoisers(setup)
        own_loops = [d.label for d in denoisers if getattr(d.module, "sample_loop", None) is not None]
        if own_loops and ("auto" in config.batches or config.sampler != "ddpm"):
            raise SpeedError(f"sample hook {own_loops[0]!r} runs its own DDPM loop, which is timed whole: use "
                             "--sampler ddpm and fixed batches (the auto search times partial loops)")
        attach_ideal_speedups(setup, denoisers, say)
        for precision in config.precisions:
            set_precision(precision)
            setup.precision = precision
            for batch in config.batches:
                baseline = None
                for denoiser in denoisers:
                    row = measure_auto(setup, denoiser) if batch == "auto" else measure_fixed(setup, denoiser, batch)
                    if denoiser.hook is None:
                        baseline = row
                    finish_metrics(row, setup, base_macs, forward, gpu_name, baseline if denoiser.hook else None)
                    off = matching_official(row, official_rows) if denoiser.hook is None else None
                    if off is not None and row.outcome == "ok":
                        row.metrics["speedup_vs_official"] = row.metrics["images_per_s"] / off.metrics["images_per_s"]
                        check_paper_parity(row, off, config)
                    if row.message:
                        say(f"{model_name} {denoiser.label} {precision}: {row.message}")
                    records.append(sample_record(row, baseline if denoiser.hook else None, setup, gpu_name,
                                                 environment, config.warnings))
        del setup, denoisers
        _release(device)
    return records


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainRow:
    config_name: str
    hooks: tuple[str, ...]
    outcome: str = "ok"
    message: str = ""
    stats: TimingStats | None = None
    memory: dict = field(default_factory=dict)
    precision: str = "fp32"
    record_hooks: list[str] = field(default_factory=list)
    method: str = ""
    data: str = ""
    metrics: dict = field(default_factory=dict)
    compiled: bool = False
    attention: str = "default"


def train_compile_mode(mode: str) -> str:
    """CUDA graphs hold one step's buffers until the next replay, and backward needs them: no graphs here."""
    return "default" if mode in CUDA_GRAPH_MODES else mode


def measure_train_config(name: str, model_name: str, config: SpeedConfig, device: torch.device,
                         vae_cache: dict) -> TrainRow:
    """Steps/s and peak memory of bench/training.py's ``train_step`` on random data already on the device.

    Everything but data loading is in the step: the VAE encode for image configurations, the forward and
    DiT's hybrid loss under the hooks' autocast, backward (through the fp16 scaler where there is one), AdamW,
    and the EMA update.
    """
    from bench import training
    from bench.diffusion import create_diffusion
    from bench.distributed import World
    from bench.telemetry import PeakMemory
    from bench.timing import measure
    from bench.vae import VAE_ASSETS

    hook_names = train_hook_names(name)
    row = TrainRow(name, hook_names)
    if name == FAST_TRAIN_CONFIG:  # fast-DiT's own configurations run as their scripts do: eager, default SDPA
        row.compiled, row.attention = bool(config.compile), config.attention
    spec = plugins.get_model(model_name)
    diffusion = create_diffusion("", learn_sigma=spec.kwargs().get("learn_sigma", True))
    hooks = training.TrainHooks.compose(hook_names, spec.family, diffusion, {})
    features = hooks.data_mode == "features"
    if features:
        # Latents are extracted once, before training: no VAE in the step, only its latent geometry.
        encoder, downsample, channels = None, 8, 4  # the SD VAE's (--vae none, random, ema, mse)
        if config.vae not in ("none", "random", *VAE_ASSETS):
            folder_vae = _vae(config.vae, device, vae_cache)
            downsample, channels = folder_vae.downsample, folder_vae.latent_channels
    else:
        if config.vae == "none":
            raise SpeedError(f"train configuration {name!r} encodes images with the VAE every step; pass --vae "
                             "random|ema|mse|FOLDER, or time --train-config features")
        encoder = _vae(config.vae, device, vae_cache)
        downsample, channels = encoder.downsample, encoder.latent_channels
    if config.image_size % downsample:
        raise SpeedError(f"image size {config.image_size} is not divisible by the VAE's factor {downsample}")
    latent = config.image_size // downsample
    row.method = "+".join(training.owners(hook_names)) or model_owner(model_name)
    row.record_hooks = hooks.record_names()
    row.data = "random latents on the device" if features else "random images on the device, VAE-encoded each step"
    n = config.global_batch_size
    generator = torch.Generator().manual_seed(0)
    if features:
        x = torch.randn(n, channels, latent, latent, generator=generator)
    else:
        x = torch.rand(n, 3, config.image_size, config.image_size, generator=generator) * 2 - 1
    y = torch.randint(0, config.num_classes, (n,), generator=generator)
    # torch's own TF32 defaults unless a hook decides (fast-DiT's configurations all do).
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    hooks.configure_backends()
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    row.precision = hooks.precision or ("tf32" if tf32 else "fp32")
    run = None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = spec.build(input_size=latent, num_classes=config.num_classes, in_channels=channels)
        ema = training.make_ema(model).to(device)
        model = model.to(device).train()
        if row.compiled:
            compile_model(model, train_compile_mode(config.compile_mode))
        wrapped = hooks.wrap_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
        scaler = hooks.grad_scaler(device)
        train_config = training.TrainConfig(model=model_name, data="(random tensors)", out="",
                                            global_batch_size=n, hooks=hook_names)
        run = training.Run(config=train_config, device=device, world=World(), hooks=hooks, diffusion=diffusion,
                           dataset=None, encoder=encoder, plan=None, model=model, forward_model=wrapped, ema=ema,
                           opt=opt, scaler=scaler, family=spec.family)
        x, y = x.to(device), y.to(device)
        steps = itertools.count()
        peak = PeakMemory(device)
        def step():
            with attention_context(row.attention):
                training.train_step(run, next(steps), x, y)

        row.stats = measure(step, warmup=config.warmup, repeats=config.repeats, device=device, during=(peak,))
        row.memory = peak.to_dict()
    except Exception as exc:  # noqa: BLE001 - out of memory is a result (fast-DiT's first row is one)
        if not is_out_of_memory(exc):
            raise
        row.outcome = "out of memory"
        row.message = f"{name}: global batch {n} ran out of memory on {device}"
    finally:
        del run
        _release(device)
    return row


def _vae(spec: str, device: torch.device, cache: dict):
    from bench.vae import load_vae

    if spec not in cache:
        cache[spec] = load_vae(spec, device, allow_random=True)
    return cache[spec]


def train_record(row: TrainRow, baseline: TrainRow | None, model_name: str, config: SpeedConfig,
                 device: torch.device, gpu_name: str | None, environment: dict) -> dict:
    from bench import results

    subject = {"method": row.method, "model": model_name, "resolution": config.image_size,
               "hooks": {"train": row.record_hooks}}
    protocol = {
        "name": config.protocol, "global_batch_size": config.global_batch_size, "precision": row.precision,
        "num_gpus": 1 if device.type == "cuda" else 0, "device_type": device.type, "gpu": gpu_name,
        "reference_gpu": config.reference_gpu, "train_config": row.config_name, "train_hooks": list(row.hooks),
        "compile": row.compiled, "compile_mode": train_compile_mode(config.compile_mode) if row.compiled else None,
        "attention": row.attention,
        "vae": config.vae, "data": row.data, "random_weights": True,
        "timed": "one optimiser step: VAE encode (image configurations), forward + DiT's loss, backward, AdamW, "
                 "EMA; data loading excluded",
        "timing": {"warmup": config.warmup, "repeats": config.repeats, "statistic": "median"},
    }
    m: dict[str, float | None] = {"steps_per_s": None, "peak_memory_mb": None}
    if row.outcome == "ok":
        m.update(steps_per_s=1.0 / row.stats.median_s, latency_s=row.stats.median_s,
                 peak_memory_mb=row.memory.get("peak_memory_mb"),
                 reserved_memory_mb=row.memory.get("reserved_memory_mb"))
    base = None
    if baseline is not None and baseline is not row:
        base = {"subject": {"method": baseline.method, "hooks": {"train": baseline.record_hooks}},
                "protocol": {"precision": baseline.precision, "train_config": baseline.config_name,
                             "train_hooks": list(baseline.hooks)},
                "metrics": dict(baseline.metrics)}
        if row.outcome == "ok":
            m["speedup"] = baseline.stats.median_s / row.stats.median_s
    row.metrics = {k: v for k, v in m.items() if k != "speedup"}
    warnings = [row.message] if row.message else []
    if row.outcome == "ok" and row.memory.get("peak_memory_mb") is None:
        warnings.append(row.memory.get("reason", "no peak memory"))
    extra = {"outcome": row.outcome, "timing": row.stats.to_dict() if row.stats else None, "memory": row.memory}
    return results.make_record("train", subject, protocol, m, baseline=base, warnings=warnings, extra=extra,
                               environment=environment)


def run_training(config: SpeedConfig, device: torch.device, environment: dict, gpu_name: str | None,
                 say: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every model x train configuration; each row's baseline is the first configuration that ran."""
    records, vae_cache = [], {}
    explicit = config.train_configs is not None
    for model_name in config.models:
        baseline = None
        for name in config.train_configs or TRAIN_CONFIGS:
            _release(device)  # the previous configuration's model and optimiser are gone: free their cache
            try:
                row = measure_train_config(name, model_name, config, device, vae_cache)
            except SpeedError as exc:
                if explicit:
                    raise
                say(f"skipped train configuration {name!r}: {exc}")
                continue
            if row.message:
                say(row.message)
            if baseline is None and row.outcome == "ok":
                baseline = row
            records.append(train_record(row, baseline, model_name, config, device, gpu_name, environment))
    return records


# ------------------------------------------------------------------------------------------ the command
def run(config: SpeedConfig, device: torch.device | str | None = None,
        say: Callable[[str], None] = lambda s: None) -> dict:
    """Measure everything ``config`` asks for; returns the command's result record.

    The record's own subject, protocol and metrics are its headline row (the first hook row, else the first
    row); ``extra.rows`` holds every row as a complete record of the same schema.
    """
    from bench import results
    from bench.telemetry import device_facts

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = resolve(config, device)
    if not config.sample and not config.train:
        raise SpeedError("nothing to measure: --no-sample without --train")
    environment = results.capture_environment()
    facts = device_facts(device)
    gpu_name = (facts.get("gpu") or {}).get("name")
    if config.reference_gpu:
        if not (gpu_name and same_gpu(gpu_name, config.reference_gpu)):
            config.warnings.append(f"measured on {gpu_name or device.type}, published numbers are for "
                                   f"{config.reference_gpu}: absolute times are not compared, ratios are")
    for warning in config.warnings:
        say(warning)
    with backend_flags():
        rows = run_sampling(config, device, environment, gpu_name, say) if config.sample else []
        train_rows = run_training(config, device, environment, gpu_name, say) if config.train else []
    everything = rows + train_rows
    own = [r for r in everything if r["protocol"].get("code") != "official"] or everything
    headline = next((r for r in own if r["subject"]["hooks"].get("sample")), None) or own[0]
    record = results.make_record(
        "speed" if rows else "train", headline["subject"], headline["protocol"], headline["metrics"],
        baseline=headline["baseline"], warnings=config.warnings, environment=environment,
        extra={"headline": everything.index(headline), "rows": rows, "train_rows": train_rows,
               "request": config.card(), "device": facts})
    return record


def same_gpu(device_name: str, published: str) -> bool:
    """"A100" or "A100 80GB" (what papers print) names "NVIDIA A100-SXM4-80GB" (what the driver reports)."""
    have = set(device_name.lower().replace("-", " ").split())
    return all(token in have for token in published.lower().replace("-", " ").split())


def all_rows(record: dict) -> list[dict]:
    """Every row record of a speed command's record (a single-row record is its own row)."""
    extra = record.get("extra") or {}
    rows = list(extra.get("rows") or []) + list(extra.get("train_rows") or [])
    return rows or [record]


# ------------------------------------------------------------------------------------------ presentation
def _fmt(value, spec: str = ".4g", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def sampling_table(rows: list[dict]):
    """A rich table of sampling rows: one line per model x method x precision x batch."""
    from rich.table import Table

    # the run's own settings, not those of the official code's rows timed beside
    first = next((r for r in rows if r["protocol"].get("code") != "official"), rows[0])["protocol"]
    table = Table(title=f"Sampling speed, {first['name']} protocol ({first['sampler']}, {first['steps']} steps, "
                        f"cfg {first['cfg_scale']}, attention {first['attention']}"
                        f"{', compiled' if first['compile'] else ''})")
    columns = ["model", "method", "precision", "batch", "s/img", "img/s", "steps/s", "VAE s/img", "e2e s/img",
               "peak MB", "MFU", "speedup", "ideal"]
    official = any(r["protocol"].get("code") == "official" for r in rows)
    if official:
        columns.append("vs official")
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "method", "precision") else "right")
    for r in rows:
        m, p, x = r["metrics"], r["protocol"], r.get("extra") or {}
        batch = "-" if p["batch_size"] is None else str(p["batch_size"])
        if p["batch_policy"] == "auto":
            batch = f"auto→{batch}"
        method = ", ".join(r["subject"]["hooks"]["sample"]) or "baseline"
        if p.get("code") == "official":
            method = OFFICIAL_LABEL
        if x.get("outcome", "ok") != "ok":
            table.add_row(r["subject"]["model"], method, p["precision"], batch, x["outcome"],
                          *[""] * (len(columns) - 5))
            continue
        tail = [_fmt(m.get("speedup_vs_official"), ".3f", none="")] if official else []
        table.add_row(
            r["subject"]["model"], method, p["precision"], batch, _fmt(m.get("s_per_image")),
            _fmt(m.get("images_per_s")), _fmt(m.get("steps_per_s"), ".3g"), _fmt(m.get("vae_decode_s_per_image")),
            _fmt(m.get("end_to_end_s_per_image")), _fmt(m.get("peak_memory_mb"), ".0f"),
            _fmt(m.get("mfu"), ".1%"),
            _fmt(m.get("speedup"), ".3f", none="" if method in ("baseline", OFFICIAL_LABEL) else "-"),
            _fmt(m.get("ideal_speedup"), ".3f", none="" if method in ("baseline", OFFICIAL_LABEL) else "-"),
            *tail)
    return table


def training_table(rows: list[dict]):
    from rich.table import Table

    first = rows[0]["protocol"]
    table = Table(title=f"Training speed, global batch {first['global_batch_size']} (one optimiser step: "
                        "forward, loss, backward, AdamW, EMA)")
    for col in ("model", "config", "train hooks", "precision", "steps/s", "peak MB", "speedup", "outcome"):
        table.add_column(col, justify="right" if col in ("steps/s", "peak MB", "speedup") else "left")
    for r in rows:
        m, p = r["metrics"], r["protocol"]
        baseline = r.get("baseline")
        speedup = _fmt(m.get("speedup"), ".3f")
        if baseline:
            speedup += f" vs {baseline['protocol']['train_config']}"
        table.add_row(r["subject"]["model"], p["train_config"], ", ".join(p["train_hooks"]), p["precision"],
                      _fmt(m.get("steps_per_s")), _fmt(m.get("peak_memory_mb"), ".0f"),
                      speedup if baseline else "", r["extra"]["outcome"])
    return table


def published_comparisons(record: dict) -> list:
    """Each row against reference_results (bench.compare): only comparisons with a published value."""
    from bench import compare, reference

    refs = reference.load_all()
    out = []
    for row in all_rows(record):
        if row["protocol"].get("code") == "official":
            continue  # the official code's rows are the yardstick of this run, not a result of dit-bench's
        out += [c for c in compare.compare_record(row, refs) if c.reference is not None]
    return out
