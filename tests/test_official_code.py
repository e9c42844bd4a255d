"""`dit-bench speed --official-code DIR`: the official sampler timed beside dit-bench's rows.

The tests write a stand-in for a checkout of facebookresearch/DiT (a ``models.py`` with the official class
name and constructor, a ``diffusion`` package with ``create_diffusion``), as the real one is laid out; the
real repository was checked the same way in a scratch folder. What is asserted: the folder's own code is
what runs (and is taken out of ``sys.modules`` again), it must take dit-bench's weights strictly, a forward
that disagrees is reported, the official rows run at the official settings on the same batches, and every
baseline row's speed-up over the official code is exactly its throughput over the official row's.
"""
import json
import sys
import textwrap
import types

import pytest
import torch

import cli
from bench import official, plugins, results, speed
from bench.errors import UserError
from tests.support.tiny import TINY_MODEL, register_tiny_method

TINY = ["--model", TINY_MODEL, "--image-size", "64", "--num-classes", "10"]


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    register_tiny_method()


def official_checkout(folder, *, forward_extra: str = "", delay_s: float = 0.0, extra_param: bool = False,
                      bake_on_eval: bool = False):
    """A folder laid out like facebookresearch/DiT; its DiT runs dit-bench's blocks, with optional changes.

    ``bake_on_eval``: like official U-DiT, eval() bakes the current weights into what eval-mode forwards use
    (there: the re-parameterised FFN merged in place), so weights loaded after eval() are never used."""
    (folder / "diffusion").mkdir(parents=True)
    (folder / "diffusion" / "__init__.py").write_text(textwrap.dedent("""
        from bench.diffusion import create_diffusion as _create

        CALLS = []

        def create_diffusion(timestep_respacing, **kwargs):
            CALLS.append(timestep_respacing)
            return _create(timestep_respacing, **kwargs)
        """))
    (folder / "models.py").write_text(textwrap.dedent(f"""
        import time

        import torch
        from methods.dit import DiT as _DiT

        FORWARDS = []

        class DiT(_DiT):
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                if {extra_param}:
                    self.extra = torch.nn.Parameter(torch.zeros(1))

            def train(self, mode=True):
                super().train(mode)
                if {bake_on_eval} and not mode:
                    self.baked = self.final_layer.linear.weight.detach().clone()
                return self

            def forward(self, x, t, y):
                FORWARDS.append((len(x), torch.is_autocast_enabled(), torch.backends.cuda.matmul.allow_tf32))
                time.sleep({delay_s})
                if {bake_on_eval} and not self.training:
                    live = self.final_layer.linear.weight.detach().clone()
                    with torch.no_grad():
                        self.final_layer.linear.weight.copy_(self.baked)
                    try:
                        return super().forward(x, t, y){forward_extra}
                    finally:
                        with torch.no_grad():
                            self.final_layer.linear.weight.copy_(live)
                return super().forward(x, t, y){forward_extra}
        """))
    return folder


def invoke(cli_runner, *args):
    result = cli_runner.invoke(cli.app, ["speed", *args], env={"COLUMNS": "250"})
    if result.exception is not None and not isinstance(result.exception, (SystemExit, UserError)):
        raise result.exception
    return result


def test_the_folder_s_own_classes_are_imported_and_taken_out_of_sys_modules(tmp_path):
    folder = official_checkout(tmp_path / "DiT")
    before = types.ModuleType("models")
    sys.modules["models"] = before
    try:
        code = official.load(folder, plugins.get_model(TINY_MODEL))
        assert sys.modules["models"] is before  # an unrelated `models` module is back in place
    finally:
        del sys.modules["models"]
    assert "diffusion" not in sys.modules
    assert code.model_class.__module__ == "models" and code.model_class.__name__ == "DiT"
    assert code.model_class.forward.__code__.co_filename == str(folder / "models.py")
    assert code.card() == {"folder": str(folder), "commit": None, "model": "models:DiT",
                           "diffusion": "diffusion:create_diffusion"}


