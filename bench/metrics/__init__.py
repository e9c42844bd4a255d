"""ADM-compatible quality metrics: FID, sFID, Inception Score, improved precision/recall.

The maths are plain functions on arrays and reproduce the ADM evaluator
(openai/guided-diffusion ``evaluations/evaluator.py``) to its printed digits; features come from
named backends (``adm-tf``: the evaluator's own TF graph; ``torch``: a PyTorch port for speed).
Importing this package imports neither TensorFlow nor the network code.
"""
from bench.metrics.backends import (BackendError, FeatureBackend, Features, backend_names, get_backend,
                                    register_backend)
from bench.metrics.fid import FIDError, frechet_distance, statistics
from bench.metrics.inception_score import inception_score
from bench.metrics.precision_recall import manifold_radii, precision_recall

__all__ = [
    "BackendError", "FIDError", "FeatureBackend", "Features", "backend_names", "frechet_distance",
    "get_backend", "inception_score", "manifold_radii", "precision_recall", "register_backend", "statistics",
]
