"""ChatUI driven in-process: typing, Enter, buttons, Stop mid-reply, with a tiny random Mixtral."""

from __future__ import annotations

import ipywidgets as widgets
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from mixtral_nb.chat import ChatSession
from mixtral_nb.ui import ChatUI, _simple_markdown, render_markdown


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


def with_class(ui, css):
    return [w for w in walk(ui.widget) if css in getattr(w, "_dom_classes", ())]


def bubbles(ui):
    return [(("user" if "mnb-msg-user" in b._dom_classes else "assistant"), b) for b in ui.transcript.children]


def test_layout_has_the_stable_css_hooks(ui):
    for css in ("mnb-input", "mnb-send", "mnb-stop", "mnb-regenerate", "mnb-clear", "mnb-transcript", "mnb-chart",
                "mnb-stats"):
        assert len(with_class(ui, css)) == 1, css
    assert isinstance(ui.widget, widgets.VBox)
    assert bytes(ui.chart.value).startswith(b"\x89PNG")  # drawn once up front
    assert "RSS" in ui.stats.value
    assert ui.stop_button.disabled and not ui.send_button.disabled


def test_click_send_streams_a_reply_into_the_transcript(ui):
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
    assert not ui.send_button.disabled and ui.stop_button.disabled
    assert bytes(ui.chart.value).startswith(b"\x89PNG") and "tok/s" in ui.stats.value


def test_enter_in_the_input_sends(ui):
    ui.input.value = "Sent with Enter"
    ui.input._handle_string_msg(None, {"event": "submit"}, [])  # what the front end sends on Enter
    assert ui.session.history[0] == {"role": "user", "content": "Sent with Enter"}
    assert len(ui.transcript.children) == 2


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
    assert "(stopped)" in ui.transcript.children[-1].value
    target = session.encoded_history()
    assert session.cache_ids == target and session.cache.length == len(target)
    assert not ui.send_button.disabled and ui.stop_button.disabled
    # the chat goes on normally afterwards
    assert ui.send("And now?")
    assert len(ui.transcript.children) == 4


def test_settings_regenerate_and_clear(ui):
    ui.system_prompt.value = "Answer in one word."
    ui.temperature.value = 0.0
    ui.max_new_tokens.value = 16
    first = ui.send("Hello")
    session = ui.session
    assert session.system_prompt == "Answer in one word." and session.max_new_tokens == 16
    ui.regenerate_button.click()
    assert session.history[-1]["content"] == first  # greedy
    assert [r for r, _ in bubbles(ui)] == ["user", "assistant"]
    ui.clear_button.click()
    assert session.history == [] and ui.transcript.children == ()
    assert ui.system_prompt.value == "Answer in one word."


def test_errors_are_shown_not_raised(tok, model):
    ui = ChatUI(ChatSession(model, tok, max_new_tokens=8, context_budget=20))
    assert ui.send("word " * 50) is None
    assert isinstance(ui.last_error, ValueError)
    assert "error" in ui.transcript.children[-1].value
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
    ui = ChatUI(session)
    assert [r for r, _ in bubbles(ui)] == ["user", "assistant"]
    assert "<em>reply</em>" in ui.transcript.children[1].value
