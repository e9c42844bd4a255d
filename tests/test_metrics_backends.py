"""Feature backends: the registry, the adm-tf graph plumbing and the torch Inception port.

The official graph (~100 MB) and the port's weights cannot be downloaded here, so:
- ``adm-tf`` loads a small GraphDef built below with the official tensor names and shapes
  (decoded image -> ``ExpandDims`` -> ResizeBilinear 299 -> (x - 128) / 128 -> ... ``mixed_6/conv``
  (17 x 17 x 192) ... ``pool_3`` (1 x 1 x 2048) -> ``pool_3/_reshape`` [1, 2048] ->
  ``softmax/logits/MatMul`` with a 2048 x 1008 weight, plus a bias the evaluator does not use),
  through the same code path as the real file;
- ``torch`` builds the FID Inception-v3, saves its state dict in the port's key layout and loads it
  back as the real weights file would be loaded.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import bench
from bench.errors import UserError
from bench.metrics import backends
from bench.metrics.backends import BackendError, FeatureBackend, get_backend, register_backend


def build_stand_in_graph(path, seed: int = 0):
    """Write a frozen GraphDef with the ADM evaluator's tensor names and shapes; return its weights."""
    import tensorflow as tf

    tf1 = tf.compat.v1
    rng = np.random.default_rng(seed)
    w6 = rng.normal(size=(1, 1, 3, 192)).astype(np.float32)
    w10 = (rng.normal(size=(1, 1, 192, 2048)) / 8).astype(np.float32)
    ws = (rng.normal(size=(2048, 1008)) / 40).astype(np.float32)
    bs = (rng.normal(size=(1008,)) * 5).astype(np.float32)
    graph = tf1.Graph()
    with graph.as_default():
        decoded = tf1.placeholder(tf.float32, shape=[None, None, 3], name="Cast")  # DecodeJpeg -> Cast upstream
        x = tf1.expand_dims(decoded, 0, name="ExpandDims")
        x = tf.raw_ops.ResizeBilinear(images=x, size=[299, 299], align_corners=False, half_pixel_centers=False,
                                      name="ResizeBilinear")
        x = tf1.multiply(tf1.subtract(x, 128.0, name="Sub"), 1.0 / 128.0, name="Mul")
        x = tf1.nn.avg_pool(x, [1, 17, 17, 1], [1, 17, 17, 1], "VALID", name="pool")  # -> 17 x 17
        m6 = tf1.nn.relu(tf1.nn.conv2d(x, tf1.constant(w6), [1, 1, 1, 1], "SAME"), name="mixed_6/conv")
        m10 = tf1.nn.relu(tf1.nn.conv2d(m6, tf1.constant(w10), [1, 1, 1, 1], "SAME"), name="mixed_10/join")
        pool3 = tf1.nn.avg_pool(m10, [1, 17, 17, 1], [1, 1, 1, 1], "VALID", name="pool_3")
        flat = tf1.reshape(pool3, [1, 2048], name="pool_3/_reshape")  # batch 1, as in the real graph
        logits = tf1.matmul(flat, tf1.constant(ws, name="softmax/weights"), name="softmax/logits/MatMul")
        tf1.nn.softmax(tf1.nn.bias_add(logits, tf1.constant(bs), name="softmax/logits"), name="softmax")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return {"w6": w6, "w10": w10, "softmax_w": ws, "softmax_b": bs}


