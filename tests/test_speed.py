"""`dit-bench speed`: what each protocol times, how the numbers of a row relate, and every path a GPU run takes.

On a CPU with tiny models the times themselves mean little, but their relations are exact: s/image is the
loop's median over the batch, a hook's speed-up is the baseline's time over its own in the same run, the
FLOP-bound ideal is the ratio of counted MACs, and MFU is achieved FLOP/s over the datasheet peak. The
out-of-memory step-down, the training configurations and the refusals run as they would on a GPU.
"""
import json
import math

import pytest
import torch

import cli
from bench import plugins, results, speed
from bench.errors import UserError
from bench.timing import TimingStats
from methods import fasterdiffusion as fd
from methods.dit import dit_macs
from tests.support.tiny import (TINY_DEEP_CONFIG, TINY_DEEP_MODEL, TINY_MODEL, register_tiny_method, tiny_dit,
                                tiny_vae_folder)

DEEP, DEEP_CONFIG = TINY_DEEP_MODEL, TINY_DEEP_CONFIG
# Tiny-DiT/2 has latent side 8: 64 px images with the SD VAE's factor 8 (--vae none), 16 px with the tiny VAE's 2.
TINY = ["--image-size", "64", "--num-classes", "10"]


@pytest.fixture(scope="module", autouse=True)
def tiny_models():
    register_tiny_method()


def invoke(cli_runner, *args):
    result = cli_runner.invoke(cli.app, ["speed", *args], env={"COLUMNS": "220"})
    if result.exception is not None and not isinstance(result.exception, (SystemExit, UserError)):
        raise result.exception
    return result


@pytest.fixture
def loop_calls(monkeypatch):
    """Every real (non-meta) sampling loop the command runs: (rows, max_steps)."""
    calls = []
    real = speed.sample_loop

    def spy(denoiser, diffusion, z, y, cfg_scale, sampler="ddpm", max_steps=None):
        if z.device.type != "meta":
            calls.append((len(z), max_steps))
        return real(denoiser, diffusion, z, y, cfg_scale, sampler, max_steps)

    monkeypatch.setattr(speed, "sample_loop", spy)
    return calls


def deep_macs(**overrides) -> int:
    return dit_macs(plugins.get_model(DEEP).kwargs(input_size=8, num_classes=10, in_channels=4, **overrides))


def fasterdiffusion_ideal(steps: int) -> float:
    """Counted-MAC ideal on the 28-block model: a non-key step skips the 18 encoder blocks and nothing else."""
    block = deep_macs(depth=1) - deep_macs(depth=0)
    non_key = steps - len(fd.key_steps("speed", steps))
    return steps * deep_macs() / (steps * deep_macs() - non_key * fd.ENCODER_DEPTH * block)


# ------------------------------------------------------------------------------------------ protocols
def test_defaults_follow_the_protocol_and_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    paper = speed.resolve(speed.SpeedConfig(models=(TINY_MODEL,), protocol="paper"), cpu)
    assert (paper.precisions, paper.batches, paper.warmup, paper.repeats) == (("fp32",), (8,), 2, 1)
    assert (paper.cfg_scale, paper.attention, paper.compile) == (4.0, "default", False)
    assert speed.resolve(speed.SpeedConfig(models=(TINY_MODEL,), protocol="paper"), cuda).precisions == ("tf32",)

    fast_cpu = speed.resolve(speed.SpeedConfig(models=(TINY_MODEL,)), cpu)
    assert (fast_cpu.precisions, fast_cpu.batches, fast_cpu.cfg_scale) == (("fp32",), (1, 8, "auto"), 1.5)
    assert (fast_cpu.attention, fast_cpu.compile, fast_cpu.max_batch) == ("default", False, 64)
    fast_gpu = speed.resolve(speed.SpeedConfig(models=(TINY_MODEL,)), cuda)
    assert (fast_gpu.attention, fast_gpu.compile) == ("fused", True)
    assert fast_gpu.compile_mode == "default"  # autotuning every batch shape would cost minutes per shape
    assert (fast_gpu.precisions, fast_gpu.warmup, fast_gpu.repeats, fast_gpu.max_batch) == (("bf16",), 2, 5, 1024)
    assert speed.parse_batches(["1", "auto", "8", "1"]) == (1, "auto", 8)


