"""Micro-benchmarks of the pieces a DiT sampling loop is made of (pytest-benchmark).

Skipped by the default test command (pyproject's ``--benchmark-skip``); run them with
    OMP_NUM_THREADS=1 python -m pytest -p no:cacheprovider tests/benchmarks --benchmark-only
Each benchmark also checks what it times, so a fast wrong kernel cannot pass. Sizes are a scaled-down
DiT (width 128, 64 tokens) so a run takes seconds on a CPU; GMACs go into ``extra_info`` for comparisons.
"""
import pytest
import torch
from torch import nn

from bench import layers
from bench.flops import count_macs_torch, macs_to_gmacs

pytestmark = pytest.mark.benchmark_suite

BATCH, TOKENS, WIDTH, HEADS = 4, 64, 128, 4
ROUNDS = dict(rounds=20, warmup_rounds=3, iterations=1)


class AdaLNBlock(nn.Module):
    """A DiT block (adaLN-Zero modulated attention and MLP) assembled from bench.layers."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = layers.Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = layers.Mlp(width, 4 * width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(layers.modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(layers.modulate(self.norm2(x), shift_mlp, scale_mlp))


class TinyDenoiser(nn.Module):
    """Patchify -> two adaLN blocks -> final layer, conditioned on (t, y): a sampler's model call."""

    def __init__(self, size=16, patch=2, channels=4, width=WIDTH, heads=HEADS, classes=10):
        super().__init__()
        self.patch, self.out_channels = patch, 2 * channels
        self.x_embedder = layers.PatchEmbed(size, patch, channels, width)
        self.t_embedder = layers.TimestepEmbedder(width)
        self.y_embedder = layers.LabelEmbedder(classes, width, dropout_prob=0.1)
        self.blocks = nn.ModuleList([AdaLNBlock(width, heads) for _ in range(2)])
        self.final_layer = layers.FinalLayer(width, patch, self.out_channels)

    def forward(self, x, t, y):
        tokens = self.x_embedder(x)
        c = self.t_embedder(t) + self.y_embedder(y, train=False)
        for block in self.blocks:
            tokens = block(tokens, c)
        return layers.unpatchify(self.final_layer(tokens, c), self.patch, self.out_channels)


@pytest.fixture
def seeded():
    torch.manual_seed(0)


def test_dit_block_forward(benchmark, seeded):
    block = AdaLNBlock(WIDTH, HEADS).eval()
    x, c = torch.randn(BATCH, TOKENS, WIDTH), torch.randn(BATCH, WIDTH)
    benchmark.group = "dit-block"
    benchmark.extra_info["gmacs"] = macs_to_gmacs(count_macs_torch(block, x, c))
    with torch.no_grad():
        out = benchmark.pedantic(block, args=(x, c), **ROUNDS)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # The analytic per-block count of dit.md §A.1 (12 T D^2 + 2 T^2 D + 6 D^2), per sample.
    per_sample = 12 * TOKENS * WIDTH**2 + 2 * TOKENS**2 * WIDTH + 6 * WIDTH**2
    assert benchmark.extra_info["gmacs"] == pytest.approx(BATCH * per_sample / 1e9)


@pytest.mark.parametrize("mode", ["fused", "explicit"])
def test_attention(benchmark, seeded, mode):
    q, k, v = (torch.randn(BATCH, HEADS, TOKENS, WIDTH // HEADS) for _ in range(3))

    def run():
        if mode == "fused":
            return layers.attention(q, k, v)
        with layers.explicit_attention():
            return layers.attention(q, k, v)

    benchmark.group = "attention"
    out = benchmark.pedantic(run, **ROUNDS)
    with layers.explicit_attention():
        reference = layers.attention(q, k, v)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_sampler_step(benchmark, seeded):
    """One DDIM (eta=0) step with classifier-free guidance: a doubled-batch model call plus the update."""
    model = TinyDenoiser().eval()
    x = torch.randn(BATCH, 4, 16, 16)
    t = torch.full((2 * BATCH,), 500)
    y = torch.cat([torch.randint(0, 10, (BATCH,)), torch.full((BATCH,), 10)])  # cond half, then null label
    alpha_bar_t, alpha_bar_prev = torch.tensor(0.5), torch.tensor(0.6)

    def step(x):
        out = layers.cfg_forward(model, torch.cat([x, x]), t, y, cfg_scale=1.5)
        eps = out[:BATCH, :4]
        x0 = (x - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
        return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps

    benchmark.group = "sampler-step"
    benchmark.extra_info["gmacs_per_step"] = macs_to_gmacs(count_macs_torch(model, torch.cat([x, x]), t, y))
    with torch.no_grad():
        new = benchmark.pedantic(step, args=(x,), **ROUNDS)
        torch.testing.assert_close(new, step(x), rtol=0, atol=0)  # eval mode: every round computes the same
        # Guidance scale 1 is the conditional prediction alone (on the three guided channels).
        guided = layers.cfg_forward(model, torch.cat([x, x]), t, y, cfg_scale=1.0)[:BATCH, :3]
        torch.testing.assert_close(guided, model(x, t[:BATCH], y[:BATCH])[:, :3])
    assert new.shape == x.shape and torch.isfinite(new).all()
