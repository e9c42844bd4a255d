"""DiT: the Diffusion Transformer baseline (Peebles & Xie, ICCV 2023).

A latent image is cut into p x p patches, each patch becomes a token, and a stack of transformer
blocks conditioned by adaLN-Zero on (timestep + class) predicts the noise and the variance
interpolation of every patch (reference/dit.md §A). Parameter names and shapes are the official
ones (§A.4), so the released checkpoints load with strict=True; initialisation follows §A.6 and
draws random numbers in the official order, so a seeded model starts from the official weights.

The forward is split into ``embed`` / ``run_blocks`` / ``head`` so that sample hooks (for example
FasterDiffusion's encoder-feature reuse) can run a slice of the blocks on the same model object.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench.layers import (
    Attention,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    cfg_forward,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
)
from bench.plugins import Method, ModelSpec


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: (shift, scale, gate) for attention, then for the MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # Chunk order is part of the checkpoint format (dit.md §G.4).
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiT(nn.Module):
    """Class-conditional diffusion transformer over latent patches (official constructor and defaults)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        # fast-DiT's memory trick (dit.md §D.2): recompute each block in the backward pass.
        self.gradient_checkpointing = False

        # Construction order = the official one, so default nn.Linear inits consume the RNG identically.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # A frozen Parameter, not a buffer: it is counted, saved and EMA-updated like upstream (§G.3).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """dit.md §A.6; afterwards forward() returns exactly zero."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        grid = int(self.x_embedder.num_patches**0.5)
        table = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))

        # The patch conv is initialised like a Linear over its flattened (C*p*p) input.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every residual branch and the output start at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
              force_drop_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (N, C, H, W) -> tokens (N, T, D) with positions; (t, y) -> conditioning c (N, D)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return tokens, c

    def run_blocks(self, tokens: torch.Tensor, c: torch.Tensor,
                   start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Blocks[start:stop] in order."""
        for block in self.blocks[start:stop]:
            if self.gradient_checkpointing:
                tokens = checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        return tokens

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final adaLN layer and unpatchify: (N, T, D) -> (N, out_channels, H, W)."""
        return unpatchify(self.final_layer(tokens, c), self.patch_size, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        tokens, c = self.embed(x, t, y, force_drop_ids)
        return self.head(self.run_blocks(tokens, c), c)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance in one batched call, with the official 3-channel quirk (§A.7)."""
        return cfg_forward(self.forward, x, t, y, cfg_scale)


_DEFAULTS = {name: p.default for name, p in inspect.signature(DiT.__init__).parameters.items() if name != "self"}


def dit_macs(kwargs: dict) -> int:
    """Multiply-accumulates of one forward at batch 1, the analytic count of dit.md §A.1.

    Counts the matmuls and the patch conv only (no norms, activations or softmax), so it sits
    slightly below fvcore's count (XL/2@256: 118.62 vs 118.69 GMAC). The paper's "Gflops" are MACs.
    """
    kw = {**_DEFAULTS, **kwargs}
    d, p, c = kw["hidden_size"], kw["patch_size"], kw["in_channels"]
    d_mlp = int(d * kw["mlp_ratio"])
    c_out = 2 * c if kw["learn_sigma"] else c
    tokens = (kw["input_size"] // p) ** 2
    freq = 256  # TimestepEmbedder's frequency_embedding_size
    block = (
        tokens * (3 * d * d + d * d)  # qkv, output projection
        + tokens * 2 * d * d_mlp  # fc1, fc2
        + 2 * tokens * tokens * d  # q k^T and attention-weighted v
        + 6 * d * d  # adaLN modulation (per sample, not per token)
    )
    patch_embed = tokens * c * p * p * d
    timestep_mlp = freq * d + d * d
    final = 2 * d * d + tokens * d * p * p * c_out
    return kw["depth"] * block + patch_embed + timestep_mlp + final


# facebookresearch/DiT: the class in models.py and the factory in diffusion/__init__.py (dit.md §A, §B).
OFFICIAL_CODE = {"model": "models:DiT", "diffusion": "diffusion:create_diffusion"}

# The official zoo (dit.md §A.1): size -> (depth, hidden_size, num_heads), each with patch 2, 4 and 8.
_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def _zoo() -> tuple[ModelSpec, ...]:
    specs = []
    for size, (depth, hidden, heads) in _SIZES.items():
        for patch in (2, 4, 8):
            specs.append(ModelSpec(
                name=f"DiT-{size}/{patch}",
                builder=DiT,
                config={"depth": depth, "hidden_size": hidden, "patch_size": patch, "num_heads": heads},
                family="DiT",
                default_input_size=32,
                macs=dit_macs,
                description=f"depth {depth}, hidden {hidden}, {heads} heads, patch {patch}",
                official_code=OFFICIAL_CODE,
            ))
    return tuple(specs)


# `dit-bench reproduce dit`: plain data read by bench/reproduce.py.
# paper: Table 4's headline row, DiT-XL/2 at 256 px, 250 DDPM steps, CFG 1.5, FID-50k in the ADM protocol.
# tiny: the embedded default's proxy DiT on 16x16 digits in pixel space. "DiT-T/4" keeps DiT-XL's depth
# (28 blocks, so FasterDiffusion's 18/28 encoder split exists) at a width a CPU trains in minutes;
# its weights ship in bench/proxy_assets and `dit-bench proxy-assets` re-trains them with "train".
RECIPES = {
    "paper": {
        "kind": "sampling", "model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "vae": "ema",
        "reference": "adm-ref-imagenet256", "evaluator": "adm-tf",
        "sampling": {"sampler": "ddpm", "steps": "250", "cfg_scale": 1.5, "num_samples": 50_000,
                     "labels": "random", "precision": "tf32", "batch_size": 32},
        "speed": {"protocol": "paper", "steps": 250, "batches": [8], "cfg_scale": 4.0},
        "assets": ["DiT-XL-2-256", "sd-vae-ft-ema", "adm-ref-imagenet256", "adm-inception-graph"],
    },
    "tiny": {
        "kind": "sampling", "model": "DiT-T/4", "checkpoint": "proxy:dit-t4-digits.pt",
        "image_size": 16, "num_classes": 10, "vae": "identity",
        "reference": "proxy:digits-heldout", "evaluator": "proxy",
        "sampling": {"sampler": "ddim", "steps": "ddim50", "cfg_scale": 1.5, "num_samples": 250,
                     "labels": "balanced", "precision": "fp32", "batch_size": 125},
        "speed": {"protocol": "paper", "steps": 50, "batches": [8, 64], "cfg_scale": 1.5},
        "proxy_models": {
            "DiT-T/4": {
                "base": "DiT-S/4", "config": {"depth": 28, "hidden_size": 64, "patch_size": 4, "num_heads": 4},
                "description": "proxy: depth 28, hidden 64, 4 heads, patch 4 (16 tokens at 16 px)",
                "checkpoint": "dit-t4-digits.pt",
                "train": {"global_batch_size": 64, "steps": 4000, "lr": 1e-3, "ema_decay": 0.995, "seed": 0},
            },
            # SpeeDiT's tiny preset trains this one from scratch in every run (nothing shipped).
            "DiT-T6/4": {
                "base": "DiT-S/4", "config": {"depth": 6, "hidden_size": 64, "patch_size": 4, "num_heads": 4},
                "description": "proxy: depth 6, hidden 64, 4 heads, patch 4 (16 tokens at 16 px)",
            },
        },
    },
}

METHOD = Method(
    name="dit",
    title="DiT (baseline)",
    paper="Peebles & Xie, Scalable Diffusion Models with Transformers, ICCV 2023",
    models=_zoo(),
    recipes=RECIPES,
)
