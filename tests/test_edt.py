"""EDT (reference/edt.md): the model's numbers, its checkpoint layout, AMM, and the masked training.

Tiny models keep this file fast: width 48 -> 64 -> 80 -> 64 -> 48 with head_dim 16, a 16x16 latent and
patch 2, so the stages run on 8x8, 4x4, 2x2, 4x4 and 8x8 tokens.
"""
import argparse
import math

import numpy as np
import pytest
import torch
from torch import nn

from bench import checkpoints, layers, plugins
from bench.flops import count_macs_torch
from methods import edt
from tests.support.goldens import fingerprint, golden_inputs

TINY = dict(input_size=16, hidden_size=48, depth=12, num_heads=[3, 4, 5, 4, 3], stages_depth=[2, 2, 2, 3, 3],
            dims=[48, 64, 80, 64, 48], num_classes=10, size="S")
TINY_XL = dict(TINY, depth=28, stages_depth=[6, 4, 4, 7, 7], size="XL")


def randomised(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """Random weights everywhere (the official init zeroes the output), frozen sin-cos tables kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny(seed: int = 0, **over) -> edt.EDT:
    torch.manual_seed(seed)
    return randomised(edt.EDT(**{**TINY, **over}), seed)


def inputs(n: int = 4, side: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, side, side, generator=gen), torch.tensor([0, 250, 500, 999][:n]),
            torch.tensor([1, 3, 9, 10][:n]))


# --- parameters and MACs (edt.md §10) ---------------------------------------------------------------

@pytest.mark.parametrize("name, total, trainable", [
    ("EDT-S/2", 38_550_458, 38_329_146),
    ("EDT-B/2", 152_704_724, 152_262_100),
    ("EDT-XL/2", 699_187_034, 698_523_098),
    ("EDT-XL/2_noAMM", 699_187_034, 698_523_098),
])
def test_parameter_counts_match_the_official_models(name, total, trainable):
    spec = plugins.get_model(name)
    with torch.device("meta"):
        model = spec.build()
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_published_xl_size_is_a_layout_with_13_11_4_blocks_per_resolution():
    spec = plugins.get_model("EDT-XL/2")
    with torch.device("meta"):
        model = spec.build(stages_depth=[6, 4, 4, 8, 6])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(trainable / 1e6, 2) == 708.44  # the code comment's number (edt.md §10)


@pytest.mark.parametrize("name, macs, published", [
    ("EDT-S/2", 2_667_442_752, "2.66"),
    ("EDT-B/2", 10_217_855_232, "10.2"),
    ("EDT-XL/2", 53_439_686_976, None),
])
def test_macs_are_the_official_get_flops_count(name, macs, published):
    spec = plugins.get_model(name)
    assert spec.macs(spec.kwargs()) == macs
    assert spec.macs(spec.kwargs()) == plugins.get_model(name + "_noAMM").macs(spec.kwargs())
    if published:  # the published figures are this count cut short (S: 2 decimals, B: 1)
        digits = len(published.split(".")[1])
        assert f"{math.floor(macs / 1e9 * 10 ** digits) / 10 ** digits:.{digits}f}" == published


@pytest.mark.parametrize("layout", [[6, 4, 4, 8, 6], [5, 5, 4, 7, 7], [5, 4, 4, 8, 7], [6, 5, 4, 7, 6]])
def test_published_xl_gflops_come_from_the_other_layouts(layout):
    spec = plugins.get_model("EDT-XL/2")
    assert f"{spec.macs(spec.kwargs(stages_depth=layout)) / 1e9:.2f}" == "51.83"


@pytest.mark.parametrize("local", [True, False])
def test_analytic_macs_equal_a_flop_counter_on_a_tiny_model(local):
    model = edt.EDT(**TINY, local=local).eval()
    x, t, y = inputs(1)
    assert count_macs_torch(model, x, t, y) == edt.edt_macs(TINY) == 16_950_528


# --- parity with the official class ----------------------------------------------------------------

# Fingerprints of the official models_edt.EDT in float64 (sinusoid cast to float64 after its float32
# computation) on TINY with ``seeded_state(model, 7)`` and ``golden_inputs()``: [sum, sum |.|,
# out[0, :, 3, 5], out[3, :, 7, 0]]. Recorded from xinwangChen/EDT at 15faf9c.
GOLDEN = {
    ("amm", "plain"): [-661.9652877866, 2348.5226325957, -0.5205374098, -0.0201166388, -0.5880497986, -0.1853552285,
                       0.0535264266, -0.4326028007, -0.4390654715, -0.1676825256, 0.2407607463, 0.680070383,
                       -0.4560869602, -0.7606590054, -0.4021776363, -0.5481835045, -0.2691020739, -0.4663392055],
    ("amm", "cfg"): [-621.8051097449, 2349.6179070014, -0.4871407648, 0.0165655942, -0.6213793614, -0.1853552285,
                     0.0535264266, -0.4326028007, -0.4390654715, -0.1676825256, 0.1523897546, 0.5966520829,
                     -0.3922761744, -0.8525644151, -0.4721142655, -0.6331241902, -0.3021859823, -0.5021452048],
    ("noamm", "plain"): [-662.3187942871, 2348.486999041, -0.5209533635, -0.020534022, -0.5881251465, -0.1852032901,
                         0.0532523067, -0.4326618644, -0.4386765301, -0.167923632, 0.2405475394, 0.6803223925,
                         -0.4560534538, -0.7607845254, -0.4021767046, -0.5482235614, -0.2692002299, -0.4661701338],
    ("noamm", "cfg"): [-622.082388863, 2349.4500146721, -0.4877728463, 0.0166223897, -0.6219513941, -0.1852032901,
                       0.0532523067, -0.4326618644, -0.4386765301, -0.167923632, 0.1525994445, 0.5965139586,
                       -0.3924390087, -0.8526902878, -0.4720999905, -0.6332592948, -0.3022587878, -0.5019906322],
}


def seeded_state(model: nn.Module, seed: int, std: float = 0.05) -> dict:
    """float64 weights drawn key by key in sorted order (frozen sin-cos tables kept)."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key in sorted(state):
        if "pos_embed" not in key:
            state[key] = torch.randn(state[key].shape, generator=gen, dtype=torch.float64) * std
    return state


@pytest.mark.parametrize("amm", ["amm", "noamm"])
@pytest.mark.parametrize("call", ["plain", "cfg"])
@pytest.mark.parametrize("dtype, atol, sum_atol", [(torch.float64, 1e-9, 1e-7), (torch.float32, 5e-5, 2e-3)])
def test_outputs_equal_the_official_model(amm, call, dtype, atol, sum_atol):
    model = edt.EDT(**TINY, local=amm == "amm").double()
    model.load_state_dict(seeded_state(model, 7))
    model = model.to(dtype).eval()
    x, t, y = golden_inputs()
    with torch.no_grad():
        out = model(x.to(dtype), t, y) if call == "plain" else model.forward_with_cfg(x.to(dtype), t, y, 4.0)
    got, want = fingerprint(out), torch.tensor(GOLDEN[amm, call], dtype=torch.float64)
    assert torch.allclose(got[:2], want[:2], atol=sum_atol, rtol=0)
    assert torch.allclose(got[2:], want[2:], atol=atol, rtol=0)


# --- checkpoint layout (edt.md §4) --------------------------------------------------------------------

def official_keys(cfg: dict) -> dict[str, tuple]:
    """The official state-dict keys and shapes, written out from the fact sheet's table."""
    h, dims, heads, stages = cfg["hidden_size"], cfg["dims"], cfg["num_heads"], cfg["stages_depth"]
    grid = cfg["input_size"] // 2
    res = [grid, grid // 2, grid // 4, grid // 2, grid]
    keys = {"pos_embed": (1, grid * grid, h), "x_embedder.proj.weight": (h, 4, 2, 2), "x_embedder.proj.bias": (h,),
            "t_embedder.mlp.0.weight": (h, 256), "t_embedder.mlp.0.bias": (h,), "t_embedder.mlp.2.weight": (h, h),
            "t_embedder.mlp.2.bias": (h,), "y_embedder.embedding_table.weight": (cfg["num_classes"] + 1, h),
            "final_layer.linear.weight": (32, h), "final_layer.linear.bias": (32,),
            "final_layer.adaLN_modulation.1.weight": (2 * h, h), "final_layer.adaLN_modulation.1.bias": (2 * h,)}
    i = 0
    for s, n in enumerate(stages):
        d, r = dims[s], res[s]
        for _ in range(n):
            b = f"blocks.{i}."
            keys.update({b + "attn.rel_pos_bias.relative_position_bias_table": ((2 * r - 1) ** 2, heads[s]),
                         b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
                         b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                         b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                         b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
                         b + "adaLN_modulation.1.weight": (6 * d, h), b + "adaLN_modulation.1.bias": (6 * d,)})
            i += 1
    for j in range(2):
        keys.update({f"down_blocks.{j}.pos_embed": (1, res[j + 1] ** 2, dims[j + 1]),
                     f"down_blocks.{j}.adaLN_modulation.1.weight": (8 * dims[j], h),
                     f"down_blocks.{j}.adaLN_modulation.1.bias": (8 * dims[j],),
                     f"down_blocks.{j}.reduction.weight": (dims[j + 1], 4 * dims[j]),
                     f"up_blocks.{j}.expand.weight": (4 * dims[3 + j], dims[2 + j]),
                     f"concat_blocks.{j}.pos_embed": (1, res[3 + j] ** 2, dims[3 + j]),
                     f"concat_blocks.{j}.adaLN_modulation.1.weight": (4 * dims[3 + j], h),
                     f"concat_blocks.{j}.adaLN_modulation.1.bias": (4 * dims[3 + j],),
                     f"concat_blocks.{j}.cat.weight": (dims[3 + j], 2 * dims[3 + j]),
                     f"concat_blocks.{j}.cat.bias": (dims[3 + j],)})
    return keys


@pytest.mark.parametrize("cfg", [TINY, TINY_XL])
def test_state_dict_has_the_official_keys_and_shapes(cfg):
    with torch.device("meta"):
        model = edt.EDT(**cfg)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_keys(cfg)
    assert len(got) == 11 * cfg["depth"] + 32


def test_a_saved_checkpoint_loads_strictly_into_both_amm_variants(tmp_path):
    source = tiny(3)
    path = tmp_path / "edt.pt"
    torch.save(source.state_dict(), path)
    state = torch.load(path, weights_only=True)
    x, t, y = inputs()
    for local in (True, False):
        model = edt.EDT(**TINY, local=local)
        model.load_state_dict(state, strict=True)
        model.train()
        torch.manual_seed(0)
        trained = model(x, t, y)
        source.train()
        torch.manual_seed(0)
        assert torch.equal(trained, source(x, t, y))  # no AMM in training: identical to the source


def test_checkpoint_hook_infers_the_xl_layout_from_block_widths():
    spec = plugins.get_model("EDT-XL/2")
    small = dict(hidden_size=48, num_heads=[3, 4, 5, 4, 3], dims=[48, 64, 80, 64, 48], input_size=16, num_classes=10)
    for layout, name in (([6, 4, 4, 7, 7], "released"), ([6, 4, 4, 8, 6], "published-size")):
        saved = spec.build(**small, stages_depth=layout)
        state, overrides = spec.adapt_state_dict(saved.state_dict())
        assert overrides == {"stages_depth": layout, "depth": 28}
        assert edt.describe_layout(layout).startswith(name)
        model = spec.build(**small, **overrides)
        model.load_state_dict(state, strict=True)
        assert [len(list(model.blocks)), model.stages_depth] == [28, layout]


def test_loader_builds_the_published_size_layout_from_a_training_checkpoint(tmp_path):
    spec = plugins.get_model("EDT-XL/2")
    small = {"hidden_size": 48, "num_heads": [3, 4, 5, 4, 3], "dims": [48, 64, 80, 64, 48], "input_size": 16,
             "num_classes": 10}
    ema = randomised(spec.build(**small, stages_depth=[5, 5, 4, 7, 7]), 2)
    path = tmp_path / "0400000.pt"  # train_mask_adan.py's layout: {model, ema, opt, args}
    torch.save({"model": ema.state_dict(), "ema": ema.state_dict(), "opt": {},
                "args": argparse.Namespace(model="EDT-XL/2")}, path)
    model, info = checkpoints.load_model(spec, path, **small)
    assert info["constructor"]["stages_depth"] == [5, 5, 4, 7, 7] and not model.training
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), ema.eval()(x, t, y))


