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
from matplotlib.ticker import MaxNLocator

from .units import MiB

__all__ = ["LIVE_DPI", "LIVE_SCALE", "LIVE_SIZE_IN", "live_panel_figure", "plot_timeline", "png_size", "render_live_panel"]

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
    n = len(tok_s_history)  # plain numbers: one a second, the newest now
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


# The live panel: a fixed 2 x 2 grid, always the same pixel size, so a browser swapping one frame for
# the next never re-flows the page (a changing size is what makes an updated image jump or flicker).
LIVE_SIZE_IN = (8.0, 3.4)  # inches at LIVE_DPI: 800 x 340 CSS pixels, Colab's output width
LIVE_DPI = 100
LIVE_SCALE = 2  # pixels per CSS pixel: stays sharp on high-density screens and when the browser scales it
_LIVE_TICKS = (-90, -60, -30, 0)  # no label at -120: it would touch the y axis's 0


def _live_axes(ax: Any, title: str, ylabel: str) -> None:
    """One live panel: a title carrying the current value, a y label with its unit, seconds ago on x."""
    ax.set_title(title, fontsize=9, loc="left", pad=3)
    ax.set_ylabel(ylabel, fontsize=8, labelpad=2)
    ax.set_xlim(-_LIVE_WINDOW_S, 0)
    ax.set_xticks(_LIVE_TICKS, [str(-t) if t else "now" for t in _LIVE_TICKS])
    ax.tick_params(labelsize=7.5, length=2, pad=1.5)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=3, min_n_ticks=2))
    ax.grid(True, linewidth=0.4, alpha=0.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _say(ax: Any, text: str, blank: bool = False) -> None:
    """A panel with nothing to plot says why in words instead of showing empty axes (``blank``: and
    draws no axes at all, for what this machine will never show)."""
    ax.set_yticks([])
    ax.set_ylim(0, 1)
    if blank:
        ax.set_xticks([])
        ax.set_ylabel("")
        ax.grid(False)
        for side in ("left", "bottom"):
            ax.spines[side].set_visible(False)
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="0.35")


def render_live_panel(samples: Sequence[dict], tok_s_history: Sequence[Any] = (), dpi: int | None = None,
                      now: float | None = None) -> bytes:
    """A PNG of the last two minutes (GPU memory, host RAM, tokens per second, expert-cache hit rate)
    for an ``ipywidgets.Image``, redrawn in place about once a second while a reply streams.

    Every frame has the same pixel size (``LIVE_SIZE_IN`` at ``LIVE_DPI``, times ``LIVE_SCALE``
    unless ``dpi`` is given), so swapping frames never moves the page. See ``live_panel_figure``.
    """
    fig = live_panel_figure(samples, tok_s_history, now)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or LIVE_DPI * LIVE_SCALE)
    return buf.getvalue()


def live_panel_figure(samples: Sequence[dict], tok_s_history: Sequence[Any] = (), now: float | None = None) -> Figure:
    """The live panel as a Figure: x is seconds before ``now`` (default: the newest sample or tok/s
    point) over a fixed two-minute window; a panel with nothing to draw says why in words.
    ``tok_s_history`` holds (timestamp, tok/s) pairs, or plain numbers taken as one a second.
    """
    fig = Figure(figsize=LIVE_SIZE_IN, dpi=LIVE_DPI)
    FigureCanvasAgg(fig)
    (ax_vram, ax_ram), (ax_tok, ax_hit) = fig.subplots(2, 2)
    samples = list(samples)
    stamps = [s["t"] for s in samples[-1:]]
    if tok_s_history and isinstance(tok_s_history[-1], (tuple, list)):
        stamps.append(float(tok_s_history[-1][0]))
    t_end = now if now is not None else max(stamps, default=0.0)
    recent = [s for s in samples if s["t"] >= t_end - _LIVE_WINDOW_S]

    used, total = _last(recent, "gpu_used_gib"), _last(recent, "gpu_total_gib")
    alloc = _last(recent, "torch_allocated_gib")
    if used is not None or alloc is not None:
        _live_axes(ax_vram, "GPU memory", "GiB")
        if used is not None:
            ax_vram.plot(*_series(recent, "gpu_used_gib", t_end), color="tab:purple", linewidth=1.2, label="device")
        ax_vram.plot(*_series(recent, "torch_allocated_gib", t_end), color="tab:pink", linewidth=1.2, label="torch")
        top = total or max(used or 0.0, alloc or 0.0) or 1.0
        ax_vram.set_ylim(0, top * 1.05)
        now_used = used if used is not None else alloc
        ax_vram.set_title(f"GPU memory: {now_used:.1f}" + (f" of {total:.1f} GiB" if total else " GiB"),
                          fontsize=9, loc="left", pad=3)
        ax_vram.legend(fontsize=7, loc="lower left", frameon=False, ncol=2, borderaxespad=0.2)
    else:
        _live_axes(ax_vram, "GPU memory", "GiB")
        _say(ax_vram, "no GPU here: the model runs on the CPU", blank=True)

    rss, avail, ram_total = _last(recent, "rss_gib"), _last(recent, "ram_available_gib"), _last(recent, "ram_total_gib")
    title = "Host RAM"
    if rss is not None:
        title += f": this process {rss:.1f} GiB"
        if avail is not None:
            title += f", {avail:.1f} GiB free"
    _live_axes(ax_ram, title, "GiB")
    if rss is not None:
        ax_ram.plot(*_series(recent, "rss_gib", t_end), color="tab:blue", linewidth=1.2)
        ax_ram.set_ylim(0, (ram_total or rss or 1.0) * 1.05)
    else:
        _say(ax_ram, "no samples yet")

    xs, ys = _tok_series(tok_s_history, t_end)
    shown = [(x, y) for x, y in zip(xs, ys) if x >= -_LIVE_WINDOW_S]
    _live_axes(ax_tok, f"Speed: {ys[-1]:.1f} tokens/s" if ys else "Speed", "tokens/s")
    if shown:
        ax_tok.plot([x for x, _ in shown], [y for _, y in shown], color="tab:green", linewidth=1.2,
                    marker="o", markersize=2)
        ax_tok.set_ylim(0, max(1.0, max(y for _, y in shown)) * 1.15)
    else:
        _say(ax_tok, "no reply yet" if not ys else "no reply in the last two minutes")

    has_cache = any(s.get("cache_hits") is not None or s.get("cache_hit_rate") is not None for s in samples)
    xs, ys = _interval_hit_rate(recent, t_end)
    _live_axes(ax_hit, f"Expert-cache hits: {100 * ys[-1]:.0f}%" if ys else "Expert-cache hits", "%")
    if ys:
        ax_hit.plot(xs, [100 * y for y in ys], color="tab:orange", linewidth=1.2, marker="o", markersize=2)
        ax_hit.set_ylim(0, 105)
        ax_hit.set_yticks([0, 50, 100])
    else:
        _say(ax_hit, "no expert cache in this model" if not has_cache else "no expert loads yet")

    for ax in (ax_tok, ax_hit):
        ax.set_xlabel("seconds ago", fontsize=8, labelpad=1)
    # fixed margins: tight_layout would double the cost of a frame and could move the axes between frames
    fig.subplots_adjust(left=0.065, right=0.975, bottom=0.135, top=0.92, wspace=0.2, hspace=0.62)
    return fig


