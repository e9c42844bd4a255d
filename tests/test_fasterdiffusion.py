"""FasterDiffusion on DiT: which steps are key, what a non-key step computes, and the parallel mode.

Numbers come from shared/reference/fasterdiffusion.md (read from sen-mao/DiT-FasterDiffusion):
the speed script's rule (113 key / 137 non-key at 250 steps), the FID script's list (175 / 75), the
ideal speed-ups 1.544x and 1.239x on DiT-XL/2, and the parallel branch's k + 1 draws per group.
"""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch

from bench.diffusion import create_diffusion
from bench.errors import UserError
from methods.dit import DiT
from methods.fasterdiffusion import (
    METHOD,
    FasterDiffusion,
    block_evaluations,
    ideal_speedup,
    key_step_groups,
    key_steps,
    parallel_sample_loop,
)

NUM_CLASSES = 10


def tiny_dit(depth: int = 28, seed: int = 0) -> DiT:
    """DiT-XL's depth (28 blocks) at a tiny width; random weights (the official init outputs zeros)."""
    torch.manual_seed(seed)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=depth, num_heads=2,
                num_classes=NUM_CLASSES).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def count_block_calls(model: DiT) -> list[int]:
    """calls[i] = how often block i ran since the hooks were attached."""
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def noise_table(steps: int, rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(steps, rows, 4, 8, 8, generator=g)
    return lambda step, like: table[step]


def cfg_batch(n: int = 2, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 8, 8, generator=g)
    y = torch.tensor([3, 7][:n])
    return torch.cat([z, z]), {"y": torch.cat([y, torch.full_like(y, NUM_CLASSES)]), "cfg_scale": 1.5}


# ------------------------------------------------------------------------------------------ key steps
def test_speed_rule_is_the_official_set_at_250_steps():
    keys = key_steps("speed", 250)
    # The script's own formulation: every s in 0..250 except 1 <= s <= 229 with s mod 10 <= 5, sentinel 250 dropped.
    official = sorted(set(range(251)) - {s for s in range(1, 230) if s % 10 <= 5} - {250})
    assert list(keys) == official
    assert (len(keys), 250 - len(keys)) == (113, 137)
    assert keys[:10] == (0, 6, 7, 8, 9, 16, 17, 18, 19, 26)
    non_key = sorted(set(range(250)) - set(keys))
    assert non_key[:5] == [1, 2, 3, 4, 5] and non_key[-1] == 225
    assert set(range(226, 250)) <= set(keys)


def test_step_counter_to_timestep_examples():
    timestep_map = create_diffusion("250").timestep_map
    t_of = {s: int(timestep_map[249 - s]) for s in (0, 5, 6, 9, 10, 174, 175, 225, 226, 249)}
    assert t_of == {0: 999, 5: 979, 6: 975, 9: 963, 10: 959, 174: 301, 175: 297, 225: 96, 226: 92, 249: 0}


def test_fid_list_is_the_official_explicit_list():
    keys = key_steps("fid", 250)
    assert (len(keys), 250 - len(keys)) == (175, 75)
    assert keys[:13] == (0, 1, 3, 4, 5, 8, 9, 10, 11, 13, 17, 18, 21)  # the script's list starts so
    assert keys[-5:] == (245, 246, 247, 248, 249)
    non_key = set(range(250)) - set(keys)
    assert {2, 6, 7, 12, 178, 179, 180, 181, 233, 235, 239, 241} <= non_key
    runs = [len(list(g)) for is_key, g in itertools.groupby(range(250), key=lambda s: s in keys) if not is_key]
    assert max(runs) == 4  # s = 178..181


def test_fid_list_exists_only_for_250_steps():
    with pytest.raises(UserError, match="250 steps only"):
        key_steps("fid", 50)


def test_speed_rule_generalises_with_the_same_structure():
    assert key_steps("speed", 50) == (0, 6, 7, 8, 9, 16, 17, 18, 19, 26, 27, 28, 29, 36, 37, 38, 39, 46, 47, 48, 49)
    keys100 = key_steps("speed", 100)
    assert set(range(92, 100)) <= set(keys100) and 91 not in keys100  # last round(8 %) = 8 steps all key
    assert key_steps("speed", 10) == (0, 6, 7, 8, 9)
    assert key_steps("speed", 1) == (0,)


def test_other_rules_and_explicit_lists():
    assert key_steps("all", 7) == tuple(range(7))
    assert key_steps("every:3", 10) == (0, 3, 6, 9)
    assert key_steps([9, 0, 3, 3], 10) == (0, 3, 9)
    assert key_steps("0, 4,8", 10) == (0, 4, 8)
    assert key_steps([0, 5, 10], 10) == (0, 5)  # the official lists' sentinel num_steps is dropped


@pytest.mark.parametrize("rule, message", [
    ([1, 2], "include step 0"), ([0, 12], "outside"), ("every:0", "every:K"), ("fastest", "unknown key-step rule"),
])
def test_bad_key_steps_are_user_errors(rule, message):
    with pytest.raises(UserError, match=message):
        key_steps(rule, 10)


def test_groups_of_the_speed_rule():
    groups = key_step_groups(key_steps("speed"), 250)
    assert len(groups) == 113 and groups[0] == (0, 6) and groups[1] == (6, 7) and groups[4] == (9, 16)
    assert Counter(stop - start for start, stop in groups) == {1: 90, 7: 22, 6: 1}


def test_block_evaluations_and_ideal_speedups_on_dit_xl2():
    assert block_evaluations("all") == 7000
    assert block_evaluations("speed") == 4534 and round(ideal_speedup("speed"), 3) == 1.544
    assert block_evaluations("fid") == 5650 and round(ideal_speedup("fid"), 3) == 1.239
    first_rule = [s for s in range(250) if not (1 <= s <= 229 and s % 10 < 5)]  # git history, §4d
    assert block_evaluations(first_rule) == 4948 and round(ideal_speedup(first_rule), 3) == 1.415
    assert block_evaluations("speed", depth=24) == 113 * 24 + 137 * 6  # DiT-L/2, same split at 18


# ------------------------------------------------------------------------------------------ sequential wrapper
def test_every_step_key_is_plain_dit_in_a_guided_ddpm_loop():
    model = tiny_dit()
    diffusion = create_diffusion("10")
    z, kwargs = cfg_batch()
    noise_fn = noise_table(10, len(z))
    plain = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, noise=z, clip_denoised=False,
                                    model_kwargs=kwargs, noise_fn=noise_fn)
    wrapper = FasterDiffusion(model, key_steps="all", num_steps=10)
    fast = diffusion.p_sample_loop(wrapper.forward_with_cfg, z.shape, noise=z, clip_denoised=False,
                                   model_kwargs=kwargs, noise_fn=noise_fn)
    assert torch.isfinite(plain).all() and plain.abs().max() > 0
    assert torch.equal(fast, plain)