def test_checkpoint_hook_refuses_a_foreign_state_dict():
    with pytest.raises(plugins.PluginError, match="not an EDT state dict"):
        edt.infer_stages_depth({"blocks.0.attn.proj.weight": torch.zeros(2, 2)})


# --- AMM (edt.md §5) ---------------------------------------------------------------------------------

def amm_by_hand(n: int) -> np.ndarray:
    f = 2 * math.pi / (4 * (n - 1) * math.sqrt(2))
    radius = math.sqrt(4 + (n - 1) ** 2)
    m = np.zeros((n * n, n * n))
    for i in range(n * n):
        for j in range(n * n):
            d = math.dist(divmod(i, n), divmod(j, n))
            m[i, j] = 0.0 if d > radius + 1e-9 else math.exp(math.cos(f * d)) / 2
    return m


@pytest.mark.parametrize("n", [3, 4, 8])
def test_amm_values_follow_the_formula(n):
    assert np.allclose(edt.modulation_matrix(n, torch.float64).numpy(), amm_by_hand(n), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n, kept, min_kept, corner", [(16, 0.9566, 0.7726, 197), (8, 0.9561, 0.7487, 52),
                                                       (4, 0.9844, 0.6316, None)])
def test_amm_numbers_of_the_fact_sheet(n, kept, min_kept, corner):
    m = edt.modulation_matrix(n)
    assert m[0, 0].item() == pytest.approx(math.e / 2)
    assert (m > 0).float().mean().item() == pytest.approx(kept, abs=5e-5)
    assert m[m > 0].min().item() == pytest.approx(min_kept, abs=5e-5)
    if corner:
        assert int((m[0] > 0).sum()) == corner


