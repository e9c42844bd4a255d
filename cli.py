"""`dit-bench`: the command-line front of the harness (typer + rich).

Each command is thin: parse options, call into bench/, print. A ``UserError`` anywhere below becomes
one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import bench
from bench import plugins
from bench.errors import UserError

app = typer.Typer(
    name="dit-bench",
    help="Reproduce and benchmark Diffusion-Transformer acceleration methods against their papers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@app.command()
def version() -> None:
    """Print the dit-bench version."""
    console.print(f"dit-bench {bench.__version__}")


@app.command("models")
def list_models(
    image_size: int = typer.Option(256, help="Image resolution the MACs and token counts are given for."),
) -> None:
    """Every registered model: parameters, GMACs (one forward, batch 1) and tokens."""
    from bench import reference

    refs = reference.load_all()
    table = Table(title=f"Registered models @ {image_size}x{image_size}")
    for col in ("model", "family", "method", "params", "GMACs", "published GMACs", "tokens"):
        table.add_column(col, justify="left" if col in ("model", "family", "method") else "right")
    for method in plugins.methods().values():
        for spec in method.models:
            info = model_summary(spec, image_size)
            table.add_row(spec.name, spec.family, method.name, f"{info['params']:,}",
                          f"{info['gmacs']:.2f}" if info["gmacs"] is not None else "-",
                          published_gmacs(refs, spec.name, image_size),
                          str(info["tokens"]) if info["tokens"] else "-")
    console.print(table)
    console.print("GMACs: exact analytic multiply-accumulates of one forward at batch 1 (the papers' 'GFLOPs' "
                  "convention); published: the papers' printed values from reference_results/.", style="dim")


def published_gmacs(refs, model: str, image_size: int) -> str:
    """The papers' printed MAC counts for this model, e.g. '2.66' for EDT-S/2 (whose exact count is 2.667)."""
    values = sorted({row["value"] for row in refs.find(model=model, resolution=image_size, metric="gmacs")
                     if row.get("role") != "computed" and row["value"] is not None})
    return " / ".join(f"{v:g}" for v in values) or "-"


