"""Checkpoint files: the official layouts load strictly, nothing pickled is executed, every misfit is one line.

The files are made here in the layouts the official scripts write (a plain state dict like the released
DiT-XL/2 weights; a training checkpoint {model, ema, opt, args: argparse.Namespace}), with random
non-trivial weights so that a wrong key or a wrong tensor would change the outputs.
"""
import argparse
import hashlib
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from bench.checkpoints import (
    CheckpointError,
    load_into,
    load_model,
    read_checkpoint,
    read_state_dict,
    save_training_checkpoint,
)
from bench.errors import UserError
from bench.plugins import ModelSpec
from methods.dit import DiT

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=10)
SPEC = ModelSpec(name="DiT-tiny", builder=DiT, family="DiT", default_input_size=8,
                 config={k: v for k, v in TINY.items() if k != "input_size"})


def random_model(seed: int = 0, **overrides) -> DiT:
    """A DiT whose every parameter is random (init would leave adaLN and the output layer at zero)."""
    model = DiT(**{**TINY, **overrides})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def outputs(model: DiT) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return model(x, torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10]))


def one_line_error(func, *args, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as exc:
        func(*args, **kwargs)
    message = str(exc.value)
    assert isinstance(exc.value, UserError) and "\n" not in message and message
    return message


# ------------------------------------------------------------------------------------------------
# Reading the official layouts.


def test_plain_state_dict_loads_strictly_and_reproduces_outputs(tmp_path):
    source = random_model()
    path = tmp_path / "DiT-tiny-8x8.pt"
    torch.save(source.state_dict(), path)
    loaded, info = load_model(SPEC, path)
    assert not loaded.training
    assert torch.equal(outputs(loaded), outputs(source)) and outputs(source).abs().max() > 0.1
    assert info["source"] == "state_dict" and info["format"] == "torch"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["model"] == "DiT-tiny" and info["constructor"]["input_size"] == 8


def test_training_checkpoint_uses_the_ema_weights(tmp_path):
    model, ema = random_model(seed=1), random_model(seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    args = argparse.Namespace(model="DiT-tiny", lr=1e-4, global_batch_size=256, results_dir="results")
    path = tmp_path / "0050000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args,
                "step": 50_000}, path)
    state_dict, info = read_state_dict(path)
    assert info["source"] == "ema" and info["step"] == 50_000
    assert info["args"] == vars(args)
    assert all(torch.equal(state_dict[k], v) for k, v in ema.state_dict().items())
    loaded, _ = load_model(SPEC, path)
    assert torch.equal(outputs(loaded), outputs(ema)) and not torch.equal(outputs(loaded), outputs(model))


def test_model_only_checkpoint_uses_model(tmp_path):
    model = random_model(seed=3)
    path = tmp_path / "model-only.pt"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(epochs=1)}, path)
    state_dict, info = read_state_dict(path)
    assert info["source"] == "model" and "step" not in info
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())


def test_safetensors_file_loads(tmp_path):
    model = random_model(seed=4)
    path = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(path))
    loaded, info = load_model(SPEC, path)
    assert info["source"] == "state_dict" and info["format"] == "safetensors"
    assert torch.equal(outputs(loaded), outputs(model))


def test_half_precision_weights_are_cast_into_the_model(tmp_path):
    model = random_model(seed=5)
    path = tmp_path / "fp16.pt"
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    loaded, _ = load_model(SPEC, path)
    assert loaded.pos_embed.dtype == torch.float32
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight.half().float())