def test_amm_is_placed_on_the_official_blocks():
    local = lambda model: [i for i, b in enumerate(model.blocks) if b.attn.local]  # noqa: E731
    with torch.device("meta"):
        assert local(plugins.get_model("EDT-S/2").build()) == [7, 10]
        assert local(plugins.get_model("EDT-B/2").build()) == [7, 10]
        assert local(plugins.get_model("EDT-XL/2").build()) == [23, 25]
        assert local(plugins.get_model("EDT-XL/2_noAMM").build()) == []
        assert local(edt.EDT(**TINY, amm_blocks=[8])) == [8]
        assert local(edt.EDT(**TINY, local=True, amm=False)) == []


def test_amm_multiplies_the_post_softmax_attention_in_eval_mode_only():
    torch.manual_seed(0)
    attn = randomised(edt.AttentionBlock(32, 4, num_heads=2, local=True), std=0.3)
    x = torch.randn(2, 16, 32)
    q, k, v = attn.qkv(x).reshape(2, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
    bias = attn.rel_pos_bias.relative_position_bias_table  # BEiT index: (r1-r2+3)*7 + (c1-c2+3)
    rel = torch.tensor([[(i // 4 - j // 4 + 3) * 7 + (i % 4 - j % 4 + 3) for j in range(16)] for i in range(16)])
    logits = q @ k.transpose(-2, -1) / 4 + bias[rel].permute(2, 0, 1)
    expect = lambda w: attn.proj((w @ v).transpose(1, 2).reshape(2, 16, 32))  # noqa: E731
    amm = torch.from_numpy(amm_by_hand(4)).float()
    with torch.no_grad():
        assert torch.allclose(attn.eval()(x), expect(logits.softmax(-1) * amm), atol=1e-5)
        assert torch.allclose(attn.train()(x), expect(logits.softmax(-1)), atol=1e-5)
        assert not torch.allclose(attn.eval()(x), attn.train()(x), atol=1e-3)


def test_amm_and_no_amm_differ_only_in_eval():
    with_amm, without = tiny(5), tiny(5, local=False)
    x, t, y = inputs()
    with torch.no_grad():
        assert not torch.allclose(with_amm.eval()(x, t, y), without.eval()(x, t, y), atol=1e-4)
        with_amm.train(), without.train()
        torch.manual_seed(2)
        a = with_amm(x, t, y)
        torch.manual_seed(2)
        assert torch.equal(a, without(x, t, y))


# --- forward conventions -----------------------------------------------------------------------------

def test_cfg_guides_the_first_three_channels_of_the_duplicated_cond_half():
    model = tiny(6).eval()
    x, t, y = inputs()
    y = torch.tensor([1, 3, 10, 10])  # [cond half; null-class half]
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, 4.0)
        plain = model(torch.cat([x[:2], x[:2]]), t, y)
    cond, uncond = plain[:2, :3], plain[2:, :3]
    guided = uncond + 4.0 * (cond - uncond)
    assert torch.allclose(out[:2, :3], guided, atol=1e-5) and torch.allclose(out[2:, :3], guided, atol=1e-5)
    assert torch.equal(out[:, 3:], plain[:, 3:])


def test_float64_runs_and_agrees_with_float32():
    model = tiny(7).eval()
    x, t, y = inputs()
    with torch.no_grad():
        out32 = model(x, t, y)
        out64 = model.double()(x.double(), t, y)
    assert out64.dtype == torch.float64
    assert torch.allclose(out64.float(), out32, atol=1e-5)


def test_any_input_size_and_class_count():
    model = tiny(8, input_size=32, num_classes=7).eval()
    x, t, _ = inputs(2, side=32)
    with torch.no_grad():
        assert model(x, t, torch.tensor([0, 7])).shape == (2, 8, 32, 32)
    assert model.y_embedder.embedding_table.num_embeddings == 8
    with pytest.raises(ValueError, match="divisible by 4"):
        edt.EDT(**{**TINY, "input_size": 12})


# --- masked training (edt.md §7) ---------------------------------------------------------------------

def test_token_merge_order_and_mask_placement():
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid numbered row-major
    merged = edt._merge_phases(tokens, 4)
    assert merged[0, 0].tolist() == [0, 4, 1, 5]  # (even,even), (odd,even), (even,odd), (odd,odd)
    assert merged[0, 3].tolist() == [10, 14, 11, 15]
    torch.manual_seed(0)
    down = randomised(edt.DownSample(8, 12, 4, cond_dim=6), std=0.3)
    x, c = torch.randn(2, 16, 8), torch.randn(2, 6)
    keep = (torch.rand(2, 16, 1) > 0.5).float()
    shift, scale = down.adaLN_modulation(c).chunk(2, dim=1)
    normed = nn.functional.layer_norm(edt._merge_phases(x, 4), (32,), eps=1e-6)
    expect = ((normed * (1 + scale[:, None]) + shift[:, None]) * edt._merge_phases(keep.expand(-1, -1, 8), 4))
    assert torch.allclose(down(x, c, keep), down.reduction(expect) + down.pos_embed, atol=1e-6)


def capture_masks(model: edt.EDT) -> list:
    seen = []
    for block in model.down_blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[2]))
    return seen


def test_down_masks_drop_the_official_ratios_and_are_seeded():
    model = tiny(9).train()
    x, t, y = (torch.randn(64, 4, 16, 16), torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,)))
    seen = capture_masks(model)
    with torch.no_grad():
        model(x, t, y)
        assert seen == [None, None]  # the plain pass has no mask
        seen.clear()
        a = model(x, t, y, enable_down_mask=True, generator=torch.Generator().manual_seed(4))
        first, second = (1 - m.mean().item() for m in seen)
        assert 0.37 < first < 0.53 and 0.07 < second < 0.23  # p ~ U(0.4, 0.5), then U(0.1, 0.2)
        assert seen[0].shape == (64, 64, 1) and seen[1].shape == (64, 16, 1)
        model.y_embedder.dropout_prob = 0.0
        runs = [model(x, t, y, enable_down_mask=True, generator=torch.Generator().manual_seed(s)) for s in (4, 4, 5)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert a.shape == runs[0].shape


def test_xl_mid_mask_replaces_tokens_with_the_position_table():
    model = randomised(edt.EDT(**TINY_XL), 10).train()
    assert model.mid_mask
    seen = []
    model.blocks[4].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x, t, y = torch.randn(32, 4, 16, 16), torch.randint(0, 1000, (32,)), torch.randint(0, 10, (32,))
    with torch.no_grad():
        model(x, t, y, enable_down_mask=True, generator=torch.Generator().manual_seed(0))
        model(x, t, y)
    masked, plain = seen
    replaced = (masked == model.pos_embed).all(-1)
    assert 0.12 < replaced.float().mean().item() < 0.28  # p ~ U(0.15, 0.25)
    assert not (plain == model.pos_embed).all(-1).any()


def linear_alphas_cumprod() -> np.ndarray:
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def test_min_snr_weights():
    acp = linear_alphas_cumprod()
    t = torch.tensor([0, 10, 100, 200, 500, 999])
    snr = acp[t.numpy()] / (1 - acp[t.numpy()])
    assert np.allclose(edt.min_snr_weights(acp, t).numpy(), np.minimum(snr, 5) / snr, rtol=1e-5)
    assert np.allclose(edt.min_snr_weights(acp, t, prediction="x0").numpy(), np.minimum(snr, 5), rtol=1e-5)
    assert edt.min_snr_weights(acp, t)[-1].item() == 1.0  # snr < 5: MSE unweighted


def test_loss_second_moment_resampler():
    sampler = edt.LossSecondMomentResampler(num_timesteps=5, history_per_term=2, uniform_prob=0.1)
    t, w = sampler.sample(6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w, torch.ones(6)) and t.dtype == torch.int64  # uniform until warm
    sampler.update_with_local_losses(torch.arange(5), torch.tensor([1.0, 2, 3, 4, 5]))
    assert not sampler.warmed_up()
    sampler.update_with_local_losses(torch.arange(5), torch.tensor([1.0, 2, 3, 4, 5]))
    sampler.update_with_local_losses(torch.tensor([4]), torch.tensor([7.0]))  # shifts out the oldest 5
    assert sampler.warmed_up() and sampler.loss_history[4].tolist() == [5.0, 7.0]
    second_moment = np.sqrt([1, 4, 9, 16, (25 + 49) / 2])
    p = second_moment / second_moment.sum() * 0.9 + 0.02
    assert np.allclose(sampler.weights(), p)
    t, w = sampler.sample(4000, generator=torch.Generator().manual_seed(1))
    assert np.allclose(w.numpy(), 1 / (5 * p[t.numpy()]), rtol=1e-6)
    assert np.allclose(np.bincount(t.numpy(), minlength=5) / 4000, p, atol=0.03)
    restored = edt.LossSecondMomentResampler(5, 2, 0.1)
    restored.load_state_dict(sampler.state_dict())
    assert np.array_equal(restored.weights(), sampler.weights())


def _gather_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    sampler = edt.LossSecondMomentResampler(num_timesteps=4, history_per_term=1)
    local = [(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])), (torch.tensor([3]), torch.tensor([4.0]))][rank]
    sampler.update_with_local_losses(*local)  # ranks send different batch sizes
    np.savez(f"{out_dir}/rank{rank}.npz", **sampler.state_dict())
    torch.distributed.destroy_process_group()


