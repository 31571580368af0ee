"""Matplotlib charts of ResourceMonitor samples: a small live PNG panel and a full timeline figure.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas directly, never through
pyplot, so nothing leaks into pyplot's global figure list or changes the notebook's backend.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .units import MiB

__all__ = ["plot_timeline", "render_live_panel"]

_LIVE_WINDOW_S = 120.0  # the live panel shows the last two minutes


def _series(samples: Sequence[dict], key: str, t0: float) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for s in samples:
        v = s.get(key)
        if v is not None:
            xs.append(s["t"] - t0)
            ys.append(float(v))
    return xs, ys


def _interval_hit_rate(samples: Sequence[dict], t0: float) -> tuple[list[float], list[float]]:
    """Hit rate between consecutive samples (the cumulative rate hides recent changes)."""
    xs, ys = [], []
    prev = None
    for s in samples:
        hits, misses = s.get("cache_hits"), s.get("cache_misses")
        if hits is None or misses is None:
            continue
        if prev is not None:
            dh, dm = hits - prev[0], misses - prev[1]
            if dh + dm > 0:
                xs.append(s["t"] - t0)
                ys.append(dh / (dh + dm))
        prev = (hits, misses)
    if not xs:  # no counter movement: fall back to the cumulative rate
        return _series(samples, "cache_hit_rate", t0)
    return xs, ys


def _rate(samples: Sequence[dict], key: str, t0: float, scale: float) -> tuple[list[float], list[float]]:
    """Per-second rate of a growing counter (e.g. bytes copied to the GPU)."""
    xs, ys = [], []
    prev = None
    for s in samples:
        v = s.get(key)
        if v is None:
            continue
        if prev is not None and s["t"] > prev[0]:
            xs.append(s["t"] - t0)
            ys.append((v - prev[1]) / (s["t"] - prev[0]) / scale)
        prev = (s["t"], v)
    return xs, ys


def _tok_series(tok_s_history: Sequence[Any], t_end: float | None) -> tuple[list[float], list[float]]:
    """Accept plain numbers (one per update) or (timestamp, tok/s) pairs."""
    if not tok_s_history:
        return [], []
    first = tok_s_history[0]
    if isinstance(first, (tuple, list)):
        end = t_end if t_end is not None else tok_s_history[-1][0]
        return [t - end for t, _ in tok_s_history], [float(v) for _, v in tok_s_history]
    n = len(tok_s_history)
    return [float(i - n + 1) for i in range(n)], [float(v) for v in tok_s_history]


def _last(samples: Sequence[dict], key: str) -> float | None:
    for s in reversed(samples):
        if s.get(key) is not None:
            return float(s[key])
    return None


def _style(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=8, loc="left")
    ax.tick_params(labelsize=6, length=2)
    ax.grid(True, linewidth=0.3, alpha=0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def render_live_panel(samples: Sequence[dict], tok_s_history: Sequence[Any] = (), dpi: int = 72) -> bytes:
    """A small PNG strip (VRAM, RAM, tok/s, expert-cache hit rate) for an ``ipywidgets.Image``.

    Cheap enough to redraw about once a second while a reply streams.
    """
    fig = Figure(figsize=(8.0, 1.7), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    recent = list(samples)
    t_end = recent[-1]["t"] if recent else None
    if recent:
        recent = [s for s in recent if s["t"] >= t_end - _LIVE_WINDOW_S]
    t0 = t_end if t_end is not None else 0.0

    ax = axes[0]
    used, total, alloc = _last(recent, "gpu_used_gib"), _last(recent, "gpu_total_gib"), _last(recent, "torch_allocated_gib")
    if used is not None:
        ax.plot(*_series(recent, "gpu_used_gib", t0), color="tab:purple", linewidth=1, label="device")
        ax.plot(*_series(recent, "torch_allocated_gib", t0), color="tab:pink", linewidth=1, label="torch")
        if total:
            ax.set_ylim(0, total * 1.05)
        _style(ax, f"VRAM {used:.1f}/{total or 0:.1f} GiB")
    elif alloc is not None:
        ax.plot(*_series(recent, "torch_allocated_gib", t0), color="tab:pink", linewidth=1)
        _style(ax, f"VRAM {alloc:.1f} GiB (torch)")
    else:
        _style(ax, "VRAM: no GPU")

    ax = axes[1]
    rss, avail = _last(recent, "rss_gib"), _last(recent, "ram_available_gib")
    ax.plot(*_series(recent, "rss_gib", t0), color="tab:blue", linewidth=1)
    ram_total = _last(recent, "ram_total_gib")
    if ram_total:
        ax.set_ylim(0, ram_total * 1.05)
    title = "RAM"
    if rss is not None:
        title += f" {rss:.1f} GiB"
    if avail is not None:
        title += f", {avail:.1f} free"
    _style(ax, title)

    ax = axes[2]
    xs, ys = _tok_series(tok_s_history, t_end)
    ax.plot(xs, ys, color="tab:green", linewidth=1)
    ax.set_ylim(bottom=0)
    _style(ax, f"{ys[-1]:.1f} tok/s" if ys else "tok/s")

    ax = axes[3]
    xs, ys = _interval_hit_rate(recent, t0)
    ax.plot(xs, [100 * y for y in ys], color="tab:orange", linewidth=1)
    ax.set_ylim(0, 105)
    _style(ax, f"cache hits {100 * ys[-1]:.0f}%" if ys else "cache hits: n/a")

    # fixed margins: tight_layout would double the cost of a frame
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.14, top=0.86, wspace=0.28)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def plot_timeline(samples: Sequence[dict], title: str | None = None) -> Figure:
    """A full timeline of a recorded run: memory, GPU load, expert-cache behaviour and traffic.

    Returns a Figure (displayed inline when it is the last expression of a notebook cell).
    """
    samples = list(samples)
    has_cache = any(s.get("cache_hits") is not None or s.get("cache_hit_rate") is not None for s in samples)
    rows = 3 if has_cache else 2
    fig = Figure(figsize=(9.0, 2.2 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True)
    t0 = samples[0]["t"] if samples else 0.0

    ax = axes[0]
    for key, label, color in (
        ("gpu_used_gib", "GPU used (device)", "tab:purple"),
        ("torch_allocated_gib", "torch allocated", "tab:pink"),
        ("torch_reserved_gib", "torch reserved", "tab:red"),
        ("rss_gib", "process RSS", "tab:blue"),
    ):
        xs, ys = _series(samples, key, t0)
        if ys:
            ax.plot(xs, ys, label=label, color=color, linewidth=1.2)
    ax.set_ylabel("GiB")
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    _style(ax, title or "Memory")

    ax = axes[1]
    xs, ys = _series(samples, "gpu_util_pct", t0)
    if ys:
        ax.plot(xs, ys, color="tab:green", linewidth=1.2)
        ax.set_ylim(0, 105)
        _style(ax, "GPU utilisation (%)")
    else:
        _style(ax, "GPU utilisation: not available")

    if has_cache:
        ax = axes[2]
        xs, ys = _interval_hit_rate(samples, t0)
        ax.plot(xs, [100 * y for y in ys], color="tab:orange", linewidth=1.2, label="hit rate (%)")
        ax.set_ylim(0, 105)
        ax.set_ylabel("%")
        xs, ys = _rate(samples, "cache_bytes_h2d", t0, MiB)
        if ys:
            twin = ax.twinx()
            twin.plot(xs, ys, color="tab:gray", linewidth=0.8, label="H2D MiB/s")
            twin.set_ylabel("MiB/s", fontsize=7)
            twin.tick_params(labelsize=6)
        _style(ax, "Expert cache: hit rate (orange), host-to-GPU traffic (grey)")

    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    return fig
