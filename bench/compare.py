"""Measured vs published: a verdict for every reference row whose protocol matches the measurement.

A reference row is compared only when its protocol agrees with the measurement's, key by key, except
for the keys the row does not depend on (``row["irrelevant"]``: e.g. the GPU for FID, the device for a
ratio measured in one run). Anything else is "not comparable", with the reason. Comparable rows get
"reproduced" or "not reproduced" against a tolerance derived from the metric's noise (``TOLERANCES``),
widened by what the published text itself allows (its last digit, a printed range, a plot read-off).

Three further rules, from the design:
* speed claims are compared as ratios measured in one run (method vs the record's own baseline); absolute
  times and memory only on the GPU the source used;
* where the source's baseline was not re-measured (copied from another paper), a delta is taken against
  this run's baseline and the verdict says so;
* a proxy result (CPU toy task) is compared only through ratios and relative deltas, never absolutely.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from bench import reference
from bench.reference import QUALITY_METRICS, RATE_METRICS, SIZE_METRICS, TIME_METRICS, norm

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_COMPARABLE = "not comparable"

FID_SAMPLES = 50_000

# Tolerance rules: (kind, value, text). "abs_rel": max(abs, rel*|ref|); "rel": rel*|ref|; "abs": abs;
# "digits": one unit of the last published digit (so a truncated count still matches).
# FID/sFID: run-to-run std of FID-50k on ImageNet is ~1% (seed, sample order); 2% (at least 0.05 FID,
# the last printed digit of most tables) is two sigma, and it grows as 1/sqrt(n) for fewer samples.
# IS: split-to-split noise ~1% -> 2%. P/R over 50k samples vs 10k reference images: ~0.005 -> 0.01.
# Timing: repeated runs of the same binary on one GPU differ by a few percent -> 5%. MACs: counters
# disagree by <1% on what they include (layer norms, embeddings; dit.md A.1) -> 1%.
TOLERANCES = {
    "fid": ("abs_rel", (0.05, 0.02), "±max(0.05, 2%) at 50k samples, ×√(50000/n) below"),
    "sfid": ("abs_rel", (0.05, 0.02), "±max(0.05, 2%) at 50k samples, ×√(50000/n) below"),
    "inception_score": ("rel", 0.02, "±2% at 50k samples, ×√(50000/n) below"),
    "precision": ("abs", 0.01, "±0.01"),
    "recall": ("abs", 0.01, "±0.01"),
    "s_per_image": ("rel", 0.05, "±5%, only on the source's GPU"),
    "latency_s": ("rel", 0.05, "±5%, only on the source's GPU"),
    "images_per_s": ("rel", 0.05, "±5%, only on the source's GPU"),
    "steps_per_s": ("rel", 0.05, "±5%, only on the source's GPU"),
    "peak_memory_mb": ("rel", 0.05, "±5%, only on the source's GPU"),
    "reserved_memory_mb": ("rel", 0.05, "±5%, only on the source's GPU"),
    "speedup": ("rel", 0.05, "±5% of the ratio, measured against this run's baseline"),
    "train_speedup": ("rel", 0.05, "±5% of the ratio, measured against this run's baseline"),
    "convergence_speedup": ("rel", 0.10, "±10% (iterations to equal FID, read off curves)"),
    "params": ("digits", None, "exact (to the published digits)"),
    "trainable_params": ("digits", None, "exact (to the published digits)"),
    "gmacs": ("rel", 0.01, "±1%"),
    "gflops": ("rel", 0.01, "±1%"),
    "mfu": ("rel", 0.05, "±5%"),
}
DELTA_RULE = "Δ vs this run's baseline: √2 × the metric's tolerance (two noisy numbers)"
PROXY_DELTA_RULE = ("proxy: relative Δ vs this run's baseline, √2 × the metric's relative noise at the "
                    "proxy's sample count")

# What a proxy run may be compared on: ratios and relative deltas (design.md, "The embedded default").
_PROXY_DELTA_IRRELEVANT = {"evaluator", "num_samples", "precision", "vae", "framework", "training_steps",
                           "gpu", "num_gpus", "batch_size", "global_batch_size", "seed", "amm"}


@dataclass(frozen=True)
class Comparison:
    """One measured number against one published number (or the reason there is none)."""

    subject: str
    metric: str
    measured: float | None
    reference: float | None
    verdict: str
    uid: str = ""
    citation: str = ""
    tolerance: float | None = None
    rule: str = ""
    reason: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    reference_text: str = ""   # how the published value reads ("5.13 -> 3.26 s", "0.74-0.75")

    @property
    def delta(self) -> float | None:
        if self.measured is None or self.reference is None:
            return None
        return self.measured - self.reference

    def as_dict(self) -> dict:
        return {**asdict(self), "delta": self.delta}


# ---------------------------------------------------------------------------------------------------
# The measured side

@dataclass
class Measured:
    """One subject of a result record (the run itself, or its same-run baseline)."""

    label: str
    method: str
    model: str | None
    resolution: int | None
    hooks: frozenset | None
    protocol: dict
    metrics: dict
    kind: str
    proxy: bool

    @property
    def phase(self) -> str:
        return "train" if self.kind == "train" else "speed"


def measured_subjects(record: dict) -> tuple[Measured, Measured | None]:
    """The record's subject and its baseline (which inherits the run's protocol unless it overrides it)."""
    env = record.get("environment") or {}
    main = _measured(record["subject"], record["protocol"], record["metrics"], record, env, "")
    base = None
    if record.get("baseline"):
        b = record["baseline"]
        protocol = {**record["protocol"], **(b.get("protocol") or {})}
        if "key_steps" not in (b.get("protocol") or {}):
            protocol.pop("key_steps", None)  # a key-step set belongs to the method; the baseline runs every step
        subject = {**record["subject"], **(b.get("subject") or {})}
        if "hooks" not in (b.get("subject") or {}):
            subject["hooks"] = None
        base = _measured(subject, protocol, b["metrics"], record, env, " [baseline]")
    return main, base


def _measured(subject, protocol, metrics, record, env, suffix) -> Measured:
    protocol = dict(protocol)
    protocol.setdefault("framework", "pytorch")  # the harness samples and trains with PyTorch only
    protocol.setdefault("key_steps", "all")      # no key-step set stated = every step runs the full network
    if protocol.get("gpu") is None and env.get("gpu"):
        protocol["gpu"] = env["gpu"]
    if protocol.get("num_gpus") is None:
        protocol["num_gpus"] = protocol.get("world_size") or (1 if protocol.get("gpu") else None)
    label = f"{subject.get('method', '?')} {subject.get('model') or ''}@{subject.get('resolution') or '?'}"
    return Measured(label=label.replace(" @", "@") + suffix, method=subject.get("method", ""),
                    model=subject.get("model"), resolution=subject.get("resolution"),
                    hooks=_hooks(subject.get("hooks")), protocol=protocol,
                    metrics={k: v for k, v in metrics.items() if v is not None},
                    kind=record["kind"], proxy=bool(record.get("proxy")))


def _hooks(hooks) -> frozenset | None:
    if hooks is None:
        return None
    if isinstance(hooks, dict):  # {"train": [...], "sample": [...]} or {"name": enabled}
        names = []
        for key, value in hooks.items():
            if isinstance(value, (list, tuple)):
                names.extend(value)
            elif value:
                names.append(key)
        hooks = names
    if isinstance(hooks, str):
        hooks = [hooks]
    return frozenset(norm(h) for h in hooks)


# ---------------------------------------------------------------------------------------------------
# Protocol matching

def _norm_value(key: str, value):
    if isinstance(value, str):
        v = value.strip().lower()
        if key == "vae":
            v = v.rsplit("/", 1)[-1].replace("sd-vae-ft-", "")
        if key == "precision":
            v = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}.get(v, v)
        return v.replace("_", "-")
    return value


def _gpu_matches(measured: str, published: str) -> bool:
    """"A100" or "A100 80GB" (what sources print) against "NVIDIA A100-SXM4-80GB" (what NVML reports)."""
    have = set(norm(t) for t in measured.replace("-", " ").split())
    return all(norm(t) in have for t in published.replace("-", " ").split())


def protocol_differences(measured: dict, row_protocol: dict, relevant: list[str]) -> tuple[list[str], list[str]]:
    """(reasons not to compare, caveats) for the keys the row's value depends on."""
    reasons, caveats = [], []
    for key in relevant:
        if key not in row_protocol:
            continue
        want, have = row_protocol[key], measured.get(key)
        if want is None:
            caveats.append(f"the source does not state {key}")
            continue
        if have is None:
            reasons.append(f"{key}: the result does not state it (source: {want})")
            continue
        if key == "gpu":
            same = _gpu_matches(str(have), str(want))
        elif isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(have, (int, float)):
            same = math.isclose(float(want), float(have), rel_tol=1e-9, abs_tol=1e-12)
        else:
            same = _norm_value(key, want) == _norm_value(key, have)
        if not same:
            reasons.append(f"{key}: measured {have}, source {want}")
    return reasons, caveats


