"""The DiT model family as the official code defines it (reference/dit.md §A, §G).

What is checked: the 12-model zoo has exactly the official parameter counts and key layout (so
released checkpoints load strictly), the analytic MAC count equals dit.md's table, the init is
adaLN-Zero, and the forward equals an independent re-derivation of §A.3 written below with plain
tensor ops, including the quirks (float32 timestep features, pos-embed channel order, chunk order,
3-channel CFG).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import methods.dit as dit_module
from bench import plugins
from bench.layers import explicit_attention
from methods.dit import METHOD, DiT, dit_macs

# dit.md §A.1 (computed from the official classes): params@256, trainable@256, params@512.
PARAMS = {
    "DiT-S/2": (32_963_360, 32_865_056, 33_258_272),
    "DiT-S/4": (32_945_024, 32_920_448, 33_018_752),
    "DiT-S/8": (33_148_160, 33_142_016, 33_166_592),
    "DiT-B/2": (130_512_416, 130_315_808, 131_102_240),
    "DiT-B/4": (130_475_648, 130_426_496, 130_623_104),
    "DiT-B/8": (130_881_536, 130_869_248, 130_918_400),
    "DiT-L/2": (458_102_816, 457_840_672, 458_889_248),
    "DiT-L/4": (458_053_760, 457_988_224, 458_250_368),
    "DiT-L/8": (458_594_816, 458_578_432, 458_643_968),
    "DiT-XL/2": (675_129_632, 674_834_720, 676_014_368),
    "DiT-XL/4": (675_074_432, 675_000_704, 675_295_616),
    "DiT-XL/8": (675_683_072, 675_664_640, 675_738_368),
}
# dit.md §A.1 "GMACs analytic" at 256 and 512.
GMACS = {
    "DiT-S/2": (6.06, 31.44), "DiT-S/4": (1.41, 6.07), "DiT-S/8": (0.36, 1.43),
    "DiT-B/2": (23.01, 106.38), "DiT-B/4": (5.57, 23.03), "DiT-B/8": (1.42, 5.59),
    "DiT-L/2": (80.70, 360.98), "DiT-L/4": (19.70, 80.74), "DiT-L/8": (5.01, 19.73),
    "DiT-XL/2": (118.62, 524.54), "DiT-XL/4": (29.04, 118.66), "DiT-XL/8": (7.39, 29.09),
}
TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
TINY_B = dict(input_size=16, patch_size=4, hidden_size=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7,
              learn_sigma=False)
SPECS = {spec.name: spec for spec in METHOD.models}


def randomize(model: DiT, seed: int = 0, std: float = 0.1) -> DiT:
    """Replace every parameter (adaLN and output layers are zero at init) by non-trivial random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * std)
    return model


