"""Latent <-> image decoders: the SD VAE through diffusers' AutoencoderKL, or identity for pixel space."""
from __future__ import annotations

from pathlib import Path

import torch

from bench.errors import UserError

# Hard-coded in every DiT script (dit.md §B.6): latents are the VAE posterior times this constant.
LATENT_SCALE = 0.18215
VAE_ASSETS = {"ema": "sd-vae-ft-ema", "mse": "sd-vae-ft-mse"}
# The architecture of stabilityai/sd-vae-ft-ema and -mse (their config.json; 83,653,863 parameters): speed runs
# decode with it at random weights (`--vae random`), as they time the transformer at random weights.
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                     layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256)


class IdentityDecoder(torch.nn.Module):
    """Pixel-space models: the 'latent' already is the image in [-1, 1]."""

    downsample = 1
    latent_channels = 3
    name = "identity"

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x


class VAEDecoder(torch.nn.Module):
    """diffusers AutoencoderKL with DiT's scaling: decode(z / 0.18215), encode = posterior sample * 0.18215."""

    def __init__(self, vae, name: str):
        super().__init__()
        self.vae = vae
        self.name = name
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / LATENT_SCALE).sample

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.vae.encode(x).latent_dist.sample(generator=generator) * LATENT_SCALE


def load_vae(spec: str, device: torch.device | str = "cpu", allow_random: bool = False):
    """``identity``, ``ema`` / ``mse`` (the official sd-vae-ft-* weights from the asset cache), a local
    diffusers folder (config.json + weights), or with ``allow_random`` (speed runs) ``random``: the SD VAE's
    architecture at random weights, which decodes as fast as the real one and needs no download."""
    if spec in ("identity", "none", "pixel"):
        return IdentityDecoder().to(device)
    if spec == "random":
        if not allow_random:
            raise UserError("--vae random decodes noise into noise: it is for `dit-bench speed` only; use ema or mse")
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
        return VAEDecoder(vae.eval().requires_grad_(False), "sd-vae (random weights)").to(device)
    if spec in VAE_ASSETS:
        from bench import assets

        folder = assets.resolve(VAE_ASSETS[spec])
        name = f"sd-vae-ft-{spec}"
    else:
        folder = Path(spec)
        if not (folder / "config.json").is_file():
            raise UserError(f"VAE {spec!r}: not 'ema', 'mse', 'identity' or a diffusers folder with config.json"
                            + (" (or 'random' for speed runs)" if allow_random else ""))
        name = str(folder)
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"VAE at {folder} could not be loaded: {str(exc).splitlines()[0]}") from None
    return VAEDecoder(vae.eval().requires_grad_(False), name).to(device)
