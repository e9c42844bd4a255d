"""Timing device work: warm-up, synchronisation, CUDA events, repeats and their statistics.

A GPU runs work asynchronously, so a host clock read right after a call measures only how long the launch
took. Every measurement here synchronises the device before starting and before stopping the clock (on CUDA
the interval is read from ``torch.cuda.Event`` pairs instead of the host clock). U-DiT's latency script
(reference/udit.md §9) reads ``time.time()`` without synchronising: that is the mistake this module exists
to avoid. The clock and the synchronisation are injectable so tests can prove, on a fake device whose work
completes only on sync, that queued work is counted.

Papers that publish a timing define it their own way; ``PROTOCOLS`` reproduces those definitions where a
comparison needs them (FasterDiffusion: reference/fasterdiffusion.md §8).
"""
from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Iterable

import numpy as np
import torch

from bench.errors import UserError

Clock = Callable[[], float]
Sync = Callable[[], None]


class TimingError(UserError):
    """A timing request that cannot be measured (no repeats, a batch that never fits in memory)."""


def _as_device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def device_sync(device: torch.device | str | None) -> Sync:
    """A function that blocks until all work queued on ``device`` has finished."""
    device = _as_device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    backend = getattr(torch, device.type, None)  # mps, xpu, ... expose the same synchronize()
    if device.type != "cpu" and hasattr(backend, "synchronize"):
        return backend.synchronize
    return lambda: None  # CPU work is done when the call returns


class Timer:
    """``with Timer(device) as t: work()`` then ``t.elapsed_s``: the device time of the enclosed work.

    The device is synchronised on entry (so earlier queued work is not counted) and on exit (so the
    enclosed work is). On CUDA, unless a host ``clock`` is injected, the interval comes from a pair of
    CUDA events recorded on the current stream.
    """

    def __init__(self, device: torch.device | str | None = None, *, sync: Sync | None = None,
                 clock: Clock | None = None, cuda_events: bool | None = None):
        self.device = _as_device(device)
        self._sync = sync if sync is not None else device_sync(self.device)
        self._clock = clock if clock is not None else time.perf_counter
        if cuda_events is None:
            cuda_events = self.device.type == "cuda" and clock is None
        self.cuda_events = cuda_events
        self.elapsed_s: float | None = None

    @property
    def kind(self) -> str:
        return "cuda_event" if self.cuda_events else "host_clock"

    def __enter__(self) -> "Timer":
        self.elapsed_s = None
        self._sync()
        if self.cuda_events:
            self._start = self._record_event()
        else:
            self._t0 = self._clock()
        return self

    def _record_event(self) -> "torch.cuda.Event":
        """An event on the timed device's current stream (not cuda:0's when the work runs on cuda:1)."""
        with torch.cuda.device(self.device):
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
        return event

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            return  # a failed call has no time; the exception propagates
        if self.cuda_events:
            end = self._record_event()
            self._sync()  # elapsed_time needs both events completed
            self.elapsed_s = self._start.elapsed_time(end) / 1e3  # events report milliseconds
        else:
            self._sync()
            self.elapsed_s = self._clock() - self._t0