def test_loss_second_moment_resampler_gathers_losses_of_all_ranks(tmp_path):
    torch.multiprocessing.spawn(_gather_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    states = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    for state in states:  # every rank holds every rank's losses
        assert state["loss_history"][:, 0].tolist() == [1.0, 2.0, 3.0, 4.0]
        assert state["loss_counts"].tolist() == [1, 1, 1, 1]


class FakeDiffusion:
    """training_losses with the bench.diffusion signature: loss = mse_weight * mean((out - noise)^2)."""

    def __init__(self):
        self.alphas_cumprod = linear_alphas_cumprod()
        self.num_timesteps = 1000
        self.calls = []

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None, mse_weight=None):
        noise = torch.randn_like(x_start) if noise is None else noise
        self.calls.append(dict(t=t, kwargs=dict(model_kwargs or {}), mse_weight=mse_weight))
        out = model(x_start + noise, t, **(model_kwargs or {}))[:, : x_start.shape[1]]
        mse = ((out - noise) ** 2).mean(dim=(1, 2, 3))
        return {"loss": mse if mse_weight is None else mse_weight * mse}


def test_masked_training_loss_composes_the_two_passes():
    model = tiny(11).train()
    diffusion = FakeDiffusion()
    sampler = edt.LossSecondMomentResampler(1000)
    x0, t, y = inputs()
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    torch.manual_seed(0)  # label dropout
    out = edt.masked_training_loss(diffusion, model, x0, t, {"y": y}, w, sampler=sampler,
                                   generator=torch.Generator().manual_seed(0))
    plain, masked = diffusion.calls
    assert "enable_down_mask" not in plain["kwargs"] and masked["kwargs"]["enable_down_mask"] is True
    assert plain["t"] is t and masked["t"] is t
    assert torch.equal(plain["mse_weight"], edt.min_snr_weights(diffusion.alphas_cumprod, t))
    assert torch.allclose(out["loss"], out["loss_plain"] + out["loss_mask"])
    assert out["loss_plain"] > 0 and out["loss_mask"] > 0 and out["loss"].requires_grad
    out["loss"].backward()
    assert model.down_blocks[0].reduction.weight.grad.abs().sum() > 0
    assert sampler.loss_counts[t.numpy()].tolist() == [1, 1, 1, 1]
    assert np.allclose(sampler.loss_history[t.numpy(), 0], out["per_sample"].numpy())
    torch.manual_seed(0)
    again = edt.masked_training_loss(FakeDiffusion(), model, x0, t, {"y": y}, w,
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["loss"].detach(), out["loss"].detach())


