"""Feature backends: one interface, a registry by name (torch-fidelity style).

A backend turns uint8 NHWC images into the three things the ADM metrics read: ``pool`` features
(FID, IS, precision/recall), ``spatial`` features (sFID) and, from ``pool``, the class ``softmax``
(IS). Metrics ask the registry for a name and never import a backend class, so another module (a
proxy network, a different port) joins with ``register_backend(name, factory)``.

Built-ins: ``adm-tf`` (the evaluator's own TF graph, the reference) and ``torch`` (a PyTorch port of
the same weights, fast on a GPU). Both are registered as import paths so that naming one never
imports TensorFlow or torch for the other.
"""
from __future__ import annotations

import hashlib
import importlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bench.errors import UserError


class BackendError(UserError):
    """An unknown backend name, or a feature network that cannot be loaded."""


@dataclass
class Features:
    """Features of a set of images; ``spatial``/``softmax`` are None when a backend has no such layer."""

    pool: np.ndarray  # (N, D) float32, FID / precision / recall
    spatial: np.ndarray | None = None  # (N, D_s) float32, sFID
    softmax: np.ndarray | None = None  # (N, classes) float32, IS

    def __len__(self) -> int:
        return len(self.pool)

    def head(self, n: int) -> "Features":
        cut = lambda a: None if a is None else a[:n]  # noqa: E731
        return Features(self.pool[:n], cut(self.spatial), cut(self.softmax))


class FeatureBackend(ABC):
    """A feature network. Loading is lazy: the weights' hash (for caches) costs no network load."""

    name: str = ""
    default_batch_size: int = 64
    # True for Inception-v3 (2015) feature spaces, in which an ADM reference batch's precomputed
    # mu/sigma are valid; a proxy network must fit its reference statistics from the images.
    inception_space: bool = False
    proxy: bool = False  # a stand-in network: its numbers are never compared with papers'

    def __init__(self, weights: str | os.PathLike | None = None, *, device: str | None = None,
                 batch_size: int | None = None):
        self.weights_arg = weights
        self.device = device
        self.batch_size = int(batch_size or self.default_batch_size)
        if self.batch_size < 1:
            raise BackendError(f"batch size must be positive, got {self.batch_size}")
        self._weights_path: Path | None = None
        self._sha256: str | None = None

    # -- the weights file ------------------------------------------------------------------------
    asset_name: str | None = None  # the registry asset used when no weights are given

    @property
    def weights_path(self) -> Path:
        if self._weights_path is None:
            self._weights_path = resolve_weights(self.weights_arg, self.asset_name, self.name)
        return self._weights_path

    @property
    def network_sha256(self) -> str:
        """sha256 of the weights file: what every result and feature cache is keyed by."""
        if self._sha256 is None:
            self._sha256 = sha256_file(self.weights_path)
        return self._sha256

    # -- features ---------------------------------------------------------------------------------
    @abstractmethod
    def image_features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(pool, spatial) of one batch of uint8 N x H x W x 3 images, both (N, D) float32."""

    def softmax(self, pool: np.ndarray) -> np.ndarray | None:
        """Class probabilities from pool features (all of them: the backend batches as it must)."""
        return None

    def close(self) -> None:
        """Free the network (sessions, GPU memory)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resolve_weights(weights, asset_name: str | None, backend: str) -> Path:
    """A path the user gave, else the backend's official asset from the cache (bench.assets)."""
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
    if weights is None and asset_name is None:
        raise BackendError(f"backend '{backend}' has no default weights; pass weights=<path>")
    # Imported here: only a run that needs the official file depends on the asset registry.
    from bench import assets

    path = Path(assets.resolve(os.fspath(weights) if weights is not None else asset_name))
    if not path.is_file():
        raise BackendError(f"feature network weights {path} is not a file")
    return path


_HASHES: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, remembered per (path, size, mtime) for the life of the process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


# -- the registry --------------------------------------------------------------------------------
# name -> factory, or "module:attribute" resolved on first use (keeps TF and torch unimported).
_REGISTRY: dict[str, Callable[..., FeatureBackend] | str] = {
    "adm-tf": "bench.metrics.adm_tf:AdmTFBackend",
    "torch": "bench.metrics.torch_inception:TorchInceptionBackend",
    "proxy": "bench.proxy:ProxyBackend",  # the embedded default's digits classifier
}


def register_backend(name: str, factory: Callable[..., FeatureBackend] | str, *, replace: bool = False) -> None:
    """Make ``factory(weights=..., device=..., batch_size=...)`` available as backend ``name``."""
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"backend name {name!r} must be non-empty, without slashes or spaces")
    if name in _REGISTRY and not replace:
        raise ValueError(f"feature backend '{name}' is already registered (pass replace=True)")
    _REGISTRY[name] = factory


def backend_names() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str, **kwargs) -> FeatureBackend:
    """Instantiate the backend registered as ``name`` (weights are resolved lazily)."""
    if name not in _REGISTRY:
        raise BackendError(f"unknown feature backend '{name}'; known: {', '.join(_REGISTRY)}")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, attr = factory.split(":")
        factory = getattr(importlib.import_module(module), attr)
    return factory(**kwargs)
