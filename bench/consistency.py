"""A lint over reference_results/: where the published numbers disagree with each other or with physics.

Every check reads only the data (never a hard-coded row id), so it runs unchanged on any folder of
reference files. The checks, in the order a reader of the seed papers meets the problems:

* ``copied-baseline``: a method's table prints a baseline that is identical, metric for metric, to another
  source's row: it was copied, not re-measured under the table's own protocol.
* ``key-steps-mismatch``: one table row whose speed and quality were measured with different key-step sets.
* ``multiple-speedups``: one configuration, several published speed-ups that no rounding reconciles.
* ``summary-above-logs``: a README/paper speed better than the committed logs of the same setup.
* ``size-vs-release``: a published parameter/MAC count the released configuration does not give.
* ``above-flop-bound``: a claimed speed-up above the ideal FLOP bound of its own configuration.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from bench import reference
from bench.compare import tolerance
from bench.reference import QUALITY_METRICS, RATE_METRICS, SIZE_METRICS, TIME_METRICS, interval, norm

WARNING = "warning"
INFO = "info"
# Timing noise allowed above an ideal bound before it is a warning (1%: the step-rate ratios of the
# FasterDiffusion README agree with the bound to 0.1-0.5%, fasterdiffusion.md §9).
BOUND_TOLERANCE = 0.01
MIN_IDENTICAL_METRICS = 3  # two equal numbers can be chance; three equal metrics of one row are a copy


@dataclass(frozen=True)
class Finding:
    check: str
    severity: str
    message: str
    uids: tuple[str, ...]


def lint(refs: reference.ReferenceSet | None = None) -> list[Finding]:
    """Run every check over a reference set (default: the installed reference_results/)."""
    refs = refs if refs is not None else reference.load_all()
    findings = []
    for check in CHECKS.values():
        findings.extend(check(refs))
    return findings


def _label(row) -> str:
    res = f"@{row['resolution']}" if row.get("resolution") else ""
    return f"{row['method']} {row['model'] or ''}{res}".strip()


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1e5 else f"{value:g}"


def _stated(value) -> str:
    return "not stated" if value is None else str(value)


def _versus(versus: dict) -> str:
    hooks = f" [{', '.join(versus['hooks']) or 'no hooks'}]" if versus.get("hooks") is not None else ""
    return f"{versus.get('method')} {versus.get('model') or ''}".strip() + hooks


def _table(row) -> str:
    return row["provenance"].get("table") or row["provenance"].get("file") or row["provenance"].get("locator", "")


# ---------------------------------------------------------------------------------------------------

def copied_baselines(refs) -> list[Finding]:
    groups = defaultdict(dict)  # (source, table, method, model, resolution, cfg) -> {metric: row}
    for row in refs.rows:
        if row["metric"] in QUALITY_METRICS and row["value"] is not None:
            key = (row["source"], _table(row), norm(row["method"]), norm(row["model"]), row["resolution"],
                   row["protocol"].get("cfg_scale"))
            groups[key].setdefault(row["metric"], row)
    out = []
    for key, rows in groups.items():
        if not any(r["role"] == "baseline" for r in rows.values()) or len(rows) < MIN_IDENTICAL_METRICS:
            continue
        for other_key, other in groups.items():
            if other_key[0] == key[0] or other_key[2:] != key[2:]:
                continue
            if any(r["role"] != "result" for r in other.values()):
                continue
            shared = sorted(rows.keys() & other.keys())
            if len(shared) < MIN_IDENTICAL_METRICS or any(rows[m]["value"] != other[m]["value"] for m in shared):
                continue
            first = next(iter(rows.values()))
            own = [r for r in refs.rows if r["source"] == key[0] and _table(r) == key[1] and r["role"] == "result"
                   and r["metric"] in QUALITY_METRICS]
            diffs = sorted({f"{k}: {_stated(first['protocol'].get(k))} vs {_stated(r['protocol'].get(k))}" for r in own
                            for k in ("framework", "precision", "vae")
                            if k in r["protocol"] and first["protocol"].get(k) != r["protocol"].get(k)})
            values = ", ".join(f"{m} {_fmt(rows[m]['value'])}" for m in shared)
            message = (f"{key[0]} '{key[1]}': the baseline {_label(first)} ({values}) is identical to "
                       f"{other_key[0]} '{other_key[1]}'; it was copied, not re-measured under the table's protocol")
            if diffs:
                message += f" (baseline vs the table's own rows: {'; '.join(diffs)})"
            out.append(Finding("copied-baseline", WARNING, message,
                               tuple(rows[m]["uid"] for m in shared) + tuple(other[m]["uid"] for m in shared)))
    return out


def key_step_mismatches(refs) -> list[Finding]:
    groups = defaultdict(lambda: {"quality": {}, "speed": {}})
    for row in refs.rows:
        if row["role"] not in ("result", "claim") or "key_steps" not in row["protocol"]:
            continue
        kind = "quality" if row["kind"] == "quality" else "speed" if row["kind"] == "speed" else None
        if kind is None or row["protocol"]["key_steps"] is None:
            continue
        key = (row["source"], _table(row), norm(row["method"]), norm(row["model"]), row["resolution"])
        groups[key][kind].setdefault(row["protocol"]["key_steps"], []).append(row)
    bounds = {(norm(r["method"]), r["protocol"].get("key_steps")): r for r in refs.rows if r["role"] == "bound"}
    out = []
    for key, kinds in groups.items():
        q, s = kinds["quality"], kinds["speed"]
        if not q or not s or set(q) == set(s):
            continue

        def describe(sets):
            parts = []
            for name in sorted(sets):
                bound = bounds.get((key[2], name))
                parts.append(f"{name} (ideal {bound['value']:.3f}x)" if bound else name)
            return ", ".join(parts)

        sample = next(iter(next(iter(q.values()))))
        message = (f"{key[0]} '{key[1]}', {_label(sample)}: speed measured with key steps {describe(s)} but "
                   f"quality with {describe(q)}; the row's speed and FID describe different samplers")
        uids = tuple(r["uid"] for rows in (*s.values(), *q.values()) for r in rows)
        out.append(Finding("key-steps-mismatch", WARNING, message, uids))
    return out


def _claim_key(c):
    versus = c["versus"] or {}
    return (c["metric"], norm(c["method"]), norm(c["model"]), c["resolution"], c["protocol"].get("key_steps"),
            frozenset(norm(h) for h in c["hooks"] or ()), norm(versus.get("method")), norm(versus.get("model")),
            frozenset(norm(h) for h in versus.get("hooks") or ()), c["protocol"].get("num_gpus"))


def multiple_speedups(refs) -> list[Finding]:
    groups = defaultdict(list)
    for claim in reference.ratio_claims(refs):
        if claim["resolution"] is not None and claim["row"].get("copied_from") is None:
            groups[_claim_key(claim)].append(claim)
    out = []
    for key, claims in groups.items():
        if len(claims) < 2:
            continue
        lo = max(c["interval"][0] for c in claims)
        hi = min(c["interval"][1] for c in claims)
        if lo <= hi:  # one true value is consistent with every published figure and its rounding
            continue
        places = sorted({(c["source"], _table(c["row"])) for c in claims})
        values = sorted(c["value"] for c in claims)
        listing = "; ".join(f"{c['value']:.3f}x from {c['text']} ({c['source']} '{_table(c['row'])}')"
                            for c in sorted(claims, key=lambda c: -c["value"]))
        first = claims[0]
        config = f"{_label(first)}" + (f", key steps {key[4]}" if key[4] else "") + \
                 (f", {', '.join(sorted(first['hooks']))}" if first["hooks"] else "")
        message = (f"{len(places)} published places give {len(values)} different {first['metric']}s for {config} "
                   f"vs {_versus(first['versus'])} ({values[0]:.3f}x to {values[-1]:.3f}x, beyond rounding): "
                   f"{listing}")
        out.append(Finding("multiple-speedups", WARNING, message, tuple(u for c in claims for u in c["uids"])))
    return out


def summaries_above_logs(refs) -> list[Finding]:
    logs = [r for r in refs.rows if refs.sources[r["source"]]["kind"] == "logs" and r["value"] is not None]
    summaries = [r for r in refs.rows if refs.sources[r["source"]]["kind"] in ("readme", "paper", "model-card")
                 and r["value"] is not None and not r.get("copied_from")
                 and r["metric"] in RATE_METRICS | TIME_METRICS and r["role"] in ("result", "baseline")]

    def same_setup(a, b):
        return (norm(a["method"]) == norm(b["method"]) and norm(a["model"]) == norm(b["model"])
                and a["resolution"] == b["resolution"] and a["metric"] == b["metric"] and a["kind"] == b["kind"]
                and a["protocol"].get("num_gpus") == b["protocol"].get("num_gpus"))

    def hooks(r):
        return frozenset(norm(h) for h in r["hooks"] or ())

    out = []
    for s in summaries:
        for log in logs:
            if not same_setup(s, log) or hooks(s) != hooks(log) or s["protocol"].get("precision") != log["protocol"].get("precision"):
                continue
            (s_lo, s_hi), (l_lo, l_hi) = interval(s), interval(log)
            faster = s_lo > l_hi if s["metric"] in RATE_METRICS else s_hi < l_lo
            if not faster:
                continue
            logged = log.get("range") or (log["value"], log["value"])
            worst = logged[1] if s["metric"] in RATE_METRICS else logged[0]
            gap = (s["value"] / worst - 1) if s["metric"] in RATE_METRICS else (worst / s["value"] - 1)
            shown = f"{logged[0]:g}-{logged[1]:g}" if logged[0] != logged[1] else f"{logged[0]:g}"
            message = (f"{_label(s)} {', '.join(s['hooks'] or []) or 'no hooks'}: {s['source']} prints "
                       f"{s['value']:g} {s['metric']} but its log {log['provenance'].get('file')} shows {shown} "
                       f"({100 * gap:+.0f}% in the summary's favour)")
            twins = [o for o in logs if o is not log and same_setup(s, o) and hooks(o) != hooks(s)
                     and interval(o)[0] <= s["value"] <= interval(o)[1]]
            for twin in twins:
                message += (f"; {s['value']:g} is what the {', '.join(twin['hooks'] or []) or 'no-hooks'} log "
                            f"{twin['provenance'].get('file')} shows")
            unstated = [k for k in ("global_batch_size",) if (s["protocol"].get(k) is None) != (log["protocol"].get(k) is None)]
            for k in unstated:
                message += f"; {k}: {_stated(s['protocol'].get(k))} in the summary, {_stated(log['protocol'].get(k))} in the log"
            out.append(Finding("summary-above-logs", WARNING, message, (s["uid"], log["uid"], *(t["uid"] for t in twins))))
    return out


def sizes_vs_release(refs) -> list[Finding]:
    computed = [r for r in refs.rows if r["role"] == "computed" and r["metric"] in SIZE_METRICS]
    out = []
    for pub in refs.rows:
        if pub["role"] not in ("result", "claim") or pub["metric"] not in SIZE_METRICS or pub["value"] is None:
            continue
        for comp in computed:
            if (norm(comp["method"]), norm(comp["model"]), comp["resolution"], comp["metric"]) != \
                    (norm(pub["method"]), norm(pub["model"]), pub["resolution"], pub["metric"]):
                continue
            tol, rule = tolerance(pub["metric"], comp["value"], quantum=pub.get("quantum"))
            gap = pub["value"] - comp["value"]
            if abs(gap) <= tol:
                continue
            printed = f", printed '{pub['published_as']}'" if pub.get("published_as") else ""
            message = (f"{_label(pub)}: published {pub['metric']} {_fmt(pub['value'])} ({pub['source']}{printed}) but the released configuration gives {_fmt(comp['value'])} "
                       f"({comp['source']}; {100 * gap / comp['value']:+.1f}%, tolerance {rule})")
            out.append(Finding("size-vs-release", WARNING, message, (pub["uid"], comp["uid"])))
    return out


def above_flop_bound(refs) -> list[Finding]:
    bounds = [r for r in refs.rows if r["role"] == "bound"]
    out = []
    for claim in reference.ratio_claims(refs):
        if claim["row"].get("copied_from"):
            continue
        for bound in bounds:
            if (bound["metric"] != claim["metric"] or norm(bound["method"]) != norm(claim["method"])
                    or (bound["model"] and norm(bound["model"]) != norm(claim["model"]))
                    or (bound["resolution"] is not None and bound["resolution"] != claim["resolution"])
                    or claim["protocol"].get("key_steps") is None
                    or bound["protocol"].get("key_steps") != claim["protocol"].get("key_steps")):
                continue
            excess = claim["value"] / bound["value"] - 1
            if excess <= 0:
                continue
            severity = WARNING if excess > BOUND_TOLERANCE else INFO
            d = bound["derivation"]
            message = (f"{_label(claim)} key steps {bound['protocol']['key_steps']}: {claim['value']:.4f}x from "
                       f"{claim['text']} ({claim['source']} '{_table(claim['row'])}') is {100 * excess:.1f}% above the "
                       f"ideal FLOP bound {bound['value']:.4f}x ({d['full_steps']} full + {d['partial_steps']} partial "
                       f"steps; tolerance {100 * BOUND_TOLERANCE:.0f}%)")
            out.append(Finding("above-flop-bound", severity, message, (*claim["uids"], bound["uid"])))
    return out


CHECKS = {
    "copied-baseline": copied_baselines,
    "key-steps-mismatch": key_step_mismatches,
    "multiple-speedups": multiple_speedups,
    "summary-above-logs": summaries_above_logs,
    "size-vs-release": sizes_vs_release,
    "above-flop-bound": above_flop_bound,
}
