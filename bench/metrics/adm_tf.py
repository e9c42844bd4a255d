"""``adm-tf``: the ADM evaluator's Inception-v3 graph run by TensorFlow, the reference backend (dit.md E.2).

The frozen 2015 graph ``classify_image_graph_def.pb`` is imported with its decoded-JPEG tensor
``ExpandDims:0`` replaced by a float32 N x H x W x 3 placeholder, so everything after it is the
graph's own: TF1 bilinear resize to 299 and (x - 128) / 128. Images go in as the evaluator feeds
them: uint8 cast to float32, 64 per batch. Fetched: ``pool_3:0`` (2048-d) and ``mixed_6/conv:0``
(17 x 17 x 192, first 7 channels kept, flattened in NHWC order to 2023-d). The softmax for IS
multiplies pool features by the weight matrix feeding ``softmax/logits/MatMul`` (no bias), 512 rows
per run, as the evaluator does.
"""
from __future__ import annotations

import numpy as np

from bench.metrics.backends import BackendError, FeatureBackend

INPUT_TENSOR = "ExpandDims:0"
POOL_TENSOR = "pool_3:0"
SPATIAL_TENSOR = "mixed_6/conv:0"
SOFTMAX_MATMUL = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7]
SOFTMAX_BATCH_SIZE = 512


class AdmTFBackend(FeatureBackend):
    name = "adm-tf"
    asset_name = "adm-inception-graph"
    default_batch_size = 64  # the evaluator's image batch
    inception_space = True

    def __init__(self, weights=None, *, device: str | None = None, batch_size: int | None = None):
        super().__init__(weights, device=device, batch_size=batch_size)
        self._sess = None

    def _load(self):
        if self._sess is not None:
            return
        from bench.metrics.tf_session import import_tf, session

        tf = import_tf()
        graph_def = tf.GraphDef()
        try:
            graph_def.ParseFromString(self.weights_path.read_bytes())
        except Exception as exc:  # protobuf's DecodeError is not importable the same way everywhere
            raise BackendError(f"{self.weights_path} is not a TensorFlow GraphDef (.pb): {exc}") from None
        nodes = {node.name for node in graph_def.node}
        missing = [t for t in (INPUT_TENSOR, POOL_TENSOR, SPATIAL_TENSOR, SOFTMAX_MATMUL)
                   if t.split(":")[0] not in nodes]
        if missing:
            raise BackendError(f"{self.weights_path} lacks the Inception tensors {', '.join(missing)}; "
                               f"it is not the ADM evaluator's classify_image_graph_def.pb")
        graph = tf.Graph()
        with graph.as_default():
            self._images = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            pool, spatial = tf.import_graph_def(graph_def, input_map={INPUT_TENSOR: self._images},
                                                return_elements=[POOL_TENSOR, SPATIAL_TENSOR], name="inception")
            # The classifier weights of the same graph: the evaluator's IS uses them without the bias.
            weights = graph.get_operation_by_name(f"inception/{SOFTMAX_MATMUL}").inputs[1]
            self._pool_in = tf.placeholder(tf.float32, shape=[None, weights.shape[0]])
            self._softmax = tf.nn.softmax(tf.matmul(self._pool_in, weights))
        self._pool, self._spatial = pool, spatial
        self._sess = session(graph, self.device)

    def image_features(self, images: np.ndarray):
        self._load()
        pool, spatial = self._sess.run([self._pool, self._spatial], {self._images: images.astype(np.float32)})
        # Slicing and flattening in numpy instead of the graph: same values, and no dependence on the
        # graph's static batch-1 shapes (which the evaluator has to patch).
        spatial = spatial[..., :SPATIAL_CHANNELS]
        return pool.reshape(len(pool), -1), spatial.reshape(len(spatial), -1)

    def softmax(self, pool: np.ndarray) -> np.ndarray:
        self._load()
        parts = [self._sess.run(self._softmax, {self._pool_in: pool[i:i + SOFTMAX_BATCH_SIZE]})
                 for i in range(0, len(pool), SOFTMAX_BATCH_SIZE)]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 1008), np.float32)

    def close(self) -> None:
        if self._sess is not None:
            self._sess.close()
            self._sess = None
