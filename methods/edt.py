"""EDT: Efficient Diffusion Transformer (Chen et al., NeurIPS 2024, arXiv 2410.23788).

The idea: a DiT split into five stages that form a U over the token grid (16x16 -> 8x8 -> 4x4 -> 8x8
-> 16x16 at 256 px). Tokens are merged 2x2 between the down stages and expanded back before the up
stages, where a long skip from the matching down stage is fused in. Every block's attention carries a
learnable relative position bias. At sampling time a fixed, distance-based Attention Modulation Matrix
(AMM) multiplies the post-softmax attention of a few chosen blocks; in training a second, masked pass
zeroes random tokens inside the token-merging modules.

Everything is reproduced from the official code (xinwangChen/EDT, facts in reference/edt.md) so that
its checkpoints load with ``strict=True`` and give its outputs. The official quirks that matter for
that are named where they are reproduced.

Contents, in the order data meets them: the AMM (§5), the model (§1-§4), AMM on plain DiT (§5), the
masked training with its loss pieces (§6-§7), MAC counting (§10), checkpoint layouts (§10), registry.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import layers
from bench.layers import (FinalLayer, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, cfg_forward,
                          get_2d_sincos_pos_embed, modulate, unpatchify)
from bench.plugins import Method, ModelSpec, PluginError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# Attention Modulation Matrix (edt.md §5)

# The "alternation arrangement": global block indices whose attention is modulated. The official
# lists are for 256 px and cfg <= 1.5 (S/B) and for XL; other arrangements the official code keeps
# commented out (block 8 for cfg >= 2) can be given through ``amm_blocks``.
AMM_BLOCKS = {"S": (7, 10), "B": (7, 10), "XL": (23, 25)}
# models_dit_with_amm.py marks these blocks of DiT-XL (depth 28); its comment gives 8 and 10 for DiT-S.
DIT_AMM_BLOCKS = {28: (15, 17, 19, 22, 24), 12: (8, 10)}


def modulation_matrix(n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The AMM of an n x n token grid, shape (n^2, n^2).

    M_ij = exp(cos(f d_ij)) / 2 with d_ij the Euclidean distance of tokens i and j (row-major),
    f = 2 pi / (4 (n-1) sqrt 2) so the largest distance maps to a phase of pi/2, and every entry
    farther than R = sqrt(4 + (n-1)^2) set to 0. Upstream finds R as the distance from token 0 to
    token 3n-1 and zeroes values below the value there; M falls with d, so that is "d > R", which
    is decided here on exact integer squared distances. Not renormalised, no parameters.
    """
    index = torch.arange(n * n, device="cpu")
    rows, cols = index // n, index % n
    d2 = (rows[:, None] - rows[None]) ** 2 + (cols[:, None] - cols[None]) ** 2
    f = 2 * math.pi / (4 * (n - 1) * math.sqrt(2)) if n > 1 else 0.0
    # float32 arithmetic in upstream's order, so the values are upstream's to the bit.
    m = torch.exp(torch.cos(f * torch.sqrt(d2.float()))) / 2
    m[d2 > 4 + (n - 1) ** 2] = 0.0
    return m.to(dtype or torch.get_default_dtype())


# ---------------------------------------------------------------------------------------------------
# Model (edt.md §1-§4)


def _sincos_table(width: int, grid: int) -> nn.Parameter:
    """A frozen 2-D sin-cos table, a Parameter as upstream so it sits in the state dict."""
    table = torch.from_numpy(get_2d_sincos_pos_embed(width, grid)).float().unsqueeze(0)
    return nn.Parameter(table, requires_grad=False)