@pytest.mark.parametrize("change, message", [
    (dict(protocol="paper", precisions=("bf16",)), "use --protocol fast for bf16"),
    (dict(protocol="paper", compile=True), "official, uncompiled code"),
    (dict(protocol="paper", attention="fused"), "official attention"),
    (dict(compile=True, compile_mode="reduce-overhead"), "needs a CUDA device"),
    (dict(compile=True, compile_mode="max-autotune", hooks=("fasterdiffusion",), device="cuda"),
     "CUDA graphs of the whole forward"),
    (dict(attention="cudnn"), "is a CUDA kernel"),
    (dict(batches=("0",)), "positive integer or 'auto'"),
    (dict(train=True, train_configs=("fastest",)), "--train-config 'fastest'"),
    (dict(models=("DiT-XXL/2",)), "unknown model"),
])
def test_requests_a_protocol_forbids_are_refused_with_the_reason(change, message):
    device = torch.device(change.pop("device", "cpu"))
    with pytest.raises(UserError, match=message):
        speed.resolve(speed.SpeedConfig(**{"models": (TINY_MODEL,), **change}), device)


def test_a_refusal_is_one_line_and_a_nonzero_exit(cli_runner):
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--protocol", "paper", "--precision", "bf16")
    assert result.exit_code != 0 and isinstance(result.exception, UserError)
    assert "paper protocol runs fp32 with TF32" in str(result.exception)


