"""The training loop that method hooks plug into: DiT's train.py, deterministic and resumable.

Reproduced from the official script (reference/dit.md §D.1): AdamW at a constant lr 1e-4 with no weight
decay, no warm-up, no clipping; an EMA copy (decay 0.9999) updated after every optimiser step over all
named parameters and initialised as an exact copy; label dropout through the model's train mode; images
encoded on the fly (a fresh flip and posterior sample each time, latents x 0.18215); the global batch
split evenly over ranks under DDP; the logged loss the window mean all-reduced over ranks; checkpoints
``{model, ema, opt, args, step}`` named ``<step:07d>.pt``.

Changed on purpose: every random draw of step k on rank r (data order and flips, VAE posterior,
timesteps, noise, label dropout) comes from generators derived from (seed, k, r), so a run stopped
after k steps and resumed from its checkpoint ends with bit-identical weights. Label dropout draws from
torch's global generator inside the model; it is re-seeded per step inside ``torch.random.fork_rng``,
so the model code stays the official one. What resuming needs besides the official keys (the data
position, gradient-scaler and hook state) rides in ``args.train_state`` as plain values, so official
tools still read the file.

Train-hook contract. ``--hook NAME`` looks the factory up in the plug-in registry
(``get_hook("train_hooks", NAME, family)``) and calls ``factory(diffusion=..., **options)``. The object
it returns may implement any of:

* ``wrap_model(model) -> model``: before DDP; e.g. switch on gradient checkpointing.
* ``autocast(device) -> context manager`` and ``grad_scaler(device) -> GradScaler | None``: the forward
  runs inside the context, the backward through the scaler. ``precision`` ("bf16", ...) names it.
* ``configure_backends()``: called once before the first step (e.g. TF32 flags).
* ``sample_timesteps(n, device, generator) -> (t, mse_weight | None)``: the batch's timesteps and
  per-sample MSE weights; ``generator`` is a CPU generator. Default: uniform, unweighted.
* ``loss(model, x0, model_kwargs, generator) -> dict``: the whole objective of a batch, timesteps
  included; ``"loss"`` is the scalar to back-propagate. ``generator`` is a CPU generator.
* ``data_mode``: "features" to train on pre-extracted latents instead of images.
* ``settings``: names of global settings the hook decides (e.g. "tf32").
* ``state_dict() / load_state_dict(state)``: state to resume (stored as plain values: arrays become lists).
* ``record_name``: the name results record it under (None: its effect shows in the protocol instead).

At most one hook may supply each of autocast, grad_scaler, sample_timesteps, loss and data_mode; a loss
hook draws its own timesteps, so it cannot run with a timestep hook; two hooks may not decide the same
setting; a hook whose method does not list the model's family is refused. Each refusal says why.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from bench import atomic, data, plugins
from bench.errors import UserError
from bench.plugins import PluginError

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
# Stream words of the per-step generators (bench.data uses 101-103).
TIMESTEP_STREAM, NOISE_STREAM, POSTERIOR_STREAM, LABEL_DROP_STREAM, HOOK_STREAM = 201, 202, 203, 204, 205
# Settings a resumed run must share with the checkpoint, or it would not continue the same run.
RESUME_MUST_MATCH = ("model", "vae", "image_size", "num_classes", "global_batch_size", "lr", "weight_decay",
                     "ema_decay", "hooks", "hook_options", "seed", "data_mode", "num_items")


class TrainingError(UserError):
    """A training run that cannot start or continue."""


@dataclass
class TrainConfig:
    """One training run. ``None`` values are resolved from the data (see ``resolve``)."""

    model: str
    data: str
    out: str
    vae: str | None = None  # default "ema" for images; the extraction's VAE for features
    image_size: int | None = None  # default: the .npz's or features' size, else 256
    num_classes: int | None = None  # default: the data's classes
    global_batch_size: int = 256
    steps: int = 400_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    hooks: tuple[str, ...] = ()
    hook_options: dict = field(default_factory=dict)
    ckpt_every: int = 50_000
    log_every: int = 100
    seed: int = 0
    num_workers: int = 4
    # The fast path (bench/speed.py's): torch.compile of the repeated blocks and the SDPA kernel choice.
    compile: bool = False
    attention: str = "default"

    def __post_init__(self):
        from bench.speed import ATTENTION_CHOICES

        if self.attention not in ATTENTION_CHOICES:
            raise TrainingError(f"--attention {self.attention!r}: use one of {', '.join(ATTENTION_CHOICES)}")
        self.hooks = tuple(self.hooks)
        for name in ("global_batch_size", "steps", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.ema_decay <= 1:
            raise TrainingError("--lr must be positive and the EMA decay lie in [0, 1]")


# ------------------------------------------------------------------------------------------ hooks
class TrainHooks:
    """The train hooks of a run, checked for conflicts, behind one object the loop calls."""

    _SINGLE = (("autocast", "the autocast precision"), ("grad_scaler", "the gradient scaler"),
               ("sample_timesteps", "the training timesteps"), ("loss", "the training loss"))

    def __init__(self, hooks: Iterable[tuple[str, Any]] = ()):
        self.hooks = list(hooks)
        self._check()

    @classmethod
    def compose(cls, names: Iterable[str], family: str | None, diffusion, options: dict | None = None) -> "TrainHooks":
        names, options = list(names), dict(options or {})
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise PluginError(f"train hook {repeated[0]!r} is given twice")
        stray = sorted(set(options) - set(names))
        if stray:
            raise PluginError(f"options for {stray[0]!r}, which is not among the train hooks {names or '(none)'}")
        built = []
        for name in names:
            factory = plugins.get_hook("train_hooks", name, family)
            kwargs = {"diffusion": diffusion, **options.get(name, {})}
            try:
                inspect.signature(factory).bind(**kwargs)
            except TypeError as exc:
                raise PluginError(f"train hook {name!r} does not accept these options ({exc})") from None
            except ValueError:  # no signature to check (a builtin); let the call decide
                pass
            built.append((name, factory(**kwargs)))
        return cls(built)

    def _who(self, attr: str) -> list[str]:
        return [name for name, hook in self.hooks if callable(getattr(hook, attr, None))]

    def _one(self, attr: str):
        return next((hook for _, hook in self.hooks if callable(getattr(hook, attr, None))), None)

    def _check(self) -> None:
        for attr, what in self._SINGLE:
            who = self._who(attr)
            if len(who) > 1:
                raise PluginError(f"train hooks {who[0]!r} and {who[1]!r} both decide {what}; use one of them")
        modes = [name for name, hook in self.hooks if getattr(hook, "data_mode", None)]
        if len(modes) > 1:
            raise PluginError(f"train hooks {modes[0]!r} and {modes[1]!r} both decide what the data is; use one")
        if self._who("loss") and self._who("sample_timesteps"):
            raise PluginError(f"train hook {self._who('loss')[0]!r} forms the whole loss and draws its own "
                              f"timesteps, so {self._who('sample_timesteps')[0]!r} would be ignored; use one of them")
        owner: dict[str, str] = {}
        for name, hook in self.hooks:
            for setting in getattr(hook, "settings", ()):
                if setting in owner:
                    raise PluginError(f"train hooks {owner[setting]!r} and {name!r} both set {setting}; "
                                      "use one of them")
                owner[setting] = name

    def wrap_model(self, model: nn.Module) -> nn.Module:
        for _, hook in self.hooks:
            if callable(getattr(hook, "wrap_model", None)):
                model = hook.wrap_model(model)
        return model

    def autocast(self, device: torch.device):
        hook = self._one("autocast")
        return hook.autocast(device) if hook is not None else contextlib.nullcontext()

    def grad_scaler(self, device: torch.device):
        hook = self._one("grad_scaler")
        return hook.grad_scaler(device) if hook is not None else None

    def configure_backends(self) -> None:
        for _, hook in self.hooks:
            if callable(getattr(hook, "configure_backends", None)):
                hook.configure_backends()

    def sample_timesteps(self, n: int, device: torch.device, generator: torch.Generator, num_timesteps: int):
        hook = self._one("sample_timesteps")
        if hook is not None:
            return hook.sample_timesteps(n, device, generator)
        # DiT's uniform draw over every step, unweighted.
        return torch.randint(0, num_timesteps, (n,), generator=generator).to(device), None

    @property
    def loss_hook(self):
        return self._one("loss")

    @property
    def data_mode(self) -> str:
        return next((h.data_mode for _, h in self.hooks if getattr(h, "data_mode", None)), "pixels")

    @property
    def precision(self) -> str | None:
        hook = self._one("autocast")
        return getattr(hook, "precision", None) if hook is not None else None

    def record_names(self) -> list[str]:
        return [getattr(h, "record_name", n) for n, h in self.hooks if getattr(h, "record_name", n) is not None]

    def state_dict(self) -> dict:
        return {n: _plain_state(h.state_dict()) for n, h in self.hooks if callable(getattr(h, "state_dict", None))}

    def load_state_dict(self, states: dict) -> None:
        for name, hook in self.hooks:
            if name in states and callable(getattr(hook, "load_state_dict", None)):
                hook.load_state_dict(states[name])


def _plain_state(value):
    """Hook state as builtins, so it fits weights-only checkpoints (float64 survives as Python floats)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_state(v) for v in value]
    return value


