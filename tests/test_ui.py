"""ChatUI driven in-process (real widgets, a tiny random Mixtral): typing, buttons, Stop mid-reply, undo,
examples, copy, export, hints, and the token counts of the caption and the stats line."""

from __future__ import annotations

import base64
import json
import re
import threading

import ipywidgets as widgets
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from mixtral_nb.chat import ChatSession, SessionBusy
from mixtral_nb.ui import BUSY_HINT, GREEDY_NOTICE, ChatUI, _simple_markdown, render_markdown, reply_summary


@pytest.fixture(scope="module")
def model():
    cfg = MixtralConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture
def ui(tok, model):
    return ChatUI(ChatSession(model, tok, max_new_tokens=8))


def walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from walk(child)


def with_class(root, css):
    return [w for w in walk(root) if css in getattr(w, "_dom_classes", ())]


def bubbles(ui):
    """(role, bubble HTML widget) for each message shown, in order."""
    out = []
    for box in ui.transcript.children:
        (bubble,) = with_class(box, "mnb-msg-user") + with_class(box, "mnb-msg-assistant")
        out.append(("user" if "mnb-msg-user" in bubble._dom_classes else "assistant", bubble))
    return out


def shown(widget):
    return widget.layout.display != "none"


def caption_summary(bubble):
    m = re.search(r"\d+ tokens, [\d.]+ tok/s", bubble.value)
    assert m, bubble.value
    return m.group(0)


def assert_cache_prefix(session):
    """The engine holds a prefix of the encoded conversation, every layer alike."""
    held = session.cache_ids
    assert held == session.encoded_history()[: len(held)] and session.cache.length == len(held)
    kv = getattr(session.cache, "kv", None)
    if kv is not None:
        assert all(layer.keys.shape[-2] == layer.values.shape[-2] == len(held) for layer in kv.layers)


def test_layout_has_the_stable_css_hooks(ui):
    for css in ("mnb-chat", "mnb-input", "mnb-send", "mnb-stop", "mnb-regenerate", "mnb-undo", "mnb-clear",
                "mnb-transcript", "mnb-chart", "mnb-stats", "mnb-examples", "mnb-keyhint", "mnb-hint", "mnb-notice",
                "mnb-export", "mnb-copybox"):
        assert len(with_class(ui.widget, css)) == 1, css
    assert isinstance(ui.widget, widgets.VBox) and isinstance(ui.input, widgets.Textarea)  # multiline
    assert len(with_class(ui.widget, "mnb-example")) == 3 and shown(ui.examples)
    assert bytes(ui.chart.value).startswith(b"\x89PNG")  # drawn once up front
    assert "RSS" in ui.stats.value
    assert ui.stop_button.disabled and not ui.send_button.disabled
    assert not shown(ui.busy_hint) and not shown(ui.notice) and not shown(ui.copy_box)
    assert ui.undo() is None and ui.notice.value == "nothing to undo: the conversation is empty" and shown(ui.notice)
    assert ui.regenerate() is None and "nothing to regenerate" in ui.notice.value
    assert "Shift+Enter" in ui.key_hint.value and "Click Send" in ui.key_hint.value  # with and without the script


def test_click_send_streams_a_reply_with_names_times_and_copy(ui):
    ui.input.value = "Hello there"
    ui.send_button.click()
    history = ui.session.history
    assert [m["role"] for m in history] == ["user", "assistant"]
    reply = history[-1]["content"]
    assert reply
    (role_u, user), (role_a, answer) = bubbles(ui)
    assert (role_u, role_a) == ("user", "assistant")
    assert "Hello there" in user.value
    assert render_markdown(reply) in answer.value
    assert "tok/s" in answer.value  # per-reply stats caption
    assert ui.input.value == ""
    assert not ui.send_button.disabled and ui.stop_button.disabled and not ui.undo_button.disabled
    assert bytes(ui.chart.value).startswith(b"\x89PNG") and "tok/s" in ui.stats.value
    metas = [m.value for m in with_class(ui.transcript, "mnb-meta")]
    assert "<b>You</b>" in metas[0] and "<b>Assistant</b>" in metas[1]
    assert all(re.search(r"\d\d:\d\d", m) for m in metas)
    assert len(with_class(ui.transcript, "mnb-copy")) == 2
    assert not shown(ui.examples)  # example prompts only while the conversation is empty


