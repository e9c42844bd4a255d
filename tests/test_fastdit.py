"""fast-DiT's training tricks as train hooks (dit.md §D.2): the same learning, cheaper.

Gradient checkpointing must not change a single number; mixed precision runs under autocast (fp16 with a
loss scaler); TF32 flags are set or cleared; pre-extracted latents replace the VAE in the loop, and with
a deterministic encoder training on them is bit-identical to training on the images.
"""
import numpy as np
import pytest
import torch
import yaml

from bench import data, plugins, training
from bench.checkpoints import read_checkpoint
from bench.diffusion import create_diffusion
from bench.plugins import PluginError
from bench.vae import load_vae
from methods.fastdit import METHOD
from tests.support.tiny import TINY_MODEL, register_tiny_method, tiny_dit


@pytest.fixture(scope="module", autouse=True)
def _tiny():
    register_tiny_method()


def _hook(name, **options):
    return plugins.get_hook("train_hooks", name, "DiT")(diffusion=create_diffusion(""), **options)


def _loss_and_grads(model, seed=0):
    torch.manual_seed(seed)  # label dropout draws from the global generator
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t, y = torch.tensor([5, 500, 999]), torch.tensor([1, 2, 10])  # 10: the null class
    model.zero_grad()
    loss = create_diffusion("").training_losses(model, x, t, {"y": y}, noise=noise)["loss"].mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_changes_no_number():
    plain = tiny_dit(seed=3).train()
    checkpointed = _hook("grad-ckpt").wrap_model(tiny_dit(seed=3).train())
    assert checkpointed.gradient_checkpointing and not plain.gradient_checkpointing
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(checkpointed)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_gradient_checkpointing_refuses_a_model_without_the_switch():
    with pytest.raises(PluginError, match="Linear has none"):
        _hook("grad-ckpt").wrap_model(torch.nn.Linear(2, 2))


def test_mixed_precision_autocast_and_scaler():
    bf16, fp16 = _hook("amp-bf16"), _hook("amp-fp16")
    layer = torch.nn.Linear(4, 4)
    with bf16.autocast(torch.device("cpu")):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    assert bf16.grad_scaler(torch.device("cpu")) is None and bf16.precision == "bf16"
    scaler = fp16.grad_scaler(torch.device("cpu"))
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    assert scaler.state_dict()["scale"] == 65536.0  # torch's (and Accelerate's) default initial scale
    with fp16.autocast(torch.device("cpu")):
        assert layer(torch.ones(2, 4)).dtype == torch.float16


def test_tf32_hooks_set_and_clear_both_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        _hook("tf32").configure_backends()
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        _hook("no-tf32").configure_backends()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_result_records_name_the_hooks_as_reference_results_do():
    """fast-DiT's published rows list these hooks, with TF32 stated as the precision, not as a hook."""
    from bench.reference import reference_dir

    published = set()
    for source in ("fast-dit-readme.yaml", "fast-dit-logs.yaml"):
        rows = yaml.safe_load((reference_dir() / source).read_text())["rows"]
        published |= {h for row in rows for h in row.get("hooks") or []}
    ours = {name for name in METHOD.train_hooks if getattr(_hook(name), "record_name", name) is not None}
    assert published == {"grad-ckpt", "amp-fp16", "features"} and published <= ours
    assert ours == {"grad-ckpt", "amp-bf16", "amp-fp16", "features"}  # tf32 / no-tf32 go to the precision


# ------------------------------------------------------------------------------------------ in the loop
@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, images=rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), labels=rng.integers(0, 10, 8))
    return path


def _train(pixels, out, **kw):
    config = training.TrainConfig(**{**dict(model=TINY_MODEL, data=str(pixels), out=str(out), vae="identity",
                                            global_batch_size=4, steps=3, lr=1e-3, log_every=1, num_workers=0,
                                            num_classes=10), **kw})
    summary = training.train(config, device="cpu", progress=False, environment={"test": True})
    obj, _ = read_checkpoint(summary["checkpoint"])
    return summary, obj


def _same_weights(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_bf16_training_runs_on_cpu_and_keeps_fp32_weights(pixels, tmp_path):
    fp32, a = _train(pixels, tmp_path / "fp32")
    bf16, b = _train(pixels, tmp_path / "bf16", hooks=("amp-bf16",))
    assert all(v.dtype == torch.float32 for v in b["model"].values())
    assert all(np.isfinite(e["loss"]) for e in bf16["log"])
    assert not _same_weights(a, b)  # autocast really ran the matmuls in bf16
    assert abs(bf16["log"][0]["loss"] - fp32["log"][0]["loss"]) < 0.05  # ... on the same problem


def test_features_keep_flips_training_equals_image_training(pixels, tmp_path):
    """Identity 'VAE': the latents are the pixels, so both data paths must give the same weights exactly."""
    data.extract_features(data.ArrayImages(pixels), load_vae("identity"), tmp_path / "both", mode="both-flips",
                          vae_name="identity")
    _, on_images = _train(pixels, tmp_path / "images")
    summary, on_features = _train(pixels, tmp_path / "features", data=str(tmp_path / "both"), vae=None,
                                  hooks=("features",))
    assert _same_weights(on_images, on_features)
    assert summary["record"]["subject"]["hooks"] == {"train": ["features"]}
    assert on_features["args"].data_mode == "features" and on_features["args"].vae == "identity"


def test_frozen_flip_features_ignore_the_training_flip(pixels, tmp_path):
    data.extract_features(data.ArrayImages(pixels), load_vae("identity"), tmp_path / "frozen", vae_name="identity")
    _, on_images = _train(pixels, tmp_path / "images")
    _, frozen = _train(pixels, tmp_path / "frozen-run", data=str(tmp_path / "frozen"), vae=None, hooks=("features",))
    assert not _same_weights(on_images, frozen)  # fast-DiT's frozen augmentation is a different experiment