def owners(hook_names: Iterable[str]) -> list[str]:
    """The methods that contribute these train hooks, in order, once each."""
    found = []
    for name in hook_names:
        for method in plugins.methods().values():
            if name in method.train_hooks and method.name not in found:
                found.append(method.name)
    return found


# ------------------------------------------------------------------------------------------ EMA
@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.9999) -> None:
    """ema <- decay * ema + (1 - decay) * model over all named parameters, frozen ones included (official)."""
    ema_params = dict(ema.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


def make_ema(model: nn.Module) -> nn.Module:
    """An exact copy, frozen, in eval mode (train.py: deepcopy, requires_grad False, update with decay 0)."""
    ema = copy.deepcopy(model).requires_grad_(False)
    update_ema(ema, model, decay=0)
    return ema.eval()


# ------------------------------------------------------------------------------------------ randomness
@dataclass
class StepRandomness:
    """The generators of one step on one rank, all derived from (seed, step, rank)."""

    timesteps: torch.Generator  # CPU, as timestep samplers draw on the CPU
    noise: torch.Generator  # on the training device
    posterior: torch.Generator  # on the training device
    hook: torch.Generator  # CPU, for a loss hook's own draws
    label_drop_seed: int  # re-seeds torch's global generator around the forward

    @classmethod
    def at(cls, seed: int, step: int, rank: int, device: torch.device) -> "StepRandomness":
        def gen(stream: int, dev) -> torch.Generator:
            return torch.Generator(dev).manual_seed(data.derive_seed(seed, stream, step, rank))

        return cls(gen(TIMESTEP_STREAM, "cpu"), gen(NOISE_STREAM, device), gen(POSTERIOR_STREAM, device),
                   gen(HOOK_STREAM, "cpu"), data.derive_seed(seed, LABEL_DROP_STREAM, step, rank))


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device):
    """torch's global generators seeded for the enclosed code and restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything a training run holds between steps."""

    config: TrainConfig
    device: torch.device
    world: Any
    hooks: TrainHooks
    diffusion: Any
    dataset: Any
    encoder: Any  # None when training on pre-extracted latents
    plan: data.BatchPlan
    model: nn.Module  # the plain model (checkpoints, EMA)
    forward_model: nn.Module  # what the loss calls: DDP-wrapped under torchrun
    ema: nn.Module
    opt: torch.optim.Optimizer
    scaler: Any
    family: str
    step: int = 0
    details: dict = field(default_factory=dict)