def _relevant(row: dict, extra_irrelevant=()) -> list[str]:
    skip = set(row["irrelevant"]) | set(extra_irrelevant)
    return [k for k in reference.PROTOCOL_KEYS if k not in skip]


def _kind_matches(row_kind: str, measured: Measured) -> bool:
    if row_kind in ("quality", "flops"):
        return True
    return row_kind == measured.phase


def _subject_matches(row: dict, m: Measured, *, any_model: bool = False) -> bool:
    if norm(row["method"]) != norm(m.method):
        return False
    if not any_model and row["model"] is not None and norm(row["model"]) != norm(m.model):
        return False
    if not any_model and row["resolution"] is not None and m.resolution is not None and row["resolution"] != m.resolution:
        return False
    return _kind_matches(row["kind"], m)


def _hook_reason(row_hooks, m: Measured) -> str | None:
    if row_hooks is None:
        return None
    want = frozenset(norm(h) for h in row_hooks)
    if m.hooks is None:
        return f"hooks: the result does not list its hooks (source: {', '.join(row_hooks) or 'none'})"
    if want != m.hooks:
        return f"hooks: measured {', '.join(sorted(m.hooks)) or 'none'}, source {', '.join(sorted(want)) or 'none'}"
    return None


# ---------------------------------------------------------------------------------------------------
# Tolerances

