"""The papers' published numbers as data: loading, schema validation, lookup and derived ratios.

``reference_results/`` holds one YAML file per source (a paper version, a repository file at a commit, a
model card). Each row is one number with what it was measured under (``protocol``) and where it is printed
(``provenance``); ``reference_results/schema.yaml`` is the JSON Schema every file and every row must meet.
What a schema cannot say is checked here: each metric's unit (MACs are ``GMAC``, FLOPs ``GFLOP``), unique
ids, links between rows, and that an ideal bound equals its own derivation.

Rows come back as plain dicts with ``uid`` = ``"<source>:<id>"``, ``source``, ``quantum`` (the unit of the
last published digit, read from the YAML text so "10.20" keeps its 0.01) and ``irrelevant`` (the protocol
keys the number does not depend on: the row's own list plus the defaults of its kind and metric).
"""
from __future__ import annotations

import copy
import functools
import os
import re
import site
import sysconfig
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable

import yaml

import bench
from bench.errors import UserError
from bench.results import METRIC_UNITS

ENV_DIR = "DIT_BENCH_REFERENCE_RESULTS"
SCHEMA_FILE = "schema.yaml"

# Published metrics the result record has no name for: claims about ratios and relative savings.
UNITS = {**METRIC_UNITS, "train_speedup": "x", "convergence_speedup": "x", "time_reduction": "%",
         "memory_reduction": "%"}

PROTOCOL_KEYS = ("sampler", "steps", "cfg_scale", "num_samples", "evaluator", "precision", "batch_size",
                 "global_batch_size", "gpu", "num_gpus", "key_steps", "training_steps", "vae", "framework",
                 "seed", "amm")

QUALITY_METRICS = frozenset({"fid", "sfid", "inception_score", "precision", "recall"})
TIME_METRICS = frozenset({"s_per_image", "latency_s"})          # lower is faster
RATE_METRICS = frozenset({"steps_per_s", "images_per_s"})        # higher is faster
RATIO_METRICS = frozenset({"speedup", "train_speedup"})
SIZE_METRICS = frozenset({"params", "trainable_params", "gmacs", "gflops"})

# What a number does not depend on, by what it measures. Quality does not depend on the GPU or the
# sampling batch (per-sample seeding); a ratio measured in one run does not depend on the device; a
# parameter or MAC count depends on nothing but the model and the resolution.
_QUALITY_IRRELEVANT = {"gpu", "num_gpus", "batch_size", "seed"}
_SPEED_IRRELEVANT = {"num_samples", "evaluator", "training_steps", "global_batch_size", "seed", "vae"}
_SPEED_RATIO_IRRELEVANT = {"gpu", "num_gpus", "num_samples", "evaluator", "precision", "batch_size",
                           "global_batch_size", "cfg_scale", "training_steps", "vae", "seed", "framework"}
_TRAIN_IRRELEVANT = {"sampler", "steps", "cfg_scale", "num_samples", "evaluator", "key_steps",
                     "training_steps", "seed", "batch_size", "amm"}
_TRAIN_RATIO_IRRELEVANT = _TRAIN_IRRELEVANT | {"gpu", "precision"}
_CONVERGENCE_IRRELEVANT = {"gpu", "num_gpus", "batch_size", "precision", "seed", "training_steps",
                           "key_steps", "amm", "framework"}


def default_irrelevant(kind: str, metric: str) -> set[str]:
    if kind == "flops" or metric in SIZE_METRICS:
        return set(PROTOCOL_KEYS)
    if kind == "quality":
        return set(_QUALITY_IRRELEVANT)
    if metric == "convergence_speedup":
        return set(_CONVERGENCE_IRRELEVANT)
    if kind == "train":
        return set(_TRAIN_RATIO_IRRELEVANT if metric in ("train_speedup", "memory_reduction") else _TRAIN_IRRELEVANT)
    return set(_SPEED_RATIO_IRRELEVANT if metric in ("speedup", "time_reduction") else _SPEED_IRRELEVANT)


class ReferenceError(UserError):
    """A reference_results file that does not meet the schema, or a lookup that does not resolve."""


