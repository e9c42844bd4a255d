"""TensorFlow, imported on demand and told to share the machine.

The ADM evaluator runs its graphs in a TF1 session with GPU memory growth on; we do the same so TF
never grabs the whole GPU from a torch process in the same program, and ``DIT_BENCH_TF_DEVICE=cpu``
(or ``device="cpu"``) keeps TF off the GPU entirely.
"""
from __future__ import annotations

import os


def import_tf():
    """tensorflow.compat.v1, quiet, with memory growth set on every GPU before TF touches one."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by an earlier session: growth was set then
            pass
    return tf.compat.v1


def session(graph, device: str | None = None):
    """A TF1 session on ``graph``; ``device="cpu"`` hides the GPUs from it."""
    tf = import_tf()
    device = device or os.environ.get("DIT_BENCH_TF_DEVICE") or "auto"
    if device.startswith("cuda"):  # the torch spelling, accepted for one --device across backends
        device = "gpu"
    if device not in ("auto", "cpu", "gpu"):
        from bench.errors import UserError

        raise UserError(f"TensorFlow device must be auto, cpu or gpu, got {device!r}")
    config = tf.ConfigProto(allow_soft_placement=True)  # as the evaluator: CPU-only ops fall back
    config.gpu_options.allow_growth = True
    if device == "cpu":
        config.device_count["GPU"] = 0
    return tf.Session(graph=graph, config=config)