def tolerance(metric: str, ref_value: float, *, quantum: float | None = None, num_samples: int | None = None,
              uncertainty: float = 0.0) -> tuple[float, str]:
    """Allowed |measured - published| and the rule's text."""
    kind, param, text = TOLERANCES.get(metric, ("rel", 0.05, "±5%"))
    scale = 1.0
    if metric in QUALITY_METRICS - {"precision", "recall"} and num_samples and num_samples < FID_SAMPLES:
        scale = math.sqrt(FID_SAMPLES / num_samples)
    if kind == "abs_rel":
        tol = max(param[0], param[1] * abs(ref_value)) * scale
    elif kind == "rel":
        tol = param * abs(ref_value) * scale
    elif kind == "abs":
        tol = param
    else:  # digits: a count printed as "38.32M" may be truncated, so allow one unit of its last digit;
        tol = quantum if quantum and quantum > 1 else 0.0  # a count printed in full must match exactly
    if kind != "digits" and quantum:
        tol = max(tol, quantum / 2)
    return tol + uncertainty, text


def relative_noise(metric: str, num_samples: int | None, value: float) -> float:
    """The metric's noise relative to its value (for proxy deltas, whose absolute scale means nothing)."""
    scale = math.sqrt(FID_SAMPLES / num_samples) if num_samples and num_samples < FID_SAMPLES else 1.0
    if metric in ("fid", "sfid", "inception_score"):
        return 0.02 * scale
    return TOLERANCES[metric][1] / max(abs(value), 1e-12)  # precision / recall: absolute noise