@dataclass(frozen=True)
class TimingStats:
    """Repeated timings of one call and their summary; every field in seconds except ``n``/``warmup``."""

    n: int
    median_s: float
    mean_s: float
    std_s: float  # sample standard deviation (ddof=1); 0 for a single run
    p10_s: float
    p90_s: float
    iqr_s: float  # p75 - p25
    min_s: float
    max_s: float
    warmup: int
    timer: str  # "cuda_event" or "host_clock"
    samples_s: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_samples(cls, samples_s, *, warmup: int = 0, timer: str = "host_clock") -> "TimingStats":
        times = np.asarray(list(samples_s), dtype=np.float64)
        if times.size == 0:
            raise TimingError("no timed runs: use at least one repeat")
        p10, p25, p50, p75, p90 = np.percentile(times, [10, 25, 50, 75, 90])
        return cls(
            n=int(times.size), median_s=float(p50), mean_s=float(times.mean()),
            std_s=float(times.std(ddof=1)) if times.size > 1 else 0.0,
            p10_s=float(p10), p90_s=float(p90), iqr_s=float(p75 - p25),
            min_s=float(times.min()), max_s=float(times.max()),
            warmup=warmup, timer=timer, samples_s=tuple(float(t) for t in times),
        )

    def per_item(self, items: int) -> "TimingStats":
        """The same statistics per item (per image of a batch): every quantile scales linearly."""
        if items < 1:
            raise TimingError(f"items per call must be >= 1, got {items}")
        return TimingStats.from_samples([t / items for t in self.samples_s], warmup=self.warmup, timer=self.timer)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["samples_s"] = list(self.samples_s)
        return out


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 10,
            device: torch.device | str | None = None, sync: Sync | None = None,
            clock: Clock | None = None, cuda_events: bool | None = None,
            during: Iterable[ContextManager] = ()) -> TimingStats:
    """Call ``fn`` ``warmup`` times untimed, then time ``repeats`` calls, each synchronised on both ends.

    ``during`` are context managers open exactly around the timed calls, after the warm-up's work has
    finished (e.g. a telemetry.PowerSampler and PeakMemory, so energy per image counts timed images only).
    """
    if repeats < 1:
        raise TimingError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise TimingError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    sync = sync if sync is not None else device_sync(device)
    timer = Timer(device, sync=sync, clock=clock, cuda_events=cuda_events)
    samples = []
    sync()  # the warm-up's queued work is not part of the windows
    with contextlib.ExitStack() as stack:
        for window in during:
            stack.enter_context(window)
        for _ in range(repeats):
            with timer:
                fn()
            samples.append(timer.elapsed_s)
    return TimingStats.from_samples(samples, warmup=warmup, timer=timer.kind)


def speed_metrics(stats: TimingStats, images_per_call: int) -> dict[str, float]:
    """Result-record metrics (bench/results.py names) from the median time of one call."""
    if images_per_call < 1:
        raise TimingError(f"images per call must be >= 1, got {images_per_call}")
    return {
        "latency_s": stats.median_s,
        "s_per_image": stats.median_s / images_per_call,
        "images_per_s": images_per_call / stats.median_s,
    }


class StepRate:
    """Steps per second over logging windows, the way DiT's train.py logs it: sync, then wall clock.

    Call ``step()`` after every optimiser step and ``window()`` at each log line; a window's rate is its
    step count over its synchronised wall time, and the next window starts where this one ended.
    """

    def __init__(self, device: torch.device | str | None = None, *, sync: Sync | None = None,
                 clock: Clock | None = None):
        self._sync = sync if sync is not None else device_sync(device)
        self._clock = clock if clock is not None else time.perf_counter
        self._sync()
        self._t0 = self._clock()
        self._steps = 0

    def step(self, n: int = 1) -> None:
        self._steps += n

    def window(self) -> float:
        self._sync()
        now = self._clock()
        rate = self._steps / (now - self._t0)
        self._t0, self._steps = now, 0
        return rate


@dataclass(frozen=True)
class TimingProtocol:
    """How a timing is taken, as it goes into a result record's protocol card."""

    name: str
    warmup: int
    repeats: int
    images_per_call: int
    statistic: str  # which summary the metric uses
    excludes: tuple[str, ...] = ()
    source: str = ""
    notes: str = ""

    def measure(self, fn: Callable[[], Any], **kwargs) -> TimingStats:
        return measure(fn, warmup=self.warmup, repeats=self.repeats, **kwargs)

    def metrics(self, stats: TimingStats) -> dict[str, float]:
        return speed_metrics(stats, self.images_per_call)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["excludes"] = list(self.excludes)
        return out


PROTOCOLS = {
    # dit-bench's own: enough repeats for a median and a spread, synchronised on both ends.
    "dit-bench": TimingProtocol(
        name="dit-bench", warmup=3, repeats=10, images_per_call=1, statistic="median",
        source="bench/timing.py", notes="images_per_call is the batch size of the timed call"),
    # FasterDiffusion's sample_fasterdiffusion.py: 2 warm-up runs, then the wall time of ONE 250-step DDPM
    # p_sample_loop on 8 class labels (16 rows with CFG), VAE decode excluded, divided by 8 (§8). A single
    # run has no spread; the median of n=1 is that run.
    "fasterdiffusion": TimingProtocol(
        name="fasterdiffusion", warmup=2, repeats=1, images_per_call=8, statistic="median",
        excludes=("vae_decode",), source="reference/fasterdiffusion.md §8 (sample_fasterdiffusion.py)",
        notes="250 DDPM steps, CFG on (batch of 8 labels + 8 null), TF32 on, fixed labels "
              "[207,360,387,974,88,979,417,279], noise seed 3407"),
}


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocator failure on any device (CUDA, MPS, CPU), false for every other error."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):  # MemoryError: numpy / Python on the host
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def _release_memory(device: torch.device) -> None:
    gc.collect()  # frames held by the traceback keep the failed batch's tensors alive until collected
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class BatchTrial:
    batch_size: int
    images_per_s: float | None  # None when the batch ran out of memory
    out_of_memory: bool = False


