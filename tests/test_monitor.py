"""ResourceMonitor on a CPU-only machine, and the chart helpers."""

from __future__ import annotations

import time

import pytest

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


# ------------------------------------------------------------------ the live panel a person reads at a glance


def cpu_samples(model=None, n=4):
    """Real samples of this (GPU-less) machine, with the expert cache moving between them."""
    mon = ResourceMonitor(model=model, device="cpu")
    for _ in range(n):
        if model is not None:
            model.touch()
        mon.sample()
    return mon.samples


def gpu_samples(n=60):
    """What a T4 run's samples hold (a GPU cannot be sampled here, so these are written out)."""
    t0 = time.time() - n
    return [{"t": t0 + i, "gpu_used_gib": 13.0 + 0.01 * i, "gpu_total_gib": 15.0, "gpu_util_pct": 60.0,
             "torch_allocated_gib": 12.0, "torch_reserved_gib": 12.5, "rss_gib": 9.5, "ram_available_gib": 2.5,
             "ram_total_gib": 12.7, "cache_hits": 30 * i, "cache_misses": 10 * i,
             "cache_hit_rate": 0.75 if i else None} for i in range(n)]


def tok_history(samples):
    return [(s["t"], 2.0 + 0.1 * i) for i, s in enumerate(samples)]


def texts(ax):
    return [t.get_text() for t in ax.texts]


def visible_text_boxes(fig):
    """Window boxes of every visible, non-empty text: titles, tick labels, axis labels, notes."""
    fig.canvas.draw()  # labels find their places while drawing
    renderer = fig.canvas.get_renderer()
    boxes = []
    for ax in fig.axes:
        candidates = [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts,
                      *ax.get_xticklabels(), *ax.get_yticklabels()]
        for t in candidates:
            if t.get_visible() and t.get_text().strip():
                boxes.append((t.get_text(), t.get_window_extent(renderer)))
    return boxes


def test_live_panel_frames_keep_one_pixel_size():
    """A frame that changes size makes the image jump in the page; every state draws the same size,
    at twice Colab's ~800 CSS pixels so it stays sharp."""
    model = ModelWithCache()
    cpu, gpu = cpu_samples(model), gpu_samples()
    frames = [charts.render_live_panel([], []), charts.render_live_panel(cpu, []),
              charts.render_live_panel(cpu, tok_history(cpu)), charts.render_live_panel(gpu, tok_history(gpu))]
    w, h = charts.LIVE_SIZE_IN
    size = (round(w * charts.LIVE_DPI * charts.LIVE_SCALE), round(h * charts.LIVE_DPI * charts.LIVE_SCALE))
    assert {charts.png_size(f) for f in frames} == {size}
    assert size[0] >= 1600


def test_live_panel_axes_have_labels_units_and_seconds_ago():
    fig = charts.live_panel_figure(gpu_samples(), tok_history(gpu_samples()))
    vram, ram, tok, hit = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["GiB", "GiB", "tokens/s", "%"]
    for ax in fig.axes:
        assert ax.get_title(loc="left")
        assert ax.get_xlim() == (-120.0, 0.0)
        assert [t.get_text() for t in ax.get_xticklabels()][-1] == "now"
    assert tok.get_xlabel() == hit.get_xlabel() == "seconds ago"
    assert vram.get_title(loc="left") == "GPU memory: 13.6 of 15.0 GiB"
    assert hit.get_title(loc="left") == "Expert-cache hits: 75%"
    assert vram.get_ylim()[0] == 0 and vram.get_ylim()[1] >= 15.0


def test_live_panel_on_cpu_says_no_gpu_and_shows_the_cache_missing():
    model = ModelWithCache()
    fig = charts.live_panel_figure(cpu_samples(model), [])
    vram, ram, tok, hit = fig.axes
    assert not vram.lines and any("no GPU" in t for t in texts(vram))
    assert ram.lines and ram.get_title(loc="left").startswith("Host RAM: this process")
    assert hit.get_title(loc="left") == "Expert-cache hits: 75%"  # 3 hits, 1 miss per touch
    assert hit.lines and 0 < min(hit.lines[0].get_ydata()) <= max(hit.lines[0].get_ydata()) < 100