def _verdict(measured: float, lo: float, hi: float, tol: float) -> str:
    gap = max(lo - measured, measured - hi, 0.0)
    return REPRODUCED if gap <= tol * (1 + 1e-9) else NOT_REPRODUCED


def _ref_text(row: dict) -> str:
    """How the published number reads when it is not a single value: a printed range, or a label like "708.44M"."""
    if row.get("range"):
        return f"{row['range'][0]:g}–{row['range'][1]:g}"
    if row["role"] == "claim" and row["metric"] in SIZE_METRICS:
        return row.get("published_as", "")
    return ""


# ---------------------------------------------------------------------------------------------------
# Comparisons

def compare_record(record: dict, refs: reference.ReferenceSet | None = None) -> list[Comparison]:
    """Every comparison a result record allows: its subject, its baseline, its ratio and its deltas."""
    refs = refs if refs is not None else reference.load_all()
    main, base = measured_subjects(record)
    out = compare_absolute(main, refs)
    if base is not None:
        out += compare_absolute(base, refs)
        out += compare_ratio(main, base, refs, record["metrics"].get("speedup"))
        out += compare_deltas(main, base, refs)
    return out


def compare_absolute(m: Measured, refs: reference.ReferenceSet) -> list[Comparison]:
    out = []
    for metric, value in m.metrics.items():
        if metric in ("speedup", "mfu") or metric not in reference.UNITS:
            continue
        if m.proxy:
            if refs.find(method=m.method, metric=metric):
                out.append(Comparison(m.label, metric, value, None, NOT_COMPARABLE,
                                      reason="proxy result (CPU toy task): compared with papers only through "
                                             "ratios and deltas vs its same-run baseline, never absolutely"))
            continue
        for row in refs.rows:
            if row["metric"] != metric or row["value"] is None or row["role"] == "bound":
                continue
            if not _subject_matches(row, m):
                continue
            out.append(_compare_row(m, metric, value, row, refs))
    return out


def _compare_row(m: Measured, metric: str, value: float, row: dict, refs) -> Comparison:
    cite = reference.citation(refs, row)
    reasons, caveats = protocol_differences(m.protocol, row["protocol"], _relevant(row))
    hook = _hook_reason(row["hooks"], m)
    if hook:
        reasons.insert(0, hook)
    if m.resolution is None and row["resolution"] is not None:
        reasons.insert(0, f"resolution: the result does not state it (source: {row['resolution']})")
    absolute_time = metric in TIME_METRICS | RATE_METRICS | {"peak_memory_mb", "reserved_memory_mb"}
    if absolute_time and "gpu" not in row["irrelevant"] and row["protocol"].get("gpu") is None:
        reasons.append("the source does not state its GPU; absolute times and memory are compared only on "
                       "the source's GPU (compare the same-run ratio instead)")
        caveats = [c for c in caveats if "gpu" not in c]
    notes = list(caveats)
    if row.get("copied_from"):
        notes.append(f"{row['uid']} was copied from {row['copied_from']} (not re-measured by that source)")
    if row.get("verified") is False:
        notes.append("published digits as commonly cited, not re-checked against the source")
    if row.get("approximate"):
        notes.append("the published value is approximate")
    if reasons:
        return Comparison(m.label, metric, value, row["value"], NOT_COMPARABLE, row["uid"], cite,
                          reason="; ".join(reasons), notes=tuple(notes), reference_text=_ref_text(row))
    n = m.protocol.get("num_samples") or row["protocol"].get("num_samples")
    tol, rule = tolerance(metric, row["value"], quantum=row.get("quantum"), num_samples=n,
                          uncertainty=row.get("uncertainty", 0.0))
    lo, hi = row.get("range") or (row["value"], row["value"])
    return Comparison(m.label, metric, value, row["value"], _verdict(value, lo, hi, tol), row["uid"], cite,
                      tol, rule, notes=tuple(notes), reference_text=_ref_text(row))