def test_adapt_state_dict_renames_and_sets_constructor_arguments(tmp_path):
    # A spec may map another key layout onto its builder and infer constructor arguments from it.
    model = random_model(seed=6, depth=3)
    path = tmp_path / "renamed.pt"
    torch.save({"net." + k: v for k, v in model.state_dict().items()}, path)

    def adapt(sd):
        sd = {k.removeprefix("net."): v for k, v in sd.items()}
        return sd, {"depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))}

    spec = ModelSpec(name="DiT-adapted", builder=DiT, family="DiT", default_input_size=8, adapt_state_dict=adapt,
                     config={k: v for k, v in TINY.items() if k not in ("input_size", "depth")})
    loaded, info = load_model(spec, path)
    assert len(loaded.blocks) == 3 and info["constructor"]["depth"] == 3
    assert torch.equal(outputs(loaded), outputs(model))


def test_read_checkpoint_returns_everything_for_resuming(tmp_path):
    model, ema = random_model(seed=7), random_model(seed=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    path = save_training_checkpoint(tmp_path / "ckpt" / "0000100.pt", model, ema, opt,
                                    argparse.Namespace(lr=1e-4, data_path=tmp_path, image_size=256), step=100)
    obj, info = read_checkpoint(path)
    assert set(obj) == {"model", "ema", "opt", "args", "step"} and obj["step"] == 100
    assert isinstance(obj["args"], argparse.Namespace) and obj["args"].data_path == str(tmp_path)
    fresh = torch.optim.AdamW(random_model().parameters(), lr=1e-4)
    fresh.load_state_dict(obj["opt"])
    first = min(opt.state_dict()["state"])  # pos_embed (index 0) is frozen and has no Adam state
    assert torch.equal(fresh.state_dict()["state"][first]["exp_avg"], opt.state_dict()["state"][first]["exp_avg"])
    assert os.listdir(path.parent) == ["0000100.pt"]  # no temp file left behind


def test_save_training_checkpoint_writes_the_official_layout(tmp_path):
    model, ema = random_model(seed=9), random_model(seed=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    path = tmp_path / "0000001.pt"
    path.write_bytes(b"an older file that must be replaced whole")
    save_training_checkpoint(path, model, ema, opt, {"model": "DiT-tiny", "global_seed": 0}, step=1)
    state_dict, info = read_state_dict(path)
    assert info["source"] == "ema" and info["step"] == 1 and info["args"] == {"model": "DiT-tiny", "global_seed": 0}
    assert list(state_dict) == list(ema.state_dict())
    assert all(torch.equal(state_dict[k], v) for k, v in ema.state_dict().items())
    raw = torch.load(path, weights_only=False)  # our own file: the layout is exactly the official one
    assert list(raw) == ["model", "ema", "opt", "args", "step"] and isinstance(raw["args"], argparse.Namespace)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "0000001.pt"
    torch.save(random_model().state_dict(), path)
    before = path.read_bytes()

    def broken_save(obj, fh, *a, **kw):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    model = random_model()
    with pytest.raises(OSError):
        save_training_checkpoint(path, model, model, torch.optim.SGD(model.parameters(), lr=0.1), {}, step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["0000001.pt"]


# ------------------------------------------------------------------------------------------------
# Misfits and unsafe or damaged files: one line each, nothing executed, nothing half-loaded.


def test_wrong_keys_are_named_in_one_line(tmp_path):
    sd = random_model().state_dict()
    sd["blocks.0.attn.q_norm.weight"] = torch.ones(8)
    del sd["final_layer.linear.bias"], sd["blocks.1.mlp.fc2.weight"]
    path = tmp_path / "wrong-keys.pt"
    torch.save(sd, path)
    message = one_line_error(load_model, SPEC, path, match="missing keys")
    assert "2 missing keys (blocks.1.mlp.fc2.weight, final_layer.linear.bias)" in message
    assert "1 unexpected keys (blocks.0.attn.q_norm.weight)" in message


def test_many_misfits_are_summarised(tmp_path):
    sd = {f"module.{k}": v for k, v in random_model().state_dict().items()}  # a DDP-prefixed file
    message = one_line_error(load_into, DiT(**TINY), sd, match="missing keys")
    assert f"{len(sd)} missing keys" in message and "... (" in message and len(message) < 1000
    assert "'module.' prefix" in message


def test_shape_mismatch_is_caught_before_anything_is_copied():
    other = random_model(input_size=16)  # a checkpoint for another resolution: pos_embed differs
    model = random_model(seed=11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = one_line_error(load_into, model, other.state_dict(), match="shape mismatches")
    assert "1 shape mismatches (pos_embed (1, 64, 32) vs (1, 16, 32) in the model)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    one_line_error(load_into, model, other.state_dict(), strict=False, match="shape mismatches")


def test_non_strict_load_tolerates_missing_keys_only():
    source = random_model(seed=12)
    sd = {k: v for k, v in source.state_dict().items() if not k.startswith("final_layer.")}
    model = random_model(seed=13)
    result = load_into(model, sd, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in model.state_dict() if k.startswith("final_layer."))
    assert torch.equal(model.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)


def test_missing_file(tmp_path):
    one_line_error(read_state_dict, tmp_path / "DiT-XL-2-256x256.pt", match="does not exist")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_truncated_file(tmp_path, legacy):
    path = tmp_path / "truncated.pt"
    torch.save(random_model().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(read_state_dict, path, match="truncated or corrupt")


@pytest.mark.parametrize("content", [b"", b"<html>404 Not Found</html>"], ids=["empty", "html"])
def test_file_that_is_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "download.pt"
    path.write_bytes(content)
    one_line_error(read_state_dict, path, match="is (empty|not a PyTorch checkpoint)")


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(random_model().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:100])
    one_line_error(read_state_dict, path, match="truncated or corrupt")


class NotAllowListed:
    """Any class outside the allow-list, as a file pickled with extra objects would contain."""


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_class_is_refused(tmp_path):
    path = tmp_path / "with-object.pt"
    torch.save({"model": random_model().state_dict(), "extra": NotAllowListed()}, path)
    message = one_line_error(read_state_dict, path, match="will not execute pickled code")
    assert "NotAllowListed" in message


def test_pickled_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"ema": random_model().state_dict(), "args": RunsCode(marker)}, path)
    message = one_line_error(load_model, SPEC, path, match="will not execute pickled code")
    assert "system" in message
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_is_refused(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "raw.pkl"
    with open(path, "wb") as fh:
        pickle.dump({"weights": RunsCode(marker)}, fh, protocol=4)
    one_line_error(read_state_dict, path, match="weights-only loading refuses.*will not execute pickled code")
    assert not marker.exists()


@pytest.mark.parametrize("obj", [torch.zeros(3), {"pos_embed": torch.zeros(1), "epoch": 3}], ids=["tensor", "mixed"])
def test_objects_that_are_not_state_dicts(tmp_path, obj):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    one_line_error(read_state_dict, path, match="not a state dict|holds a Tensor")
