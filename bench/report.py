"""Result records -> a markdown report with plots: what was measured, what was published, the verdicts.

The markdown is GitHub-flavoured and self-contained, so it pastes into a GitHub job summary as it is
(``github=True`` drops the image links, which a job summary cannot resolve). Sections: summary table
(measured, published, Δ, tolerance, verdict), the not-comparable rows with their reasons, plots (speed vs
FID with the Pareto front, s/image and memory bars), a protocol card per result, the environments, the
records' own warnings, the reference lint's findings and the tolerance rules. Plots use matplotlib's
object API on the Agg canvas (no pyplot state, no display needed).
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import bench
from bench import atomic, compare, consistency, reference, results
from bench.compare import NOT_COMPARABLE, NOT_REPRODUCED, REPRODUCED, Comparison
from bench.errors import UserError

PLOTS = {
    "speed_fid": "Speed vs FID (Pareto front dashed)",
    "s_per_image": "Seconds per image",
    "memory": "Peak memory",
}


@dataclass
class Report:
    paths: list[Path]
    records: list[dict]
    comparisons: list[list[Comparison]]
    findings: list[consistency.Finding]
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def all_comparisons(self) -> list[Comparison]:
        return [c for cs in self.comparisons for c in cs]


def build(paths: list[str | os.PathLike], refs: reference.ReferenceSet | None = None) -> Report:
    """Load result records (bench.results.load validates each) and compare each with the references."""
    if not paths:
        raise UserError("no result files given; pass one or more RESULT.json written by a dit-bench command")
    refs = refs if refs is not None else reference.load_all()
    paths = [Path(p) for p in paths]
    records = [results.load(p) for p in paths]
    return Report(paths, records, [compare.compare_record(r, refs) for r in records], consistency.lint(refs))


# ---------------------------------------------------------------------------------------------------
# Markdown

def _cell(value) -> str:
    text = "–" if value is None or value == "" else str(value)
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _num(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or float(value).is_integer()):
        return f"{value:,.0f}"
    return f"{value:.5g}"


def _signed(value) -> str:
    return "–" if value is None else f"{value:+.3g}"


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured markdown table; every cell escaped so the column count never changes."""
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _published(c: Comparison) -> str:
    """The published value as printed: a range stays a range, a delta shows its two terms."""
    if c.reference_text and (c.metric.startswith("Δ") or "–" in c.reference_text):
        return c.reference_text
    return _num(c.reference)