def test_a_non_key_step_runs_only_the_decoder_and_ignores_the_latent():
    model = tiny_dit()
    calls = count_block_calls(model)
    wrapper = FasterDiffusion(model, key_steps=[0, 2], num_steps=3)
    assert wrapper.encoder_depth == 18
    g = torch.Generator().manual_seed(0)
    x0, xa, xb = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    y, t0, t1 = torch.tensor([1, 2]), torch.tensor([999, 999]), torch.tensor([500, 500])

    with torch.no_grad():
        wrapper(x0, t0, y)
        assert calls == [1] * 28
        out_a = wrapper(xa, t1, y)
        assert calls == [1] * 18 + [2] * 10  # encoder skipped
        wrapper.reset()
        wrapper(x0, t0, y)
        out_b = wrapper(xb, t1, y)
        # What the decoder should see: the key step's encoder output, conditioned on the *current* t and y.
        tokens0, c0 = model.embed(x0, t0, y)
        _, c1 = model.embed(xb, t1, y)
        expected = model.head(model.run_blocks(model.run_blocks(tokens0, c0, 0, 18), c1, 18, 28), c1)
        wrapper.reset()
        wrapper(x0, t0, y)
        out_other_t = wrapper(xa, torch.tensor([100, 100]), y)
    assert torch.equal(out_a, out_b)  # the current latent does not enter
    assert torch.equal(out_b, expected)
    assert not torch.allclose(out_a, out_other_t)  # the current timestep does


def test_reset_and_a_new_run_restart_at_the_key_step_zero():
    model = tiny_dit()
    calls = count_block_calls(model)
    wrapper = FasterDiffusion(model, key_steps=[0], num_steps=3)
    x, t, y = torch.zeros(1, 4, 8, 8), torch.tensor([10]), torch.tensor([0])
    with torch.no_grad():
        wrapper(x, t, y), wrapper(x, t, y)  # step 0 (key), step 1 (decoder only)
        assert (wrapper.step, calls[0], calls[27]) == (2, 1, 2)
        wrapper.reset()
        wrapper(x, t, y)
        assert (wrapper.step, calls[0]) == (1, 2)  # step 0 again: the encoder ran
        wrapper(x, t, y), wrapper(x, t, y)  # steps 1, 2 finish the run ...
        wrapper(x, t, y)  # ... so this call is step 0 of the next run
        assert (wrapper.step, calls[0]) == (1, 3)


