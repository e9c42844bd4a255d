"""The plug-in host: what a method may contribute, and how methods are found.

A method contributes any of three things (design.md): named model architectures, train hooks and
sample hooks. Methods announce themselves through the ``dit_bench.methods`` entry-point group, as a
third-party plug-in would; the built-in ones in ``methods/`` use the same group (pyproject.toml). When
the project runs from a checkout that was never installed, the ``methods`` package is scanned instead,
so nothing is lost. The harness core only ever asks this registry; it never imports a method by name.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from bench.errors import UserError

ENTRY_POINT_GROUP = "dit_bench.methods"


class PluginError(UserError):
    """A method, model or hook name that does not exist, or a combination that cannot run."""


@dataclass(frozen=True)
class ModelSpec:
    """One named architecture, e.g. ``DiT-XL/2``, built through its official constructor arguments."""

    name: str
    builder: Callable[..., Any]  # the official class (or factory), called with official kwargs
    config: dict  # the fixed architecture arguments of this name (depth, hidden_size, ...)
    family: str  # "DiT", "EDT", "U-DiT": which official class the weights belong to
    default_input_size: int = 32  # latent side at 256 px
    macs: Callable[[dict], int] | None = None  # analytic multiply-accumulates of one forward, batch 1
    # Optional: map an official checkpoint's state dict onto this builder (renames, layout
    # inference). Returns the state dict to load and constructor overrides.
    adapt_state_dict: Callable[[dict], tuple[dict, dict]] | None = None
    description: str = ""
    # Official released weights by image size, as bench/assets names (e.g. {256: "DiT-XL-2-256"}).
    checkpoints: dict = field(default_factory=dict)
    # Where the architecture lives in its official repository, as "module:attribute" inside a checkout:
    # {"model": "models:DiT", "diffusion": "diffusion:create_diffusion"} (bench/official.py imports them
    # for `dit-bench speed --official-code DIR`). The model class takes this spec's constructor kwargs.
    official_code: dict = field(default_factory=dict)

    def kwargs(self, **overrides) -> dict:
        kw = dict(self.config)
        kw.setdefault("input_size", self.default_input_size)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return kw

    def build(self, **overrides):
        return self.builder(**self.kwargs(**overrides))


@dataclass(frozen=True)
class Method:
    """A plug-in: a paper's contribution expressed as models and/or hooks."""

    name: str
    title: str
    paper: str = ""
    models: tuple[ModelSpec, ...] = ()
    # Hook factories by name. What a hook object offers is defined by the code that calls it
    # (bench/training.py for train hooks, bench/sampling.py for sample hooks).
    train_hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)
    sample_hooks: dict[str, Callable[..., Any]] = field(default_factory=dict)
    # Model families a hook can act on; empty means any.
    compatible_families: tuple[str, ...] = ()
    # How `dit-bench reproduce` re-runs this paper, by preset ("paper", "tiny"): plain data that
    # bench/reproduce.py reads (model, checkpoint, hooks, protocol, speed settings), so the harness
    # core never names a method.
    recipes: dict = field(default_factory=dict)

    def contributes(self) -> list[str]:
        parts = []
        if self.models:
            parts.append(f"{len(self.models)} models")
        if self.train_hooks:
            parts.append("train: " + ", ".join(self.train_hooks))
        if self.sample_hooks:
            parts.append("sample: " + ", ".join(self.sample_hooks))
        return parts


def _from_entry_points() -> list[Method]:
    found = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        found.append(obj() if callable(obj) and not isinstance(obj, Method) else obj)
    return found


def _from_package(package: str = "methods") -> list[Method]:
    try:
        pkg = importlib.import_module(package)
    except ImportError:
        return []
    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found.append(method)
    return found


_cache: dict[str, Method] | None = None


def methods(refresh: bool = False) -> dict[str, Method]:
    """All installed methods by name (entry points first; the in-tree package fills the gaps)."""
    global _cache
    if _cache is None or refresh:
        registry: dict[str, Method] = {}
        for method in _from_entry_points() + _from_package():
            registry.setdefault(method.name, method)
        _cache = dict(sorted(registry.items()))
    return _cache


def register(method: Method) -> Method:
    """Add a method at run time (notebooks, tests, scripts); installed plug-ins use the entry points."""
    registry = methods()
    if method.name in registry and registry[method.name] is not method:
        raise PluginError(f"a method called {method.name!r} is already installed")
    registry[method.name] = method
    return method


def get_method(name: str) -> Method:
    registry = methods()
    if name not in registry:
        raise PluginError(f"unknown method {name!r}; installed: {', '.join(registry) or 'none'}")
    return registry[name]


def models() -> dict[str, ModelSpec]:
    """Every registered architecture by name, across methods."""
    out: dict[str, ModelSpec] = {}
    for method in methods().values():
        for spec in method.models:
            if spec.name in out:
                raise PluginError(f"model name {spec.name!r} is registered twice")
            out[spec.name] = spec
    return out


def get_model(name: str) -> ModelSpec:
    registry = models()
    if name not in registry:
        raise PluginError(f"unknown model {name!r}; run `dit-bench models` for the list")
    return registry[name]


def _hooks(kind: str) -> dict[str, tuple[Method, Callable[..., Any]]]:
    out: dict[str, tuple[Method, Callable[..., Any]]] = {}
    for method in methods().values():
        for name, factory in getattr(method, kind).items():
            if name in out:
                raise PluginError(f"{kind[:-1].replace('_', ' ')} {name!r} is registered twice")
            out[name] = (method, factory)
    return out


def get_hook(kind: str, name: str, family: str | None = None) -> Callable[..., Any]:
    """The factory of a train or sample hook, refusing it for a model family it cannot act on."""
    if kind not in ("train_hooks", "sample_hooks"):
        raise ValueError(kind)
    registry = _hooks(kind)
    if name not in registry:
        label = "train" if kind == "train_hooks" else "sample"
        raise PluginError(f"unknown {label} hook {name!r}; installed: {', '.join(registry) or 'none'}")
    method, factory = registry[name]
    # A hook may narrow its method's families with a ``families`` attribute on its factory.
    families = getattr(factory, "families", None) or method.compatible_families
    if family and families and family not in families:
        raise PluginError(f"{name!r} cannot run on a {family} model: it needs one of "
                          f"{', '.join(families)} ({method.title})")
    return factory