def test_the_twin_holds_our_weights_and_its_forward_is_compared_on_probe_weights(tmp_path):
    spec = plugins.get_model(TINY_MODEL)
    overrides = {"input_size": 8, "num_classes": 10, "in_channels": 4}
    ours = spec.build(**overrides).eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 10])
    same = official.build_twin(official.load(official_checkout(tmp_path / "a"), spec), spec, overrides, ours)
    for key, value in ours.state_dict().items():
        assert torch.equal(same.state_dict()[key], value)
    assert official.forward_difference(ours, same, x, y) == 0.0
    # The official init zeroes the output layer: without probe weights both forwards would be 0 and agree.
    assert ours(x, torch.full((2,), 500), y).abs().max() == 0
    shifted = official.build_twin(official.load(official_checkout(tmp_path / "b", forward_extra=" * 1.01"), spec),
                                  spec, overrides, ours)
    assert official.forward_difference(ours, shifted, x, y) == pytest.approx(0.01, rel=1e-4)  # relative to ours
    # ... and both models have their own weights back afterwards.
    for key, value in ours.state_dict().items():
        assert torch.equal(shifted.state_dict()[key], value)
    assert ours(x, torch.full((2,), 500), y).abs().max() == 0


def test_official_rows_run_at_the_official_settings_and_baselines_get_their_speedup(cli_runner, tmp_path):
    folder = official_checkout(tmp_path / "DiT")
    out = tmp_path / "speed.json"
    result = invoke(cli_runner, *TINY, "--steps", "3", "--batch", "1", "--batch", "2", "--warmup", "0",
                    "--repeats", "1", "--attention", "math", "--official-code", str(folder), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "vs official" in result.output and "official code" in result.output
    assert "attention math" in result.output  # the title states the run's settings, not the official rows'
    record = results.load(out)
    assert "code" not in record["protocol"] and record["protocol"]["attention"] == "math"  # headline: ours
    rows = results.load(out)["extra"]["rows"]
    official_rows = [r for r in rows if r["protocol"].get("code") == "official"]
    ours = [r for r in rows if r["protocol"].get("code") is None]
    assert [r["protocol"]["batch_size"] for r in official_rows] == [1, 2]
    for row in official_rows:
        results.validate(row)
        p = row["protocol"]
        assert (p["precision"], p["attention"], p["compile"], p["vae"]) == ("tf32", "default", False, "none")
        assert p["official_code"]["folder"] == str(folder.resolve())
        assert p["official_code"]["forward_relative_difference"] == 0.0
        assert "speedup_vs_official" not in row["metrics"]
    assert [r["protocol"]["batch_size"] for r in ours] == [1, 2]
    for row, off in zip(ours, official_rows):
        assert row["metrics"]["speedup_vs_official"] == pytest.approx(
            row["metrics"]["images_per_s"] / off["metrics"]["images_per_s"], rel=1e-12)


def test_the_official_sampler_itself_runs_every_step_in_fp32_with_tf32(tmp_path, monkeypatch):
    loaded = []
    real_load = official.load
    monkeypatch.setattr(official, "load", lambda folder, spec: loaded.append(real_load(folder, spec)) or loaded[-1])
    folder = official_checkout(tmp_path / "DiT")
    config = speed.SpeedConfig(models=(TINY_MODEL,), image_size=64, num_classes=10, steps=4, batches=("2",),
                               warmup=1, repeats=2, official_code=str(folder), precisions=("bf16",))
    record = speed.run(config, "cpu")
    assert "models" not in sys.modules and "diffusion" not in sys.modules
    code, = loaded
    assert code.create_diffusion.__globals__["CALLS"] == ["4"]
    forwards = code.model_class.forward.__globals__["FORWARDS"]
    # the probe forward in true fp32, then 4 steps x (1 warm-up + 2 timed); 2 images, 4 rows with guidance
    assert forwards == [(4, False, False)] + [(4, False, True)] * 12
    rows = record["extra"]["rows"]
    assert [(r["protocol"].get("code"), r["protocol"]["precision"]) for r in rows] == [("official", "tf32"),
                                                                                       (None, "bf16")]


def test_the_paper_protocol_says_when_it_is_not_within_5_percent_of_the_official_code(cli_runner, tmp_path):
    slow = official_checkout(tmp_path / "slow", delay_s=0.02)
    out = tmp_path / "paper.json"
    result = invoke(cli_runner, *TINY, "--protocol", "paper", "--steps", "3", "--warmup", "0",
                    "--official-code", str(slow), "--out", str(out))
    assert result.exit_code == 0, result.output
    ours = [r for r in results.load(out)["extra"]["rows"] if r["protocol"].get("code") is None]
    assert ours[0]["metrics"]["speedup_vs_official"] > 1.05
    assert any("off the official code's (tolerance ±5%)" in w for w in ours[0]["warnings"])


def test_a_disagreeing_forward_is_a_warning_in_every_record(tmp_path):
    folder = official_checkout(tmp_path / "DiT", forward_extra=" + 0.5")
    config = speed.SpeedConfig(models=(TINY_MODEL,), image_size=64, num_classes=10, steps=2, batches=("1",),
                               warmup=0, repeats=1, official_code=str(folder))
    record = speed.run(config, "cpu")
    assert any("differs from the official code's" in w for w in record["warnings"])
    assert all(any("differs from the official code's" in w for w in r["warnings"]) for r in record["extra"]["rows"])


@pytest.mark.parametrize("setup, message", [
    (lambda tmp: tmp / "missing", "no such folder"),
    (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "importing 'models' failed"),
    (lambda tmp: official_checkout(tmp / "odd", extra_param=True), "with strict=True"),
])
def test_a_wrong_official_folder_is_a_one_line_user_error(cli_runner, tmp_path, setup, message):
    folder = setup(tmp_path)
    result = invoke(cli_runner, *TINY, "--steps", "2", "--batch", "1", "--official-code", str(folder))
    assert result.exit_code != 0 and isinstance(result.exception, UserError)  # cli.main: one line, exit 2
    assert message in str(result.exception) and "\n" not in str(result.exception)


def test_a_model_whose_plug_in_names_no_official_code_is_refused(tmp_path):
    spec = plugins.ModelSpec("Nameless", lambda **kw: None, {}, family="DiT")
    with pytest.raises(official.OfficialCodeError, match="does not say where the model lives"):
        official.load(official_checkout(tmp_path / "DiT"), spec)


def test_every_dit_config_points_at_the_official_layout():
    for name in ("DiT-XL/2", "DiT-S/8"):
        assert plugins.get_model(name).official_code == {"model": "models:DiT",
                                                         "diffusion": "diffusion:create_diffusion"}
    assert json.dumps(speed.SpeedConfig(official_code="/x").card())  # the request card stays JSON


def test_every_edt_and_udit_config_points_at_the_official_layout():
    # Checked against checkouts of xinwangChen/EDT and YuchuanTian/U-DiT (scratch, not committed): every EDT
    # size with and without AMM, and U-DiT-S/B, take our kwargs and weights strictly and agree in fp32 to
    # about 2e-6 of the output's scale (U-DiT once eval() follows the load: see the next test).
    names = [spec.name for spec in plugins.get_method("edt").models]
    assert sorted(names) == sorted(f"EDT-{s}/2{a}" for s in ("S", "B", "XL") for a in ("", "_noAMM"))
    for name in names:
        assert plugins.get_model(name).official_code == {"model": "models_edt:EDT",
                                                         "diffusion": "diffusion:create_diffusion"}
    for name in ("U-DiT-S", "U-DiT-B", "U-DiT-L"):
        assert plugins.get_model(name).official_code == {"model": "udit_models:U_DiT",
                                                         "diffusion": "diffusion:create_diffusion"}


def test_eval_follows_every_load_for_official_code_that_bakes_weights_on_eval(tmp_path):
    """Official U-DiT merges its FFN branches on eval(): a twin put in eval mode before loading would time
    and check its own random init."""
    spec = plugins.get_model(TINY_MODEL)
    overrides = {"input_size": 8, "num_classes": 10, "in_channels": 4}
    torch.manual_seed(0)
    ours = spec.build(**overrides).eval()
    with torch.no_grad():
        ours.final_layer.linear.weight.normal_()
    code = official.load(official_checkout(tmp_path / "DiT", bake_on_eval=True), spec)
    twin = official.build_twin(code, spec, overrides, ours)
    assert torch.equal(twin.baked, ours.final_layer.linear.weight)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 10])
    assert official.forward_difference(ours, twin, x, y) == 0.0
    assert torch.equal(twin.baked, ours.final_layer.linear.weight)  # baked again from the restored weights


