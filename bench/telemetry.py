"""What a measurement ran on and what it used: device facts, board power and energy, peak memory.

GPU facts and power come from NVML (the nvidia-ml-py package, imported as ``pynvml``); peak memory from
torch's caching allocator. Without NVML or without a GPU every function still returns, and its output says
what is missing and why (``{"nvml": False, "reason": ...}``), so a CPU run records the host instead.
Memory is reported in MiB (2**20 bytes), the unit torch and nvidia-smi print, under the record's ``_mb`` names.
"""
from __future__ import annotations

import gc

import os
import platform
import threading
import time
from typing import Any, Callable

import numpy as np
import torch

BYTES_PER_MB = 2**20


# --- NVML ---------------------------------------------------------------------------------------------

def _open_nvml(nvml=None):
    """(module, None) with NVML initialised, or (None, reason)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        nvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound on machines without the NVIDIA driver
        return None, f"NVML unavailable: {exc}"
    return nvml, None


def _query(nvml, fn: str, *args):
    """One NVML query, or None where the GPU does not support it (power on some boards, energy before Volta)."""
    try:
        return getattr(nvml, fn)(*args)
    except Exception:  # NVMLError_NotSupported and friends: a missing field, not a failed run
        return None


def _scaled(value, factor: float):
    return None if value is None else value * factor


def nvml_index(device: torch.device | str | int | None) -> int:
    """The NVML index of a torch CUDA device (they differ when CUDA_VISIBLE_DEVICES reorders GPUs)."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
    try:
        return torch.cuda._get_nvml_device_index(device)
    except Exception:  # private torch helper; without it, assume the identity mapping
        return device.index or 0


def gpu_facts(index: int = 0, *, nvml=None) -> dict[str, Any]:
    """Name, driver, memory, clocks, power and temperature of NVML device ``index``, read now."""
    nvml, reason = _open_nvml(nvml)
    if nvml is None:
        return {"nvml": False, "reason": reason}
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = _query(nvml, "nvmlDeviceGetMemoryInfo", handle)

        def clocks(fn: str) -> dict[str, int | None]:
            return {name: _query(nvml, fn, handle, getattr(nvml, const)) for name, const in
                    (("sm", "NVML_CLOCK_SM"), ("memory", "NVML_CLOCK_MEM"), ("graphics", "NVML_CLOCK_GRAPHICS"))}

        cuda_driver = _query(nvml, "nvmlSystemGetCudaDriverVersion")
        return {
            "nvml": True,
            "index": index,
            "name": _query(nvml, "nvmlDeviceGetName", handle),
            "driver_version": _query(nvml, "nvmlSystemGetDriverVersion"),
            "cuda_driver_version": None if cuda_driver is None else f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}",
            "memory_total_mb": None if memory is None else memory.total / BYTES_PER_MB,
            "clocks_mhz": clocks("nvmlDeviceGetClockInfo"),
            "max_clocks_mhz": clocks("nvmlDeviceGetMaxClockInfo"),
            "power_w": _scaled(_query(nvml, "nvmlDeviceGetPowerUsage", handle), 1e-3),  # NVML reports mW
            "power_limit_w": _scaled(_query(nvml, "nvmlDeviceGetEnforcedPowerLimit", handle), 1e-3),
            "temperature_c": _query(nvml, "nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU),
        }
    except Exception as exc:
        return {"nvml": False, "reason": f"NVML query failed for device {index}: {exc}"}
    finally:
        _query(nvml, "nvmlShutdown")


# --- host ---------------------------------------------------------------------------------------------