def _open_data(config: TrainConfig, data_mode: str):
    path = Path(config.data)
    if data_mode == "features":
        if not data.is_features_dir(path):
            raise TrainingError(f"--data {path}: the features data mode needs a directory written by "
                                "`dit-bench extract-features`")
        dataset = data.LatentFeatures(path)
        extracted_with = dataset.manifest["vae"]
        if config.vae not in (None, extracted_with):
            raise TrainingError(f"{path} was extracted with VAE {extracted_with!r}, not {config.vae!r}; drop --vae")
        if config.image_size not in (None, dataset.image_size):
            raise TrainingError(f"{path} holds latents of {dataset.image_size}px images, not {config.image_size}px")
        config.vae, config.image_size = extracted_with, dataset.image_size
        return dataset, None
    if data.is_features_dir(path):
        raise TrainingError(f"--data {path} holds pre-extracted latents: add the train hook that reads them "
                            "(see `dit-bench methods`), or point --data at the images")
    dataset = data.open_images(path, config.image_size)
    config.image_size = dataset.image_size
    config.vae = config.vae or "ema"
    return dataset, True


def setup(config: TrainConfig, device: torch.device, world, resume: str | os.PathLike | bool | None = None) -> Run:
    """Build model, EMA, optimiser, hooks and data; load the checkpoint when resuming."""
    from bench.diffusion import create_diffusion
    from bench.vae import load_vae

    spec = plugins.get_model(config.model)
    diffusion = create_diffusion("", learn_sigma=spec.kwargs().get("learn_sigma", True))
    hooks = TrainHooks.compose(config.hooks, spec.family, diffusion, config.hook_options)
    dataset, needs_encoder = _open_data(config, hooks.data_mode)
    if needs_encoder:
        encoder = load_vae(config.vae, device)
        if config.image_size % encoder.downsample:
            raise TrainingError(f"image size {config.image_size} is not divisible by the VAE's factor "
                                f"{encoder.downsample}")
        in_channels, latent_size = encoder.latent_channels, config.image_size // encoder.downsample
    else:
        encoder = None
        in_channels, latent_size = dataset.latent_shape[0], dataset.latent_shape[-1]
    config.num_classes = config.num_classes or dataset.num_classes
    if dataset.num_classes > config.num_classes:
        raise TrainingError(f"the data has {dataset.num_classes} classes but the model gets {config.num_classes}; "
                            "raise --num-classes")
    if config.global_batch_size % world.world_size:
        raise TrainingError(f"global batch {config.global_batch_size} does not split evenly over "
                            f"{world.world_size} processes")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # one initialisation for every rank (DDP would broadcast rank 0's anyway)
        model = spec.build(input_size=latent_size, num_classes=config.num_classes, in_channels=in_channels)
    ema = make_ema(model).to(device)
    model = model.to(device).train()
    if config.compile:
        from bench.speed import compile_model

        compile_model(model, "default")  # blocks in place: state-dict keys, checkpoints and EMA are unchanged
    wrapped = hooks.wrap_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = hooks.grad_scaler(device)
    plan = data.BatchPlan(len(dataset), config.global_batch_size, config.seed)
    run = Run(config, device, world, hooks, diffusion, dataset, encoder, plan, model, wrapped, ema, opt, scaler,
              spec.family, details={"in_channels": in_channels, "input_size": latent_size,
                                    "data_kind": dataset.kind, "num_items": len(dataset)})
    checkpoint = _find_resume(config, resume)
    if checkpoint is not None:
        _load_state(run, checkpoint)
    if world.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        run.forward_model = DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def _checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINT_DIR
    return sorted(folder.glob("[0-9]" * 7 + ".pt")) if folder.is_dir() else []


