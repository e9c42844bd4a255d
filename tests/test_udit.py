"""U-DiT (reference/udit.md): counts, checkpoint layout, the re-parameterised FFN and the attention.

Tiny models keep this file fast: width 16, 2 heads, one U_DiTBlock per level, a 16x16 latent.
"""
import math

import pytest
import torch
from torch import nn

from bench import checkpoints, plugins
from methods import udit
from tests.support.goldens import fingerprint, golden_inputs

TINY = dict(input_size=16, down_factor=2, hidden_size=16, num_heads=2, depth=[1, 1, 1, 1, 1], mlp_ratio=2,
            num_classes=10, ffn_type="rep", rep=1, attn_type="v2", posemb_type="rope2d", downsampler="dwconv5",
            down_shortcut=1)


def randomised(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def tiny(seed: int = 0, **over) -> udit.U_DiT:
    return randomised(udit.U_DiT(**{**TINY, **over}), seed)


def inputs(n: int = 4, side: int = 16, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, side, side, generator=gen), torch.tensor([0, 250, 500, 999][:n]),
            torch.tensor([1, 3, 9, 10][:n]))


# --- parameters and MACs (udit.md §5) -----------------------------------------------------------------

@pytest.mark.parametrize("name, params, merged, macs, published", [
    ("U-DiT-S", 58_896_568, 52_045_240, 6_043_539_200, "6.04"),
    ("U-DiT-B", 231_251_304, 204_425_064, 22_224_769_792, "22.22"),
    ("U-DiT-L", 916_335_304, 810_188_488, 85_000_307_456, "85.00"),
])
def test_counts_match_the_official_models(name, params, merged, macs, published):
    spec = plugins.get_model(name)
    with torch.device("meta"):
        model = spec.build()
    assert sum(p.numel() for p in model.parameters()) == params
    ffns = [m for m in model.modules() if isinstance(m, udit.FeedForward)]
    ffn_params = sum(p.numel() for m in ffns for p in m.parameters())
    merged_params = sum(w.numel() for m in ffns for w in m._merge())
    assert params - ffn_params + merged_params == merged
    assert spec.macs(spec.kwargs()) == macs
    assert f"{macs / 1e9:.2f}" == published


@pytest.mark.parametrize("cfg, torchprofile_macs", [
    # torchprofile 0.1.0 on the official U_DiT in eval mode, less its traced integer shape arithmetic
    (TINY, 21_310_720),
    (dict(input_size=32, hidden_size=24, num_heads=2, depth=[1, 2, 1, 2, 1], mlp_ratio=3, ffn_type="basic",
          attn_type=None, posemb_type=None, downsampler="dwconv3", down_shortcut=0), 268_260_160),
])
def test_macs_match_torchprofile_on_the_official_class(cfg, torchprofile_macs):
    assert udit.udit_macs(cfg) == torchprofile_macs


def test_factories_honour_input_size_and_class_count():
    spec = plugins.get_model("U-DiT-S")
    with torch.device("meta"):
        model = spec.build(input_size=16, num_classes=7)
    assert model.input_size == 16 and model.y_embedder_3.embedding_table.num_embeddings == 8
    assert spec.macs(spec.kwargs(input_size=16)) < spec.macs(spec.kwargs()) / 3


# --- parity with the official class ----------------------------------------------------------------

# Fingerprints of the official udit_models.U_DiT in float64 (sinusoids cast to float64 after their
# float32 computation, RoPE in float32 as upstream does) on TINY with ``seeded_state(model, 7)`` and
# ``golden_inputs()``, no label drop: [sum, sum |.|, out[0, :, 3, 5], out[3, :, 7, 0]]. The training
# form of a freshly built model and its eval form after one eval() agree. From YuchuanTian/U-DiT at 7fcce5e.
GOLDEN_PLAIN = [-902.4635894962, 3966.8250812312, -0.9270614788, 1.0549377146, -1.3162495606, -0.4622415163,
                -0.0264358725, -1.2535637885, 0.6141931681, 0.1166581299, 0.6823209055, -0.4146994468,
                -0.2470037366, -0.412376338, 0.4991184825, -0.7901589148, 0.6791256825, -0.8070021655]