def norm(name: Any) -> str:
    """Names compared without case and punctuation: "DiT-XL/2" == "dit_xl_2", "FasterDiffusion" == "faster-diffusion"."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower()) if name is not None else ""


# ---------------------------------------------------------------------------------------------------
# Where the data lives

def reference_dir() -> Path:
    """reference_results/: $DIT_BENCH_REFERENCE_RESULTS, else the checkout next to bench/, else the
    data-files copy a wheel installs under <prefix>/share/dit-bench/reference_results."""
    override = os.environ.get(ENV_DIR)
    if override:
        path = Path(override).expanduser()
        if not path.is_dir():
            raise ReferenceError(f"{ENV_DIR}={override} is not a directory; point it at a reference_results/ folder")
        return path
    candidates = [Path(bench.__file__).resolve().parent.parent / "reference_results"]
    for prefix in (sysconfig.get_paths().get("data"), getattr(site, "USER_BASE", None)):
        if prefix:
            candidates.append(Path(prefix) / "share" / "dit-bench" / "reference_results")
    for path in candidates:
        if (path / SCHEMA_FILE).is_file():
            return path
    raise ReferenceError("reference_results/ not found next to the bench package nor under "
                         f"<prefix>/share/dit-bench; reinstall dit-bench or set {ENV_DIR}")


# ---------------------------------------------------------------------------------------------------
# YAML with the published text of every number kept, so "4.60" is known to have two decimals

class _Float(float):
    text: str


class _Int(int):
    text: str


class _Loader(yaml.SafeLoader):
    pass


def _float(loader, node):
    value = _Float(yaml.SafeLoader.construct_yaml_float(loader, node))
    value.text = node.value
    return value


def _int(loader, node):
    value = _Int(yaml.SafeLoader.construct_yaml_int(loader, node))
    value.text = node.value
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _float)
_Loader.add_constructor("tag:yaml.org,2002:int", _int)


def _plain(obj):
    """Drop the text-carrying subclasses (deep), so rows are ordinary JSON-able data."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, _Float):
        return float(obj)
    if isinstance(obj, _Int):
        return int(obj)
    return obj


def _quantum_of(value) -> float | None:
    text = getattr(value, "text", None)
    if text is None:
        return None
    try:
        exponent = Decimal(text.replace("_", "")).as_tuple().exponent
    except InvalidOperation:
        return None
    return float(Decimal(1).scaleb(exponent)) if isinstance(exponent, int) else None


def _read_yaml(path: Path):
    try:
        return yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ReferenceError(f"{path.name}:{where} not valid YAML ({getattr(exc, 'problem', exc)})") from None


@functools.lru_cache(maxsize=8)
def _schema(directory: str) -> dict:
    path = Path(directory) / SCHEMA_FILE
    if not path.is_file():
        raise ReferenceError(f"{path}: schema missing; every reference_results/ folder carries schema.yaml")
    return _plain(_read_yaml(path))


def _validator(schema: dict, ref: str):
    import jsonschema

    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{ref}", "$defs": schema["$defs"]})


def _first_error(validator, instance, where: str) -> None:
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top)"
        described = error.schema.get("description") if isinstance(error.schema, dict) else None
        message = described or error.message
        raise ReferenceError(f"{where}: {path}: {message if len(message) <= 240 else message[:237] + '...'}")


# ---------------------------------------------------------------------------------------------------
# Loading