def test_masked_training_with_the_real_diffusion_and_the_train_hook():
    from bench.diffusion import create_diffusion

    hook = plugins.get_hook("train_hooks", "edt-mask", "EDT")(create_diffusion(""))
    model = tiny(12).train()
    x0, _, y = inputs()
    out = hook.loss(model, x0, {"y": y}, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["per_sample"].shape == (4,)
    assert hook.sampler.loss_counts.sum() == 4
    with pytest.raises(plugins.PluginError, match="needs an EDT model"):
        hook.loss(nn.Identity(), x0, {"y": y})


# --- AMM on plain DiT --------------------------------------------------------------------------------

class TinyDiTStack(nn.Module):
    """A DiT-like stack: residual attention blocks holding bench.layers.Attention as .attn."""

    def __init__(self, depth: int = 4, dim: int = 32, heads: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Module() for _ in range(depth))
        for block in self.blocks:
            block.attn = layers.Attention(dim, heads)

    def forward(self, x):
        for block in self.blocks:
            x = x + block.attn(x)
        return x


def amm_attention_by_hand(attn: layers.Attention, x: torch.Tensor, n: int) -> torch.Tensor:
    b, tokens, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(c // attn.num_heads)).softmax(-1)
    weights = weights * torch.from_numpy(amm_by_hand(n)).float()
    return attn.proj((weights @ v).transpose(1, 2).reshape(b, tokens, c))


def test_apply_amm_on_a_dit_stack_matches_the_explicit_computation():
    torch.manual_seed(0)
    model = randomised(TinyDiTStack(), std=0.2)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        before = model(x)
        expect = x
        for i, block in enumerate(model.blocks):
            expect = expect + (amm_attention_by_hand(block.attn, expect, 4) if i in (1, 3) else block.attn(expect))
        with edt.apply_amm(model, [1, 3]):
            assert torch.allclose(model.train()(x), expect, atol=1e-5)  # in training too, as upstream
            assert torch.allclose(model.eval()(x), expect, atol=1e-5)
        assert torch.equal(model(x), before)  # removed on exit
    assert "forward" not in vars(model.blocks[1].attn)


def test_amm_sample_hook_uses_the_official_dit_arrangement():
    torch.manual_seed(0)
    hook = plugins.get_hook("sample_hooks", "amm", "DiT")
    plain = TinyDiTStack(depth=12, dim=16)
    on_during_call = []
    plain.register_forward_pre_hook(
        lambda module, args: on_during_call.append([i for i, b in enumerate(module.blocks) if "forward" in vars(b.attn)]))
    sampler = hook(plain)
    sampler(torch.randn(1, 16, 16))
    assert on_during_call == [[8, 10]]
    assert not any("forward" in vars(b.attn) for b in plain.blocks)  # off again after the call
    xl = TinyDiTStack(depth=28, dim=8)
    with edt.apply_amm(xl):
        assert [i for i, b in enumerate(xl.blocks) if "forward" in vars(b.attn)] == [15, 17, 19, 22, 24]
    assert not any("forward" in vars(b.attn) for b in xl.blocks)
    with pytest.raises(plugins.PluginError, match="no official AMM arrangement"):
        edt.apply_amm(TinyDiTStack(depth=5, dim=8))
    with pytest.raises(plugins.PluginError, match="built in"):
        hook(tiny())
    with pytest.raises(plugins.PluginError, match="outside"):
        edt.apply_amm(TinyDiTStack(depth=4, dim=8), [4])


def test_the_amm_hook_leaves_the_model_plain_for_the_baseline_beside_it():
    """`dit-bench speed --hook amm` times the same model with and without the hook in one run."""
    torch.manual_seed(0)
    model = randomised(TinyDiTStack(depth=4, dim=32), std=0.2)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        plain = model(x)
        with edt.apply_amm(model, [1, 3]):
            with_amm = model(x)
        sampler = edt.amm_sample_hook(model, [1, 3])
        assert torch.equal(sampler(x), with_amm)
        assert torch.equal(model(x), plain)  # the baseline is not modulated after the hook was built
        assert torch.equal(sampler(x), with_amm)  # and the cached matrices serve the next call
    cached = [model.blocks[i].attn for i in (1, 3)]
    assert all(sampler._caches[i][1] is not None for i in (1, 3)) and all("_amm_cache" not in vars(a) for a in cached)


def test_padding_the_head_size_for_fused_kernels_keeps_the_attention():
    """On CUDA EDT's 52-wide heads are padded to 56 so bf16 runs fused kernels; the result must not move."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 52, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(3, 16, 16, generator=g, dtype=torch.float64)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    padded = edt.padded_sdpa(q, k, v, mask, 52 ** -0.5, multiple=8)
    assert padded.shape == plain.shape
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-12)


def test_registry_names():
    names = {spec.name for spec in edt.METHOD.models}
    assert names == {"EDT-S/2", "EDT-B/2", "EDT-XL/2", "EDT-S/2_noAMM", "EDT-B/2_noAMM", "EDT-XL/2_noAMM"}
    assert all(spec.family == "EDT" for spec in edt.METHOD.models)
