"""Telemetry: the CPU path this machine takes, and NVML paths driven by a fake NVML with a known power curve."""
import math
import os
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench import telemetry
from bench.telemetry import PeakMemory, PowerSampler, cpu_facts, device_facts, energy_j, gpu_facts


class FakeNvml:
    """The slice of the pynvml API telemetry uses, for one H100 whose power follows ``curve(t)`` watts.

    Its clock is the sampler's clock: ``clock()`` returns ``t`` (set by the test, or advanced by ``step``
    on every read) and power is the curve at the time last read, so each (time, power) pair is consistent.
    """

    NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2
    NVML_TEMPERATURE_GPU = 0

    class NVMLError(Exception):
        pass

    def __init__(self, curve=lambda t: 300.0, energy=None, step=0.0):
        self.curve, self.energy, self.step = curve, energy, step
        self.t = self.read_t = 0.0
        self.open = 0
        self._lock = threading.Lock()

    def clock(self):
        with self._lock:
            self.read_t = self.t
            self.t += self.step
            return self.read_t

    def nvmlInit(self):
        self.open += 1

    def nvmlShutdown(self):
        self.open -= 1

    def nvmlDeviceGetHandleByIndex(self, index):
        if index != 0:
            raise self.NVMLError("Invalid Argument")
        return "handle0"

    def nvmlDeviceGetName(self, handle):
        return "NVIDIA H100 80GB HBM3"

    def nvmlSystemGetDriverVersion(self):
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12040

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=80 * 2**30, used=2**30, free=79 * 2**30)

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return {0: 1755, 1: 1755, 2: 2619}[kind]

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        return {0: 1980, 1: 1980, 2: 2619}[kind]

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.curve(self.read_t) * 1e3  # milliwatts

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 41

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.energy is None:
            raise self.NVMLError("Not Supported")
        return self.energy(self.t) * 1e3  # millijoules


def wait_for_samples(sampler, n):
    """Let the background thread take at least n samples (a progress condition, not a speed bound)."""
    deadline = time.monotonic() + 30
    while len(sampler.watts) < n:
        assert time.monotonic() < deadline, "the sampling thread took no samples"
        time.sleep(0.001)


# --- host / no GPU ------------------------------------------------------------------------------------

def test_cpu_path_says_there_is_no_gpu():
    facts = device_facts("cpu")
    assert (facts["device"], facts["gpu"], facts["nvml"]) == ("cpu", None, False)
    assert "no GPU" in facts["reason"]
    assert facts["cpu"]["logical_cores"] == os.cpu_count()
    assert facts["cpu"]["torch_threads"] == torch.get_num_threads()
    assert facts["cpu"]["model"]
    if os.path.exists("/proc/meminfo"):
        assert facts["cpu"]["memory_total_mb"] > 0