@dataclass
class ReferenceSet:
    """Every row of every source in one folder, with lookups."""

    directory: Path
    sources: dict[str, dict] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    def row(self, uid: str) -> dict:
        for row in self.rows:
            if row["uid"] == uid:
                return row
        raise ReferenceError(f"no reference row {uid!r}; ids are '<source>:<row id>' (see reference_results/)")

    def find(self, *, source: str | None = None, method: str | None = None, model: str | None = None,
             resolution: int | None = None, metric: str | None = None, role: str | None = None,
             kind: str | None = None, hooks: Iterable[str] | None = None, **protocol) -> list[dict]:
        """Rows equal on every criterion given; protocol criteria compare with the row's protocol."""
        out = []
        for row in self.rows:
            if source is not None and row["source"] != source:
                continue
            if method is not None and norm(row["method"]) != norm(method):
                continue
            if model is not None and norm(row["model"]) != norm(model):
                continue
            if resolution is not None and row["resolution"] != resolution:
                continue
            if metric is not None and row["metric"] != metric:
                continue
            if role is not None and row["role"] != role:
                continue
            if kind is not None and row["kind"] != kind:
                continue
            if hooks is not None and (row["hooks"] is None or {norm(h) for h in row["hooks"]} != {norm(h) for h in hooks}):
                continue
            if any(row["protocol"].get(k) != v for k, v in protocol.items()):
                continue
            out.append(row)
        return out

    def value(self, **criteria) -> float:
        """The one published value matching the criteria (errors when none or several match)."""
        rows = self.find(**criteria)
        if len(rows) != 1:
            found = ", ".join(r["uid"] for r in rows) or "none"
            raise ReferenceError(f"{len(rows)} reference rows match {criteria} ({found}); narrow the lookup")
        return rows[0]["value"]


def load_source(path: Path, schema: dict) -> tuple[dict, list[dict]]:
    """One file: schema-check it, merge its defaults into its rows, schema-check every row."""
    raw = _read_yaml(path)
    _first_error(_validator(schema, "file"), _plain(raw), path.name)
    source = _plain(raw["source"])
    defaults = raw.get("defaults") or {}
    row_validator = _validator(schema, "row")
    rows, seen = [], set()
    for i, raw_row in enumerate(raw["rows"]):
        merged = copy.deepcopy(dict(raw_row))
        for key, value in defaults.items():
            if key in ("protocol", "provenance"):
                merged[key] = {**copy.deepcopy(value), **merged.get(key, {})}
            else:
                merged.setdefault(key, copy.deepcopy(value))
        where = f"{path.name}: row {merged.get('id', i)}"
        quantum = merged.get("quantum") or _quantum_of(merged.get("value"))
        row = _plain(merged)
        _first_error(row_validator, row, where)
        if row["id"] in seen:
            raise ReferenceError(f"{where}: duplicate id; ids are unique within a file")
        seen.add(row["id"])
        if row["unit"] != UNITS[row["metric"]]:
            raise ReferenceError(f"{where}: unit {row['unit']!r} is wrong for {row['metric']}; "
                                 f"use {UNITS[row['metric']]!r} (MACs are GMAC, FLOPs are GFLOP)")
        if row.get("range") and not row["range"][0] <= row["value"] <= row["range"][1]:
            raise ReferenceError(f"{where}: value {row['value']} lies outside its range {row['range']}")
        if row["role"] == "bound":
            d = row["derivation"]
            ideal = d["steps"] * d["blocks"] / (d["full_steps"] * d["blocks"] + d["partial_steps"] * d["partial_blocks"])
            if d["full_steps"] + d["partial_steps"] != d["steps"] or abs(ideal - row["value"]) > (quantum or 0) / 2 + 1e-12:
                raise ReferenceError(f"{where}: bound {row['value']} does not equal its derivation ({ideal:.5f})")
        row["source"] = source["id"]
        row["uid"] = f"{source['id']}:{row['id']}"
        row["quantum"] = quantum
        row.setdefault("hooks", None)
        row["irrelevant"] = sorted(default_irrelevant(row["kind"], row["metric"]) | set(row.get("irrelevant", [])))
        rows.append(row)
    return source, rows


def load_all(directory: str | os.PathLike | None = None) -> ReferenceSet:
    """Every reference file of a folder (default: reference_dir()), validated and cross-linked."""
    path = Path(directory) if directory is not None else reference_dir()
    return _load_all(str(path.resolve()), _mtimes(path))


def _mtimes(path: Path) -> tuple:
    # part of the cache key, so an edited file is re-read
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in path.glob("*.yaml")))