# ------------------------------------------------------------------------------------------ sampling rows
def test_baseline_and_hook_rows_carry_speedup_and_ideal_and_validate(cli_runner, tmp_path, loop_calls):
    out = tmp_path / "speed.json"
    result = invoke(cli_runner, "--model", DEEP, "--hook", "fasterdiffusion", *TINY, "--steps", "5", "--batch", "2",
                    "--warmup", "1", "--repeats", "2", "--gpu", "A100", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "fasterdiffusion" in result.stdout and "ideal" in result.stdout

    record = results.load(out)  # validates the command's record
    rows = record["extra"]["rows"]
    for row in rows:
        results.validate(row)  # and every row is a complete record of the same schema
    base, hook = rows
    assert base["subject"] == {"method": "tiny-test", "model": DEEP, "resolution": 64, "hooks": {"sample": []}}
    assert hook["subject"]["method"] == "fasterdiffusion"
    assert hook["subject"]["hooks"] == {"sample": ["fasterdiffusion"]}
    assert record["subject"] == hook["subject"] and record["metrics"] == hook["metrics"]  # the headline row
    for row in rows:
        p, m, loop = row["protocol"], row["metrics"], row["extra"]["timings"]["loop"]
        assert (p["name"], p["precision"], p["batch_size"], p["steps"], p["cfg_scale"]) == ("fast", "fp32", 2, 5, 1.5)
        assert (loop["n"], loop["warmup"], p["timing"]["repeats"], p["timing"]["warmup"]) == (2, 1, 2, 1)
        assert m["latency_s"] == loop["median_s"]
        assert m["s_per_image"] == pytest.approx(loop["median_s"] / 2, rel=1e-12)
        assert m["images_per_s"] * m["s_per_image"] == pytest.approx(1.0, rel=1e-12)
        assert m["steps_per_s"] == pytest.approx(5 / loop["median_s"], rel=1e-12)
        assert m["gmacs"] == deep_macs() / 1e9 and m["gflops"] == 2 * deep_macs() / 1e9
        assert m["mfu"] is None and row["extra"]["mfu"]["reason"].startswith("no GPU")
        assert "vae_decode_s_per_image" not in m  # --vae none: decode not timed
    assert base["protocol"]["key_steps"] == "all"

    # The ratio is the baseline's time over the hook's at the same batch, from this run's own numbers.
    assert hook["metrics"]["speedup"] == pytest.approx(base["metrics"]["s_per_image"] / hook["metrics"]["s_per_image"])
    assert hook["baseline"]["metrics"]["s_per_image"] == base["metrics"]["s_per_image"]
    assert hook["baseline"]["protocol"]["key_steps"] == "all"
    source = hook["extra"]["ideal_speedup_source"]
    if source.startswith("declared"):  # the hook states its own block-count ideal
        assert hook["metrics"]["ideal_speedup"] == pytest.approx(fd.ideal_speedup("speed", 5, 28))
    else:  # counted on the meta device: exact, embeddings and final layer included
        assert hook["metrics"]["ideal_speedup"] == pytest.approx(fasterdiffusion_ideal(5), rel=1e-12)
    assert hook["extra"]["macs_per_image"] == pytest.approx(2 * 5 * deep_macs() / hook["metrics"]["ideal_speedup"])

    # warm-up + repeats loops per method, each on [z; z] for the 2 labels, all the way through (after the two
    # one-image loops that counted the MACs, when the hook declares no ideal).
    counted = [] if source.startswith("declared") else [(2, None)] * 2
    assert loop_calls == counted + [(4, None)] * 6
    assert any("published numbers are for A100" in w for w in record["warnings"])
    assert {"torch", "cuda", "cudnn", "diffusers", "gpu", "git_commit"} <= set(record["environment"])


def test_paper_protocol_times_the_official_batch_once_after_two_warmups(cli_runner, loop_calls):
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--protocol", "paper", "--steps", "3", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    results.validate(record)
    (row,) = record["extra"]["rows"]
    p = row["protocol"]
    assert (p["name"], p["batch_size"], p["cfg_scale"], p["precision"], p["attention"], p["compile"]) == \
           ("paper", 8, 4.0, "fp32", "default", False)
    assert p["timing"]["name"] == "fasterdiffusion" and p["timing"]["excludes"] == ["vae_decode"]
    assert loop_calls == [(16, None)] * 3  # 2 warm-ups and one timed 8-label loop with CFG
    assert row["metrics"]["s_per_image"] == pytest.approx(row["extra"]["timings"]["loop"]["median_s"] / 8)


def test_vae_decode_and_end_to_end_are_timed_apart_from_the_loop(cli_runner, tmp_path, monkeypatch, loop_calls):
    from bench.vae import VAEDecoder

    vae = tiny_vae_folder(tmp_path / "vae")  # downsamples 2x: 16 px images are Tiny-DiT's 8x8 latents
    decodes = []
    real = VAEDecoder.decode
    monkeypatch.setattr(VAEDecoder, "decode", lambda self, z: decodes.append(len(z)) or real(self, z))
    result = invoke(cli_runner, "--model", TINY_MODEL, "--image-size", "16", "--num-classes", "10", "--vae", str(vae),
                    "--vae-batch", "2", "--steps", "2", "--batch", "3", "--warmup", "1", "--repeats", "2",
                    "--precision", "bf16", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["extra"]["rows"]
    assert row["protocol"]["precision"] == row["protocol"]["matmul_precision"] == "bf16"
    m, t = row["metrics"], row["extra"]["timings"]
    assert m["vae_decode_s_per_image"] == pytest.approx(t["vae_decode"]["median_s"] / 3)
    assert m["end_to_end_s_per_image"] == pytest.approx(t["end_to_end"]["median_s"] / 3)
    assert m["end_to_end_images_per_s"] * m["end_to_end_s_per_image"] == pytest.approx(1.0)
    # Decode: (1 + 2) timed-decode runs, then (1 + 2) end-to-end runs, each in chunks of 2 then 1 latents.
    assert decodes == [2, 1] * 6
    # Loops: 1 + 2 for the loop timing, then 1 + 2 inside end to end.
    assert loop_calls == [(6, None)] * 6


def test_vae_random_is_the_sd_vae_architecture_and_only_speed_may_use_it(cli_runner):
    """A GPU machine cannot download the SD VAE; its architecture at random weights decodes as fast."""
    from bench.vae import load_vae

    decoder = load_vae("random", allow_random=True)
    assert sum(p.numel() for p in decoder.parameters()) == 83_653_863  # sd-vae-ft-ema / -mse
    assert (decoder.downsample, decoder.latent_channels) == (8, 4)
    with pytest.raises(UserError, match="for `dit-bench speed` only"):
        load_vae("random")
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--vae", "random", "--steps", "2", "--batch", "1",
                    "--warmup", "0", "--repeats", "1", "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["extra"]["rows"]
    assert row["protocol"]["vae"] == "random" and row["metrics"]["vae_decode_s_per_image"] > 0


def test_auto_batch_steps_down_on_out_of_memory_and_says_so(cli_runner, monkeypatch):
    calls = []

    def constant_time_loop(denoiser, diffusion, z, y, cfg_scale, sampler="ddpm", max_steps=None):
        calls.append((len(z) // 2, max_steps))
        if len(z) > 4:  # more than 2 images (with their CFG rows) does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return z  # constant time per call: throughput doubles with the batch until memory runs out

    monkeypatch.setattr(speed, "sample_loop", constant_time_loop)
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--steps", "6", "--search-steps", "2", "--batch", "auto",
                    "--batch", "8", "--max-batch", "64", "--warmup", "0", "--repeats", "1", "--json")
    assert result.exit_code == 0, result.output
    assert "batch 4 ran out of memory; stepped back to 2" in result.stderr
    assert "batch 8 ran out of memory" in result.stderr
    auto, fixed = json.loads(result.stdout)["extra"]["rows"]
    assert (auto["protocol"]["batch_policy"], auto["protocol"]["batch_size"]) == ("auto", 2)
    saturation = auto["extra"]["saturation"]
    assert saturation["stopped_by"] == "out_of_memory" and saturation["search_steps"] == 2
    assert [(t["batch_size"], t["out_of_memory"]) for t in saturation["trials"]] == [(1, False), (2, False), (4, True)]
    assert "batch 4 ran out of memory; stepped back to 2" in auto["warnings"]
    assert auto["metrics"]["s_per_image"] > 0
    assert fixed["extra"]["outcome"] == "out of memory" and "s_per_image" not in fixed["metrics"]
    assert fixed["metrics"]["gmacs"] == auto["metrics"]["gmacs"]  # what the model costs is known all the same
    assert fixed["protocol"]["batch_size"] == 8
    # The search runs 2 steps per trial; the measurement at the chosen batch runs the full loop.
    assert calls[:6] == [(1, 2), (1, 2), (2, 2), (2, 2), (4, 2), (2, None)]  # each trial: 1 warm-up, 1 timed


def test_auto_batch_that_never_fits_is_a_row_saying_so():
    config = speed.resolve(speed.SpeedConfig(models=(TINY_MODEL,), image_size=64, num_classes=10, steps=2,
                                             batches=("auto",), warmup=0, repeats=1), torch.device("cpu"))
    setup = speed.build_setup(TINY_MODEL, config, torch.device("cpu"))

    class NeverFits:
        def forward_with_cfg(self, *args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    row = speed.measure_auto(setup, speed.Denoiser("baseline", None, "tiny-test", NeverFits()))
    assert row.outcome == "out of memory" and row.batch_size is None
    assert "batch size 1 runs out of memory" in row.message


def test_long_cpu_runs_are_announced_with_an_estimate(cli_runner, monkeypatch):
    monkeypatch.setattr(speed, "estimate_sampling_seconds", lambda setup, n: 3 * 3600.0)
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--steps", "2", "--batch", "1", "--repeats", "1",
                    "--warmup", "0", "--json")
    assert result.exit_code == 0
    assert "this will take about 3.0 h or more" in result.stderr


def test_the_estimate_counts_every_planned_image_step():
    config = speed.resolve(speed.SpeedConfig(models=(TINY_MODEL,), steps=250, batches=("1", "8", "auto"),
                                             precisions=("bf16", "fp32")), torch.device("cpu"))
    # (1 + 8 + 8 for auto) images x 250 steps x (2 warm-up + 5 timed) x 2 methods x 2 precisions
    assert speed.planned_image_steps(config, 2) == 17 * 250 * 7 * 2 * 2


def test_a_published_gpu_name_is_matched_by_its_tokens():
    assert speed.same_gpu("NVIDIA A100-SXM4-80GB", "A100") and speed.same_gpu("NVIDIA A100-SXM4-80GB", "A100 80GB")
    assert not speed.same_gpu("NVIDIA H100 80GB HBM3", "A100")


# ------------------------------------------------------------------------------------------ compute
def test_counted_sampling_macs_see_exactly_the_blocks_a_hook_skips():
    from bench.diffusion import create_diffusion

    spec = plugins.get_model(DEEP)
    overrides = {"input_size": 8, "num_classes": 10, "in_channels": 4}
    diffusion = create_diffusion("20")

    def count(hook=None, options=None, cfg_scale=1.5, on="cpu", d=diffusion):
        return speed.count_sampling_macs(spec, overrides, d, hook, options or {}, cfg_scale, num_classes=10, on=on)

    base = count()
    assert base == 20 * 2 * deep_macs()  # every step, both guidance rows, the analytic count
    assert base / count("fasterdiffusion") == pytest.approx(fasterdiffusion_ideal(20), rel=1e-12)
    block = deep_macs(depth=1) - deep_macs(depth=0)
    every_other = count("fasterdiffusion", {"fasterdiffusion": {"key_steps": "every:2"}}, cfg_scale=1.0)
    assert every_other == 20 * deep_macs() - 10 * fd.ENCODER_DEPTH * block  # no CFG: one row per image
    # Shapes alone give the same count (what a model too large to run on the CPU is counted with).
    short = create_diffusion("4")
    assert count("fasterdiffusion", on="meta", d=short) == count("fasterdiffusion", d=short)


def test_a_hook_that_declares_its_ideal_is_believed(monkeypatch):
    class Declares:
        def ideal_speedup(self):
            return 1.5

    assert speed.declared_ideal_speedup(Declares()) == (1.5, "declared by the hook (ideal_speedup())")
    assert speed.declared_ideal_speedup(object()) == (None, None)


def test_mfu_is_achieved_flops_over_the_datasheet_peak():
    # DiT-XL/2 at 256 px, 250 steps with CFG: 2 x 250 forwards of 118.62 GMAC = 118.6 TFLOP per image.
    config = speed.resolve(speed.SpeedConfig(models=("DiT-XL/2",)), torch.device("cuda"))
    spec = plugins.get_model("DiT-XL/2")
    forward = dit_macs(spec.kwargs(input_size=32))
    base_macs = forward * 2 * 250
    assert round(2 * base_macs / 1e12, 1) == 118.6
    setup = speed.SamplingSetup(spec, None, None, None, (4, 32, 32), {}, config, torch.device("cuda"), "bf16")
    stats = TimingStats.from_samples([1.6, 1.6, 1.6])  # a batch of 8 in 1.6 s: 0.2 s per image
    row = speed.SampleRow("DiT-XL/2", speed.Denoiser("baseline", None, "dit", None), "bf16", 8, "fixed", loop=stats)
    m = speed.finish_metrics(row, setup, base_macs, forward, "NVIDIA H100 80GB HBM3", None)
    assert m["mfu"] == pytest.approx(2 * base_macs / 0.2 / 989.5e12, rel=1e-12)
    assert row.mfu["matched"] == "H100 SXM" and row.mfu["precision"] == "bf16"
    tf32 = speed.finish_metrics(dataclass_replace(row, precision="tf32"), setup, base_macs, forward,
                                "NVIDIA H100 80GB HBM3", None)
    assert tf32["mfu"] == pytest.approx(2 * base_macs / 0.2 / 494.5e12, rel=1e-12)


def dataclass_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


# ------------------------------------------------------------------------------------------ fast-path pieces
def test_compiling_the_repeated_blocks_keeps_the_outputs():
    model = tiny_dit().eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 999]), torch.tensor([1, 10])
    with torch.no_grad():
        eager = model(x, t, y)
        assert speed.compile_model(model, "default") == f"{len(model.blocks)} repeated blocks"
        assert all(block._compiled_call_impl is not None for block in model.blocks)
        compiled = model(x, t, y)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    # Running out of graphs must fail, not fall back to eager code inside a row labelled compiled.
    import torch._dynamo as dynamo

    assert dynamo.config.recompile_limit >= 512 and dynamo.config.fail_on_recompile_limit_hit


def test_cuda_graph_modes_compile_the_whole_forward_once(monkeypatch):
    """One CUDA graph per block would overwrite block i's output while block i+1 reads it."""
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append((fn, kw["mode"])) or fn)
    model = tiny_dit().eval()
    forward = model.forward
    assert speed.compile_model(model, "reduce-overhead") == "the whole forward (CUDA graphs)"
    assert calls == [(forward, "reduce-overhead")] and "forward" in vars(model)
    assert all(block._compiled_call_impl is None for block in model.blocks)