def _find_resume(config: TrainConfig, resume) -> Path | None:
    existing = _checkpoints(Path(config.out))
    if resume in (None, False):
        if existing:
            raise TrainingError(f"{config.out} already holds checkpoints (up to {existing[-1].name}); pass --resume "
                                "to continue that run, or choose another --out")
        return None
    if resume is True:
        if not existing:
            raise TrainingError(f"nothing to resume: {Path(config.out) / CHECKPOINT_DIR} holds no checkpoints")
        return existing[-1]
    return Path(resume)


def checkpoint_args(run: Run) -> dict:
    """``args`` of a checkpoint: the official train.py names, then what dit-bench needs to resume."""
    c = run.config
    official = {"data_path": c.data, "results_dir": c.out, "model": c.model, "image_size": c.image_size,
                "num_classes": c.num_classes, "global_batch_size": c.global_batch_size, "global_seed": c.seed,
                "vae": c.vae, "num_workers": c.num_workers, "log_every": c.log_every, "ckpt_every": c.ckpt_every}
    epoch, batch = run.plan.position(run.step)
    train_state = {"step": run.step, "epoch": epoch, "batch_in_epoch": batch, "world_size": run.world.world_size,
                   "grad_scaler": run.scaler.state_dict() if run.scaler is not None else None,
                   "hooks": run.hooks.state_dict()}
    return {**official, **dataclasses.asdict(c), "data_mode": run.hooks.data_mode, **run.details,
            "train_state": train_state}