def cpu_facts(cpuinfo: str = "/proc/cpuinfo", meminfo: str = "/proc/meminfo") -> dict[str, Any]:
    """CPU model, core counts and RAM of the host (Linux /proc; elsewhere what ``platform`` knows)."""
    model, cores = None, set()
    try:
        with open(cpuinfo) as fh:
            entry: dict[str, str] = {}
            for line in list(fh) + [""]:
                if not line.strip():  # a blank line ends one logical CPU's block
                    if "physical id" in entry and "core id" in entry:
                        cores.add((entry["physical id"], entry["core id"]))
                    entry = {}
                    continue
                key, _, value = line.partition(":")
                entry[key.strip()] = value.strip()
                if model is None and key.strip() in ("model name", "Model", "Processor"):
                    model = value.strip()
    except OSError:
        pass
    memory_mb = None
    try:
        with open(meminfo) as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_mb = int(line.split()[1]) * 1024 / BYTES_PER_MB  # /proc/meminfo counts kB
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "model": model or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": len(cores) or None,
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_total_mb": memory_mb,
    }


def device_facts(device: torch.device | str | None = None, *, nvml=None) -> dict[str, Any]:
    """Everything a result record should say about the hardware of ``device``; the host CPU always."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    facts: dict[str, Any] = {"device": str(device), "gpu": None, "cpu": cpu_facts()}
    if device.type != "cuda":
        facts.update(nvml=False, reason=f"no GPU: measured on {device.type}")
        return facts
    gpu = gpu_facts(nvml_index(device), nvml=nvml)
    if not gpu["nvml"]:  # still name the GPU through torch
        props = torch.cuda.get_device_properties(device)
        gpu.update(name=props.name, memory_total_mb=props.total_memory / BYTES_PER_MB)
    facts.update(gpu=gpu, nvml=gpu["nvml"], reason=gpu.get("reason"))
    return facts


# --- power and energy ---------------------------------------------------------------------------------

def energy_j(times_s, watts) -> float:
    """Trapezoidal integral of a sampled power curve: joules between the first and the last sample."""
    times_s, watts = np.asarray(times_s, dtype=np.float64), np.asarray(watts, dtype=np.float64)
    if times_s.size < 2:
        return 0.0
    return float(np.trapezoid(watts, times_s))


class PowerSampler:
    """Board power sampled in a background thread while the ``with`` block runs, integrated to joules.

    A sample is taken when the window opens and when it closes, so even a window shorter than the
    interval is integrated over its whole length. Where the GPU has an energy counter (NVML, Volta and
    newer) the counter's difference is reported too, and preferred: NVML's power reading is itself an
    average over a recent interval on recent GPUs, so short windows are better served by the counter.
    """

    def __init__(self, power_w: Callable[[], float] | None, *, interval_s: float = 0.05,
                 clock: Callable[[], float] = time.perf_counter, energy_counter_j: Callable[[], float] | None = None,
                 reason: str | None = None, on_close: Callable[[], Any] | None = None):
        self._power_w, self._energy_counter_j = power_w, energy_counter_j
        self.interval_s, self._clock, self.reason, self._on_close = interval_s, clock, reason, on_close
        self.times_s: list[float] = []
        self.watts: list[float] = []
        self.error: str | None = None
        self._lock = threading.Lock()  # clock and power are read as one pair, never interleaved
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counter_start = self._counter_end = None

    @classmethod
    def from_nvml(cls, index: int = 0, *, nvml=None, interval_s: float = 0.05,
                  clock: Callable[[], float] = time.perf_counter) -> "PowerSampler":
        nvml, reason = _open_nvml(nvml)
        if nvml is None:
            return cls(None, reason=reason)
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as exc:
            _query(nvml, "nvmlShutdown")
            return cls(None, reason=f"NVML has no device {index}: {exc}")
        if _query(nvml, "nvmlDeviceGetPowerUsage", handle) is None:  # e.g. MIG slices, some boards
            _query(nvml, "nvmlShutdown")
            return cls(None, reason=f"NVML device {index} does not report board power")
        has_counter = _query(nvml, "nvmlDeviceGetTotalEnergyConsumption", handle) is not None
        return cls(
            lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,  # mW
            energy_counter_j=(lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3) if has_counter else None,
            interval_s=interval_s, clock=clock, on_close=lambda: _query(nvml, "nvmlShutdown"),
        )

    @classmethod
    def for_device(cls, device: torch.device | str | None = None, *, nvml=None,
                   interval_s: float = 0.05) -> "PowerSampler":
        """A sampler for a torch device; on a CPU it records nothing and says why."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type != "cuda":
            return cls(None, reason=f"no GPU: board power is only read through NVML (device is {device.type})")
        return cls.from_nvml(nvml_index(device), nvml=nvml, interval_s=interval_s)

    @property
    def available(self) -> bool:
        return self._power_w is not None

    def _sample(self) -> None:
        with self._lock:
            t = self._clock()
            w = self._power_w()
            self.times_s.append(t)
            self.watts.append(w)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._sample()
            except Exception as exc:  # a failing read ends sampling; the edge samples still bound the window
                self.error = f"power read failed: {exc}"
                return

    def __enter__(self) -> "PowerSampler":
        if not self.available:
            return self
        self.times_s, self.watts, self.error = [], [], None
        self._stop.clear()
        if self._energy_counter_j is not None:
            self._counter_start = self._energy_counter_j()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="dit-bench-power", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not self.available:
            return
        self._stop.set()
        self._thread.join()
        try:
            self._sample()
            if self._energy_counter_j is not None:
                self._counter_end = self._energy_counter_j()
        except Exception as exc:  # telemetry never hides the timed work's own outcome
            self.error = f"power read failed: {exc}"
        finally:
            if self._on_close is not None:
                self._on_close()

    def result(self, images: int | None = None) -> dict[str, Any]:
        """Energy over the window (and per image, given how many images it produced)."""
        if not self.available:
            return {"power_sampled": False, "reason": self.reason, "energy_j": None, "joules_per_image": None}
        sampled = energy_j(self.times_s, self.watts)
        duration = self.times_s[-1] - self.times_s[0]
        counter = None
        if self._counter_start is not None and self._counter_end is not None:
            counter = self._counter_end - self._counter_start
        energy = counter if counter is not None else sampled
        return {
            "power_sampled": True,
            "samples": len(self.watts),
            "duration_s": duration,
            "mean_power_w": sampled / duration if duration > 0 else self.watts[-1],
            "max_power_w": max(self.watts),
            "sampled_energy_j": sampled,
            "counter_energy_j": counter,
            "energy_j": energy,
            "energy_source": "nvml_energy_counter" if counter is not None else "power_samples",
            "joules_per_image": energy / images if images else None,
            "error": self.error,
        }


