"""Official assets (checkpoints, VAEs, ADM reference batches, Inception weights): addresses, cache, checks.

An asset is fetched once from its official address into the cache (``DIT_BENCH_CACHE``, default
``~/.cache/dit-bench``), checked against its sha256 and never fetched again. None of the official
hosts publishes a sha256 for these files, so the hash of the first complete download is recorded in
a small ledger in the cache (trust on first use) and every later download or ``verify`` is checked
against it. Without a network (``DIT_BENCH_OFFLINE=1``, or a download that cannot connect) a command
that needs a missing asset stops with one line naming the file, its address and where to put it.
Wherever a registry name is accepted, a path to the user's own file is accepted too.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import bench
from bench import atomic
from bench.errors import UserError

LEDGER_NAME = "sha256.json"
CHUNK = 1 << 20
TIMEOUT_S = 30.0  # per socket operation, so a stalled server ends a download instead of hanging it


class AssetMissing(UserError):
    """A needed asset is not in the cache and cannot be downloaded now."""


class DownloadError(UserError):
    """A download was cut short or arrived with the wrong checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of an asset: where it comes from and, if published, what it must hash to."""

    filename: str
    url: str
    sha256: str | None = None  # published hash; None -> recorded in the ledger on first download
    size: int | None = None  # exact bytes, if published


@dataclass(frozen=True)
class Asset:
    """A named official asset: one file (``kind='file'``) or a folder of files (a diffusers model)."""

    name: str
    files: tuple[RemoteFile, ...]
    description: str = ""
    kind: Literal["file", "folder"] = "file"

    def __post_init__(self):
        if self.kind == "file" and len(self.files) != 1:
            raise ValueError(f"file asset {self.name} must have exactly one file")

    @property
    def source(self) -> str:
        if self.kind == "file":
            return self.files[0].url
        return self.files[0].url.rsplit("/", 1)[0] + "/"  # the folder the files are served from

    def path(self) -> Path:
        """Where the asset lives in the cache: the file itself, or the folder holding its files."""
        return cache_dir() / (self.files[0].filename if self.kind == "file" else self.name)

    def file_path(self, f: RemoteFile) -> Path:
        return self.path() if self.kind == "file" else self.path() / f.filename


_DIT = "https://dl.fbaipublicfiles.com/DiT/models/"  # dit.md A.4
_ADM = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"  # dit.md E.1/E.2
_HF = "https://huggingface.co/stabilityai/{repo}/resolve/main/"  # dit.md B.6
# The diffusers layout of an AutoencoderKL: AutoencoderKL.from_pretrained(<folder>) reads these two.
_VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def _file(name: str, url: str, description: str) -> Asset:
    return Asset(name, (RemoteFile(url.rsplit("/", 1)[1], url),), description)


def _vae(repo: str, description: str) -> Asset:
    base = _HF.format(repo=repo)
    return Asset(repo, tuple(RemoteFile(f, base + f) for f in _VAE_FILES), description, kind="folder")


# The registry is a plain dict by name; ``register`` adds to it (tests point assets at a local server).
REGISTRY: dict[str, Asset] = {
    a.name: a
    for a in (
        _file("DiT-XL-2-256", _DIT + "DiT-XL-2-256x256.pt", "DiT-XL/2 state dict, 256x256 (ImageNet)"),
        _file("DiT-XL-2-512", _DIT + "DiT-XL-2-512x512.pt", "DiT-XL/2 state dict, 512x512 (ImageNet)"),
        _vae("sd-vae-ft-ema", "Stable Diffusion VAE, ft-EMA decoder (DiT sample_ddp.py default)"),
        _vae("sd-vae-ft-mse", "Stable Diffusion VAE, ft-MSE decoder (DiT sample.py default)"),
        _file("adm-ref-imagenet64", _ADM + "imagenet/64/VIRTUAL_imagenet64_labeled.npz",
              "ADM reference batch, ImageNet 64"),
        _file("adm-ref-imagenet128", _ADM + "imagenet/128/VIRTUAL_imagenet128_labeled.npz",
              "ADM reference batch, ImageNet 128"),
        _file("adm-ref-imagenet256", _ADM + "imagenet/256/VIRTUAL_imagenet256_labeled.npz",
              "ADM reference batch, ImageNet 256 (FID/sFID stats + 10k images)"),
        _file("adm-ref-imagenet512", _ADM + "imagenet/512/VIRTUAL_imagenet512.npz",
              "ADM reference batch, ImageNet 512 (FID/sFID stats + 10k images)"),
        _file("adm-inception-graph", _ADM + "classify_image_graph_def.pb",
              "Inception-v3 frozen TF graph of the ADM evaluator (~100 MB)"),
        _file("pt-inception-fid",
              "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
              "pt_inception-2015-12-05-6726825d.pth",
              "Inception-v3 FID weights ported to PyTorch (pytorch-fid)"),
    )
}


def register(asset: Asset) -> Asset:
    """Add (or replace) an asset in the registry, e.g. a mirror or a test asset."""
    REGISTRY[asset.name] = asset
    return asset


def get(name: str) -> Asset:
    """The registered asset called ``name``, also found by its official filename."""
    if name in REGISTRY:
        return REGISTRY[name]
    for asset in REGISTRY.values():
        if asset.kind == "file" and asset.files[0].filename == name:
            return asset
    raise UserError(f"unknown asset '{name}'; known assets: {', '.join(REGISTRY)} (or give a path to a file)")


def cache_dir() -> Path:
    return Path(os.environ.get("DIT_BENCH_CACHE") or Path.home() / ".cache" / "dit-bench").expanduser()


def offline() -> bool:
    return os.environ.get("DIT_BENCH_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------------
# Ledger of sha256 recorded on first download, keyed by the path relative to the cache.


def _ledger_path() -> Path:
    return cache_dir() / LEDGER_NAME


def _ledger_key(path: Path) -> str:
    return path.relative_to(cache_dir()).as_posix()


def read_ledger() -> dict:
    try:
        return json.loads(_ledger_path().read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"asset ledger {_ledger_path()} is corrupt ({exc}); "
                        f"delete it to record hashes anew") from exc


def _record(path: Path, url: str, sha256: str, size: int) -> None:
    # Re-read under a lock so two processes recording different files do not drop each other's entry.
    with _locked(_ledger_path()):
        ledger = read_ledger()
        ledger[_ledger_key(path)] = {"sha256": sha256, "size": size, "url": url}
        _write_atomic(_ledger_path(), json.dumps(ledger, indent=1, sort_keys=True).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    atomic.write_bytes(path, data)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock next to ``path``: ranks of one torchrun must not download twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent fetches of one file are the user's care
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def expected_sha256(asset: Asset, f: RemoteFile) -> str | None:
    """The published hash, else the one recorded on first download, else None (never downloaded)."""
    if f.sha256:
        return f.sha256
    entry = read_ledger().get(_ledger_key(asset.file_path(f)))
    return entry["sha256"] if entry else None


def sha256_of(path: Path) -> str:
    return _hash_file(path, hashlib.sha256()).hexdigest()


def _hash_file(path: Path, h):
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h


# ---------------------------------------------------------------------------------------------------
# Resolution: a registry name or a user's own path -> a local path.


def _missing(asset: Asset, f: RemoteFile, why: str) -> AssetMissing:
    dest = asset.file_path(f)
    return AssetMissing(f"asset '{asset.name}' needs {f.filename}, which is not in the cache and {why}; "
                        f"download {f.url} and put it at {dest}")


def _is_registered(name: str) -> bool:
    try:
        get(name)
        return True
    except UserError:
        return False


def resolve(name_or_path: str | os.PathLike, *, download: bool = True, progress: bool = True) -> Path:
    """The local path of a registry asset (fetched if allowed and needed) or of the user's own file.

    A registry name wins over a file of the same name in the working directory, except that an
    official filename (``DiT-XL-2-256x256.pt``) that exists locally is taken as the user's file.
    """
    text = os.fspath(name_or_path)
    if text in REGISTRY:
        return _resolve_asset(REGISTRY[text], download=download, progress=progress)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if _is_registered(text):
        return _resolve_asset(get(text), download=download, progress=progress)
    raise UserError(f"no such file: {path} (and '{text}' is not a registered asset: "
                    f"see `dit-bench assets list`)")


def _resolve_asset(asset: Asset, *, download: bool, progress: bool) -> Path:
    for f in asset.files:
        dest = asset.file_path(f)
        if dest.exists():
            _check_size(asset, f, dest)
            continue
        if not download:
            raise _missing(asset, f, f"downloads are off here (run `dit-bench assets fetch {asset.name}`)")
        if offline():
            raise _missing(asset, f, "DIT_BENCH_OFFLINE=1 forbids downloading it")
        fetch(asset.name, progress=progress)
        break
    return asset.path()


def _check_size(asset: Asset, f: RemoteFile, dest: Path) -> None:
    # A cheap check on every use (hashing a 2.7 GB checkpoint each time is not): `verify` hashes.
    entry = read_ledger().get(_ledger_key(dest))
    want = f.size or (entry or {}).get("size")
    have = dest.stat().st_size
    if want is not None and have != want:
        raise UserError(f"{dest} has {have} bytes but asset '{asset.name}' should have {want}; "
                        f"run `dit-bench assets fetch {asset.name} --force` to download it again")


# ---------------------------------------------------------------------------------------------------
# Download: streamed to <file>.part, resumed with an HTTP Range request, hashed before installing.


def fetch(name: str, *, progress: bool = True, force: bool = False, timeout: float = TIMEOUT_S) -> Path:
    """Download every missing file of an asset into the cache and return the asset's path."""
    asset = get(name)
    for f in asset.files:
        dest = asset.file_path(f)
        with _locked(dest):
            if dest.exists() and not force:
                continue  # another process (or an earlier call) already installed it
            if offline():
                raise _missing(asset, f, "DIT_BENCH_OFFLINE=1 forbids downloading it")
            _download(asset, f, dest, progress=progress, timeout=timeout)
    return asset.path()


