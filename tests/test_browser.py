"""notebooks/03_chat.ipynb in a real JupyterLab, driven through Debian's Chromium (marker ``browser``).

A throwaway JupyterLab serves a tmp copy of the notebook (a cell injected after its parameters
cell caps the reply length); Playwright opens it, runs all cells from the Run menu, and chats: the
widget opens with the notebook's own question and Undo takes it back, an example prompt is
answered, a reply must stream, the live chart must redraw, Stop must end a reply mid-way,
Shift+Enter makes a new line and Enter sends, Copy puts a message on the clipboard, Undo takes the
last exchange back into the box, the Markdown download holds the transcript, and the next question
must still be answered. Every wait is on a DOM condition with a bounded timeout.

Run it with ``make test-browser`` (or ``pytest -m browser tests``). Needs ``apt-get install chromium``.
Screenshots land in artifacts/ (``browser_chat_controls.png`` after Copy, ``browser_chat.png`` at the end;
``browser_chat_failure.png`` plus the server log on failure). The kernel imports ``mixtral_nb`` as the
environment resolves it: to test a checkout other than the installed one, put it on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from browser_support import (ARTIFACTS, ASSISTANT, CHROMIUM, REPO, USER, JupyterLab, chromium_page, last_bubble,
                             prepare_notebook, wait_bubble)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

NOTEBOOK = REPO / "notebooks" / "03_chat.ipynb"
# Long enough that a CPU reply is still streaming when Stop is clicked, short enough to bound the run.
OVERRIDES = {"MAX_NEW_TOKENS": 64}
LONG_QUESTION = "Write a long, detailed story about a dragon who learns to bake bread."
SHORT_QUESTION = "What is the capital of France?"

# bounded waits (seconds); the embedded model's first build, if it was not cached, is the long one
T_PAGE = 90
T_WIDGET = 210  # every cell: the model load and the notebook's own question from code
T_REPLY = 90
T_STOP = 45
QUIET = 2.0  # after Stop: the text must not change during this long

CHART = "img.mnb-chart, .mnb-chart img"  # ipywidgets 8 puts the class on the <img> itself
INPUT = ".mnb-input textarea"  # multiline: Enter sends (the widget's script), Shift+Enter adds a line


def _require_chromium() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: the browser test tier needs Debian's Chromium "
                    "(run `apt-get install chromium`; .ci/run installs it)", pytrace=False)


# --------------------------------------------------------------------------- page helpers


def _dismiss_dialogs(page, log: list[str]) -> None:
    """Accept any JupyterLab modal (kernel selection picks the notebook's kernel); note what it said."""
    dialogs = page.locator(".jp-Dialog")
    for _ in range(3):
        if dialogs.count() == 0:
            return
        try:
            text = dialogs.first.inner_text(timeout=5_000)
            log.append("dialog: " + " ".join(text.split())[:200])
            accept = dialogs.first.locator(".jp-Dialog-button.jp-mod-accept")
            if accept.count():
                accept.first.click(timeout=5_000)
            else:
                page.keyboard.press("Escape")
            dialogs.first.wait_for(state="detached", timeout=5_000)
        except Exception:  # it closed by itself meanwhile
            pass


def _error_outputs(page) -> list[str]:
    """Texts of tracebacks shown in cell outputs (stderr warnings are not errors)."""
    texts = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']").all_inner_texts()
    return [t for t in texts if "Traceback" in t or re.search(r"^\w*(Error|Exception)\b", t, re.M)]


def _run_all_cells(page) -> None:
    """Run > Run All Cells from the menu bar (the command palette if the menu is not there)."""
    try:
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click(timeout=10_000)
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click(timeout=10_000)
    except Exception:
        page.keyboard.press("Escape")
        page.keyboard.press("Control+Shift+C")
        page.locator(".lm-CommandPalette-input").fill("Run All Cells", timeout=10_000)
        page.locator(".lm-CommandPalette-item", has_text=re.compile(r"^Run All Cells")).first.click(timeout=10_000)


_ALL_CELLS_RAN_JS = """() => {
  const ps = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputArea-prompt')];
  return ps.length > 0 && ps.every(p => /^\\[\\d+\\]:$/.test(p.innerText.trim()));
}"""


def _wait_notebook(page, log: list[str], timeout: float, what: str) -> None:
    """Wait until every cell has run and the chat widget is shown, handling dialogs on the way.

    Fails at once on a traceback in an output (Run All stops at the failing cell).
    """
    deadline = time.monotonic() + timeout
    chat = page.locator(INPUT)
    while True:
        _dismiss_dialogs(page, log)
        errors = _error_outputs(page)
        if errors:
            raise AssertionError("a notebook cell failed:\n" + "\n---\n".join(e[-3000:] for e in errors))
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what} within {timeout:.0f} s (chat widget shown: {chat.count() > 0}; "
                                 f"prompts: {page.locator('.jp-CodeCell .jp-InputArea-prompt').all_inner_texts()})")
        try:
            page.wait_for_function(_ALL_CELLS_RAN_JS, timeout=min(3_000, left * 1000), polling=250)
            chat.wait_for(state="visible", timeout=min(3_000, max(1.0, left) * 1000))
            return
        except Exception:  # playwright's TimeoutError: look for dialogs/errors, then wait again
            continue


