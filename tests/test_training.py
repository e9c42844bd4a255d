"""The training loop (dit.md §D.1): it learns, it resumes bit-exactly, its checkpoints are the official
layout, its EMA is DiT's, and train hooks compose through the registry or are refused with a reason."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import checkpoints, plugins, sampling, training
from bench.distributed import World
from bench.errors import UserError
from bench.plugins import PluginError
from bench.training import TrainConfig, TrainHooks
from tests.support.tiny import TINY_DEEP_MODEL as DEEP_MODEL
from tests.support.tiny import TINY_MODEL, register_tiny_method

ROOT = Path(__file__).resolve().parents[1]
EDT_MODEL = "Tiny-EDT/2"


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_tiny_method()
    if "training-test" not in plugins.methods():
        plugins.register(plugins.Method(
            name="training-test", title="hooks that exercise the train-hook contract",
            train_hooks={"fake-loss": FakeLoss, "fake-timesteps": FakeTimesteps}))
        from methods.edt import EDT

        edt_tiny = plugins.ModelSpec(EDT_MODEL, EDT, dict(hidden_size=48, depth=12, num_heads=[3, 4, 5, 4, 3],
                                                          stages_depth=[2, 2, 2, 3, 3], dims=[48, 64, 80, 64, 48],
                                                          num_classes=10, size="S", patch_size=2),
                                     family="EDT", default_input_size=16)
        plugins.register(plugins.Method(name="training-edt-test", title="a tiny EDT", models=(edt_tiny,)))
        plugins.register(plugins.Method(name="edt-only-test", title="a hook for another family",
                                        train_hooks={"other-family": FakeTimesteps},
                                        compatible_families=("EDT",)))


class FakeLoss:
    """A loss hook (the shape of a masked-training objective): draws its own t and noise, keeps state."""

    def __init__(self, diffusion):
        self.diffusion, self.calls = diffusion, np.zeros(1)

    def loss(self, model, x0, model_kwargs, generator):
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        self.calls += 1
        terms = self.diffusion.training_losses(model, x0, t, model_kwargs, noise=noise)
        return {"loss": terms["loss"].mean(), "mse": terms["mse"].mean().detach()}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = np.array(state["calls"])


class FakeTimesteps:
    def __init__(self, diffusion, step: int = 0):
        self.step = step

    def sample_timesteps(self, n, device, generator):
        return torch.full((n,), self.step, device=device), None


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    """16 random 8x8 RGB images in 10 classes, trained in pixel space (identity VAE)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, images=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8), labels=rng.integers(0, 10, 16))
    return path


def _config(pixels, out, steps, **kw):
    base = dict(model=TINY_MODEL, data=str(pixels), out=str(out), vae="identity", global_batch_size=4, steps=steps,
                lr=1e-3, log_every=1, ckpt_every=100, num_workers=0, num_classes=10)
    return TrainConfig(**{**base, **kw})


def _train(config, **kw):
    return training.train(config, device="cpu", progress=False, environment={"test": True}, **kw)


def _read(path):
    obj, _ = checkpoints.read_checkpoint(path)
    return obj


# ------------------------------------------------------------------------------------------ learning
def test_a_short_run_lowers_the_loss(pixels, tmp_path):
    summary = _train(_config(pixels, tmp_path / "run", 30))
    losses = [e["loss"] for e in summary["log"]]
    assert len(losses) == 30 and summary["steps"] == 30
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])  # smoothed over five steps each


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("hooks", [(), ("speedit", "grad-ckpt", "amp-fp16"), ("fake-loss",)])
def test_stop_and_resume_is_bit_exact(pixels, tmp_path, hooks):
    straight = _train(_config(pixels, tmp_path / "straight", 6, hooks=hooks))
    torch.manual_seed(1234)  # global RNG state must not matter
    _train(_config(pixels, tmp_path / "resumed", 3, hooks=hooks))
    resumed = _train(_config(pixels, tmp_path / "resumed", 6, hooks=hooks), resume=True)
    assert resumed["start_step"] == 3
    a, b = _read(straight["checkpoint"]), _read(resumed["checkpoint"])
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    for i, state in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][i][k]) for k, v in state.items())
    assert [e["loss"] for e in straight["log"][3:]] == [e["loss"] for e in resumed["log"]]
    state_a, state_b = a["args"].train_state, b["args"].train_state
    assert state_a == state_b and state_a["step"] == 6
    if "fake-loss" in hooks:
        assert state_b["hooks"]["fake-loss"] == {"calls": [6.0]}  # 3 before the stop, 3 after: state resumed
    if "amp-fp16" in hooks:
        assert state_b["grad_scaler"]["scale"] == 65536.0