def test_multiline_input_is_sent_as_typed(ui):
    ui.input.value = "first line\nsecond line"
    ui.send_button.click()
    assert ui.session.history[0] == {"role": "user", "content": "first line\nsecond line"}
    user = bubbles(ui)[0][1].value
    assert "first line" in user and "second line" in user and ("<br" in user or user.count("<p>") == 2)


def test_empty_input_is_ignored(ui):
    ui.input.value = "   "
    ui.send_button.click()
    assert ui.session.history == [] and ui.transcript.children == ()


def test_stop_mid_reply(ui, model):
    ui.max_new_tokens.value = 64
    calls = {"n": 0}

    def press_stop(module, args, output):  # runs on the worker thread, like a click arriving mid-reply
        calls["n"] += 1
        if calls["n"] == 4:
            ui.stop_button.click()

    handle = model.register_forward_hook(press_stop)
    try:
        reply = ui.send("Write a long essay")
    finally:
        handle.remove()
    session = ui.session
    assert session.last_stats["stop_reason"] == "stop"
    assert 0 < session.last_stats["tokens"] < 64
    assert reply == session.history[-1]["content"]
    last = bubbles(ui)[-1][1]
    assert "(stopped)" in last.value
    assert caption_summary(last) == reply_summary(session.last_stats) and caption_summary(last) in ui.stats.value
    target = session.encoded_history()
    assert session.cache_ids == target and session.cache.length == len(target)
    assert not ui.send_button.disabled and ui.stop_button.disabled
    # the chat goes on normally afterwards
    assert ui.send("And now?")
    assert len(ui.transcript.children) == 4


def test_settings_regenerate_greedy_notice_and_clear(ui):
    ui.system_prompt.value = "Answer in one word."
    ui.temperature.value = 0.0
    ui.max_new_tokens.value = 16
    first = ui.send("Hello")
    session = ui.session
    assert session.system_prompt == "Answer in one word." and session.max_new_tokens == 16
    assert not shown(ui.notice)
    ui.regenerate_button.click()
    assert session.history[-1]["content"] == first  # greedy
    assert shown(ui.notice) and ui.notice.value == GREEDY_NOTICE and "temperature" in GREEDY_NOTICE
    assert [r for r, _ in bubbles(ui)] == ["user", "assistant"]
    ui.temperature.value = 1.0
    ui.regenerate_button.click()
    assert not shown(ui.notice)  # sampling: no such notice
    assert [r for r, _ in bubbles(ui)] == ["user", "assistant"] and len(session.history) == 2
    ui.clear_button.click()
    assert session.history == [] and ui.transcript.children == ()
    assert ui.system_prompt.value == "Answer in one word." and shown(ui.examples)


def test_slider_keeps_a_small_max_new_tokens(tok, model):
    """A notebook's max_new_tokens=8 is shown and used as 8 (the slider's minimum is 1, not 16)."""
    session = ChatSession(model, tok, max_new_tokens=8, context_budget=300)
    ui = ChatUI(session)
    assert ui.max_new_tokens.value == 8 and ui.max_new_tokens.min == 1 and ui.max_new_tokens.max == 299
    session.min_new_tokens = 100  # random weights: run to the length limit
    ui.send("Hello")
    assert session.max_new_tokens == 8 and session.last_stats["tokens"] == 8
    ui.max_new_tokens.value = 1
    ui.send("Again")
    assert session.last_stats["tokens"] == 1


def test_undo_removes_the_last_exchange_and_keeps_the_cache_consistent(tok, model):
    session = ChatSession(model, tok, max_new_tokens=6, engine="transformers")
    ui = ChatUI(session)
    ui.send("First question")
    first_pair = [dict(m) for m in session.history]
    ui.send("Second question")
    assert len(session.history) == 4
    removed = ui.undo_button.click() or None
    assert removed is None  # (click returns nothing; the effect is below)
    assert session.history == first_pair
    assert [r for r, _ in bubbles(ui)] == ["user", "assistant"]
    assert "First question" in bubbles(ui)[0][1].value
    assert ui.input.value == "Second question"  # back in the box, to edit and send again
    assert_cache_prefix(session)
    reply = ui.send("Third question")
    fresh = ChatSession(model, tok, max_new_tokens=6, engine="transformers")
    fresh.history = first_pair
    assert fresh.send("Third question") == reply  # the shortened cache gives the same reply as a fresh one
    ui.input.value = ""
    assert [m["role"] for m in ui.undo()] == ["user", "assistant"]
    assert ui.undo()[0]["content"] == "First question"
    assert session.history == [] and ui.transcript.children == () and shown(ui.examples)
    assert ui.undo() is None and "nothing to undo" in ui.notice.value and shown(ui.notice)