def save_checkpoint(run: Run) -> Path:
    from bench.checkpoints import save_training_checkpoint

    path = Path(run.config.out) / CHECKPOINT_DIR / f"{run.step:07d}.pt"
    return save_training_checkpoint(path, run.model, run.ema, run.opt, checkpoint_args(run), run.step)


def _load_state(run: Run, path: Path) -> None:
    from bench.checkpoints import load_into, read_checkpoint

    obj, _ = read_checkpoint(path)
    if not isinstance(obj, dict) or not all(k in obj for k in ("model", "ema", "opt", "args")):
        raise TrainingError(f"{path} is not a training checkpoint {{model, ema, opt, args}}; cannot resume from it")
    args = vars(obj["args"]) if isinstance(obj["args"], argparse.Namespace) else dict(obj["args"])
    state = args.get("train_state")
    if not isinstance(state, dict):
        raise TrainingError(f"{path} was not written by `dit-bench train`: it lacks the data position to resume")
    mine = {**dataclasses.asdict(run.config), "data_mode": run.hooks.data_mode, **run.details}
    # Compared as JSON, so a stored tuple equals the same list.
    stored, mine = (json.loads(json.dumps({k: d.get(k) for k in RESUME_MUST_MATCH}, default=str))
                    for d in (args, mine))
    differ = [k for k in RESUME_MUST_MATCH if stored[k] != mine[k]]
    if differ:
        detail = ", ".join(f"{k}: {stored[k]!r} in the checkpoint, {mine[k]!r} now" for k in differ[:3])
        raise TrainingError(f"cannot resume {path}: the run differs ({detail}); use the original settings")
    load_into(run.model, obj["model"])
    load_into(run.ema, obj["ema"])
    run.opt.load_state_dict(obj["opt"])
    if run.scaler is not None and state.get("grad_scaler"):
        run.scaler.load_state_dict(state["grad_scaler"])
    run.hooks.load_state_dict(state.get("hooks") or {})
    run.step = int(obj.get("step", state["step"]))
    if run.step >= run.config.steps:
        raise TrainingError(f"{path} is already at step {run.step}; raise --steps above it to train further")


