"""dit-bench: the method-agnostic harness (diffusion, sampling, metrics, timing, reports)."""

__version__ = "0.1.0"