def render_markdown(report: Report, images: dict[str, str] | None = None, *, github: bool = False) -> str:
    comps = report.all_comparisons
    counts = compare.summarize(comps)
    out = ["# dit-bench report", "",
           f"Generated {report.created} by dit-bench {bench.__version__} from {len(report.records)} result "
           f"file(s): " + ", ".join(f"`{p.name}`" for p in report.paths) + ".", ""]
    if any(r.get("proxy") for r in report.records):
        out += ["> **Proxy results** (CPU toy task) are compared with the papers only through ratios and "
                "relative deltas against their same-run baseline, never through absolute FID or times.", ""]

    out += ["## Summary", "",
            table(["verdict", "count"], [[REPRODUCED, counts[REPRODUCED]], [NOT_REPRODUCED, counts[NOT_REPRODUCED]],
                                         [NOT_COMPARABLE, counts[NOT_COMPARABLE]]]), ""]
    compared = [c for c in comps if c.verdict != NOT_COMPARABLE]
    if compared:
        out += [table(["subject", "metric", "measured", "published", "Δ", "tolerance", "verdict", "reference", "notes"],
                      [[c.subject, c.metric, _num(c.measured), _published(c), _signed(c.delta),
                        f"±{c.tolerance:.3g}" if c.tolerance is not None else "–",
                        f"**{c.verdict}**" if c.verdict == NOT_REPRODUCED else c.verdict,
                        f"{c.uid} ({c.citation})", "; ".join(c.notes)] for c in compared]), ""]
    else:
        out += ["No measured number has a published counterpart under the same protocol.", ""]
    skipped = [c for c in comps if c.verdict == NOT_COMPARABLE]
    if skipped:
        out += ["<details>", f"<summary>Not comparable ({len(skipped)}): the protocols differ</summary>", "",
                table(["subject", "metric", "measured", "published", "reason", "reference"],
                      [[c.subject, c.metric, _num(c.measured), _published(c), c.reason, c.uid or "–"] for c in skipped]),
                "", "</details>", ""]

    out += speed_sections(report)

    out += ["## Plots", ""]
    if images:
        for name, rel in images.items():
            out += [f"![{PLOTS[name]}]({rel})" if not github else f"- {PLOTS[name]}: `{rel}` (attached with the report)"]
            out += [] if github else [""]
        out += [""] if github else []
    else:
        out += ["No plots: write the report with `--out` to get them (or no record has the metrics they need).", ""]

    out += ["## Protocol cards", ""]
    for path, record in zip(report.paths, report.records):
        main, base = compare.measured_subjects(record)
        rows = [["kind", record["kind"]], ["proxy", record.get("proxy", False)], ["created", record.get("created")]]
        rows += [[f"subject.{k}", v] for k, v in record["subject"].items()]
        rows += [[k, v] for k, v in sorted(record["protocol"].items())]
        rows += [[f"metric {k}", _num(v)] for k, v in record["metrics"].items()]
        if base is not None:
            rows += [["baseline", base.label]]
            rows += [[f"baseline protocol {k}", v] for k, v in sorted((record["baseline"].get("protocol") or {}).items())]
            rows += [[f"baseline metric {k}", _num(v)] for k, v in record["baseline"]["metrics"].items()]
        out += [f"### `{path.name}`: {main.label}", "", table(["field", "value"], rows), ""]

    out += ["## Environment", ""]
    envs = []
    for record in report.records:
        if record["environment"] not in envs:
            envs.append(record["environment"])
    keys = list(dict.fromkeys(k for env in envs for k in env))
    out += [table(["field", *[f"environment {i + 1}" for i in range(len(envs))]],
                  [[k, *[env.get(k) for env in envs]] for k in keys]), ""]

    warnings = [(p.name, w) for p, r in zip(report.paths, report.records) for w in r.get("warnings", [])]
    if warnings:
        out += ["## Warnings recorded by the runs", "", *[f"- `{name}`: {_cell(w)}" for name, w in warnings], ""]

    out += ["## Consistency of the published numbers", "",
            "Findings of `dit-bench lint-references` over `reference_results/` (the sources disagree with "
            "each other or with their own configuration):", ""]
    out += [table(["check", "severity", "finding"], [[f.check, f.severity, f.message] for f in report.findings])
            if report.findings else "No findings.", ""]

    out += ["## Tolerances", "",
            table(["metric", "tolerance"], [[m, rule] for m, (_, _, rule) in compare.TOLERANCES.items()]
                  + [["Δ metric", compare.DELTA_RULE], ["Δ metric (proxy)", compare.PROXY_DELTA_RULE]]),
            "", "Tolerances widen by the published value's last digit, its printed range and any read-off "
            "uncertainty stated in the reference row.", ""]
    return "\n".join(out)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _batch(protocol: dict) -> str:
    batch = "–" if protocol.get("batch_size") is None else str(protocol["batch_size"])
    return f"auto→{batch}" if protocol.get("batch_policy") == "auto" else batch


