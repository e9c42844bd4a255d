"""Batched, sharded, resumable sampling into the ADM evaluator's ``.npz``.

Why not the official ``sample_ddp.py``: its images depend on the batch size and GPU count, a killed run
starts over, and it silently packs fewer images when PNGs are missing (dit.md §C.2). Here:

* sample ``i`` depends on ``(seed, i)`` only (bench/seeding.py), so any batch size or process count
  gives the same images;
* every finished batch is written at once as an atomic shard ``shards/<start>-<stop>.npz``; a run
  started again with the same protocol computes only the indices no valid shard holds (a corrupt
  shard is detected by its zip checksums and redone);
* the directory's ``manifest.json`` is the protocol card; a different protocol in the same directory
  is refused rather than mixed;
* the final ``samples.npz`` holds ``arr_0`` (uint8 N×H×W×3) and ``arr_1`` (labels), as guided-diffusion
  writes class-conditional samples, and is only written when all N images exist.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from bench import seeding
from bench.atomic import atomic_open
from bench.errors import UserError
from bench.layers import attention_backend
from bench.results import write_json_atomic

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
SAMPLERS = ("ddpm", "ddim")
SAMPLES_FILE = "samples.npz"
MANIFEST_FILE = "manifest.json"
_SHARD_RE = re.compile(r"^(\d{8})-(\d{8})\.npz$")


class SamplingError(UserError):
    """A sampling run that cannot proceed (protocol clash, non-finite samples, ...)."""


@dataclass(frozen=True)
class SamplingProtocol:
    """Everything that determines the images. Batch size and process count are deliberately absent."""

    model: str
    image_size: int
    num_samples: int
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    num_classes: int = 1000
    sampler: str = "ddpm"
    steps: str = "250"  # a respacing string: "250", "ddim50", "10,15,20"
    eta: float = 0.0
    cfg_scale: float = 1.0
    label_policy: str = "random"
    seed: int = 0
    precision: str = "fp32"
    vae: str = "ema"
    sample_hooks: tuple[str, ...] = ()
    hook_options: dict = field(default_factory=dict)
    device_type: str = "cpu"  # CPU and CUDA kernels differ in the last bits: never mixed in one file
    random_weights: bool = False
    # The fast path (bench/speed.py's): SDPA kernel choice and torch.compile of the repeated blocks. Both
    # change the last bits of the images, so they are part of the run's identity when not at the default.
    attention: str = "default"
    compile: bool = False

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise SamplingError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if self.precision not in PRECISIONS:
            raise SamplingError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.cfg_scale < 1.0:
            raise SamplingError(f"cfg scale {self.cfg_scale} < 1 (DiT's convention: 1 = no guidance)")
        if self.num_samples < 1:
            raise SamplingError("the number of samples must be at least 1")
        if self.label_policy not in seeding.LABEL_POLICIES:
            raise SamplingError(f"label policy {self.label_policy!r} is not one of {', '.join(seeding.LABEL_POLICIES)}")
        from bench.speed import ATTENTION_CHOICES, CUDA_ONLY_ATTENTION

        if self.attention not in ATTENTION_CHOICES:
            raise SamplingError(f"attention {self.attention!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        if self.attention in CUDA_ONLY_ATTENTION and self.device_type != "cuda":
            raise SamplingError(f"attention {self.attention!r} is a CUDA kernel; on {self.device_type} use default, "
                                "flash, math or explicit")

    # Fields added after runs existed: left out of the card at their defaults, so those runs keep their identity.
    _OMITTED_AT_DEFAULT = {"attention": "default", "compile": False}

    def card(self) -> dict:
        out = dataclasses.asdict(self)
        out["sample_hooks"] = list(self.sample_hooks)
        for key, default in self._OMITTED_AT_DEFAULT.items():
            if out[key] == default:
                del out[key]
        return out

    def identity(self) -> dict:
        """What determines the images: the card, with the checkpoint known by its content rather than its
        path when the sha256 is known (a moved checkout or another cache directory is the same run)."""
        return card_identity(self.card())

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def card_identity(card: dict) -> dict:
    if card.get("checkpoint_sha256"):
        card = {k: v for k, v in card.items() if k != "checkpoint"}
    return card


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC by the official rule: truncate(clamp(127.5 x + 128, 0, 255)) (dit.md §C.2)."""
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------- shards
class ShardStore:
    """The shards of one run directory: which sample indices are done, and the final merge."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.shard_dir = self.out_dir / "shards"

    def _shards(self) -> list[tuple[int, int, Path]]:
        if not self.shard_dir.is_dir():
            return []
        found = []
        for path in self.shard_dir.iterdir():
            m = _SHARD_RE.match(path.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), path))
        return sorted(found)

    @staticmethod
    def _read(path: Path, start: int, stop: int, image_shape: tuple[int, ...]):
        """A shard's arrays, or None when it is corrupt (bad zip CRC, truncated, wrong shapes)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                images, labels, indices = data["images"], data["labels"], data["indices"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        n = stop - start
        if (images.dtype != np.uint8 or images.shape != (n, *image_shape) or labels.shape != (n,)
                or not np.array_equal(indices, np.arange(start, stop))):
            return None
        return images, labels

    def scan(self, image_shape: tuple[int, ...]) -> tuple[set[int], list[Path]]:
        """Indices held by valid shards, and the corrupt shards (removed so they are redone)."""
        done, corrupt = set(), []
        for start, stop, path in self._shards():
            if self._read(path, start, stop, image_shape) is None:
                corrupt.append(path)
                path.unlink(missing_ok=True)
            else:
                done.update(range(start, stop))
        return done, corrupt

    def write(self, start: int, images: np.ndarray, labels: np.ndarray) -> Path:
        stop = start + len(images)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        path = self.shard_dir / f"{start:08d}-{stop:08d}.npz"
        _savez_atomic(path, images=images, labels=labels, indices=np.arange(start, stop, dtype=np.int64))
        return path

    def merge(self, num_samples: int, image_shape: tuple[int, ...], path: Path) -> Path:
        images = np.empty((num_samples, *image_shape), dtype=np.uint8)
        labels = np.empty((num_samples,), dtype=np.int64)
        have = np.zeros(num_samples, dtype=bool)
        for start, stop, shard in self._shards():
            if stop > num_samples:
                continue
            data = self._read(shard, start, stop, image_shape)
            if data is None:
                raise SamplingError(f"shard {shard} became unreadable; run the same command again to redo it")
            images[start:stop], labels[start:stop] = data
            have[start:stop] = True
        if not have.all():
            missing = np.flatnonzero(~have)
            raise SamplingError(f"{len(missing)} of {num_samples} samples are missing (first: {missing[0]}); "
                                "run the same command again to finish")
        # arr_0 / arr_1: the layout guided-diffusion's class-conditional samplers write.
        _savez_atomic(path, arr_0=images, arr_1=labels)
        return path