def test_resume_refuses_another_run_and_fresh_runs_refuse_old_checkpoints(pixels, tmp_path):
    out = tmp_path / "run"
    _train(_config(pixels, out, 2))
    with pytest.raises(UserError, match="already holds checkpoints"):
        _train(_config(pixels, out, 4))
    with pytest.raises(UserError, match=r"lr: 0\.001 in the checkpoint, 0\.002 now"):
        _train(_config(pixels, out, 4, lr=2e-3), resume=True)
    with pytest.raises(UserError, match="already at step 2"):
        _train(_config(pixels, out, 2), resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        _train(_config(pixels, tmp_path / "empty", 2), resume=True)


def test_resume_drops_log_lines_of_a_lost_tail(pixels, tmp_path):
    out = tmp_path / "run"
    _train(_config(pixels, out, 2))
    with open(out / training.LOG_FILE, "a") as fh:  # a crashed run had logged past its last checkpoint
        fh.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    _train(_config(pixels, out, 4), resume=True)
    steps = [json.loads(line)["step"] for line in (out / training.LOG_FILE).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_images_are_encoded_by_the_vae_with_seeded_posterior_draws(tmp_path):
    from tests.support.tiny import tiny_vae_folder

    rng = np.random.default_rng(4)
    images = tmp_path / "images16.npz"
    np.savez(images, images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), labels=rng.integers(0, 10, 8))
    vae = str(tiny_vae_folder(tmp_path / "vae"))
    runs = [_read(_train(_config(images, tmp_path / f"run{k}", 2, vae=vae, seed=seed))["checkpoint"])
            for k, seed in enumerate((0, 0, 1))]
    assert runs[0]["args"].in_channels == 4 and runs[0]["args"].input_size == 8  # 2x-downsampling, 4 channels
    assert runs[0]["model"]["x_embedder.proj.weight"].shape[1] == 4
    assert all(torch.equal(runs[0]["model"][k], runs[1]["model"][k]) for k in runs[0]["model"])
    assert not all(torch.equal(runs[0]["model"][k], runs[2]["model"][k]) for k in runs[0]["model"])


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_is_the_official_layout_and_loads_strictly(pixels, tmp_path):
    summary = _train(_config(pixels, tmp_path / "run", 4, ckpt_every=2))
    files = sorted(p.name for p in (tmp_path / "run" / training.CHECKPOINT_DIR).iterdir())
    assert files == ["0000002.pt", "0000004.pt"]
    obj = _read(summary["checkpoint"])
    assert set(obj) == {"model", "ema", "opt", "args", "step"} and obj["step"] == 4
    assert isinstance(obj["args"], argparse.Namespace)
    assert obj["args"].model == TINY_MODEL and obj["args"].image_size == 8 and obj["args"].global_seed == 0
    model, info = checkpoints.load_model(plugins.get_model(TINY_MODEL), summary["checkpoint"], input_size=8,
                                         in_channels=3, num_classes=10)
    assert info["source"] == "ema" and info["step"] == 4
    assert all(torch.equal(v, obj["ema"][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(obj["ema"][k], obj["model"][k]) for k in obj["model"])


def test_result_record_and_json_log(pixels, tmp_path):
    from bench import results

    _train(_config(pixels, tmp_path / "run", 3, hooks=("grad-ckpt",)))
    record = results.load(tmp_path / "run" / training.RESULT_FILE)
    assert record["kind"] == "train"
    assert set(record["metrics"]) == {"steps_per_s", "peak_memory_mb", "final_loss"}
    assert record["metrics"]["steps_per_s"] > 0 and record["metrics"]["peak_memory_mb"] is None  # CPU
    assert record["subject"] == {"method": "fastdit", "model": TINY_MODEL, "resolution": 8,
                                 "hooks": {"train": ["grad-ckpt"]}}
    assert record["protocol"]["global_batch_size"] == 4 and record["protocol"]["precision"] == "fp32"
    lines = [json.loads(line) for line in (tmp_path / "run" / training.LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3] and record["metrics"]["final_loss"] == lines[-1]["loss"]


# ------------------------------------------------------------------------------------------ EMA, RNG
def test_ema_is_an_exact_copy_then_the_official_update():
    model = torch.nn.Linear(2, 1)
    ema = training.make_ema(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    with torch.no_grad():
        model.weight.fill_(3.0)
        ema.weight.fill_(1.0)
    training.update_ema(ema, model, decay=0.75)
    assert ema.weight.tolist() == [[1.5, 1.5]]  # 0.75 * 1 + 0.25 * 3


def test_ema_follows_every_step_frozen_parameters_included(pixels, tmp_path):
    _train(_config(pixels, tmp_path / "run", 2, ema_decay=0.5, ckpt_every=1))
    first, second = (_read(tmp_path / "run" / "checkpoints" / f"000000{k}.pt") for k in (1, 2))
    for name, weight in second["model"].items():
        assert torch.equal(second["ema"][name], 0.5 * first["ema"][name] + 0.5 * weight), name
    assert torch.equal(second["ema"]["pos_embed"], second["model"]["pos_embed"])  # frozen, updated, unchanged


def test_a_step_leaves_the_global_rng_alone_and_draws_label_drops_from_the_step(pixels, tmp_path):
    run = training.setup(_config(pixels, tmp_path / "run", 2), torch.device("cpu"), World())
    x = torch.zeros(4, 3, 8, 8)
    y = torch.arange(4)
    drops = []
    run.model.y_embedder.register_forward_hook(lambda m, args, out: drops.append(out.detach().clone()))
    before = torch.get_rng_state()
    training.train_step(run, 7, x, y)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)
    training.train_step(run, 7, x, y)
    assert torch.equal(drops[0], drops[1])  # same step, same label dropout, whatever the global state
    # the per-step global seed actually reaches the model: step 7 and 8 drop different labels for some seed
    drop_sets = []
    for step in range(40):
        with training.seeded_global_rng(training.StepRandomness.at(0, step, 0, torch.device("cpu")).label_drop_seed,
                                        torch.device("cpu")):
            drop_sets.append(tuple((torch.rand(4) < 0.1).tolist()))
    assert len(set(drop_sets)) > 1


# ------------------------------------------------------------------------------------------ hooks
def _compose(*names, family="DiT", options=None):
    from bench.diffusion import create_diffusion

    return TrainHooks.compose(names, family, create_diffusion(""), options)


@pytest.mark.parametrize("names, reason", [
    (("amp-bf16", "amp-fp16"), "'amp-bf16' and 'amp-fp16' both decide the autocast precision"),
    (("tf32", "no-tf32"), "'tf32' and 'no-tf32' both set tf32"),
    (("speedit", "fake-timesteps"), "both decide the training timesteps"),
    (("fake-loss", "speedit"), "'fake-loss' forms the whole loss and draws its own timesteps, so 'speedit'"),
    (("other-family",), "cannot run on a DiT model: it needs one of EDT"),
    (("grad-ckpt", "grad-ckpt"), "given twice"),
    (("no-such-hook",), "unknown train hook"),
])
def test_incompatible_hooks_are_refused_with_the_reason(names, reason):
    with pytest.raises(PluginError, match=reason):
        _compose(*names)


def test_hook_options_are_checked():
    hooks = _compose("fake-timesteps", options={"fake-timesteps": {"step": 5}})
    t, w = hooks.sample_timesteps(3, torch.device("cpu"), torch.Generator(), 1000)
    assert t.tolist() == [5, 5, 5] and w is None
    with pytest.raises(PluginError, match="does not accept these options"):
        _compose("fake-timesteps", options={"fake-timesteps": {"nope": 1}})
    with pytest.raises(PluginError, match="not among the train hooks"):
        _compose("grad-ckpt", options={"speedit": {"variant": "nus"}})


def test_default_timesteps_are_uniform_and_seeded():
    hooks = _compose()
    t, w = hooks.sample_timesteps(4000, torch.device("cpu"), torch.Generator().manual_seed(0), 1000)
    assert w is None and t.min() >= 0 and t.max() <= 999 and 450 < t.float().mean() < 550
    again, _ = hooks.sample_timesteps(4000, torch.device("cpu"), torch.Generator().manual_seed(0), 1000)
    assert torch.equal(t, again)


def test_features_data_needs_the_features_hook_and_vice_versa(pixels, tmp_path):
    from bench import data
    from bench.vae import load_vae

    data.extract_features(data.ArrayImages(pixels), load_vae("identity"), tmp_path / "feat", vae_name="identity")
    with pytest.raises(UserError, match="holds pre-extracted latents"):
        _train(_config(pixels, tmp_path / "a", 1, data=str(tmp_path / "feat"), vae=None))
    with pytest.raises(UserError, match="needs a directory written by"):
        _train(_config(pixels, tmp_path / "b", 1, hooks=("features",)))
    with pytest.raises(UserError, match="extracted with VAE 'identity', not 'ema'"):
        _train(_config(pixels, tmp_path / "c", 1, data=str(tmp_path / "feat"), vae="ema", hooks=("features",)))


def test_speedit_hook_is_built_with_diffusion_and_supplies_dual_batches():
    t, w = _compose("speedit").sample_timesteps(8, torch.device("cpu"), torch.Generator().manual_seed(0), 1000)
    assert w is not None and w.shape == (8,)
    assert torch.equal(t[5:], torch.where(t[:3] < 642, 642 - t[:3], t[:3] - 642))  # n//2+1 draws, then duals


# ------------------------------------------------------------------------------------------ composition
def test_speedit_fastdit_training_then_fasterdiffusion_sampling(pixels, tmp_path):
    """One model, three methods: SpeeDiT + fast-DiT hooks in training, FasterDiffusion at sampling."""
    hooks = ("speedit", "grad-ckpt", "amp-bf16")
    trained = _train(_config(pixels, tmp_path / "composed", 3, model=DEEP_MODEL, hooks=hooks, lr=1e-4))
    plain = _train(_config(pixels, tmp_path / "plain", 3, model=DEEP_MODEL, lr=1e-4))
    a, b = _read(trained["checkpoint"]), _read(plain["checkpoint"])
    assert not torch.equal(a["model"]["final_layer.linear.weight"], b["model"]["final_layer.linear.weight"])
    assert tuple(a["args"].hooks) == hooks
    assert trained["record"]["protocol"]["precision"] == "bf16"
    assert trained["record"]["subject"]["method"] == "speedit+fastdit"

    protocol = sampling.SamplingProtocol(model=DEEP_MODEL, image_size=8, num_samples=4,
                                         checkpoint=trained["checkpoint"], num_classes=10, steps="10",
                                         cfg_scale=1.5, vae="identity", sample_hooks=("fasterdiffusion",),
                                         hook_options={"fasterdiffusion": {"key_steps": "every:3"}})
    parts, info = sampling.build_parts(protocol, torch.device("cpu"))
    assert info["source"] == "ema" and info["step"] == 3
    assert parts.model.key_steps == (0, 3, 6, 9)  # the FasterDiffusion wrapper is in place
    manifest = sampling.run(parts, protocol, tmp_path / "samples", 4, torch.device("cpu"), progress=False,
                            environment={"test": True})
    assert manifest["status"] == "complete" and manifest["protocol"]["sample_hooks"] == ["fasterdiffusion"]
    with np.load(tmp_path / "samples" / sampling.SAMPLES_FILE) as f:
        assert f["arr_0"].shape == (4, 8, 8, 3) and f["arr_0"].dtype == np.uint8


def test_a_loss_hook_with_state_is_hosted_and_resumed_exactly(tmp_path):
    """EDT's masked training (``edt-mask``) forms the whole loss and keeps a loss history for its sampler."""
    rng = np.random.default_rng(3)
    images = tmp_path / "images16.npz"
    np.savez(images, images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), labels=rng.integers(0, 10, 8))
    config = dict(model=EDT_MODEL, hooks=("edt-mask",))
    straight = _train(_config(images, tmp_path / "straight", 3, **config))
    _train(_config(images, tmp_path / "resumed", 2, **config))
    resumed = _train(_config(images, tmp_path / "resumed", 3, **config), resume=True)
    a, b = _read(straight["checkpoint"]), _read(resumed["checkpoint"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    history = b["args"].train_state["hooks"]["edt-mask"]
    assert history == a["args"].train_state["hooks"]["edt-mask"] and sum(history["loss_counts"]) == 3 * 4
    with pytest.raises(PluginError, match="gradient_checkpointing switch; EDT has none"):
        _train(_config(images, tmp_path / "ckpt", 1, model=EDT_MODEL, hooks=("edt-mask", "grad-ckpt")))


# ------------------------------------------------------------------------------------------ CLI, DDP
def test_cli_train_and_its_one_line_errors(cli_runner, pixels, tmp_path):
    import cli

    args = ["train", "--model", TINY_MODEL, "--data", str(pixels), "--vae", "identity", "--global-batch-size", "4",
            "--steps", "2", "--log-every", "1", "--out", str(tmp_path / "run"), "--no-progress", "--workers", "0",
            "--device", "cpu", "--hook", "speedit-nus", "--hook-option", "speedit-nus.weighting=p2"]
    result = cli_runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "steps 0..2" in result.output and (tmp_path / "run" / training.RESULT_FILE).is_file()
    assert _read(tmp_path / "run" / "checkpoints" / "0000002.pt")["args"].hook_options == {
        "speedit-nus": {"weighting": "p2"}}
    again = cli_runner.invoke(cli.app, args)
    assert isinstance(again.exception, UserError) and "pass --resume" in str(again.exception)


def test_torchrun_two_processes_share_the_global_batch(pixels, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "support" / "run_cli.py"), "train", "--model", TINY_MODEL, "--data", str(pixels),
           "--vae", "identity", "--global-batch-size", "8", "--steps", "2", "--log-every", "1", "--out", str(out),
           "--no-progress", "--workers", "0", "--device", "cpu", "--num-classes", "10"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in (out / training.LOG_FILE).read_text().splitlines()]
    assert [(e["step"], e["world_size"]) for e in lines] == [(1, 2), (2, 2)]  # written once, by rank 0
    obj = _read(out / "checkpoints" / "0000002.pt")
    assert obj["args"].train_state["world_size"] == 2
    model, _ = checkpoints.load_model(plugins.get_model(TINY_MODEL), out / "checkpoints" / "0000002.pt",
                                      input_size=8, in_channels=3, num_classes=10)
    assert not any(k.startswith("module.") for k in obj["model"])


def test_the_fast_path_compiles_the_blocks_and_picks_the_kernels_per_step(pixels, tmp_path, monkeypatch):
    from bench import speed

    compiled, kernels = [], []
    monkeypatch.setattr(speed, "compile_model", lambda model, mode: compiled.append((type(model).__name__, mode)))
    real = speed.attention_context
    monkeypatch.setattr(speed, "attention_context", lambda choice: kernels.append(choice) or real(choice))
    summary = _train(_config(pixels, tmp_path / "fast", 3, compile=True, attention="math"))
    assert compiled == [("DiT", "default")] and kernels == ["math"] * 3
    args = _read(summary["checkpoint"])["args"]
    assert (args.compile, args.attention) == (True, "math")  # recorded, but not a condition of resuming
    resumed = _train(_config(pixels, tmp_path / "fast", 4), resume=True)
    assert resumed["start_step"] == 3
    with pytest.raises(UserError, match="is a CUDA kernel"):
        _train(_config(pixels, tmp_path / "cuda-only", 1, attention="efficient"))
    with pytest.raises(UserError, match="--attention 'fastest'"):
        _config(pixels, tmp_path / "bad", 1, attention="fastest")