def speed_sections(report: Report) -> list[str]:
    """Every row of every `dit-bench speed` record: the measurement matrix, not only each record's headline."""
    out = []
    for path, record in zip(report.paths, report.records):
        extra = record.get("extra") or {}
        rows, train_rows = extra.get("rows") or [], extra.get("train_rows") or []
        if rows:  # the run's own settings, not those of the official code's rows timed beside
            first = next((r for r in rows if r["protocol"].get("code") != "official"), rows[0])["protocol"]
            out += [f"## Sampling speed: `{path.name}`", "",
                    f"{first['name']} protocol: {first['sampler']}, {first['steps']} steps, guidance "
                    f"{first['cfg_scale']}, VAE {first.get('vae')}, attention {first.get('attention')}"
                    f"{', compiled (' + str(first.get('compile_mode')) + ')' if first.get('compile') else ''}, on "
                    f"{first.get('gpu') or first.get('device_type')}. "
                    "s/img and img/s are the denoising loop's (VAE excluded); MFU against the dense datasheet "
                    "peak of the row's matmul precision; speed-up over the baseline (hooks) and over the "
                    "official code at the same batch (fixed) or at each one's saturating batch (auto).", "",
                    table(["model", "code / method", "precision", "attention", "compiled", "batch", "s/img", "img/s",
                           "MFU", "VAE s/img", "peak MB", "J/img", "speed-up", "vs official", "outcome"],
                          [[r["subject"]["model"],
                            "official code" if r["protocol"].get("code") == "official"
                            else ", ".join(r["subject"]["hooks"]["sample"]) or "baseline",
                            r["protocol"]["precision"], r["protocol"].get("attention"),
                            r["protocol"].get("compile_mode") if r["protocol"].get("compile") else "no",
                            _batch(r["protocol"]), _num(r["metrics"].get("s_per_image")),
                            _num(r["metrics"].get("images_per_s")), _pct(r["metrics"].get("mfu")),
                            _num(r["metrics"].get("vae_decode_s_per_image")),
                            _num(r["metrics"].get("peak_memory_mb")), _num(r["metrics"].get("joules_per_image")),
                            _num(r["metrics"].get("speedup")), _num(r["metrics"].get("speedup_vs_official")),
                            (r.get("extra") or {}).get("outcome", "ok")] for r in rows]), ""]
        if train_rows:
            out += [f"## Training speed: `{path.name}`", "",
                    f"One optimiser step (forward, loss, backward, AdamW, EMA) at global batch "
                    f"{train_rows[0]['protocol'].get('global_batch_size')}; speed-up over the first configuration "
                    "that ran.", "",
                    table(["model", "config", "train hooks", "precision", "steps/s", "peak MB", "speed-up", "outcome"],
                          [[r["subject"]["model"], r["protocol"].get("train_config"),
                            ", ".join(r["protocol"].get("train_hooks") or []), r["protocol"].get("precision"),
                            _num(r["metrics"].get("steps_per_s")), _num(r["metrics"].get("peak_memory_mb")),
                            _num(r["metrics"].get("speedup")), (r.get("extra") or {}).get("outcome", "ok")]
                           for r in train_rows]), ""]
    return out


# ---------------------------------------------------------------------------------------------------
# Plots

def _points(report: Report):
    """(label, method, proxy, metrics) for every subject of every record, baselines included; labels that
    would collide (the same subject in two files) carry their file's name."""
    points = []
    for path, record in zip(report.paths, report.records):
        main, base = compare.measured_subjects(record)
        for subject in (main, base):
            if subject is not None:
                points.append([subject.label, subject.method, subject.proxy, subject.metrics, path.stem])
    labels = [p[0] for p in points]
    for p in points:
        if labels.count(p[0]) > 1:
            p[0] = f"{p[0]} ({p[4]})"
    return [tuple(p[:4]) for p in points]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other point beats on both axes (lower time and lower FID), ordered by time."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def _save(fig, path: Path) -> Path:
    with atomic.atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")
    return path