def test_block_calls_of_a_250_step_speed_run_match_the_accounting():
    model = tiny_dit()
    calls = count_block_calls(model)
    diffusion = create_diffusion("250")
    wrapper = FasterDiffusion(model, key_steps="speed", num_steps=250)
    z, kwargs = cfg_batch(n=1)
    out = diffusion.p_sample_loop(wrapper.forward_with_cfg, z.shape, noise=z, clip_denoised=False, model_kwargs=kwargs)
    assert torch.isfinite(out).all()
    assert sum(calls) == block_evaluations("speed") == 4534
    assert calls[:18] == [113] * 18 and calls[18:] == [250] * 10


def test_dit_l_depth_uses_the_official_split_at_18():
    model = tiny_dit(depth=24)
    calls = count_block_calls(model)
    diffusion = create_diffusion("10")
    wrapper = FasterDiffusion(model, key_steps="every:3", num_steps=10)
    z, kwargs = cfg_batch()
    out = diffusion.p_sample_loop(wrapper.forward_with_cfg, z.shape, noise=z, clip_denoised=False, model_kwargs=kwargs)
    assert torch.isfinite(out).all()
    assert calls == [4] * 18 + [10] * 6
    assert sum(calls) == block_evaluations("every:3", 10, depth=24)


def test_shallow_models_need_an_explicit_encoder_depth():
    with pytest.raises(UserError, match="encoder_depth"):
        FasterDiffusion(tiny_dit(depth=12))
    with pytest.raises(UserError, match="1..11"):
        FasterDiffusion(tiny_dit(depth=12), encoder_depth=12)
    assert FasterDiffusion(tiny_dit(depth=12), encoder_depth=8, num_steps=10).encoder_depth == 8


def test_registered_as_a_dit_sample_hook():
    assert METHOD.compatible_families == ("DiT",)
    wrapper = METHOD.sample_hooks["fasterdiffusion"](tiny_dit(), key_steps="fid")
    assert isinstance(wrapper, FasterDiffusion) and len(wrapper.key_steps) == 175


# ------------------------------------------------------------------------------------------ parallel mode
def test_parallel_with_every_step_key_is_the_sequential_sampler():
    model = tiny_dit()
    diffusion = create_diffusion("10")
    z, kwargs = cfg_batch()
    noise_fn = noise_table(10, len(z))
    wrapper = FasterDiffusion(model, key_steps="all", num_steps=10)
    sequential = diffusion.p_sample_loop(wrapper.forward_with_cfg, z.shape, noise=z, clip_denoised=False,
                                         model_kwargs=kwargs, noise_fn=noise_fn)
    parallel = parallel_sample_loop(diffusion, wrapper, z.shape, noise=z, model_kwargs=kwargs, noise_fn=noise_fn,
                                    clip_denoised=False)
    assert torch.equal(parallel, sequential)


@pytest.mark.parametrize("guided", [True, False])
def test_parallel_groups_give_the_sequential_images(guided):
    # A non-key step does not read the latent, so decoding a whole group at its key step changes nothing.
    model = tiny_dit()
    diffusion = create_diffusion("20")
    z, kwargs = cfg_batch()
    if not guided:
        z, kwargs = z[:2], {"y": kwargs["y"][:2]}
    noise_fn = noise_table(20, len(z))
    forward = FasterDiffusion(model, key_steps="speed", num_steps=20)
    sequential = diffusion.p_sample_loop(forward.forward_with_cfg if guided else forward, z.shape, noise=z,
                                         clip_denoised=False, model_kwargs=kwargs, noise_fn=noise_fn)
    parallel = parallel_sample_loop(diffusion, model, z.shape, noise=z, model_kwargs=kwargs, noise_fn=noise_fn,
                                    clip_denoised=False, key_steps="speed")
    torch.testing.assert_close(parallel, sequential, rtol=1e-5, atol=1e-5)