def measured_ratio(main: Measured, base: Measured, recorded: float | None = None) -> tuple[float | None, str]:
    """The run's own speed-up over its same-run baseline, and how it was obtained."""
    if recorded is not None:
        return float(recorded), "speedup recorded by the run"
    for metric in ("s_per_image", "latency_s"):
        if metric in main.metrics and metric in base.metrics and main.metrics[metric] > 0:
            return base.metrics[metric] / main.metrics[metric], f"baseline {metric} / method {metric}"
    for metric in ("images_per_s", "steps_per_s"):
        if metric in main.metrics and metric in base.metrics and base.metrics[metric] > 0:
            return main.metrics[metric] / base.metrics[metric], f"method {metric} / baseline {metric}"
    return None, ""


def compare_ratio(main: Measured, base: Measured, refs, recorded: float | None = None) -> list[Comparison]:
    value, how = measured_ratio(main, base, recorded)
    if value is None:
        return []
    metric = "train_speedup" if main.phase == "train" else "speedup"
    label = main.label
    claims = [c for c in reference.ratio_claims(refs) if c["metric"] == metric
              and _subject_matches(c["row"], main, any_model=main.proxy)]
    bounds = [r for r in refs.rows if r["role"] == "bound" and r["metric"] == metric
              and _subject_matches(r, main, any_model=main.proxy)]
    out = []
    for claim in claims:
        row = claim["row"]
        cite = reference.citation(refs, row)
        if claim["derived"]:
            cite += f"; baseline {reference.citation(refs, refs.row(claim['uids'][1]))}"
        # a derived ratio depends on what a ratio depends on, not on what its absolute times depend on
        own = set(row["irrelevant"]) - reference.default_irrelevant(row["kind"], row["metric"])
        skip = reference.default_irrelevant(row["kind"], metric) | own
        relevant = [k for k in reference.PROTOCOL_KEYS if k not in skip]
        reasons, caveats = protocol_differences(main.protocol, claim["protocol"], relevant)
        versus = claim["versus"]
        if versus.get("method") and norm(versus["method"]) != norm(base.method):
            reasons.insert(0, f"the claim is against {versus['method']} {versus.get('model') or ''}".rstrip()
                           + f"; this run's baseline is {base.method} {base.model or ''}".rstrip())
        elif (not main.proxy and versus.get("model") and base.model
              and norm(versus["model"]) != norm(base.model)):
            reasons.insert(0, f"the claim is against {versus['model']}; this run's baseline is {base.model}")
        for who, hooks in (("method", claim["hooks"]), ("baseline", versus.get("hooks"))):
            reason = _hook_reason(hooks, main if who == "method" else base)
            if reason:
                reasons.insert(0, f"{who} {reason}")
        notes = [f"measured {how}, in one run", *caveats]
        if row["resolution"] is None:
            notes.append("the source states no resolution")
        if main.proxy and row["model"] and norm(row["model"]) != norm(main.model):
            notes.append(f"proxy model {main.model} stands in for {row['model']}")
        if claim["derived"]:
            notes.append(f"published ratio derived from {claim['text']}")
        for bound in bounds:
            if bound["protocol"].get("key_steps") == main.protocol.get("key_steps") and value > bound["value"]:
                notes.append(f"measured ratio is {100 * (value / bound['value'] - 1):.1f}% above the ideal FLOP "
                             f"bound {bound['value']:.4f} ({bound['uid']})")
        if reasons:
            out.append(Comparison(label, metric, value, claim["value"], NOT_COMPARABLE, claim["uid"], cite,
                                  reason="; ".join(reasons), notes=tuple(notes), reference_text=claim["text"]))
            continue
        # widened by what the rounded published inputs allow (5.13 and 3.26 are each +-0.005)
        lo, hi = claim["interval"]
        tol, rule = tolerance(metric, claim["value"], uncertainty=(hi - lo) / 2)
        out.append(Comparison(label, metric, value, claim["value"], _verdict(value, claim["value"], claim["value"], tol),
                              claim["uid"], cite, tol, rule, notes=tuple(notes), reference_text=claim["text"]))
    return out


