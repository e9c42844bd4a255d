"""Timing: a measurement must include the device work it started, and nothing queued before it.

The fake device below queues work asynchronously, like a GPU stream: a call returns at once and the work
"completes" (the host clock advances by it) only when the device is synchronised. A timer that forgets to
synchronise measures 0 s on it; one that forgets to synchronise before starting also counts the backlog.
"""
import json
import math

import pytest
import torch

from bench.errors import UserError
from bench.timing import (
    PROTOCOLS, StepRate, Timer, TimingError, TimingStats, find_saturating_batch, is_out_of_memory, measure,
    speed_metrics,
)


class FakeDevice:
    """An asynchronous device with a host clock: launching is free, sync waits for the queued work."""

    def __init__(self):
        self.now = 0.0  # host clock, seconds
        self.pending = 0.0  # queued, unfinished device work, seconds
        self.syncs = 0

    def launch(self, seconds: float) -> None:
        self.pending += seconds

    def sync(self) -> None:
        self.now += self.pending
        self.pending = 0.0
        self.syncs += 1

    def clock(self) -> float:
        return self.now


class FakeCudaEvent:
    """torch.cuda.Event on the fake device: stamped when the stream reaches it, readable once synced."""

    device: FakeDevice

    def __init__(self, enable_timing=False):
        assert enable_timing, "timing events must be created with enable_timing=True"

    def record(self, stream=None):
        assert stream == ("stream of", self.device.current), "recorded on the timed device's stream"
        self.stamp = self.device.now + self.device.pending
        self.recorded_at_sync = self.device.syncs

    def elapsed_time(self, end):
        for event in (self, end):
            if self.device.syncs <= event.recorded_at_sync:
                raise RuntimeError("event has not completed")
        return (end.stamp - self.stamp) * 1e3  # milliseconds, as CUDA reports


def test_measure_counts_queued_work_only_because_it_synchronises():
    dev = FakeDevice()
    stats = measure(lambda: dev.launch(0.25), warmup=2, repeats=5, sync=dev.sync, clock=dev.clock)
    assert stats.samples_s == (0.25,) * 5
    assert (stats.n, stats.median_s, stats.std_s, stats.warmup, stats.timer) == (5, 0.25, 0.0, 2, "host_clock")
    # The same work timed without synchronising (U-DiT's latency script, udit.md §9) measures nothing.
    unsynced = measure(lambda: dev.launch(0.25), warmup=0, repeats=3, sync=lambda: None, clock=dev.clock)
    assert unsynced.samples_s == (0.0, 0.0, 0.0)


def test_backlog_from_warmup_is_not_counted():
    dev = FakeDevice()
    durations = iter([3.0, 0.5, 0.5, 0.5])  # the first (warm-up) call is slow, e.g. autotuning
    stats = measure(lambda: dev.launch(next(durations)), warmup=1, repeats=3, sync=dev.sync, clock=dev.clock)
    assert stats.samples_s == (0.5, 0.5, 0.5)


def test_warmup_and_repeat_call_counts():
    calls = []
    measure(lambda: calls.append(1), warmup=4, repeats=7)
    assert len(calls) == 11


def test_statistics_of_known_samples():
    dev = FakeDevice()
    durations = iter([0.5, 0.1, 0.4, 0.2, 0.3])
    stats = measure(lambda: dev.launch(next(durations)), warmup=0, repeats=5, sync=dev.sync, clock=dev.clock)
    # numpy's linear-interpolation percentiles of {0.1, ..., 0.5}: p10 = 0.14, p25 = 0.2, p75 = 0.4, p90 = 0.46
    assert stats.median_s == pytest.approx(0.3)
    assert stats.mean_s == pytest.approx(0.3)
    assert stats.std_s == pytest.approx(math.sqrt(0.025))  # sample std, ddof=1
    assert stats.p10_s == pytest.approx(0.14)
    assert stats.p90_s == pytest.approx(0.46)
    assert stats.iqr_s == pytest.approx(0.2)
    assert (stats.min_s, stats.max_s) == pytest.approx((0.1, 0.5))
    assert stats.samples_s == pytest.approx((0.5, 0.1, 0.4, 0.2, 0.3))  # in the order they were taken


