"""Tiny models and assets the tests build themselves (no downloads): a tiny DiT registered as a plug-in,
official-format checkpoints with non-trivial weights, and a tiny diffusers AutoencoderKL folder."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import plugins

TINY_MODEL = "Tiny-DiT/2"
TINY_CONFIG = dict(patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
# FasterDiffusion's official encoder/decoder split (18 of 28 blocks) needs a deep model: as narrow as the tiny one.
TINY_DEEP_MODEL = "Tiny-DiT-28/2"
TINY_DEEP_CONFIG = dict(patch_size=2, hidden_size=32, depth=28, num_heads=2, num_classes=10)


def register_tiny_method() -> plugins.Method:
    from methods.dit import OFFICIAL_CODE, DiT, dit_macs

    existing = plugins.methods().get("tiny-test")
    if existing is not None:
        return existing
    specs = tuple(plugins.ModelSpec(name, DiT, config, family="DiT", default_input_size=8, macs=dit_macs,
                                    official_code=OFFICIAL_CODE)
                  for name, config in ((TINY_MODEL, TINY_CONFIG), (TINY_DEEP_MODEL, TINY_DEEP_CONFIG)))
    return plugins.register(plugins.Method(name="tiny-test", title="Tiny DiTs for tests", models=specs))


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Overwrite every parameter: the official init zeroes adaLN and output layers, which hides bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_dit(input_size: int = 8, in_channels: int = 4, seed: int = 0, **overrides):
    from methods.dit import DiT

    kw = {**TINY_CONFIG, "input_size": input_size, "in_channels": in_channels, **overrides}
    return randomize_(DiT(**kw), seed)


def save_training_checkpoint(path: Path, model: torch.nn.Module, model_name: str = TINY_MODEL) -> Path:
    """The official train.py layout: {model, ema, opt, args} with an argparse.Namespace."""
    ema = randomize_(type(model)(**_ctor(model)), seed=123)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model=model_name, image_size=16, num_classes=10)}, path)
    return path


def _ctor(model):
    return dict(input_size=model.x_embedder.img_size, patch_size=model.patch_size, in_channels=model.in_channels,
                hidden_size=model.pos_embed.shape[-1], depth=len(model.blocks), num_heads=model.num_heads,
                num_classes=model.y_embedder.num_classes)


def tiny_vae_folder(folder: Path, seed: int = 0) -> Path:
    """A 2x-downsampling AutoencoderKL saved with save_pretrained (the layout of stabilityai/sd-vae-ft-*)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder)
    return folder
