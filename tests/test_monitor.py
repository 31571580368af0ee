"""ResourceMonitor on a CPU-only machine, and the chart helpers."""

from __future__ import annotations

import time

from matplotlib import _pylab_helpers
from matplotlib.figure import Figure

import torch

from mixtral_nb import OffloadConfig, charts
from mixtral_nb.cache import ExpertCache
from mixtral_nb.expert import ExpertFormat
from mixtral_nb.monitor import SAMPLE_FIELDS, ResourceMonitor


class ModelWithCache:
    """A real ExpertCache (2 layers of 4 tiny float experts, 2 GPU slots each) on the CPU."""

    def __init__(self) -> None:
        fmt = ExpertFormat.make(8, 16, None, torch.float32)
        blob = fmt.encode(torch.ones(16, 8), torch.ones(16, 8), torch.ones(8, 16))
        cfg = OffloadConfig(main_size=4, offload_size=4, buffer_size=1, offload_per_layer=2, prefetch=0)
        self.expert_cache = ExpertCache(fmt, 2, 4, cfg, "cpu", lambda layer, e: blob, host_mirror=True)

    def touch(self) -> None:
        """Three hits and one miss in layer 0."""
        c = self.expert_cache
        a, b = list(c.lru[0])
        for e in (a, b, a):
            c.fetch(0, e)
        c.fetch(0, next(e for e in range(4) if e not in c.lru[0]))


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
    model = ModelWithCache()
    mon = ResourceMonitor(model=model, device="cpu")
    model.touch()
    mon.sample()
    model.touch()
    s = mon.sample()
    blob = model.expert_cache.blob_bytes
    assert s["cache_hits"] == 6 and s["cache_misses"] == 2 and s["cache_bytes_h2d"] == 2 * blob
    assert s["cache_hit_rate"] == 0.75


def test_charts_render_without_touching_pyplot():
    model = ModelWithCache()
    mon = ResourceMonitor(model=model, device="cpu")
    for _ in range(4):
        model.touch()
        mon.sample()
    managers_before = list(_pylab_helpers.Gcf.get_all_fig_managers())
    png = charts.render_live_panel(mon.samples, [(time.time() - 2, 3.0), (time.time(), 4.5)])
    assert png.startswith(b"\x89PNG")
    assert charts.render_live_panel([], []).startswith(b"\x89PNG")  # empty input still draws
    assert charts.render_live_panel(mon.samples, [1.0, 2.0, 3.0]).startswith(b"\x89PNG")
    fig = charts.plot_timeline(mon.samples)
    assert isinstance(fig, Figure) and len(fig.axes) >= 3
    assert list(_pylab_helpers.Gcf.get_all_fig_managers()) == managers_before