def test_compile_flag_reaches_the_model_and_the_record(cli_runner, monkeypatch):
    compiled = []
    monkeypatch.setattr(speed, "compile_model", lambda model, mode: compiled.append(mode) or "2 repeated blocks")
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--steps", "2", "--batch", "1", "--repeats", "1",
                    "--warmup", "0", "--compile", "--json")
    assert result.exit_code == 0, result.output
    assert compiled == ["default"]
    assert "builds C++ kernels" in result.stderr  # compiling on a CPU is allowed, and said to be slow
    (row,) = json.loads(result.stdout)["extra"]["rows"]
    assert (row["protocol"]["compile"], row["protocol"]["compile_mode"]) == (True, "default")


@pytest.mark.parametrize("choice", ["default", "fused", "flash", "math"])
def test_attention_choices_give_the_same_attention(choice):
    q, k, v = (torch.randn(2, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    want = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1) @ v
    with speed.attention_context(choice):
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_explicit_attention_is_two_matmuls_the_flop_counter_sees():
    from torch.utils.flop_counter import FlopCounterMode

    from bench.layers import attention

    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with speed.attention_context("explicit"), FlopCounterMode(display=False) as counter:
        out = attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 16 * 16 * 8) * 2  # q k^T and weights v, 2 heads, 2 FLOPs a MAC
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_official_sampler_timing_makes_the_official_calls():
    from bench.diffusion import create_diffusion

    model = tiny_dit().eval()
    seen = []
    real = model.forward_with_cfg

    def forward_with_cfg(x, t, y, cfg_scale):
        seen.append((len(x), y.tolist(), cfg_scale, torch.backends.cuda.matmul.allow_tf32))
        return real(x, t, y, cfg_scale)

    model.forward_with_cfg = forward_with_cfg
    before = torch.backends.cuda.matmul.allow_tf32
    out = speed.time_official_sampler(model, create_diffusion("3"), "cpu", latent_shape=(4, 8, 8), num_classes=10)
    assert torch.backends.cuda.matmul.allow_tf32 == before  # restored
    labels = [label % 10 for label in speed.OFFICIAL_LABELS]
    assert seen == [(16, labels + [10] * 8, 4.0, True)] * (3 * 3)  # 2 warm-ups + 1 timed run, 3 steps each
    assert out["stats"].n == 1 and out["stats"].warmup == 2
    assert out["metrics"]["s_per_image"] == out["stats"].median_s / 8
    assert out["protocol"]["name"] == "fasterdiffusion" and out["protocol"]["images_per_call"] == 8