def plot_timeline(samples: Sequence[dict], title: str | None = None) -> Figure:
    """A full timeline of a recorded run: memory, GPU load, expert-cache behaviour and traffic.

    Returns a Figure (displayed inline when it is the last expression of a notebook cell), 8 inches
    wide at 100 dpi: Colab's output width. Without a GPU there is no utilisation row, and the memory
    title says so.
    """
    samples = list(samples)
    has_cache = any(s.get("cache_hits") is not None or s.get("cache_hit_rate") is not None for s in samples)
    has_gpu = any(s.get(k) is not None for s in samples for k in ("gpu_used_gib", "torch_allocated_gib"))
    has_util = any(s.get("gpu_util_pct") is not None for s in samples)
    rows = 1 + has_util + has_cache
    fig = Figure(figsize=(8.0, 1.2 + 1.9 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0])
    t0 = samples[0]["t"] if samples else 0.0

    ax = axes.pop(0)
    for key, label, color in (
        ("gpu_used_gib", "GPU used (device)", "tab:purple"),
        ("torch_allocated_gib", "GPU, torch allocated", "tab:pink"),
        ("torch_reserved_gib", "GPU, torch reserved", "tab:red"),
        ("rss_gib", "host RAM, this process", "tab:blue"),
    ):
        xs, ys = _series(samples, key, t0)
        if ys:
            ax.plot(xs, ys, label=label, color=color, linewidth=1.2)
    ax.set_ylabel("GiB", fontsize=8)
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right", frameon=False)
    _style(ax, (title or "Memory") + ("" if has_gpu else " (no GPU here: host RAM only)"))

    if has_util:
        ax = axes.pop(0)
        ax.plot(*_series(samples, "gpu_util_pct", t0), color="tab:green", linewidth=1.2)
        ax.set_ylim(0, 105)
        ax.set_ylabel("%", fontsize=8)
        _style(ax, "GPU utilisation")

    if has_cache:
        ax = axes.pop(0)
        xs, ys = _interval_hit_rate(samples, t0)
        if ys:
            ax.plot(xs, [100 * y for y in ys], color="tab:orange", linewidth=1.2, label="hit rate (%)")
        else:
            ax.text(0.5, 0.5, "no expert loads recorded", transform=ax.transAxes, ha="center", va="center",
                    fontsize=9, color="0.35")
        ax.set_ylim(0, 105)
        ax.set_ylabel("hit rate (%)", fontsize=8)
        xs, ys = _rate(samples, "cache_bytes_h2d", t0, MiB)
        if any(ys):
            twin = ax.twinx()
            twin.plot(xs, ys, color="tab:gray", linewidth=0.8, label="H2D MiB/s")
            twin.set_ylabel("host to device (MiB/s)", fontsize=8)
            twin.set_ylim(bottom=0)
            twin.tick_params(labelsize=7)
            twin.yaxis.set_major_locator(MaxNLocator(nbins=4))
        _style(ax, "Expert cache: hit rate (orange), host-to-device copies (grey)")

    last = fig.axes[rows - 1] if rows else fig.axes[-1]
    for ax in fig.axes:
        ax.tick_params(labelsize=7)
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.title.set_fontsize(9)
    last.set_xlabel("seconds since the recording started", fontsize=8)
    fig.tight_layout()
    return fig


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels of a PNG, read from its header: frames must all match."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