def inputs(model: DiT, n: int = 3, seed: int = 1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    size = model.x_embedder.img_size
    x = torch.randn(n, model.in_channels, size, size, generator=gen, dtype=dtype)
    t = torch.tensor([0.0, 17.5, 999.0, 500.0, 3.0, 250.0][:n])  # fractional t is allowed (§A.3)
    y = torch.randint(0, model.y_embedder.num_classes, (n,), generator=gen)
    return x, t, y


def meta_build(name: str, image_size: int) -> DiT:
    with torch.device("meta"):
        return SPECS[name].build(input_size=image_size // 8)


# ------------------------------------------------------------------------------------------------
# The zoo: names, parameter counts, key layout, MACs.


def test_registry_has_the_twelve_official_names():
    assert [s.name for s in METHOD.models] == [f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)]
    assert plugins.get_model("DiT-XL/2").config == {"depth": 28, "hidden_size": 1152, "patch_size": 2, "num_heads": 16}
    assert all(s.family == "DiT" and s.builder is DiT and s.default_input_size == 32 for s in METHOD.models)
    assert METHOD.name == "dit" and plugins.get_method("dit") is not None


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_the_official_classes(name):
    params256, trainable256, params512 = PARAMS[name]
    for image_size, expected in ((256, params256), (512, params512)):
        model = meta_build(name, image_size)
        tokens, hidden = model.pos_embed.shape[1:]
        assert sum(p.numel() for p in model.parameters()) == expected
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == expected - tokens * hidden  # only pos_embed is frozen
        if image_size == 256:
            assert trainable == trainable256


def official_layout(depth, hidden, tokens, in_ch=4, patch=2, classes=1000, mlp=None, out_ch=8):
    """dit.md §A.4 in state-dict order."""
    mlp = mlp or 4 * hidden
    keys = [
        ("pos_embed", (1, tokens, hidden)),
        ("x_embedder.proj.weight", (hidden, in_ch, patch, patch)), ("x_embedder.proj.bias", (hidden,)),
        ("t_embedder.mlp.0.weight", (hidden, 256)), ("t_embedder.mlp.0.bias", (hidden,)),
        ("t_embedder.mlp.2.weight", (hidden, hidden)), ("t_embedder.mlp.2.bias", (hidden,)),
        ("y_embedder.embedding_table.weight", (classes + 1, hidden)),
    ]
    for i in range(depth):
        keys += [
            (f"blocks.{i}.attn.qkv.weight", (3 * hidden, hidden)), (f"blocks.{i}.attn.qkv.bias", (3 * hidden,)),
            (f"blocks.{i}.attn.proj.weight", (hidden, hidden)), (f"blocks.{i}.attn.proj.bias", (hidden,)),
            (f"blocks.{i}.mlp.fc1.weight", (mlp, hidden)), (f"blocks.{i}.mlp.fc1.bias", (mlp,)),
            (f"blocks.{i}.mlp.fc2.weight", (hidden, mlp)), (f"blocks.{i}.mlp.fc2.bias", (hidden,)),
            (f"blocks.{i}.adaLN_modulation.1.weight", (6 * hidden, hidden)),
            (f"blocks.{i}.adaLN_modulation.1.bias", (6 * hidden,)),
        ]
    keys += [
        ("final_layer.linear.weight", (patch * patch * out_ch, hidden)),
        ("final_layer.linear.bias", (patch * patch * out_ch,)),
        ("final_layer.adaLN_modulation.1.weight", (2 * hidden, hidden)),
        ("final_layer.adaLN_modulation.1.bias", (2 * hidden,)),
    ]
    return keys


def test_state_dict_keys_and_shapes_are_the_official_ones():
    model = meta_build("DiT-XL/2", 256)
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert layout == official_layout(depth=28, hidden=1152, tokens=256)
    assert len(layout) == 12 + 10 * 28 and layout[0][0] == "pos_embed"
    assert not model.pos_embed.requires_grad and not list(model.buffers())


def test_tiny_configs_follow_the_same_layout():
    model = DiT(**TINY_B)  # learn_sigma False -> out_channels = in_channels; mlp_ratio 2 -> Dm = 96
    layout = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert layout == official_layout(depth=2, hidden=48, tokens=16, patch=4, classes=7, mlp=96, out_ch=4)
    assert model.out_channels == 4 and DiT(**TINY).out_channels == 8


@pytest.mark.parametrize("name", list(GMACS))
def test_analytic_macs_equal_the_reference_table(name):
    for image_size, expected in zip((256, 512), GMACS[name]):
        kwargs = SPECS[name].kwargs(input_size=image_size // 8)
        assert round(SPECS[name].macs(kwargs) / 1e9, 2) == expected
    assert dit_macs(SPECS["DiT-XL/2"].kwargs()) == 118_621_421_568


@pytest.mark.parametrize("build", [
    lambda: meta_build("DiT-XL/2", 256),
    lambda: meta_build("DiT-S/8", 512),
    lambda: DiT(**TINY),
    lambda: DiT(**TINY_B),
], ids=["XL/2@256", "S/8@512", "tiny", "tiny-mlp2-no-sigma"])
def test_analytic_macs_equal_counted_matmuls(build):
    # torch's counter sees every matmul/conv when attention is explicit; 1 MAC = 2 of its FLOPs.
    model = build()
    device = model.pos_embed.device
    size = model.x_embedder.img_size
    x = torch.zeros(1, model.in_channels, size, size, device=device)
    t, y = torch.tensor([10], device=device), torch.tensor([1], device=device)
    with explicit_attention(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    kwargs = {k: getattr(model, k) for k in ("patch_size", "in_channels", "learn_sigma")}
    kwargs.update(input_size=size, hidden_size=model.pos_embed.shape[-1], depth=len(model.blocks),
                  mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.pos_embed.shape[-1])
    assert counter.get_total_flops() == 2 * dit_macs(kwargs)


# ------------------------------------------------------------------------------------------------
# Initialisation (§A.5, §A.6).


def sincos_table(dim: int, grid: int) -> np.ndarray:
    """§A.5 restated: token r*G+c; first half encodes the column c, second the row r; sin before cos."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    table = np.zeros((grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            table[r * grid + c] = np.concatenate([np.sin(c * omega), np.cos(c * omega),
                                                  np.sin(r * omega), np.cos(r * omega)])
    return table


def test_init_is_adaln_zero_and_outputs_exactly_zero():
    torch.manual_seed(0)
    model = DiT(**TINY)
    x, t, y = inputs(model, dtype=torch.float32)
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8) and torch.count_nonzero(out) == 0
    zeros = [model.final_layer.linear.weight, model.final_layer.linear.bias,
             model.final_layer.adaLN_modulation[1].weight, model.final_layer.adaLN_modulation[1].bias]
    for block in model.blocks:
        zeros += [block.adaLN_modulation[1].weight, block.adaLN_modulation[1].bias]
    assert all(torch.count_nonzero(p) == 0 for p in zeros)
    expected = torch.from_numpy(sincos_table(64, 4)).float().unsqueeze(0)
    assert torch.equal(model.pos_embed.data, expected)


def test_init_distributions_follow_the_official_recipe():
    config = dict(input_size=16, patch_size=2, hidden_size=256, depth=1, num_heads=4, num_classes=1000)
    torch.manual_seed(0)
    model = DiT(**config)
    d = 256
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (d + 3 * d))  # one (3D, D) xavier matrix, not three (D, D) ones
    assert 0.99 * bound < qkv.abs().max() <= bound
    conv = model.x_embedder.proj.weight
    bound = math.sqrt(6 / (d + 4 * 2 * 2))  # xavier on the (D, C*p*p) view, not on the 4-D conv
    assert 0.9 * bound < conv.abs().max() <= bound
    for p in (model.y_embedder.embedding_table.weight, model.t_embedder.mlp[0].weight, model.t_embedder.mlp[2].weight):
        assert abs(p.std().item() - 0.02) < 0.001 and abs(p.mean().item()) < 0.001
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    torch.manual_seed(0)
    again = DiT(**config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# ------------------------------------------------------------------------------------------------
# Forward semantics.


def reference_forward(sd: dict, x, t, y, *, patch, heads, out_ch, null_drop=None):
    """dit.md §A.3 restated with plain tensor ops on a state dict (float64, explicit softmax)."""
    n, c_in, h, w = x.shape
    d = sd["pos_embed"].shape[-1]
    gh, gw = h // patch, w // patch
    # 1. patchify: conv with kernel = stride = p, tokens row-major.
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.reshape(n, d, gh * gw).transpose(1, 2) + sd["pos_embed"]
    # 2. timestep features in float32, cos first, then the MLP in the model dtype.
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(x.dtype)
    t_emb = F.linear(F.silu(F.linear(t_freq, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    # 3-4. label row (null row = num_classes for dropped labels), c = t + y.
    table = sd["y_embedder.embedding_table.weight"]
    if null_drop is not None:
        y = torch.where(null_drop.bool(), table.shape[0] - 1, y)
    c = t_emb + table[y]
    silu_c = F.silu(c)

    def ln(z):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-6)

    def mod(z, shift, scale):
        return z * (1 + scale[:, None]) + shift[:, None]

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hd = d // heads
    for i in range(depth):
        p = f"blocks.{i}."
        m = F.linear(silu_c, sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = (m[:, j * d:(j + 1) * d] for j in range(6))
        a = mod(ln(tokens), sh_a, sc_a)
        qkv = F.linear(a, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = (qkv[..., j * d:(j + 1) * d].reshape(n, -1, heads, hd).transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        att = F.linear(att.transpose(1, 2).reshape(n, -1, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        tokens = tokens + g_a[:, None] * att
        b = mod(ln(tokens), sh_m, sc_m)
        b = F.linear(F.gelu(F.linear(b, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        tokens = tokens + g_m[:, None] * b
    m = F.linear(silu_c, sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    out = F.linear(mod(ln(tokens), m[:, :d], m[:, d:]), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    # 7. unpatchify: inside a token, channel fastest, then column offset, then row offset.
    img = torch.zeros(n, out_ch, h, w, dtype=x.dtype)
    for r in range(gh):
        for col in range(gw):
            patch_px = out[:, r * gw + col].reshape(n, patch, patch, out_ch)  # (row offset, col offset, channel)
            img[:, :, r * patch:(r + 1) * patch, col * patch:(col + 1) * patch] = patch_px.permute(0, 3, 1, 2)
    return img


@pytest.mark.parametrize("config", [TINY, TINY_B], ids=["tiny", "tiny-mlp2-no-sigma"])
def test_forward_equals_an_independent_reference(config):
    model = randomize(DiT(**config).double()).eval()
    x, t, y = inputs(model, n=4)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(sd, x, t, y, patch=model.patch_size, heads=model.num_heads, out_ch=model.out_channels)
        drop = torch.tensor([1, 0, 1, 0])
        out_drop = model(x, t, y, force_drop_ids=drop)
        ref_drop = reference_forward(sd, x, t, y, patch=model.patch_size, heads=model.num_heads,
                                     out_ch=model.out_channels, null_drop=drop)
    assert out.abs().max() > 0.1  # the weights are not trivial
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(out_drop, ref_drop, rtol=0, atol=1e-10)


def test_float64_and_float32_agree():
    model32 = randomize(DiT(**TINY)).eval()
    model64 = randomize(DiT(**TINY)).double().eval()
    x, t, y = inputs(model64)
    with torch.no_grad():
        out64 = model64(x, t, y)
        out32 = model32(x.float(), t, y)
    assert out64.dtype == torch.float64 and out32.dtype == torch.float32
    rel = (out64 - out32.double()).abs().max() / out64.abs().max()
    assert 0 < rel < 1e-5


def test_forward_with_cfg_guides_three_channels_and_ignores_second_half_of_x():
    model = randomize(DiT(**TINY).double()).eval()
    x, t, _ = inputs(model, n=4)
    t = torch.cat([t[:2], t[:2]])
    y = torch.tensor([3, 7, 10, 10])  # second half = null class (index num_classes)
    scale = 4.0
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, scale)
        plain = model(torch.cat([x[:2], x[:2]]), t, y)
        garbage = torch.cat([x[:2], torch.randn_like(x[2:]) * 100])
        out_garbage = model.forward_with_cfg(garbage, t, y, scale)
    cond, uncond = plain[:2], plain[2:]
    guided = uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3])
    expected = torch.cat([torch.cat([guided, cond[:, 3:]], 1), torch.cat([guided, uncond[:, 3:]], 1)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.equal(out, out_garbage)
    standard = uncond[:, 3] + scale * (cond[:, 3] - uncond[:, 3])
    assert not torch.allclose(out[:2, 3], standard)  # eps channel 3 is left unguided (the quirk)


def label_part(model: DiT, y, **kwargs):
    """The label embedding inside c, recovered as c minus the timestep embedding."""
    x = torch.zeros(len(y), model.in_channels, 8, 8, dtype=torch.float64)
    t = torch.full((len(y),), 5.0)
    with torch.no_grad():
        _, c = model.embed(x, t, y, **kwargs)
        return c - model.t_embedder(t)


def test_label_dropout_only_in_training_and_force_drop_in_eval():
    model = DiT(**{**TINY, "class_dropout_prob": 0.5}).double()
    table = model.y_embedder.embedding_table.weight.detach()
    assert table.shape[0] == 11  # null row at index num_classes = 10
    y = torch.arange(64) % 10
    torch.manual_seed(0)
    model.train()
    got = label_part(model, y)
    dropped = torch.tensor([torch.allclose(g, table[10], atol=1e-12) for g in got])
    kept = torch.tensor([torch.allclose(g, table[yi], atol=1e-12) for g, yi in zip(got, y)])
    assert torch.all(dropped ^ kept) and 10 < dropped.sum() < 54
    model.eval()
    torch.testing.assert_close(label_part(model, y), table[y], rtol=0, atol=1e-12)
    force = (torch.arange(64) % 3 == 0).long()
    expected = torch.where(force[:, None].bool(), table[10], table[y])
    torch.testing.assert_close(label_part(model, y, force_drop_ids=force), expected, rtol=0, atol=1e-12)


def test_no_null_row_without_label_dropout():
    model = DiT(**{**TINY, "class_dropout_prob": 0.0}).double().train()
    table = model.y_embedder.embedding_table.weight.detach()
    assert table.shape == (10, 64)
    y = torch.arange(10)
    torch.testing.assert_close(label_part(model, y), table[y], rtol=0, atol=1e-12)  # no dropout even in train


@pytest.mark.parametrize("config", [TINY, TINY_B], ids=["tiny", "tiny-mlp2-no-sigma"])
def test_tiny_configs_build_and_run(config):
    model = randomize(DiT(**config)).eval()
    x, t, y = inputs(model, dtype=torch.float32)
    out = model(x, t, y)
    size = config["input_size"]
    assert out.shape == (3, model.out_channels, size, size) and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        model(torch.zeros(1, model.in_channels, size * 2, size * 2), t[:1], y[:1])


def test_gradient_checkpointing_gives_identical_outputs_and_gradients(monkeypatch):
    model = randomize(DiT(**TINY).double()).eval()
    x, t, y = inputs(model)

    def run():
        model.zero_grad()
        out = model(x, t, y)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    out_plain, grads_plain = run()
    calls = []
    real = dit_module.checkpoint
    monkeypatch.setattr(dit_module, "checkpoint", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    model.gradient_checkpointing = True
    out_ckpt, grads_ckpt = run()
    assert calls == [{"use_reentrant": False}] * len(model.blocks)
    assert torch.equal(out_plain, out_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(grads_plain, grads_ckpt))
    assert all(g.abs().sum() > 0 for g in grads_plain)


def test_embed_blocks_head_decomposition_equals_forward():
    model = randomize(DiT(**{**TINY, "depth": 3}).double()).eval()
    x, t, y = inputs(model)
    with torch.no_grad():
        tokens, c = model.embed(x, t, y)
        assert torch.equal(model.run_blocks(tokens, c, 1, 1), tokens)
        h = model.run_blocks(tokens, c, 0, 1)
        h = model.run_blocks(h, c, 1, None)
        assert torch.equal(model.head(h, c), model(x, t, y))
        assert tokens.shape == (3, 16, 64) and c.shape == (3, 64)