def compare_deltas(main: Measured, base: Measured, refs) -> list[Comparison]:
    """Δmetric (method - same-run baseline) against the published Δ (row - its linked baseline row)."""
    out = []
    for metric in sorted(QUALITY_METRICS & main.metrics.keys() & base.metrics.keys()):
        d_measured = main.metrics[metric] - base.metrics[metric]
        for row in refs.rows:
            if row["metric"] != metric or "baseline" not in row or row["value"] is None:
                continue
            if not _subject_matches(row, main, any_model=main.proxy):
                continue
            brow = refs.row(row["baseline"])
            d_ref = row["value"] - brow["value"]
            cite = f"{reference.citation(refs, row)}; baseline {reference.citation(refs, brow)}"
            extra = _PROXY_DELTA_IRRELEVANT if main.proxy else ()
            reasons, caveats = protocol_differences(main.protocol, row["protocol"], _relevant(row, extra))
            hook = _hook_reason(row["hooks"], main)
            if hook:
                reasons.insert(0, hook)
            notes = list(caveats)
            if brow.get("copied_from") or brow["source"] != row["source"]:
                notes.append(f"the source's baseline {brow['uid']} was not re-measured by it "
                             f"(copied from {brow.get('copied_from', brow['source'])}); the measured Δ uses this "
                             f"run's baseline {base.label}")
            else:
                notes.append(f"the measured Δ uses this run's baseline {base.label}")
            name = f"Δ{metric}"
            ref_text = f"{row['value']:g} - {brow['value']:g}"
            if main.proxy:
                name = f"Δ{metric} (relative)"
                if base.metrics[metric] == 0 or brow["value"] == 0:
                    continue
                measured_value, ref_value = d_measured / base.metrics[metric], d_ref / brow["value"]
                tol = math.sqrt(2) * relative_noise(metric, main.protocol.get("num_samples"), base.metrics[metric])
                rule = PROXY_DELTA_RULE
                signs = f"sign: measured {'+' if d_measured >= 0 else '-'}, published {'+' if d_ref >= 0 else '-'}"
                notes.append(signs)
                if main.model and row["model"] and norm(main.model) != norm(row["model"]):
                    notes.append(f"proxy model {main.model} stands in for {row['model']}")
            else:
                measured_value, ref_value = d_measured, d_ref
                n = main.protocol.get("num_samples") or row["protocol"].get("num_samples")
                t_row = tolerance(metric, row["value"], num_samples=n)[0]
                t_base = tolerance(metric, brow["value"], num_samples=n)[0]
                tol, rule = math.hypot(t_row, t_base), DELTA_RULE
            if reasons:
                out.append(Comparison(main.label, name, measured_value, ref_value, NOT_COMPARABLE, row["uid"], cite,
                                      reason="; ".join(reasons), notes=tuple(notes), reference_text=ref_text))
                continue
            out.append(Comparison(main.label, name, measured_value, ref_value,
                                  _verdict(measured_value, ref_value, ref_value, tol), row["uid"], cite, tol, rule,
                                  notes=tuple(notes), reference_text=ref_text))
    return out


def summarize(comparisons: list[Comparison]) -> dict[str, int]:
    counts = {REPRODUCED: 0, NOT_REPRODUCED: 0, NOT_COMPARABLE: 0}
    for c in comparisons:
        counts[c.verdict] += 1
    return counts