def test_quirk_mode_draws_k_plus_one_per_group():
    model = tiny_dit()
    diffusion = create_diffusion("250")
    z, kwargs = cfg_batch(n=1)
    numbers = []

    def noise_fn(number, like):
        numbers.append(number)
        return torch.zeros_like(like)

    out = parallel_sample_loop(diffusion, model, z.shape, noise=z, model_kwargs=kwargs, noise_fn=noise_fn,
                               clip_denoised=False, official_quirks=True, noise_injection=True)
    assert torch.isfinite(out).all()
    assert numbers == list(range(250 + 113))  # 363 draws, handed out as one stream
    numbers.clear()
    parallel_sample_loop(create_diffusion("20"), model, z.shape, noise=z, model_kwargs=kwargs, noise_fn=noise_fn,
                         clip_denoised=False)
    assert numbers == list(range(20))  # correct bookkeeping: one draw per step, numbered by step


def test_quirk_mode_with_every_step_key_uses_every_second_draw():
    model = tiny_dit()
    diffusion = create_diffusion("10")
    z, kwargs = cfg_batch()
    stream = noise_table(20, len(z))
    quirky = parallel_sample_loop(diffusion, FasterDiffusion(model, key_steps="all", num_steps=10), z.shape,
                                  noise=z, model_kwargs=kwargs, noise_fn=stream, clip_denoised=False,
                                  official_quirks=True)
    # Each singleton group draws twice; the first draw's update is discarded.
    sequential = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, noise=z, clip_denoised=False,
                                         model_kwargs=kwargs, noise_fn=lambda s, like: stream(2 * s + 1, like))
    assert torch.equal(quirky, sequential)


@pytest.mark.parametrize("quirks", [False, True])
def test_final_step_noise_only_in_quirk_mode_when_the_last_group_is_long(quirks):
    # The official p_sample masks the noise with the group's *first* step, so a last group of
    # several steps adds noise after the final step; the correct update adds none there.
    model = tiny_dit()
    diffusion = create_diffusion("10")
    z, kwargs = cfg_batch()
    draws = 10 + 2 * quirks  # groups [0, 5) and [5, 10): quirk mode draws k + 1 per group
    stream = noise_table(draws, len(z))

    def final_doubled(number, like):  # only the final draw differs between the two runs
        return stream(number, like) * (2.0 if number == draws - 1 else 1.0)

    outs = [parallel_sample_loop(diffusion, model, z.shape, noise=z, model_kwargs=kwargs, noise_fn=fn,
                                 clip_denoised=False, key_steps=[0, 5], official_quirks=quirks)
            for fn in (stream, final_doubled)]
    assert torch.equal(outs[0], outs[1]) != quirks


def test_decoder_labels_and_timesteps_of_a_group():
    model = tiny_dit()
    seen = []
    embed = model.embed
    model.embed = lambda x, t, y: seen.append((t.tolist(), y.tolist())) or embed(x, t, y)
    diffusion = create_diffusion("6")  # timesteps 999, 799, 599, 400, 200, 0
    z, kwargs = cfg_batch()  # B = 2 per half, labels [3, 7] and null 10
    for quirks in (False, True):
        parallel_sample_loop(diffusion, model, z.shape, noise=z, model_kwargs=kwargs, clip_denoised=False,
                             key_steps=[0, 3], official_quirks=quirks)
    decoder_calls = [call for call in seen if len(call[0]) > 4]
    cond, null = [3, 7], [10, 10]
    assert decoder_calls[0][0] == [999] * 2 + [799] * 2 + [599] * 2 + [999] * 2 + [799] * 2 + [599] * 2
    assert decoder_calls[0][1] == cond * 3 + null * 3  # features are [cond x k, null x k]
    assert decoder_calls[2][1] == cond + null + cond + null + cond + null  # official tiling (§6 bug)
    assert decoder_calls[2][0] == decoder_calls[0][0]


def test_noise_injection_adds_the_initial_noise_below_t300():
    model = tiny_dit()
    diffusion = create_diffusion("10")  # 999, 888, ..., 222, 111, 0: the last three are below 300
    z, kwargs = cfg_batch()
    noise_fn = noise_table(10, len(z))
    out = parallel_sample_loop(diffusion, model, z.shape, noise=z, model_kwargs=kwargs, noise_fn=noise_fn,
                               clip_denoised=False, key_steps="all", noise_injection=True)
    x = z
    for step, i in enumerate(range(9, -1, -1)):
        t = torch.full((len(z),), i)
        x = diffusion.p_sample(model.forward_with_cfg, x, t, clip_denoised=False, model_kwargs=kwargs,
                               noise=noise_fn(step, x))["sample"]
        if diffusion.timestep_map[i] < 300:
            x = x + 0.003 * z
    assert torch.equal(out, x)