GOLDEN_CFG = [-891.7132561799, 3972.0608205196, -0.9223352391, 1.0495077308, -1.310926105, -0.4622415163,
              -0.0264358725, -1.2535637885, 0.6141931681, 0.1166581299, -0.0324062274, -0.1411071183,
              -0.6528968798, -0.2407166473, 0.67134442, -0.2741748837, 0.7604948222, -0.2523269358]


def seeded_state(model: nn.Module, seed: int, std: float = 0.05) -> dict:
    """float64 weights drawn key by key in sorted order."""
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key in sorted(state):
        state[key] = torch.randn(state[key].shape, generator=gen, dtype=torch.float64) * std
    return state


@pytest.mark.parametrize("form", ["train", "eval", "eval twice", "cfg"])
@pytest.mark.parametrize("dtype, atol, sum_atol", [(torch.float64, 1e-9, 1e-7), (torch.float32, 1e-4, 5e-3)])
def test_outputs_equal_the_official_model(form, dtype, atol, sum_atol):
    model = udit.U_DiT(**TINY).double()
    if form == "eval twice":
        model.eval()  # before loading, too: must not matter
    model.load_state_dict(seeded_state(model, 7))
    model = model.to(dtype).train(form == "train")
    if form == "eval twice":
        model.eval()
    for i in (1, 2, 3):
        getattr(model, f"y_embedder_{i}").dropout_prob = 0.0
    x, t, y = golden_inputs()
    with torch.no_grad():
        out = model.forward_with_cfg(x.to(dtype), t, y, 1.5) if form == "cfg" else model(x.to(dtype), t, y)
    got = fingerprint(out)
    want = torch.tensor(GOLDEN_CFG if form == "cfg" else GOLDEN_PLAIN, dtype=torch.float64)
    assert torch.allclose(got[:2], want[:2], atol=sum_atol, rtol=0)
    assert torch.allclose(got[2:], want[2:], atol=atol, rtol=0)


# --- checkpoint layout (udit.md §4, §11) --------------------------------------------------------------