def model_summary(spec: plugins.ModelSpec, image_size: int) -> dict:
    """Parameter count (built on the meta device: no memory, no init cost), MACs and token count."""
    import torch

    kwargs = spec.kwargs(input_size=image_size // 8)
    with torch.device("meta"):
        model = spec.builder(**kwargs)
    params = sum(p.numel() for p in model.parameters())
    patch = kwargs.get("patch_size")
    tokens = (kwargs["input_size"] // patch) ** 2 if patch else None
    gmacs = spec.macs(kwargs) / 1e9 if spec.macs else None
    return {"params": params, "gmacs": gmacs, "tokens": tokens}


@app.command("methods")
def list_methods() -> None:
    """Installed method plug-ins and what each contributes."""
    table = Table(title="Installed methods")
    for col in ("method", "title", "contributes"):
        table.add_column(col)
    for method in plugins.methods().values():
        table.add_row(method.name, method.title, "; ".join(method.contributes()))
    console.print(table)


assets_app = typer.Typer(
    help="Official checkpoints, VAEs, ADM reference batches and Inception weights: list, fetch, verify, locate.",
    no_args_is_help=True,
)
app.add_typer(assets_app, name="assets")


@assets_app.command("list")
def assets_list() -> None:
    """Every registered asset: whether it is in the cache, its size, where it lives and where it comes from."""
    from rich.filesize import decimal

    from bench import assets

    cache = assets.cache_dir()
    table = Table(title=f"Assets (cache: {cache})")
    for col in ("asset", "status", "size", "path in cache", "source"):
        table.add_column(col, justify="right" if col == "size" else "left", no_wrap=col == "asset",
                         overflow="fold")
    for row in assets.list_assets():
        where = row["path"].relative_to(cache).as_posix() + ("/" if row["kind"] == "folder" else "")
        table.add_row(row["name"], row["status"], decimal(row["size"]) if row["size"] else "-", where,
                      row["source"])
    console.print(table)


@assets_app.command("fetch")
def assets_fetch(
    names: list[str] = typer.Argument(None, help="Asset names (see `dit-bench assets list`)."),
    all_assets: bool = typer.Option(False, "--all", help="Fetch every registered asset."),
    force: bool = typer.Option(False, "--force", help="Download again even if the file is in the cache."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Download assets into the cache (resuming partial downloads) and check their sha256."""
    from bench import assets

    if not names and not all_assets:
        raise UserError("name the assets to fetch (see `dit-bench assets list`) or pass --all")
    for name in names or list(assets.REGISTRY):
        path = assets.fetch(name, progress=progress, force=force)
        console.print(f"{name}: {path}", highlight=False, soft_wrap=True)


@assets_app.command("verify")
def assets_verify(
    names: list[str] = typer.Argument(None, help="Asset names; default: every asset in the cache."),
) -> None:
    """Hash cached files against their published or first-download sha256; exit 1 on a bad or missing file."""
    from bench import assets

    chosen = names or [a.name for a in assets.REGISTRY.values() if assets.status(a) != "missing"]
    if not chosen:
        console.print(f"no assets in the cache {assets.cache_dir()} yet; see `dit-bench assets list`",
                      highlight=False, soft_wrap=True)
        return
    checks = [c for name in chosen for c in assets.verify(name)]
    table = Table(title="Asset checksums")
    for col in ("asset", "file", "status", "sha256 / detail"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.asset, str(c.path), c.status, c.detail)
    console.print(table)
    # Without names, assets never fetched are not a failure; a named one that is missing is.
    bad = [c for c in checks if c.status == "mismatch" or (names and c.status == "missing")]
    if bad:
        err_console.print(f"{len(bad)} file(s) failed; `dit-bench assets fetch NAME --force` downloads them again",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@assets_app.command("path")
def assets_path(
    name_or_path: str = typer.Argument(..., help="An asset name or the path to your own file."),
    fetch: bool = typer.Option(False, "--fetch", help="Download the asset if it is not in the cache."),
) -> None:
    """Print the local path of an asset (or of your own file); fails with where to put it when it is missing."""
    from bench import assets

    typer.echo(str(assets.resolve(name_or_path, download=fetch)))


def parse_hook_options(items: list[str], hooks: list[str]) -> dict:
    """["fasterdiffusion.key_steps=fid"] -> {"fasterdiffusion": {"key_steps": "fid"}}; numbers become numbers."""
    import json

    options: dict = {}
    for item in items:
        name, _, value = item.partition("=")
        hook, _, key = name.partition(".")
        if not key or not _:
            raise UserError(f"--hook-option {item!r}: expected HOOK.KEY=VALUE")
        if hook not in hooks:
            raise UserError(f"--hook-option {item!r}: hook {hook!r} is not among --hook {', '.join(hooks) or '(none)'}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options.setdefault(hook, {})[key] = parsed
    return options


@app.command()
def sample(
    model: str = typer.Option("DiT-XL/2", help="Registry name (see `dit-bench models`) or a training checkpoint."),
    ckpt: str = typer.Option(None, help="Checkpoint: asset name or file. Default: the model's official weights."),
    image_size: int = typer.Option(256, help="Image resolution."),
    num_classes: int = typer.Option(1000),
    sampler: str = typer.Option("ddpm", help="ddpm | ddim"),
    steps: str = typer.Option("250", help='Respacing: "250", "ddim50", "10,15,20".'),
    eta: float = typer.Option(0.0, help="DDIM eta."),
    cfg_scale: float = typer.Option(1.5, help="Guidance scale; the CFG path runs only when > 1 (DiT convention)."),
    labels: str = typer.Option("random", help="random | balanced"),
    num_samples: int = typer.Option(50_000),
    batch_size: int = typer.Option(32, help="Per-process batch; does not change the images."),
    precision: str = typer.Option("fp32", help="fp32 | tf32 | bf16 | fp16"),
    vae: str = typer.Option("ema", help="ema | mse | identity | a local diffusers folder"),
    seed: int = typer.Option(0),
    hook: list[str] = typer.Option([], help="Sample hook(s), e.g. fasterdiffusion."),
    hook_option: list[str] = typer.Option([], help="HOOK.KEY=VALUE, e.g. fasterdiffusion.key_steps=fid."),
    random_weights: bool = typer.Option(False, help="Random weights (speed runs only)."),
    attention: str = typer.Option("default", help="SDPA kernels: default | fused | flash | cudnn | efficient | "
                                  "math | explicit (cudnn, efficient: CUDA only)."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the repeated blocks "
                                  "(the fast path; the images change in the last bits, so it is part of the run)."),
    out: Path = typer.Option(None, help="Run directory (shards, manifest, samples.npz)."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda when available)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Sample to an ADM-format .npz, resumably: run the same command again to continue."""
    from bench import assets, distributed, sampling
    from bench.assets import sha256_of

    world = distributed.init(device)
    dev = distributed.default_device(world, device)
    ckpt_sha = None
    if ckpt is not None and not random_weights:
        ckpt_sha = sha256_of(assets.resolve(ckpt))
    protocol = sampling.SamplingProtocol(
        model=model, image_size=image_size, num_samples=num_samples, checkpoint=ckpt, checkpoint_sha256=ckpt_sha,
        num_classes=num_classes, sampler=sampler, steps=steps, eta=eta, cfg_scale=cfg_scale, label_policy=labels,
        seed=seed, precision=precision, vae=vae, sample_hooks=tuple(hook), device_type=dev.type,
        random_weights=random_weights, hook_options=parse_hook_options(hook_option, hook), attention=attention,
        compile=compile_)
    out = out or Path("samples") / (f"{model.replace('/', '-')}-size-{image_size}-cfg-{cfg_scale}-seed-{seed}"
                                    f"-{protocol.fingerprint()[:8]}")
    parts, _ = sampling.build_parts(protocol, dev)
    manifest = sampling.run(parts, protocol, out, batch_size, dev, world=world, progress=progress)
    if world.is_main:
        console.print(f"{num_samples} samples in {out / sampling.SAMPLES_FILE} "
                      f"({manifest['computed_now']} computed now, {manifest['reused']} reused)", soft_wrap=True, highlight=False)
    distributed.shutdown()


@app.command("evaluate")
def evaluate_cmd(
    reference: str = typer.Argument(..., help="ADM reference batch: a .npz path or an asset name "
                                    "(e.g. adm-ref-imagenet256)."),
    samples: Path = typer.Argument(..., help="Sample batch .npz (uint8 N x H x W x 3 in arr_0)."),
    backend: str = typer.Option("adm-tf", "--backend", "-b", help="Feature backend: adm-tf (the evaluator's TF "
                                "graph) | torch (PyTorch port, fast on GPU) | any registered name."),
    weights: str = typer.Option(None, help="Feature network file or asset name (default: the backend's official one)."),
    device: str = typer.Option(None, help="Backend device: cpu | cuda | gpu (default: a GPU when there is one)."),
    batch_size: int = typer.Option(None, help="Images per network call (default: 64 for adm-tf, as the evaluator)."),
    cache: bool = typer.Option(True, help="Reuse/write the features cached beside each .npz."),
    pr_engine: str = typer.Option("tf", help="Precision/recall distances: tf (the evaluator's graph, exact) | "
                                  "torch (fast on GPU, ~1e-3 apart)."),
    cross_check: int = typer.Option(0, help="Also run adm-tf on the first N samples and report the feature gap."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the result record (JSON) here."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON only (for scripts)."),
    progress: bool = typer.Option(True, help="Show a progress bar (on stderr) during feature extraction."),
) -> None:
    """FID, sFID, Inception Score, precision and recall of SAMPLES against REFERENCE, as the ADM evaluator."""
    import json

    from bench.metrics.evaluate import evaluate

    result = evaluate(reference, samples, backend=backend, weights=weights, device=device, batch_size=batch_size,
                      cache=cache, progress=progress, pr_engine=pr_engine, cross_check=cross_check)
    if output is not None:
        from bench import results

        record = results.make_record("quality", result["subject"], result["protocol"], result["metrics"],
                                     proxy=result["protocol"]["proxy"], warnings=result["warnings"],
                                     extra={k: result[k] for k in ("extra", "cross_check") if k in result})
        results.save(record, output)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    proto = result["protocol"]
    table = Table(title=f"{samples.name}: {proto['num_samples']:,} samples", min_width=40)
    table.add_column("metric")
    table.add_column("value", justify="right")
    names = {"inception_score": "Inception Score", "fid": "FID", "sfid": "sFID", "precision": "Precision",
             "recall": "Recall"}
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        value = result["metrics"][key]
        table.add_row(names[key], "-" if value is None else f"{value:.4f}")
    console.print(table)
    console.print(f"backend {proto['evaluator']} (network sha256 {proto['feature_network_sha256'][:12]}), "
                  f"reference {proto['reference']} (sha256 {proto['reference_sha256'][:12]}, "
                  f"{proto['reference_statistics']} statistics)", highlight=False, soft_wrap=True)
    if "cross_check" in result:
        cc = result["cross_check"]
        console.print(f"cross-check vs {cc['against']} on {cc['num_images']} images: pool rel. L2 "
                      f"{cc['pool_rel_l2']:.2e}, max abs {cc['pool_max_abs_diff']:.2e}", highlight=False)
    for warning in result["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if output is not None:
        console.print(f"result written to {output}", highlight=False, soft_wrap=True)


@app.command("report")
def report_cmd(
    result_files: list[Path] = typer.Argument(..., help="Result records (JSON) written by dit-bench commands."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the markdown here (e.g. reports/NAME.md), with its "
                             "PNG plots in NAME_files/ beside it. Without it the markdown goes to stdout."),
    github_summary: bool = typer.Option(False, "--github-summary", help="Append the report to the GitHub Actions "
                                        "job summary ($GITHUB_STEP_SUMMARY)."),
) -> None:
    """Measured vs published: verdicts, protocol cards, environment, reference lint and plots."""
    from bench import compare
    from bench import report as reports

    built = reports.build(result_files)
    images = None
    if out is not None:
        path, pngs = reports.write_report(built, out)
        images = {name: str(png) for name, png in pngs.items()}
        err_console.print(f"report written to {path} ({len(pngs)} plots in {path.parent / (path.stem + '_files')})",
                          highlight=False, soft_wrap=True)
    if github_summary:
        target = reports.append_github_summary(built, images)
        err_console.print(f"report appended to the job summary {target}", highlight=False, soft_wrap=True)
    if out is None and not github_summary:
        typer.echo(reports.render_markdown(built))
    counts = compare.summarize(built.all_comparisons)
    err_console.print(", ".join(f"{n} {verdict}" for verdict, n in counts.items()), highlight=False)


@app.command("lint-references")
def lint_references_cmd(
    directory: Path = typer.Option(None, "--dir", help="A reference_results folder (default: the installed one, "
                                   "or $DIT_BENCH_REFERENCE_RESULTS)."),
    strict: bool = typer.Option(False, "--strict", help="Exit with status 1 when there is any warning (for CI)."),
) -> None:
    """Validate reference_results/ against its schema and list where the published numbers disagree."""
    from bench import consistency, reference

    refs = reference.load_all(directory)
    findings = consistency.lint(refs)
    table = Table(title=f"Consistency of {refs.directory}", show_lines=True)
    for col in ("check", "severity", "finding"):
        table.add_column(col, overflow="fold")
    for finding in findings:
        table.add_row(finding.check, finding.severity, finding.message)
    console.print(table)
    warnings = sum(f.severity == consistency.WARNING for f in findings)
    console.print(f"{len(refs.rows)} rows from {len(refs.sources)} sources meet the schema; {warnings} warnings, "
                  f"{len(findings) - warnings} notes", highlight=False)
    if strict and warnings:
        raise typer.Exit(1)


@app.command("train")
def train_cmd(
    model: str = typer.Option(..., help="Registry name (see `dit-bench models`)."),
    data: Path = typer.Option(..., help="Image folder (root/<class>/<image>), an .npz of uint8 images + labels, "
                              "or a directory written by `dit-bench extract-features` (with --hook features)."),
    vae: str = typer.Option(None, help="ema | mse | identity | a diffusers folder (default: ema; for features "
                            "the extraction's VAE)."),
    image_size: int = typer.Option(None, help="Image resolution (default: the data's; 256 for image folders)."),
    num_classes: int = typer.Option(None, help="Classes of the model (default: the data's)."),
    global_batch_size: int = typer.Option(256, help="Split evenly over the processes of torchrun."),
    steps: int = typer.Option(400_000, help="Train until this step (a resumed run continues to it)."),
    lr: float = typer.Option(1e-4, help="AdamW learning rate (DiT: 1e-4 constant, no weight decay)."),
    ema_decay: float = typer.Option(0.9999),
    hook: list[str] = typer.Option([], help="Train hook(s), repeatable, e.g. speedit, grad-ckpt, amp-bf16, features."),
    hook_option: list[str] = typer.Option([], help="HOOK.KEY=VALUE, e.g. speedit-nus.weighting=p2."),
    ckpt_every: int = typer.Option(50_000, help="Checkpoint every N steps (and at the last step)."),
    log_every: int = typer.Option(100, help="Log loss, steps/s and memory every N steps."),
    out: Path = typer.Option(None, help="Run directory: checkpoints/, log.jsonl, result.json."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    seed: int = typer.Option(0, help="Every random draw of step k on rank r comes from (seed, k, r)."),
    workers: int = typer.Option(4, help="Data-loading processes for image folders."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile the repeated blocks "
                                  "(the fast path)."),
    attention: str = typer.Option("default", help="SDPA kernels: default | fused | flash | cudnn | efficient | "
                                  "math | explicit (cudnn, efficient: CUDA only)."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda when available)."),
    progress: bool = typer.Option(True, help="Show a progress display."),
) -> None:
    """Train a model with DiT's recipe and any compatible train hooks; deterministic and resumable."""
    from bench import distributed, training

    config = training.TrainConfig(
        model=model, data=str(data), out=str(out or Path("results") / f"train-{model.replace('/', '-')}-seed-{seed}"),
        vae=vae, image_size=image_size, num_classes=num_classes, global_batch_size=global_batch_size, steps=steps,
        lr=lr, ema_decay=ema_decay, hooks=tuple(hook), hook_options=parse_hook_options(hook_option, hook),
        ckpt_every=ckpt_every, log_every=log_every, seed=seed, num_workers=workers, compile=compile_,
        attention=attention)
    summary = training.train(config, device=device, resume=resume, progress=progress)
    if "record" in summary:
        metrics = summary["record"]["metrics"]
        rate = f"{metrics['steps_per_s']:.3f} steps/s" if metrics["steps_per_s"] else "no timing"
        memory = f", peak {metrics['peak_memory_mb']:.0f} MB" if metrics["peak_memory_mb"] is not None else ""
        loss = f"{metrics['final_loss']:.4f}" if metrics["final_loss"] is not None else "-"
        console.print(f"steps {summary['start_step']}..{summary['steps']}: loss {loss}, {rate}{memory}; "
                      f"checkpoint {summary['checkpoint']}, result {Path(config.out) / training.RESULT_FILE}",
                      highlight=False, soft_wrap=True)
    distributed.shutdown()


@app.command("extract-features")
def extract_features_cmd(
    data: Path = typer.Option(..., help="Image folder (root/<class>/<image>) or an .npz of uint8 images + labels."),
    vae: str = typer.Option("ema", help="ema | mse | identity | a diffusers folder."),
    out: Path = typer.Option(..., help="Directory for features/, labels/ and features.json."),
    image_size: int = typer.Option(None, help="Image resolution (default: the .npz's; 256 for image folders)."),
    mode: str = typer.Option("frozen-flip", help="frozen-flip: one flip + one posterior sample per image "
                             "(fast-DiT) | both-flips: both orientations, so training keeps the random flip."),
    seed: int = typer.Option(0, help="Image i's flip and posterior noise come from (seed, i)."),
    batch_size: int = typer.Option(32, help="Images per VAE call; does not change the latents' draws."),
    workers: int = typer.Option(4, help="Data-loading processes for image folders."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda when available)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Encode a dataset once with the VAE (fast-DiT's pre-extraction), atomically and collision-free under torchrun."""
    import contextlib

    from bench import data as datasets
    from bench import distributed
    from bench.vae import load_vae

    world = distributed.init(device)
    dev = distributed.default_device(world, device)
    images = datasets.open_images(data, image_size)
    encoder = load_vae(vae, dev)
    bar, advance = contextlib.nullcontext(), None
    if progress and world.is_main:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("extracting"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        task = bar.add_task("extract", total=len(images))
        advance = lambda n: bar.update(task, advance=n)  # noqa: E731
    with bar:
        manifest = datasets.extract_features(
            images, encoder, out, mode=mode, seed=seed, batch_size=batch_size, device=dev, world=world,
            num_workers=workers if images.kind == "image-folder" else 0, progress=advance,
            vae_name=vae, source=str(data))
    if world.is_main:
        console.print(f"{manifest['num_images']} images -> {out} (latents {manifest['latent_shape']}, {mode})",
                      highlight=False, soft_wrap=True)
    distributed.shutdown()


@app.command("speed")
def speed_cmd(
    model: list[str] = typer.Option(["DiT-XL/2"], "--model", help="Model(s) to time (repeatable)."),
    hook: list[str] = typer.Option([], "--hook", help="Sample hook(s) timed beside the baseline, e.g. "
                                   "fasterdiffusion."),
    hook_option: list[str] = typer.Option([], "--hook-option", help="HOOK.KEY=VALUE, e.g. "
                                          "fasterdiffusion.key_steps=speed."),
    protocol: str = typer.Option("fast", help="paper (official code path, fp32+TF32, batch 8) | fast (bf16, fused "
                                 "attention, torch.compile on CUDA, large batches)."),
    precision: list[str] = typer.Option(None, "--precision", help="fp32 | tf32 | bf16 | fp16 (repeatable). "
                                        "Default: paper tf32, fast bf16 (fp32 for both off CUDA)."),
    batch: list[str] = typer.Option(None, "--batch", help="A batch size or 'auto' (saturating; repeatable). "
                                    "Default: paper 8; fast 1, 8, auto."),
    steps: int = typer.Option(250, help="Sampling steps."),
    sampler: str = typer.Option("ddpm", help="ddpm | ddim"),
    cfg_scale: float = typer.Option(None, help="Guidance scale (> 1 runs the CFG batch). Default: paper 4.0 "
                                    "(FasterDiffusion's timing script), fast 1.5."),
    image_size: int = typer.Option(256, help="Image resolution."),
    num_classes: int = typer.Option(1000),
    vae: str = typer.Option("none", help="none (decode not timed) | random (the SD VAE at random weights: no "
                            "download) | ema | mse | identity | a diffusers folder."),
    vae_batch: int = typer.Option(32, help="Latents per VAE decode call."),
    attention: str = typer.Option(None, help="default | fused | flash | cudnn | efficient | math | explicit. "
                                  "Default: fused on CUDA under fast, else default."),
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the repeated blocks. "
                                  "Default: on for fast on CUDA, off otherwise."),
    compile_mode: str = typer.Option("default", help="torch.compile mode: default | max-autotune-no-cudagraphs "
                                     "(autotunes GEMMs per batch shape: slow to compile) | reduce-overhead and "
                                     "max-autotune (CUDA graphs of the whole forward; no hooks)."),
    warmup: int = typer.Option(None, help="Untimed runs per row (default: paper 2, fast 2)."),
    repeats: int = typer.Option(None, help="Timed runs per row (default: paper 1, fast 5)."),
    max_batch: int = typer.Option(None, help="Largest batch the auto search tries (default 1024 on CUDA, 64 on CPU)."),
    search_steps: int = typer.Option(10, help="Steps per trial of the auto batch search."),
    sample_: bool = typer.Option(True, "--sample/--no-sample", help="Time sampling."),
    train: bool = typer.Option(False, "--train/--no-train", help="Also time training steps."),
    train_config: list[str] = typer.Option(None, "--train-config", help="plain | ckpt | amp | features | all | "
                                           "no-tf32 (fast-DiT's scripts), fast (bf16, compiled) or hooks joined "
                                           "by '+'. Default: all that the --vae allows."),
    global_batch_size: int = typer.Option(128, help="Training batch (fast-DiT's table: 128)."),
    gpu: str = typer.Option(None, "--gpu", help="The GPU the published numbers were measured on, e.g. A100."),
    official_code: Path = typer.Option(None, "--official-code", help="A checkout of the model's official "
                                       "repository (e.g. facebookresearch/DiT): its sampler is timed beside, on "
                                       "the same weights and inputs, and each row gets its speed-up over it. "
                                       "Imports (runs) that folder's code."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda when available)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the result record (JSON) here."),
    json_out: bool = typer.Option(False, "--json", help="Print the result record as JSON only."),
) -> None:
    """Sampling latency and throughput, and training steps/s, of models with and without hooks (random weights)."""
    import json

    from bench import results, speed

    config = speed.SpeedConfig(
        models=tuple(model), hooks=tuple(hook), hook_options=parse_hook_options(hook_option, hook), protocol=protocol,
        precisions=tuple(precision) if precision else None, batches=tuple(batch) if batch else None, steps=steps,
        sampler=sampler, cfg_scale=cfg_scale, image_size=image_size, num_classes=num_classes, vae=vae,
        vae_batch=vae_batch, attention=attention, compile=compile_, compile_mode=compile_mode, warmup=warmup,
        repeats=repeats, max_batch=max_batch, search_steps=search_steps, reference_gpu=gpu, sample=sample_,
        train=train, train_configs=tuple(train_config) if train_config else None,
        global_batch_size=global_batch_size, official_code=str(official_code) if official_code else None)
    say = (lambda text: err_console.print(f"[yellow]note:[/] {text}", highlight=False, soft_wrap=True))
    record = speed.run(config, device, say=say)
    if out is not None:
        results.save(record, out)
    if json_out:
        typer.echo(json.dumps(record, indent=2, default=str))
        return
    rows = record["extra"]["rows"]
    if rows:
        console.print(speed.sampling_table(rows))
    if record["extra"]["train_rows"]:
        console.print(speed.training_table(record["extra"]["train_rows"]))
    env = record["environment"]
    console.print(f"{env['gpu'] or env['cpu']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
                  f"commit {(env['git_commit'] or '?')[:10]}; ideal = FLOP-bound speed-up, speedup = measured vs "
                  "the baseline in this run", highlight=False, soft_wrap=True)
    published = speed.published_comparisons(record)
    if published:
        table = Table(title="Against published numbers (bench.compare)")
        for col in ("row", "metric", "measured", "published", "verdict", "why / source"):
            table.add_column(col, overflow="fold")
        for c in published:
            table.add_row(c.subject, c.metric, f"{c.measured:.4g}", c.reference_text or f"{c.reference:.4g}",
                          c.verdict, c.reason or c.citation)
        console.print(table)
    if out is not None:
        console.print(f"result written to {out}", highlight=False, soft_wrap=True)


@app.command("reproduce")
def reproduce_cmd(
    method: str = typer.Argument(..., help="A method with a reproduction recipe: dit, fasterdiffusion, ..."),
    preset: str = typer.Option("tiny", help="tiny (the embedded proxy default: offline, CPU, minutes) | paper "
                               "(the published protocol: official assets, a GPU, hours)."),
    num_samples: int = typer.Option(None, help="Samples per arm (default: the preset's)."),
    steps: str = typer.Option(None, help="Override the sampling steps (shortened runs)."),
    speed_steps: int = typer.Option(None, help="Override the speed stage's sampling steps."),
    speed_batch: list[int] = typer.Option(None, "--speed-batch", help="Override the speed stage's batches (repeatable)."),
    batch_size: int = typer.Option(None, help="Sampling batch per process (does not change the images)."),
    train_steps: int = typer.Option(None, help="Training recipes (speedit): train both runs for N steps."),
    ckpt_every: int = typer.Option(None, help="Training recipes: evaluate a checkpoint every N steps."),
    nproc_per_node: int = typer.Option(1, help="Sampling processes: > 1 launches torchrun itself."),
    out: Path = typer.Option(None, help="Run directory (default reports/<method>-<preset>-<date>/); run the same "
                             "command again to resume or reuse it."),
    device: str = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda when available)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """A paper's protocol end to end: sample (method + paired baseline) -> evaluate -> speed -> compare -> report."""
    from bench import reproduce

    say = (lambda text: err_console.print(f"[dim]{text}[/]", highlight=False, soft_wrap=True))
    opts = reproduce.Options(method=method, preset=preset, out=out, num_samples=num_samples, steps=steps,
                             speed_steps=speed_steps, speed_batches=tuple(speed_batch) if speed_batch else None,
                             batch_size=batch_size, train_steps=train_steps, ckpt_every=ckpt_every,
                             nproc_per_node=nproc_per_node, device=device, progress=progress)
    summary = reproduce.reproduce(opts, say=say)
    label = " (proxy)" if summary["proxy"] else ""
    console.print(f"report{label}: {summary['report']} ({summary['seconds']:.1f} s; ran: "
                  f"{', '.join(summary['ran']) or 'nothing'}; reused: {', '.join(summary['reused']) or 'nothing'})",
                  highlight=False, soft_wrap=True)


@app.command("proxy-assets")
def proxy_assets_cmd(
    model: list[str] = typer.Option(None, "--model", help="Proxy model(s) to re-train (default: all the recipes "
                                    "declare)."),
    classifier: bool = typer.Option(False, "--classifier", help="Also re-train the proxy feature network."),
    work: Path = typer.Option(Path("proxy-train"), help="Directory for the training data and runs."),
    steps: int = typer.Option(None, help="Shorten training to N steps (a check, not the shipped weights)."),
    ship: bool = typer.Option(True, "--ship/--no-ship", help="Overwrite the files in bench/proxy_assets."),
    show: bool = typer.Option(False, "--show", help="Only print the equivalent `dit-bench train` commands."),
    progress: bool = typer.Option(True, help="Show a progress display."),
) -> None:
    """Re-create the embedded default's shipped checkpoints (bench/proxy_assets) with the documented settings."""
    from bench import reproduce

    reproduce.register_proxy_models()
    names = list(model) or list(reproduce.proxy_models())
    for name in names:
        console.print(f"{name}: the settings of {reproduce.train_command(name, work)}", highlight=False,
                      soft_wrap=True)
    if show:
        return
    if classifier:
        from bench import proxy

        _, accuracy = proxy.train_classifier(out=proxy.CLASSIFIER_FILE if ship else work / "digits_classifier.pt")
        console.print(f"digits classifier: held-out accuracy {accuracy:.3f}", highlight=False)
    for name, path in reproduce.make_proxy_models(work, names, steps=steps, ship=ship, progress=progress).items():
        console.print(f"{name}: {path}", highlight=False, soft_wrap=True)


def main() -> None:
    try:
        app()
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted: work saved so far is kept; run the same command again to resume")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - only running out of memory is the user's to fix; bugs keep their trace
        from bench.timing import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        err_console.print(f"[bold red]out of memory:[/] {first[:200]}; use a smaller --batch-size (or "
                          "--global-batch-size) or a lower --precision. Work saved so far is kept: run the same "
                          "command again to resume", highlight=False, soft_wrap=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