@functools.lru_cache(maxsize=8)
def _load_all(directory: str, _stamp: tuple) -> ReferenceSet:
    path = Path(directory)
    if not path.is_dir():
        raise ReferenceError(f"{path}: no such reference_results folder")
    schema = _schema(directory)
    refs = ReferenceSet(directory=path)
    files = sorted(p for p in path.glob("*.yaml") if p.name != SCHEMA_FILE)
    if not files:
        raise ReferenceError(f"{path}: no reference files (*.yaml) found")
    for file in files:
        source, rows = load_source(file, schema)
        if source["id"] in refs.sources:
            raise ReferenceError(f"{file.name}: source id {source['id']!r} already used by another file")
        source["file"] = file.name
        refs.sources[source["id"]] = source
        refs.rows.extend(rows)
    uids = {row["uid"] for row in refs.rows}
    for row in refs.rows:
        where = f"{refs.sources[row['source']]['file']}: row {row['id']}"
        for link in ("baseline", "copied_from"):
            if link not in row:
                continue
            target = row[link] if ":" in row[link] else f"{row['source']}:{row[link]}"
            if target not in uids:
                raise ReferenceError(f"{where}: {link} {row[link]!r} names no row (use 'row' or 'source:row')")
            row[link] = target
        if "baseline" in row and refs.row(row["baseline"])["metric"] != row["metric"]:
            raise ReferenceError(f"{where}: its baseline {row['baseline']} measures a different metric")
    return refs


# ---------------------------------------------------------------------------------------------------
# Citations and ratios

def citation(refs: ReferenceSet, row: dict) -> str:
    """"DiT paper arXiv:2212.09748 v2, <table>" or "owner/repo <file> @ <commit>, <table>"."""
    src = refs.sources[row["source"]]
    prov = row["provenance"]
    if src["kind"] == "paper":
        head = f"{src['paper']} {src['version']}"
    elif src["kind"] == "model-card":
        head = src["url"]
    else:
        commit = prov.get("commit", src.get("commit"))
        head = f"{src['repository']} {prov.get('file', '')} @ {commit[:7] if commit else 'commit not recorded'}".replace("  ", " ")
    where = ", ".join(p for p in (prov.get("table"), prov.get("locator")) if p)
    return f"{head}, {where}" if where else head


def interval(row: dict) -> tuple[float, float]:
    """The values the published text is consistent with: its range, its uncertainty and its last digit."""
    lo, hi = row.get("range") or (row["value"], row["value"])
    pad = (row.get("quantum") or 0) / 2 + row.get("uncertainty", 0)
    return lo - pad, hi + pad


def ratio_claims(refs: ReferenceSet) -> list[dict]:
    """Every published speed-up: explicit speed-up rows, and ratios of rows linked to their baseline.

    A claim is a dict with the method row's identity and protocol, ``value``, ``interval`` (what the
    rounded inputs allow), ``versus`` (the baseline subject), ``uids`` and a ``text`` saying how it was got.
    """
    claims = []
    for row in refs.rows:
        if row["value"] is None:
            continue
        if row["metric"] in RATIO_METRICS and row["role"] in ("result", "claim"):
            claims.append(_claim(row, row["value"], interval(row), row.get("versus"), [row["uid"]],
                                 f"{row.get('published_as', row['value'])} ({row['metric']})"))
        elif "baseline" in row and row["metric"] in TIME_METRICS | RATE_METRICS:
            base = refs.row(row["baseline"])
            if base["value"] is None:
                continue
            (mlo, mhi), (blo, bhi) = interval(row), interval(base)
            if row["metric"] in TIME_METRICS:
                value, span = base["value"] / row["value"], (blo / mhi, bhi / mlo)
            else:
                value, span = row["value"] / base["value"], (mlo / bhi, mhi / blo)
            unit = UNITS[row["metric"]]
            claims.append(_claim(row, value, span, {"method": base["method"], "model": base["model"],
                                                     "hooks": base["hooks"]},
                                 [row["uid"], base["uid"]],
                                 f"{base['value']:g} → {row['value']:g} {unit or row['metric']}"))
    return claims


def _claim(row, value, span, versus, uids, text) -> dict:
    return {
        "uid": row["uid"], "uids": uids, "source": row["source"], "method": row["method"], "model": row["model"],
        "resolution": row["resolution"], "kind": row["kind"],
        "metric": "train_speedup" if row["kind"] == "train" else "speedup",
        "value": value, "interval": span, "versus": versus or {}, "hooks": row["hooks"],
        "protocol": row["protocol"], "provenance": row["provenance"], "row": row, "text": text,
        "derived": len(uids) > 1,
    }
