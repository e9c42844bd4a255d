"""`dit-bench reproduce METHOD`: a paper's protocol end to end, sample -> evaluate -> speed -> compare -> report.

What a run does comes from the method's plug-in (``Method.recipes[preset]``, plain data); this module
never names a method. A ``sampling`` recipe samples the method and a paired baseline (the same model
without the method's sample hooks, the same per-sample seeds, so image i of both differ only by the
method), evaluates both against the same reference, times both in one speed run, compares ratios and
deltas with ``reference_results/`` and writes ``report.md`` with its PNGs and raw JSON.

Stages are resumable: each one writes its output under the run directory and records in
``stages.json`` the fingerprint of what it was computed from; a stage whose fingerprint and outputs are
unchanged is skipped, so running the same command again recomputes nothing, and an interrupted run
continues where it stopped (sampling continues inside its shards).

Presets: ``paper`` is the published protocol (official checkpoints, VAE, ADM reference batch; every
asset is resolved before any work starts, so an offline machine gets the one-line asset message at
once). ``tiny`` is the embedded default: the proxy digits task of bench/proxy.py, proxy models declared
by the recipes (``proxy_models``) and shipped in bench/proxy_assets; its records carry ``proxy: true``.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench import plugins
from bench.atomic import atomic_open
from bench.errors import UserError
from bench.results import write_json_atomic

PRESETS = ("paper", "tiny")
STAGES_FILE = "stages.json"
# paired sampling (inference methods) | paired training runs (training methods) | training-step speed of
# train-hook configurations (bench.speed's training rows) | MACs/params of registered models (+ CPU forward times)
KINDS = ("sampling", "training", "training-speed", "architecture")
PROXY_PREFIX = "proxy:"
PROXY_REFERENCE = "proxy:digits-heldout"
TRAIN_DATA_FILE = "digits-train.npz"


class ReproduceError(UserError):
    """A reproduction that cannot start: unknown preset, a method without a recipe, bad options."""


# ------------------------------------------------------------------------------------------ recipes
def recipe_for(method: str, preset: str) -> dict:
    """The method's recipe for ``preset``, with the run-time defaults filled in."""
    if preset not in PRESETS:
        raise ReproduceError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    m = plugins.get_method(method)
    recipes = m.recipes or {}
    if preset not in recipes:
        have = ", ".join(recipes) or "none"
        raise ReproduceError(f"method {method!r} has no {preset!r} reproduction recipe (it has: {have}); "
                             f"methods with one: {', '.join(with_recipe(preset)) or 'none'}")
    recipe = json.loads(json.dumps(recipes[preset]))  # a private copy: overrides never touch the plug-in
    recipe.setdefault("hooks", [])
    recipe.setdefault("hook_options", {})
    recipe.setdefault("protocol", {})
    recipe.setdefault("assets", [])
    recipe.setdefault("checkpoint", None)
    recipe.setdefault("seed", 0)
    return recipe


def with_recipe(preset: str) -> list[str]:
    return [name for name, m in plugins.methods().items() if preset in (m.recipes or {})]


def proxy_models() -> dict[str, tuple[str, dict]]:
    """Every proxy model the installed recipes declare: {name: (owning method, declaration)}."""
    out: dict[str, tuple[str, dict]] = {}
    for name, m in plugins.methods().items():
        for recipe in (m.recipes or {}).values():
            for model, decl in (recipe.get("proxy_models") or {}).items():
                out.setdefault(model, (name, decl))
    return out


def register_proxy_models() -> list[str]:
    """Add the recipes' proxy models to their owners in the registry (for this process).

    A proxy model is an official architecture class at another size (``base`` gives the class), so
    checkpoints of it load through bench.checkpoints like any other; its owner stays the method that
    declares it, so records and comparisons name it as that method's model.
    """
    known = plugins.models()
    added = []
    registry = plugins.methods()
    for name, (owner, decl) in proxy_models().items():
        if name in known:
            continue
        base = known[decl["base"]]
        spec = dataclasses.replace(base, name=name, config=dict(decl["config"]),
                                   default_input_size=decl.get("input_size", 16), checkpoints={},
                                   description=decl.get("description", ""))
        method = registry[owner]
        registry[owner] = dataclasses.replace(method, models=method.models + (spec,))
        added.append(name)
    return added


def proxy_asset(name: str) -> Path:
    from bench.proxy import ASSET_DIR

    return ASSET_DIR / name


def resolve_checkpoint(checkpoint: str | None) -> str | None:
    if checkpoint and checkpoint.startswith(PROXY_PREFIX):
        path = proxy_asset(checkpoint[len(PROXY_PREFIX):])
        if not path.is_file():
            raise ReproduceError(f"the shipped proxy checkpoint {path} is missing; re-create it with "
                                 "`dit-bench proxy-assets`")
        return str(path)
    return checkpoint


def check_assets(recipe: dict) -> None:
    """Resolve every asset the recipe needs before any work: offline, the first missing one stops the run."""
    from bench import assets

    for name in recipe["assets"]:
        assets.resolve(name, download=not assets.offline())


# ------------------------------------------------------------------------------------------ stages
class Stages:
    """``stages.json``: for each finished stage, the fingerprint of its inputs and its output files."""

    def __init__(self, run_dir: Path, say: Callable[[str], None]):
        self.run_dir = run_dir
        self.path = run_dir / STAGES_FILE
        self.say = say
        self.state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.ran: list[str] = []
        self.reused: list[str] = []

    def done(self, name: str, key: dict) -> bool:
        entry = self.state.get(name)
        return bool(entry and entry["key"] == fingerprint(key)
                    and all((self.run_dir / p).exists() for p in entry["outputs"]))

    def run(self, name: str, key: dict, outputs: list[str], fn: Callable[[], None]) -> bool:
        """Run ``fn`` unless the stage is done with this key; returns True when it ran."""
        if self.done(name, key):
            self.reused.append(name)
            self.say(f"{name}: reused ({', '.join(outputs)})")
            return False
        started = time.perf_counter()
        fn()
        self.state[name] = {"key": fingerprint(key), "outputs": outputs,
                            "seconds": round(time.perf_counter() - started, 3)}
        write_json_atomic(self.path, self.state)
        self.ran.append(name)
        self.say(f"{name}: done in {self.state[name]['seconds']:.1f} s")
        return True


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_sha(path: Path) -> str:
    from bench.assets import sha256_of

    return sha256_of(Path(path))


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Options:
    method: str
    preset: str = "tiny"
    out: Path | None = None
    num_samples: int | None = None
    steps: str | None = None  # overrides the sampling steps (shortened runs)
    speed_steps: int | None = None
    speed_batches: tuple[int, ...] | None = None
    train_steps: int | None = None  # training recipes: shorten both runs
    ckpt_every: int | None = None  # training recipes: evaluate every N steps
    batch_size: int | None = None
    nproc_per_node: int = 1
    device: str | None = None
    progress: bool = False
    overrides: dict = field(default_factory=dict)


def default_out(method: str, preset: str) -> Path:
    return Path("reports") / f"{method}-{preset}-{_dt.date.today().isoformat()}"