def test_the_report_shows_every_row_with_its_speedup_over_the_official_code(tmp_path):
    from bench import report

    folder = official_checkout(tmp_path / "DiT")
    config = speed.SpeedConfig(models=(TINY_MODEL,), image_size=64, num_classes=10, steps=2, batches=("1", "2"),
                               warmup=0, repeats=1, official_code=str(folder), train=True, attention="math",
                               train_configs=("features",), global_batch_size=2)
    record = speed.run(config, "cpu")
    path = results.save(record, tmp_path / "speed.json")
    markdown = report.render_markdown(report.build([path]))
    sampling = markdown.split("## Sampling speed: `speed.json`")[1].split("\n## ")[0]
    # the header states the run's settings, not those of the official rows listed first (attention default)
    assert "fast protocol: ddpm, 2 steps, guidance 1.5, VAE none, attention math, on cpu" in sampling
    lines = [line for line in sampling.splitlines() if line.startswith(f"| {TINY_MODEL} |")]
    assert [line.split(" | ")[1] for line in lines] == ["official code", "official code", "baseline", "baseline"]
    ours = [r for r in record["extra"]["rows"] if r["protocol"].get("code") is None]
    for line, row in zip(lines[2:], ours):
        assert line.split(" | ")[13] == report._num(row["metrics"]["speedup_vs_official"])
    assert "## Training speed: `speed.json`" in markdown and "| features |" in markdown