def _download(asset: Asset, f: RemoteFile, dest: Path, *, progress: bool, timeout: float,
              restarted: bool = False) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"dit-bench/{bench.__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(f.url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is not a prefix the server knows: start over
            part.unlink()
            return _download(asset, f, dest, progress=progress, timeout=timeout, restarted=True)
        raise _missing(asset, f, f"the download failed (HTTP {exc.code} {exc.reason})") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _missing(asset, f, f"the download failed ({reason})") from exc

    with resp:
        h = hashlib.sha256()
        if resp.status == 206:
            if not have or _range_start(resp) != have:  # not the bytes we asked for: start over, once
                if restarted or not have:
                    raise DownloadError(f"{f.url} answered with a byte range that was not asked for "
                                        f"({resp.headers.get('Content-Range')}); try again later")
                part.unlink()
                resp.close()
                return _download(asset, f, dest, progress=progress, timeout=timeout, restarted=True)
            _hash_file(part, h)  # the hash covers the whole file, resumed bytes included
            mode = "ab"
        else:  # a server that ignores Range answers 200 with the whole file
            have, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else f.size
        got = have
        with _progress_bar(progress, f.filename, total, got) as advance, open(part, mode) as out:
            try:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    h.update(block)
                    got += len(block)
                    advance(len(block))
            except (OSError, ValueError, http.client.HTTPException) as exc:  # timeouts, resets, bad chunks
                raise _interrupted(asset, f, part, got, total, exc) from exc
    # http.client returns b"" (no exception) when the peer closes early: compare with Content-Length.
    if total is not None and got != total:
        raise _interrupted(asset, f, part, got, total, "connection closed")

    digest = h.hexdigest()
    want = expected_sha256(asset, f)
    if want is not None and digest != want:
        part.unlink()
        raise DownloadError(f"sha256 mismatch for {f.filename} from {f.url}: expected {want}, got {digest}; "
                            f"the download was removed and nothing was installed")
    os.replace(part, dest)
    _record(dest, f.url, digest, got)


