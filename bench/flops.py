"""Compute per model and how much of the device's peak a run used (MFU).

Units are in the names. The DiT-family papers' "GFLOPs" are multiply-accumulates of one forward pass at
batch 1 (reference/dit.md §A.1, edt.md §10, udit.md §5), so the record keeps ``gmacs`` for the papers'
number and ``gflops = 2 x gmacs`` for arithmetic against a device's FLOP/s.

The exact count of a model comes from its method's analytic formula (``ModelSpec.macs``); ``count_macs_torch``
is the independent cross-check, run with attention as explicit matmuls because torch's FLOP counter does
not see fused scaled-dot-product attention on CPU (dit.md §A.1).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.errors import UserError

FLOPS_PER_MAC = 2


class FlopsError(UserError):
    """A model without a MAC count, or a precision name dit-bench does not know."""


def model_macs(spec, input_size: int | None = None) -> int:
    """Analytic MACs of one forward of ``spec`` (a bench.plugins.ModelSpec) at batch 1."""
    if spec.macs is None:
        raise FlopsError(f"model {spec.name!r} declares no analytic MAC count (ModelSpec.macs); "
                         "count it with bench.flops.count_macs_torch instead")
    return int(spec.macs(spec.kwargs(input_size=input_size)))


def macs_to_gmacs(macs: float) -> float:
    return macs / 1e9


def macs_to_gflops(macs: float) -> float:
    return FLOPS_PER_MAC * macs / 1e9


def flops_per_s(macs_per_image: float, s_per_image: float) -> float:
    """Achieved FLOP/s of a run that spends ``macs_per_image`` in ``s_per_image`` seconds per image."""
    return FLOPS_PER_MAC * macs_per_image / s_per_image


def count_macs_torch(model: torch.nn.Module, *example_inputs, **example_kwargs) -> int:
    """MACs of one ``model(*example_inputs)`` as counted by torch.utils.flop_counter (matmuls and convs).

    Counts what the example batch costs (divide by the batch for per-image MACs). Norms, activations and
    element-wise ops are not counted, as in the papers' analytic formulas.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from bench.layers import explicit_attention

    with torch.no_grad(), explicit_attention(), FlopCounterMode(display=False) as counter:
        model(*example_inputs, **example_kwargs)
    flops = counter.get_total_flops()
    # The counter reports 2 FLOPs per multiply-accumulate for every op it knows.
    if flops % FLOPS_PER_MAC:
        raise AssertionError(f"FlopCounterMode reported an odd FLOP count ({flops})")
    return flops // FLOPS_PER_MAC


# --- device peaks --------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_PRECISION_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "tf32": "tf32",
    "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
}


def precision_name(dtype: str | torch.dtype) -> str:
    """``fp32``/``tf32``/``bf16``/``fp16`` from a name or a torch dtype (float32 means plain fp32 here)."""
    key = str(dtype).removeprefix("torch.").lower()
    if key not in _PRECISION_ALIASES:
        raise FlopsError(f"unknown precision {dtype!r}; use one of {', '.join(PRECISIONS)}")
    return _PRECISION_ALIASES[key]


def matmul_precision(dtype: torch.dtype) -> str:
    """The precision CUDA matmuls actually run at: float32 becomes tf32 when torch allows TF32 matmuls."""
    name = precision_name(dtype)
    if name == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return name


@dataclass(frozen=True)
class DevicePeak:
    """Dense (no 2:4 sparsity) peak TFLOP/s of one GPU model per precision; None = no such hardware path.

    ``fp32`` is the non-tensor-core rate; ``tf32``, ``bf16`` and ``fp16`` are tensor-core rates with FP32
    accumulation (what torch matmuls use). Datasheets that print only with-sparsity figures are halved.
    """

    name: str
    pattern: str  # full match against the normalised torch device name (see _normalise)
    tflops: dict[str, float | None]
    source: str


def _peaks(fp32, tf32, bf16, fp16) -> dict[str, float | None]:
    return {"fp32": fp32, "tf32": tf32, "bf16": bf16, "fp16": fp16}