def test_cuda_event_path_reads_events_after_synchronising(monkeypatch):
    dev = FakeDevice()
    dev.current = None
    FakeCudaEvent.device = dev

    class OnDevice:  # torch.cuda.device(d): events created inside belong to d
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            dev.current = self.device

        def __exit__(self, *exc):
            dev.current = None

    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    monkeypatch.setattr(torch.cuda, "device", OnDevice)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: ("stream of", device))
    durations = iter([2.0, 0.125, 0.25, 0.5])
    stats = measure(lambda: dev.launch(next(durations)), warmup=1, repeats=3, device="cuda:1", sync=dev.sync)
    assert stats.timer == "cuda_event"
    assert stats.samples_s == (0.125, 0.25, 0.5)


def test_injected_clock_on_cuda_uses_the_clock_not_events(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", None)  # would fail if used
    dev = FakeDevice()
    timer = Timer("cuda", sync=dev.sync, clock=dev.clock)
    with timer:
        dev.launch(1.5)
    assert (timer.kind, timer.elapsed_s) == ("host_clock", 1.5)


def test_timer_on_failure_has_no_time_and_reraises():
    timer = Timer()
    with pytest.raises(ZeroDivisionError):
        with timer:
            1 / 0
    assert timer.elapsed_s is None


def test_real_cpu_work_gives_ordered_statistics():
    a = torch.randn(64, 64)
    stats = measure(lambda: a @ a, warmup=1, repeats=9, device="cpu")
    assert stats.n == 9 and stats.timer == "host_clock"
    assert all(t > 0 for t in stats.samples_s)
    assert stats.min_s <= stats.p10_s <= stats.median_s <= stats.p90_s <= stats.max_s
    assert stats.iqr_s >= 0 and stats.std_s >= 0


def test_per_item_and_to_dict():
    stats = TimingStats.from_samples([8.0, 16.0, 24.0], warmup=2, timer="cuda_event")
    per_image = stats.per_item(8)
    assert per_image.samples_s == (1.0, 2.0, 3.0)
    assert (per_image.median_s, per_image.mean_s, per_image.std_s) == (2.0, 2.0, 1.0)
    assert (per_image.warmup, per_image.timer) == (2, "cuda_event")
    record = json.loads(json.dumps(per_image.to_dict()))
    assert record["samples_s"] == [1.0, 2.0, 3.0]
    assert set(record) == {"n", "median_s", "mean_s", "std_s", "p10_s", "p90_s", "iqr_s", "min_s", "max_s",
                           "warmup", "timer", "samples_s"}


def test_speed_metrics_use_result_record_names():
    stats = TimingStats.from_samples([2.0, 2.0, 3.0, 1.0, 2.0])
    assert speed_metrics(stats, images_per_call=8) == {"latency_s": 2.0, "s_per_image": 0.25, "images_per_s": 4.0}


def test_fasterdiffusion_protocol_times_one_loop_after_two_warmups_and_divides_by_8():
    dev = FakeDevice()
    loops = []

    def p_sample_loop():  # 250 DDPM steps, each a CFG forward on 16 rows queued on the device
        loops.append(1)
        for _ in range(250):
            dev.launch(0.02)

    protocol = PROTOCOLS["fasterdiffusion"]
    stats = protocol.measure(p_sample_loop, sync=dev.sync, clock=dev.clock)
    assert len(loops) == 3 and stats.n == 1
    metrics = protocol.metrics(stats)
    assert metrics["latency_s"] == pytest.approx(5.0)
    assert metrics["s_per_image"] == pytest.approx(0.625)
    card = json.loads(json.dumps(protocol.to_dict()))
    assert (card["warmup"], card["repeats"], card["images_per_call"]) == (2, 1, 8)
    assert "vae_decode" in card["excludes"]


def test_step_rate_windows():
    dev = FakeDevice()
    rate = StepRate(sync=dev.sync, clock=dev.clock)
    for _ in range(100):
        dev.launch(0.5)
        rate.step()
    assert rate.window() == pytest.approx(2.0)
    for _ in range(10):
        dev.launch(0.25)
        rate.step()
    assert rate.window() == pytest.approx(4.0)  # the second window does not include the first


@pytest.mark.parametrize("bad", [dict(repeats=0), dict(warmup=-1)])
def test_bad_counts_are_user_errors(bad):
    with pytest.raises(UserError, match="must be >= "):
        measure(lambda: None, **{"warmup": 0, "repeats": 1, **bad})


# --- find_saturating_batch -------------------------------------------------------------------------------

def batched_work(dev, *, oom_above=None, error=None):
    """A batch costs 0.1 s fixed overhead + 0.01 s per image; above ``oom_above`` it fails to allocate."""
    def run(batch):
        if oom_above is not None and batch > oom_above:
            raise error or torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} GiB")
        dev.launch(0.1 + 0.01 * batch)
    return run