def test_session_undo_is_atomic(tok, model):
    session = ChatSession(model, tok, max_new_tokens=5, engine="transformers")
    session.send("One")
    session.send("Two")
    before = [dict(m) for m in session.history]
    engine = session.cache

    def interrupted(n):
        raise KeyboardInterrupt

    engine.truncate = interrupted  # Ctrl-C while the cache is being cut
    with pytest.raises(KeyboardInterrupt):
        session.undo()
    del engine.truncate
    assert session.history == before  # as before
    assert_cache_prefix(session)
    reply = session.stream("Three")
    worker = threading.Thread(target=next, args=(reply,))
    worker.start()  # another thread's reply, suspended after its first piece: undo is refused, nothing changes
    worker.join()
    with pytest.raises(SessionBusy):
        session.undo()
    assert [m["content"] for m in session.history[-2:]][0] == "Three"
    session.stop()
    assert len(session.history) == 6
    assert [m["content"] for m in session.undo() if m["role"] == "user"] == ["Three"]
    assert session.history == before and session.message_info(session.history[-1])["stats"] is not None
    assert_cache_prefix(session)


def test_example_prompt_sends_and_examples_return_when_empty(ui):
    example = ui.example_buttons[0]
    example.click()
    assert ui.session.history[0] == {"role": "user", "content": example.tooltip}
    assert not shown(ui.examples)
    ui.clear()
    assert shown(ui.examples) and all(not b.disabled for b in ui.example_buttons)


def test_copy_gives_the_raw_text_and_a_fallback_box(ui):
    ui.send("Copy **this** <b>text</b>")
    reply = ui.session.history[-1]["content"]
    copy_buttons = with_class(ui.transcript, "mnb-copy")
    copy_buttons[0].click()
    assert ui.last_copied == "Copy **this** <b>text</b>"
    assert shown(ui.copy_box) and ui.copy_text.value == "Copy **this** <b>text</b>"
    copy_buttons[1].click()
    assert ui.last_copied == reply and ui.copy(-1) == reply
    with pytest.raises(IndexError, match="the transcript has 2 messages"):
        ui.copy(2)
    # the script reads the raw text from the bubble, escaped for the attribute
    user = bubbles(ui)[0][1].value
    assert "data-mnb-raw='Copy **this** &lt;b&gt;text&lt;/b&gt;'" in user and "<b>text</b>" not in user


def test_export_markdown_json_files_and_download_links(ui, tmp_path):
    ui.send("Hello")
    reply = ui.session.history[-1]["content"]
    md = ui.export()
    assert re.search(r"### You · \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d\n\nHello", md)
    assert "### Assistant · " in md and reply in md
    data = json.loads(ui.export("json"))
    assert data["messages"] == ui.session.history and data["names"] == {"user": "You", "assistant": "Assistant"}
    assert len(data["message_times"]) == 2 and all(data["message_times"])
    assert data["message_stats"][1] == ui.session.last_stats and data["message_stats"][0] is None

    path = ui.export("json", tmp_path / "chat.json")
    assert json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))["messages"] == ui.session.history
    assert json.loads(path) == data
    ui.export("markdown", tmp_path / "chat.json")  # replaced whole
    assert (tmp_path / "chat.json").read_text(encoding="utf-8") == md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary file left

    with pytest.raises(ValueError, match="does not exist"):
        ui.export("markdown", tmp_path / "missing" / "chat.md")
    with pytest.raises(ValueError, match="is a folder"):
        ui.export("markdown", tmp_path)
    with pytest.raises(ValueError, match="'markdown' or 'json'"):
        ui.export("html", tmp_path / "chat.html")
    assert not (tmp_path / "missing").exists() and not (tmp_path / "chat.html").exists()

    links = dict(re.findall(r"class='mnb-export-(\w+)' download='chat-[\d-]+\.\w+' href='data:[^;]+;charset=utf-8;"
                            r"base64,([A-Za-z0-9+/=]+)'", ui.export_links.value))
    assert base64.b64decode(links["md"]).decode() == md
    assert json.loads(base64.b64decode(links["json"]))["messages"] == ui.session.history