def _wait_stats_tokens(page, tokens: int, timeout: float = 20) -> None:
    """The stats line under the chart is redrawn after a reply's caption: wait for its final count."""
    try:
        page.wait_for_function("(n) => { const s = document.querySelector('.mnb-stats');"
                               " return s && s.innerText.includes(n + ' tokens'); }",
                               arg=tokens, timeout=timeout * 1000, polling=100)
    except Exception as exc:
        raise AssertionError(f"the stats line never showed '{tokens} tokens': "
                             f"{page.locator('.mnb-stats').inner_text()!r}") from exc


def _send(page, text: str) -> None:
    box = page.locator(INPUT)
    box.click()
    box.fill(text)
    box.press("Enter")


def _wait_reply_done(page, n_assistant: int, what: str) -> dict:
    """Wait for assistant bubble number ``n_assistant`` to be complete (no cursor, a token caption)."""
    return wait_bubble(page, "(b, n) => b.n >= n && !b.cursor && /\\d+ tokens/.test(b.text)", n_assistant, T_REPLY,
                        what)


def _count(page, sel: str) -> int:
    return page.locator(sel).count()


def _undo(page, message: str) -> None:
    """Click Undo: one user/assistant pair fewer, and ``message`` back in the input box."""
    users = _count(page, USER)
    page.locator(".mnb-undo").click()
    page.wait_for_function("([sel, n]) => document.querySelectorAll(sel).length === n", arg=[USER, users - 1],
                           timeout=15_000)
    assert _count(page, ASSISTANT) == users - 1
    page.wait_for_function("([sel, text]) => document.querySelector(sel).value === text", arg=[INPUT, message],
                           timeout=10_000)


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        page.locator(".mnb-chat").scroll_into_view_if_needed(timeout=2_000)
    except Exception:
        pass
    page.screenshot(path=str(ARTIFACTS / name), timeout=15_000)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def notebook_copy(tmp_path) -> Path:
    _require_chromium()  # before anything is started
    if not NOTEBOOK.exists():
        pytest.fail(f"{NOTEBOOK} is missing", pytrace=False)
    root = tmp_path / "notebooks"
    return prepare_notebook(NOTEBOOK, root / NOTEBOOK.name, OVERRIDES)


@pytest.fixture
def lab(notebook_copy, tmp_path):
    with JupyterLab(root_dir=notebook_copy.parent, work_dir=tmp_path / "lab") as server:  # stopped also on failure
        yield server


@pytest.fixture
def page(lab):
    with chromium_page() as pg:
        yield pg


# --------------------------------------------------------------------------- the test


