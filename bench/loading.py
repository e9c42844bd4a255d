"""Turn a model name and a checkpoint (asset name, file path, or none) into a ready denoiser."""
from __future__ import annotations

from pathlib import Path

import torch

from bench import plugins
from bench.errors import UserError


def load_denoiser(model: str, checkpoint: str | None, image_size: int, num_classes: int,
                  device: torch.device | str, latent_downsample: int = 8, random_weights: bool = False,
                  in_channels: int | None = None):
    """Returns (module in eval mode, ModelSpec, info dict with the checkpoint source and sha256).

    ``model`` is a registry name; a path to a training checkpoint whose ``args.model`` names the
    architecture works too. Without ``checkpoint`` the model's official weights for this image size
    are used (fetched into the asset cache), unless ``random_weights`` is set (speed runs).
    """
    from bench import assets, checkpoints

    if Path(model).suffix in (".pt", ".pth", ".safetensors") and Path(model).is_file():
        checkpoint = checkpoint or model
        model = _model_name_from_checkpoint(model)
    spec = plugins.get_model(model)
    if image_size % latent_downsample:
        raise UserError(f"image size {image_size} is not divisible by the VAE's factor {latent_downsample}")
    overrides = {"input_size": image_size // latent_downsample, "num_classes": num_classes}
    if in_channels is not None:
        overrides["in_channels"] = in_channels
    if random_weights:
        torch.manual_seed(0)
        net = spec.build(**overrides)
        return net.to(device).eval(), spec, {"source": "random", "sha256": None, "path": None}
    if checkpoint is None:
        if image_size not in spec.checkpoints:
            raise UserError(f"{spec.name} has no official checkpoint at {image_size}px; pass --ckpt PATH "
                            "(or --random-weights for speed runs)")
        checkpoint = spec.checkpoints[image_size]
    path = assets.resolve(checkpoint)
    net, info = checkpoints.load_model(spec, path, **overrides)
    info["path"] = str(path)
    return net.to(device).eval(), spec, info


def _model_name_from_checkpoint(path: str) -> str:
    from bench import checkpoints

    _, info = checkpoints.read_state_dict(path)
    args = info.get("args") or {}
    name = args.get("model") if isinstance(args, dict) else getattr(args, "model", None)
    if not name:
        raise UserError(f"{path} does not record its architecture; pass --model NAME as well")
    return name
