"""Model checkpoints: read official files without executing pickled code, load strictly, save atomically.

Two layouts exist in the DiT family (reference/dit.md §A.4, edt.md §4, udit.md): a plain state dict
(the released DiT-XL/2 files) and a training checkpoint ``{model, ema, opt, args[, step]}`` whose
``args`` is an ``argparse.Namespace``. As the official ``find_model`` does, the EMA weights are used
when present. Files are read with ``torch.load(weights_only=True)`` and only ``argparse.Namespace`` is
allow-listed, so a file carrying any other pickled object is refused instead of run. ``.safetensors``
files are read too. Every problem a user can cause is one ``CheckpointError`` line.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.assets import sha256_of
from bench.atomic import atomic_open
from bench.errors import UserError

SAFE_GLOBALS = [argparse.Namespace]  # official training checkpoints pickle their argparse arguments
_SHOW = 3  # keys named per kind of mismatch in an error line


class CheckpointError(UserError):
    """A checkpoint file that cannot be read safely, or whose weights do not fit the model."""


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, dict]:
    """The whole object stored in a checkpoint file (e.g. for resuming training), read safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    info = {"path": str(path), "sha256": sha256_of(path)}
    if path.suffix == ".safetensors":
        info["format"] = "safetensors"
        return _read_safetensors(path), info
    info["format"] = "torch"
    with open(path, "rb") as fh:
        head = fh.read(4)
    # torch.save writes a zip archive (PK) or, in the legacy format, a protocol-2 pickle (0x80).
    if not head.startswith((b"PK", b"\x80")):
        what = "empty" if not head else "not a PyTorch checkpoint (a failed download that saved an error page?)"
        raise CheckpointError(f"checkpoint {path} is {what}; delete it and download or save it again")
    return _torch_load(path), info


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", message)
        if found:
            raise CheckpointError(
                f"checkpoint {path} contains a pickled Python object ({found.group(1)}) besides weights; dit-bench "
                "will not execute pickled code: re-save the weights as a plain state dict in an environment you trust"
            ) from None
        if "Weights only load failed" in message:
            raise CheckpointError(
                f"checkpoint {path} uses pickle features that weights-only loading refuses (not a torch.save file "
                "of tensors?); dit-bench will not execute pickled code: re-save it with torch.save(state_dict, ...)"
            ) from None
        raise _corrupt(path, exc) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise _corrupt(path, exc) from None


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError for damaged headers
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    reason = first_line.split(". ")[0].rstrip(".")
    reason = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
    return CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason}); "
                           "delete it and download or save it again")


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The model weights in a checkpoint file: ``ema`` if present, else ``model``, else the file itself.

    ``info`` says which (``source``: "ema" | "model" | "state_dict") and carries the file's sha256,
    its format, and the training ``step`` and ``args`` (as a dict) when the file has them.
    """
    obj, info = read_checkpoint(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict or a training "
                              "checkpoint {model, ema, opt, args}")
    for source in ("ema", "model"):
        if isinstance(obj.get(source), Mapping):
            state_dict = obj[source]
            break
    else:
        source, state_dict = "state_dict", obj
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"checkpoint {path} is not a state dict: {len(not_tensors)} entries are not tensors "
                              f"({_first(not_tensors)}); expected a state dict or {{model, ema, opt, args}}")
    info["source"] = source
    if source != "state_dict":
        if "step" in obj:
            info["step"] = int(obj["step"])
        args = obj.get("args")
        if args is not None:
            info["args"] = vars(args) if isinstance(args, argparse.Namespace) else args
    return dict(state_dict), info


def _first(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """``model.load_state_dict`` that checks every key and shape first and reports all misfits in one line.

    Nothing is copied unless everything fits (torch would copy the fitting tensors before failing).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)} in the model"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing keys ({_first(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
    if wrong_shape:  # torch refuses these even when strict=False
        problems.append(f"{len(wrong_shape)} shape mismatches ({_first(wrong_shape)})")
    if problems:
        hint = "check the model name, image size and class count"
        # DDP (.module) and torch.compile (._orig_mod) prefix every key of the model they wrap.
        wrapped = [p for p in ("module.", "_orig_mod.") if unexpected and all(k.startswith(p) for k in unexpected)]
        if wrapped:
            hint = f"the keys carry a '{wrapped[0]}' prefix: the file was saved from a wrapped model, not the model"
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems) + "; " + hint)
    return model.load_state_dict(state_dict, strict=strict)


def load_model(spec, path: str | os.PathLike, **overrides) -> tuple[nn.Module, dict]:
    """Build ``spec`` (a ``ModelSpec``), load a checkpoint into it strictly, and return it in eval mode.

    The model is switched to eval only after loading: some architectures derive inference-time
    tensors from their weights when eval() is called (udit.md §10).
    """
    state_dict, info = read_state_dict(path)
    constructor = {}
    if spec.adapt_state_dict is not None:
        state_dict, constructor = spec.adapt_state_dict(state_dict)
    constructor = {**constructor, **{k: v for k, v in overrides.items() if v is not None}}  # explicit wins
    model = spec.build(**constructor)
    load_into(model, state_dict, strict=True)
    model.eval()
    info.update(model=spec.name, constructor=spec.kwargs(**constructor))
    return model, info


def _unwrap(module: nn.Module) -> nn.Module:
    # DDP (`.module`) and torch.compile (`._orig_mod`) wrappers would prefix every key.
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(module, attr, None), nn.Module):
            module = getattr(module, attr)
    return module


def _plain(value: Any) -> Any:
    # Keep args loadable under weights_only: anything beyond builtins is stored as its string.
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def save_training_checkpoint(path: str | os.PathLike, model: nn.Module, ema: nn.Module,
                             opt: torch.optim.Optimizer, args: argparse.Namespace | Mapping, step: int) -> Path:
    """Write ``{model, ema, opt, args, step}`` (the official layout, plus the step) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arg_dict = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    checkpoint = {
        "model": _unwrap(model).state_dict(),
        "ema": _unwrap(ema).state_dict(),
        "opt": opt.state_dict(),
        "args": argparse.Namespace(**{str(k): _plain(v) for k, v in arg_dict.items()}),
        "step": int(step),
    }
    with atomic_open(path, "wb") as fh:
        torch.save(checkpoint, fh)
    return path