def test_the_gpu_speed_matrix_script_runs_every_stage_end_to_end(tmp_path):
    """reports/run-speed-matrix.sh is what a GPU session runs; here at toy size on the CPU."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    folder = official_checkout(tmp_path / "DiT")
    # VAE=none: the SD VAE at 64 px would be most of the time here; its decode is tested in test_speed.py.
    env = {**os.environ, "MODEL": "DiT-S/8", "IMAGE_SIZE": "64", "STEPS": "2", "GLOBAL_BATCH": "2",
           "MAX_BATCH": "2", "VAE": "none", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(["bash", str(repo / "reports" / "run-speed-matrix.sh"), str(tmp_path / "m"), str(folder)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "m"
    records = {name: results.load(out / f"{name}.json") for name in ("paper", "fast-fixed", "fast-auto", "train")}
    assert records["paper"]["protocol"]["name"] == "paper"
    assert [r["protocol"]["batch_policy"] for r in records["fast-auto"]["extra"]["rows"]] == ["auto", "auto"]
    assert [r["protocol"]["batch_size"] for r in records["fast-fixed"]["extra"]["rows"]] == [1, 8, 1, 8]
    # without a VAE only the pre-extracted-feature configurations run: features, all and dit-bench's fast
    assert [r["protocol"]["train_config"] for r in records["train"]["extra"]["train_rows"]] == ["features", "all",
                                                                                               "fast"]
    markdown = (out / "report.md").read_text()
    for name in ("paper", "fast-fixed", "fast-auto"):
        assert f"## Sampling speed: `{name}.json`" in markdown
    assert "## Training speed: `train.json`" in markdown and "| official code |" in markdown


def test_a_failing_stage_of_the_matrix_leaves_the_others_and_their_report(tmp_path):
    """On a lent GPU one broken stage must not cost the minutes the others took."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MODEL": "DiT-S/8", "IMAGE_SIZE": "64", "STEPS": "2", "STAGES": "bogus paper",
           "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(["bash", str(repo / "reports" / "run-speed-matrix.sh"), str(tmp_path / "m")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 1
    assert "stage bogus failed" in done.stderr and "failed: bogus" in done.stderr
    assert results.load(tmp_path / "m" / "paper.json")["protocol"]["name"] == "paper"
    assert "## Sampling speed: `paper.json`" in (tmp_path / "m" / "report.md").read_text()