DEVICE_PEAKS = (
    # All A100 40/80 GB SKUs print the same peaks (SXM4 and PCIe); TF32/BF16/FP16 dense figures as printed.
    DevicePeak("A100", r"a100 (sxm4? |pcie )?(40|80)gb( pcie)?", _peaks(19.5, 156, 312, 312),
               "NVIDIA A100 Tensor Core GPU datasheet"),
    # torch reports the SXM5 part as "NVIDIA H100 80GB HBM3". Datasheet: TF32 989 / BF16, FP16 1,979 with sparsity.
    DevicePeak("H100 SXM", r"h100 80gb hbm3", _peaks(67, 494.5, 989.5, 989.5),
               "NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column, sparse figures halved)"),
    DevicePeak("H100 PCIe", r"h100 pcie", _peaks(51, 378, 756.5, 756.5),
               "NVIDIA H100 Tensor Core GPU datasheet (H100 PCIe column, sparse figures halved)"),
    DevicePeak("H200", r"h200", _peaks(67, 494.5, 989.5, 989.5),
               "NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column, sparse figures halved)"),
    DevicePeak("A40", r"a40", _peaks(37.4, 74.8, 149.7, 149.7), "NVIDIA A40 datasheet"),
    DevicePeak("L40S", r"l40s", _peaks(91.6, 183, 362.05, 362.05), "NVIDIA L40S datasheet"),
    DevicePeak("L4", r"l4", _peaks(30.3, 60, 121, 121), "NVIDIA L4 Tensor Core GPU datasheet (sparse figures halved)"),
    DevicePeak("A10", r"a10", _peaks(31.2, 62.5, 125, 125), "NVIDIA A10 Tensor Core GPU datasheet"),
    # Volta has FP16 tensor cores only: no TF32 (float32 matmuls run at the fp32 rate), no BF16.
    DevicePeak("V100 SXM2", r"v100 sxm2 (16|32)gb", _peaks(15.7, None, None, 125), "NVIDIA Tesla V100 datasheet"),
    DevicePeak("V100 PCIe", r"v100 pcie (16|32)gb", _peaks(14, None, None, 112), "NVIDIA Tesla V100 datasheet"),
    DevicePeak("V100S PCIe", r"v100s pcie 32gb", _peaks(16.4, None, None, 130), "NVIDIA V100S datasheet"),
    # GeForce tensor cores run FP32-accumulate at half the FP16-accumulate rate; the former is what torch uses.
    DevicePeak("RTX 4090", r"geforce rtx 4090", _peaks(82.6, 82.6, 165.2, 165.2),
               "NVIDIA Ada GPU Architecture whitepaper, GeForce RTX 4090 (FP32-accumulate, dense)"),
    DevicePeak("RTX 3090", r"geforce rtx 3090", _peaks(35.6, 35.6, 71, 71),
               "NVIDIA Ampere GA102 GPU Architecture whitepaper, GeForce RTX 3090 (FP32-accumulate, dense)"),
)


def _normalise(device_name: str) -> str:
    name = device_name.lower().replace("-", " ").replace("_", " ")
    name = re.sub(r"^(nvidia |tesla )+", "", " ".join(name.split()))
    return name


def find_device_peak(device_name: str) -> DevicePeak | None:
    """The table entry for a torch device name (``torch.cuda.get_device_name()``), or None if not listed."""
    normalised = _normalise(device_name)
    for peak in DEVICE_PEAKS:
        if re.fullmatch(peak.pattern, normalised):
            return peak
    return None


@dataclass(frozen=True)
class MFU:
    """Model FLOPs utilisation and where its denominator came from; ``value`` is None with a ``reason``."""

    value: float | None
    device_name: str | None
    precision: str
    peak_tflops: float | None = None
    matched: str | None = None  # the DEVICE_PEAKS entry
    source: str | None = None
    reason: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mfu(achieved_flops_per_s: float, device_name: str | None, dtype: str | torch.dtype) -> MFU:
    """Achieved FLOP/s over the device's dense peak at ``dtype``; never a guessed peak."""
    precision = precision_name(dtype)
    if not device_name:
        return MFU(None, device_name, precision, reason="no GPU: MFU is defined against a GPU's datasheet peak")
    peak = find_device_peak(device_name)
    if peak is None:
        return MFU(None, device_name, precision,
                   reason=f"{device_name!r} is not in bench.flops.DEVICE_PEAKS; add its datasheet peaks to report MFU")
    tflops, note = peak.tflops[precision], None
    if tflops is None and precision == "tf32" and peak.tflops["fp32"] is not None:
        # Pre-Ampere GPUs ignore torch's allow_tf32: float32 matmuls run at the plain fp32 rate.
        tflops, note = peak.tflops["fp32"], f"{peak.name} has no TF32: float32 matmuls run at the fp32 peak"
    if tflops is None:
        return MFU(None, device_name, precision, matched=peak.name, source=peak.source,
                   reason=f"{peak.name} has no {precision} tensor-core path; time it at a precision it supports")
    return MFU(achieved_flops_per_s / (tflops * 1e12), device_name, precision, peak_tflops=tflops,
               matched=peak.name, source=peak.source, note=note)


def flops_metrics(forward_macs: int, *, forwards_per_image: float, s_per_image: float,
                  device_name: str | None, dtype: str | torch.dtype) -> tuple[dict[str, float | None], MFU]:
    """Record metrics ``gmacs``/``gflops`` (one forward, batch 1, as the papers count) and ``mfu`` of a run
    that calls the model ``forwards_per_image`` times per image (e.g. steps x 2 with CFG)."""
    utilisation = mfu(flops_per_s(forward_macs * forwards_per_image, s_per_image), device_name, dtype)
    metrics = {"gmacs": macs_to_gmacs(forward_macs), "gflops": macs_to_gflops(forward_macs),
               "mfu": utilisation.value}
    return metrics, utilisation
