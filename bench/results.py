"""The result record: one JSON schema for every command, with its protocol card and environment.

A record says what was measured (``subject``), under which protocol, the numbers (``metrics``, each
name carrying its unit), the same-run baseline where a ratio is claimed, and the environment that
produced it. Everything downstream (compare, report) reads only this.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.errors import UserError
from bench.atomic import atomic_open

SCHEMA_VERSION = 1
KINDS = ("quality", "speed", "train", "sample", "reproduce", "flops")

# Canonical metric names; the unit is part of the name so MACs and FLOPs can never be mixed up.
METRIC_UNITS = {
    "fid": "", "sfid": "", "inception_score": "", "precision": "", "recall": "",
    "s_per_image": "s", "images_per_s": "1/s", "latency_s": "s", "steps_per_s": "1/s",
    "peak_memory_mb": "MB", "reserved_memory_mb": "MB", "params": "", "trainable_params": "",
    "gmacs": "GMAC", "gflops": "GFLOP", "mfu": "", "joules_per_image": "J", "speedup": "x",
    "speedup_vs_official": "x",
}


class ResultError(UserError):
    """A result file that is not a dit-bench result record."""


def make_record(kind: str, subject: dict, protocol: dict, metrics: dict, *, baseline: dict | None = None,
                proxy: bool = False, warnings: list[str] | None = None, extra: dict | None = None,
                environment: dict | None = None) -> dict:
    record = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "proxy": proxy,
        "subject": subject,
        "protocol": protocol,
        "metrics": metrics,
        "baseline": baseline,
        "warnings": list(warnings or []),
        "environment": environment if environment is not None else capture_environment(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record["extra"] = extra
    validate(record)
    return record


def validate(record: Any, source: str = "result") -> dict:
    """Raise ResultError with one line naming the first problem."""
    if not isinstance(record, dict):
        raise ResultError(f"{source}: a result record is a JSON object")
    for key, kind in (("schema_version", int), ("kind", str), ("subject", dict), ("protocol", dict),
                      ("metrics", dict), ("environment", dict)):
        if not isinstance(record.get(key), kind):
            raise ResultError(f"{source}: field {key!r} is missing or not a {kind.__name__}")
    if record["schema_version"] != SCHEMA_VERSION:
        raise ResultError(f"{source}: schema_version {record['schema_version']} is not {SCHEMA_VERSION}")
    if record["kind"] not in KINDS:
        raise ResultError(f"{source}: kind {record['kind']!r} is not one of {', '.join(KINDS)}")
    for name, value in record["metrics"].items():
        if value is not None and not isinstance(value, (int, float)):
            raise ResultError(f"{source}: metric {name!r} is not a number")
    baseline = record.get("baseline")
    if baseline is not None and not (isinstance(baseline, dict) and isinstance(baseline.get("metrics"), dict)):
        raise ResultError(f"{source}: 'baseline' must hold a 'metrics' object")
    return record


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON so a reader never sees a half-written file (temp file in the same dir, then rename)."""
    path = Path(path)
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default)
        fh.write("\n")
    return path


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save(record: dict, path: str | os.PathLike) -> Path:
    validate(record)
    return write_json_atomic(path, record)


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultError(f"{path}: no such result file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultError(f"{path}: not valid JSON ({exc})") from None
    return validate(record, str(path))


def _git_commit() -> str | None:
    """The checkout's commit; a copy without .git (a wheel, a machine the tree was copied to) may name it in
    DIT_BENCH_GIT_COMMIT."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DIT_BENCH_GIT_COMMIT") or None


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def capture_environment() -> dict:
    """The fingerprint every record carries: software versions, device, and the dit-bench commit."""
    import torch

    import bench

    env = {
        "dit_bench": bench.__version__,
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": _version("diffusers"),
        "numpy": _version("numpy"),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": None,
        "gpu_count": 0,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # NVML is optional; the record says so by leaving the field absent
            pass
    return env
