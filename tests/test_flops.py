"""Compute accounting: MACs counted by hand, by the analytic formulas and by torch must agree; MFU only
against a datasheet peak that is really listed for the device and precision."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from bench import layers
from bench.errors import UserError
from bench.flops import (
    DEVICE_PEAKS, PRECISIONS, FlopsError, count_macs_torch, find_device_peak, flops_metrics, flops_per_s,
    macs_to_gflops, macs_to_gmacs, matmul_precision, mfu, model_macs, precision_name,
)
from bench.plugins import get_model


class ConvAttentionHead(nn.Module):
    """patch conv -> tokens -> multi-head attention -> linear, small enough to count by hand."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.attn = layers.Attention(8, num_heads=2)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # (N, 36, 8)
        return self.out(self.attn(tokens))


def test_count_macs_torch_matches_a_hand_count_including_attention():
    n, t, d = 2, 36, 8  # batch, tokens (6x6), width
    by_hand = n * (
        t * d * 3 * 3 * 3  # conv: every output pixel of 8 channels reads a 3x3x3 window
        + t * d * 3 * d  # qkv
        + t * t * d  # q k^T over both heads (2 heads x head_dim 4)
        + t * t * d  # attention weights x v
        + t * d * d  # output projection
        + t * d * 5  # final linear
    )
    assert by_hand == 78336
    assert count_macs_torch(ConvAttentionHead(), torch.randn(n, 3, 6, 6)) == by_hand
    assert layers._FUSED_ATTENTION  # explicit attention was only switched on while counting


def test_count_macs_torch_agrees_with_dit_macs_on_a_tiny_dit():
    from methods.dit import DiT, dit_macs

    kwargs = dict(input_size=8, patch_size=2, depth=2, hidden_size=64, num_heads=4, num_classes=10)
    model = DiT(**kwargs).eval()
    for batch in (1, 3):  # every term, adaLN included, is per sample: the count scales with the batch
        x = torch.randn(batch, 4, 8, 8)
        t = torch.randint(0, 1000, (batch,))
        y = torch.randint(0, 10, (batch,))
        assert count_macs_torch(model, x, t, y) == batch * dit_macs(kwargs)


def test_model_macs_of_registered_dit_reproduces_the_paper():
    spec = get_model("DiT-XL/2")
    # dit.md §A.1: 118.62 GMACs at 256 px (32x32 latents), 524.54 at 512 px; the paper's "119 / 525 Gflops".
    assert macs_to_gmacs(model_macs(spec)) == pytest.approx(118.62, abs=0.005)
    assert macs_to_gmacs(model_macs(spec, input_size=64)) == pytest.approx(524.54, abs=0.005)
    assert macs_to_gmacs(model_macs(get_model("DiT-S/8"))) == pytest.approx(0.36, abs=0.005)


def test_model_macs_passes_the_input_size_and_refuses_a_model_without_a_count():
    spec = replace(get_model("DiT-S/2"), macs=lambda kw: kw["input_size"] * 1000 + kw["depth"])
    assert model_macs(spec) == 32 * 1000 + 12
    assert model_macs(spec, input_size=64) == 64 * 1000 + 12
    with pytest.raises(UserError, match="declares no analytic MAC count"):
        model_macs(replace(spec, macs=None))


def test_unit_conversions():
    assert macs_to_gmacs(118_621_421_568) == pytest.approx(118.621421568)
    assert macs_to_gflops(118_621_421_568) == pytest.approx(237.242843136)
    # fasterdiffusion.md §9: 0.164 s per step for 16 DiT-XL/2 forwards is about 23 TFLOP/s.
    assert flops_per_s(16 * 118.62e9, 0.164) / 1e12 == pytest.approx(23.15, abs=0.01)


TORCH_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H200": "H200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA A40": "A40",
    "NVIDIA L40S": "L40S",
    "NVIDIA L4": "L4",
    "NVIDIA A10": "A10",
    "Tesla V100-SXM2-16GB": "V100 SXM2",
    "Tesla V100-SXM2-32GB": "V100 SXM2",
    "Tesla V100-PCIE-32GB": "V100 PCIe",
    "Tesla V100S-PCIE-32GB": "V100S PCIe",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "NVIDIA GeForce RTX 3090": "RTX 3090",
}
# Close relatives with other peaks: each must be unknown, never matched to a neighbour.
UNLISTED = ["NVIDIA A10G", "NVIDIA L40", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB",
            "NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D", "Tesla T4", "NVIDIA A800-SXM4-80GB",
            "AMD Instinct MI300X", "cpu"]


