"""Training data (dit.md §D.1-§D.2): ADM's centre crop, the [-1, 1] transform, image folders and .npz
images, the deterministic batch plan, and fast-DiT's feature pre-extraction (atomic, one file per image)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bench import data
from bench.data import BatchPlan, DataError
from bench.vae import load_vae
from tests.support.tiny import tiny_vae_folder


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------ transform
def test_center_crop_one_box_halving_then_bicubic_then_offset_crop():
    image = _random_image(40, 30)  # W x H; the shorter side 30 >= 2 * 8, 15 is not
    by_hand = image.resize((20, 15), Image.BOX).resize((11, 8), Image.BICUBIC)  # round(20 * 8/15) = 11
    expected = np.asarray(by_hand)[0:8, 1:9]  # top (8-8)//2 = 0, left (11-8)//2 = 1
    got = data.center_crop_arr(image, 8)
    assert got.shape == (8, 8, 3) and got.dtype == np.uint8
    assert np.array_equal(got, expected)


def test_center_crop_halves_with_integer_division_until_below_twice_the_size():
    image = _random_image(70, 50, seed=1)  # 70x50 -> 35x25 (25 >= 24) -> 17x12 (integer halves)
    by_hand = image.resize((35, 25), Image.BOX).resize((17, 12), Image.BOX)
    expected = np.asarray(by_hand)[0:12, 2:14]  # the bicubic step keeps 17x12; left (17-12)//2 = 2
    assert np.array_equal(data.center_crop_arr(image, 12), expected)


def test_tall_image_is_cropped_vertically():
    image = _random_image(9, 20, seed=2)  # shorter side 9 < 16: only the bicubic resize to 8 x round(20*8/9)=18
    expected = np.asarray(image.resize((8, 18), Image.BICUBIC))[5:13, 0:8]
    assert np.array_equal(data.center_crop_arr(image, 8), expected)


def test_to_model_range_is_totensor_then_normalize():
    arr = np.array([[[0, 255, 128]]], dtype=np.uint8)
    x = data.to_model_range(arr)
    assert x.shape == (3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == [-1.0, 1.0, pytest.approx(128 / 255 * 2 - 1, abs=1e-7)]


# ------------------------------------------------------------------------------------------ datasets
def test_image_folder_order_labels_crop_and_flip(tmp_path):
    for cls, names in {"b_dog": ["2.png", "1.jpg"], "a_cat": ["x.png"], "c_empty": []}.items():
        (tmp_path / cls).mkdir()
        for k, name in enumerate(names):
            _random_image(24, 16, seed=k).save(tmp_path / cls / name, quality=95)
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    ds = data.ImageFolder(tmp_path, image_size=8)
    assert ds.classes == ["a_cat", "b_dog", "c_empty"] and ds.num_classes == 3
    assert [(p.rsplit("/", 1)[-1], y) for p, y in ds.samples] == [("x.png", 0), ("1.jpg", 1), ("2.png", 1)]
    x, y = ds[(2, False)]
    assert x.shape == (3, 8, 8) and y == 1
    expected = data.to_model_range(data.center_crop_arr(Image.open(tmp_path / "b_dog" / "2.png").convert("RGB"), 8))
    assert torch.equal(x, expected)
    flipped, _ = ds[(2, True)]
    assert torch.equal(flipped, x.flip(-1)) and not torch.equal(flipped, x)


def test_image_folder_without_images_is_refused(tmp_path):
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match="no images"):
        data.ImageFolder(tmp_path, 8)


def test_npz_images_grayscale_and_adm_keys(tmp_path):
    gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "g.npz", arr_0=gray, arr_1=np.array([3, 1]))
    ds = data.ArrayImages(tmp_path / "g.npz")
    assert len(ds) == 2 and ds.num_classes == 4 and ds.image_size == 4
    x, y = ds[(0, False)]
    assert y == 3 and torch.equal(x[0], x[2]) and x[0, 0, 1].item() == pytest.approx(1 / 255 * 2 - 1, abs=1e-7)
    np.savez(tmp_path / "f.npz", images=gray.astype(np.float32), labels=np.array([0, 1]))
    with pytest.raises(DataError, match="uint8"):
        data.ArrayImages(tmp_path / "f.npz")
    np.savez(tmp_path / "l.npz", images=gray, labels=np.array([0]))
    with pytest.raises(DataError, match="labels"):
        data.ArrayImages(tmp_path / "l.npz")


# ------------------------------------------------------------------------------------------ batch plan
def test_batch_plan_epochs_are_permutations_with_the_tail_dropped():
    plan = BatchPlan(num_items=10, global_batch=3, seed=5)
    assert plan.steps_per_epoch == 3  # 10 // 3, the last item of each epoch is dropped (drop_last)
    for epoch in range(2):
        seen = np.concatenate([plan.indices(epoch * 3 + b) for b in range(3)])
        assert len(set(seen.tolist())) == 9 and seen.max() < 10
    assert not np.array_equal(plan.indices(0), plan.indices(3))  # reshuffled every epoch
    assert plan.position(7) == (2, 1)


def test_batch_plan_depends_on_seed_and_step_only_and_not_on_the_process_count():
    a, b = BatchPlan(64, 8, seed=1), BatchPlan(64, 8, seed=1)
    b.indices(40)  # a different history of calls
    assert a.for_rank(5) == b.for_rank(5)
    assert a.for_rank(5) != BatchPlan(64, 8, seed=2).for_rank(5)
    split = a.for_rank(5, 0, 2) + a.for_rank(5, 1, 2)
    assert split == a.for_rank(5) and len(a.for_rank(5, 1, 4)) == 2
    flips = np.concatenate([a.flips(s) for s in range(50)])
    assert 0.4 < flips.mean() < 0.6


def test_batch_plan_refuses_impossible_batches():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchPlan(4, 8, seed=0)
    with pytest.raises(DataError, match="does not split evenly"):
        BatchPlan(16, 6, seed=0).for_rank(0, 0, 4)


# ------------------------------------------------------------------------------------------ features
@pytest.fixture
def images_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npz"
    np.savez(path, images=rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8), labels=np.array([0, 1, 2, 1, 0]))
    return path


def test_frozen_flip_extraction_with_identity_stores_each_image_once(images_npz, tmp_path):
    images = data.ArrayImages(images_npz)
    manifest = data.extract_features(images, load_vae("identity"), tmp_path / "f", seed=3, batch_size=2,
                                     vae_name="identity")
    assert manifest["num_images"] == 5 and manifest["latent_shape"] == [3, 16, 16] and manifest["num_classes"] == 3
    assert sorted(p.name for p in (tmp_path / "f" / "features").iterdir()) == [f"{i:08d}.npy" for i in range(5)]
    assert not list((tmp_path / "f").rglob("*.tmp"))
    flips = [data.extraction_flip(3, i) for i in range(5)]
    assert 0 < sum(flips) < 5  # both orientations occur among these five (a fixed fact of seed 3)
    stored = data.LatentFeatures(tmp_path / "f")
    for i in range(5):
        z = np.load(data.feature_path(tmp_path / "f", i))
        assert z.shape == (1, 3, 16, 16) and z.dtype == np.float32
        x, y = images[(i, flips[i])]
        assert np.array_equal(z[0], x.numpy()) and y == int(images.labels[i])
        # frozen: the flip drawn at extraction is kept whatever flip training asks for
        assert torch.equal(stored[(i, False)][0], stored[(i, True)][0]) and stored[(i, True)][1] == y


def test_both_flips_keeps_both_orientations(images_npz, tmp_path):
    images = data.ArrayImages(images_npz)
    data.extract_features(images, load_vae("identity"), tmp_path / "f", mode="both-flips", vae_name="identity")
    stored = data.LatentFeatures(tmp_path / "f")
    assert stored.keeps_flip
    for i in range(5):
        assert torch.equal(stored[(i, False)][0], images[(i, False)][0])
        assert torch.equal(stored[(i, True)][0], images[(i, True)][0])


def test_vae_extraction_does_not_depend_on_batch_size_and_resumes(images_npz, tmp_path):
    vae = load_vae(str(tiny_vae_folder(tmp_path / "vae")))
    images = data.ArrayImages(images_npz)
    data.extract_features(images, vae, tmp_path / "b1", seed=1, batch_size=1, vae_name="tiny")
    data.extract_features(images, vae, tmp_path / "b3", mode="frozen-flip", seed=1, batch_size=3, vae_name="tiny")
    one, three = data.stack_features(tmp_path / "b1", range(5)), data.stack_features(tmp_path / "b3", range(5))
    assert one.shape == (5, 1, 4, 8, 8)
    assert np.allclose(one, three, atol=1e-5)  # per-image posterior noise: the batch does not matter
    other_seed = tmp_path / "s2"
    data.extract_features(images, vae, other_seed, seed=2, batch_size=3, vae_name="tiny")
    assert not np.allclose(data.stack_features(other_seed, range(5)), one, atol=1e-3)

    data.feature_path(tmp_path / "b3", 4).unlink()  # an interrupted run: one image missing
    (tmp_path / "b3" / data.FEATURES_MANIFEST).unlink()
    with pytest.raises(DataError, match="did not finish"):
        data.LatentFeatures(tmp_path / "b3")
    data.extract_features(images, vae, tmp_path / "b3", seed=1, batch_size=3, vae_name="tiny")
    redone = data.stack_features(tmp_path / "b3", range(5))
    assert np.array_equal(redone[:4], three[:4])  # kept as they were
    assert np.allclose(redone[4], three[4], atol=1e-5)  # redone alone: the same draw, batch-1 convolution
    with pytest.raises(DataError, match="another extraction"):
        data.extract_features(images, vae, tmp_path / "b3", seed=9, vae_name="tiny")


def test_extract_features_cli_writes_one_file_per_image(cli_runner, images_npz, tmp_path):
    import cli

    out = tmp_path / "feat"
    result = cli_runner.invoke(cli.app, ["extract-features", "--data", str(images_npz), "--vae", "identity",
                                         "--out", str(out), "--mode", "frozen-flip", "--no-progress",
                                         "--image-size", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "features").iterdir())) == 5 and len(list((out / "labels").iterdir())) == 5
    manifest = json.loads((out / data.FEATURES_MANIFEST).read_text())
    assert manifest["image_size"] == 8 and manifest["mode"] == "frozen-flip" and manifest["latent_shape"] == [3, 8, 8]
    assert [int(np.load(data.label_path(out, i))[0]) for i in range(5)] == [0, 1, 2, 1, 0]


def test_torchrun_extraction_is_collision_free_and_equals_one_process(images_npz, tmp_path):
    """fast-DiT's ranks all wrote 0.npy, 1.npy, ...; here each image is written once, by the rank that owns it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    images = data.ArrayImages(images_npz)
    data.extract_features(images, load_vae("identity"), tmp_path / "one", seed=4, batch_size=2, vae_name="identity")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "tests" / "support" / "run_cli.py"), "extract-features", "--data", str(images_npz),
           "--vae", "identity", "--out", str(tmp_path / "two"), "--seed", "4", "--batch-size", "2", "--no-progress",
           "--device", "cpu"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    for sub in ("features", "labels"):
        names = sorted(p.name for p in (tmp_path / "two" / sub).iterdir())
        assert names == [f"{i:08d}.npy" for i in range(5)]  # no collisions, no temp files left
        for name in names:
            assert (tmp_path / "two" / sub / name).read_bytes() == (tmp_path / "one" / sub / name).read_bytes()
    one, two = (json.loads((tmp_path / d / data.FEATURES_MANIFEST).read_text()) for d in ("one", "two"))
    assert {k: v for k, v in one.items() if k != "source"} == {k: v for k, v in two.items() if k != "source"}