class RelativePositionBias(nn.Module):
    """BEiT-style learnable bias per head and relative offset on an n x n grid; table (2n-1)^2 rows."""

    def __init__(self, window_size: Sequence[int], num_heads: int):
        super().__init__()
        n_h, n_w = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * n_h - 1) * (2 * n_w - 1), num_heads))
        rows, cols = np.divmod(np.arange(n_h * n_w), n_w)
        index = (rows[:, None] - rows[None] + n_h - 1) * (2 * n_w - 1) + (cols[:, None] - cols[None] + n_w - 1)
        # Not in the state dict, as upstream (a plain attribute there).
        self.register_buffer("relative_position_index", torch.from_numpy(index), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        return bias.reshape(n, n, -1).permute(2, 0, 1)  # (heads, N, N)


def padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                multiple: int) -> torch.Tensor:
    """SDPA with the head size zero-padded to ``multiple``: EDT's heads are 52 wide, and CUDA's fused kernels
    (memory-efficient, cuDNN) take half-precision heads in multiples of 8 only. Zero columns add nothing to
    q k^T, the scale is the unpadded one, and the padded output columns are dropped: the same attention."""
    head = q.shape[-1]
    pad = -head % multiple
    if pad:
        q, k, v = (F.pad(z, (0, pad)) for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[..., :head]


class AttentionBlock(nn.Module):
    """Self-attention with relative position bias; with ``local`` the AMM modulates it in eval mode."""

    def __init__(self, dim: int, input_resolution: int, num_heads: int, local: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"stage width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.local = local
        self.rel_pos_bias = RelativePositionBias((input_resolution, input_resolution), num_heads)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        if local:
            self.register_buffer("modulation_matrix", modulation_matrix(input_resolution), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.rel_pos_bias().to(q.dtype)
        if self.local and not self.training:
            # Upstream multiplies the softmax output by the AMM only when not training (edt.md §5).
            weights = ((q * self.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            x = (weights * self.modulation_matrix.to(weights.dtype)) @ v
        else:
            x = padded_sdpa(q, k, v, bias, self.scale, multiple=8 if q.is_cuda else 1)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class EDTBlock(nn.Module):
    """DiT's adaLN-Zero block at a stage's width, conditioned on the stage-0 width (edt.md §12.1)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, input_resolution: int = 16,
                 cond_dim: int = 384, local: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = AttentionBlock(hidden_size, input_resolution, num_heads, local=local)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def _merge_phases(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, r*r, C) -> (B, r*r/4, 4C), channel blocks (even,even), (odd,even), (even,odd), (odd,odd) in (row, col)."""
    b, _, c = x.shape
    x = x.reshape(b, r, r, c)
    phases = [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]]
    return torch.cat(phases, dim=-1).reshape(b, -1, 4 * c)


class DownSample(nn.Module):
    """2x2 token merging (Swin order) with adaLN, an optional keep-mask, then a fresh sin-cos table."""

    def __init__(self, hidden_size: int, out_hidden_size: int, input_resolution: int, cond_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.norm = nn.LayerNorm(4 * hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 8 * hidden_size, bias=True))
        self.reduction = nn.Linear(4 * hidden_size, out_hidden_size, bias=False)
        self.pos_embed = _sincos_table(out_hidden_size, input_resolution // 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm(_merge_phases(x, self.input_resolution)), shift, scale)
        if mask is not None:
            # The masked pass (edt.md §7) drops tokens after norm + modulation, before the reduction.
            x = x * _merge_phases(mask.expand(-1, -1, x.shape[-1] // 4), self.input_resolution)
        return self.reduction(x) + self.pos_embed


class UpSample(nn.Module):
    """Linear expansion to 4 sub-tokens; channel block 2*p1 + p2 goes to offset (p1 rows, p2 cols)."""

    def __init__(self, hidden_size: int, out_hidden_size: int, input_resolution: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.expand = nn.Linear(hidden_size, 4 * out_hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.input_resolution
        x = self.expand(x)
        b, c = x.shape[0], x.shape[-1] // 4
        x = x.reshape(b, r, r, 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, 4 * r * r, c)


class ConcatLayer(nn.Module):
    """Fuses [up-sampled, long skip] (in that order) with adaLN and a linear map, then a sin-cos table."""

    def __init__(self, hidden_size: int, cond_dim: int, input_resolution: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(2 * hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 4 * hidden_size, bias=True))
        self.cat = nn.Linear(2 * hidden_size, hidden_size, bias=True)
        self.pos_embed = _sincos_table(hidden_size, input_resolution)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.cat(modulate(self.norm_final(x), shift, scale)) + self.pos_embed


def _keep_mask(x: torch.Tensor, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    """Per-token keep-mask (N, L, 1) for tokens x (N, L, C): one drop ratio p ~ U(low, high) per pass,
    keep = U[0,1) >= p per token.

    Upstream draws p with Python's ``random`` and the tokens with torch's CPU generator; here both come
    from ``generator`` (torch's default CPU generator when None), so a seeded generator makes the pass
    reproducible. The distribution is the same.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    p = low + (high - low) * torch.rand((), generator=generator, device=device).item()
    keep = torch.rand(*x.shape[:-1], 1, generator=generator, device=device) >= p
    return keep.to(device=x.device, dtype=x.dtype)


class EDT(nn.Module):
    """EDT with the official constructor arguments (edt.md §2).

    ``local`` is the official name of the AMM switch; ``amm`` is an alias that wins when given, and
    ``amm_blocks`` replaces the official arrangement (global block indices). ``size`` picks the official
    arrangement ("S"/"B": blocks 7, 10; "XL": 23, 25) and, for "XL", forces ``mid_mask`` as upstream.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 312,
                 depth: int = 12, num_heads: Sequence[int] = (6, 8, 10, 8, 6), mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 stages_depth: Sequence[int] = (2, 2, 2, 3, 3), dims: Sequence[int] = (312, 416, 520, 416, 312),
                 mid_mask: bool = False, size: str = "S", local: bool = True, *, amm: bool | None = None,
                 amm_blocks: Sequence[int] | None = None):
        super().__init__()
        stages = len(stages_depth)
        if sum(stages_depth) != depth:
            raise ValueError(f"stages_depth {list(stages_depth)} sums to {sum(stages_depth)}, not depth={depth}")
        if stages % 2 == 0 or not len(dims) == len(num_heads) == stages:
            raise ValueError("EDT needs an odd number of stages and one width and head count per stage")
        if dims[0] != hidden_size or dims[-1] != hidden_size:
            raise ValueError(f"the first and last stage widths must equal hidden_size={hidden_size}")
        self.down_stages = stages // 2
        grid = input_size // patch_size
        if input_size % patch_size or grid % 2 ** self.down_stages:
            raise ValueError(f"input_size {input_size} / patch {patch_size} must give a token grid divisible by "
                             f"{2 ** self.down_stages}")
        local = local if amm is None else amm
        if local and amm_blocks is None and size not in AMM_BLOCKS:
            raise ValueError(f"size must be one of {sorted(AMM_BLOCKS)} to choose the AMM blocks, or give amm_blocks")
        self.amm_blocks = tuple(amm_blocks if amm_blocks is not None else AMM_BLOCKS[size]) if local else ()

        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.stages_depth = list(stages_depth)
        self.mid_mask = mid_mask or size == "XL"  # upstream forces the mid mask for XL
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = _sincos_table(hidden_size, grid)

        self.blocks = nn.ModuleList()
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.concat_blocks = nn.ModuleList()
        for s, n_blocks in enumerate(stages_depth):
            if s > self.down_stages:
                self.up_blocks.append(UpSample(dims[s - 1], dims[s], grid))
                grid *= 2
                self.concat_blocks.append(ConcatLayer(dims[s], hidden_size, grid))
            for _ in range(n_blocks):
                self.blocks.append(EDTBlock(dims[s], num_heads[s], mlp_ratio, grid, cond_dim=hidden_size,
                                            local=len(self.blocks) in self.amm_blocks))
            if s < self.down_stages:
                self.down_blocks.append(DownSample(dims[s], dims[s + 1], grid, hidden_size))
                grid //= 2
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream's init: xavier on every Linear (merge/fuse layers included, not zeroed), adaLN-Zero in blocks."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, enable_input_mask: bool = False,
                enable_down_mask: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """x (N, C, H, W), t (N,), y (N,). ``enable_down_mask`` runs the masked training pass (edt.md §7);
        ``enable_input_mask`` (MDTv2's flag) is accepted and ignored, as upstream."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        skips = []
        mid_mask = enable_down_mask and self.mid_mask
        depth = 0
        for s, n_blocks in enumerate(self.stages_depth):
            if s < self.down_stages:
                skips.append(x)  # the long skip carries the stage *input* (edt.md §12.2)
            if s > self.down_stages:
                x = self.up_blocks[s - self.down_stages - 1](x)
                x = self.concat_blocks[s - self.down_stages - 1](torch.cat([x, skips.pop()], dim=-1), c)
            for j in range(n_blocks):
                if mid_mask and j == 4:
                    # XL only: once per masked pass, before the first block with in-stage index 4,
                    # tokens are replaced by the input position table with p ~ U(0.15, 0.25).
                    keep = _keep_mask(x, 0.15, 0.25, generator)
                    x = x * keep + (1 - keep) * self.pos_embed
                    mid_mask = False
                x = self.blocks[depth](x, c)
                depth += 1
            if s < self.down_stages:
                mask = None
                if enable_down_mask:  # drop ratio U(0.4, 0.5) at the first merge, U(0.1, 0.2) after
                    low, high = (0.4, 0.5) if s == 0 else (0.1, 0.2)
                    mask = _keep_mask(x, low, high, generator)
                x = self.down_blocks[s](x, c, mask)
        x = self.final_layer(x, c)
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """DiT's guidance: batch [cond; uncond], guidance on the first 3 output channels only."""
        return cfg_forward(self.forward, x, t, y, cfg_scale)


# ---------------------------------------------------------------------------------------------------
# AMM on plain DiT (other_models/models_dit_with_amm.py, edt.md §5)


def _amm_attention_forward(attn: layers.Attention, x: torch.Tensor) -> torch.Tensor:
    """bench.layers.Attention computed as softmax(q k^T * scale) * AMM, then @ v (upstream order)."""
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    weights = ((q * attn.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"AMM needs a square token grid, got {n} tokens")
    key = (side, weights.device, weights.dtype)
    if attn._amm_cache[0] != key:
        with torch.inference_mode(False):  # cached, so it must stay usable outside inference_mode
            attn._amm_cache = (key, modulation_matrix(side).to(device=weights.device, dtype=weights.dtype))
    x = (weights * attn._amm_cache[1]) @ v
    return attn.proj(x.transpose(1, 2).reshape(b, n, c))


class AMMHandle:
    """Undoes ``apply_amm``; also a context manager (``with apply_amm(model): ...``)."""

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_amm_cache", None)
        self.modules = []

    def __enter__(self) -> AMMHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_amm(model: nn.Module, block_indices: Sequence[int] | None = None) -> AMMHandle:
    """Modulate the attention of ``model.blocks[i].attn`` for i in ``block_indices`` with the AMM.

    Works on any model whose blocks hold a ``bench.layers.Attention`` as ``attn`` (DiT). The grid is
    the square root of the token count at call time. As in models_dit_with_amm.py the AMM then acts in
    train and eval mode alike and no parameter changes, so official DiT checkpoints still load. Without
    ``block_indices`` the official arrangement for the model's depth is used (``DIT_AMM_BLOCKS``).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(getattr(b, "attn", None), layers.Attention) for b in blocks):
        raise PluginError("AMM for DiT needs a model whose blocks hold a bench.layers.Attention as .attn")
    if block_indices is None:
        if len(blocks) not in DIT_AMM_BLOCKS:
            raise PluginError(f"no official AMM arrangement for depth {len(blocks)}; give the block indices")
        block_indices = DIT_AMM_BLOCKS[len(blocks)]
    bad = [i for i in block_indices if not 0 <= i < len(blocks)]
    if bad:
        raise PluginError(f"AMM block indices {bad} are outside the model's {len(blocks)} blocks")
    modules = []
    for i in block_indices:
        attn = blocks[i].attn
        attn._amm_cache = (None, None)
        attn.forward = _amm_attention_forward.__get__(attn)
        modules.append(attn)
    return AMMHandle(modules)


class AMMSampler(nn.Module):
    """A DiT with AMM on inside this wrapper's own calls only.

    The model itself stays plain, so a speed run that times the same model with and without the hook (and
    a run with other hooks) measures the baseline without AMM. The modulation matrices stay cached across
    calls, as they would in a model with AMM always on.
    """

    def __init__(self, model: nn.Module, block_indices: Sequence[int] | None = None):
        super().__init__()
        self.model = model
        handle = apply_amm(model, block_indices)  # refuses a model or arrangement that cannot take AMM, now
        self.block_indices = [i for i, b in enumerate(model.blocks) if b.attn in handle.modules]
        self._caches = {i: (None, None) for i in self.block_indices}
        handle.remove()

    @contextlib.contextmanager
    def _amm_on(self):
        handle = apply_amm(self.model, self.block_indices)
        for i in self.block_indices:
            self.model.blocks[i].attn._amm_cache = self._caches[i]
        try:
            yield
        finally:
            for i in self.block_indices:
                self._caches[i] = self.model.blocks[i].attn._amm_cache
            handle.remove()

    def forward(self, *args, **kwargs):
        with self._amm_on():
            return self.model(*args, **kwargs)

    def forward_with_cfg(self, *args, **kwargs):
        with self._amm_on():
            return self.model.forward_with_cfg(*args, **kwargs)


def amm_sample_hook(model: nn.Module, block_indices: Sequence[int] | None = None,
                    num_steps: int | None = None) -> nn.Module:
    """Sample hook ``amm``: the DiT with AMM on in its official blocks, during the hook's calls only.

    AMM is training-free and the same at every step, so the sampler's step count is not needed.
    """
    if isinstance(model, EDT):
        raise PluginError("EDT has AMM built in: pick the EDT model name with or without _noAMM instead")
    return AMMSampler(model, block_indices)


amm_sample_hook.families = ("DiT",)


# ---------------------------------------------------------------------------------------------------
# Masked training and its loss pieces (edt.md §6-§7)


def min_snr_weights(alphas_cumprod, t: torch.Tensor, gamma: float = 5.0, prediction: str = "eps") -> torch.Tensor:
    """Min-SNR-gamma weight per sample: min(snr, gamma)/snr for eps prediction, min(snr, gamma) for x0.

    snr = alpha_bar / (1 - alpha_bar) from the float32 square roots, as EDT's training_losses does;
    the weight multiplies the MSE term only (the VB term is not weighted).
    """
    acp = torch.as_tensor(alphas_cumprod).detach().cpu().double()
    idx = t.detach().long().cpu()
    snr = (acp.sqrt()[idx].float() / (1 - acp).sqrt()[idx].float()) ** 2
    clipped = snr.clamp(max=gamma)
    weights = clipped / snr if prediction == "eps" else clipped
    return weights.to(t.device)


class LossSecondMomentResampler:
    """ADM's loss-aware timestep sampler (EDT's default): p_t ~ sqrt(E[loss_t^2]) over the last 10 losses.

    Uniform until every timestep holds ``history_per_term`` losses, then mixed with ``uniform_prob`` of
    the uniform law; ``sample`` returns importance weights 1/(T p_t) so the objective stays unbiased.
    Updates are all-gathered across ranks when torch.distributed runs with more than one process and
    applied directly otherwise (upstream always all-gathers, so it needs a process group).
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_timesteps, history_per_term), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        w = np.sqrt(np.mean(self.loss_history ** 2, axis=-1))
        w = w / w.sum() * (1 - self.uniform_prob)
        return w + self.uniform_prob / len(w)

    def sample(self, batch_size: int, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.weights() / self.weights().sum()
        idx = torch.multinomial(torch.from_numpy(p), batch_size, replacement=True, generator=generator)
        weights = torch.from_numpy(1 / (len(p) * p[idx.numpy()])).float()
        return idx.to(device), weights.to(device)

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sizes = [torch.zeros(1, dtype=torch.int64, device=local_ts.device) for _ in range(dist.get_world_size())]
            dist.all_gather(sizes, torch.tensor([len(local_ts)], device=local_ts.device))
            width = int(max(s.item() for s in sizes))
            ts = [torch.zeros(width, dtype=local_ts.dtype, device=local_ts.device) for _ in sizes]
            ls = [torch.zeros(width, dtype=local_losses.dtype, device=local_losses.device) for _ in sizes]
            dist.all_gather(ts, F.pad(local_ts, (0, width - len(local_ts))))
            dist.all_gather(ls, F.pad(local_losses, (0, width - len(local_losses))))
            all_ts, all_losses = [], []
            for tb, lb, n in zip(ts, ls, sizes):
                all_ts += tb[: int(n)].tolist()
                all_losses += lb[: int(n)].tolist()
            self.update_with_all_losses(all_ts, all_losses)
        else:
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())

    def update_with_all_losses(self, ts: Sequence[int], losses: Sequence[float]) -> None:
        for t, loss in zip(ts, losses):
            if self.loss_counts[t] == self.history_per_term:
                self.loss_history[t, :-1] = self.loss_history[t, 1:]  # drop the oldest
                self.loss_history[t, -1] = loss
            else:
                self.loss_history[t, self.loss_counts[t]] = loss
                self.loss_counts[t] += 1

    def state_dict(self) -> dict:
        return {"loss_history": self.loss_history.copy(), "loss_counts": self.loss_counts.copy()}

    def load_state_dict(self, state: dict) -> None:
        self.loss_history = np.array(state["loss_history"], dtype=np.float64)
        self.loss_counts = np.array(state["loss_counts"], dtype=np.int64)


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x)


def masked_training_loss(diffusion, model: nn.Module, x0: torch.Tensor, t: torch.Tensor, model_kwargs: dict,
                         weights: torch.Tensor, noise: torch.Tensor | None = None, *,
                         min_snr_gamma: float | None = 5.0, sampler: LossSecondMomentResampler | None = None,
                         generator: torch.Generator | None = None) -> dict:
    """EDT's two-pass objective (train_mask_adan.py): total = mean(w L) + mean(w L_mask).

    Both passes use the same timesteps ``t`` and importance weights ``w``; each draws its own noise
    (``noise`` is used by the plain pass only) and its own label drop. The masked pass runs the model
    with ``enable_down_mask=True``. The MSE term of both is weighted by min-SNR (``min_snr_gamma``; None
    turns it off). ``sampler``, if given, is updated with L + L_mask per sample, as upstream.
    """
    mse_weight = min_snr_weights(diffusion.alphas_cumprod, t, min_snr_gamma) if min_snr_gamma else None
    mask_kwargs = {**(model_kwargs or {}), "enable_down_mask": True}
    mask_noise = None
    if generator is not None:
        mask_kwargs["generator"] = generator
        noise = _randn_like(x0, generator) if noise is None else noise
        mask_noise = _randn_like(x0, generator)
    plain = diffusion.training_losses(model, x0, t, model_kwargs=model_kwargs, noise=noise, mse_weight=mse_weight)
    masked = diffusion.training_losses(model, x0, t, model_kwargs=mask_kwargs, noise=mask_noise,
                                       mse_weight=mse_weight)
    loss, loss_mask = (plain["loss"] * weights).mean(), (masked["loss"] * weights).mean()
    per_sample = (plain["loss"] + masked["loss"]).detach()
    if sampler is not None:
        sampler.update_with_local_losses(t, per_sample)
    return {"loss": loss + loss_mask, "loss_plain": loss.detach(), "loss_mask": loss_mask.detach(),
            "per_sample": per_sample}


class MaskedTraining:
    """Train hook ``edt-mask``: the whole objective of one micro-batch, as train_mask_adan.py forms it.

    ``loss(model, x0, model_kwargs)`` draws t from the loss-aware sampler, runs the plain and the masked
    pass with min-SNR weighting, updates the sampler and returns the dict of ``masked_training_loss``;
    the loop calls ``backward()`` on its "loss". ``state_dict`` keeps the sampler's history for resuming.
    """

    families = ("EDT",)  # the masks live in EDT's down-sampling modules

    def __init__(self, diffusion, *, min_snr_gamma: float | None = 5.0, history_per_term: int = 10,
                 uniform_prob: float = 0.001):
        self.diffusion = diffusion
        self.min_snr_gamma = min_snr_gamma
        self.sampler = LossSecondMomentResampler(diffusion.num_timesteps, history_per_term, uniform_prob)

    def loss(self, model: nn.Module, x0: torch.Tensor, model_kwargs: dict | None = None,
             generator: torch.Generator | None = None) -> dict:
        inner = getattr(model, "module", model)  # DDP / torch.compile wrappers
        inner = getattr(inner, "_orig_mod", inner)
        if not isinstance(inner, EDT):
            raise PluginError(f"the edt-mask train hook needs an EDT model, not {type(inner).__name__}")
        t, w = self.sampler.sample(len(x0), x0.device, generator=generator)
        return masked_training_loss(self.diffusion, model, x0, t, model_kwargs or {}, w,
                                    min_snr_gamma=self.min_snr_gamma, sampler=self.sampler, generator=generator)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------
# MACs (edt.md §10)



def edt_macs(config: dict) -> int:
    """Multiply-accumulates of one forward, batch 1, counted as the official ``EDT.get_flops()``.

    Counted: every Linear including the adaLN ones (run once per sample), the patch-embed conv, and
    the two attention matmuls; not counted: norms, softmax, the relative position bias, the AMM, the
    label lookup. This gives 2.667 G (S), 10.218 G (B), 53.440 G (XL as released).

    The published 2.66 and 10.20 are these counts cut short (S to two decimals, B to one: 10.2), and
    the published 51.83 is the exact count of an XL split with 12/12/4 blocks at full/half/quarter
    resolution, e.g. [6, 4, 4, 8, 6] (the released [6, 4, 4, 7, 7] has 13/11/4; edt.md §10 swaps the
    two). No single cut-off maps all four counts onto the published strings, and bench.flops needs
    the count itself for MFU, so the exact count is returned and ``dit-bench models`` rounds it.
    """
    cfg = {**{k: v.default for k, v in inspect.signature(EDT).parameters.items()}, **config}
    h, p, dims, stages = cfg["hidden_size"], cfg["patch_size"], cfg["dims"], cfg["stages_depth"]
    down = len(stages) // 2
    r = cfg["input_size"] // p
    out = cfg["in_channels"] * (2 if cfg["learn_sigma"] else 1)
    macs = r * r * p * p * cfg["in_channels"] * h  # patch embed
    macs += 256 * h + h * h  # timestep MLP
    macs += 2 * h * h + r * r * h * p * p * out  # final layer
    for s, n_blocks in enumerate(stages):
        d = dims[s]
        if s > down:
            macs += r * r * dims[s - 1] * 4 * d  # UpSample expand
            r *= 2
            macs += h * 4 * d + r * r * 2 * d * d  # ConcatLayer adaLN + cat
        tokens, hidden = r * r, int(d * cfg["mlp_ratio"])
        per_block = 6 * h * d + tokens * (4 * d * d + 2 * d * hidden) + 2 * tokens * tokens * d
        macs += n_blocks * per_block
        if s < down:
            r //= 2
            macs += h * 8 * d + r * r * 4 * d * dims[s + 1]  # DownSample adaLN + reduction
    return macs


# ---------------------------------------------------------------------------------------------------
# Checkpoint layouts (edt.md §10): the released XL code and the published XL size disagree

RELEASED_XL_LAYOUT = [6, 4, 4, 7, 7]


def infer_stages_depth(state_dict: dict) -> list[int]:
    """Stage lengths from the per-block widths (qkv input width), which change at every stage boundary."""
    widths, i = [], 0
    while f"blocks.{i}.attn.qkv.weight" in state_dict:
        widths.append(state_dict[f"blocks.{i}.attn.qkv.weight"].shape[1])
        i += 1
    if not widths:
        raise PluginError("not an EDT state dict: no blocks.{i}.attn.qkv.weight keys")
    stages = [1]
    for prev, cur in zip(widths, widths[1:]):
        if cur == prev:
            stages[-1] += 1
        else:
            stages.append(1)
    return stages


def describe_layout(stages_depth: Sequence[int]) -> str:
    """Which EDT-XL layout a stage split is: the released code's, or one of the published size's."""
    stages = list(stages_depth)
    if len(stages) == 5 and sum(stages) == 28:
        if stages == RELEASED_XL_LAYOUT:
            return f"released XL layout {stages} (13/11/4 blocks at full/half/quarter resolution)"
        if (stages[0] + stages[4], stages[1] + stages[3], stages[2]) == (12, 12, 4):
            return f"published-size XL layout {stages} (12/12/4 blocks: the paper's 708.44 M and 51.83 GFLOPs)"
    return f"layout {stages}"


def adapt_state_dict(state_dict: dict) -> tuple[dict, dict]:
    """Checkpoint hook: build the model with the checkpoint's own stage split, so both XL layouts load."""
    stages = infer_stages_depth(state_dict)
    log.info("EDT checkpoint has the %s", describe_layout(stages))
    return state_dict, {"stages_depth": stages, "depth": sum(stages)}


# ---------------------------------------------------------------------------------------------------
# Registry (edt.md §2)


def _config(hidden: int, depth: int, stages: list[int], size: str, local: bool) -> dict:
    # Stage widths d * [1, 4/3, 5/3, 4/3, 1], head_dim 52 everywhere (edt.md §2).
    widths = [hidden, hidden * 4 // 3, hidden * 5 // 3, hidden * 4 // 3, hidden]
    return dict(depth=depth, hidden_size=hidden, patch_size=2, num_heads=[w // 52 for w in widths],
                stages_depth=stages, dims=widths, size=size, local=local)


# xinwangChen/EDT: the class in models_edt.py and the factory in diffusion/__init__.py (edt.md §1-§2).
OFFICIAL_CODE = {"model": "models_edt:EDT", "diffusion": "diffusion:create_diffusion"}


def _spec(name: str, config: dict) -> ModelSpec:
    amm = "with AMM at sampling" if config["local"] else "without AMM"
    return ModelSpec(name=name, builder=EDT, config=config, family="EDT", macs=edt_macs,
                     adapt_state_dict=adapt_state_dict, description=f"EDT {config['size']}/2, {amm}",
                     official_code=OFFICIAL_CODE)


_SIZES = {"S": (312, 12, [2, 2, 2, 3, 3]), "B": (624, 12, [2, 2, 2, 3, 3]), "XL": (936, 28, RELEASED_XL_LAYOUT)}


# `dit-bench reproduce edt`: plain data read by bench/reproduce.py ("architecture"). EDT's speed claims are
# against MDTv2, which this project does not implement; what is exact and device-independent is EDT's MACs
# and parameters against DiT at each size, and the AMM's cost (it rescales attention weights: no linear
# layer, so no MACs in EDT's own get_flops()), timed on and off on the CPU.
_PAIRS = [{"model": f"EDT-{s}/2", "versus": f"DiT-{s}/2"} for s in ("S", "B", "XL")]
_PAIRS.append({"model": "EDT-S/2", "versus": "EDT-S/2", "model_config": {"amm": True}, "versus_config": {"amm": False},
               "claim": "AMM adds no MACs"})
RECIPES = {
    "tiny": {
        "kind": "architecture", "image_size": 256, "pairs": _PAIRS,
        "notes": ["The released EDT-XL/2 layout (stages_depth [6,4,4,7,7]) does not give the README's 51.83 GMACs "
                  "or the code comment's 708.44M parameters; see the consistency findings below."],
        "timing": {"batch": 1, "warmup": 1, "repeats": 3,
                   "pairs": [{"model": "EDT-S/2", "versus": "EDT-S/2", "model_config": {"amm": True},
                              "versus_config": {"amm": False}, "label": "EDT-S/2 AMM on vs off"},
                             {"model": "EDT-S/2", "versus": "DiT-S/2", "label": "EDT-S/2 vs DiT-S/2"}]},
    },
}

METHOD = Method(
    name="edt",
    title="EDT: An Efficient Diffusion Transformer Framework Inspired by Human-like Sketching",
    paper="arXiv:2410.23788",
    models=tuple(_spec(f"EDT-{size}/2{suffix}", _config(*_SIZES[size], size, local))
                 for local, suffix in ((True, ""), (False, "_noAMM")) for size in _SIZES),
    train_hooks={"edt-mask": MaskedTraining},
    sample_hooks={"amm": amm_sample_hook},
    compatible_families=("EDT", "DiT"),
    recipes=RECIPES,
)