def official_keys(c: int, heads: int, depth: list[int]) -> dict[str, tuple]:
    keys = {"x_embedder.proj.weight": (c, 4, 3, 3), "x_embedder.proj.bias": (c,)}
    for i, w in enumerate((c, 2 * c, 4 * c), start=1):
        keys.update({f"t_embedder_{i}.mlp.0.weight": (w, 256), f"t_embedder_{i}.mlp.0.bias": (w,),
                     f"t_embedder_{i}.mlp.2.weight": (w, w), f"t_embedder_{i}.mlp.2.bias": (w,),
                     f"y_embedder_{i}.embedding_table.weight": (11, w)})
    levels = (("encoder_level_1", c), ("encoder_level_2", 2 * c), ("latent", 4 * c), ("decoder_level_2", 2 * c),
              ("decoder_level_1", 2 * c))
    for (level, d), n in zip(levels, depth):
        for i in range(n):
            for k in (1, 2):
                b = f"{level}.{i}."
                keys.update({
                    f"{b}attn{k}.logit_scale": (heads, 1, 1),
                    f"{b}attn{k}.to_qkv.weight": (3 * d, d), f"{b}attn{k}.to_qkv.bias": (3 * d,),
                    f"{b}attn{k}.to_out.weight": (d, d, 1, 1), f"{b}attn{k}.to_out.bias": (d,),
                    f"{b}attn{k}.downsampler.layer.weight": (d, 1, 5, 5), f"{b}attn{k}.downsampler.layer.bias": (d,),
                    f"{b}mlp{k}.project_in.0.weight": (d, d, 1, 1), f"{b}mlp{k}.project_in.0.bias": (d,),
                    f"{b}mlp{k}.project_in.1.weight": (2 * d, d, 1, 1), f"{b}mlp{k}.project_in.1.bias": (2 * d,),
                    f"{b}mlp{k}.dwconv.0.weight": (2 * d, 1, 5, 5), f"{b}mlp{k}.dwconv.0.bias": (2 * d,),
                    f"{b}mlp{k}.dwconv.1.weight": (2 * d, 1, 3, 3), f"{b}mlp{k}.dwconv.1.bias": (2 * d,),
                    f"{b}mlp{k}.dwconv.2.weight": (2 * d, 1, 1, 1), f"{b}mlp{k}.dwconv.2.bias": (2 * d,),
                    f"{b}mlp{k}.project_out.0.weight": (d, 2 * d, 1, 1), f"{b}mlp{k}.project_out.0.bias": (d,),
                    f"{b}mlp{k}.project_out.1.weight": (d, d, 1, 1), f"{b}mlp{k}.project_out.1.bias": (d,),
                    f"{b}adaLN_modulation{k}.1.weight": (6 * d, d), f"{b}adaLN_modulation{k}.1.bias": (6 * d,)})
    keys.update({"down1_2.body.0.weight": (c // 2, c, 3, 3), "down2_3.body.0.weight": (c, 2 * c, 3, 3),
                 "up3_2.body.0.weight": (8 * c, 4 * c, 3, 3), "up2_1.body.0.weight": (4 * c, 2 * c, 3, 3),
                 "reduce_chan_level2.weight": (2 * c, 4 * c, 1, 1), "reduce_chan_level2.bias": (2 * c,),
                 "reduce_chan_level1.weight": (2 * c, 2 * c, 1, 1), "reduce_chan_level1.bias": (2 * c,),
                 "output.weight": (2 * c, 2 * c, 3, 3), "output.bias": (2 * c,),
                 "final_layer.out_proj.weight": (8, 2 * c, 3, 3), "final_layer.out_proj.bias": (8,),
                 "final_layer.adaLN_modulation.1.weight": (4 * c, 2 * c),
                 "final_layer.adaLN_modulation.1.bias": (4 * c,)})
    return keys


def test_state_dict_has_the_official_keys_and_shapes():
    with torch.device("meta"):
        model = udit.U_DiT(**TINY)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_keys(16, 2, [1, 1, 1, 1, 1])
    with torch.device("meta"):
        assert len(plugins.get_model("U-DiT-S").build().state_dict()) == 1043


def test_saved_checkpoint_and_old_names_load_strictly(tmp_path):
    source = tiny(3).eval()
    path = tmp_path / "udit.pt"
    torch.save(source.state_dict(), path)
    state = torch.load(path, weights_only=True)
    x, t, y = inputs()
    spec = plugins.get_model("U-DiT-S")
    old = {}
    for key, value in state.items():  # the research file's names (udit.md §11)
        for new, former in (("attn1.", "global_attn."), ("mlp1.", "global_mlp."),
                            ("adaLN_modulation1.", "global_adaLN_modulation."), ("attn2.", "local_attn."),
                            ("mlp2.", "local_mlp."), ("adaLN_modulation2.", "local_adaLN_modulation."),
                            ("downsampler.layer.", "before_attn.layer.")):
            key = key.replace(new, former)
        old[key] = value
    assert any("global_attn.before_attn.layer" in k for k in old)
    adapted, overrides = spec.adapt_state_dict(state)
    assert list(adapted) == list(state) and overrides == {}
    torch.save(old, tmp_path / "ipt.pt")
    for file in (path, tmp_path / "ipt.pt"):
        model, _ = checkpoints.load_model(spec, file, **TINY)  # strict; returned in eval mode
        with torch.no_grad():
            assert torch.equal(model(x, t, y), source(x, t, y))


# --- the re-parameterised FFN (udit.md §3, §10.1) ------------------------------------------------------

def test_eval_form_equals_training_form():
    model = tiny(4).double()
    x, t, y = inputs()
    x = x.double()
    for i in (1, 2, 3):  # no label drop, so train and eval see the same labels
        getattr(model, f"y_embedder_{i}").dropout_prob = 0.0
    with torch.no_grad():
        train = model.train()(x, t, y)
        evald = model.eval()(x, t, y)
    assert torch.allclose(train, evald, atol=1e-10, rtol=0)
    assert (train - evald).abs().max() > 0  # really two different computations


def test_eval_twice_or_before_loading_changes_nothing():
    source = tiny(5)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    x, t, y = inputs()
    with torch.no_grad():
        reference = source.eval()(x, t, y)
        source.eval()
        source.eval()
        assert torch.equal(source(x, t, y), reference)
        assert all(torch.equal(v, state[k]) for k, v in source.state_dict().items())  # weights untouched
        early = udit.U_DiT(**TINY).eval()
        early(x, t, y)  # merged weights of the random init are built here...
        early.load_state_dict(state)  # ...and must not survive loading
        assert torch.equal(early(x, t, y), reference)
        source.train()
        for i in (1, 2, 3):
            getattr(source, f"y_embedder_{i}").dropout_prob = 0.0
        assert torch.allclose(source(x, t, y), reference, atol=1e-5)


def test_merged_weights_follow_in_place_updates():
    model = tiny(6).eval()
    x, t, y = inputs()
    with torch.no_grad():
        before = model(x, t, y)
        model.latent[0].mlp1.dwconv[1].weight.add_(0.5)  # e.g. an optimiser step
        after = model(x, t, y)
        fresh = udit.U_DiT(**TINY)
        fresh.load_state_dict(model.state_dict())
        assert not torch.allclose(before, after)
        assert torch.equal(fresh.eval()(x, t, y), after)


def test_merged_kernel_is_the_sum_of_the_branches_plus_identity():
    torch.manual_seed(0)
    ffn = randomised(udit.FeedForward(4, 2, rep=True), std=0.3)
    _, _, kernel, bias, _, _ = ffn.merged_weights()
    k5, k3, k1 = (c.weight for c in ffn.dwconv)
    assert torch.allclose(kernel[:, :, 2, 2], k5[:, :, 2, 2] + k3[:, :, 1, 1] + k1[:, :, 0, 0] + 1)
    assert torch.equal(kernel[:, :, 0, 0], k5[:, :, 0, 0])
    assert torch.allclose(kernel[:, :, 1, 2], k5[:, :, 1, 2] + k3[:, :, 0, 1])
    assert torch.allclose(bias, sum(c.bias for c in ffn.dwconv))


# --- attention (udit.md §3) ---------------------------------------------------------------------------

def test_rope_tables_follow_the_formula():
    rotation = udit.rope_2d(8, 3, 3, torch.device("cpu"))
    assert rotation.dtype == torch.complex64  # upstream's freqs_cis
    cos, sin = rotation.real, rotation.imag
    for token in range(9):
        row, col = divmod(token, 3)
        for k in range(4):
            omega = 10000 ** (-4 * (k // 2) / 8)
            angle = (col if k % 2 == 0 else row) * omega
            assert cos[token, k].item() == pytest.approx(math.cos(angle), abs=1e-6)
            assert sin[token, k].item() == pytest.approx(math.sin(angle), abs=1e-6)


def test_rope_scores_depend_only_on_the_offset_and_run_in_float32():
    rotation = udit.rope_2d(8, 4, 4, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    rotate = lambda v, token: udit.apply_rope_2d(v.expand(16, 8), rotation)[token]  # noqa: E731
    score = lambda a, b: torch.dot(rotate(q, a), rotate(k, b)).item()  # noqa: E731
    assert score(0, 5) == pytest.approx(score(10, 15), abs=1e-5)  # both offset (+1 row, +1 col)
    assert score(0, 5) != pytest.approx(score(0, 6), abs=1e-3)
    q64 = torch.randn(16, 8, dtype=torch.float64, generator=gen)
    out = udit.apply_rope_2d(q64, rotation)
    assert out.dtype == torch.float64
    assert torch.equal(out, udit.apply_rope_2d(q64.float(), rotation).double())
    # channel pair (2k, 2k+1) of token n turns by the angle of rotation[n, k]
    pair = out[5].float().unflatten(-1, (-1, 2))
    ref = q64[5].float().unflatten(-1, (-1, 2))
    c, s_ = rotation[5].real, rotation[5].imag
    torch.testing.assert_close(pair[:, 0], ref[:, 0] * c - ref[:, 1] * s_)
    torch.testing.assert_close(pair[:, 1], ref[:, 0] * s_ + ref[:, 1] * c)


def test_attention_stays_inside_each_2x2_phase():
    torch.manual_seed(0)
    attn = randomised(udit.DownSample_Attn(8, 2, attn_type="v2", posemb_type="rope2d", downsampler="dwconv5",
                                           down_shortcut=True), std=0.3)
    with torch.no_grad():
        attn.downsampler.layer.weight.zero_()  # identity shortcut only, so nothing mixes before the split
        x = torch.randn(1, 8, 8, 8)
        moved = x.clone()
        moved[0, :, 2, 4] += 1.0  # a token of phase (even row, even column)
        diff = (attn(moved) - attn(x)).abs().sum(1)[0]
    changed = diff > 1e-6
    assert changed[0::2, 0::2].all()
    assert not changed[1::2].any() and not changed[:, 1::2].any()


def test_cosine_attention_temperature_is_clamped():
    torch.manual_seed(0)
    attn = randomised(udit.DownSample_Attn(8, 2, attn_type="v2", downsampler="dwconv5"), std=0.3)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        attn.logit_scale.fill_(4.6052)  # upstream's literal, just above ln 100
        at_max = attn(x)
        attn.logit_scale.fill_(50.0)
        assert torch.equal(attn(x), at_max)
        attn.logit_scale.fill_(4.6)
        assert not torch.equal(attn(x), at_max)


# --- forward conventions ------------------------------------------------------------------------------

def test_cfg_guides_the_first_three_channels_of_the_duplicated_cond_half():
    model = tiny(7).eval()
    x, t, _ = inputs()
    y = torch.tensor([1, 3, 10, 10])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, 1.5)
        plain = model(torch.cat([x[:2], x[:2]]), t, y)
    guided = plain[2:, :3] + 1.5 * (plain[:2, :3] - plain[2:, :3])
    assert torch.allclose(out[:2, :3], guided, atol=1e-6) and torch.allclose(out[2:, :3], guided, atol=1e-6)
    assert torch.equal(out[:, 3:], plain[:, 3:])


def test_float64_any_size_and_class_count():
    model = tiny(8, num_classes=7).eval()
    x, t, _ = inputs(2, side=24)
    y = torch.tensor([0, 7])
    with torch.no_grad():
        out32 = model(x, t, y)
        out64 = model.double()(x.double(), t, y)
    assert out64.shape == (2, 8, 24, 24) and out64.dtype == torch.float64
    assert torch.allclose(out64.float(), out32, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 4, 20, 20, dtype=torch.float64), t[:1], y[:1])


def test_inference_mode_then_training_works():
    model = tiny(9)
    x, t, y = inputs(2)
    with torch.inference_mode():
        model.eval()(x, t, y)
    model.train()(x, t, y).sum().backward()  # cached RoPE tables are ordinary tensors
    assert model.latent[0].attn1.to_qkv.weight.grad is not None


def test_registry_names():
    assert [s.name for s in udit.METHOD.models] == ["U-DiT-S", "U-DiT-B", "U-DiT-L"]
    assert all(s.family == "U-DiT" for s in udit.METHOD.models)