class TypingUI(ChatUI):
    """Types into the box on the main thread while a reply streams (the pump's third step)."""

    typed = "typed while busy"

    def _pump_step(self, pump, wait):
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 3:
            self.input.value = self.typed
            self.send_button.click()  # Send/Enter while busy: ignored, the text stays
            self.seen = (self.input.value, self.busy_hint.value, shown(self.busy_hint), self.send_button.disabled)
        return super()._pump_step(pump, wait)


def test_text_typed_while_busy_stays_with_a_hint(tok, model):
    session = ChatSession(model, tok, max_new_tokens=6, min_new_tokens=6)
    ui = TypingUI(session)
    ui.send("Hello")
    assert ui.seen == (TypingUI.typed, BUSY_HINT, True, True)
    assert "after Stop" in BUSY_HINT
    assert len(session.history) == 2  # the click while busy sent nothing
    assert ui.input.value == TypingUI.typed and not shown(ui.busy_hint) and not ui.send_button.disabled
    ui.send_button.click()
    assert session.history[-2] == {"role": "user", "content": TypingUI.typed} and ui.input.value == ""


def test_caption_and_stats_line_agree_on_the_token_count(ui):
    ui.max_new_tokens.value = 12
    ui.session.min_new_tokens = 12
    for text in ("One", "Two"):
        ui.send(text)
        summary = caption_summary(bubbles(ui)[-1][1])
        assert summary == reply_summary(ui.session.last_stats) == reply_summary(
            ui.session.message_info(ui.session.history[-1])["stats"])
        assert ui.stats.value.startswith(summary)
    assert "12 tokens" in summary
    assert ui.send("word " * (ui.session.context_budget + 1)) is None  # refused before the reply: no stale count
    assert "tokens" not in ui.stats.value and len(ui.session.history) == 4


def test_errors_are_shown_and_the_text_comes_back(tok, model):
    ui = ChatUI(ChatSession(model, tok, max_new_tokens=8, context_budget=20))
    ui.input.value = "word " * 50
    ui.send_button.click()
    assert isinstance(ui.last_error, ValueError)
    assert shown(ui.notice) and "error: ValueError" in ui.notice.value and "context budget" in ui.notice.value
    assert ui.transcript.children == () and ui.session.history == []  # the transcript shows the history
    assert ui.input.value == "word " * 50  # nothing was sent: the text is back to shorten
    assert not ui.send_button.disabled


def test_markdown_is_rendered_and_raw_html_is_not():
    out = render_markdown("**bold** and `code`\n\n```python\nx = 1 < 2\n```\n\n<script>alert(1)</script>")
    assert "<strong>bold</strong>" in out and "<code>code</code>" in out
    assert "<pre>" in out and "x = 1 &lt; 2" in out
    assert "<script>" not in out


def test_fallback_markdown_escapes_everything():
    out = _simple_markdown("a <b>\nline\n\n```py\nif a < b:\n    pass\n```\nafter")
    assert out == "<p>a &lt;b&gt;<br>line</p><pre><code>if a &lt; b:\n    pass\n</code></pre><p>after</p>"


def test_existing_history_is_shown(tok, model):
    session = ChatSession(model, tok)
    session.history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "*reply*"}]
    ui = ChatUI(session, user_name="Ada", assistant_name="Mixtral")
    assert [r for r, _ in bubbles(ui)] == ["user", "assistant"]
    assert "<em>reply</em>" in bubbles(ui)[1][1].value
    assert "<b>Ada</b>" in with_class(ui.transcript, "mnb-meta")[0].value
    assert not shown(ui.examples) and not ui.undo_button.disabled
    assert "### Mixtral" in ui.export()