def plan(opts: Options) -> dict:
    """The recipe with the command line's overrides applied (what the run will do)."""
    recipe = recipe_for(opts.method, opts.preset)
    if recipe["kind"] not in KINDS:
        raise ReproduceError(f"recipe kind {recipe['kind']!r} of {opts.method!r} is not one of {', '.join(KINDS)}")
    if recipe["kind"] in ("training-speed", "architecture"):
        if opts.nproc_per_node != 1:
            raise ReproduceError(f"a {recipe['kind']} recipe runs in one process; drop --nproc-per-node")
        given = {"--num-samples": opts.num_samples, "--steps": opts.steps, "--speed-steps": opts.speed_steps,
                 "--speed-batch": opts.speed_batches, "--batch-size": opts.batch_size,
                 "--train-steps": opts.train_steps, "--ckpt-every": opts.ckpt_every}
        unused = [name for name, value in given.items() if value]
        if unused:
            raise ReproduceError(f"{', '.join(unused)} do not apply to a {recipe['kind']} recipe (it samples and "
                                 "trains nothing); drop them")
        return recipe
    if recipe["kind"] == "training" and opts.train_steps is not None:
        if opts.train_steps < 1:
            raise ReproduceError("--train-steps must be at least 1")
        t = recipe["train"]
        t["steps"] = opts.train_steps
        t["ckpt_every"] = min(t["ckpt_every"], opts.train_steps) if opts.ckpt_every is None else opts.ckpt_every
    elif opts.ckpt_every is not None:
        recipe.setdefault("train", {})["ckpt_every"] = opts.ckpt_every
    s = recipe["sampling"]
    if opts.num_samples is not None:
        if opts.num_samples < 1:
            raise ReproduceError("--num-samples must be at least 1")
        s["num_samples"] = opts.num_samples
    if opts.steps is not None:
        s["steps"] = str(opts.steps)
    if opts.batch_size is not None:
        s["batch_size"] = opts.batch_size
    speed = recipe.get("speed")
    if speed is not None:
        if opts.speed_steps is not None:
            speed["steps"] = opts.speed_steps
        if opts.speed_batches:
            speed["batches"] = list(opts.speed_batches)
    if opts.nproc_per_node < 1:
        raise ReproduceError("--nproc-per-node must be at least 1")
    return recipe


def sampling_protocol(recipe: dict, hooks: list[str], device_type: str):
    from bench import sampling

    s = recipe["sampling"]
    checkpoint = resolve_checkpoint(recipe["checkpoint"])
    sha = None
    if checkpoint is not None:
        from bench import assets

        sha = file_sha(assets.resolve(checkpoint))
    return sampling.SamplingProtocol(
        model=recipe["model"], image_size=recipe["image_size"], num_samples=s["num_samples"], checkpoint=checkpoint,
        checkpoint_sha256=sha, num_classes=recipe["num_classes"], sampler=s["sampler"], steps=str(s["steps"]),
        eta=s.get("eta", 0.0), cfg_scale=s["cfg_scale"], label_policy=s.get("labels", "random"),
        seed=recipe["seed"], precision=s.get("precision", "fp32"), vae=recipe["vae"], sample_hooks=tuple(hooks),
        hook_options={h: recipe["hook_options"].get(h, {}) for h in hooks}, device_type=device_type)


def sample_stage(protocol, out_dir: Path, batch_size: int, device, nproc: int, progress: bool) -> dict:
    """Sample into ``out_dir`` (resumable shards); under ``nproc`` > 1 through torchrun."""
    if nproc > 1:
        import subprocess

        cmd = torchrun_command(protocol, out_dir, batch_size, nproc, device)
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            raise ReproduceError(f"torchrun sampling exited with status {done.returncode}: {' '.join(cmd)}")
        return json.loads((out_dir / "manifest.json").read_text())
    from bench import sampling

    parts, _ = sampling.build_parts(protocol, device)
    return sampling.run(parts, protocol, out_dir, batch_size, device, progress=progress)


