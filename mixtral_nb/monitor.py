"""Resource sampling (GPU memory and load, host RAM, expert-cache counters) into a ring buffer.

Everything is optional: without CUDA, NVML or an expert cache the matching fields are None, so the
same notebook cells run on a CPU box, a Colab T4 or a bigger GPU.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

import psutil
import torch

from .units import GiB as GIB

__all__ = ["ResourceMonitor", "SAMPLE_FIELDS"]

# Fields every sample has (None when not measurable here); cache counters come on top as cache_*.
SAMPLE_FIELDS = (
    "t",
    "gpu_used_gib",
    "gpu_total_gib",
    "gpu_util_pct",
    "torch_allocated_gib",
    "torch_reserved_gib",
    "rss_gib",
    "ram_available_gib",
    "ram_total_gib",
    "cache_hit_rate",
)


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def nvml_index(torch_index: int) -> int:
    """NVML numbers all GPUs; CUDA_VISIBLE_DEVICES may renumber them for torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts) and torch_index < len(parts):
        return int(parts[torch_index])
    return torch_index


class ResourceMonitor:
    """Samples memory, GPU load and expert-cache counters, by hand or from a background thread.

    Use ``with ResourceMonitor(model) as mon: ...`` to record a timeline of a block of work
    (a sample at entry, every ``interval`` seconds, and at exit), then ``charts.plot_timeline``.
    """

    def __init__(self, model: Any = None, device: Any = None, interval: float = 0.5, capacity: int = 3600) -> None:
        self.model = model
        self.device = _resolve_device(device)
        self.interval = interval
        self._buffer: deque[dict] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._halt = threading.Event()
        self._process = psutil.Process()
        self._nvml: Any = None
        self._nvml_handle: Any = None
        if self.device.type == "cuda":
            self._init_nvml()

    def _init_nvml(self) -> None:
        try:
            import pynvml  # inside the try: a missing or broken NVML means no GPU figures, not an error

            pynvml.nvmlInit()
            self._nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(self.device.index or 0))
            self._nvml = pynvml
        except Exception:  # no driver, no library, no such device: report None instead
            self._nvml = self._nvml_handle = None

    # ---- sampling

    @property
    def samples(self) -> list[dict]:
        """A snapshot of the ring buffer, oldest first."""
        with self._lock:
            return list(self._buffer)

    def clear(self) -> None:
        """Drop all samples (e.g. before timing a new run)."""
        with self._lock:
            self._buffer.clear()

    def sample(self) -> dict:
        """Take one sample now, store it and return it."""
        s: dict[str, Any] = dict.fromkeys(SAMPLE_FIELDS)
        s["t"] = time.time()
        self._sample_gpu(s)
        self._sample_host(s)
        self._sample_cache(s)
        with self._lock:
            self._buffer.append(s)
        return s

    def _sample_gpu(self, s: dict) -> None:
        if self._nvml is not None:
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)
                s["gpu_used_gib"] = mem.used / GIB
                s["gpu_total_gib"] = mem.total / GIB
                s["gpu_util_pct"] = float(self._nvml.nvmlDeviceGetUtilizationRates(self._nvml_handle).gpu)
            except Exception:
                pass
        if self.device.type == "cuda" and torch.cuda.is_available():
            try:
                s["torch_allocated_gib"] = torch.cuda.memory_allocated(self.device) / GIB
                s["torch_reserved_gib"] = torch.cuda.memory_reserved(self.device) / GIB
                if s["gpu_total_gib"] is None:
                    free, total = torch.cuda.mem_get_info(self.device)
                    s["gpu_used_gib"] = (total - free) / GIB
                    s["gpu_total_gib"] = total / GIB
            except Exception:
                pass

    def _sample_host(self, s: dict) -> None:
        try:
            s["rss_gib"] = self._process.memory_info().rss / GIB
            vm = psutil.virtual_memory()
            s["ram_available_gib"] = vm.available / GIB
            s["ram_total_gib"] = vm.total / GIB
        except Exception:
            pass

    def _sample_cache(self, s: dict) -> None:
        cache = getattr(self.model, "expert_cache", None)
        stats_fn = getattr(cache, "stats", None)
        if not callable(stats_fn):
            return
        try:
            stats = stats_fn()
        except Exception:
            return
        if not isinstance(stats, dict):
            return
        for key, value in stats.items():
            if isinstance(value, (int, float)) and key != "hit_rate":
                s["cache_" + key] = value
        # the hit rate is ours: None until the first lookup (the cache's own stats say 0.0 there, which
        # a chart would draw as "every lookup missed")
        hits, misses = stats.get("hits"), stats.get("misses")
        if isinstance(hits, (int, float)) and isinstance(misses, (int, float)) and hits + misses > 0:
            s["cache_hit_rate"] = hits / (hits + misses)

    # ---- background thread

    @property
    def running(self) -> bool:
        """True while the background sampling thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ResourceMonitor:
        """Sample every ``interval`` seconds in a daemon thread until ``stop()``."""
        if self.running:
            return self
        self._halt.clear()
        self._thread = threading.Thread(target=self._run, name="mixtral_nb-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread (the samples stay)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval))
            self._thread = None

    def _run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def __enter__(self) -> ResourceMonitor:
        self.sample()
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        self.sample()

    # ---- convenience

    def latest(self) -> dict | None:
        """The newest sample, or None before the first."""
        with self._lock:
            return self._buffer[-1] if self._buffer else None

    def summary(self) -> dict:
        """Peaks over the buffer: handy as a one-line printout after a run."""
        samples = self.samples
        out: dict[str, Any] = {"samples": len(samples)}
        for key in ("gpu_used_gib", "torch_allocated_gib", "torch_reserved_gib", "rss_gib"):
            values = [s[key] for s in samples if s.get(key) is not None]
            out["peak_" + key] = max(values) if values else None
        if samples:
            out["seconds"] = samples[-1]["t"] - samples[0]["t"]
            out["cache_hit_rate"] = samples[-1].get("cache_hit_rate")
        return out
