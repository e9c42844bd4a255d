"""The sampling protocol: per-sample determinism, atomic shards, resume, merge, and the ADM .npz."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import sampling
from bench.errors import UserError
from tests.support.tiny import TINY_MODEL, register_tiny_method, save_training_checkpoint, tiny_dit, tiny_vae_folder

ROOT = Path(__file__).resolve().parents[1]


def test_uint8_rule_is_the_official_truncation():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5, -0.5, 3.0, -3.0, 0.999]).view(1, 1, 1, 8).expand(1, 3, 1, 8)
    assert sampling.to_uint8(x)[0, 0, :, 0].tolist() == [0, 128, 255, 191, 64, 255, 0, 255]
    assert sampling.to_uint8(x).shape == (1, 1, 8, 3)  # NCHW in, NHWC out


def test_contiguous_batches():
    assert sampling.contiguous_batches([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    assert sampling.contiguous_batches([5, 0, 1, 7, 8, 9], 2) == [[0, 1], [5], [7, 8], [9]]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    register_tiny_method()
    root = tmp_path_factory.mktemp("assets")
    ckpt = save_training_checkpoint(root / "tiny.pt", tiny_dit(input_size=8))
    vae = tiny_vae_folder(root / "vae")
    return ckpt, vae


def _protocol(ckpt, vae, **kw):
    base = dict(model=TINY_MODEL, image_size=16, num_samples=8, checkpoint=str(ckpt), num_classes=10,
                steps="4", cfg_scale=1.5, seed=3, vae=str(vae))
    return sampling.SamplingProtocol(**{**base, **kw})


def _run(protocol, out, batch_size, **kw):
    parts, _ = sampling.build_parts(protocol, torch.device("cpu"))
    return sampling.run(parts, protocol, out, batch_size, torch.device("cpu"), progress=False,
                        environment={"test": True}, **kw)


def _load(out):
    with np.load(Path(out) / sampling.SAMPLES_FILE) as f:
        return f["arr_0"], f["arr_1"]


def test_batch_size_does_not_change_the_images(tiny_assets, tmp_path):
    proto = _protocol(*tiny_assets)
    m3 = _run(proto, tmp_path / "b3", 3)
    m8 = _run(proto, tmp_path / "b8", 8)
    images, labels = _load(tmp_path / "b3")
    assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 3) and labels.shape == (8,)
    assert (tmp_path / "b3" / "samples.npz").read_bytes() == (tmp_path / "b8" / "samples.npz").read_bytes()
    assert m3["samples_sha256"] == m8["samples_sha256"]
    assert len(np.unique(images.reshape(8, -1), axis=0)) == 8  # real, distinct images
    assert images.std() > 5


def test_guidance_and_seed_change_the_images(tiny_assets, tmp_path):
    _run(_protocol(*tiny_assets), tmp_path / "a", 8)
    _run(_protocol(*tiny_assets, cfg_scale=4.0), tmp_path / "b", 8)
    _run(_protocol(*tiny_assets, seed=4), tmp_path / "c", 8)
    a, b, c = (_load(tmp_path / n)[0] for n in "abc")
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


def test_interrupted_run_resumes_without_recomputing(tiny_assets, tmp_path):
    proto = _protocol(*tiny_assets)
    _run(proto, tmp_path / "whole", 8)

    class Stop(Exception):
        pass

    def stop_after_two(_n, count=[0]):
        count[0] += 1
        if count[0] == 2:
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        _run(proto, out, 3, on_batch=stop_after_two)
    shards = sorted((out / "shards").iterdir())
    assert [p.name for p in shards] == ["00000000-00000003.npz", "00000003-00000006.npz"]
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    manifest = _run(proto, out, 5)
    assert manifest["reused"] == 6 and manifest["computed_now"] == 2
    assert {p.name: p.stat().st_mtime_ns for p in shards} == stamps  # saved shards were not rewritten
    assert (out / "samples.npz").read_bytes() == (tmp_path / "whole" / "samples.npz").read_bytes()


def test_corrupt_shard_is_detected_and_redone(tiny_assets, tmp_path):
    proto = _protocol(*tiny_assets)
    out = tmp_path / "run"
    _run(proto, out, 4)
    reference = (out / "samples.npz").read_bytes()
    shard = out / "shards" / "00000004-00000008.npz"
    shard.write_bytes(shard.read_bytes()[:200])  # truncated, as after a crash mid-copy
    manifest = _run(proto, out, 4)
    assert manifest["corrupt_shards_redone"] == ["00000004-00000008.npz"]
    assert manifest["computed_now"] == 4
    assert (out / "samples.npz").read_bytes() == reference


def test_another_protocol_in_the_same_directory_is_refused(tiny_assets, tmp_path):
    out = tmp_path / "run"
    _run(_protocol(*tiny_assets), out, 8)
    with pytest.raises(UserError, match="another protocol.*cfg_scale"):
        _run(_protocol(*tiny_assets, cfg_scale=2.0), out, 8)


def test_non_finite_samples_are_reported_and_not_written(tiny_assets, tmp_path):
    proto = _protocol(*tiny_assets, cfg_scale=1.0)
    parts, _ = sampling.build_parts(proto, torch.device("cpu"))
    model = parts.model

    class PoisonSample:
        def forward(self, x, t, y):
            out = model(x, t, y)
            out[1] = out[3] = float("nan")
            return out

    parts.model = PoisonSample()
    with pytest.raises(sampling.SamplingError, match=r"non-finite latents for samples \[1, 3\]"):
        sampling.run(parts, proto, tmp_path / "nan", 4, torch.device("cpu"), progress=False, environment={})
    assert not (tmp_path / "nan" / "shards").exists() or not any((tmp_path / "nan" / "shards").iterdir())


def _cli(*args, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "run_cli.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, **kw)


def _sample_args(ckpt, vae, out, batch_size):
    return ["sample", "--model", TINY_MODEL, "--ckpt", str(ckpt), "--image-size", "16", "--num-classes", "10",
            "--steps", "4", "--num-samples", "6", "--batch-size", str(batch_size), "--vae", str(vae),
            "--cfg-scale", "1.5", "--out", str(out), "--no-progress"]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_file(tiny_assets, tmp_path):
    ckpt, vae = tiny_assets
    whole = tmp_path / "whole"
    assert _cli(*_sample_args(ckpt, vae, whole, 6)).returncode == 0
    out = tmp_path / "killed"
    # Kill the process for real (no cleanup runs) once two shards are on disk.
    killer = ("import os, signal, bench.sampling as s; w = s.ShardStore.write\n"
              "def write(self, *a, **k):\n    p = w(self, *a, **k)\n"
              "    if len(list(self.shard_dir.iterdir())) == 2: os.kill(os.getpid(), signal.SIGKILL)\n    return p\n"
              "s.ShardStore.write = write\n")
    script = tmp_path / "killer.py"
    script.write_text(killer + f"import runpy, sys; sys.argv = ['run_cli'] + {_sample_args(ckpt, vae, out, 2)!r}\n"
                      f"runpy.run_path({str(ROOT / 'tests' / 'support' / 'run_cli.py')!r}, run_name='__main__')\n")
    killed = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "samples.npz").exists()
    resumed = _cli(*_sample_args(ckpt, vae, out, 2))
    assert resumed.returncode == 0, resumed.stderr
    assert "2 computed now, 4 reused" in resumed.stdout
    assert (out / "samples.npz").read_bytes() == (whole / "samples.npz").read_bytes()


@pytest.mark.slow
def test_cli_sample_rerun_and_other_batch_size(tiny_assets, tmp_path, cli_runner):
    import cli

    ckpt, vae = tiny_assets
    out = tmp_path / "run"
    first = cli_runner.invoke(cli.app, _sample_args(ckpt, vae, out, 4))
    assert first.exit_code == 0, first.output
    assert "6 computed now, 0 reused" in first.output
    again = cli_runner.invoke(cli.app, _sample_args(ckpt, vae, out, 4))
    assert again.exit_code == 0 and "0 computed now, 6 reused" in again.output
    other = cli_runner.invoke(cli.app, _sample_args(ckpt, vae, tmp_path / "other", 5))
    assert other.exit_code == 0
    assert (out / "samples.npz").read_bytes() == (tmp_path / "other" / "samples.npz").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["protocol"]["checkpoint_sha256"] and manifest["status"] == "complete"
    assert manifest["attention"] == {"implementation": "sdpa"}
    assert manifest["environment"]["torch"] and manifest["environment"]["diffusers"]


def test_cli_bad_checkpoint_is_one_line(tiny_assets, tmp_path):
    _, vae = tiny_assets
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = _cli(*_sample_args(bad, vae, tmp_path / "out", 2))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.slow
def test_torchrun_two_processes_equals_one(tiny_assets, tmp_path):
    ckpt, vae = tiny_assets
    single = _cli(*_sample_args(ckpt, vae, tmp_path / "one", 2))
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "tests" / "support" / "run_cli.py"), *_sample_args(ckpt, vae, tmp_path / "two", 2)]
    two = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "one" / "samples.npz").read_bytes() == (tmp_path / "two" / "samples.npz").read_bytes()


def test_a_moved_checkpoint_with_the_same_content_is_the_same_run(tiny_assets, tmp_path):
    import shutil

    ckpt, vae = tiny_assets
    from bench.assets import sha256_of

    moved = tmp_path / "elsewhere" / "tiny.pt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    out = tmp_path / "run"
    first = _run(_protocol(ckpt, vae, checkpoint_sha256=sha256_of(ckpt)), out, 8)
    again = _run(_protocol(moved, vae, checkpoint_sha256=sha256_of(moved)), out, 8)
    assert first["fingerprint"] == again["fingerprint"] and again["computed_now"] == 0
    different = tmp_path / "different.pt"
    save_training_checkpoint(different, tiny_dit(input_size=8, seed=5))
    with pytest.raises(UserError, match="another protocol.*checkpoint_sha256"):
        _run(_protocol(different, vae, checkpoint_sha256=sha256_of(different)), out, 8)


def test_the_fast_path_settings_are_part_of_a_run_only_when_set(tiny_assets):
    ckpt, vae = tiny_assets
    plain = _protocol(ckpt, vae)
    assert "attention" not in plain.card() and "compile" not in plain.card()  # runs made before keep their identity
    assert _protocol(ckpt, vae, attention="default", compile=False).fingerprint() == plain.fingerprint()
    assert _protocol(ckpt, vae, attention="math").fingerprint() != plain.fingerprint()
    assert _protocol(ckpt, vae, compile=True).fingerprint() != plain.fingerprint()
    with pytest.raises(UserError, match="is a CUDA kernel"):
        _protocol(ckpt, vae, attention="efficient")
    with pytest.raises(UserError, match="is not one of"):
        _protocol(ckpt, vae, attention="fastest")


def test_cli_sample_fast_path_compiles_the_blocks_and_picks_the_kernels(tiny_assets, tmp_path, cli_runner,
                                                                         monkeypatch):
    import cli
    from bench import speed

    ckpt, vae = tiny_assets
    compiled, kernels = [], []
    monkeypatch.setattr(speed, "compile_model", lambda model, mode: compiled.append((type(model).__name__, mode)))
    real = speed.attention_context
    monkeypatch.setattr(speed, "attention_context", lambda choice: kernels.append(choice) or real(choice))
    out = tmp_path / "fast"
    result = cli_runner.invoke(cli.app, _sample_args(ckpt, vae, out, 3) + ["--attention", "math", "--compile"])
    assert result.exit_code == 0, result.output
    assert compiled == [("DiT", "default")] and kernels == ["math", "math"]  # one per batch of 3 (6 samples)
    protocol = json.loads((out / "manifest.json").read_text())["protocol"]
    assert (protocol["attention"], protocol["compile"]) == ("math", True)
    # the math kernel is the same attention: the images equal the default run's within float rounding
    plain = tmp_path / "plain"
    assert cli_runner.invoke(cli.app, _sample_args(ckpt, vae, plain, 3)).exit_code == 0
    a, _ = _load(out)
    b, _ = _load(plain)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
