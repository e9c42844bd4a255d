"""U-DiT: U-shaped Diffusion Transformers (Tian et al., NeurIPS 2024, arXiv 2405.02730).

The idea: a U-Net whose blocks are DiT adaLN blocks on 2-D feature maps. Self-attention is
*token-downsampled*: after a depthwise conv, the map is split into its four 2x2 phases and each phase
attends only within itself, which cuts the attention cost to a quarter. Attention is cosine attention
with a learned, clamped temperature and 2-D RoPE; the FFN is a 1x1 / depthwise-conv block that
re-parameterises into a single chain of three convs for inference.

Reproduced from the official code (YuchuanTian/U-DiT ``udit_models.py``, facts in reference/udit.md)
with its parameter names, so its checkpoints load with ``strict=True``. Two official behaviours are
deliberately *not* reproduced: the factories here honour ``input_size`` and ``num_classes`` (upstream
drops them), and the FFN's inference form is computed without writing into the weights (upstream's
``.eval()`` adds the merged kernels into ``dwconv.0.weight``, so a second ``eval()`` or an ``eval()``
before loading changes the outputs; udit.md §10.1).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.layers import LabelEmbedder, TimestepEmbedder, cfg_forward
from bench.plugins import Method, ModelSpec

LOGIT_SCALE_MAX = 4.6052  # upstream's literal clamp (just above ln 100), applied before exp


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN on a (N, C, H, W) map with per-sample (N, C) shift and scale."""
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def layer_norm_2d(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channels of a (N, C, H, W) map, no affine (upstream's LayerNorm2d(affine=False))."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=64)
def rope_2d(head_dim: int, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """The rotations e^(i angle), complex64 (rows*cols, head_dim/2), of upstream's 2-D RoPE (its freqs_cis).

    Complex channel k of a head turns by col * w_{k/2} for even k and row * w_{(k-1)/2} for odd k, with
    w_m = 10000^(-4m/head_dim). Upstream takes the grid width as int(sqrt(tokens)), which is ``cols``
    for the square maps it supports.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
    with torch.inference_mode(False):  # cached, so it must stay usable outside inference_mode
        freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim))
        index = torch.arange(rows * cols, device=device)
        angles = torch.stack([torch.outer(index % cols, freqs), torch.outer(index // cols, freqs)], dim=-1)
        angles = angles.reshape(rows * cols, head_dim // 2)
        return torch.polar(torch.ones_like(angles), angles)


def apply_rope_2d(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2k, 2k+1) of x (..., N, head_dim) as complex numbers, in float32 whatever x's
    dtype: one complex multiply, as upstream (four real products and a stack cost U-DiT ~10% per forward)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class DownSampler(nn.Module):
    """Depthwise conv (kernel from the name's last digit) with an optional identity shortcut."""

    def __init__(self, dim: int, kernel_size: int, down_shortcut: bool):
        super().__init__()
        self.down_shortcut = bool(down_shortcut)
        self.layer = nn.Conv2d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + x if self.down_shortcut else self.layer(x)


class DownSample_Attn(nn.Module):
    """Token-downsampled self-attention: each of the f*f phases of the map attends within itself."""

    def __init__(self, dim: int, num_heads: int, down_factor: int = 2, bias: bool = True,
                 posemb_type: str | None = None, attn_type: str | None = None, downsampler: str | None = None,
                 down_shortcut: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if downsampler is None:
            raise ValueError("downsampler is required, e.g. 'dwconv5' (its last digit is the kernel size)")
        if attn_type not in (None, "v2") or posemb_type not in (None, "rope2d"):
            raise ValueError(f"unknown attn_type {attn_type!r} / posemb_type {posemb_type!r}")
        self.heads = num_heads
        self.down_factor = down_factor
        self.attn_type = attn_type
        self.posemb_type = posemb_type
        self.downsampler = DownSampler(dim, int(downsampler[-1]), down_shortcut)
        self.to_qkv = nn.Linear(dim, dim * 3, bias=bias)
        self.to_out = nn.Conv2d(dim, dim, 1)
        if attn_type == "v2":
            self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), 10.0).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w = x.shape
        f, heads = self.down_factor, self.heads
        rows, cols = h // f, w // f
        # (B, D, H, W) -> (B, f*f phases, rows*cols, D); phase index = row offset * f + column offset.
        u = self.downsampler(x).reshape(b, d, rows, f, cols, f).permute(0, 3, 5, 2, 4, 1).reshape(b, f * f, -1, d)
        q, k, v = (z.unflatten(-1, (heads, -1)).transpose(2, 3) for z in self.to_qkv(u).chunk(3, dim=-1))
        if self.posemb_type == "rope2d":
            rotation = rope_2d(d // heads, rows, cols, x.device)
            q, k = apply_rope_2d(q, rotation), apply_rope_2d(k, rotation)
        if self.attn_type == "v2":  # cosine attention with a learned per-head temperature
            logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            logits = logits * self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()
        else:
            logits = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
        out = logits.softmax(dim=-1) @ v  # (B, f*f, heads, rows*cols, head_dim)
        out = out.reshape(b, f, f, heads, rows, cols, -1).permute(0, 3, 6, 4, 1, 5, 2).reshape(b, d, h, w)
        return self.to_out(out)


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.reshape(conv.weight.shape[0], -1)


class FeedForward(nn.Module):
    """U-DiT's FFN. ``rep``: 1x1 -> 1x1 -> GELU -> x + dw5 + dw3 + dw1 -> 1x1 -> 1x1 in training; in eval
    the same function as one 1x1, one 5x5 depthwise and one 1x1 conv (exact in real arithmetic).

    The merged weights are derived from the parameters, never written back, and cached against the
    parameters' identity and version counters, so loading weights, an optimiser step or a device move
    after ``eval()`` is seen, and ``eval()`` can be called any number of times.
    """

    def __init__(self, dim: int, ffn_expansion_factor: float, bias: bool = True, rep: bool = False):
        super().__init__()
        self.rep = bool(rep)
        self.hidden_features = hidden = int(dim * ffn_expansion_factor)
        if self.rep:
            self.project_in = nn.Sequential(nn.Conv2d(dim, hidden // 2, 1, bias=bias),
                                            nn.Conv2d(hidden // 2, hidden, 1, bias=bias))
            self.dwconv = nn.ModuleList([nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden, bias=bias)
                                         for k in (5, 3, 1)])
            self.project_out = nn.Sequential(nn.Conv2d(hidden, hidden // 2, 1, bias=bias),
                                             nn.Conv2d(hidden // 2, dim, 1, bias=bias))
        else:
            self.project_in = nn.Conv2d(dim, hidden, 1, bias=bias)
            self.dwconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden, bias=bias)
            self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)
        self._merged: tuple[tuple, tuple] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rep:
            return self.project_out(self.dwconv(F.gelu(self.project_in(x))))
        if self.training:
            x = F.gelu(self.project_in(x))
            out = x
            for conv in self.dwconv:  # x + dw5 + dw3 + dw1, summed in upstream's order
                out = out + conv(x)
            return self.project_out(out)
        w_in, b_in, w_dw, b_dw, w_out, b_out = self.merged_weights()
        x = F.gelu(F.conv2d(x, w_in, b_in))
        return F.conv2d(F.conv2d(x, w_dw, b_dw, padding=2, groups=self.hidden_features), w_out, b_out)

    def train(self, mode: bool = True) -> FeedForward:
        if mode:
            self._merged = None  # only the eval form uses it; free the memory while training
        return super().train(mode)

    def merged_weights(self) -> tuple:
        """(W_in, b_in, K, b_dw, W_out, b_out) of the inference form, cached until a parameter changes."""
        params = tuple(self.parameters())
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._merged is None or self._merged[0] != key:
            # Normal tensors even under inference_mode, so a later forward with autograd can use them.
            with torch.inference_mode(False), torch.no_grad():
                self._merged = (key, self._merge())
        return self._merged[1]

    def _merge(self) -> tuple:
        def chain(first: nn.Conv2d, second: nn.Conv2d):
            w1, w2 = _matrix(first), _matrix(second)
            weight = (w2 @ w1)[:, :, None, None]
            bias = None if first.bias is None else w2 @ first.bias + second.bias
            return weight, bias

        k5, k3, k1 = self.dwconv
        kernel = k5.weight.clone()
        kernel[:, :, 1:4, 1:4] += k3.weight
        kernel[:, :, 2:3, 2:3] += k1.weight + 1.0  # + 1: the identity branch x of x + dw5 + dw3 + dw1
        bias = None if k5.bias is None else k5.bias + k3.bias + k1.bias
        return (*chain(*self.project_in), kernel, bias, *chain(*self.project_out))


class Mlp(nn.Module):
    """``ffn_type='basic'``: 1x1 conv - GELU(tanh) - 1x1 conv, named fc1/fc2 as upstream."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, 1)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Conv2d(hidden_features, in_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class U_DiTBlock(nn.Module):
    """Two adaLN-Zero sub-blocks (attn1/mlp1, attn2/mlp2), each with its own modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, down_factor: int = 2,
                 rep: int = 1, ffn_type: str = "rep", **attn_kwargs):
        super().__init__()
        if ffn_type not in ("rep", "basic"):
            raise ValueError(f"FFN type not implemented: {ffn_type!r} (use 'rep' or 'basic')")
        for i in (1, 2):
            setattr(self, f"attn{i}", DownSample_Attn(hidden_size, num_heads, down_factor, bias=True, **attn_kwargs))
            mlp = FeedForward(hidden_size, mlp_ratio, rep=rep) if ffn_type == "rep" else \
                Mlp(hidden_size, int(hidden_size * mlp_ratio))
            setattr(self, f"mlp{i}", mlp)
            setattr(self, f"adaLN_modulation{i}", nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for attn, mlp, ada in ((self.attn1, self.mlp1, self.adaLN_modulation1),
                               (self.attn2, self.mlp2, self.adaLN_modulation2)):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada(c).chunk(6, dim=1)
            x = x + gate_msa[:, :, None, None] * attn(modulate(layer_norm_2d(x), shift_msa, scale_msa))
            x = x + gate_mlp[:, :, None, None] * mlp(modulate(layer_norm_2d(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """LayerNorm2d + adaLN (shift, scale) + 3x3 conv to the output channels."""

    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.out_proj = nn.Conv2d(hidden_size, out_channels, 3, padding=1)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.out_proj(modulate(layer_norm_2d(x), shift, scale))


class ConvStem(nn.Module):
    """3x3 conv lifting the latent to the model width at full resolution (no patchify)."""

    def __init__(self, in_channels: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Downsample(nn.Module):
    """Conv3x3 to half the channels, then PixelUnshuffle(2): (C, H, W) -> (2C, H/2, W/2)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Upsample(nn.Module):
    """Conv3x3 to twice the channels, then PixelShuffle(2): (C, H, W) -> (C/2, 2H, 2W)."""

    def __init__(self, n_feat: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(n_feat, n_feat * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


_LEVELS = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")
_LEVEL_WIDTH = (1, 2, 4, 2, 2)  # x hidden_size; decoder level 1 runs at 2C (udit.md §12.5)


class U_DiT(nn.Module):
    """U-DiT with the official constructor arguments (udit.md §2).

    ``input_size`` is only recorded (the network works on any H, W divisible by 4 * down_factor);
    ``attn_type``, ``posemb_type``, ``downsampler`` and ``down_shortcut`` reach every attention.
    """

    def __init__(self, input_size: int = 32, down_factor: int | Sequence[int] = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: Sequence[int] = (2, 5, 8, 5, 2), num_heads: int = 16,
                 mlp_ratio: float = 4, class_dropout_prob: float = 0.1, num_classes: int = 1000,
                 learn_sigma: bool = True, rep: int = 1, ffn_type: str = "rep", attn_type: str | None = None,
                 posemb_type: str | None = None, downsampler: str | None = None, down_shortcut: bool = False):
        super().__init__()
        if len(depth) != 5:
            raise ValueError(f"depth needs 5 entries (enc1, enc2, latent, dec2, dec1), got {list(depth)}")
        factors = list(down_factor) if isinstance(down_factor, (list, tuple)) else [down_factor] * 5
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.down_factors = factors
        c = hidden_size
        self.x_embedder = ConvStem(in_channels, c)
        for i, width in enumerate((c, 2 * c, 4 * c), start=1):  # one conditioning per width
            setattr(self, f"t_embedder_{i}", TimestepEmbedder(width))
            setattr(self, f"y_embedder_{i}", LabelEmbedder(num_classes, width, class_dropout_prob))
        attn_kwargs = dict(attn_type=attn_type, posemb_type=posemb_type, downsampler=downsampler,
                           down_shortcut=down_shortcut)
        for name, mult, n_blocks, f in zip(_LEVELS, _LEVEL_WIDTH, depth, factors):
            setattr(self, name, nn.ModuleList(
                U_DiTBlock(mult * c, num_heads, mlp_ratio, f, rep, ffn_type, **attn_kwargs) for _ in range(n_blocks)))
        self.down1_2 = Downsample(c)
        self.down2_3 = Downsample(2 * c)
        self.up3_2 = Upsample(4 * c)
        self.reduce_chan_level2 = nn.Conv2d(4 * c, 2 * c, 1)
        self.up2_1 = Upsample(2 * c)
        self.reduce_chan_level1 = nn.Conv2d(2 * c, 2 * c, 1)
        self.output = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.final_layer = FinalLayer(2 * c, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream's init: xavier on every Linear and Conv2d, adaLN-Zero, zero output conv."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for i in (1, 2, 3):
            nn.init.normal_(getattr(self, f"y_embedder_{i}").embedding_table.weight, std=0.02)
            for j in (0, 2):
                nn.init.normal_(getattr(self, f"t_embedder_{i}").mlp[j].weight, std=0.02)
        for name in _LEVELS:
            for block in getattr(self, name):
                for ada in (block.adaLN_modulation1, block.adaLN_modulation2):
                    nn.init.zeros_(ada[-1].weight)
                    nn.init.zeros_(ada[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.out_proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,), y (N,) -> (N, out_channels, H, W)."""
        need = 4 * max(self.down_factors)
        if x.shape[-1] % need or x.shape[-2] % need:
            raise ValueError(f"input {tuple(x.shape[-2:])} must be divisible by {need} (two 2x down-samplings "
                             f"and down_factor {max(self.down_factors)} attention groups)")
        # Each level draws its own label drop in training, as upstream (udit.md §12.9).
        c1, c2, c3 = (getattr(self, f"t_embedder_{i}")(t) + getattr(self, f"y_embedder_{i}")(y, self.training)
                      for i in (1, 2, 3))
        enc1 = self._run(self.encoder_level_1, self.x_embedder(x), c1)
        enc2 = self._run(self.encoder_level_2, self.down1_2(enc1), c2)
        latent = self._run(self.latent, self.down2_3(enc2), c3)
        dec2 = self._run(self.decoder_level_2, self.reduce_chan_level2(torch.cat([self.up3_2(latent), enc2], 1)), c2)
        dec1 = self._run(self.decoder_level_1, self.reduce_chan_level1(torch.cat([self.up2_1(dec2), enc1], 1)), c2)
        return self.final_layer(self.output(dec1), c2)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            x = block(x, c)
        return x

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """DiT's guidance: batch [cond; uncond], guidance on the first 3 output channels only."""
        return cfg_forward(self.forward, x, t, y, cfg_scale)


# ---------------------------------------------------------------------------------------------------
# Checkpoints: the research file's names (utils/udit_models_original.py, class IPT_UNet; udit.md §11)

OLD_NAMES = {
    ".global_attn.": ".attn1.", ".global_mlp.": ".mlp1.", ".global_adaLN_modulation.": ".adaLN_modulation1.",
    ".local_attn.": ".attn2.", ".local_mlp.": ".mlp2.", ".local_adaLN_modulation.": ".adaLN_modulation2.",
    ".before_attn.layer.": ".downsampler.layer.",
}


def rename_old_keys(state_dict: dict) -> dict:
    """Map IPT_UNet parameter names onto the released names; released names pass unchanged."""
    out = {}
    for key, value in state_dict.items():
        for old, new in OLD_NAMES.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def adapt_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """Checkpoint hook: accept the older IPT_UNet naming; the architecture is fixed by the registry name."""
    return rename_old_keys(state_dict), {}


# ---------------------------------------------------------------------------------------------------
# MACs (udit.md §5)


def udit_macs(config: dict) -> int:
    """Multiply-accumulates of one forward, batch 1, of the inference (merged-FFN) network.

    Counted as torchprofile counts the official model in eval mode, which is how the published
    6.04 / 22.22 / 85.00 GFLOPs were obtained: convs (depthwise as k*k per output), linears and matmuls,
    and the element-wise products (adaLN scale, gates, RoPE rotations as complex products, the
    attention temperature). Layer norms without affine, softmax, GELU and additions count 0. Only
    torchprofile's count of traced integer shape arithmetic (924 for U-DiT-S) is left out.
    """
    cfg = {**{k: v.default for k, v in inspect.signature(U_DiT).parameters.items()}, **config}
    c, heads, ratio = cfg["hidden_size"], cfg["num_heads"], cfg["mlp_ratio"]
    factors = cfg["down_factor"] if isinstance(cfg["down_factor"], (list, tuple)) else [cfg["down_factor"]] * 5
    side = cfg["input_size"]
    kernel = int(cfg["downsampler"][-1]) if cfg["downsampler"] else 5
    rope = cfg["posemb_type"] == "rope2d"

    def sub_block(d: int, tokens: int, groups: int) -> int:
        hidden, per_group = int(d * ratio), tokens // groups
        macs = 6 * d * d  # adaLN
        macs += 4 * tokens * d  # two modulations, two gates
        macs += tokens * d * (kernel * kernel + 3 * d + d)  # downsampler, to_qkv, to_out
        macs += tokens * d if rope else 0  # q and k rotated: tokens * heads * head_dim/2 complex products each
        macs += 2 * groups * per_group * per_group * d + groups * heads * per_group * per_group  # QK^T, AV, scale
        if cfg["ffn_type"] == "basic":
            return macs + 2 * tokens * d * hidden
        return macs + tokens * hidden * (2 * d + 25)  # merged 1x1, 5x5 depthwise, 1x1

    sides = (side, side // 2, side // 4, side // 2, side)
    macs = side * side * c * cfg["in_channels"] * 9  # conv stem
    macs += sum(256 * w + w * w + 2 * 128 for w in (c, 2 * c, 4 * c))  # timestep MLPs (+ sinusoid products)
    for n_blocks, mult, s, f in zip(cfg["depth"], _LEVEL_WIDTH, sides, factors):
        macs += 2 * n_blocks * sub_block(mult * c, s * s, f * f)
    macs += side * side * (c // 2) * c * 9 + (side // 2) ** 2 * c * 2 * c * 9  # down1_2, down2_3
    macs += (side // 4) ** 2 * 8 * c * 4 * c * 9 + (side // 2) ** 2 * 4 * c * 2 * c * 9  # up3_2, up2_1
    macs += (side // 2) ** 2 * 2 * c * 4 * c + side * side * 2 * c * 2 * c  # reduce_chan_level2, _level1
    macs += side * side * 2 * c * 2 * c * 9  # output conv
    out = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
    macs += 2 * c * 4 * c + side * side * 2 * c + side * side * out * 2 * c * 9  # final adaLN, modulation, conv
    return macs


# ---------------------------------------------------------------------------------------------------
# Registry (udit.md §2)

_COMMON = dict(down_factor=2, depth=[2, 5, 8, 5, 2], ffn_type="rep", rep=1, mlp_ratio=2, attn_type="v2",
               posemb_type="rope2d", downsampler="dwconv5", down_shortcut=1)


# YuchuanTian/U-DiT: the class in udit_models.py (not its S/B/L factories, which ignore their kwargs) and
# DiT's diffusion/ package beside it (udit.md §1).
OFFICIAL_CODE = {"model": "udit_models:U_DiT", "diffusion": "diffusion:create_diffusion"}


def _spec(name: str, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(name=name, builder=U_DiT, config=dict(_COMMON, hidden_size=hidden, num_heads=heads),
                     family="U-DiT", macs=udit_macs, adapt_state_dict=adapt_state_dict,
                     description=f"U-DiT, width {hidden}, {heads} heads, token-downsampled attention",
                     official_code=OFFICIAL_CODE)



# `dit-bench reproduce udit`: plain data read by bench/reproduce.py ("architecture"). The paper's headline
# is U-DiT-B matching DiT-XL/2 at about 1/6 of its FLOPs: as MACs this ratio is exact and device-independent.
_PAIRS = [
    {"model": "U-DiT-B", "versus": "DiT-XL/2", "claim": "about 1/6 of DiT-XL/2's FLOPs (paper text; the published GMACs give 1/5.3)"},
    {"model": "U-DiT-S", "versus": "DiT-S/2", "claim": "same MACs class as DiT-S/2"},
    {"model": "U-DiT-B", "versus": "DiT-B/2", "claim": "same MACs class as DiT-B/2"},
    {"model": "U-DiT-L", "versus": "DiT-XL/2", "claim": "-"},
]
RECIPES = {
    "tiny": {
        "kind": "architecture", "image_size": 256, "pairs": _PAIRS,
        # similar MACs, different layout (downsampled-token attention, depthwise convolutions): does equal
        # MACs mean equal time on this CPU?
        "timing": {"batch": 1, "warmup": 1, "repeats": 3,
                   "pairs": [{"model": "U-DiT-S", "versus": "DiT-S/2", "label": "U-DiT-S vs DiT-S/2 (~6 GMACs each)"}]},
    },
    "paper": {
        "kind": "architecture", "image_size": 256, "pairs": _PAIRS,
        "timing": {"batch": 1, "warmup": 1, "repeats": 3,
                   "pairs": [{"model": "U-DiT-S", "versus": "DiT-S/2"}, {"model": "U-DiT-B", "versus": "DiT-XL/2",
                                                                       "label": "U-DiT-B vs DiT-XL/2 (the headline)"}]},
    },
}

METHOD = Method(
    name="udit",
    title="U-DiTs: Downsample Tokens in U-Shaped Diffusion Transformers",
    paper="arXiv:2405.02730",
    models=(_spec("U-DiT-S", 96, 4), _spec("U-DiT-B", 192, 8), _spec("U-DiT-L", 384, 16)),
    recipes=RECIPES,
)