@pytest.fixture(scope="module")
def stand_in_graph(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "classify_image_graph_def.pb"
    return path, build_stand_in_graph(path)


def _images(n, h=24, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _run_graph(path, fetches, feed_name, value):
    """Run the stand-in graph through its own input path (not the backend's), for reference values."""
    import tensorflow as tf

    tf1 = tf.compat.v1
    graph_def = tf1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    graph = tf1.Graph()
    with graph.as_default():
        tf1.import_graph_def(graph_def, name="")
    with tf1.Session(graph=graph) as sess:
        return sess.run(fetches, {feed_name: value})


# --------------------------------------------------------------------------------------- registry

def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"adm-tf", "torch"} <= set(backends.backend_names())
    with pytest.raises(BackendError, match="unknown feature backend 'nope'.*adm-tf"):
        get_backend("nope")
    assert issubclass(BackendError, UserError)


def test_another_module_can_register_a_backend(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    weights = tmp_path / "proxy.bin"
    weights.write_bytes(b"proxy weights")

    class Proxy(FeatureBackend):
        name = "proxy-test"
        proxy = True

        def image_features(self, images):
            return images.reshape(len(images), -1)[:, :4].astype(np.float32), None

    register_backend("proxy-test", Proxy)
    net = get_backend("proxy-test", weights=weights, batch_size=3)
    assert isinstance(net, Proxy) and net.batch_size == 3 and net.proxy
    assert net.network_sha256 == hashlib.sha256(b"proxy weights").hexdigest()
    with pytest.raises(ValueError, match="already registered"):
        register_backend("proxy-test", Proxy)
    register_backend("proxy-test", Proxy, replace=True)
    with pytest.raises(ValueError, match="slashes"):
        register_backend("a/b", Proxy)


def test_importing_metrics_loads_neither_tensorflow_nor_torch():
    code = "import sys, bench.metrics; print('tensorflow' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_default_weights_come_from_the_asset_registry_lazily(monkeypatch, tmp_path):
    # A stand-in for bench.assets: the backend asks it only when no weights path is given.
    asked = []
    graph = tmp_path / "g.pb"
    graph.write_bytes(b"x")
    fake = types.SimpleNamespace(resolve=lambda name: asked.append(name) or graph)
    monkeypatch.setitem(sys.modules, "bench.assets", fake)
    monkeypatch.setattr(bench, "assets", fake, raising=False)
    net = get_backend("adm-tf")
    assert asked == []  # constructing costs nothing
    assert net.weights_path == graph and asked == ["adm-inception-graph"]
    assert get_backend("torch").weights_path == graph and asked[-1] == "pt-inception-fid"
    # An explicit file never consults the registry.
    assert get_backend("torch", weights=graph).weights_path == graph and len(asked) == 2


# ----------------------------------------------------------------------------------------- adm-tf

def test_adm_tf_features_are_the_graphs_tensors(stand_in_graph):
    path, w = stand_in_graph
    images = _images(3)
    with get_backend("adm-tf", weights=path, device="cpu") as net:
        pool, spatial = net.image_features(images)
        softmax = net.softmax(pool)
        assert net.network_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pool.shape == (3, 2048) and spatial.shape == (3, 17 * 17 * 7) and softmax.shape == (3, 1008)
    assert pool.dtype == spatial.dtype == softmax.dtype == np.float32
    for i in range(3):
        # The image fed through the graph's own decoded-image input, one at a time (batch 1).
        ref_pool, ref_m6 = _run_graph(path, ["pool_3:0", "mixed_6/conv:0"], "Cast:0", images[i].astype(np.float32))
        np.testing.assert_allclose(pool[i], ref_pool.reshape(-1), rtol=1e-5, atol=1e-6)
        # First 7 channels of mixed_6/conv, flattened row-major in NHWC order.
        np.testing.assert_allclose(spatial[i], ref_m6[0, :, :, :7].reshape(-1), rtol=1e-5, atol=1e-6)
    # IS softmax: pool @ (softmax/logits/MatMul weights), no bias.
    logits = pool.astype(np.float64) @ w["softmax_w"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(softmax, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-7)


def test_adm_tf_batches_and_softmax_chunks_do_not_change_features(stand_in_graph):
    path, _ = stand_in_graph
    images = _images(5, seed=1)
    with get_backend("adm-tf", weights=path, device="cpu") as net:
        together = net.image_features(images)
        apart = [np.concatenate(x) for x in zip(*(net.image_features(images[i:i + 2]) for i in range(0, 5, 2)))]
        soft5 = net.softmax(together[0])
        soft600 = net.softmax(np.repeat(together[0], 120, axis=0))  # two runs: rows 0..511 and 512..599
    for a, b in zip(together, apart):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert soft600.shape == (600, 1008)
    # Image 4 fills rows 480..599, across both runs: every copy gets the same probabilities.
    np.testing.assert_allclose(soft600[::120], soft5, rtol=1e-6)
    np.testing.assert_allclose(soft600[119::120], soft5, rtol=1e-6)


def test_adm_tf_rejects_files_that_are_not_the_inception_graph(tmp_path):
    import tensorflow as tf

    junk = tmp_path / "junk.pb"
    junk.write_bytes(b"\xff\x00 definitely not a protobuf \xff" * 10)
    with pytest.raises(BackendError, match="not a TensorFlow GraphDef"):
        get_backend("adm-tf", weights=junk).image_features(_images(1))
    other = tmp_path / "other.pb"
    graph = tf.compat.v1.Graph()
    with graph.as_default():
        tf.compat.v1.placeholder(tf.float32, [None, 3], name="ExpandDims")
    other.write_bytes(graph.as_graph_def().SerializeToString())
    with pytest.raises(BackendError, match="lacks the Inception tensors pool_3:0, mixed_6/conv:0"):
        get_backend("adm-tf", weights=other).image_features(_images(1))


def test_tf_session_grows_gpu_memory_and_can_stay_off_the_gpu():
    from bench.metrics.tf_session import import_tf, session

    tf = import_tf()
    sess = session(tf.Graph())
    assert sess._config.gpu_options.allow_growth and sess._config.allow_soft_placement
    sess.close()
    sess = session(tf.Graph(), "cpu")
    assert sess._config.device_count["GPU"] == 0
    sess.close()
    with pytest.raises(UserError, match="auto, cpu or gpu"):
        session(tf.Graph(), "tpu")


# ------------------------------------------------------------------------------------------ torch

def test_torch_inception_has_the_ports_parameter_layout():
    from bench.metrics.torch_inception import FIDInceptionV3

    model = FIDInceptionV3()
    state = model.state_dict()
    # torchvision's Inception3 names, 1008 classes, no AuxLogits: 94 conv+BN units and the classifier.
    assert len(state) == 94 * 6 + 2
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7c.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert not any(k.startswith("AuxLogits") for k in state)


@pytest.fixture(scope="module")
def port_weights(tmp_path_factory):
    """A state dict in the port's layout (random values, BN statistics set), saved as the real file is."""
    from bench.metrics.torch_inception import FIDInceptionV3

    torch.manual_seed(0)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    model.fc.bias.data.normal_(0, 10)  # a large bias: the evaluator's softmax must not use it
    # The 2018 port predates BatchNorm's step counter; loading must not need it.
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("port") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, model.eval()


def test_torch_backend_loads_the_port_and_gives_adm_shaped_features(port_weights):
    path, model = port_weights
    images = _images(2, h=40, w=36, seed=3)
    net = get_backend("torch", weights=path, device="cpu")
    pool, spatial = net.image_features(images)
    softmax = net.softmax(pool)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and softmax.shape == (2, 1008)
    assert pool.dtype == spatial.dtype == softmax.dtype == np.float32

    # Independent reference: hooks on the same modules, TF-legacy resize, (x - 128) / 128.
    from bench.metrics.torch_inception import resize_bilinear_tf1

    seen = {}
    hooks = [model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("m6", o)),
             model.Mixed_7c.register_forward_hook(lambda m, i, o: seen.__setitem__("m7c", o))]
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        model((resize_bilinear_tf1(x) - 128) / 128)
    for h in hooks:
        h.remove()
    np.testing.assert_allclose(pool, seen["m7c"].mean(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(spatial, seen["m6"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(softmax, torch.softmax(torch.from_numpy(pool) @ model.fc.weight.detach().T, 1).numpy(),
                               rtol=1e-5, atol=1e-7)
    # Batch composition does not change an image's features.
    single = net.image_features(images[1:])
    np.testing.assert_allclose(single[0], pool[1:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(single[1], spatial[1:], rtol=1e-4, atol=1e-5)


def test_torch_backend_refuses_other_state_dicts(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(BackendError, match="not the FID Inception-v3 port"):
        get_backend("torch", weights=bad).image_features(_images(1))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackendError, match="not a PyTorch state dict"):
        get_backend("torch", weights=junk).image_features(_images(1))


@pytest.mark.parametrize("size", [(13, 17), (256, 256), (299, 299), (512, 384)])
def test_torch_resize_matches_tf1_resize_bilinear(size):
    import tensorflow as tf

    from bench.metrics.torch_inception import resize_bilinear_tf1

    images = _images(1, *size, seed=4).astype(np.float32)
    expected = tf.raw_ops.ResizeBilinear(images=images, size=[299, 299], align_corners=False,
                                         half_pixel_centers=False).numpy()
    got = resize_bilinear_tf1(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
    if size == (299, 299):
        np.testing.assert_array_equal(got, images)