def _figure(width=6.4, height=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _speed_fid(points, path: Path) -> Path | None:
    groups = {}
    for label, method, proxy, metrics in points:
        if "fid" in metrics and "s_per_image" in metrics:
            groups.setdefault(proxy, []).append((label, method, metrics["s_per_image"], metrics["fid"]))
    if not groups:
        return None
    fig = _figure(6.4 * len(groups), 4.4)
    for i, (proxy, pts) in enumerate(sorted(groups.items())):
        ax = fig.add_subplot(1, len(groups), i + 1)
        methods = sorted({m for _, m, _, _ in pts})
        for method in methods:
            xs = [x for _, m, x, _ in pts if m == method]
            ys = [y for _, m, _, y in pts if m == method]
            ax.scatter(xs, ys, label=method, s=40)
        for label, _, x, y in pts:
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = pareto_front([(x, y) for _, _, x, y in pts])
        ax.plot([x for x, _ in front], [y for _, y in front], "k--", linewidth=1, label="Pareto front")
        ax.margins(0.2)
        ax.set_xlabel("seconds per image")
        ax.set_ylabel("FID (proxy features)" if proxy else "FID")
        ax.set_title("proxy task" if proxy else "measured")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _bars(points, metric: str, xlabel: str, path: Path) -> Path | None:
    groups = {}
    for label, _, proxy, metrics in points:
        if metric in metrics:
            groups.setdefault(proxy, []).append((label, metrics[metric]))
    if not groups:
        return None
    n = sum(len(g) for g in groups.values())
    fig = _figure(7.0, 0.9 * len(groups) + 0.45 * n)
    grid = fig.add_gridspec(len(groups), 1, height_ratios=[len(g) for _, g in sorted(groups.items())])
    for i, (proxy, pts) in enumerate(sorted(groups.items())):
        ax = fig.add_subplot(grid[i, 0])
        labels, values = zip(*pts)
        ax.barh(range(len(pts)), values, color="tab:orange" if proxy else "tab:blue")
        ax.set_yticks(range(len(pts)), labels=labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.2)
        for j, v in enumerate(values):
            ax.annotate(_num(v), (v, j), fontsize=7, xytext=(3, -3), textcoords="offset points")
        ax.set_title("proxy task (CPU)" if proxy else "measured", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(xlabel)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(report: Report, directory: Path) -> dict[str, Path]:
    """Write the PNGs that the records have data for; returns {plot name: path}."""
    directory.mkdir(parents=True, exist_ok=True)
    points = _points(report)
    made = {
        "speed_fid": _speed_fid(points, directory / "speed_fid.png"),
        "s_per_image": _bars(points, "s_per_image", "seconds per image (lower is faster)", directory / "s_per_image.png"),
        "memory": _bars(points, "peak_memory_mb", "peak memory (MB)", directory / "memory.png"),
    }
    return {name: path for name, path in made.items() if path is not None}


# ---------------------------------------------------------------------------------------------------
# Files

def write_text_atomic(path: Path, text: str) -> Path:
    return atomic.write_text(path, text)


def write_report(report: Report, out: Path) -> tuple[Path, dict[str, Path]]:
    """reports/NAME.md plus its PNGs in reports/NAME_files/ (linked relatively, so the folder moves whole)."""
    if out.suffix.lower() != ".md":
        raise UserError(f"--out {out}: the report is markdown; give a path ending in .md")
    pngs = write_plots(report, out.parent / f"{out.stem}_files")
    images = {name: f"{out.stem}_files/{path.name}" for name, path in pngs.items()}
    write_text_atomic(out, render_markdown(report, images))
    return out, pngs


def append_github_summary(report: Report, images: dict[str, str] | None = None) -> Path:
    """Append the report to the job summary GitHub Actions names in $GITHUB_STEP_SUMMARY."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        raise UserError("--github-summary needs $GITHUB_STEP_SUMMARY (set by GitHub Actions); "
                        "outside Actions use --out reports/NAME.md")
    with open(target, "a") as fh:
        fh.write(render_markdown(report, images, github=True) + "\n")
    return Path(target)