# --- memory -------------------------------------------------------------------------------------------

class PeakMemory:
    """Peak torch memory of the enclosed work: peak statistics reset on entry, read on exit (CUDA only).

    On a CPU torch keeps no peak statistics; the result says so and gives the process's peak resident
    set size instead, which covers the whole process lifetime, not just the window.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.peak_allocated_bytes: int | None = None
        self.peak_reserved_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # The reserved peak restarts from what is reserved now: cached blocks of an earlier, larger row
            # (a batch the saturating search tried) would count as this row's unless they are returned first.
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # allocations of still-queued kernels count
            self.peak_allocated_bytes = torch.cuda.max_memory_allocated(self.device)
            self.peak_reserved_bytes = torch.cuda.max_memory_reserved(self.device)

    def metrics(self) -> dict[str, float | None]:
        """``peak_memory_mb`` and ``reserved_memory_mb`` for the result record (None on a CPU)."""
        def mb(value):
            return None if value is None else value / BYTES_PER_MB
        return {"peak_memory_mb": mb(self.peak_allocated_bytes), "reserved_memory_mb": mb(self.peak_reserved_bytes)}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": str(self.device), **self.metrics()}
        if self.device.type != "cuda":
            out["reason"] = f"torch tracks peak memory on CUDA only (device is {self.device.type})"
            out["process_max_rss_mb"] = _max_rss_mb()
        return out


def _max_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux reports KiB (macOS bytes)
    return kib * (1 if platform.system() == "Darwin" else 1024) / BYTES_PER_MB
