"""`dit-bench evaluate` and bench.metrics.evaluate: ADM .npz handling, the result, the cache, the errors.

Most tests use a tiny registered backend (channel statistics as "features") so that the orchestration
is checked in milliseconds; one end-to-end run goes through adm-tf with the stand-in Inception graph
of test_metrics_backends.py.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import cli
from bench.errors import UserError
from bench.metrics import backends, frechet_distance, inception_score, precision_recall, statistics
from bench.metrics.backends import FeatureBackend
from bench.metrics.evaluate import evaluate
from bench.metrics.reference import BatchFileError, cache_path, open_batch


class ChannelStats(FeatureBackend):
    """Cheap deterministic features: per-channel means/stds (pool), 2x2 means (spatial), a softmax."""

    name = "channel-stats"
    default_batch_size = 4
    calls = 0

    def image_features(self, images):
        type(self).calls += 1
        x = images.astype(np.float32) / 255
        pool = np.concatenate([x.mean((1, 2)), x.std((1, 2)), x[:, ::2].mean((1, 2))], 1)
        h, w = x.shape[1] // 2, x.shape[2] // 2
        spatial = x[:, :2 * h, :2 * w].reshape(len(x), 2, h, 2, w, 3).mean((2, 4)).reshape(len(x), -1)
        return pool, spatial

    def softmax(self, pool):
        logits = pool @ np.linspace(-3, 3, pool.shape[1] * 5).reshape(pool.shape[1], 5).astype(np.float32)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)


@pytest.fixture
def channel_stats(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    backends.register_backend("channel-stats", ChannelStats)
    ChannelStats.calls = 0
    weights = tmp_path / "channel-stats.bin"
    weights.write_bytes(b"v1")
    return weights


def _npz(path, images, **extra):
    np.savez(path, images, **extra)
    return path


def _imgs(n, size=16, seed=0, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128 + shift, 50, (n, size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def batches(tmp_path):
    return _npz(tmp_path / "ref.npz", _imgs(30)), _npz(tmp_path / "samples.npz", _imgs(23, seed=1, shift=10))


def test_evaluate_returns_the_five_numbers_of_the_evaluators_pipeline(channel_stats, batches):
    ref_path, smp_path = batches
    result = evaluate(ref_path, smp_path, backend="channel-stats", weights=channel_stats)
    net = ChannelStats()
    ref_pool, ref_spatial = net.image_features(np.load(ref_path)["arr_0"])
    smp_pool, smp_spatial = net.image_features(np.load(smp_path)["arr_0"])
    m = result["metrics"]
    assert m["fid"] == frechet_distance(*statistics(smp_pool), *statistics(ref_pool))
    assert m["sfid"] == frechet_distance(*statistics(smp_spatial), *statistics(ref_spatial))
    assert m["inception_score"] == inception_score(net.softmax(smp_pool))
    assert (m["precision"], m["recall"]) == precision_recall(ref_pool, smp_pool)
    assert m["fid"] > 0 and 0 <= m["precision"] <= 1
    p = result["protocol"]
    assert result["kind"] == "quality"
    assert p["num_samples"] == 23 and p["evaluator"] == "channel-stats" and p["full_protocol"] is False
    assert p["reference"] == "ref.npz" and p["reference_statistics"] == "computed"
    assert p["reference_sha256"] == open_batch(ref_path).sha256
    assert p["feature_network_sha256"] == ChannelStats(channel_stats).network_sha256
    assert any(w.startswith("FID-0.023k is not FID-50k") for w in result["warnings"])
    json.dumps(result)  # plain JSON types only


def test_precomputed_reference_statistics_are_used_for_fid_and_sfid(channel_stats, tmp_path, monkeypatch):
    monkeypatch.setattr(ChannelStats, "inception_space", True)
    smp = _npz(tmp_path / "s.npz", _imgs(12, seed=2))
    rng = np.random.default_rng(3)
    mu, mu_s = rng.normal(size=9), rng.normal(size=12)
    sigma, sigma_s = np.eye(9) * 0.01, np.eye(12) * 0.02
    ref = _npz(tmp_path / "r.npz", _imgs(10), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    result = evaluate(ref, smp, backend="channel-stats", weights=channel_stats)
    pool, spatial = ChannelStats().image_features(np.load(smp)["arr_0"])
    assert result["metrics"]["fid"] == frechet_distance(*statistics(pool), mu, sigma)
    assert result["metrics"]["sfid"] == frechet_distance(*statistics(spatial), mu_s, sigma_s)
    assert result["protocol"]["reference_statistics"] == "precomputed"
    # The reference images still serve precision/recall.
    ref_pool, _ = ChannelStats().image_features(np.load(ref)["arr_0"])
    assert (result["metrics"]["precision"], result["metrics"]["recall"]) == precision_recall(ref_pool, pool)
    # A network outside the Inception feature space cannot use Inception statistics.
    monkeypatch.setattr(ChannelStats, "inception_space", False)
    assert evaluate(ref, smp, backend="channel-stats", weights=channel_stats)["protocol"]["reference_statistics"] == "computed"
    _npz(tmp_path / "half.npz", _imgs(10), mu=mu, sigma=sigma)
    with pytest.raises(BatchFileError, match="lacks mu_s, sigma_s"):
        open_batch(tmp_path / "half.npz").statistics()


def test_features_are_cached_beside_the_file_by_hash_and_backend(channel_stats, batches):
    ref_path, smp_path = batches
    first = evaluate(ref_path, smp_path, backend="channel-stats", weights=channel_stats)
    calls = ChannelStats.calls
    assert calls == 8 + 6  # 30 and 23 images in batches of 4
    cached = cache_path(open_batch(smp_path), "channel-stats")
    assert cached.parent == smp_path.parent and open_batch(smp_path).sha256[:16] in cached.name
    assert not list(smp_path.parent.glob(".*.tmp"))  # atomic write leaves no temp file
    second = evaluate(ref_path, smp_path, backend="channel-stats", weights=channel_stats)
    assert ChannelStats.calls == calls  # nothing recomputed
    assert second["metrics"] == first["metrics"] and second["protocol"] == first["protocol"]
    # Another network file (other sha256) does not trust the cache; a damaged cache is recomputed.
    channel_stats.write_bytes(b"version 2")
    evaluate(ref_path, smp_path, backend="channel-stats", weights=channel_stats)
    assert ChannelStats.calls == 2 * calls
    cached.write_bytes(b"garbage")
    evaluate(ref_path, smp_path, backend="channel-stats", weights=channel_stats)
    assert ChannelStats.calls == 2 * calls + 6
    evaluate(ref_path, smp_path, backend="channel-stats", weights=channel_stats, cache=False)
    assert ChannelStats.calls == 2 * calls + 6 + 14


def test_streamed_batches_equal_the_array(tmp_path):
    images = _imgs(11, size=8)
    for name, save in (("plain.npz", np.savez), ("zipped.npz", np.savez_compressed)):
        save(tmp_path / name, images)
        batch = open_batch(tmp_path / name)
        assert batch.shape == (11, 8, 8, 3)
        for size in (1, 4, 11, 64):
            parts = list(batch.batches(size))
            assert [len(p) for p in parts][:-1] == [size] * (len(parts) - 1)
            np.testing.assert_array_equal(np.concatenate(parts), images)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, np.zeros((2, 8, 8, 3), np.float32)), "arr_0 is float32, but ADM batches are uint8"),
    (lambda p: np.savez(p, np.zeros((2, 3, 8, 8), np.uint8)), "looks like N x 3 x H x W"),
    (lambda p: np.savez(p, np.zeros((8, 8, 3), np.uint8)), "must be N x H x W x 3"),
    (lambda p: np.savez(p, images=np.zeros((2, 8, 8, 3), np.uint8)), "has no 'arr_0' array \\(keys: images\\)"),
    (lambda p: np.save(p, np.zeros((2, 8, 8, 3), np.uint8)), "is not an .npz"),
    (lambda p: p.write_bytes(b"hello"), "is not an .npz"),
    (lambda p: np.savez(p, np.zeros((0, 8, 8, 3), np.uint8)), "holds no images"),
])
def test_bad_sample_files_are_refused_with_one_line(tmp_path, make, message):
    path = tmp_path / "bad.npz"
    make(path)
    if not path.exists():  # np.save appends .npy
        (tmp_path / "bad.npz.npy").rename(path)
    with pytest.raises(BatchFileError, match=message) as info:
        open_batch(path)
    assert "\n" not in str(info.value) and isinstance(info.value, UserError)


def test_truncated_arrays_and_resolution_mismatch_are_user_errors(channel_stats, tmp_path):
    ref = _npz(tmp_path / "ref.npz", _imgs(10, size=16))
    small = _npz(tmp_path / "small.npz", _imgs(10, size=8))
    with pytest.raises(UserError, match="samples are 8x8 but reference ref.npz is 16x16"):
        evaluate(ref, small, backend="channel-stats", weights=channel_stats)
    with pytest.raises(UserError, match="does not exist"):
        evaluate(ref, tmp_path / "missing.npz", backend="channel-stats", weights=channel_stats)
    # A zip whose arr_0.npy promises more bytes than it holds.
    import zipfile

    full = tmp_path / "full.npz"
    np.savez(full, _imgs(4, size=8))
    data = zipfile.ZipFile(full).read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as zf:
        zf.writestr("arr_0.npy", data[: len(data) - 100])
    with pytest.raises(BatchFileError, match="truncated"):
        list(open_batch(tmp_path / "cut.npz").batches(4))


def test_cli_prints_a_table_and_json_and_writes_a_record(channel_stats, batches, cli_runner, tmp_path):
    ref_path, smp_path = batches
    args = ["evaluate", str(ref_path), str(smp_path), "--backend", "channel-stats", "--weights", str(channel_stats),
            "--no-progress"]
    res = cli_runner.invoke(cli.app, args + ["--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["protocol"]["evaluator"] == "channel-stats"
    assert set(result["metrics"]) == {"fid", "sfid", "inception_score", "precision", "recall"}

    out = tmp_path / "out" / "quality.json"
    res = cli_runner.invoke(cli.app, args + ["--output", str(out)])
    assert res.exit_code == 0, res.output
    for text in ("FID", "sFID", "Inception Score", "Precision", "Recall", f"{result['metrics']['fid']:.4f}",
                 "channel-stats", "FID-0.023k is not FID-50k"):
        assert text in res.stdout
    record = json.loads(out.read_text())
    assert record["kind"] == "quality" and record["metrics"] == result["metrics"]
    assert record["protocol"]["reference_sha256"] == result["protocol"]["reference_sha256"]


def test_cli_user_errors_are_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, np.zeros((2, 8, 8, 3), np.float32))
    proc = subprocess.run([sys.executable, "-c", "import cli; cli.main()", "evaluate", str(bad), str(bad)],
                          capture_output=True, text=True, cwd=str(tmp_path))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "uint8" in lines[0] and "Traceback" not in proc.stderr


def test_end_to_end_with_the_stand_in_inception_graph(tmp_path, monkeypatch):
    from bench.metrics import evaluate as evaluate_mod
    from test_metrics_backends import build_stand_in_graph

    graph = tmp_path / "classify_image_graph_def.pb"
    build_stand_in_graph(graph)
    ref = _npz(tmp_path / "ref.npz", _imgs(12, size=20))
    smp = _npz(tmp_path / "smp.npz", _imgs(9, size=20, seed=5, shift=20))
    # sqrtm of a rank-deficient 2048 x 2048 product takes ~40 s on one core; the maths has its own
    # tests, so here only what reaches it is checked: both feature widths, samples first.
    seen = []
    monkeypatch.setattr(evaluate_mod, "frechet_distance",
                        lambda mu1, s1, mu2, s2: seen.append((mu1.shape, s1.shape, mu2.shape, s2.shape, mu1)) or 7.0)
    result = evaluate(ref, smp, backend="adm-tf", weights=graph, device="cpu", batch_size=4, cross_check=5,
                      cross_check_weights=graph)
    assert [x[:4] for x in seen] == [((2048,), (2048, 2048)) * 2, ((2023,), (2023, 2023)) * 2]
    pool, _ = evaluate_mod.get_backend("adm-tf", weights=graph, device="cpu").image_features(np.load(smp)["arr_0"])
    np.testing.assert_allclose(seen[0][4], pool.mean(0), rtol=1e-5)
    m = result["metrics"]
    assert m["fid"] == m["sfid"] == 7.0
    assert 1 <= m["inception_score"] <= 9  # 9 samples: IS lies between 1 and 9
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert result["protocol"]["evaluator"] == "adm-tf"
    assert result["protocol"]["feature_network"] == "classify_image_graph_def.pb"
    # Cross-check: the same backend against itself agrees (up to TF's batch-size rounding).
    cc = result["cross_check"]
    assert cc["num_images"] == 5 and cc["top1_agreement"] == 1.0
    assert cc["pool_rel_l2"] < 1e-5 and cc["spatial_rel_l2"] < 1e-5
