"""ResourceMonitor on a CPU-only machine, and the chart helpers."""

from __future__ import annotations

import time

from matplotlib import _pylab_helpers
from matplotlib.figure import Figure

from mixtral_nb import charts
from mixtral_nb.monitor import SAMPLE_FIELDS, ResourceMonitor


class CountingCache:
    """Stands in for the engine's ExpertCache: only the documented ``stats()`` protocol is used."""

    def __init__(self) -> None:
        self.hits = self.misses = 0

    def stats(self) -> dict:
        self.hits += 3
        self.misses += 1
        return {"hits": self.hits, "misses": self.misses, "bytes_h2d": 1024 * self.misses, "wait_s": 0.01}


class ModelWithCache:
    def __init__(self) -> None:
        self.expert_cache = CountingCache()


def test_cpu_sample_has_host_memory_and_no_gpu_fields():
    mon = ResourceMonitor(device="cpu")
    s = mon.sample()
    assert set(SAMPLE_FIELDS) <= set(s)
    assert s["rss_gib"] > 0 and s["ram_total_gib"] > 0 and s["ram_available_gib"] > 0
    for key in ("gpu_used_gib", "gpu_total_gib", "gpu_util_pct", "torch_allocated_gib", "torch_reserved_gib"):
        assert s[key] is None
    assert s["cache_hit_rate"] is None
    assert mon.samples == [s] and mon.latest() is s


def test_context_manager_records_a_timeline():
    with ResourceMonitor(device="cpu", interval=0.02) as mon:
        assert mon.running
        time.sleep(0.1)
    assert not mon.running
    samples = mon.samples
    assert len(samples) >= 2
    assert all(a["t"] <= b["t"] for a, b in zip(samples, samples[1:]))
    assert mon.summary()["samples"] == len(samples)


def test_ring_buffer_keeps_the_newest():
    mon = ResourceMonitor(device="cpu", capacity=3)
    taken = [mon.sample() for _ in range(5)]
    assert mon.samples == taken[-3:]


def test_expert_cache_counters_are_recorded():
    mon = ResourceMonitor(model=ModelWithCache(), device="cpu")
    mon.sample()
    s = mon.sample()
    assert s["cache_hits"] == 6 and s["cache_misses"] == 2 and s["cache_bytes_h2d"] == 2048
    assert s["cache_hit_rate"] == 0.75


def test_charts_render_without_touching_pyplot():
    mon = ResourceMonitor(model=ModelWithCache(), device="cpu")
    for _ in range(4):
        mon.sample()
    managers_before = list(_pylab_helpers.Gcf.get_all_fig_managers())
    png = charts.render_live_panel(mon.samples, [(time.time() - 2, 3.0), (time.time(), 4.5)])
    assert png.startswith(b"\x89PNG")
    assert charts.render_live_panel([], []).startswith(b"\x89PNG")  # empty input still draws
    assert charts.render_live_panel(mon.samples, [1.0, 2.0, 3.0]).startswith(b"\x89PNG")
    fig = charts.plot_timeline(mon.samples)
    assert isinstance(fig, Figure) and len(fig.axes) >= 3
    assert list(_pylab_helpers.Gcf.get_all_fig_managers()) == managers_before