def _range_start(resp) -> int | None:
    # "Content-Range: bytes 1000-1999/2000": the server must resume exactly where the .part ends.
    value = resp.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _interrupted(asset: Asset, f: RemoteFile, part: Path, got: int, total: int | None, why) -> DownloadError:
    of = f" of {total}" if total is not None else ""
    return DownloadError(f"download of {f.filename} from {f.url} stopped after {got}{of} bytes ({why}); "
                         f"the partial file {part} is kept: run `dit-bench assets fetch {asset.name}` to resume")


@contextlib.contextmanager
def _progress_bar(enabled: bool, label: str, total: int | None, done: int):
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=total, completed=done)
        yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------------------------------------------
# Inspection: what is in the cache, and does it still hash to what was downloaded.


@dataclass(frozen=True)
class FileCheck:
    asset: str
    path: Path
    status: Literal["ok", "recorded", "mismatch", "missing"]
    detail: str = ""


def verify(name: str) -> list[FileCheck]:
    """Hash every file of an asset against its published or recorded sha256.

    A file placed by hand (no download, so no record) has nothing to be checked against: its hash
    is recorded now, as a first download would have done, and reported as ``recorded``.
    """
    asset = get(name)
    checks = []
    for f in asset.files:
        dest = asset.file_path(f)
        if not dest.exists():
            checks.append(FileCheck(asset.name, dest, "missing", f"from {f.url}"))
            continue
        digest = sha256_of(dest)
        want = expected_sha256(asset, f)
        if want is None:
            _record(dest, f.url, digest, dest.stat().st_size)
            checks.append(FileCheck(asset.name, dest, "recorded", digest))
        elif digest == want:
            checks.append(FileCheck(asset.name, dest, "ok", digest))
        else:
            checks.append(FileCheck(asset.name, dest, "mismatch", f"expected {want}, got {digest}"))
    return checks


def status(asset: Asset) -> str:
    """'present', 'partial' (some files or a .part download), or 'missing'."""
    paths = [asset.file_path(f) for f in asset.files]
    present = [p.exists() for p in paths]
    if all(present):
        return "present"
    if any(present) or any(p.with_name(p.name + ".part").exists() for p in paths):
        return "partial"
    return "missing"


def list_assets() -> list[dict]:
    """One row per registered asset, for `dit-bench assets list`."""
    rows = []
    for asset in REGISTRY.values():
        paths = [asset.file_path(f) for f in asset.files]
        size = sum(p.stat().st_size for p in paths if p.exists())
        rows.append({"name": asset.name, "kind": asset.kind, "status": status(asset), "size": size,
                     "path": asset.path(), "source": asset.source, "description": asset.description})
    return rows