# ------------------------------------------------------------------------------------------ training
def test_training_configurations_time_one_step_each_and_report_out_of_memory(cli_runner, tmp_path, monkeypatch):
    from bench import training

    vae = tiny_vae_folder(tmp_path / "vae")
    steps = []
    real = training.train_step

    def step(run, k, x, y):
        name = "ckpt" if run.model.gradient_checkpointing else "plain"
        name = "features" if x.shape[1] == 4 else name
        steps.append((name, tuple(x.shape)))
        if name == "plain":  # the official script without tricks: fast-DiT's table has it out of memory
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(run, k, x, y)

    monkeypatch.setattr(training, "train_step", step)
    out = tmp_path / "train.json"
    result = invoke(cli_runner, "--model", TINY_MODEL, "--image-size", "16", "--num-classes", "10", "--vae", str(vae),
                    "--no-sample", "--train", "--train-config", "plain", "--train-config", "features",
                    "--train-config", "ckpt", "--global-batch-size", "4", "--warmup", "1", "--repeats", "2",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "global batch 4 ran out of memory" in result.stderr
    record = results.load(out)
    assert record["kind"] == "train" and record["extra"]["rows"] == []
    plain, features, ckpt = record["extra"]["train_rows"]
    for row in (plain, features, ckpt):
        results.validate(row)
        assert row["kind"] == "train" and row["protocol"]["global_batch_size"] == 4
    assert plain["extra"]["outcome"] == "out of memory" and plain["metrics"]["steps_per_s"] is None
    assert features["baseline"] is None  # the first configuration that ran is the others' baseline
    assert ckpt["baseline"]["protocol"]["train_config"] == "features"
    f, c = features["extra"]["timing"], ckpt["extra"]["timing"]
    assert (f["n"], f["warmup"]) == (2, 1)
    assert features["metrics"]["steps_per_s"] == pytest.approx(1 / f["median_s"], rel=1e-12)
    assert ckpt["metrics"]["speedup"] == pytest.approx(f["median_s"] / c["median_s"], rel=1e-12)
    assert ckpt["subject"]["hooks"] == {"train": ["grad-ckpt"]} and ckpt["subject"]["method"] == "fastdit"
    assert features["subject"]["hooks"] == {"train": ["grad-ckpt", "features"]}
    assert ckpt["protocol"]["precision"] == "fp32"  # TF32 is a CUDA mode: on a CPU the matmuls are fp32
    # Images go through the VAE inside the step; features are latents already.
    assert steps == [("plain", (4, 3, 16, 16))] + [("features", (4, 4, 8, 8))] * 3 + [("ckpt", (4, 3, 16, 16))] * 3


def test_training_without_a_vae_times_the_feature_configurations_only(cli_runner):
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--no-sample", "--train", "--global-batch-size", "2",
                    "--warmup", "0", "--repeats", "1", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["extra"]["train_rows"]
    assert [r["protocol"]["train_config"] for r in rows] == ["features", "all", "fast"]
    assert rows[1]["protocol"]["precision"] == "fp16" and rows[1]["baseline"]["protocol"]["train_config"] == "features"
    assert rows[2]["protocol"]["precision"] == "bf16" and rows[2]["protocol"]["train_hooks"] == ["amp-bf16", "features",
                                                                                                 "tf32"]
    assert "skipped train configuration 'plain'" in result.stderr

    named = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--no-sample", "--train", "--train-config", "ckpt")
    assert named.exit_code != 0 and "encodes images with the VAE every step" in str(named.exception)


def test_a_copy_without_git_names_its_commit_through_the_environment(monkeypatch):
    """A GPU machine gets a copy of the tree without .git: the record's commit then comes from the caller."""
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(results.subprocess, "run", no_git)
    monkeypatch.delenv("DIT_BENCH_GIT_COMMIT", raising=False)
    assert results.capture_environment()["git_commit"] is None
    monkeypatch.setenv("DIT_BENCH_GIT_COMMIT", "abc123")
    assert results.capture_environment()["git_commit"] == "abc123"


def test_a_hook_with_its_own_loop_is_timed_whole_and_refuses_the_partial_loop_search(cli_runner, loop_calls,
                                                                                    monkeypatch):
    """FasterDiffusion's parallel mode replaces the DDPM loop: its rows time that loop, fixed batches only."""
    parallel = []
    real = fd.parallel_sample_loop
    monkeypatch.setattr(fd, "parallel_sample_loop", lambda *a, **k: parallel.append(a[2]) or real(*a, **k))
    result = invoke(cli_runner, "--model", DEEP, "--hook", "fasterdiffusion", "--hook-option",
                    "fasterdiffusion.mode=parallel", *TINY, "--steps", "5", "--batch", "2", "--warmup", "0",
                    "--repeats", "1", "--json")
    assert result.exit_code == 0, result.output
    baseline, hooked = json.loads(result.stdout)["extra"]["rows"]
    assert hooked["protocol"]["fasterdiffusion_mode"] == "parallel" and hooked["metrics"]["speedup"] > 0
    assert loop_calls == [(4, None), (4, None)] and parallel == [(4, 4, 8, 8)]  # one timed loop each
    refused = invoke(cli_runner, "--model", DEEP, "--hook", "fasterdiffusion", "--hook-option",
                     "fasterdiffusion.mode=parallel", *TINY, "--steps", "5", "--batch", "auto")
    assert isinstance(refused.exception, UserError) and "runs its own DDPM loop" in str(refused.exception)


def test_the_fast_training_configuration_alone_takes_the_run_s_compile_and_attention(cli_runner, monkeypatch):
    """fast-DiT's configurations run as their scripts do (eager); dit-bench's own 'fast' one is compiled."""
    compiled = []
    monkeypatch.setattr(speed, "compile_model", lambda model, mode: compiled.append(mode) or "blocks")
    kernels = []
    real_context = speed.attention_context
    monkeypatch.setattr(speed, "attention_context", lambda choice: kernels.append(choice) or real_context(choice))
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--no-sample", "--train", "--train-config", "features",
                    "--train-config", "fast", "--global-batch-size", "2", "--warmup", "0", "--repeats", "1",
                    "--compile", "--compile-mode", "reduce-overhead", "--attention", "math", "--json")
    # reduce-overhead needs CUDA for sampling, so on a CPU it is refused before anything runs
    assert isinstance(result.exception, UserError) and "needs a CUDA device" in str(result.exception)
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--no-sample", "--train", "--train-config", "features",
                    "--train-config", "fast", "--global-batch-size", "2", "--warmup", "0", "--repeats", "1",
                    "--compile", "--attention", "math", "--json")
    assert result.exit_code == 0, result.output
    features, fast = json.loads(result.stdout)["extra"]["train_rows"]
    assert compiled == ["default"] and kernels == ["default", "math"]
    assert (features["protocol"]["compile"], features["protocol"]["attention"]) == (False, "default")
    assert (fast["protocol"]["compile"], fast["protocol"]["compile_mode"], fast["protocol"]["attention"]) == \
        (True, "default", "math")
    assert speed.train_compile_mode("reduce-overhead") == "default"  # backward needs the step's buffers


@pytest.mark.parametrize("protocol, resident", [("paper", False), ("fast", True)])
def test_only_the_fast_protocol_keeps_the_diffusion_tables_on_the_device(cli_runner, monkeypatch, protocol, resident):
    """The paper protocol times the official path, including its per-step table copies."""
    seen = []
    real = speed.sample_loop
    monkeypatch.setattr(speed, "sample_loop", lambda d, diffusion, *a, **k: seen.append(diffusion.tables_on_device)
                        or real(d, diffusion, *a, **k))
    result = invoke(cli_runner, "--model", TINY_MODEL, *TINY, "--protocol", protocol, "--steps", "2", "--batch", "1",
                    "--warmup", "0", "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert seen == [resident]