# ------------------------------------------------------------------------------------------ one step
def train_step(run: Run, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One optimiser step on this rank's micro-batch; returns the loss (detached) and any logged terms."""
    device = run.device
    rand = StepRandomness.at(run.config.seed, step, run.world.rank, device)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if run.encoder is not None:
        with torch.no_grad():  # fp32 and outside autocast, as train.py encodes
            x = run.encoder.encode(x, generator=rand.posterior)
    model_kwargs = {"y": y}
    logged: dict = {}
    with seeded_global_rng(rand.label_drop_seed, device), run.hooks.autocast(device):
        loss_hook = run.hooks.loss_hook
        if loss_hook is not None:
            out = loss_hook.loss(run.forward_model, x, model_kwargs, generator=rand.hook)
            loss = out["loss"]
            logged = {k: v for k, v in out.items() if k != "loss" and torch.is_tensor(v) and v.ndim == 0}
        else:
            t, mse_weight = run.hooks.sample_timesteps(len(x), device, rand.timesteps, run.diffusion.num_timesteps)
            noise = torch.randn(x.shape, generator=rand.noise, device=device, dtype=x.dtype)
            terms = run.diffusion.training_losses(run.forward_model, x, t, model_kwargs, noise=noise,
                                                  mse_weight=mse_weight)
            loss = terms["loss"].mean()
    run.opt.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        loss.backward()
        run.opt.step()
    update_ema(run.ema, run.model, run.config.ema_decay)
    return loss.detach().float(), logged


# ------------------------------------------------------------------------------------------ the loop
def _all_reduce_mean(value: torch.Tensor, world) -> float:
    if world.world_size > 1:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / world.world_size
    return float(value)


def _peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class _Log:
    """The JSON-lines log of a run; on resume, lines past the checkpoint (a lost tail) are dropped."""

    def __init__(self, path: Path, enabled: bool, resumed_at: int):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            keep = [line for line in path.read_text().splitlines() if _logged_step(line) <= resumed_at]
            atomic.write_text(path, "".join(line + "\n" for line in keep))

    def write(self, entry: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(entry) + "\n")


def _logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except (json.JSONDecodeError, AttributeError):  # a line half-written when the run died
        return float("inf")


class _Progress:
    """A rich progress display: step, loss, steps/s, peak memory, ETA (main rank only)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.done, status="")
        return self

    def advance(self, status: str | None = None) -> None:
        if self.enabled:
            self.bar.update(self.task, advance=1, **({"status": status} if status is not None else {}))

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
        return False


def loop(run: Run, progress: bool = True, on_log=None) -> dict:
    """Train from ``run.step`` to ``config.steps``; log, checkpoint, and return the run's summary."""
    from bench.speed import CUDA_ONLY_ATTENTION, attention_context
    from bench.telemetry import PeakMemory
    from bench.timing import StepRate

    if run.config.attention in CUDA_ONLY_ATTENTION and run.device.type != "cuda":
        raise TrainingError(f"--attention {run.config.attention} is a CUDA kernel; on {run.device.type} use "
                            "default, flash, math or explicit")

    config, world, device = run.config, run.world, run.device
    out = Path(config.out)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / LOG_FILE, world.is_main, run.step)
    workers = config.num_workers if run.dataset.kind == "image-folder" else 0  # the others are in memory or tiny
    loader = torch.utils.data.DataLoader(
        run.dataset, batch_sampler=data.StepBatches(run.plan, run.step, config.steps, world.rank, world.world_size),
        num_workers=workers, pin_memory=device.type == "cuda")
    run.hooks.configure_backends()
    start_step, windows, entries = run.step, [], []
    window_loss, window_steps = torch.zeros((), device=device), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with PeakMemory(device) as peak, _Progress(progress and world.is_main, config.steps, run.step) as bar:
        rate = StepRate(device)
        for step, (x, y) in enumerate(loader, start=run.step):
            with attention_context(config.attention):
                loss, _ = train_step(run, step, x, y)
            window_loss += loss
            window_steps += 1
            rate.step()
            run.step = step + 1
            status = None
            if run.step % config.log_every == 0 or run.step == config.steps:
                steps_per_s = rate.window()
                windows.append((window_steps, window_steps / steps_per_s))
                mean_loss = _all_reduce_mean(window_loss / window_steps, world)
                if not np.isfinite(mean_loss):
                    raise TrainingError(f"the loss became {mean_loss} by step {run.step}; lower --lr, or use "
                                        "bf16 rather than fp16")
                epoch, _ = run.plan.position(step)
                entry = {"step": run.step, "epoch": epoch, "loss": mean_loss, "steps_per_s": steps_per_s,
                         "peak_memory_mb": _peak_memory_mb(device), "world_size": world.world_size}
                entries.append(entry)
                log.write(entry)
                if on_log is not None:
                    on_log(entry)
                window_loss, window_steps = torch.zeros((), device=device), 0
                memory = f", {entry['peak_memory_mb']:.0f} MB" if entry["peak_memory_mb"] is not None else ""
                status = f"loss {mean_loss:.4f}, {steps_per_s:.2f} steps/s{memory}"
            if run.step % config.ckpt_every == 0 or run.step == config.steps:
                if world.is_main:
                    save_checkpoint(run)
                world.barrier()
            bar.advance(status)
    # The first window holds the warm-up (allocator, autotuning), so the rate leaves it out when it can.
    steady = windows[1:] or windows
    steps_per_s = sum(n for n, _ in steady) / sum(s for _, s in steady) if steady else None
    return {"start_step": start_step, "steps": run.step, "log": entries, "steps_per_s": steps_per_s,
            "final_loss": entries[-1]["loss"] if entries else None, "memory": peak.to_dict()}


