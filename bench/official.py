"""The official code beside ours: a model's class and diffusion factory imported from a user's checkout.

`dit-bench speed --official-code DIR` times the official sampler on the same device, inputs and weights as
dit-bench's own rows, so "as fast as the official code" (paper protocol) and "N x faster than it" (fast
protocol) are measured, not claimed. A plug-in says where its architecture lives upstream as plain data,
``ModelSpec.official_code = {"model": "models:DiT", "diffusion": "diffusion:create_diffusion"}``, so the
harness never names a method. Importing the folder runs its code: the user points at it on purpose.
"""
from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench import plugins
from bench.errors import UserError


class OfficialCodeError(UserError):
    """An official checkout that cannot be imported, or whose model does not match dit-bench's."""


@dataclass
class OfficialCode:
    """What was imported, and from where (the record's provenance of the official rows)."""

    folder: Path
    model_class: Callable[..., torch.nn.Module]
    create_diffusion: Callable[..., Any]
    paths: dict  # {"model": "models:DiT", "diffusion": "diffusion:create_diffusion"}
    commit: str | None

    def card(self) -> dict:
        return {"folder": str(self.folder), "commit": self.commit, **self.paths}


@contextlib.contextmanager
def _isolated_imports(folder: Path, top_level: set[str]) -> Iterator[None]:
    """Import ``top_level`` names from ``folder`` alone, then take them back out of ``sys.modules``.

    Official repositories use generic top-level names (``models``, ``diffusion``); a module of that name
    imported earlier must not answer, and ours must not stay behind for the next import to pick up.
    """
    def owned(name: str) -> bool:
        return name.split(".")[0] in top_level

    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if owned(name)}
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if owned(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def _attribute(path: str, folder: Path) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any failure of foreign code becomes one line
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise OfficialCodeError(f"--official-code {folder}: importing {module_name!r} failed "
                                f"({type(exc).__name__}: {detail}); point it at a checkout of the official "
                                "repository, with that repository's requirements installed") from None
    if not hasattr(module, attr):
        raise OfficialCodeError(f"--official-code {folder}: {module_name!r} has no {attr!r}; is this the "
                                "official repository of the model?")
    return getattr(module, attr)


def _commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def load(folder: str | Path, spec: plugins.ModelSpec) -> OfficialCode:
    """Import the model class and diffusion factory that ``spec``'s plug-in names, from ``folder``."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise OfficialCodeError(f"--official-code {folder}: no such folder")
    if not spec.official_code:
        raise OfficialCodeError(f"{spec.name}: its plug-in does not say where the model lives in the official "
                                "repository (ModelSpec.official_code), so it cannot be timed against it")
    paths = dict(spec.official_code)
    top_level = {path.partition(":")[0].split(".")[0] for path in paths.values()}
    with _isolated_imports(folder, top_level):
        model_class = _attribute(paths["model"], folder)
        create_diffusion = _attribute(paths["diffusion"], folder)
    return OfficialCode(folder, model_class, create_diffusion, paths, _commit(folder))


def build_twin(code: OfficialCode, spec: plugins.ModelSpec, overrides: dict, ours: torch.nn.Module) -> torch.nn.Module:
    """The official class, built with the same constructor arguments, holding ``ours``'s weights.

    ``strict=True`` loading is the layout check: a twin that does not take dit-bench's state dict as it is
    would time a different network.
    """
    try:
        twin = code.model_class(**spec.kwargs(**overrides))
    except TypeError as exc:
        raise OfficialCodeError(f"{spec.name}: the official {code.paths['model']} does not take dit-bench's "
                                f"constructor arguments ({exc})") from None
    twin = twin.to(next(ours.parameters()).device)
    try:
        _load_then_eval(twin, ours.state_dict(), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise OfficialCodeError(f"{spec.name}: the official model does not take dit-bench's weights with "
                                f"strict=True ({detail})") from None
    return twin


def _load_then_eval(model: torch.nn.Module, state: dict, strict: bool = True) -> None:
    """Weights first, then eval(): official U-DiT merges its re-parameterised FFN into the loaded weights in
    place when it leaves training mode (udit.md), so eval() must follow every load, once, as in its
    sample_ddp.py."""
    model.load_state_dict(state, strict=strict)
    model.eval()


FORWARD_TOLERANCE = 1e-4  # relative to the output's scale: fp32 kernels differ in summation order, not more


@torch.no_grad()
def forward_difference(ours: torch.nn.Module, twin: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       seed: int = 0) -> float:
    """Largest |ours - official| of one forward in full fp32 (TF32 off), relative to the output's scale.

    Both get the same random probe weights for it, then their own weights back: the official init zeroes
    the adaLN and output layers, so a forward of the timed (initialised) weights is 0 in both and proves
    nothing.
    """
    from bench.speed import backend_flags, set_precision

    saved = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    probe = {k: (torch.randn(v.shape, generator=generator) * 0.05).to(v) if v.is_floating_point() else v
             for k, v in saved.items()}
    t = torch.full((len(x),), 500, dtype=torch.long, device=x.device)
    try:
        ours.load_state_dict(probe)
        _load_then_eval(twin, probe)
        with backend_flags():
            set_precision("fp32")
            a, b = ours(x, t, y).float(), twin(x, t, y).float()
    finally:
        ours.load_state_dict(saved)
        _load_then_eval(twin, saved)
    return ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
