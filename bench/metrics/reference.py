"""ADM ``.npz`` image batches: strict checks, streamed reading, precomputed statistics, feature cache.

The format (dit.md E.1): images in ``arr_0``, uint8, N x H x W x 3. A reference batch may also carry
``mu``/``sigma`` (pool features) and ``mu_s``/``sigma_s`` (spatial features); the evaluator then takes
FID/sFID statistics from the file and uses its images only for precision/recall. Images are streamed
from the zip member in batches, so a 50k x 512 x 512 batch (39 GB) never has to fit in memory.

Features of a file are cached beside it as ``<file>.<backend>-<sha256[:16]>.features.npz``, keyed by
the file's hash and the backend, and checked against the network's hash before use.
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from bench.errors import UserError
from bench.atomic import atomic_open
from bench.metrics.backends import Features, sha256_file

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
CACHE_FORMAT = 1


class BatchFileError(UserError):
    """A file that is not an ADM image batch (.npz with uint8 N x H x W x 3 images in arr_0)."""


@dataclass
class ImageBatch:
    """An opened and checked ADM .npz: its image array's header, its keys, its hash on demand."""

    path: Path
    shape: tuple[int, int, int, int]
    keys: tuple[str, ...]
    _sha256: str | None = field(default=None, repr=False)

    @property
    def num_images(self) -> int:
        return self.shape[0]

    @property
    def resolution(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 N x H x W x 3 batches of ``batch_size`` (the last one shorter), in file order."""
        with _open_member(self.path) as member:
            version = np.lib.format.read_magic(member)
            _, fortran, dtype = _read_header(member, version)
            if fortran:  # rare (not what np.savez writes for NHWC); read it whole, then slice
                images = np.load(self.path, allow_pickle=False)[IMAGES_KEY]
                for start in range(0, len(images), batch_size):
                    yield np.ascontiguousarray(images[start:start + batch_size])
                return
            per_image = int(np.prod(self.shape[1:])) * dtype.itemsize
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                data = _read_exact(member, count * per_image, self.path)
                yield np.frombuffer(data, dtype=dtype).reshape((count, *self.shape[1:]))

    def statistics(self) -> dict[str, np.ndarray] | None:
        """The precomputed mu/sigma/mu_s/sigma_s, or None if the file carries no ``mu``."""
        if "mu" not in self.keys:
            return None
        missing = [k for k in STAT_KEYS if k not in self.keys]
        if missing:
            raise BatchFileError(f"{self.path} has 'mu' but lacks {', '.join(missing)}; an ADM reference batch "
                                 f"carries all of {', '.join(STAT_KEYS)}")
        with np.load(self.path, allow_pickle=False) as npz:
            return {k: npz[k] for k in STAT_KEYS}


@contextlib.contextmanager
def _open_member(path: Path):
    with zipfile.ZipFile(path) as zf, zf.open(f"{IMAGES_KEY}.npy") as member:
        yield member


def _read_header(member, version):
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    # Versions 2.0 and 3.0 share the 4-byte header length; 3.0 only allows utf8 in field names.
    return np.lib.format.read_array_header_2_0(member)


def _read_exact(member, size: int, path: Path) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = member.read(size - got)
        if not chunk:
            raise BatchFileError(f"{path}: arr_0 ends early ({got} of {size} bytes of a batch); the file is "
                                 f"truncated, write it again")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def open_batch(path: str | os.PathLike, role: str = "samples") -> ImageBatch:
    """Open an ADM .npz and check it strictly; every problem is one BatchFileError line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BatchFileError(f"{role} file {path} " + ("is not a file" if path.exists() else "does not exist"))
    if not zipfile.is_zipfile(path):
        raise BatchFileError(f"{role} file {path} is not an .npz (a zip of .npy arrays, as np.savez writes)")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise BatchFileError(f"{role} file {path} is not a readable .npz: {exc}") from None
    keys = tuple(n[:-4] for n in names if n.endswith(".npy"))
    if IMAGES_KEY not in keys:
        raise BatchFileError(f"{role} file {path} has no '{IMAGES_KEY}' array (keys: {', '.join(keys) or 'none'}); "
                             f"ADM batches store the images as arr_0 (np.savez(path, images))")
    try:
        with _open_member(path) as member:
            version = np.lib.format.read_magic(member)
            shape, _, dtype = _read_header(member, version)
    except ValueError as exc:
        raise BatchFileError(f"{role} file {path}: arr_0 is not a numpy array ({exc})") from None
    if dtype != np.uint8:
        raise BatchFileError(f"{role} file {path}: arr_0 is {dtype}, but ADM batches are uint8 images in 0..255 "
                             f"(convert with np.clip(x, 0, 255).astype(np.uint8))")
    if len(shape) != 4 or shape[3] != 3:
        hint = " (it looks like N x 3 x H x W: transpose to N x H x W x 3)" if len(shape) == 4 and shape[1] == 3 else ""
        raise BatchFileError(f"{role} file {path}: arr_0 has shape {tuple(shape)}, but must be N x H x W x 3 "
                             f"RGB images{hint}")
    if shape[0] == 0:
        raise BatchFileError(f"{role} file {path}: arr_0 holds no images")
    return ImageBatch(path, tuple(int(s) for s in shape), keys)


# -- feature cache ------------------------------------------------------------------------------------

def cache_path(batch: ImageBatch, backend_name: str) -> Path:
    return batch.path.with_name(f"{batch.path.name}.{backend_name}-{batch.sha256[:16]}.features.npz")


def load_cached(batch: ImageBatch, backend_name: str, network_sha256: str) -> Features | None:
    """Cached features of ``batch`` by this backend and network, or None (absent, stale or unreadable)."""
    path = cache_path(batch, backend_name)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            if (meta.get("format") != CACHE_FORMAT or meta.get("file_sha256") != batch.sha256
                    or meta.get("backend") != backend_name or meta.get("network_sha256") != network_sha256):
                return None
            feats = Features(npz["pool"], npz["spatial"] if "spatial" in npz else None,
                             npz["softmax"] if "softmax" in npz else None)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None  # a damaged cache is recomputed, never trusted
    return feats if len(feats) == batch.num_images else None


def save_cached(batch: ImageBatch, backend_name: str, network_sha256: str, feats: Features) -> Path:
    """Write the cache atomically (temp file in the same folder, then rename). Raises OSError."""
    path = cache_path(batch, backend_name)
    meta = {"format": CACHE_FORMAT, "backend": backend_name, "network_sha256": network_sha256,
            "file_sha256": batch.sha256, "num_images": batch.num_images}
    arrays = {"pool": feats.pool, "meta": np.array(json.dumps(meta))}
    if feats.spatial is not None:
        arrays["spatial"] = feats.spatial
    if feats.softmax is not None:
        arrays["softmax"] = feats.softmax
    with atomic_open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path
