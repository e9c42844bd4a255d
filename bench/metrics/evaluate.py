"""`dit-bench evaluate`: the ADM evaluator's five numbers for a sample batch against a reference batch.

The order is the evaluator's: features of the reference images and of the samples, statistics
(the reference's precomputed ones where it has them), then IS, FID, sFID, precision and recall.
The result says which backend and which network file produced it, which reference (by hash), and
whether it followed the papers' protocol (50,000 samples).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.errors import UserError
from bench.metrics.backends import FeatureBackend, Features, get_backend
from bench.metrics.fid import frechet_distance, statistics
from bench.metrics.inception_score import SPLIT_SIZE, inception_score
from bench.metrics.precision_recall import precision_recall
from bench.metrics.reference import ImageBatch, load_cached, open_batch, save_cached

PROTOCOL_NUM_SAMPLES = 50_000  # FID-50k: ADM, DiT and every seed paper


class ResolutionMismatch(UserError):
    """Samples and reference images of different sizes."""


def resolve_reference(reference: str | os.PathLike) -> tuple[Path, str]:
    """(path, name): a local .npz, or a registered reference batch such as ``adm-ref-imagenet256``."""
    path = Path(reference).expanduser()
    if path.is_file():
        return path, path.name
    from bench import assets  # only a named reference needs the asset registry

    return Path(assets.resolve(os.fspath(reference))), os.fspath(reference)


def extract_features(batch: ImageBatch, backend: FeatureBackend, *, cache: bool = True, progress: bool = False,
                     label: str = "", warnings: list[str] | None = None) -> Features:
    """Features of every image of ``batch``, from the cache beside it when it matches."""
    warnings = warnings if warnings is not None else []
    if cache:
        cached = load_cached(batch, backend.name, backend.network_sha256)
        if cached is not None:
            return cached
    pools, spatials = [], []
    with _Progress(progress, f"{label or batch.path.name} ({backend.name})", batch.num_images) as advance:
        for images in batch.batches(backend.batch_size):
            pool, spatial = backend.image_features(images)
            pools.append(pool)
            spatials.append(spatial)
            advance(len(images))
    pool = np.concatenate(pools)
    spatial = None if spatials[0] is None else np.concatenate(spatials)
    feats = Features(pool, spatial, backend.softmax(pool))
    if cache:
        try:
            save_cached(batch, backend.name, backend.network_sha256, feats)
        except OSError as exc:  # a read-only folder costs the next run time, not this run its result
            warnings.append(f"features of {batch.path.name} not cached ({exc.strerror or exc})")
    return feats


class _Progress:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, enabled: bool, label: str, total: int):
        self.enabled, self.label, self.total = enabled, label, total

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self.bar.__enter__()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)


def _protocol_warnings(num_samples: int) -> list[str]:
    out = []
    if num_samples < PROTOCOL_NUM_SAMPLES:
        out.append(f"FID-{num_samples / 1000:g}k is not FID-50k: {num_samples} samples, the papers' protocol "
                   f"uses {PROTOCOL_NUM_SAMPLES}; compare only with numbers of the same sample count")
    last = num_samples % SPLIT_SIZE
    if last and num_samples > SPLIT_SIZE:
        out.append(f"IS: the last split has {last} samples and counts as a full split (the evaluator's rule)")
    return out


def evaluate(reference: str | os.PathLike, samples: str | os.PathLike, *, backend: str = "adm-tf",
             weights: str | os.PathLike | None = None, device: str | None = None, batch_size: int | None = None,
             cache: bool = True, progress: bool = False, pr_engine: str = "tf",
             cross_check: int = 0, cross_check_backend: str = "adm-tf",
             cross_check_weights: str | os.PathLike | None = None) -> dict:
    """Evaluate ``samples`` against ``reference``; returns the result dict (kind "quality")."""
    t_start = time.perf_counter()
    ref_path, ref_name = resolve_reference(reference)
    ref = open_batch(ref_path, "reference")
    smp = open_batch(samples, "samples")
    if smp.resolution != ref.resolution:
        raise ResolutionMismatch(f"samples are {smp.resolution[0]}x{smp.resolution[1]} but reference {ref_name} is "
                                 f"{ref.resolution[0]}x{ref.resolution[1]}; evaluate against the reference "
                                 f"batch of the samples' resolution")
    warnings = _protocol_warnings(smp.num_images)
    ref_stats = ref.statistics()

    net = get_backend(backend, weights=weights, device=device, batch_size=batch_size)
    try:
        ref_feats = extract_features(ref, net, cache=cache, progress=progress, label=f"reference {ref_name}",
                                     warnings=warnings)
        smp_feats = extract_features(smp, net, cache=cache, progress=progress, label=f"samples {smp.path.name}",
                                     warnings=warnings)
    finally:
        net.close()
    t_features = time.perf_counter()

    if ref_stats is not None and net.inception_space:
        ref_source = "precomputed"
        if backend != "adm-tf":
            warnings.append(f"reference statistics come from the official TF graph, sample features from "
                            f"backend '{backend}'; expect small differences from an adm-tf run")
    else:
        ref_source = "computed"
        ref_stats = {"mu": None, "sigma": None, "mu_s": None, "sigma_s": None}
        ref_stats["mu"], ref_stats["sigma"] = statistics(ref_feats.pool)
        if ref_feats.spatial is not None:
            ref_stats["mu_s"], ref_stats["sigma_s"] = statistics(ref_feats.spatial)

    metrics = {"fid": None, "sfid": None, "inception_score": None, "precision": None, "recall": None}
    if smp_feats.softmax is not None:
        metrics["inception_score"] = inception_score(smp_feats.softmax)
    else:
        warnings.append(f"backend '{backend}' has no classifier: no Inception Score")
    # The evaluator's argument order: samples' statistics first, the reference's second.
    metrics["fid"] = frechet_distance(*statistics(smp_feats.pool), ref_stats["mu"], ref_stats["sigma"])
    if smp_feats.spatial is not None and ref_stats["mu_s"] is not None:
        metrics["sfid"] = frechet_distance(*statistics(smp_feats.spatial), ref_stats["mu_s"], ref_stats["sigma_s"])
    else:
        warnings.append(f"backend '{backend}' has no spatial features: no sFID")
    metrics["precision"], metrics["recall"] = precision_recall(ref_feats.pool, smp_feats.pool, engine=pr_engine)
    t_metrics = time.perf_counter()

    result = {
        "kind": "quality",
        "metrics": metrics,
        "protocol": {
            "num_samples": smp.num_images,
            "evaluator": backend,
            "reference": ref_name,
            "reference_sha256": ref.sha256,
            "feature_network": net.weights_path.name,
            "feature_network_sha256": net.network_sha256,
            "full_protocol": smp.num_images >= PROTOCOL_NUM_SAMPLES,
            "image_size": list(smp.resolution),
            "num_reference_images": ref.num_images,
            "reference_statistics": ref_source,
            "is_split_size": SPLIT_SIZE,
            "proxy": net.proxy,
        },
        "subject": {"samples": str(smp.path), "samples_sha256": smp.sha256},
        "warnings": warnings,
        "extra": {"timing_s": {"features": round(t_features - t_start, 3),
                               "metrics": round(t_metrics - t_features, 3)}},
    }
    if cross_check:
        result["cross_check"] = compare_backends(smp, smp_feats, backend, cross_check_backend, cross_check,
                                                 weights=cross_check_weights, device=device)
    return result


def compare_backends(batch: ImageBatch, feats: Features, backend: str, other: str, n: int, *,
                     weights=None, device=None) -> dict:
    """Features of the first ``n`` images by a second backend, against ``feats`` (the torch port vs adm-tf)."""
    n = min(n, batch.num_images)
    net = get_backend(other, weights=weights, device=device)
    try:
        pools, spatials = [], []
        for images in batch.batches(net.batch_size):
            pool, spatial = net.image_features(images[: n - sum(len(p) for p in pools)])
            pools.append(pool)
            spatials.append(spatial)
            if sum(len(p) for p in pools) >= n:
                break
        pool = np.concatenate(pools)
        softmax = net.softmax(pool)
    finally:
        net.close()
    mine = feats.head(n)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    out = {"backend": backend, "against": other, "num_images": n, "against_network_sha256": net.network_sha256,
           "pool_max_abs_diff": float(np.abs(mine.pool - pool).max()), "pool_rel_l2": rel(mine.pool, pool)}
    if mine.spatial is not None and spatials[0] is not None:
        out["spatial_rel_l2"] = rel(mine.spatial, np.concatenate(spatials))
    if mine.softmax is not None and softmax is not None:
        out["top1_agreement"] = float(np.mean(mine.softmax.argmax(1) == softmax.argmax(1)))
    return out