@pytest.mark.parametrize("name,entry", TORCH_NAMES.items())
def test_torch_device_names_find_their_datasheet_entry(name, entry):
    matches = [peak.name for peak in DEVICE_PEAKS if peak is find_device_peak(name)]
    assert matches == [entry]


@pytest.mark.parametrize("name", UNLISTED)
def test_unlisted_devices_get_no_mfu_and_a_reason(name):
    assert find_device_peak(name) is None
    result = mfu(1e14, name, "bf16")
    assert result.value is None and result.peak_tflops is None
    assert "not in bench.flops.DEVICE_PEAKS" in result.reason


def test_peak_table_is_dense_and_sourced():
    for peak in DEVICE_PEAKS:
        assert set(peak.tflops) == set(PRECISIONS)
        assert peak.source
        assert peak.tflops["fp32"] > 0
        if peak.tflops["tf32"] is not None:
            assert peak.tflops["tf32"] >= peak.tflops["fp32"]
            assert peak.tflops["bf16"] == peak.tflops["fp16"]
    by_name = {peak.name: peak.tflops for peak in DEVICE_PEAKS}
    # Spot checks against the datasheets' dense figures (the with-sparsity ones are twice these).
    assert by_name["A100"] == {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}
    assert by_name["H100 SXM"]["bf16"] == 989.5 and by_name["H100 SXM"]["tf32"] == 494.5
    assert by_name["H100 PCIe"]["bf16"] == 756.5
    assert by_name["L4"]["bf16"] == 121
    assert by_name["RTX 4090"]["fp16"] == 165.2  # FP32 accumulate, as torch matmuls run


def test_mfu_is_achieved_over_peak():
    result = mfu(156e12, "NVIDIA A100-SXM4-80GB", torch.bfloat16)
    assert result.value == pytest.approx(0.5)
    assert (result.matched, result.precision, result.peak_tflops) == ("A100", "bf16", 312)
    assert "A100" in result.source and result.reason is None
    assert mfu(494.5e12, "NVIDIA H100 80GB HBM3", "tf32").value == pytest.approx(1.0)
    assert mfu(19.5e12, "NVIDIA A100 80GB PCIe", "fp32").value == pytest.approx(1.0)
    assert set(result.to_dict()) >= {"value", "device_name", "precision", "peak_tflops", "source", "reason"}


def test_mfu_on_volta():
    tf32 = mfu(15.7e12, "Tesla V100-SXM2-32GB", "tf32")
    assert tf32.value == pytest.approx(1.0) and "no TF32" in tf32.note  # allow_tf32 is a no-op there
    bf16 = mfu(15.7e12, "Tesla V100-SXM2-32GB", "bf16")
    assert bf16.value is None and "no bf16" in bf16.reason


def test_mfu_without_a_gpu():
    result = mfu(1e9, None, "fp32")
    assert result.value is None and "no GPU" in result.reason


def test_precision_names():
    assert [precision_name(d) for d in (torch.float32, torch.bfloat16, torch.float16, "half", "TF32")] == [
        "fp32", "bf16", "fp16", "fp16", "tf32"]
    with pytest.raises(FlopsError, match="unknown precision 'int8'"):
        precision_name("int8")


def test_matmul_precision_follows_torch_tf32_switch(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert matmul_precision(torch.float32) == "tf32"
    assert matmul_precision(torch.bfloat16) == "bf16"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert matmul_precision(torch.float32) == "fp32"


def test_flops_metrics_for_a_sampling_run():
    # DiT-XL/2, 250 DDPM steps with CFG (2 forwards per image per step), 5.13 s/image on an H100 in TF32.
    macs = 118_621_421_568
    metrics, detail = flops_metrics(macs, forwards_per_image=500, s_per_image=5.13,
                                    device_name="NVIDIA H100 80GB HBM3", dtype="tf32")
    assert metrics["gmacs"] == pytest.approx(118.621421568)
    assert metrics["gflops"] == pytest.approx(237.242843136)
    assert metrics["mfu"] == pytest.approx(2 * macs * 500 / 5.13 / 494.5e12)
    assert detail.matched == "H100 SXM"
    from bench.results import make_record

    make_record("speed", {"model": "DiT-XL/2"}, {"name": "test"}, metrics, environment={})