def test_chat_notebook_streams_stops_and_answers_again(lab, page, notebook_copy):
    for stale in ("browser_chat_failure.png", "browser_jupyterlab.log"):
        (ARTIFACTS / stale).unlink(missing_ok=True)
    log: list[str] = []
    t0 = time.monotonic()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.monotonic() - t0, 1)

    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    try:
        page.goto(lab.url(f"lab/tree/{notebook_copy.name}"), wait_until="domcontentloaded", timeout=T_PAGE * 1000)
        page.locator(".jp-Notebook .jp-Cell").first.wait_for(state="visible", timeout=T_PAGE * 1000)
        _dismiss_dialogs(page, log)
        # the kernel is up (the status bar names it and says Idle) before Run All
        page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\|\s*Idle")).first.wait_for(
            state="visible", timeout=T_PAGE * 1000)
        mark("notebook open")

        _run_all_cells(page)
        _wait_notebook(page, log, T_WIDGET, "the notebook did not run to its end")
        lab.remember_children()
        mark("chat widget shown")
        chart = page.locator(CHART)
        first_chart = chart.get_attribute("src", timeout=10_000)
        assert first_chart, "the live chart has no image"
        # the widget's script ran: the key hint speaks of Enter
        page.wait_for_function("() => document.body.classList.contains('mnb-js')", timeout=15_000)
        assert "Enter sends" in page.locator(".mnb-keyhint").first.inner_text()

        # ---- the widget opens with the notebook's own question (asked from code before it was shown);
        # Undo takes it back into the box, so the chat below starts empty and shows the example prompts
        page.locator(USER, has_text=SHORT_QUESTION).first.wait_for(state="visible", timeout=15_000)
        assert _count(page, USER) == 1 and _count(page, ASSISTANT) == 1
        _undo(page, SHORT_QUESTION)
        mark("notebook's turn undone")

        # ---- an example prompt is sent by one click and answered
        examples = page.locator(".mnb-example")
        assert examples.count() >= 1
        example = examples.first.get_attribute("title") or examples.first.inner_text()
        examples.first.click()
        page.locator(USER, has_text=example.rstrip("…")[:20]).first.wait_for(state="visible", timeout=15_000)
        _wait_reply_done(page, 1, "the example prompt got no complete answer")
        page.locator(".mnb-send:not([disabled])").wait_for(state="visible", timeout=10_000)
        assert page.locator(".mnb-examples").is_hidden(), "the example prompts stay shown in a conversation"
        mark("example answered")
        # ... and undone: the exchange leaves the transcript, the prompt goes back into the box (the model's
        # context is empty again, so the long reply below is long)
        _undo(page, example)
        mark("example undone")

        # ---- 1st question: streams, the chart redraws live, Stop ends it mid-reply
        _send(page, LONG_QUESTION)
        page.locator(".mnb-msg-user", has_text="dragon").wait_for(state="visible", timeout=15_000)
        page.locator(".mnb-stop:not([disabled])").wait_for(state="visible", timeout=15_000)
        try:  # a redraw while the reply is running (the panel refreshes about once a second)
            page.wait_for_function(
                "([sel, first]) => { const i = document.querySelector(sel);"
                " const stop = document.querySelector('.mnb-stop');"
                " return i && i.getAttribute('src') && i.getAttribute('src') !== first && stop && !stop.disabled; }",
                arg=[CHART, first_chart], timeout=T_REPLY * 1000, polling=100)
        except Exception as exc:
            raise AssertionError("the live chart did not change while the reply was generating") from exc
        mark("chart redrawn")
        b1 = wait_bubble(page, "(b) => b.cursor && b.text.length > 0", None, T_REPLY,
                          "no streamed text appeared in the assistant bubble")
        b2 = wait_bubble(page, "(b, n) => b.cursor && b.text.length > n", len(b1["text"]), T_REPLY,
                          "the streaming reply did not grow")
        assert b2["text"] != b1["text"]
        mark("reply streaming")

        page.locator(".mnb-stop").click(timeout=10_000)
        stopped = wait_bubble(page, "(b) => !b.cursor && b.text.includes('(stopped)')", None, T_STOP,
                               "the reply did not end with '(stopped)' after clicking Stop (if it ran to its "
                               "max_new_tokens, the kernel handled the click only after the reply)")
        mark("stopped")
        page.locator(".mnb-send:not([disabled])").wait_for(state="visible", timeout=10_000)
        assert page.locator(".mnb-stop").is_disabled()
        tokens = int(re.search(r"(\d+) tokens", stopped["text"]).group(1))
        assert tokens < OVERRIDES["MAX_NEW_TOKENS"], f"Stop came after the reply had ended: {stopped['text']!r}"
        _wait_stats_tokens(page, tokens)
        page.wait_for_timeout(QUIET * 1000)  # a stopped reply stays as it is
        assert last_bubble(page)["text"] == stopped["text"], "the reply kept changing after Stop"

        # ---- multiline: Shift+Enter adds a line (nothing sent), Enter sends both lines
        box = page.locator(INPUT)
        users = _count(page, USER)
        assistants = _count(page, ASSISTANT)
        box.click()
        box.press_sequentially("Line one")
        box.press("Shift+Enter")
        box.press_sequentially("Line two")
        page.wait_for_timeout(300)
        assert box.input_value() == "Line one\nLine two", box.input_value()
        assert _count(page, USER) == users, "Shift+Enter sent the message"
        box.press("Enter")
        sent = page.locator(USER, has_text="Line two")
        sent.first.wait_for(state="visible", timeout=15_000)
        assert re.search(r"Line one\s*\n\s*Line two", sent.first.inner_text()), sent.first.inner_text()
        _wait_reply_done(page, assistants + 1, "the two-line message got no complete answer")
        assert box.input_value() == ""
        mark("multiline sent")

        # ---- Copy puts the message's own text on the clipboard
        copy = page.locator(".mnb-msg", has=page.locator(USER, has_text="Line two")).locator(".mnb-copy")
        copy.click()
        page.wait_for_function("(el) => el.textContent.includes('Copied')", arg=copy.element_handle(), timeout=10_000)
        clip = page.evaluate("() => navigator.clipboard.readText()")
        assert clip == "Line one\nLine two", repr(clip)
        assert page.locator(".mnb-copybox").is_hidden(), "the no-script copy box is shown though the script copied"
        _screenshot(page, "browser_chat_controls.png")
        mark("copied")

        # ---- Undo removes that exchange and puts the message back into the box
        _undo(page, "Line one\nLine two")
        assert page.locator(USER, has_text="Line two").count() == 0
        mark("undone")

        # ---- the Markdown download holds the transcript as it is now (nothing written by the kernel)
        with page.expect_download(timeout=15_000) as info:
            page.locator(".mnb-export-md").click()
        exported = Path(info.value.path()).read_text(encoding="utf-8")
        assert re.search(r"### You · \d{4}-\d\d-\d\dT", exported) and "dragon" in exported, exported[:500]
        assert "Line two" not in exported and info.value.suggested_filename.endswith(".md")
        mark("exported")

        # ---- next question: still answered, to the end
        assistants = _count(page, ASSISTANT)
        _send(page, SHORT_QUESTION)
        final = _wait_reply_done(page, assistants + 1, "the last question got no complete answer")
        mark("last answer")
        assert "error:" not in final["text"], final["text"]
        body = re.sub(r"\s*\d+ tokens, [\d.]+ tok/s.*$", "", final["text"], flags=re.S).strip()
        assert body, f"the last answer is empty: {final['text']!r}"
        assert _count(page, ASSISTANT) == _count(page, USER) == assistants + 1
        _wait_stats_tokens(page, int(re.search(r"(\d+) tokens", final["text"]).group(1)))
        _screenshot(page, "browser_chat.png")
        print(f"browser test timeline (s): {marks}; dialogs: {log}; stopped reply: {stopped['text'][-80:]!r};"
              f" last: {final['text'][:120]!r}")
    except BaseException:
        try:
            _screenshot(page, "browser_chat_failure.png")
        except Exception:
            pass
        lab.save_log(ARTIFACTS / "browser_jupyterlab.log")
        print(f"browser test timeline (s): {marks}; dialogs: {log}")
        raise