def test_live_panel_before_the_first_reply_says_so_instead_of_tiny_axes():
    model = ModelWithCache()
    fig = charts.live_panel_figure(cpu_samples(), [])  # no model: no expert cache at all
    tok, hit = fig.axes[2], fig.axes[3]
    assert tok.get_ylim() == (0.0, 1.0) and texts(tok) == ["no reply yet"] and not tok.lines
    assert texts(hit) == ["no expert cache in this model"]
    mon = ResourceMonitor(model=model, device="cpu")
    mon.sample()
    mon.sample()  # a cache, but nothing loaded yet
    assert texts(charts.live_panel_figure(mon.samples, []).axes[3]) == ["no expert loads yet"]


def test_live_panel_text_never_overlaps():
    """Titles, tick labels and axis labels stay apart and inside the image, whatever the state."""
    model = ModelWithCache()
    cpu = cpu_samples(model)
    for samples, tok in (([], []), (cpu, tok_history(cpu)), (gpu_samples(), tok_history(gpu_samples()))):
        fig = charts.live_panel_figure(samples, tok)
        boxes = visible_text_boxes(fig)
        page = fig.bbox
        for text, box in boxes:
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text
        for i, (a, box_a) in enumerate(boxes):
            for b, box_b in boxes[i + 1:]:
                assert not box_a.overlaps(box_b), (a, b)


def test_timeline_labels_and_no_empty_gpu_row_on_cpu():
    model = ModelWithCache()
    fig = charts.plot_timeline(cpu_samples(model))
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert "no GPU" in titles[0] and not any("utilisation" in t for t in titles)
    assert fig.axes[0].get_ylabel() == "GiB"
    assert "seconds" in fig.axes[1].get_xlabel()
    gpu_fig = charts.plot_timeline(gpu_samples())
    assert any("GPU utilisation" in ax.get_title(loc="left") for ax in gpu_fig.axes)
    assert all(ax.get_ylabel() for ax in gpu_fig.axes)


# ------------------------------------------------------------------ the chart inside the chat widget


@pytest.fixture(scope="module")
def tiny_chat_model():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=512, initializer_range=0.2)
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


def test_chat_widget_updates_its_chart_in_place(tok, tiny_chat_model):
    """No flicker: a reply redraws the same Image widget (same object, same pixel size), never a new one."""
    from mixtral_nb.chat import ChatSession
    from mixtral_nb.ui import ChatUI

    ui = ChatUI(ChatSession(tiny_chat_model, tok, max_new_tokens=4))
    chart, first = ui.chart, bytes(ui.chart.value)
    children = list(ui.widget.children)
    ui.send("Hello")
    assert ui.chart is chart and list(ui.widget.children) == children
    assert bytes(chart.value) != first
    assert charts.png_size(bytes(chart.value)) == charts.png_size(first)


def test_chat_widget_shows_every_turn_its_session_already_has(tok, tiny_chat_model):
    """The notebooks ask a question from code before they show the widget: it must appear there."""
    from mixtral_nb.chat import ChatSession
    from mixtral_nb.ui import ChatUI

    session = ChatSession(tiny_chat_model, tok, max_new_tokens=4)
    session.send("What is the capital of France?")
    session.send("And of Italy?")
    ui = ChatUI(session)
    def bubble(w):  # a message row holds its header, the bubble and a copy button
        if {"mnb-msg-user", "mnb-msg-assistant"} & set(getattr(w, "_dom_classes", ())):
            return w
        return next((b for c in getattr(w, "children", ()) if (b := bubble(c)) is not None), None)

    bubbles = [bubble(row) for row in ui.transcript.children]
    shown = [(("user" if "mnb-msg-user" in b._dom_classes else "assistant"), b.value) for b in bubbles]
    assert [role for role, _ in shown] == [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert "What is the capital of France?" in shown[0][1] and "And of Italy?" in shown[2][1]


def test_hit_rate_is_none_before_the_first_lookup():
    """0 % before anything was looked up would read as "every lookup missed"."""
    model = ModelWithCache()
    mon = ResourceMonitor(model=model, device="cpu")
    assert mon.sample()["cache_hit_rate"] is None and mon.latest()["cache_hits"] == 0
    model.touch()
    assert mon.sample()["cache_hit_rate"] == 0.75