def torchrun_command(protocol, out_dir: Path, batch_size: int, nproc: int, device: str | None) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node K -m bench.reproduce sample ...``."""
    payload = json.dumps({"protocol": dataclasses.asdict(protocol), "out": str(out_dir), "batch_size": batch_size,
                          "device": device})
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "bench.reproduce", "sample", payload]


def _distributed_sample(payload: str) -> None:
    """One torchrun worker of the sampling stage (what ``torchrun_command`` launches)."""
    from bench import distributed, sampling

    register_proxy_models()
    args = json.loads(payload)
    fields = args["protocol"]
    fields["sample_hooks"] = tuple(fields["sample_hooks"])
    protocol = sampling.SamplingProtocol(**fields)
    world = distributed.init(args["device"])
    dev = distributed.default_device(world, args["device"])
    parts, _ = sampling.build_parts(protocol, dev)
    sampling.run(parts, protocol, Path(args["out"]), args["batch_size"], dev, world=world, progress=False)
    distributed.shutdown()


def write_proxy_reference(path: Path) -> None:
    """The proxy FID reference: the 297 held-out digits (bench.proxy.split), as an ADM batch (arr_0)."""
    from bench import proxy

    _, (images, labels) = proxy.split(*proxy.digits_images())
    with atomic_open(path, "wb") as fh:
        np.savez(fh, arr_0=images, arr_1=labels)


def quality_record(result: dict, subject: dict, protocol: dict, baseline: dict | None, proxy: bool) -> dict:
    from bench import results

    full = {**protocol, **{k: result["protocol"][k] for k in ("num_samples", "evaluator")},
            "reference": result["protocol"]["reference"], "feature_network_sha256":
            result["protocol"]["feature_network_sha256"]}
    return results.make_record("quality", subject, full, result["metrics"], baseline=baseline, proxy=proxy,
                               warnings=result["warnings"], extra={"samples": result["subject"]})


def reproduce(opts: Options, say: Callable[[str], None] = lambda s: None) -> dict:
    """Run (or resume) a reproduction; returns a summary with the report path and the stages run/reused."""
    import torch

    from bench import results

    recipe = plan(opts)
    check_assets(recipe)  # before any work: offline, a missing asset is one line and nothing else happens
    register_proxy_models()
    proxy = bool(recipe.get("proxy", recipe.get("evaluator") == "proxy"))
    run_dir = Path(opts.out or default_out(opts.method, opts.preset))
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages(run_dir, say)
    device = torch.device(opts.device) if opts.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    plan_file = {"method": opts.method, "preset": opts.preset, "recipe": recipe}
    if not (run_dir / "recipe.json").is_file() or json.loads((run_dir / "recipe.json").read_text()) != plan_file:
        write_json_atomic(run_dir / "recipe.json", plan_file)

    if recipe["kind"] in ("training", "training-speed", "architecture"):
        run = {"training": training_run, "training-speed": training_speed_run,
               "architecture": architecture_run}[recipe["kind"]]
        summary = run(recipe, opts, run_dir, stages, device)
        return {**summary, "run_dir": str(run_dir), "report": str(run_dir / "report.md"), "ran": stages.ran,
                "reused": stages.reused, "seconds": round(time.perf_counter() - started, 3), "proxy": proxy}

    # ---- sample: the baseline (no sample hooks) and the method, same seeds
    s = recipe["sampling"]
    arms = {"baseline": []}
    if recipe["hooks"]:
        arms["method"] = list(recipe["hooks"])
    manifests = {}
    for arm, hooks in arms.items():
        protocol = sampling_protocol(recipe, hooks, device.type)
        out_dir = run_dir / "samples" / arm
        key = {"protocol": protocol.identity()}

        def _sample(protocol=protocol, out_dir=out_dir):
            sample_stage(protocol, out_dir, s.get("batch_size", 32), device, opts.nproc_per_node, opts.progress)

        stages.run(f"sample-{arm}", key, [f"samples/{arm}/samples.npz", f"samples/{arm}/manifest.json"], _sample)
        manifests[arm] = json.loads((out_dir / "manifest.json").read_text())

    # ---- evaluate: both arms against the same reference
    reference = recipe["reference"]
    if reference == PROXY_REFERENCE:
        ref_path = run_dir / "reference-digits-heldout.npz"
        if not ref_path.is_file():
            write_proxy_reference(ref_path)
        reference = str(ref_path)
    qualities = {}
    for arm in arms:
        samples = run_dir / "samples" / arm / "samples.npz"
        out = run_dir / f"quality-{arm}.json"
        key = {"samples": manifests[arm]["samples_sha256"], "reference": str(recipe["reference"]),
               "evaluator": recipe["evaluator"]}

        def _evaluate(samples=samples, out=out):
            from bench.metrics.evaluate import evaluate

            # proxy features take a second: no feature cache beside the samples (the stage output is the cache)
            result = evaluate(reference, samples, backend=recipe["evaluator"], device=opts.device,
                              pr_engine="torch" if proxy else "tf", cache=not proxy)
            write_json_atomic(out, result)

        stages.run(f"evaluate-{arm}", key, [out.name], _evaluate)
        qualities[arm] = json.loads(out.read_text())

    # ---- the quality record: the method with its same-run baseline (or the baseline alone)
    owner = next(name for name, m in plugins.methods().items() if any(x.name == recipe["model"] for x in m.models))
    steps = str(s["steps"]).removeprefix("ddim")
    card = {"sampler": s["sampler"], "steps": int(steps) if steps.isdigit() else s["steps"],
            "cfg_scale": s["cfg_scale"], "precision": s.get("precision", "fp32"), "vae": recipe["vae"],
            "framework": "pytorch", "seed": recipe["seed"], "labels": s.get("labels", "random"),
            "device_type": device.type, "num_gpus": opts.nproc_per_node if device.type == "cuda" else 0}
    base_subject = {"method": owner, "model": recipe["model"], "resolution": recipe["image_size"],
                    "hooks": {"sample": []}}
    base_card = {**card, "key_steps": "all"}

    def _quality_record():
        if "method" in arms:
            subject = {"method": opts.method, "model": recipe["model"], "resolution": recipe["image_size"],
                       "hooks": {"sample": arms["method"]}}
            baseline = {"subject": base_subject, "protocol": {"key_steps": "all"},
                        "metrics": qualities["baseline"]["metrics"]}
            record = quality_record(qualities["method"], subject, {**card, **recipe["protocol"]}, baseline, proxy)
        else:
            record = quality_record(qualities["baseline"], base_subject, base_card, None, proxy)
        results.save(record, run_dir / "quality.json")

    key = {"qualities": {arm: file_sha(run_dir / f"quality-{arm}.json") for arm in arms}, "card": card,
           "protocol": recipe["protocol"], "method": opts.method}
    stages.run("record", key, ["quality.json"], _quality_record)
    record_files = [run_dir / "quality.json"]

    # ---- speed: baseline and method in one run, the recipe's timing protocol
    speed = recipe.get("speed")
    if speed is not None:
        out = run_dir / "speed.json"
        key = {"speed": speed, "model": recipe["model"], "hooks": recipe["hooks"], "device": device.type}
        stages.run("speed", key, [out.name], lambda: speed_stage(recipe, speed, device, out, proxy, say))
        record_files.append(out)

    # ---- compare + report (cheap, but skipped too when nothing it reads changed)
    report_path = run_dir / "report.md"
    key = {"records": [file_sha(p) for p in record_files], "grid": [m["samples_sha256"] for m in manifests.values()],
           "references": _reference_stamp()}
    stages.run("report", key, ["report.md", "report_files/grid.png"],
               lambda: write_reproduction_report(run_dir, record_files, recipe, opts, manifests, stages))
    summary = {"run_dir": str(run_dir), "report": str(report_path), "ran": stages.ran, "reused": stages.reused,
               "seconds": round(time.perf_counter() - started, 3), "proxy": proxy}
    return summary


def _reference_stamp() -> str:
    from bench import reference

    refs = reference.load_all()
    return fingerprint(sorted(r["uid"] + repr(r["value"]) for r in refs.rows))


def speed_stage(recipe: dict, speed: dict, device, out: Path, proxy: bool, say) -> None:
    """Baseline and method timed in one ``bench.speed`` run; proxy runs are labelled as such."""
    from bench import results
    from bench import speed as speeds

    hooks = tuple(recipe["hooks"])
    options = speed.get("hook_options", {h: recipe["hook_options"].get(h, {}) for h in hooks})
    config = speeds.SpeedConfig(
        models=(recipe["model"],), hooks=hooks, hook_options=options, protocol=speed.get("protocol", "paper"),
        batches=tuple(speed["batches"]), steps=int(speed["steps"]), cfg_scale=speed.get("cfg_scale"),
        image_size=recipe["image_size"], num_classes=recipe["num_classes"],
        vae=recipe["vae"] if recipe["vae"] == "identity" else "none",
        warmup=speed.get("warmup"), repeats=speed.get("repeats"))
    record = speeds.run(config, device, say=say)
    for row in [record, *record["extra"]["rows"]]:
        row["proxy"] = proxy
        if row["subject"]["hooks"]["sample"]:
            # the hook's settings in reference_results' vocabulary (e.g. key_steps "speed-rule")
            row["protocol"].update(speed.get("labels", {}))
    results.save(record, out)


# ------------------------------------------------------------------------------------------ report
def write_reproduction_report(run_dir: Path, record_files: list[Path], recipe: dict, opts: Options,
                              manifests: dict, stages: Stages) -> Path:
    from bench import report as reports

    built = reports.build(record_files)
    files = run_dir / "report_files"
    pngs = reports.write_plots(built, files)
    grid = side_by_side_grid(run_dir, manifests, files / "grid.png", recipe)
    images = {name: f"report_files/{path.name}" for name, path in pngs.items()}
    body = reports.render_markdown(built, images)
    header = reproduction_header(recipe, opts, built, manifests, stages, grid)
    # The generic report follows the reproduction's own header, one level down.
    body = body.replace("# dit-bench report", "## Measured vs published (bench.compare)", 1)
    return reports.write_text_atomic(run_dir / "report.md", header + "\n" + body)


def side_by_side_grid(run_dir: Path, manifests: dict, path: Path, recipe: dict, per_arm: int = 20) -> Path:
    """The first images of each arm, same seeds, side by side: what the measured ΔFID looks like."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(manifests)
    loaded = {}
    for arm in arms:
        with np.load(run_dir / "samples" / arm / "samples.npz") as f:
            loaded[arm] = (f["arr_0"], f["arr_1"])
    # The same sample indices in every arm, spread over the classes (the first ones of each, in turn).
    labels = loaded[arms[0]][1]
    by_class = [np.flatnonzero(labels == c).tolist() for c in np.unique(labels)]
    chosen = [ids[k] for k in range(max(map(len, by_class))) for ids in by_class if k < len(ids)][:per_arm]
    batches = {arm: (images[chosen], lab[chosen]) for arm, (images, lab) in loaded.items()}
    n = min(len(b[0]) for b in batches.values())
    cols = min(n, 10)
    rows = -(-n // cols)
    side = batches[arms[0]][0].shape[1]
    pad = max(1, side // 8)
    height, width = rows * (side + pad) + pad, cols * (side + pad) + pad
    fig, axes = plt.subplots(1, len(arms), figsize=(5.0 * len(arms), 5.0 * height / width + 0.9), squeeze=False)
    for ax, arm in zip(axes[0], arms):
        images = batches[arm][0]
        canvas = np.full((height, width, 3), 255, np.uint8)
        for k in range(n):
            r, c = divmod(k, cols)
            y, x = pad + r * (side + pad), pad + c * (side + pad)
            canvas[y: y + side, x: x + side] = images[k]
        ax.imshow(canvas, interpolation="nearest")
        ax.set_title(arm if arm == "baseline" else f"method: {'+'.join(recipe['hooks'])}", fontsize=10)
        ax.axis("off")
    fig.suptitle("Same seeds (sample i of each arm shares its label and noise)", fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path


def reproduction_header(recipe: dict, opts: Options, built, manifests: dict, stages: Stages, grid: Path) -> str:
    s = recipe["sampling"]
    proxy = recipe["evaluator"] == "proxy"
    lines = [f"# Reproduction: {opts.method} ({opts.preset} preset)", ""]
    if proxy:
        lines += ["> **Proxy run.** The embedded default: 16x16 handwritten digits (scikit-learn) in pixel space, a "
                  f"proxy model ({recipe['model']}, shipped in bench/proxy_assets), proxy FID from a small digits "
                  "classifier. Its numbers are **proxy numbers**: they say nothing about ImageNet; they are compared "
                  "with the papers only through ratios (speed-up) and relative deltas (ΔFID sign and size) against "
                  "the same-run baseline, never absolutely.", ""]
    lines += ["## Protocol", "",
              "| setting | value |", "| --- | --- |",
              f"| model | {recipe['model']} ({recipe['image_size']} px, {recipe['num_classes']} classes, VAE "
              f"{recipe['vae']}) |",
              f"| sample hooks of the method | {', '.join(recipe['hooks']) or 'none (baseline only)'} |",
              f"| hook options | {json.dumps(recipe['hook_options']) if recipe['hook_options'] else '-'} |",
              f"| sampling | {s['sampler']} {s['steps']} steps, CFG {s['cfg_scale']}, {s['num_samples']} samples "
              f"per arm, labels {s.get('labels', 'random')}, seed {recipe['seed']}, {s.get('precision', 'fp32')} |",
              f"| evaluation | backend {recipe['evaluator']}, reference {recipe['reference']} |"]
    speed = recipe.get("speed")
    if speed:
        lines.append(f"| speed | protocol {speed.get('protocol', 'paper')}, {speed['steps']} steps, batches "
                     f"{', '.join(map(str, speed['batches']))}, CFG {speed.get('cfg_scale')} |")
    quality = next(r for r in built.records if r["kind"] == "quality")
    base = (quality.get("baseline") or {}).get("metrics")
    lines += ["", "## Quality: method vs baseline (same seeds)" if base else "## Quality", ""]
    names = (("fid", "FID"), ("sfid", "sFID"), ("inception_score", "IS"), ("precision", "Precision"),
             ("recall", "Recall"))
    prefix = "proxy " if proxy else ""
    if base:
        lines += [f"| metric | baseline | {opts.method} | Δ | Δ relative |", "| --- | ---: | ---: | ---: | ---: |"]
        for key, label in names:
            b, m = base.get(key), quality["metrics"].get(key)
            if b is None or m is None:
                continue
            rel = f"{100 * (m - b) / b:+.1f}%" if b else "-"
            lines.append(f"| {prefix}{label} | {b:.4g} | {m:.4g} | {m - b:+.4g} | {rel} |")
    else:
        lines += ["| metric | value |", "| --- | ---: |"]
        for key, label in names:
            if quality["metrics"].get(key) is not None:
                lines.append(f"| {prefix}{label} | {quality['metrics'][key]:.4g} |")
    lines += ["", f"![{'baseline and method' if base else 'samples'}, same seeds](report_files/{grid.name})", ""]
    speed_rows = [r for r in built.records if r["kind"] == "speed"]
    if speed_rows:
        lines += ["## Speed: same model, same batch, one run", "",
                  "| batch | baseline s/image | method s/image | speed-up | ideal (FLOP bound) |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        rows = speed_rows[0]["extra"]["rows"]
        by_batch: dict = {}
        for row in rows:
            by_batch.setdefault(row["protocol"]["batch_size"], {})[
                "method" if row["subject"]["hooks"]["sample"] else "baseline"] = row["metrics"]
        for batch, arms in by_batch.items():
            b, m = arms.get("baseline", {}), arms.get("method", {})
            lines.append(f"| {batch} | {_fmt(b.get('s_per_image'))} | {_fmt(m.get('s_per_image'))} | "
                         f"{_fmt(m.get('speedup'), '.3f')} | {_fmt(m.get('ideal_speedup'), '.3f')} |")
        lines.append("")
    lines += ["## Stages", "",
              f"Computed in this invocation: {', '.join(stages.ran) or 'nothing'}; reused: "
              f"{', '.join(stages.reused) or 'nothing'}. Sampling manifests: "
              + "; ".join(f"{arm}: {m['computed_now']} computed, {m['reused']} reused, "
                          f"{m.get('seconds_this_run', 0):.1f} s" for arm, m in manifests.items()) + ".",
              "", "Raw JSON beside this file: `quality.json`, `quality-*.json`, `speed.json`, `samples/*/manifest.json`, "
              "`recipe.json`, `stages.json`.", ""]
    return "\n".join(lines)


def _fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


# ------------------------------------------------------------------------------------------ training recipes
def training_run(recipe: dict, opts: Options, run_dir: Path, stages: Stages, device) -> dict:
    """Baseline and method trained from the same initialisation, data order and noise for the same steps;
    proxy FID of each checkpoint; FID against steps and the convergence-speed ratio."""
    from bench import training

    t, s = recipe["train"], recipe["sampling"]
    data = run_dir / TRAIN_DATA_FILE
    if not data.is_file():
        write_train_data(data)
    reference = run_dir / "reference-digits-heldout.npz"
    if not reference.is_file():
        write_proxy_reference(reference)
    arms = {"baseline": [], "method": list(recipe["hooks"])}
    checkpoints = sorted({*range(t["ckpt_every"], t["steps"] + 1, t["ckpt_every"]), t["steps"]})
    curves: dict[str, list[list[float]]] = {}
    for arm, hooks in arms.items():
        config = training.TrainConfig(
            model=recipe["model"], data=str(data), out=str(run_dir / "train" / arm), vae=recipe["vae"],
            global_batch_size=t["global_batch_size"], steps=t["steps"], lr=t["lr"], ema_decay=t["ema_decay"],
            hooks=tuple(hooks), hook_options={h: recipe["hook_options"].get(h, {}) for h in hooks},
            ckpt_every=t["ckpt_every"], log_every=min(100, t["ckpt_every"]), seed=t.get("seed", 0), num_workers=0)
        card = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out", "data")}

        def _train(config=config):
            resume = any((Path(config.out) / training.CHECKPOINT_DIR).glob("*.pt"))
            training.train(config, device=device, resume=resume, progress=opts.progress)

        stages.run(f"train-{arm}", card, [f"train/{arm}/{training.CHECKPOINT_DIR}/{t['steps']:07d}.pt"], _train)
        curves[arm] = []
        for step in checkpoints:
            ckpt = run_dir / "train" / arm / training.CHECKPOINT_DIR / f"{step:07d}.pt"
            recipe_at = {**recipe, "checkpoint": str(ckpt)}
            protocol = sampling_protocol(recipe_at, [], device.type)
            out_dir = run_dir / "curve" / arm / f"{step:07d}"
            stages.run(f"sample-{arm}-{step}", {"protocol": protocol.identity()},
                       [f"curve/{arm}/{step:07d}/samples.npz"],
                       lambda protocol=protocol, out_dir=out_dir: sample_stage(
                           protocol, out_dir, s.get("batch_size", 32), device, 1, opts.progress))
            quality = out_dir / "quality.json"

            def _evaluate(out_dir=out_dir, quality=quality):
                from bench.metrics.evaluate import evaluate

                write_json_atomic(quality, evaluate(str(reference), out_dir / "samples.npz", backend="proxy",
                                                    device=opts.device, pr_engine="torch", cache=False))

            stages.run(f"evaluate-{arm}-{step}", {"samples": file_sha(out_dir / "samples.npz")},
                       [f"curve/{arm}/{step:07d}/quality.json"], _evaluate)
            curves[arm].append([step, json.loads(quality.read_text())["metrics"]["fid"]])

    ratio, how = convergence_speedup(curves["baseline"], curves["method"])
    stages.run("report", {"curves": curves, "recipe": recipe, "references": _reference_stamp()},
               ["train.json", "report.md", "report_files/fid_vs_steps.png"],
               lambda: _training_record_and_report(recipe, opts, run_dir, stages, device, curves, ratio, how))
    return {"convergence_speedup": ratio}


def _training_record_and_report(recipe, opts, run_dir, stages, device, curves, ratio, how) -> None:
    from bench import results

    t, s = recipe["train"], recipe["sampling"]
    arms = {"method": list(recipe["hooks"])}
    owner = next(name for name, m in plugins.methods().items() if any(x.name == recipe["model"] for x in m.models))
    base_fid, method_fid = curves["baseline"][-1][1], curves["method"][-1][1]
    record = results.make_record(
        "train", {"method": opts.method, "model": recipe["model"], "resolution": recipe["image_size"],
                  "hooks": {"train": arms["method"]}},
        {"global_batch_size": t["global_batch_size"], "training_steps": t["steps"], "lr": t["lr"],
         "ema_decay": t["ema_decay"], "vae": recipe["vae"], "sampler": s["sampler"], "steps": str(s["steps"]),
         "cfg_scale": s["cfg_scale"], "num_samples": s["num_samples"], "evaluator": "proxy",
         "device_type": device.type, "seed": t.get("seed", 0)},
        {"fid": method_fid, "convergence_speedup": ratio},
        baseline={"subject": {"method": owner, "hooks": {"train": []}}, "metrics": {"fid": base_fid}},
        proxy=True, extra={"curves": curves, "convergence": how})
    results.save(record, run_dir / "train.json")
    write_training_report(run_dir, record, recipe, opts, stages)


def convergence_speedup(baseline: list, method: list) -> tuple[float | None, str]:
    """Steps the baseline needs for its final FID over the steps the method needs for the same FID.

    The method's step is read off its curve by linear interpolation between evaluated checkpoints
    (the papers read the same off plotted curves); None when the method never gets there.
    """
    target_step, target = baseline[-1]
    previous = None
    for step, fid in method:
        if fid <= target:
            if previous is None or previous[1] == fid:
                reached = step
            else:
                (s0, f0) = previous
                reached = s0 + (f0 - target) / (f0 - fid) * (step - s0)
            return target_step / reached, (f"baseline FID {target:.4g} at step {target_step}; method reaches it "
                                           f"at step {reached:.0f} (interpolated)")
        previous = (step, fid)
    return None, f"the method does not reach the baseline's final FID {target:.4g} within {method[-1][0]} steps"


def write_training_report(run_dir: Path, record: dict, recipe: dict, opts: Options, stages: Stages) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench import report as reports

    files = run_dir / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    curves = record["extra"]["curves"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for arm, points in curves.items():
        label = "baseline (DiT)" if arm == "baseline" else f"{'+'.join(recipe['hooks'])}"
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("training steps")
    ax.set_ylabel("proxy FID (lower is better)")
    ax.set_title(f"{recipe['model']} on digits (proxy): FID against training steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(files / "fid_vs_steps.png", "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)

    t, s = recipe["train"], recipe["sampling"]
    ratio = record["metrics"]["convergence_speedup"]
    refs = [r for r in _references().find(method=opts.method, metric="convergence_speedup")]
    lines = [f"# Reproduction: {opts.method} ({opts.preset} preset)", "",
             "> **Proxy run.** Baseline and method trained from scratch on 16x16 digits in pixel space for the same "
             "steps (same initialisation, data order and noise); proxy FID from a small digits classifier. Compared "
             "with the paper only through the convergence-speed ratio, never absolute FID.", "",
             "## Protocol", "", "| setting | value |", "| --- | --- |",
             f"| model | {recipe['model']} ({recipe['image_size']} px, VAE {recipe['vae']}) |",
             f"| training | {t['steps']} steps, batch {t['global_batch_size']}, lr {t['lr']:g}, EMA {t['ema_decay']:g}, "
             f"checkpoint every {t['ckpt_every']} |",
             f"| method train hooks | {', '.join(recipe['hooks'])} |",
             f"| evaluation | EMA weights, {s['sampler']} {s['steps']}, CFG {s['cfg_scale']}, {s['num_samples']} "
             "samples per checkpoint, proxy FID vs the 297 held-out digits |", "",
             "## Proxy FID against training steps", "", "![FID vs steps](report_files/fid_vs_steps.png)", "",
             "| step | baseline | method |", "| ---: | ---: | ---: |"]
    for (step, b), (_, m) in zip(curves["baseline"], curves["method"]):
        lines.append(f"| {step} | {b:.4g} | {m:.4g} |")
    published = "; ".join(f"{r['value']:g}x ({r['uid']})" for r in refs) or "-"
    lines += ["", "## Convergence speed", "",
              f"Measured: **{'-' if ratio is None else f'{ratio:.2f}x'}** ({record['extra']['convergence']}). "
              f"Published: {published}.", "",
              f"Computed in this invocation: {', '.join(stages.ran) or 'nothing'}; reused: "
              f"{len(stages.reused)} stages. Raw JSON: `train.json`, `train/*/result.json`, `curve/*/*/quality.json`.",
              ""]
    return reports.write_text_atomic(run_dir / "report.md", "\n".join(lines))


def _references():
    from bench import reference

    return reference.load_all()


# ------------------------------------------------------------------------------------------ training-speed recipes
def training_speed_run(recipe: dict, opts: Options, run_dir: Path, stages: Stages, device) -> dict:
    """bench.speed's training rows for the recipe's train-hook configurations, all in one run: each row's
    speed-up and memory are ratios against the first configuration (the same-run baseline)."""
    out = run_dir / "train-speed.json"
    say = getattr(stages, "say", lambda s: None)
    if device.type != "cuda" and recipe.get("expects_gpu"):
        say(f"warning: {recipe['expects_gpu']}")
    key = {k: recipe[k] for k in ("models", "train_configs", "global_batch_size", "image_size", "num_classes", "vae",
                                  "warmup", "repeats") if k in recipe}
    key["device"] = device.type
    stages.run("train-speed", key, [out.name], lambda: _training_speed_stage(recipe, device, out, say))
    record = json.loads(out.read_text())
    stages.run("report", {"record": file_sha(out), "recipe": recipe, "references": _reference_stamp()},
               ["report.md"], lambda: _training_speed_report(run_dir, out, recipe, opts, stages))
    rows = record["extra"]["train_rows"]
    return {"train_speedup": {r["protocol"]["train_config"]: r["metrics"].get("speedup") for r in rows}}


def _training_speed_stage(recipe: dict, device, out: Path, say) -> None:
    from bench import results
    from bench import speed as speeds

    proxy = bool(recipe.get("proxy"))
    config = speeds.SpeedConfig(
        models=tuple(recipe["models"]), protocol=recipe.get("timing_protocol", "paper"), sample=False, train=True,
        train_configs=tuple(recipe["train_configs"]), global_batch_size=recipe["global_batch_size"],
        image_size=recipe["image_size"], num_classes=recipe["num_classes"], vae=recipe["vae"],
        warmup=recipe.get("warmup"), repeats=recipe.get("repeats"), reference_gpu=recipe.get("reference_gpu"))
    record = speeds.run(config, device, say=say)
    for row in [record, *record["extra"]["train_rows"]]:
        row["proxy"] = proxy
    results.save(record, out)


def published_ratio(refs, method: str, metric: str, hooks: list[str], base_hooks: list[str]) -> list[tuple[float, str]]:
    """Published ``metric`` of ``hooks`` over that of ``base_hooks``, both rows from one source."""
    from bench.reference import norm

    def rows(h):
        return [r for r in refs.rows if r["metric"] == metric and r["value"] is not None and r["role"] != "claim"
                and norm(r["method"]) == norm(method) and set(r["hooks"] or []) == set(h)]

    out = []
    for row in rows(hooks):
        for base in rows(base_hooks):
            # the row's own baseline link where it has one; else the same source and GPU count
            linked = row.get("baseline")
            same = (base["uid"] == linked if linked else base["source"] == row["source"] and base["uid"] != row["uid"]
                    and base["protocol"].get("num_gpus") == row["protocol"].get("num_gpus")
                    and base["protocol"].get("precision") in ("tf32", "fp32", None))
            if same and base["value"]:
                out.append((row["value"] / base["value"], f"{row['value']:g} / {base['value']:g} ({row['uid']} / "
                                                          f"{base['uid']})"))
    return out


def _training_speed_report(run_dir: Path, out: Path, recipe: dict, opts: Options, stages: Stages) -> Path:
    from bench import report as reports

    record = json.loads(out.read_text())
    rows = record["extra"]["train_rows"]
    refs = _references()
    proxy = bool(recipe.get("proxy"))
    lines = [f"# Reproduction: {opts.method} ({opts.preset} preset)", ""]
    if proxy:
        lines += ["> **Proxy run.** Training-step speed of a small model on this machine's "
                  f"{record['protocol']['device_type']}, random weights and random data. Compared with the "
                  "published numbers only through ratios against the same run's first configuration, never "
                  "through absolute steps/s or memory.", ""]
    lines += [*[f"- {note}" for note in recipe.get("notes", [])], "",
              "## Protocol", "", "| setting | value |", "| --- | --- |",
              f"| models | {', '.join(recipe['models'])} ({recipe['image_size']} px, VAE {recipe['vae']}) |",
              f"| global batch | {recipe['global_batch_size']} |",
              f"| configurations | {', '.join(recipe['train_configs'])} (baseline: the first) |",
              f"| timing | one optimiser step (forward, loss, backward, AdamW, EMA); warm-up "
              f"{record['extra']['request']['warmup']}, repeats {record['extra']['request']['repeats']}, median |",
              "", "## Training speed: ratios against the same-run baseline", "",
              "| model | config | train hooks | precision | steps/s | peak MB | speed-up | published speed-up | "
              "memory ratio | published memory ratio |",
              "| --- | --- | --- | --- | ---: | ---: | ---: | --- | ---: | --- |"]
    for r in rows:
        m, p, base = r["metrics"], r["protocol"], r.get("baseline")
        hooks, base_hooks = r["subject"]["hooks"]["train"], (base or {}).get("subject", {}).get("hooks", {}).get("train")
        pub_speed = pub_mem = "-"
        mem_ratio = None
        if base is not None:
            pub_speed = "; ".join(f"{v:.3f} = {t}" for v, t in published_ratio(
                refs, r["subject"]["method"], "steps_per_s", hooks, base_hooks)) or "-"
            pub_mem = "; ".join(f"{v:.3f} = {t}" for v, t in published_ratio(
                refs, r["subject"]["method"], "peak_memory_mb", hooks, base_hooks)) or "-"
            b_mem = base["metrics"].get("peak_memory_mb")
            if b_mem and m.get("peak_memory_mb"):
                mem_ratio = m["peak_memory_mb"] / b_mem
        outcome = r["extra"]["outcome"]
        lines.append(f"| {r['subject']['model']} | {p['train_config']} | {', '.join(p['train_hooks'])} | "
                     f"{p['precision']} | {_fmt(m.get('steps_per_s')) if outcome == 'ok' else outcome} | "
                     f"{_fmt(m.get('peak_memory_mb'), '.0f')} | {_fmt(m.get('speedup'), '.3f')} | {pub_speed} | "
                     f"{_fmt(mem_ratio, '.3f')} | {pub_mem} |")
    if any(r["metrics"].get("peak_memory_mb") is None for r in rows):
        reasons = {r["extra"]["memory"].get("reason") for r in rows if r["extra"]["memory"].get("reason")}
        lines += ["", f"Peak memory not measured: {'; '.join(sorted(reasons)) or 'not reported by the device'}."]
    lines += ["", f"Computed in this invocation: {', '.join(stages.ran) or 'nothing'}; reused: "
              f"{', '.join(stages.reused) or 'nothing'}. Raw JSON: `{out.name}` (every row a complete record), "
              "`recipe.json`, `stages.json`.", ""]
    body = reports.render_markdown(reports.build([out], refs))
    body = body.replace("# dit-bench report", "## Measured vs published (bench.compare)", 1)
    return reports.write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n" + body)


# ------------------------------------------------------------------------------------------ architecture recipes
def _variant(entry: dict, side: str) -> tuple[str, dict]:
    return entry[side], dict(entry.get(f"{side}_config") or {})


def _variant_name(model: str, config: dict) -> str:
    return model + (f" ({', '.join(f'{k}={v}' for k, v in sorted(config.items()))})" if config else "")


def architecture_counts(model: str, config: dict) -> dict:
    """MACs of one forward at batch 1 (the model's analytic count) and parameter counts of a meta-device
    instance: exact and device-independent, nothing is allocated."""
    import torch

    from bench import flops

    spec = plugins.get_model(model)
    if spec.macs is None:
        raise ReproduceError(f"model {model!r} declares no analytic MAC count; an architecture recipe needs one")
    with torch.device("meta"):
        net = spec.build(**config)
    return {"gmacs": flops.macs_to_gmacs(spec.macs(spec.kwargs(**config))),
            "params": sum(v.numel() for v in net.state_dict().values()),
            "trainable_params": sum(p.numel() for p in net.parameters() if p.requires_grad)}


def time_forward(model: str, config: dict, timing: dict) -> float:
    """Median seconds of one eval-mode forward at the recipe's batch, random weights, on the CPU."""
    import torch

    from bench.timing import measure

    spec = plugins.get_model(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = spec.build(**config).eval()
        kw = spec.kwargs(**config)
        side = kw.get("input_size", spec.default_input_size)
        batch = timing.get("batch", 1)
        x = torch.randn(batch, kw.get("in_channels", 4), side, side)
    t = torch.full((batch,), 500, dtype=torch.long)
    y = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        stats = measure(lambda: net(x, t, y), warmup=timing.get("warmup", 1), repeats=timing.get("repeats", 3),
                        device="cpu")
    return stats.median_s


def architecture_run(recipe: dict, opts: Options, run_dir: Path, stages: Stages, device) -> dict:
    """MAC and parameter ratios of the recipe's model pairs (exact), each count compared with the published
    ones (bench.compare), plus optional CPU forward-time ratios (device-specific, labelled as such)."""
    from bench import results

    variants = {}
    for entry in recipe["pairs"] + recipe.get("timing", {}).get("pairs", []):
        for side in ("model", "versus"):
            name, config = _variant(entry, side)
            variants[_variant_name(name, config)] = (name, config)
    counts_file = run_dir / "architecture.json"

    def _counts():
        counts = {label: {"model": name, "config": config, **architecture_counts(name, config)}
                  for label, (name, config) in variants.items()}
        write_json_atomic(counts_file, counts)
        # One flops record per registered configuration (no overrides): what bench.compare checks against
        # the published counts.
        for label, c in counts.items():
            if c["config"]:
                continue
            spec = plugins.get_model(c["model"])
            record = results.make_record(
                "flops", {"method": spec_owner(c["model"]), "model": c["model"], "resolution": recipe["image_size"],
                          "hooks": {}},
                {"input_size": spec.default_input_size, "batch_size": 1, "counted": "analytic MACs; meta-device "
                 "parameters (state dict and trainable)"},
                {k: c[k] for k in ("gmacs", "params", "trainable_params")})
            results.save(record, run_dir / "flops" / f"{_slug(c['model'])}.json")

    stages.run("count", {"variants": sorted(variants), "image_size": recipe["image_size"]},
               [counts_file.name], _counts)
    counts = json.loads(counts_file.read_text())
    timing = recipe.get("timing")
    times_file = run_dir / "forward-times.json"
    if timing:
        def _times():
            times = {}
            for entry in timing["pairs"]:
                for side in ("model", "versus"):
                    name, config = _variant(entry, side)
                    label = _variant_name(name, config)
                    if label not in times:
                        stages.say(f"timing {label} on the CPU")
                        times[label] = time_forward(name, config, timing)
            write_json_atomic(times_file, {"device": "cpu", "timing": timing, "median_s": times})

        stages.run("forward-times", {"timing": timing}, [times_file.name], _times)
    record_files = sorted((run_dir / "flops").glob("*.json"))
    key = {"counts": file_sha(counts_file), "records": [file_sha(p) for p in record_files],
           "times": file_sha(times_file) if timing else None, "recipe": recipe, "references": _reference_stamp()}
    stages.run("report", key, ["report.md"],
               lambda: _architecture_report(run_dir, recipe, opts, stages, counts, record_files,
                                            json.loads(times_file.read_text()) if timing else None))
    return {"mac_ratios": {f"{e['model']} / {e['versus']}": counts[_variant_name(*_variant(e, "model"))]["gmacs"]
                           / counts[_variant_name(*_variant(e, "versus"))]["gmacs"] for e in recipe["pairs"]}}


def spec_owner(model: str) -> str:
    return next(name for name, m in plugins.methods().items() if any(x.name == model for x in m.models))


def _slug(name: str) -> str:
    return name.replace("/", "-")


def published_counts(refs, model: str, metric: str, resolution: int) -> list[dict]:
    from bench.reference import norm

    return [r for r in refs.rows if r["metric"] == metric and r["value"] is not None and r["model"]
            and norm(r["model"]) == norm(model) and r["resolution"] in (None, resolution)]


def _architecture_report(run_dir, recipe, opts, stages, counts, record_files, times) -> Path:
    from bench import compare
    from bench import report as reports

    refs = _references()
    lines = [f"# Reproduction: {opts.method} ({opts.preset} preset)", "",
             "> MACs and parameters are counted exactly from the registered architectures (analytic MACs of one "
             f"forward at batch 1, {recipe['image_size']} px; parameters of a meta-device instance): they do not "
             "depend on the device, so they are compared with the published counts directly. Forward times, "
             "where measured, are CPU times of random-weight models: a device-specific proxy, compared only "
             "as ratios.", "", *[f"- {note}" for note in recipe.get("notes", [])], "",
             "## Counts", "", "| model | GMACs | params | trainable params | published GMACs |",
             "| --- | ---: | ---: | ---: | --- |"]
    for label, c in counts.items():
        pub = "; ".join(f"{r['value']:g} ({r['uid']})" for r in published_counts(refs, c["model"], "gmacs",
                                                                                recipe["image_size"]))
        lines.append(f"| {label} | {c['gmacs']:.4f} | {c['params']:,} | {c['trainable_params']:,} | "
                     f"{pub if not c['config'] else '- (not a published configuration)'} |")
    lines += ["", "## Ratios: model / versus", "",
              "| model | versus | MAC ratio | params ratio | published MAC ratio | verdict | claim |",
              "| --- | --- | ---: | ---: | --- | --- | --- |"]
    for entry in recipe["pairs"]:
        a, b = counts[_variant_name(*_variant(entry, "model"))], counts[_variant_name(*_variant(entry, "versus"))]
        ratio = a["gmacs"] / b["gmacs"]
        published, verdicts = [], []
        if not a["config"] and not b["config"]:
            for ra in published_counts(refs, a["model"], "gmacs", recipe["image_size"]):
                for rb in published_counts(refs, b["model"], "gmacs", recipe["image_size"]):
                    if ra["uid"] == rb["uid"]:
                        continue
                    pub = ra["value"] / rb["value"]
                    # two published counts, each within the count tolerance: their ratio within sqrt(2) of it
                    tol = 2 ** 0.5 * compare.tolerance("gmacs", pub)[0]
                    published.append(f"{pub:.4f} = {ra['value']:g} / {rb['value']:g} ({ra['uid']} / {rb['uid']})")
                    verdicts.append(compare.REPRODUCED if abs(ratio - pub) <= tol else compare.NOT_REPRODUCED)
        verdict = ", ".join(f"{v} x{verdicts.count(v)}" for v in dict.fromkeys(verdicts)) or "-"
        lines.append(f"| {_variant_name(*_variant(entry, 'model'))} | {_variant_name(*_variant(entry, 'versus'))} | "
                     f"{ratio:.4f} (1/{1 / ratio:.2f}) | {a['params'] / b['params']:.4f} | "
                     f"{'<br>'.join(published) or '-'} | {verdict} | {entry.get('claim', '-')} |")
    if times:
        t = times["timing"]
        lines += ["", "## Forward time on this CPU (proxy: device-specific, ratios only)", "",
                  f"Eval-mode forward, batch {t.get('batch', 1)}, random weights, warm-up {t.get('warmup', 1)}, "
                  f"median of {t.get('repeats', 3)}; one CPU thread per `OMP_NUM_THREADS`.", "",
                  "| comparison | model s | versus s | speed-up (versus s / model s) | MAC ratio (versus / model) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for entry in t["pairs"]:
            la, lb = _variant_name(*_variant(entry, "model")), _variant_name(*_variant(entry, "versus"))
            sa, sb = times["median_s"][la], times["median_s"][lb]
            lines.append(f"| {entry.get('label', f'{la} vs {lb}')} | {sa:.4g} | {sb:.4g} | {sb / sa:.3f} | "
                         f"{counts[lb]['gmacs'] / counts[la]['gmacs']:.3f} |")
    lines += ["", f"Computed in this invocation: {', '.join(stages.ran) or 'nothing'}; reused: "
              f"{', '.join(stages.reused) or 'nothing'}. Raw JSON: `architecture.json`, `flops/*.json`"
              f"{', `forward-times.json`' if times else ''}, `recipe.json`, `stages.json`.", ""]
    body = reports.render_markdown(reports.build(record_files, refs)) if record_files else ""
    body = body.replace("# dit-bench report", "## Counts vs published (bench.compare)", 1)
    return reports.write_text_atomic(run_dir / "report.md", "\n".join(lines) + "\n" + body)


# ------------------------------------------------------------------------------------------ proxy assets
def proxy_train_config(name: str, data: Path, out: Path, steps: int | None = None):
    """The exact ``dit-bench train`` settings that produce a shipped proxy checkpoint."""
    from bench import training

    owner, decl = proxy_models()[name]
    t = decl["train"]
    return training.TrainConfig(model=name, data=str(data), out=str(out), vae="identity",
                                global_batch_size=t["global_batch_size"], steps=steps or t["steps"], lr=t["lr"],
                                ema_decay=t["ema_decay"], ckpt_every=steps or t["steps"], log_every=100,
                                seed=t["seed"], num_workers=0)


def write_train_data(path: Path) -> Path:
    """The 1500-digit training split as the ``.npz`` (images + labels) that `dit-bench train` reads."""
    from bench import proxy

    (images, labels), _ = proxy.split(*proxy.digits_images())
    with atomic_open(path, "wb") as fh:
        np.savez(fh, images=images, labels=labels)
    return path


def ship_checkpoint(trained: Path, dest: Path) -> Path:
    """Keep only the EMA weights, in fp16 (a few MB), with the args that name the architecture."""
    import torch

    from bench.checkpoints import read_checkpoint

    obj, _ = read_checkpoint(trained)
    small = {"ema": {k: (v.half() if v.is_floating_point() else v) for k, v in obj["ema"].items()},
             "args": obj.get("args"), "step": obj.get("step")}
    with atomic_open(dest, "wb") as fh:
        torch.save(small, fh)
    return dest


def make_proxy_models(work: Path, names: list[str] | None = None, steps: int | None = None,
                      ship: bool = True, progress: bool = False) -> dict[str, Path]:
    """Re-train the proxy models (``dit-bench proxy-assets``); ``steps`` shortens the run (tests)."""
    from bench import training

    register_proxy_models()
    data = write_train_data(work / TRAIN_DATA_FILE)
    out = {}
    for name, (_, decl) in proxy_models().items():
        if names and name not in names or "train" not in decl:
            continue
        config = proxy_train_config(name, data, work / name.replace("/", "-"), steps)
        summary = training.train(config, device="cpu", progress=progress)
        ckpt = Path(summary["checkpoint"])
        out[name] = ship_checkpoint(ckpt, proxy_asset(decl["checkpoint"]) if ship else
                                    work / decl["checkpoint"])
    return out


def train_command(name: str, work: Path) -> str:
    """The `dit-bench train` settings of a proxy model, as one line (what make_proxy_models runs in-process:
    the proxy model is registered by the recipes, so a plain `dit-bench train` process would not know its name)."""
    config = proxy_train_config(name, work / TRAIN_DATA_FILE, work / name.replace("/", "-"))
    return (f"dit-bench train --model {config.model} --data {config.data} --vae identity "
            f"--global-batch-size {config.global_batch_size} --steps {config.steps} --lr {config.lr:g} "
            f"--ema-decay {config.ema_decay:g} --seed {config.seed} --ckpt-every {config.ckpt_every} "
            f"--out {config.out} --device cpu")


if __name__ == "__main__":  # the torchrun worker of the sampling stage
    if len(sys.argv) == 3 and sys.argv[1] == "sample":
        _distributed_sample(sys.argv[2])
    else:
        raise SystemExit("usage: python -m bench.reproduce sample PAYLOAD_JSON (launched by dit-bench reproduce)")