def test_saturation_stops_when_doubling_gains_5_percent_or_less():
    dev = FakeDevice()
    result = find_saturating_batch(batched_work(dev), start=1, max_batch=4096, sync=dev.sync, clock=dev.clock)
    # images/s = b / (0.1 + 0.01 b): 128 -> 92.75 (+7.2% over 64), 256 -> 96.24 (+3.8%): keep 128
    assert result.batch_size == 128 and result.stopped_by == "saturated"
    assert result.images_per_s == pytest.approx(128 / 1.38)
    assert [t.batch_size for t in result.trials] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert not any(t.out_of_memory for t in result.trials)
    assert result.stats.median_s == pytest.approx(1.38)


@pytest.mark.parametrize("error", [None, RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()])
def test_out_of_memory_steps_back_and_says_so(error):
    dev = FakeDevice()
    run = batched_work(dev, oom_above=40, error=error)
    result = find_saturating_batch(run, start=4, max_batch=4096, sync=dev.sync, clock=dev.clock)
    assert result.batch_size == 32 and result.stopped_by == "out_of_memory"
    assert result.images_per_s == pytest.approx(32 / 0.42)
    assert [(t.batch_size, t.out_of_memory) for t in result.trials] == [
        (4, False), (8, False), (16, False), (32, False), (64, True)]
    assert "batch 64 ran out of memory" in result.message and "32" in result.message
    assert json.loads(json.dumps(result.to_dict()))["trials"][-1] == {
        "batch_size": 64, "images_per_s": None, "out_of_memory": True}


def test_start_that_does_not_fit_is_halved():
    dev = FakeDevice()
    result = find_saturating_batch(batched_work(dev, oom_above=20), start=64, sync=dev.sync, clock=dev.clock)
    assert result.batch_size == 16 and result.stopped_by == "out_of_memory"
    assert [t.batch_size for t in result.trials] == [64, 32, 16]


def test_nothing_fits_is_a_user_error():
    dev = FakeDevice()
    with pytest.raises(TimingError, match="batch size 1 runs out of memory"):
        find_saturating_batch(batched_work(dev, oom_above=0), start=2, sync=dev.sync, clock=dev.clock)


def test_max_batch_caps_the_search():
    dev = FakeDevice()
    result = find_saturating_batch(batched_work(dev), start=1, max_batch=12, sync=dev.sync, clock=dev.clock)
    assert result.batch_size == 8 and result.stopped_by == "max_batch"


def test_other_errors_are_not_mistaken_for_out_of_memory():
    dev = FakeDevice()
    with pytest.raises(RuntimeError, match="shape mismatch"):
        find_saturating_batch(batched_work(dev, oom_above=4, error=RuntimeError("shape mismatch")),
                              sync=dev.sync, clock=dev.clock)


def test_is_out_of_memory():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_windows_open_only_around_the_timed_calls():
    dev = FakeDevice()
    seen = []

    class Window:
        def __enter__(self):
            seen.append(("enter", dev.now, dev.pending))

        def __exit__(self, *exc):
            seen.append(("exit", dev.now, dev.pending))

    durations = iter([3.0, 0.5, 0.5, 0.5, 0.5])
    measure(lambda: dev.launch(next(durations)), warmup=1, repeats=4, sync=dev.sync, clock=dev.clock,
            during=[Window()])
    # Opened once the 3 s warm-up had finished on the device, closed after the four timed calls.
    assert seen == [("enter", 3.0, 0.0), ("exit", 5.0, 0.0)]
