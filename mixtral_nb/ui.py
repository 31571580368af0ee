"""A chat widget for notebooks (ipywidgets 7 and 8): streaming bubbles, Stop, settings, a live resource panel.

The model runs in a worker thread; every widget update happens on the main thread, in a pump loop
that also lets the kernel process pending UI events (so Stop works mid-reply). Colab does not
deliver widget updates sent from background threads, hence this split.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import ipywidgets as widgets
from IPython import get_ipython
from IPython.display import display as ipython_display

from . import charts
from .monitor import ResourceMonitor

__all__ = ["ChatUI", "render_markdown"]

_BUBBLE_STYLE = {
    "user": "background:#e8f0fe;color:#111;margin:4px 0 4px 15%;",
    "assistant": "background:#f4f4f4;color:#111;margin:4px 15% 4px 0;",
}
_BUBBLE_COMMON = "padding:6px 10px;border-radius:10px;line-height:1.45;overflow-x:auto;word-wrap:break-word;"

_CSS = """<style>
.mnb-transcript pre { background:#272822; color:#f8f8f2; padding:6px 8px; border-radius:6px; overflow-x:auto; }
.mnb-transcript code { font-size:90%; }
.mnb-transcript p { margin:0.25em 0; }
.mnb-transcript table { border-collapse:collapse; } .mnb-transcript td, .mnb-transcript th { border:1px solid #ccc;
 padding:2px 6px; }
.mnb-stats { font-family:monospace; font-size:12px; color:#555; }
</style>"""


# --------------------------------------------------------------------------- markdown


def _simple_markdown(text: str) -> str:
    """Escape everything; keep fenced code blocks, paragraphs and line breaks."""
    out: list[str] = []
    chunks = text.split("```")
    for i, chunk in enumerate(chunks):
        if i % 2 == 1:  # inside a fence: drop the language tag line
            body = chunk.split("\n", 1)[1] if "\n" in chunk else chunk
            out.append(f"<pre><code>{html.escape(body)}</code></pre>")
            continue
        for para in chunk.split("\n\n"):
            if para.strip():
                out.append("<p>" + html.escape(para.strip("\n")).replace("\n", "<br>") + "</p>")
    return "".join(out)


def _make_renderer() -> Callable[[str], str]:
    try:  # Python-Markdown (preinstalled on Colab), with raw HTML switched off
        import markdown

        md = markdown.Markdown(extensions=["fenced_code", "tables", "sane_lists"])
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")

        def render_md(text: str) -> str:
            md.reset()
            return md.convert(text)

        return render_md
    except Exception:
        pass
    try:  # markdown-it-py (comes with rich), raw HTML escaped
        from markdown_it import MarkdownIt

        mdi = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("table")
        return mdi.render
    except Exception:
        return _simple_markdown


_renderer: Callable[[str], str] | None = None
_renderer_lock = threading.Lock()


def render_markdown(text: str) -> str:
    """Markdown to HTML for a chat bubble; raw HTML in the text is shown, never interpreted."""
    global _renderer
    with _renderer_lock:  # Python-Markdown instances are not thread-safe
        if _renderer is None:
            _renderer = _make_renderer()
        try:
            return _renderer(text)
        except Exception:
            return _simple_markdown(text)


# --------------------------------------------------------------------------- UI event polling


def _kernel() -> Any:
    shell = get_ipython()
    return getattr(shell, "kernel", None) if shell is not None else None


@contextlib.contextmanager
def _ui_poller() -> Iterator[Callable[[], None]]:
    """Yield a function that processes pending kernel messages (widget clicks), or a no-op.

    Inside a kernel this is jupyter_ui_poll's ``ui_events``. It replaces the kernel's
    execute_request handler until "post_run_cell"; when the pump runs from a button callback
    no cell finishes, so we hand control back ourselves and replay any cell run meanwhile.
    """
    ctx: Any = None
    poll: Callable[[int], Any] | None = None
    wrapper_cls: Any = None
    if _kernel() is not None:
        try:
            from jupyter_ui_poll import ui_events
            from jupyter_ui_poll._poll import KernelWrapper as wrapper_cls

            ctx = ui_events()
            poll = ctx.__enter__()
        except Exception:  # not installed or an unsupported kernel: Stop then works only between replies
            ctx = poll = None

    def safe_poll() -> None:
        if poll is None:
            return
        try:
            poll(20)
        except Exception:
            pass

    try:
        yield safe_poll
    finally:
        if ctx is not None:
            with contextlib.suppress(Exception):
                ctx.__exit__(None, None, None)
            wrapper = getattr(wrapper_cls, "_current", None)
            if wrapper is not None:
                with contextlib.suppress(Exception):
                    wrapper._post_run_cell()  # restore execute_request, replay deferred cells


def _loop_for_async_pump() -> Any:
    """The kernel's running event loop when blocking + polling cannot work, else None.

    ipykernel 7 has no ``do_one_iteration``: a blocked main thread sees no widget events at all.
    There the pump runs as a task on the kernel's loop instead (a Stop click is dispatched
    between its steps). This includes JupyterLab >= 4.4's comm subshells, where the handler runs in
    a subshell thread with its own loop. Colab's ipykernel 6 and plain Python use the blocking pump.
    """
    kernel = _kernel()
    if kernel is None or hasattr(kernel, "do_one_iteration"):
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# --------------------------------------------------------------------------- the widget


class ChatUI:
    """A chat box for a ``ChatSession``: call ``display()`` in a notebook cell.

    ``send(text)``, ``stop()``, ``regenerate()`` and ``clear()`` are what the buttons call; they
    work the same from code (and tests). ``send`` returns when the reply is complete.
    """

    chart_interval = 1.0  # seconds between live-panel redraws while generating
    text_interval = 0.08  # seconds between re-renders of the streaming bubble

    def __init__(self, session: Any, monitor: ResourceMonitor | None = None) -> None:
        self.session = session
        self.monitor = monitor if monitor is not None else ResourceMonitor(getattr(session, "model", None))
        self._busy = False
        self._stop_requested = False
        self._tok_history: deque[tuple[float, float]] = deque(maxlen=600)
        self.last_error: BaseException | None = None

        self.transcript = widgets.VBox(layout=widgets.Layout(width="100%"))
        self.transcript.add_class("mnb-transcript")
        # a column-reverse scroll box stays pinned to its bottom as replies grow (no JavaScript needed)
        scroller = widgets.Box(
            [self.transcript],
            layout=widgets.Layout(display="flex", flex_flow="column-reverse", overflow="auto", max_height="520px",
                                  width="100%"),
        )

        self.input = widgets.Text(
            placeholder="Message (Enter to send)", layout=widgets.Layout(flex="1 1 auto", width="auto")
        )
        self.input.add_class("mnb-input")
        with warnings.catch_warnings():  # deprecated (not removed) in ipywidgets 8; the only Enter hook in 7
            warnings.simplefilter("ignore")
            self.input.on_submit(lambda _w: self.send())

        self.send_button = self._button("Send", "primary", "mnb-send", lambda _b: self.send())
        self.stop_button = self._button("Stop", "danger", "mnb-stop", lambda _b: self.stop())
        self.stop_button.disabled = True
        self.regenerate_button = self._button("Regenerate", "", "mnb-regenerate", lambda _b: self.regenerate())
        self.clear_button = self._button("Clear", "", "mnb-clear", lambda _b: self.clear())

        style = {"description_width": "110px"}
        self.temperature = widgets.FloatSlider(
            value=float(session.temperature), min=0.0, max=2.0, step=0.05, description="temperature", style=style
        )
        self.top_p = widgets.FloatSlider(
            value=float(session.top_p), min=0.05, max=1.0, step=0.05, description="top_p", style=style
        )
        self.max_new_tokens = widgets.IntSlider(
            value=int(session.max_new_tokens), min=16, max=max(4096, int(session.max_new_tokens)), step=16,
            description="max new tokens", style=style,
        )
        self.system_prompt = widgets.Textarea(
            value=session.system_prompt or "", placeholder="System prompt (optional)", description="system",
            layout=widgets.Layout(width="98%", height="70px"), style=style,
        )
        self.system_prompt.add_class("mnb-system")
        settings = widgets.VBox([self.system_prompt, widgets.HBox([self.temperature, self.top_p]), self.max_new_tokens])
        self.settings = widgets.Accordion(children=[settings], selected_index=None)
        self.settings.set_title(0, "Settings")

        self.chart = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.chart.add_class("mnb-chart")
        self.stats = widgets.HTML(value="")
        self.stats.add_class("mnb-stats")

        buttons = widgets.HBox([self.send_button, self.stop_button, self.regenerate_button, self.clear_button])
        self._widget = widgets.VBox(
            [
                widgets.HTML(_CSS),
                scroller,
                widgets.HBox([self.input], layout=widgets.Layout(width="100%")),
                buttons,
                self.settings,
                self.chart,
                self.stats,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self._widget.add_class("mnb-chat")
        for message in session.history:
            self._add_bubble(message["role"], message["content"])
        self._refresh_panel(sample=True)

    # ---- public API

    @property
    def widget(self) -> widgets.VBox:
        """The top-level widget (embed it in your own layout instead of calling ``display``)."""
        return self._widget

    def display(self) -> None:
        """Show the chat in the current notebook cell."""
        ipython_display(self._widget)

    def send(self, text: str | None = None) -> str | None:
        """Send ``text`` (default: the input box) and stream the reply into the transcript.

        Returns the reply; None if ignored (busy, empty) or, under ipykernel 7, at once while the
        reply keeps streaming from the kernel's event loop.
        """
        if self._busy:
            return None
        if text is None:
            text = self.input.value
        if not text.strip():
            return None
        self.input.value = ""
        self._add_bubble("user", text)
        return self._run(lambda: self.session.stream(text))

    def regenerate(self) -> str | None:
        """Replace the last reply with a new one."""
        if self._busy or not self.session.history:
            return None
        if self.session.history[-1]["role"] == "assistant" and self.transcript.children:
            self.transcript.children = self.transcript.children[:-1]
        return self._run(self.session.stream_regenerate)

    def stop(self) -> None:
        """End the reply being generated (the partial text is kept)."""
        self._stop_requested = True
        self.session.stop()

    def clear(self) -> None:
        """Start a new conversation (the system prompt and settings stay)."""
        if self._busy:
            return
        self.session.reset()
        self.transcript.children = ()
        self._refresh_panel(sample=True)

    # ---- building blocks

    @staticmethod
    def _button(label: str, style: str, css: str, handler: Callable[[Any], Any]) -> widgets.Button:
        button = widgets.Button(description=label, button_style=style, layout=widgets.Layout(width="110px"))
        button.add_class(css)
        button.on_click(handler)
        return button

    def _bubble_html(self, role: str, text: str, caption: str = "", cursor: bool = False) -> str:
        body = render_markdown(text) if text else ""
        if cursor:
            body += "<span style='opacity:0.6'>&#9612;</span>"
        if caption:
            body += f"<div style='font-size:11px;color:#777;margin-top:2px'>{html.escape(caption)}</div>"
        return f"<div style='{_BUBBLE_COMMON}{_BUBBLE_STYLE[role]}'>{body}</div>"

    def _add_bubble(self, role: str, text: str, cursor: bool = False) -> widgets.HTML:
        if role not in _BUBBLE_STYLE:
            role = "assistant"
        bubble = widgets.HTML(value=self._bubble_html(role, text, cursor=cursor), layout=widgets.Layout(width="100%"))
        bubble.add_class(f"mnb-msg-{role}")
        self.transcript.children = tuple(self.transcript.children) + (bubble,)
        return bubble

    def _apply_settings(self) -> None:
        self.session.temperature = float(self.temperature.value)
        self.session.top_p = float(self.top_p.value)
        self.session.max_new_tokens = int(self.max_new_tokens.value)
        self.session.system_prompt = self.system_prompt.value.strip() or None

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        self.send_button.disabled = busy
        self.regenerate_button.disabled = busy
        self.clear_button.disabled = busy
        self.stop_button.disabled = not busy

    def _refresh_panel(self, sample: bool, tokens: int | None = None, tok_s: float | None = None) -> None:
        if sample and not self.monitor.running:
            self.monitor.sample()
        samples = self.monitor.samples
        try:
            self.chart.value = charts.render_live_panel(samples, list(self._tok_history))
        except Exception:  # a chart must never break the chat
            pass
        parts = []
        if tok_s is not None:
            parts.append(f"{tok_s:.1f} tok/s")
        if tokens is not None:
            parts.append(f"{tokens} tokens")
        last = samples[-1] if samples else {}
        if last.get("cache_hit_rate") is not None:
            parts.append(f"expert-cache hits {100 * last['cache_hit_rate']:.0f}%")
        if last.get("gpu_used_gib") is not None:
            parts.append(f"VRAM {last['gpu_used_gib']:.1f}/{last['gpu_total_gib']:.1f} GiB")
        if last.get("rss_gib") is not None:
            parts.append(f"RSS {last['rss_gib']:.1f} GiB")
        self.stats.value = " &middot; ".join(parts)

    # ---- generation: worker thread + main-thread pump

    def _run(self, make_stream: Callable[[], Iterator[str]]) -> str | None:
        self._apply_settings()
        self._set_busy(True)
        self._stop_requested = False
        self.last_error = None
        pump = _Pump(self._add_bubble("assistant", "", cursor=True))

        def worker() -> None:
            try:
                for piece in make_stream():
                    pump.events.put(("piece", piece))
            except BaseException as exc:  # reported on the main thread
                pump.events.put(("error", exc))
            finally:
                pump.events.put(("done", None))

        thread = threading.Thread(target=worker, name="mixtral_nb-chat", daemon=True)
        loop = _loop_for_async_pump()
        try:
            thread.start()
            if loop is not None:  # ipykernel 7+: pump from the kernel's event loop; the handler returns now
                loop.create_task(self._pump_async(pump, thread))
                return None
            self._pump_blocking(pump)
        except BaseException:
            self.stop()
            thread.join()
            self._set_busy(False)
            raise
        thread.join()
        self._set_busy(False)
        return self._finish_reply(pump)

    def _pump_blocking(self, pump: _Pump) -> None:
        """Main-thread loop until the reply ends; polls the kernel so a Stop click is seen mid-reply."""
        with _ui_poller() as poll:
            while True:
                try:
                    if self._pump_step(pump, wait=0.03):
                        return
                    poll()
                except KeyboardInterrupt:  # kernel interrupt: end the reply, keep pumping until it has
                    self.stop()

    async def _pump_async(self, pump: _Pump, thread: threading.Thread) -> None:
        """The same loop as a task on the kernel's event loop, which dispatches widget events in between."""
        try:
            while not self._pump_step(pump, wait=0.0):
                await asyncio.sleep(0.03)
        finally:
            thread.join()
            self._set_busy(False)
            self._finish_reply(pump)

    def _pump_step(self, pump: _Pump, wait: float) -> bool:
        """Move queued text and, about once a second, a chart frame into the widgets. True when done."""
        try:
            kind, payload = pump.events.get(timeout=wait) if wait > 0 else pump.events.get_nowait()
            while True:
                if kind == "piece":
                    pump.text += payload
                elif kind == "error":
                    self.last_error = payload
                elif kind == "done":
                    pump.done = True
                kind, payload = pump.events.get_nowait()
        except queue.Empty:
            pass
        now = time.monotonic()
        if pump.text != pump.shown and (now - pump.last_text >= self.text_interval or pump.done):
            pump.bubble.value = self._bubble_html("assistant", pump.text, cursor=not pump.done)
            pump.shown, pump.last_text = pump.text, now
        if now - pump.last_chart >= self.chart_interval and not pump.done:
            progress = dict(getattr(self.session, "progress", {}) or {})
            if progress.get("tokens", 0) > 1:
                self._tok_history.append((time.time(), float(progress.get("tok_s", 0.0))))
            self._refresh_panel(sample=True, tokens=progress.get("tokens"), tok_s=progress.get("tok_s"))
            pump.last_chart = now
        return pump.done

    def _finish_reply(self, pump: _Pump) -> str | None:
        history = self.session.history
        reply = history[-1]["content"] if history and history[-1]["role"] == "assistant" else None
        stats = getattr(self.session, "last_stats", None) or {}
        caption = ""
        if self.last_error is not None:
            reply = None
            caption = f"error: {type(self.last_error).__name__}: {self.last_error}"
        elif stats:
            caption = f"{stats.get('tokens', 0)} tokens, {stats.get('tok_s', 0.0):.1f} tok/s"
            if stats.get("stop_reason") in ("stop", "interrupted"):
                caption += " (stopped)"
            if stats.get("tokens", 0) > 1:
                self._tok_history.append((time.time(), float(stats.get("tok_s", 0.0))))
        pump.bubble.value = self._bubble_html("assistant", reply or "", caption=caption)
        self._refresh_panel(sample=True, tokens=stats.get("tokens"), tok_s=stats.get("tok_s"))
        return reply


class _Pump:
    """State of one streaming reply, shared by the worker thread (events) and the main-thread pump."""

    def __init__(self, bubble: widgets.HTML) -> None:
        self.bubble = bubble
        self.events: queue.Queue = queue.Queue()
        self.text = ""
        self.shown: str | None = None
        self.last_text = 0.0
        self.last_chart = time.monotonic()  # first frame after chart_interval: short replies draw only at the end
        self.done = False