def test_parallel_loop_refuses_mismatched_steps_and_quirks_without_guidance():
    model = tiny_dit()
    diffusion = create_diffusion("10")
    with pytest.raises(UserError, match="num_steps=10"):
        parallel_sample_loop(diffusion, FasterDiffusion(model, num_steps=250), (1, 4, 8, 8),
                             model_kwargs={"y": torch.tensor([0])})
    with pytest.raises(UserError, match="guidance"):
        parallel_sample_loop(diffusion, model, (1, 4, 8, 8), model_kwargs={"y": torch.tensor([0])},
                             official_quirks=True)


def test_the_hook_declares_its_flop_bound_and_protocol():
    from methods.dit import DiT
    from methods.fasterdiffusion import FasterDiffusion

    model = DiT(input_size=8, patch_size=2, hidden_size=32, depth=28, num_heads=2, num_classes=10)
    speed = FasterDiffusion(model, key_steps="speed", num_steps=250)
    assert round(speed.ideal_speedup(), 3) == 1.544
    assert speed.protocol_card() == {"key_steps": "speed-rule", "encoder_depth": 18,
                                     "fasterdiffusion_mode": "sequential"}
    fid = FasterDiffusion(model, key_steps="fid", num_steps=250)
    assert round(fid.ideal_speedup(), 3) == 1.239 and fid.protocol_card()["key_steps"] == "fid-list"
    assert FasterDiffusion(model, key_steps="all").ideal_speedup() == 1.0


def test_parallel_mode_through_the_sampling_harness_gives_the_sequential_images(tmp_path, monkeypatch):
    """`dit-bench sample --hook fasterdiffusion --hook-option fasterdiffusion.mode=parallel`."""
    import numpy as np

    import methods.fasterdiffusion as fd
    from bench import sampling
    from tests.support.tiny import TINY_DEEP_MODEL, register_tiny_method, save_training_checkpoint, tiny_vae_folder

    register_tiny_method()
    ckpt = save_training_checkpoint(tmp_path / "deep.pt", tiny_dit(), TINY_DEEP_MODEL)
    vae = tiny_vae_folder(tmp_path / "vae")
    parallel_calls = []
    real = fd.parallel_sample_loop
    monkeypatch.setattr(fd, "parallel_sample_loop", lambda *a, **k: parallel_calls.append(a[2]) or real(*a, **k))
    images, cards = {}, {}
    for mode in ("sequential", "parallel"):
        protocol = sampling.SamplingProtocol(
            model=TINY_DEEP_MODEL, image_size=16, num_samples=4, checkpoint=str(ckpt), num_classes=NUM_CLASSES,
            steps="20", cfg_scale=1.5, seed=3, vae=str(vae), sample_hooks=("fasterdiffusion",),
            hook_options={"fasterdiffusion": {"key_steps": "speed", "mode": mode}})
        parts, _ = sampling.build_parts(protocol, torch.device("cpu"))
        cards[mode] = parts.model.protocol_card()["fasterdiffusion_mode"]
        sampling.run(parts, protocol, tmp_path / mode, 2, torch.device("cpu"), progress=False, environment={})
        with np.load(tmp_path / mode / sampling.SAMPLES_FILE) as f:
            images[mode] = f["arr_0"].astype(int)
    assert cards == {"sequential": "sequential", "parallel": "parallel"}
    assert parallel_calls == [(4, 4, 8, 8)] * 2  # two batches of 2 images, guided: 4 rows each
    assert np.abs(images["parallel"] - images["sequential"]).max() <= 1  # uint8 rounding of float noise
    assert (images["parallel"] == images["sequential"]).mean() > 0.99


def test_parallel_mode_refuses_ddim_and_unknown_modes(tmp_path):
    from bench import sampling
    from tests.support.tiny import TINY_DEEP_MODEL, register_tiny_method

    register_tiny_method()
    with pytest.raises(UserError, match="mode 'fast'"):
        FasterDiffusion(tiny_dit(), mode="fast")
    protocol = sampling.SamplingProtocol(
        model=TINY_DEEP_MODEL, image_size=8, num_samples=2, num_classes=NUM_CLASSES, steps="ddim10",
        sampler="ddim", vae="identity", random_weights=True, sample_hooks=("fasterdiffusion",),
        hook_options={"fasterdiffusion": {"mode": "parallel"}})
    with pytest.raises(UserError, match="use --sampler ddpm"):
        sampling.build_parts(protocol, torch.device("cpu"))
