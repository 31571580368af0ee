"""A chat widget for notebooks (ipywidgets 7 and 8): streaming bubbles and the usual chat controls
(send, Stop, regenerate, undo, clear, example prompts, multiline input, copy, export), settings, and a
live resource panel.

The model runs in a worker thread; every widget update happens on the main thread, in a pump loop
that also lets the kernel process pending UI events (so Stop works mid-reply). Colab does not
deliver widget updates sent from background threads, hence this split.

Two things need the browser's help: Enter to send (a textarea's Enter is a new line) and copying to
the clipboard. A small script, displayed once with the widget (Colab and JupyterLab run
``application/javascript`` outputs of trusted cells), handles both; where it does not run, the Send
button sends and Copy shows the text in a box to copy by hand, and the hints say so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import html
import os
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from IPython import get_ipython
from IPython.display import Javascript
from IPython.display import display as ipython_display

from . import charts
from .chat import SessionBusy
from .monitor import ResourceMonitor

__all__ = ["ChatUI", "render_markdown", "reply_summary"]

_BUBBLE_STYLE = {
    "user": "background:#e8f0fe;color:#111;margin:0 0 4px 15%;",
    "assistant": "background:#f4f4f4;color:#111;margin:0 15% 4px 0;",
}
_BUBBLE_COMMON = "padding:6px 10px;border-radius:10px;line-height:1.45;overflow-x:auto;word-wrap:break-word;"

_CSS = """<style>
.mnb-transcript pre { background:#272822; color:#f8f8f2; padding:6px 8px; border-radius:6px; overflow-x:auto; }
.mnb-transcript code { font-size:90%; }
.mnb-transcript p { margin:0.25em 0; }
.mnb-transcript table { border-collapse:collapse; } .mnb-transcript td, .mnb-transcript th { border:1px solid #ccc;
 padding:2px 6px; }
.mnb-stats { font-family:monospace; font-size:12px; color:#555; }
.mnb-meta { font-size:11px; color:#777; }
.mnb-copy { font-size:11px !important; height:20px !important; line-height:18px !important; padding:0 6px !important; }
.mnb-hint { font-size:12px; color:#a15c00; }
.mnb-notice { font-size:12px; color:#444; }
.mnb-keyhint, .mnb-export, .mnb-small { font-size:12px; color:#666; }
.mnb-keys-js { display:none; }
body.mnb-js .mnb-keys-js { display:inline; }
body.mnb-js .mnb-keys-nojs { display:none; }
body.mnb-js .mnb-chat:not(.mnb-copy-failed) .mnb-copybox { display:none !important; }
</style>"""

# Runs once per page (guarded): Enter in a chat's textarea clicks its Send button (Shift+Enter keeps the
# new line), a Copy button copies its message's text (kept in the bubble's data-mnb-raw attribute), and
# body.mnb-js switches the hints to the keyboard version. Listeners sit on window, in the capture phase,
# so they see keys before JupyterLab's shortcuts and work for chats rendered later.
_JS = r"""
(function () {
  document.body.classList.add('mnb-js');
  if (window.__mnbChatScript) { return; }
  window.__mnbChatScript = true;
  function legacyCopy(text) {
    return new Promise(function (ok, fail) {
      var ta = document.createElement('textarea');
      ta.value = text; ta.setAttribute('readonly', ''); ta.style.position = 'fixed'; ta.style.opacity = '0';
      document.body.appendChild(ta); ta.select();
      var done = false;
      try { done = document.execCommand('copy'); } catch (e) { done = false; }
      document.body.removeChild(ta);
      if (done) { ok(); } else { fail(new Error('copy refused')); }
    });
  }
  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text).catch(function () { return legacyCopy(text); });
    }
    return legacyCopy(text);
  }
  window.addEventListener('keydown', function (e) {
    var t = e.target;
    if (!t || t.tagName !== 'TEXTAREA' || !t.closest || !t.closest('.mnb-input')) { return; }
    if (e.key !== 'Enter' || e.isComposing || e.keyCode === 229) { return; }
    e.stopPropagation();  // keep notebook shortcuts (Shift+Enter runs the cell) out of the chat box
    if (e.shiftKey || e.altKey) { return; }  // Shift+Enter: the textarea's own new line
    e.preventDefault();
    var root = t.closest('.mnb-chat');
    var send = root && root.querySelector('.mnb-send');
    if (send && !send.disabled) { send.click(); }
  }, true);
  window.addEventListener('click', function (e) {
    var b = e.target && e.target.closest ? e.target.closest('.mnb-copy') : null;
    if (!b || b.disabled) { return; }
    var msg = b.closest('.mnb-msg');
    var src = msg && msg.querySelector('[data-mnb-raw]');
    if (!src) { return; }
    var text = src.getAttribute('data-mnb-raw');
    var root = b.closest('.mnb-chat');
    var label = b.textContent;
    copyText(text).then(function () {
      window.mnbLastCopied = text;
      b.textContent = 'Copied';
    }, function () {
      if (root) { root.classList.add('mnb-copy-failed'); }  // show the copy box the kernel fills
      b.textContent = 'Copy failed';
    }).then(function () { setTimeout(function () { b.textContent = label; }, 1500); });
  }, true);
})();
"""

BUSY_HINT = ("A reply is being generated: your text stays here and can be sent when the reply finishes "
             "(or after Stop).")
GREEDY_NOTICE = ("Temperature is 0 (greedy decoding), so Regenerate gives the same reply again: raise the "
                 "temperature in Settings for a different one.")
DEFAULT_EXAMPLES = (
    "What is the capital of France?",
    "Explain what a mixture-of-experts model is, in two sentences.",
    "Write a haiku about a GPU.",
)


def reply_summary(stats: dict | None) -> str:
    """``"N tokens, x tok/s"`` for a reply's stats (or live progress): the one format the bubble caption
    and the stats line both use, so they never disagree."""
    if not stats:
        return ""
    return f"{int(stats.get('tokens', 0))} tokens, {float(stats.get('tok_s', 0.0)):.1f} tok/s"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and one rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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


class _Row:
    """One message in the transcript: a header (name, time, Copy) above the bubble.

    ``message`` is the session's history dict it shows (None while a reply is still pending).
    """

    def __init__(self, role: str, name: str, when: float, on_copy: Callable[[_Row], Any]) -> None:
        self.role = role if role in _BUBBLE_STYLE else "assistant"
        self.message: dict | None = None
        self.text = ""
        self.when = when
        self._drawn: tuple | None = None
        self.meta = widgets.HTML(value=self._meta_html(name, when))
        self.meta.add_class("mnb-meta")
        self.copy_button = widgets.Button(description="Copy", tooltip="Copy this message",
                                          layout=widgets.Layout(width="auto"))
        self.copy_button.add_class("mnb-copy")
        self.copy_button.on_click(lambda _b: on_copy(self))
        self.bubble = widgets.HTML(value="", layout=widgets.Layout(width="100%"))
        self.bubble.add_class(f"mnb-msg-{self.role}")
        align = "flex-end" if self.role == "user" else "flex-start"
        head = widgets.HBox([self.meta, self.copy_button], layout=widgets.Layout(justify_content=align,
                                                                                 align_items="center"))
        head.add_class("mnb-msg-head")
        self.box = widgets.VBox([head, self.bubble], layout=widgets.Layout(width="100%"))
        self.box.add_class("mnb-msg")

    @staticmethod
    def _meta_html(name: str, when: float) -> str:
        return f"<b>{html.escape(name)}</b> &middot; {time.strftime('%H:%M', time.localtime(when))}"

    def render(self, text: str, caption: str = "", streaming: bool = False) -> None:
        """Draw the bubble (unless unchanged); a finished message carries its raw text for the Copy script."""
        if self._drawn == (text, caption, streaming):
            return
        self._drawn = (text, caption, streaming)
        self.text = text
        body = render_markdown(text) if text else ""
        if streaming:
            body += "<span style='opacity:0.6'>&#9612;</span>"
        if caption:
            body += f"<div style='font-size:11px;color:#777;margin-top:2px'>{html.escape(caption)}</div>"
        raw = "" if streaming else f" data-mnb-raw='{html.escape(text, quote=True)}'"
        self.bubble.value = f"<div class='mnb-bubble'{raw} style='{_BUBBLE_COMMON}{_BUBBLE_STYLE[self.role]}'>{body}</div>"
        self.copy_button.disabled = streaming


class ChatUI:
    """A chat box for a ``ChatSession``: call ``display()`` in a notebook cell.

    ``send(text)``, ``stop()``, ``regenerate()``, ``undo()``, ``clear()``, ``copy(i)`` and
    ``export(fmt, path)`` are what the controls call; they work the same from code (and tests).
    ``send`` returns when the reply is complete. ``examples`` are prompts offered as buttons while
    the conversation is empty; ``user_name`` and ``assistant_name`` label the messages (and the export).
    """

    chart_interval = 1.0  # seconds between live-panel redraws while generating
    text_interval = 0.08  # seconds between re-renders of the streaming bubble
    settle_s = 0.15  # after Send/Enter in a kernel: let the browser's last keystrokes arrive before reading the box
    settle_max_s = 2.0  # ... and while the box still reads empty, wait up to this long for its text

    def __init__(self, session: Any, monitor: ResourceMonitor | None = None,
                 examples: Sequence[str] = DEFAULT_EXAMPLES, user_name: str = "You",
                 assistant_name: str = "Assistant") -> None:
        self.session = session
        self.monitor = monitor if monitor is not None else ResourceMonitor(getattr(session, "model", None))
        self.names = {"user": str(user_name), "assistant": str(assistant_name)}
        self._busy = False
        self._settling = False
        self._stop_requested = False
        self._tok_history: deque[tuple[float, float]] = deque(maxlen=600)
        self._rows: list[_Row] = []
        self.last_error: BaseException | None = None
        self.last_copied: str | None = None

        self.transcript = widgets.VBox(layout=widgets.Layout(width="100%"))
        self.transcript.add_class("mnb-transcript")
        # a column-reverse scroll box stays pinned to its bottom as replies grow (no JavaScript needed)
        scroller = widgets.Box(
            [self.transcript],
            layout=widgets.Layout(display="flex", flex_flow="column-reverse", overflow="auto", max_height="520px",
                                  width="100%"),
        )

        self.example_buttons = []
        for text in examples:
            button = widgets.Button(description=text if len(text) <= 48 else text[:47] + "…", tooltip=text,
                                    layout=widgets.Layout(width="auto"))
            button.add_class("mnb-example")
            button.on_click(lambda _b, t=text: self._on_example(t))
            self.example_buttons.append(button)
        self.examples = widgets.HBox([widgets.HTML("<span class='mnb-small'>Try:&nbsp;</span>")]
                                     + self.example_buttons, layout=widgets.Layout(flex_flow="row wrap",
                                                                                   align_items="center"))
        self.examples.add_class("mnb-examples")

        self.input = widgets.Textarea(
            placeholder="Message", rows=2, continuous_update=True, layout=widgets.Layout(flex="1 1 auto", width="auto")
        )
        self.input.add_class("mnb-input")
        self.input.observe(self._update_busy_hint, names="value")
        self.key_hint = widgets.HTML(
            "<span class='mnb-keys-js'>Enter sends &middot; Shift+Enter adds a new line</span>"
            "<span class='mnb-keys-nojs'>Click Send to send (Enter adds a new line)</span>"
        )
        self.key_hint.add_class("mnb-keyhint")
        self.busy_hint = widgets.HTML("", layout=widgets.Layout(display="none"))
        self.busy_hint.add_class("mnb-hint")
        self.notice = widgets.HTML("", layout=widgets.Layout(display="none"))
        self.notice.add_class("mnb-notice")

        self.send_button = self._button("Send", "primary", "mnb-send", self._on_send_click)
        self.stop_button = self._button("Stop", "danger", "mnb-stop", lambda _b: self.stop())
        self.stop_button.disabled = True
        self.regenerate_button = self._button("Regenerate", "", "mnb-regenerate", lambda _b: self.regenerate())
        self.undo_button = self._button("Undo", "", "mnb-undo", lambda _b: self.undo())
        self.clear_button = self._button("Clear", "", "mnb-clear", lambda _b: self.clear())
        self.export_links = widgets.HTML("")
        self.export_links.add_class("mnb-export")

        self.copy_text = widgets.Textarea(value="", rows=4, layout=widgets.Layout(width="98%"))
        self.copy_box = widgets.VBox(
            [widgets.HTML("<span class='mnb-small'>Copy: select the text below and press Ctrl+C "
                          "(this page did not run the copy script).</span>"), self.copy_text],
            layout=widgets.Layout(display="none", width="100%"),
        )
        self.copy_box.add_class("mnb-copybox")

        style = {"description_width": "110px"}
        self.temperature = widgets.FloatSlider(
            value=float(session.temperature), min=0.0, max=2.0, step=0.05, description="temperature", style=style
        )
        self.top_p = widgets.FloatSlider(
            value=float(session.top_p), min=0.05, max=1.0, step=0.05, description="top_p", style=style
        )
        # min 1, step 1: the session's own value (a notebook's 8 on CPU) is shown and kept as is
        budget = int(getattr(session, "context_budget", 4097))
        self.max_new_tokens = widgets.IntSlider(
            value=int(session.max_new_tokens), min=1,
            max=max(int(session.max_new_tokens), min(4096, budget - 1), 1), step=1,
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

        buttons = widgets.HBox([self.send_button, self.stop_button, self.regenerate_button, self.undo_button,
                                self.clear_button, self.export_links],
                               layout=widgets.Layout(flex_flow="row wrap", align_items="center"))
        self._widget = widgets.VBox(
            [
                widgets.HTML(_CSS),
                scroller,
                self.examples,
                widgets.HBox([self.input], layout=widgets.Layout(width="100%")),
                self.key_hint,
                self.busy_hint,
                buttons,
                self.notice,
                self.copy_box,
                self.settings,
                self.chart,
                self.stats,
            ],
            layout=widgets.Layout(width="100%"),
        )
        self._widget.add_class("mnb-chat")
        self._sync_transcript()
        self._after_change()
        self._refresh_panel(sample=True)

    # ---- public API

    @property
    def widget(self) -> widgets.VBox:
        """The top-level widget (embed it in your own layout instead of calling ``display``)."""
        return self._widget

    def display(self) -> None:
        """Show the chat in the current notebook cell, with the small script for Enter and Copy."""
        ipython_display(self._widget)
        ipython_display(Javascript(_JS))

    def send(self, text: str | None = None) -> str | None:
        """Send ``text`` (default: the input box) and stream the reply into the transcript.

        Returns the reply; None if ignored (busy, empty), on an error (shown, the text put back into
        the box) or, under ipykernel 7, at once while the reply keeps streaming from the kernel's loop.
        """
        return self._send(text)

    def regenerate(self) -> str | None:
        """Replace the last reply with a new one (at temperature 0 a notice says it will be the same)."""
        if self._busy:
            return None
        if not self.session.history:
            self._set_notice("nothing to regenerate: the conversation is empty")
            return None
        self._set_notice(GREEDY_NOTICE if float(self.temperature.value) == 0.0 else "")
        shown = self._rows[:-1] if self._rows and self._rows[-1].role == "assistant" else self._rows
        pending = [self._new_row("assistant")]
        self.transcript.children = tuple(r.box for r in shown + pending)
        return self._run(self.session.stream_regenerate, pending)

    def undo(self) -> list[dict] | None:
        """Remove the last message and the reply to it (from the session too); the message goes back
        into the input box if that is empty. Returns the removed messages, None if there were none."""
        if self._busy:
            return None
        try:
            removed = self.session.undo()
        except (ValueError, SessionBusy) as exc:
            self._set_notice(str(exc))
            return None
        self._set_notice("")
        self._sync_transcript()
        self._after_change()
        users = [m["content"] for m in removed if m["role"] == "user"]
        if users and not self.input.value.strip():
            self.input.value = users[0]
        return removed

    def stop(self) -> None:
        """End the reply being generated (the partial text is kept)."""
        self._stop_requested = True
        self.session.stop()

    def clear(self) -> None:
        """Start a new conversation (the system prompt and settings stay)."""
        if self._busy:
            return
        self.session.reset()
        self._set_notice("")
        self._sync_transcript()
        self._after_change()
        self._refresh_panel(sample=True)

    def copy(self, index: int = -1) -> str:
        """The text of message ``index`` of the transcript (what its Copy button copies).

        The browser copies to the clipboard itself; this side also puts the text into a box that is
        shown only where the copy script could not run or was refused, to copy by hand.
        """
        if not -len(self._rows) <= index < len(self._rows):
            raise IndexError(f"copy({index}): the transcript has {len(self._rows)} messages")
        return self._copy_row(self._rows[index])

    def export(self, fmt: str = "markdown", path: str | os.PathLike | None = None) -> str:
        """The transcript as Markdown or JSON, with names and timestamps; with ``path``, also saved there.

        Files are written only where the caller says, in one rename (never half a file); the folder
        must exist. The widget offers the same text as download links instead, which write nothing on
        the kernel's machine (on Colab a remote one): the browser saves them where the user chooses.
        """
        if fmt not in ("markdown", "md", "json"):
            raise ValueError(f"export format must be 'markdown' or 'json', not {fmt!r}")
        target = None
        if path is not None:
            target = Path(path).expanduser()
            if target.is_dir():
                raise ValueError(f"export path {str(target)!r} is a folder: give a file name, e.g. {str(target / 'chat.md')!r}")
            if not target.parent.is_dir():
                raise ValueError(f"export path {str(target)!r}: the folder {str(target.parent)!r} does not exist; "
                                 "create it first")
        text = self.session.export(fmt, names=self.names)
        if target is not None:
            _write_atomic(target, text)
        return text

    # ---- building blocks

    @staticmethod
    def _button(label: str, style: str, css: str, handler: Callable[[Any], Any]) -> widgets.Button:
        button = widgets.Button(description=label, button_style=style, layout=widgets.Layout(width="100px"))
        button.add_class(css)
        button.on_click(handler)
        return button

    def _new_row(self, role: str, text: str = "") -> _Row:
        row = _Row(role, self.names.get(role, role), time.time(), self._copy_row)
        row.render(text, streaming=role == "assistant" and not text)
        return row

    def _caption(self, message: dict) -> str:
        stats = self.session.message_info(message)["stats"] if hasattr(self.session, "message_info") else None
        caption = reply_summary(stats)
        if stats and stats.get("stop_reason") in ("stop", "interrupted"):
            caption += " (stopped)"
        return caption

    def _sync_transcript(self, pending: Sequence[_Row] = ()) -> None:
        """Make the transcript show exactly the session's history: rows are reused by message identity,
        ``pending`` rows (streamed before their messages existed) adopt the last messages, others are new."""
        history = list(self.session.history)
        known = {id(r.message): r for r in self._rows if r.message is not None}
        pending = list(pending)
        first_pending = len(history) - len(pending)
        rows: list[_Row] = []
        for i, m in enumerate(history):
            row = known.get(id(m))
            if row is None or row.message is not m:
                cand = pending[i - first_pending] if i >= first_pending else None
                if cand is not None and cand.role == m["role"] and (m["role"] != "user" or cand.text == m["content"]):
                    row = cand
                else:
                    info = self.session.message_info(m) if hasattr(self.session, "message_info") else {}
                    row = _Row(m["role"], self.names.get(m["role"], m["role"]), info.get("time") or time.time(),
                               self._copy_row)
                row.message = m
            caption = self._caption(m) if m["role"] == "assistant" else ""
            row.render(m["content"], caption=caption)
            rows.append(row)
        self._rows = rows
        self.transcript.children = tuple(r.box for r in rows)

    def _after_change(self) -> None:
        """Controls that depend on the conversation: examples, Undo/Regenerate, the download links."""
        empty = not self.session.history
        self.examples.layout.display = "none" if not empty or not self.example_buttons else None
        # enabled even when empty: the session may have gained turns from code since (a notice says if not)
        for button in (self.regenerate_button, self.undo_button, self.clear_button, *self.example_buttons):
            button.disabled = self._busy
        if empty:
            self.export_links.value = ""
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        links = []
        for fmt, ext, mime, label in (("markdown", "md", "text/markdown", "Markdown"),
                                      ("json", "json", "application/json", "JSON")):
            data = base64.b64encode(self.export(fmt).encode("utf-8")).decode("ascii")
            links.append(f"<a class='mnb-export-{ext}' download='chat-{stamp}.{ext}' "
                         f"href='data:{mime};charset=utf-8;base64,{data}'>{label}</a>")
        self.export_links.value = "Download: " + " &middot; ".join(links)

    def _set_notice(self, text: str) -> None:
        self.notice.value = html.escape(text)
        self.notice.layout.display = None if text else "none"

    def _update_busy_hint(self, _change: Any = None) -> None:
        show = self._busy and bool(self.input.value.strip())
        self.busy_hint.value = BUSY_HINT if show else ""
        self.busy_hint.layout.display = None if show else "none"

    def _copy_row(self, row: _Row) -> str:
        self.last_copied = row.text
        self.copy_text.value = row.text
        self.copy_box.layout.display = None
        return row.text

    def _on_example(self, text: str) -> None:
        if self._busy:  # keep it for later, as typed text would be
            if not self.input.value.strip():
                self.input.value = text
            self._update_busy_hint()
            return
        self.send(text)

    def _on_send_click(self, _button: Any = None) -> None:
        """Send from the box. In a kernel, first give the browser a moment: it sends the textarea's value
        one update at a time, so the last keystrokes before Enter can arrive just after the click."""
        if self._busy:
            self._update_busy_hint()
            return
        if self._settling:
            return
        if _kernel() is None or self.settle_s <= 0:
            self._send(None)
            return
        self._settling = True
        start = time.monotonic()

        def settled() -> bool:
            waited = time.monotonic() - start
            return waited >= self.settle_max_s or (waited >= self.settle_s and bool(self.input.value.strip()))

        loop = _loop_for_async_pump()
        if loop is not None:  # ipykernel 7: the kernel dispatches the pending updates while this task sleeps

            async def later() -> None:
                try:
                    while not settled():
                        await asyncio.sleep(0.02)
                finally:
                    self._settling = False
                self._send(None)

            loop.create_task(later())
            return
        try:
            with _ui_poller() as poll:  # one poller for the wait and the reply that follows
                while not settled():
                    poll()
                    time.sleep(0.01)
                self._settling = False
                self._send(None, poll)
        finally:
            self._settling = False

    def _send(self, text: str | None, poll: Callable[[], None] | None = None) -> str | None:
        if self._busy:
            self._update_busy_hint()
            return None
        from_box = text is None
        if text is None:
            text = self.input.value
        if not isinstance(text, str) or not text.strip():
            return None
        if from_box:
            self.input.value = ""
        self._set_notice("")
        self.examples.layout.display = "none"
        pending = [self._new_row("user", text), self._new_row("assistant")]
        self.transcript.children = tuple(r.box for r in self._rows + pending)
        message = text
        return self._run(lambda: self.session.stream(message), pending, restore=text, poll=poll)

    def _apply_settings(self) -> None:
        self.session.temperature = float(self.temperature.value)
        self.session.top_p = float(self.top_p.value)
        self.session.max_new_tokens = int(self.max_new_tokens.value)
        self.session.system_prompt = self.system_prompt.value.strip() or None

    def _set_busy(self, busy: bool) -> None:
        self._busy = busy
        self.send_button.disabled = busy
        self.stop_button.disabled = not busy
        if busy:
            for button in (self.regenerate_button, self.undo_button, self.clear_button, *self.example_buttons):
                button.disabled = True
        else:
            self._after_change()
        self._update_busy_hint()

    def _refresh_panel(self, sample: bool, summary: str = "") -> None:
        if sample and not self.monitor.running:
            self.monitor.sample()
        samples = self.monitor.samples
        try:
            self.chart.value = charts.render_live_panel(samples, list(self._tok_history))
        except Exception:  # a chart must never break the chat
            pass
        parts = [summary] if summary else []
        last = samples[-1] if samples else {}
        if last.get("cache_hit_rate") is not None:
            parts.append(f"expert-cache hits {100 * last['cache_hit_rate']:.0f}%")
        if last.get("gpu_used_gib") is not None:
            parts.append(f"VRAM {last['gpu_used_gib']:.1f}/{last['gpu_total_gib']:.1f} GiB")
        if last.get("rss_gib") is not None:
            parts.append(f"RSS {last['rss_gib']:.1f} GiB")
        self.stats.value = " &middot; ".join(html.escape(p) for p in parts)

    # ---- generation: worker thread + main-thread pump

    def _run(self, make_stream: Callable[[], Iterator[str]], pending: list[_Row], restore: str | None = None,
             poll: Callable[[], None] | None = None) -> str | None:
        self._apply_settings()
        self._set_busy(True)
        self._stop_requested = False
        self.last_error = None
        pump = _Pump(pending, restore, len(getattr(self.session, "stats", ())))

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
            self._pump_blocking(pump, poll)
        except BaseException:
            self.stop()
            thread.join()
            self._set_busy(False)
            raise
        thread.join()
        self._set_busy(False)
        return self._finish_reply(pump)

    def _pump_blocking(self, pump: _Pump, poll: Callable[[], None] | None = None) -> None:
        """Main-thread loop until the reply ends; polls the kernel so a Stop click is seen mid-reply."""
        with contextlib.ExitStack() as stack:
            if poll is None:
                poll = stack.enter_context(_ui_poller())
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
            pump.reply_row.render(pump.text, streaming=not pump.done)
            pump.shown, pump.last_text = pump.text, now
        if now - pump.last_chart >= self.chart_interval and not pump.done:
            progress = dict(getattr(self.session, "progress", {}) or {})
            if progress.get("tokens", 0) > 1:
                self._tok_history.append((time.time(), float(progress.get("tok_s", 0.0))))
            self._refresh_panel(sample=True, summary=reply_summary(progress) if progress.get("tokens") else "")
            pump.last_chart = now
        return pump.done

    def _finish_reply(self, pump: _Pump) -> str | None:
        """The transcript back in line with the history; caption and stats line from the same stats."""
        session_stats = list(getattr(self.session, "stats", ()))
        stats = session_stats[-1] if len(session_stats) > pump.stats_before else None  # this reply's, or none
        self._sync_transcript(pump.pending)
        adopted = pump.reply_row in self._rows
        error = self.last_error
        if error is not None:
            text = f"error: {type(error).__name__}: {error}"
            self._set_notice(text)
            if adopted:
                pump.reply_row.render(pump.reply_row.text, caption=text)
            elif pump.restore is not None and not self.input.value.strip():
                self.input.value = pump.restore  # nothing was sent: the text is back for another try
        if stats and stats.get("tokens", 0) > 1:
            self._tok_history.append((time.time(), float(stats.get("tok_s", 0.0))))
        self._after_change()
        self._refresh_panel(sample=True, summary=reply_summary(stats) if adopted and error is None else "")
        if error is not None or not adopted:
            return None
        return pump.reply_row.text


class _Pump:
    """State of one streaming reply, shared by the worker thread (events) and the main-thread pump."""

    def __init__(self, pending: list[_Row], restore: str | None, stats_before: int) -> None:
        self.pending = pending
        self.reply_row = pending[-1]
        self.restore = restore
        self.stats_before = stats_before
        self.events: queue.Queue = queue.Queue()
        self.text = ""
        self.shown: str | None = None
        self.last_text = 0.0
        self.last_chart = time.monotonic()  # first frame after chart_interval: short replies draw only at the end
        self.done = False