def _savez_atomic(path: Path, **arrays) -> None:
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)


def contiguous_batches(indices: Iterable[int], batch_size: int) -> list[list[int]]:
    """Group sorted indices into runs of consecutive indices, each at most batch_size long."""
    batches: list[list[int]] = []
    for i in sorted(indices):
        if batches and batches[-1][-1] == i - 1 and len(batches[-1]) < batch_size:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


# ---------------------------------------------------------------------------------------------- generation
@dataclass
class SamplerParts:
    """What generating images needs: the denoiser, the diffusion, the decoder and the latent shape."""

    model: torch.nn.Module  # or a sample-hook wrapper with forward / forward_with_cfg / reset
    diffusion: object
    decoder: torch.nn.Module
    latent_shape: tuple[int, int, int]
    null_class: int


def autocast_context(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    import contextlib

    return contextlib.nullcontext()


def set_matmul_precision(precision: str) -> None:
    """fp32 means true fp32 (the DiT README's PyTorch numbers had TF32 off); tf32 turns it on as the scripts do."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


@torch.no_grad()
def generate(parts: SamplerParts, protocol: SamplingProtocol, indices: Sequence[int],
             device: torch.device, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC) and labels of the given sample indices."""
    if labels is None:
        labels = seeding.sample_labels(protocol.seed, indices, protocol.num_classes, protocol.num_samples,
                                       protocol.label_policy)
    noise = seeding.SampleNoise(protocol.seed, indices, parts.latent_shape, device)
    z = noise.initial()
    y = torch.as_tensor(labels, device=device)
    model = parts.model
    if hasattr(model, "reset"):
        model.reset()
    if protocol.cfg_scale > 1.0:
        z = torch.cat([z, z], 0)
        y = torch.cat([y, torch.full_like(y, parts.null_class)], 0)
        model_fn, model_kwargs = model.forward_with_cfg, {"y": y, "cfg_scale": protocol.cfg_scale}
    else:
        model_fn, model_kwargs = model.forward, {"y": y}
    own_loop = getattr(model, "sample_loop", None)
    from bench.speed import attention_context

    with autocast_context(protocol.precision, device), attention_context(protocol.attention):
        if own_loop is not None:  # a hook that replaces the DDPM loop itself (build_parts checked the sampler)
            latents = own_loop(parts.diffusion, z.shape, noise=z, model_kwargs=model_kwargs, noise_fn=noise.step,
                               clip_denoised=False, device=device)
        else:
            loop = parts.diffusion.p_sample_loop if protocol.sampler == "ddpm" else parts.diffusion.ddim_sample_loop
            extra = {"eta": protocol.eta} if protocol.sampler == "ddim" else {}
            latents = loop(model_fn, z.shape, noise=z, clip_denoised=False, model_kwargs=model_kwargs,
                           device=device, progress=False, noise_fn=noise.step, **extra)
    latents = latents[: len(indices)].float()
    bad = ~torch.isfinite(latents).flatten(1).all(dim=1)
    if bad.any():
        which = [int(indices[k]) for k in torch.nonzero(bad).flatten().tolist()]
        raise SamplingError(f"non-finite latents for samples {which[:10]}{' ...' if len(which) > 10 else ''}; "
                            "nothing was written for this batch (try --precision fp32)")
    images = parts.decoder.decode(latents)
    return to_uint8(images), np.asarray(labels, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- the run
def check_manifest(out_dir: Path, protocol: SamplingProtocol) -> None:
    """Refuse to mix two protocols in one directory."""
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        return
    try:
        previous = json.loads(path.read_text())["protocol"]
    except (json.JSONDecodeError, KeyError, OSError):
        raise SamplingError(f"{path} is not a dit-bench sampling manifest; use another --out directory") from None
    previous, current = card_identity(previous), protocol.identity()
    changed = [k for k in sorted(set(previous) | set(current)) if previous.get(k) != current.get(k)]
    if changed:
        detail = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
        raise SamplingError(f"{out_dir} holds samples of another protocol ({detail}); "
                            "use a new --out directory or the original options")


def run(parts: SamplerParts, protocol: SamplingProtocol, out_dir: str | os.PathLike, batch_size: int,
        device: torch.device, world=None, progress: bool = True,
        on_batch: Callable[[int], None] | None = None, environment: dict | None = None) -> dict:
    """Sample whatever is missing in ``out_dir`` and merge; returns the manifest (also on disk)."""
    from bench import distributed
    from bench.results import capture_environment

    world = world or distributed.World()
    out_dir = Path(out_dir)
    store = ShardStore(out_dir)
    image_size = protocol.image_size
    image_shape = (image_size, image_size, 3)
    if batch_size < 1:
        raise SamplingError("batch size must be at least 1")

    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        check_manifest(out_dir, protocol)
    world.barrier()
    if not world.is_main:
        check_manifest(out_dir, protocol)
    # Every rank must see the same picture of what is done before anyone writes.
    done, corrupt = store.scan(image_shape) if world.is_main else (None, None)
    world.barrier()
    if not world.is_main:
        done, _ = store.scan(image_shape)
    todo = [i for i in range(protocol.num_samples) if i not in done]
    batches = contiguous_batches(todo, batch_size)[world.rank::world.world_size]
    manifest = {
        "protocol": protocol.card(),
        "fingerprint": protocol.fingerprint(),
        "status": "running",
        "num_done": len(done),
        "attention": attention_backend(device),
        "environment": environment or capture_environment(),
    }
    if world.is_main:
        write_json_atomic(out_dir / MANIFEST_FILE, manifest)

    set_matmul_precision(protocol.precision)
    started, made = time.perf_counter(), 0
    with _progress(progress and world.is_main, len(todo), len(done), protocol.num_samples) as advance:
        for batch in batches:
            images, labels = generate(parts, protocol, batch, device)
            store.write(batch[0], images, labels)
            made += len(batch)
            advance(len(batch) * world.world_size)
            if on_batch is not None:
                on_batch(len(batch))
    elapsed = time.perf_counter() - started
    world.barrier()

    if world.is_main:
        store.merge(protocol.num_samples, image_shape, out_dir / SAMPLES_FILE)
        manifest.update(status="complete", num_done=protocol.num_samples, computed_now=len(todo),
                        reused=len(done), corrupt_shards_redone=[p.name for p in corrupt or []],
                        seconds_this_run=round(elapsed, 3), samples=SAMPLES_FILE,
                        samples_sha256=_sha256(out_dir / SAMPLES_FILE))
        write_json_atomic(out_dir / MANIFEST_FILE, manifest)
    world.barrier()
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _progress:
    """A rich progress bar with images/s and ETA (or nothing, for non-main ranks and tests)."""

    def __init__(self, enabled: bool, todo: int, done: int, total: int):
        self.enabled, self.todo, self.done, self.total = enabled, todo, done, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        class Rate(TextColumn):
            def render(self, task):
                speed = task.finished_speed or task.speed
                return super().render(task) if speed is None else f"{speed:.2f} img/s"

        self._bar = Progress(TextColumn("sampling"), BarColumn(), MofNCompleteColumn(), Rate(""),
                             TimeElapsedColumn(), TimeRemainingColumn())
        self._bar.__enter__()
        task = self._bar.add_task("sampling", total=self.total, completed=self.done)
        return lambda n: self._bar.update(task, advance=n)

    def __exit__(self, *exc):
        if self.enabled:
            self._bar.__exit__(*exc)
        return False


def build_parts(protocol: SamplingProtocol, device: torch.device) -> tuple[SamplerParts, dict]:
    """Model (+ sample hooks), diffusion and decoder for a protocol; also the checkpoint info."""
    from bench import plugins
    from bench.diffusion import create_diffusion
    from bench.loading import load_denoiser
    from bench.vae import load_vae

    decoder = load_vae(protocol.vae, device)
    model, spec, info = load_denoiser(protocol.model, protocol.checkpoint, protocol.image_size,
                                      protocol.num_classes, device, latent_downsample=decoder.downsample,
                                      random_weights=protocol.random_weights,
                                      in_channels=decoder.latent_channels)
    if protocol.checkpoint_sha256 and info.get("sha256") and info["sha256"] != protocol.checkpoint_sha256:
        raise SamplingError(f"checkpoint sha256 {info['sha256'][:12]}… differs from the protocol's "
                            f"{protocol.checkpoint_sha256[:12]}…")
    diffusion = create_diffusion(protocol.steps, learn_sigma=getattr(model, "learn_sigma", True))
    diffusion.tables_on_device = True  # no per-step host-to-device copies; the same values, the same images
    if protocol.compile:
        from bench.speed import compile_model

        compile_model(model, "default")  # regional: hooks that run a slice of the blocks run compiled code too
    denoiser = model
    for name in protocol.sample_hooks:
        # The sample-hook contract: factory(model, num_steps=..., **options) -> an object with
        # forward / forward_with_cfg, optionally reset() (called before every batch), and optionally
        # sample_loop(diffusion, shape, *, noise, model_kwargs, noise_fn, clip_denoised, device), a DDPM
        # loop of its own that then replaces p_sample_loop (FasterDiffusion's parallel mode).
        factory = plugins.get_hook("sample_hooks", name, spec.family)
        denoiser = factory(denoiser, num_steps=diffusion.num_timesteps, **protocol.hook_options.get(name, {}))
        if getattr(denoiser, "sample_loop", None) is not None and protocol.sampler != "ddpm":
            raise SamplingError(f"sample hook {name!r} with these options runs its own DDPM loop; "
                                f"use --sampler ddpm, not {protocol.sampler}")
    latent = protocol.image_size // decoder.downsample
    parts = SamplerParts(denoiser, diffusion, decoder, (decoder.latent_channels, latent, latent),
                         null_class=protocol.num_classes)
    return parts, info
