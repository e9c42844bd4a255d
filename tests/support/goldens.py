"""Inputs and output fingerprints shared by the official-output golden tests (EDT, U-DiT).

The goldens stored in those tests were computed from the official classes on exactly these inputs,
so the two must stay identical: one definition serves both.
"""
import torch


def golden_inputs():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 16, 16, generator=gen, dtype=torch.float64)
    return x, torch.tensor([0, 250, 500, 999]), torch.tensor([1, 3, 9, 10])


def fingerprint(out: torch.Tensor) -> torch.Tensor:
    out = out.double()
    return torch.cat([torch.stack([out.sum(), out.abs().sum()]), out[0, :, 3, 5], out[3, :, 7, 0]])
