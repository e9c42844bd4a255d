"""`dit-bench reproduce`: the tiny (proxy) pipeline end to end, resumability, the paper preset offline,
the torchrun launch, and the command that re-creates the shipped proxy checkpoints."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cli
from bench import plugins, reproduce, results
from bench.assets import AssetMissing
from bench.errors import UserError

SHORT = ["--num-samples", "10", "--steps", "4", "--speed-steps", "4", "--speed-batch", "2", "--no-progress",
         "--device", "cpu"]


@pytest.fixture(autouse=True)
def _registry_restored():
    # reproduce registers the recipes' proxy models in the process-wide registry: undo it for later tests
    saved = dict(plugins.methods())
    yield
    registry = plugins.methods()
    registry.clear()
    registry.update(saved)


def _files(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_resumes_without_recomputing(cli_runner, tmp_path):
    run_dir = tmp_path / "run"
    result = cli_runner.invoke(cli.app, ["reproduce", "fasterdiffusion", "--out", str(run_dir), *SHORT],
                               env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "report (proxy)" in result.output

    # samples: a baseline and a method arm with the same per-sample labels (same seeds), all computed now
    arms = {}
    for arm in ("baseline", "method"):
        manifest = json.loads((run_dir / "samples" / arm / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["computed_now"] == 10
        with np.load(run_dir / "samples" / arm / "samples.npz") as f:
            arms[arm] = (f["arr_0"], f["arr_1"])
        assert arms[arm][0].shape == (10, 16, 16, 3) and arms[arm][0].dtype == np.uint8
        assert manifest["protocol"]["sample_hooks"] == ([] if arm == "baseline" else ["fasterdiffusion"])
    np.testing.assert_array_equal(arms["baseline"][1], arms["method"][1])
    assert not np.array_equal(arms["baseline"][0], arms["method"][0])  # feature reuse changes the images

    # records: valid, labelled proxy, the quality record carries its same-run baseline's numbers
    quality = results.load(run_dir / "quality.json")
    speed = results.load(run_dir / "speed.json")
    assert quality["proxy"] is True and speed["proxy"] is True
    assert all(row["proxy"] for row in speed["extra"]["rows"])
    assert quality["metrics"] == json.loads((run_dir / "quality-method.json").read_text())["metrics"]
    assert quality["baseline"]["metrics"] == json.loads((run_dir / "quality-baseline.json").read_text())["metrics"]
    assert quality["protocol"]["steps"] == 4 and quality["protocol"]["num_samples"] == 10
    assert quality["protocol"]["key_steps"] == "speed-rule" and quality["protocol"]["evaluator"] == "proxy"
    hook_rows = [r for r in speed["extra"]["rows"] if r["subject"]["hooks"]["sample"]]
    assert [r["protocol"]["batch_size"] for r in hook_rows] == [2]
    assert hook_rows[0]["metrics"]["speedup"] > 0 and hook_rows[0]["protocol"]["key_steps"] == "speed-rule"

    # report: markdown with the quality table and the speed table, valid PNGs it links to
    report = (run_dir / "report.md").read_text()
    assert "Proxy run" in report and "| metric | baseline | fasterdiffusion | Δ | Δ relative |" in report
    fid_row = next(line for line in report.splitlines() if line.startswith("| proxy FID |"))
    b, m = quality["baseline"]["metrics"]["fid"], quality["metrics"]["fid"]
    assert f"{b:.4g}" in fid_row and f"{m - b:+.4g}" in fid_row
    assert "| 2 |" in report and "(bench.compare)" in report
    for link in ("report_files/grid.png", "report_files/s_per_image.png"):
        assert f"]({link})" in report
        with Image.open(run_dir / link) as png:
            png.verify()
            assert png.format == "PNG"

    # the same command again: every stage reused, nothing rewritten
    before = _files(run_dir)
    again = cli_runner.invoke(cli.app, ["reproduce", "fasterdiffusion", "--out", str(run_dir), *SHORT],
                              env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "ran: nothing" in again.output
    after = _files(run_dir)
    assert before == after  # same files, same mtimes
    assert json.loads((run_dir / "samples" / "method" / "manifest.json").read_text())["computed_now"] == 10

    # another sample count is another protocol: refused in the same directory, never mixed
    more = cli_runner.invoke(cli.app, ["reproduce", "fasterdiffusion", "--out", str(run_dir), "--num-samples", "12",
                                       *SHORT[2:]], env={"COLUMNS": "200"})
    assert more.exit_code != 0
    assert isinstance(more.exception, UserError) and "another protocol" in str(more.exception)


def test_paper_preset_offline_stops_before_any_work(cli_runner, tmp_path):
    run_dir = tmp_path / "paper"
    result = cli_runner.invoke(cli.app, ["reproduce", "fasterdiffusion", "--preset", "paper", "--out", str(run_dir)])
    assert result.exit_code != 0
    assert isinstance(result.exception, AssetMissing)
    message = str(result.exception)
    assert "\n" not in message and "DiT-XL-2-256" in message and "downloads are off" in message
    assert not run_dir.exists()  # nothing was started


def test_paper_recipe_is_the_published_protocol():
    recipe = reproduce.plan(reproduce.Options("fasterdiffusion", "paper"))
    s = recipe["sampling"]
    assert (recipe["model"], recipe["image_size"], recipe["vae"], recipe["evaluator"]) == ("DiT-XL/2", 256, "ema", "adm-tf")
    assert (s["sampler"], s["steps"], s["cfg_scale"], s["num_samples"]) == ("ddpm", "250", 1.5, 50_000)
    assert recipe["reference"] == "adm-ref-imagenet256" and recipe["hook_options"]["fasterdiffusion"]["key_steps"] == "fid"
    assert recipe["speed"]["batches"] == [8] and recipe["speed"]["cfg_scale"] == 4.0  # the timing script's


def test_unknown_preset_and_method_without_recipe(cli_runner, tmp_path):
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        reproduce.recipe_for("fasterdiffusion", "huge")
    no_recipe = plugins.Method(name="no-recipe-test", title="t")
    plugins.register(no_recipe)
    with pytest.raises(UserError, match="no 'tiny' reproduction recipe.*fasterdiffusion"):
        reproduce.recipe_for("no-recipe-test", "tiny")


def test_recipes_name_only_registered_models_hooks_and_assets():
    from bench import assets

    reproduce.register_proxy_models()
    with_any = [name for name, m in plugins.methods().items() if m.recipes]
    assert {"dit", "fasterdiffusion"} <= set(with_any)
    for method in with_any:
        for preset in plugins.get_method(method).recipes:
            recipe = reproduce.recipe_for(method, preset)
            assert recipe["kind"] in reproduce.KINDS
            assert all(name in assets.REGISTRY for name in recipe["assets"])
            if recipe["kind"] == "architecture":
                pairs = recipe["pairs"] + recipe.get("timing", {}).get("pairs", [])
                for entry in pairs:
                    for side in ("model", "versus"):
                        plugins.get_model(entry[side]).kwargs(**entry.get(f"{side}_config", {}))
                continue
            if recipe["kind"] == "training-speed":
                from bench import speed

                for model in recipe["models"]:
                    family = plugins.get_model(model).family
                    for config in recipe["train_configs"]:
                        for hook in speed.train_hook_names(config):
                            plugins.get_hook("train_hooks", hook, family)
                continue
            spec = plugins.get_model(recipe["model"])
            kind = "sample_hooks" if recipe["kind"] == "sampling" else "train_hooks"
            for hook in recipe["hooks"]:
                plugins.get_hook(kind, hook, spec.family)


def test_shipped_proxy_checkpoint_loads_and_is_small():
    from bench import checkpoints

    reproduce.register_proxy_models()
    _, decl = reproduce.proxy_models()["DiT-T/4"]
    path = reproduce.proxy_asset(decl["checkpoint"])
    assert path.stat().st_size < 8e6
    model, info = checkpoints.load_model(plugins.get_model("DiT-T/4"), path, input_size=16, num_classes=10,
                                         in_channels=3)
    assert info["source"] == "ema" and info["args"]["model"] == "DiT-T/4"
    assert len(model.blocks) == 28 and info["args"]["steps"] == decl["train"]["steps"]
    for key in ("lr", "ema_decay", "global_batch_size", "seed"):
        assert info["args"][key] == decl["train"][key]


def test_torchrun_command_launches_the_sampling_worker(tmp_path):
    from bench import sampling

    reproduce.register_proxy_models()
    protocol = sampling.SamplingProtocol(model="DiT-T/4", image_size=16, num_samples=4, num_classes=10,
                                         vae="identity", sample_hooks=("fasterdiffusion",),
                                         hook_options={"fasterdiffusion": {"key_steps": "speed"}})
    cmd = reproduce.torchrun_command(protocol, tmp_path / "s", 2, nproc=3, device="cpu")
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3"]
    assert cmd[5:8] == ["-m", "bench.reproduce", "sample"]
    payload = json.loads(cmd[8])
    fields = payload["protocol"]
    fields["sample_hooks"] = tuple(fields["sample_hooks"])
    assert sampling.SamplingProtocol(**fields).fingerprint() == protocol.fingerprint()
    assert payload["out"] == str(tmp_path / "s") and payload["batch_size"] == 2


def test_proxy_assets_command_retrains_a_loadable_checkpoint(cli_runner, tmp_path):
    from bench import checkpoints

    result = cli_runner.invoke(cli.app, ["proxy-assets", "--model", "DiT-T/4", "--work", str(tmp_path), "--steps", "2",
                                         "--no-ship", "--no-progress"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "dit-bench train --model DiT-T/4" in result.output and "--ema-decay 0.995" in result.output
    path = tmp_path / "dit-t4-digits.pt"
    state, info = checkpoints.read_state_dict(path)
    assert info["source"] == "ema" and info["step"] == 2
    assert all(v.dtype == torch.float16 for k, v in state.items() if v.is_floating_point())
    model, _ = checkpoints.load_model(plugins.get_model("DiT-T/4"), path, input_size=16, num_classes=10, in_channels=3)
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 6, 16, 16)
    # the shipped file was not touched by a --no-ship check
    assert reproduce.proxy_asset("dit-t4-digits.pt").stat().st_size > 0


def test_convergence_speedup_reads_the_method_curve_at_the_baseline_final_fid():
    # baseline ends at FID 5 after 200 steps; the method passes 5 between 100 (FID 7) and 200 (FID 4):
    # 100 + (7 - 5) / (7 - 4) * 100 = 166.67 steps -> 200 / 166.67 = 1.2x
    ratio, how = reproduce.convergence_speedup([[100, 10.0], [200, 5.0]], [[100, 7.0], [200, 4.0]])
    assert ratio == pytest.approx(1.2) and "167" in how
    assert reproduce.convergence_speedup([[100, 10.0], [200, 5.0]], [[100, 4.0], [200, 3.0]])[0] == 2.0
    assert reproduce.convergence_speedup([[100, 10.0], [200, 5.0]], [[100, 9.0], [200, 6.0]])[0] is None


@pytest.mark.slow
def test_speedit_tiny_trains_both_arms_and_plots_fid_against_steps(cli_runner, tmp_path):
    run_dir = tmp_path / "speedit"
    args = ["reproduce", "speedit", "--out", str(run_dir), "--train-steps", "4", "--ckpt-every", "2",
            "--num-samples", "6", "--steps", "ddim3", "--no-progress", "--device", "cpu"]
    result = cli_runner.invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    record = results.load(run_dir / "train.json")
    assert record["proxy"] is True and record["subject"]["hooks"] == {"train": ["speedit"]}
    curves = record["extra"]["curves"]
    assert [s for s, _ in curves["baseline"]] == [s for s, _ in curves["method"]] == [2, 4]
    assert record["metrics"]["fid"] == curves["method"][-1][1]
    assert record["baseline"]["metrics"]["fid"] == curves["baseline"][-1][1]
    base_log = json.loads((run_dir / "train" / "baseline" / "result.json").read_text())
    method_log = json.loads((run_dir / "train" / "method" / "result.json").read_text())
    assert base_log["protocol"]["train_hooks"] == [] and method_log["protocol"]["train_hooks"] == ["speedit"]
    report = (run_dir / "report.md").read_text()
    assert "](report_files/fid_vs_steps.png)" in report and "| 4 |" in report and "Convergence speed" in report
    with Image.open(run_dir / "report_files" / "fid_vs_steps.png") as png:
        png.verify()
    before = _files(run_dir)
    again = cli_runner.invoke(cli.app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0 and "ran: nothing" in again.output
    assert _files(run_dir) == before


@pytest.mark.slow
def test_sampling_under_torchrun_gives_the_single_process_images(tmp_path):
    reproduce.register_proxy_models()
    recipe = reproduce.plan(reproduce.Options("fasterdiffusion", "tiny", num_samples=3, steps="3"))
    protocol = reproduce.sampling_protocol(recipe, ["fasterdiffusion"], "cpu")
    one = reproduce.sample_stage(protocol, tmp_path / "one", 1, torch.device("cpu"), 1, False)
    two = reproduce.sample_stage(protocol, tmp_path / "two", 1, "cpu", 2, False)
    assert one["computed_now"] == two["computed_now"] == 3 and two["status"] == "complete"
    assert one["samples_sha256"] == two["samples_sha256"]


def _run(cli_runner, method, run_dir):
    return cli_runner.invoke(cli.app, ["reproduce", method, "--out", str(run_dir), "--device", "cpu", "--no-progress"],
                             env={"COLUMNS": "200"})


def test_udit_tiny_mac_ratios_are_exact_and_match_the_published_counts(cli_runner, tmp_path):
    run_dir = tmp_path / "udit"
    result = _run(cli_runner, "udit", run_dir)
    assert result.exit_code == 0, result.output
    counts = json.loads((run_dir / "architecture.json").read_text())
    # meta-device counts equal the official classes' (udit-code.yaml, dit-code.yaml)
    assert counts["U-DiT-B"]["params"] == 231251304 and counts["DiT-XL/2"]["params"] == 675129632
    assert counts["U-DiT-B"]["gmacs"] / counts["DiT-XL/2"]["gmacs"] == pytest.approx(22.225 / 118.62, rel=1e-3)
    record = results.load(run_dir / "flops" / "U-DiT-B.json")
    assert record["kind"] == "flops" and record["proxy"] is False
    report = (run_dir / "report.md").read_text()
    assert "| U-DiT-B | DiT-XL/2 | 0.1874" in report and "reproduced x4" in report
    assert "Forward time on this CPU" in report
    times = json.loads((run_dir / "forward-times.json").read_text())["median_s"]
    assert set(times) == {"U-DiT-S", "DiT-S/2"} and all(t > 0 for t in times.values())
    before = _files(run_dir)
    again = _run(cli_runner, "udit", run_dir)
    assert again.exit_code == 0 and "ran: nothing" in again.output and _files(run_dir) == before


def test_edt_tiny_counts_amm_variant_and_surfaces_the_xl_layout(cli_runner, tmp_path):
    run_dir = tmp_path / "edt"
    result = _run(cli_runner, "edt", run_dir)
    assert result.exit_code == 0, result.output
    counts = json.loads((run_dir / "architecture.json").read_text())
    assert counts["EDT-S/2"]["params"] == 38550458 and counts["EDT-XL/2"]["trainable_params"] == 698523098
    # the AMM rescales attention weights: no extra MACs, no parameters
    on, off = counts["EDT-S/2 (amm=True)"], counts["EDT-S/2 (amm=False)"]
    assert on["gmacs"] == off["gmacs"] == counts["EDT-S/2"]["gmacs"] and on["params"] == off["params"]
    assert not (run_dir / "flops" / "EDT-S-2 (amm=True).json").exists()  # variants are not published configs
    report = (run_dir / "report.md").read_text()
    assert "EDT-S/2 AMM on vs off" in report and "51.83" in report  # README's XL count vs the released layout
    times = json.loads((run_dir / "forward-times.json").read_text())["median_s"]
    assert {"EDT-S/2 (amm=True)", "EDT-S/2 (amm=False)", "EDT-S/2", "DiT-S/2"} == set(times)


@pytest.mark.slow
def test_fastdit_tiny_times_the_configurations_against_ckpt(cli_runner, tmp_path):
    run_dir = tmp_path / "fastdit"
    result = _run(cli_runner, "fastdit", run_dir)
    assert result.exit_code == 0, result.output
    record = results.load(run_dir / "train-speed.json")
    rows = record["extra"]["train_rows"]
    assert [r["protocol"]["train_config"] for r in rows] == reproduce.recipe_for("fastdit", "tiny")["train_configs"]
    assert all(r["proxy"] for r in rows) and rows[0].get("baseline") is None
    for r in rows[1:]:
        assert r["baseline"]["protocol"]["train_config"] == "ckpt"
        assert r["metrics"]["speedup"] == pytest.approx(r["metrics"]["steps_per_s"] / rows[0]["metrics"]["steps_per_s"])
    report = (run_dir / "report.md").read_text()
    assert "0.919 = 40461 / 44045" in report and "Proxy run" in report
    before = _files(run_dir)
    again = _run(cli_runner, "fastdit", run_dir)
    assert again.exit_code == 0 and "ran: nothing" in again.output and _files(run_dir) == before


def test_fastdit_paper_recipe_is_the_readme_protocol_and_needs_the_vae_offline(cli_runner, tmp_path):
    recipe = reproduce.plan(reproduce.Options("fastdit", "paper"))
    assert (recipe["models"], recipe["global_batch_size"], recipe["image_size"]) == (["DiT-XL/2"], 128, 256)
    assert recipe["train_configs"][0] == "ckpt"  # the README's speed-ups are against train_baseline.py
    result = cli_runner.invoke(cli.app, ["reproduce", "fastdit", "--preset", "paper", "--out", str(tmp_path / "p")])
    assert result.exit_code != 0 and isinstance(result.exception, AssetMissing)
    assert not (tmp_path / "p").exists()
    with pytest.raises(UserError, match="one process"):
        reproduce.plan(reproduce.Options("udit", "tiny", nproc_per_node=2))
    with pytest.raises(UserError, match="--num-samples do not apply to a training-speed recipe"):
        reproduce.plan(reproduce.Options("fastdit", "tiny", num_samples=10))
