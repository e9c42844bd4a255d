"""Layers shared by the DiT family (DiT, EDT, U-DiT all reuse DiT's embedders and conventions).

Parameter names follow facebookresearch/DiT so official checkpoints load with strict=True
(reference/dit.md §A.3-A.7). The harness offers them to every method the way a host library offers
building blocks to plug-ins; no method imports another method's module.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation over tokens: (N, T, D) with per-sample (N, D) shift and scale; note the 1 + scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Conv patchify (kernel = stride = patch) then row-major flatten to (N, T, D), as timm's PatchEmbed."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, the model was built for {self.img_size}x{self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (cos first, float32 always) followed by Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        # Computed in float32 whatever the model dtype: the official checkpoints were trained on
        # these exact float32 values (dit.md §A.3 step 2).
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding with a trailing "null" row (index = num_classes) for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """fc1 - GELU(tanh) - fc2, named as timm's Mlp."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


_FUSED_ATTENTION = True


@contextlib.contextmanager
def explicit_attention():
    """Compute attention as two visible matmuls (for FLOP counters, which miss fused SDPA on CPU)."""
    global _FUSED_ATTENTION
    previous, _FUSED_ATTENTION = _FUSED_ATTENTION, False
    try:
        yield
    finally:
        _FUSED_ATTENTION = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, fused unless explicit_attention() is active."""
    if _FUSED_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v)
    weights = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    return weights.softmax(dim=-1) @ v


def attention_backend(device: torch.device | str = "cpu") -> dict:
    """What computes attention on this device, for protocol cards (kernels differ in the last bits)."""
    info = {"implementation": "sdpa" if _FUSED_ATTENTION else "explicit-matmul-softmax"}
    if torch.device(device).type == "cuda":
        info.update(flash=torch.backends.cuda.flash_sdp_enabled(),
                    mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                    cudnn=torch.backends.cuda.cudnn_sdp_enabled(), math=torch.backends.cuda.math_sdp_enabled())
    return info


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, proj), computed by fused SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # Layout (3, heads, head_dim) along the 3D axis: q, k, v first, heads contiguous inside each.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W); inside a token channels are fastest, then column, then row."""
    p = patch_size
    h = w = int(x.shape[1] ** 0.5)
    if h * w != x.shape[1]:
        raise ValueError(f"{x.shape[1]} tokens do not form a square grid")
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """sin first, then cos (the opposite of the timestep embedding); float64."""
    if embed_dim % 2:
        raise ValueError("sin-cos embedding width must be even")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) table; the first half encodes the column index (MAE's meshgrid quirk)."""
    if embed_dim % 4:
        raise ValueError("2-D sin-cos embedding width must be divisible by 4")
    coords = np.arange(grid_size, dtype=np.float32)
    col, row = np.meshgrid(coords, coords)  # meshgrid(w, h): first grid is the column coordinate
    return np.concatenate(
        [get_1d_sincos_pos_embed_from_grid(embed_dim // 2, col), get_1d_sincos_pos_embed_from_grid(embed_dim // 2, row)],
        axis=1,
    )


def cfg_forward(forward, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                guided_channels: int = 3, **kwargs) -> torch.Tensor:
    """DiT's classifier-free guidance inside the model call (dit.md §A.7).

    The batch is [cond half; uncond half]. Only the first half of x is read (duplicated), and guidance
    is applied to the first three output channels only, a quirk the official code keeps so its
    numbers reproduce; the guided values are written into both halves, other channels pass through.
    """
    half = x[: len(x) // 2]
    model_out = forward(torch.cat([half, half], dim=0), t, y, **kwargs)
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