@dataclass
class SaturationResult:
    """The batch size where throughput saturates, with every trial that led there."""

    batch_size: int
    images_per_s: float
    stats: TimingStats
    stopped_by: str  # "saturated", "out_of_memory" or "max_batch"
    trials: list[BatchTrial]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size, "images_per_s": self.images_per_s, "stopped_by": self.stopped_by,
            "message": self.message, "trials": [asdict(t) for t in self.trials], "stats": self.stats.to_dict(),
        }


def find_saturating_batch(run: Callable[[int], Any], start: int = 1, max_batch: int = 1024, *,
                          min_gain: float = 0.05, warmup: int = 1, repeats: int = 3,
                          device: torch.device | str | None = None, sync: Sync | None = None,
                          clock: Clock | None = None, cuda_events: bool | None = None) -> SaturationResult:
    """Double the batch from ``start`` while throughput improves by more than ``min_gain``.

    ``run(batch)`` does the work for one batch of that many images. The search stops at the first
    doubling that gains ``min_gain`` or less (the smaller batch is kept: the same speed for less
    memory), at ``max_batch``, or at an out-of-memory error, after which the last batch that fitted is
    kept and the result says so. If even ``start`` runs out of memory, the batch is halved until it fits.
    """
    if start < 1 or max_batch < start:
        raise TimingError(f"need 1 <= start <= max_batch, got start={start}, max_batch={max_batch}")
    dev = _as_device(device)
    trials: list[BatchTrial] = []

    def attempt(batch: int) -> TimingStats | None:
        try:
            stats = measure(lambda: run(batch), warmup=warmup, repeats=repeats, device=dev, sync=sync,
                            clock=clock, cuda_events=cuda_events)
        except Exception as exc:  # noqa: BLE001 - only allocator failures are handled, the rest re-raised
            if not is_out_of_memory(exc):
                raise
            stats = None
        if stats is None:  # released outside the except block, once the traceback is gone
            trials.append(BatchTrial(batch, None, out_of_memory=True))
            _release_memory(dev)
            return None
        trials.append(BatchTrial(batch, batch / stats.median_s))
        return stats

    batch, stats = start, attempt(start)
    while stats is None:  # the starting batch itself does not fit
        if batch == 1:
            raise TimingError(f"batch size 1 runs out of memory on {dev}; use a smaller model or another device")
        batch //= 2
        stats = attempt(batch)
    if batch < start:
        return SaturationResult(batch, batch / stats.median_s, stats, "out_of_memory", trials,
                                f"batch {start} ran out of memory; stepped down to {batch}")

    best_batch, best_stats = batch, stats
    while True:
        if best_batch * 2 > max_batch:
            return SaturationResult(best_batch, best_batch / best_stats.median_s, best_stats, "max_batch", trials,
                                    f"reached max_batch {max_batch} while throughput was still rising")
        candidate = best_batch * 2
        stats = attempt(candidate)
        if stats is None:
            return SaturationResult(best_batch, best_batch / best_stats.median_s, best_stats, "out_of_memory",
                                    trials, f"batch {candidate} ran out of memory; stepped back to {best_batch}")
        best_rate, rate = best_batch / best_stats.median_s, candidate / stats.median_s
        if rate <= best_rate * (1 + min_gain):
            return SaturationResult(best_batch, best_rate, best_stats, "saturated", trials,
                                    f"batch {candidate} gained {rate / best_rate - 1:+.1%} over {best_batch} "
                                    f"(threshold {min_gain:.0%}); kept {best_batch}")
        best_batch, best_stats = candidate, stats