def result_record(run: Run, summary: dict, environment: dict | None = None) -> dict:
    from bench import results

    config = run.config
    tf32 = run.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    model_owner = next((m.name for m in plugins.methods().values() if any(s.name == config.model for s in m.models)),
                       None)
    subject = {"method": "+".join(owners(config.hooks)) or model_owner, "model": config.model,
               "resolution": config.image_size, "hooks": {"train": run.hooks.record_names()}}
    protocol = {"global_batch_size": config.global_batch_size, "precision": run.hooks.precision or
                ("tf32" if tf32 else "fp32"), "num_gpus": run.world.world_size if run.device.type == "cuda" else 0,
                "world_size": run.world.world_size, "device_type": run.device.type, "training_steps": config.steps,
                "steps_measured": summary["steps"] - summary["start_step"], "vae": config.vae, "seed": config.seed,
                "lr": config.lr, "ema_decay": config.ema_decay, "data": run.details["data_kind"],
                "num_images": run.details["num_items"], "train_hooks": list(config.hooks),
                "hook_options": config.hook_options}
    memory = summary["memory"]
    metrics = {"steps_per_s": summary["steps_per_s"], "peak_memory_mb": memory.get("peak_memory_mb"),
               "final_loss": summary["final_loss"]}
    extra = {"log": summary["log"], "memory": memory}
    warnings = [] if memory.get("peak_memory_mb") is not None else [memory.get("reason", "no peak memory")]
    return results.make_record("train", subject, protocol, metrics, warnings=warnings, extra=extra,
                               environment=environment)


def train(config: TrainConfig, *, device: str | torch.device | None = None, world=None,
          resume: str | os.PathLike | bool | None = None, progress: bool = True,
          environment: dict | None = None, on_log=None) -> dict:
    """Run (or resume) a training run; writes checkpoints, ``log.jsonl`` and ``result.json`` under ``out``."""
    from bench import distributed, results

    world = world or distributed.init(device)
    dev = distributed.default_device(world, device)
    run = setup(config, dev, world, resume)
    started = time.perf_counter()
    summary = loop(run, progress=progress, on_log=on_log)
    summary["seconds"] = time.perf_counter() - started
    if world.is_main:
        record = result_record(run, summary, environment)
        results.save(record, Path(config.out) / RESULT_FILE)
        summary["record"] = record
    summary["checkpoint"] = str(Path(config.out) / CHECKPOINT_DIR / f"{run.step:07d}.pt")
    return summary