def test_cpu_facts_from_proc_files(tmp_path):
    block = "processor\t: {i}\nmodel name\t: Fake CPU @ 2.00GHz\nphysical id\t: 0\ncore id\t\t: {core}\n\n"
    # Four logical CPUs: two cores with two hyper-threads each.
    (tmp_path / "cpuinfo").write_text("".join(block.format(i=i, core=i // 2) for i in range(4)))
    (tmp_path / "meminfo").write_text("MemTotal:       16384000 kB\nMemFree:         1000 kB\n")
    facts = cpu_facts(str(tmp_path / "cpuinfo"), str(tmp_path / "meminfo"))
    assert facts["model"] == "Fake CPU @ 2.00GHz"
    assert facts["physical_cores"] == 2
    assert facts["memory_total_mb"] == 16000.0  # 16,384,000 KiB


def test_missing_proc_files_leave_fields_empty(tmp_path):
    facts = cpu_facts(str(tmp_path / "nope"), str(tmp_path / "nope"))
    assert facts["physical_cores"] is None and facts["memory_total_mb"] is None
    assert facts["logical_cores"] == os.cpu_count()


def test_power_and_memory_on_cpu_record_nothing_and_say_why():
    with PowerSampler.for_device("cpu") as sampler, PeakMemory("cpu") as memory:
        torch.randn(256, 256).sum()
    power = sampler.result(images=4)
    assert (power["power_sampled"], power["energy_j"], power["joules_per_image"]) == (False, None, None)
    assert "no GPU" in power["reason"]
    assert memory.metrics() == {"peak_memory_mb": None, "reserved_memory_mb": None}
    record = memory.to_dict()
    assert "CUDA only" in record["reason"] and record["process_max_rss_mb"] > 0


# --- NVML ---------------------------------------------------------------------------------------------

def test_without_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert gpu_facts() == {"nvml": False, "reason": "nvidia-ml-py is not installed (pip install nvidia-ml-py)"}
    assert not PowerSampler.from_nvml().available


def test_without_the_nvidia_driver():
    class NoDriver(FakeNvml):
        def nvmlInit(self):
            raise FakeNvml.NVMLError("NVML Shared Library Not Found")

    facts = gpu_facts(nvml=NoDriver())
    assert facts == {"nvml": False, "reason": "NVML unavailable: NVML Shared Library Not Found"}
    sampler = PowerSampler.from_nvml(nvml=NoDriver())
    with sampler:
        pass
    assert sampler.result()["reason"] == "NVML unavailable: NVML Shared Library Not Found"


def test_gpu_facts_from_nvml():
    nvml = FakeNvml(curve=lambda t: 123.456)
    facts = gpu_facts(0, nvml=nvml)
    assert facts == {
        "nvml": True, "index": 0, "name": "NVIDIA H100 80GB HBM3", "driver_version": "550.54.15",
        "cuda_driver_version": "12.4", "memory_total_mb": 81920.0,
        "clocks_mhz": {"sm": 1755, "memory": 2619, "graphics": 1755},
        "max_clocks_mhz": {"sm": 1980, "memory": 2619, "graphics": 1980},
        "power_w": pytest.approx(123.456), "power_limit_w": 700.0, "temperature_c": 41,
    }
    assert nvml.open == 0  # every nvmlInit is paired with a shutdown
    assert gpu_facts(3, nvml=nvml) == {"nvml": False, "reason": "NVML query failed for device 3: Invalid Argument"}


def test_unsupported_fields_are_none_not_failures():
    class OldBoard(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle):
            raise FakeNvml.NVMLError("Not Supported")

    facts = gpu_facts(nvml=OldBoard())
    assert facts["nvml"] is True and facts["power_w"] is None and facts["name"] == "NVIDIA H100 80GB HBM3"
    sampler = PowerSampler.from_nvml(nvml=OldBoard())
    assert not sampler.available and "does not report board power" in sampler.reason


def test_device_facts_on_cuda_use_nvml(monkeypatch):
    monkeypatch.setattr(telemetry, "nvml_index", lambda device: 0)
    facts = device_facts("cuda:0", nvml=FakeNvml())
    assert facts["nvml"] is True and facts["reason"] is None
    assert facts["gpu"]["name"] == "NVIDIA H100 80GB HBM3" and facts["cpu"]["logical_cores"] == os.cpu_count()


# --- energy -------------------------------------------------------------------------------------------

def test_energy_integral_of_known_curves():
    # A linear ramp is integrated exactly by the trapezoid rule, at any sample times.
    t = np.array([0.0, 0.3, 0.31, 1.7, 2.5])
    assert energy_j(t, 100 + 40 * t) == pytest.approx(375.0)  # 100*2.5 + 20*2.5^2
    # A smooth curve on a fine grid: 200 + 50 sin(t) over [0, pi] is 200*pi + 100 J.
    t = np.linspace(0, math.pi, 2001)
    assert energy_j(t, 200 + 50 * np.sin(t)) == pytest.approx(200 * math.pi + 100, rel=1e-6)
    assert energy_j([1.0], [300.0]) == 0.0


def test_sampler_integrates_a_ramp_over_the_window():
    nvml = FakeNvml(curve=lambda t: 100 + 40 * (t - 10))  # 100 W at t=10 s, 200 W at t=12.5 s
    nvml.t = 10.0
    with PowerSampler.from_nvml(nvml=nvml, interval_s=0.001, clock=nvml.clock) as sampler:
        wait_for_samples(sampler, 5)  # the background thread samples while "work" runs
        nvml.t = 12.5
    result = sampler.result(images=5)
    assert result["power_sampled"] and result["samples"] >= 6
    assert result["duration_s"] == 2.5
    assert result["sampled_energy_j"] == pytest.approx(375.0)
    assert (result["energy_j"], result["energy_source"], result["counter_energy_j"]) == (
        pytest.approx(375.0), "power_samples", None)
    assert result["joules_per_image"] == pytest.approx(75.0)
    assert result["mean_power_w"] == pytest.approx(150.0) and result["max_power_w"] == pytest.approx(200.0)
    assert nvml.open == 0


def test_sampler_pairs_time_and_power_while_the_clock_runs():
    # Every clock read advances time by 10 ms, from the sampling thread and the main thread alike.
    nvml = FakeNvml(curve=lambda t: 250 + 30 * t, step=0.01)
    with PowerSampler.from_nvml(nvml=nvml, interval_s=0.001, clock=nvml.clock) as sampler:
        wait_for_samples(sampler, 20)
    times = np.array(sampler.times_s)
    assert np.all(np.diff(times) > 0)
    np.testing.assert_allclose(sampler.watts, 250 + 30 * times)
    t0, t1 = times[0], times[-1]
    assert sampler.result()["energy_j"] == pytest.approx(250 * (t1 - t0) + 15 * (t1**2 - t0**2))


def test_energy_counter_is_preferred_where_the_gpu_has_one():
    # Counter and power readings disagree on purpose here (1312 J vs 1200 J): the record must take the counter.
    nvml = FakeNvml(curve=lambda t: 300.0, energy=lambda t: 300.0 * t + 7.0 * t * t)
    with PowerSampler.from_nvml(nvml=nvml, interval_s=0.001, clock=nvml.clock) as sampler:
        nvml.t = 4.0
    result = sampler.result(images=8)
    assert result["counter_energy_j"] == pytest.approx(300 * 4 + 7 * 16)
    assert result["sampled_energy_j"] == pytest.approx(1200.0)
    assert result["energy_source"] == "nvml_energy_counter"
    assert result["joules_per_image"] == pytest.approx(1312 / 8)


def test_a_failing_power_read_ends_sampling_and_is_reported():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("GPU is lost")
        return 200.0

    clock = iter(range(1000)).__next__
    with PowerSampler(flaky, interval_s=0.001, clock=lambda: float(clock())) as sampler:
        deadline = time.monotonic() + 30
        while sampler.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.001)
    result = sampler.result()
    assert "GPU is lost" in result["error"] and result["samples"] == 3
    assert result["energy_j"] == pytest.approx(200.0 * (sampler.times_s[-1] - sampler.times_s[0]))


# --- memory -------------------------------------------------------------------------------------------

def test_peak_memory_resets_before_and_reads_after(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("release cached blocks"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated",
                        lambda device=None: calls.append("read") or 1536 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 2048 * 2**20)
    with PeakMemory("cuda:0") as memory:
        calls.append("work")
    # cached blocks of earlier rows go back first: the reserved peak restarts from what is reserved at reset
    assert calls == ["sync", "release cached blocks", "reset", "work", "sync", "read"]
    assert memory.metrics() == {"peak_memory_mb": 1536.0, "reserved_memory_mb": 2048.0}
    assert "reason" not in memory.to_dict()


def test_joules_per_image_of_a_timed_run():
    """A 300 W board; the warm-up (3 s) is excluded, four timed batches of 8 images take 0.5 s each."""
    from bench.timing import measure, speed_metrics

    nvml = FakeNvml(curve=lambda t: 300.0)
    durations = iter([3.0, 0.5, 0.5, 0.5, 0.5])
    sampler = PowerSampler.from_nvml(nvml=nvml, interval_s=0.001, clock=nvml.clock)

    def sync():  # the fake board's queued work completes only when synchronised
        nvml.t += nvml.pending
        nvml.pending = 0.0

    nvml.pending = 0.0
    stats = measure(lambda: setattr(nvml, "pending", nvml.pending + next(durations)), warmup=1, repeats=4,
                    sync=sync, clock=nvml.clock, during=[sampler])
    power = sampler.result(images=4 * 8)
    assert speed_metrics(stats, 8)["s_per_image"] == pytest.approx(0.0625)
    assert power["duration_s"] == pytest.approx(2.0)
    assert power["energy_j"] == pytest.approx(600.0)
    assert power["joules_per_image"] == pytest.approx(18.75)
