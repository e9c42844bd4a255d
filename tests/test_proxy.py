"""The embedded default's proxy task: bundled digits as ADM images, and the shipped feature network."""
import numpy as np
import torch

from bench import proxy
from bench.metrics import frechet_distance, inception_score
from bench.metrics.backends import get_backend


def test_digits_are_adm_images():
    images, labels = proxy.digits_images()
    assert images.shape == (1797, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], images[..., 2])  # grey replicated to RGB
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert images.min() == 0 and images.max() == 255
    (train_x, train_y), (test_x, test_y) = proxy.split(images, labels)
    assert len(train_x) == 1500 and len(test_x) == 297
    assert not set(map(bytes, train_x.reshape(1500, -1))) & set(map(bytes, test_x.reshape(297, -1)))


def test_shipped_feature_network_classifies_held_out_digits():
    backend = get_backend("proxy")
    assert backend.proxy and not backend.inception_space
    _, (x, y) = proxy.split(*proxy.digits_images())
    pool, spatial = backend.image_features(x)
    assert pool.shape == (297, 128) and spatial.shape == (297, 512) and pool.dtype == np.float32
    probs = backend.softmax(pool)
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == y).mean() > 0.95


def test_proxy_metrics_separate_real_digits_from_noise():
    backend = get_backend("proxy")
    (train_x, _), (test_x, _) = proxy.split(*proxy.digits_images())
    noise = np.random.default_rng(0).integers(0, 256, size=test_x.shape, dtype=np.uint8)

    def stats(x):
        pool, _ = backend.image_features(x)
        return pool.mean(0), np.cov(pool, rowvar=False), pool

    mu_r, sig_r, _ = stats(train_x)
    mu_t, sig_t, pool_t = stats(test_x)
    mu_n, sig_n, pool_n = stats(noise)
    assert frechet_distance(mu_t, sig_t, mu_r, sig_r) * 20 < frechet_distance(mu_n, sig_n, mu_r, sig_r)
    # Real digits are confidently and diversely classified: IS near the 10 classes; noise is not.
    assert inception_score(backend.softmax(pool_t)) > 8 > inception_score(backend.softmax(pool_n))


def test_classifier_training_is_deterministic_and_learns(tmp_path):
    torch.set_num_threads(1)
    a, acc_a = proxy.train_classifier(seed=1, epochs=6, out=tmp_path / "a.pt")
    b, acc_b = proxy.train_classifier(seed=1, epochs=6, out=tmp_path / "b.pt")
    assert acc_a == acc_b and acc_a > 0.85
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in b.state_dict().items())
