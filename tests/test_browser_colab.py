"""The chat widget on Colab's notebook stack, in Chromium (marker ``browser``; ``make test-browser-colab``).

Colab runs ipykernel 6, IPython 7 and ipywidgets 7.7 on Python 3.12; the main browser tier runs
ipykernel 7 and ipywidgets 8. The two kernels reach a busy cell differently: under ipykernel 6 the
widget's reply is pumped from the blocked handler, which polls the kernel (jupyter_ui_poll) so a Stop
click is seen mid-reply. This tier is the only test of that path through a real front end.

The server and the kernel run from ``.venv-colab`` (built by ``scripts/colab_stack_env.sh`` from
requirements-colab-stack.txt: Notebook 6.5 with widgetsnbextension 3.6, the classic front end that
ipywidgets 7 pairs with, since Colab's own front end is not installable). The kernel first checks
its own versions, then runs notebooks/03_chat.ipynb as a person would from the Cell menu, and the
test chats in the widget: a reply streams, Stop ends it mid-reply, Regenerate replaces it, a second
question is answered, Undo removes that turn, and a third question is answered after the undo.
A screenshot lands in artifacts/ (``browser_colab_chat.png``; ``browser_colab_failure.png`` plus the
server log on failure).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from browser_support import (ARTIFACTS, ASSISTANT, CHROMIUM, REPO, USER, JupyterServer, chromium_page, last_bubble,
                             prepare_notebook, wait_bubble)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(540)]

COLAB_VENV = REPO / ".venv-colab"
COLAB_PYTHON = COLAB_VENV / "bin" / "python"
NOTEBOOK = REPO / "notebooks" / "03_chat.ipynb"
OVERRIDES = {"MAX_NEW_TOKENS": 64}  # long enough that a CPU reply is still streaming when Stop is clicked

# What Colab runs (requirements-colab-stack.txt pins the exact releases); checked inside the kernel.
EXPECTED = {"python": "3.12.", "ipykernel": "6.", "ipywidgets": "7.7."}

LONG_QUESTION = "Write a long, detailed story about a dragon who learns to bake bread."
SHORT_QUESTION = "What is the capital of Italy?"
THIRD_QUESTION = "Name three colours."

T_SERVER = 120
T_PAGE = 90
T_WIDGET = 300  # every cell: the imports, the model load and the notebook's own question from code
T_REPLY = 120
T_STOP = 45
QUIET = 2.0  # after Stop: the text must not change during this long

INPUT = ".mnb-input input, .mnb-input textarea"
UNDO = ".mnb-undo"

# The versions cell, injected first: it fails (a traceback in its output) if the kernel is not the
# Colab stack, and prints one line the test reads back from the page.
_VERSIONS_CELL = f"""# injected by tests/test_browser_colab.py: is this kernel Colab's stack?
import json, platform, ipykernel, ipywidgets
_versions = {{"python": platform.python_version(), "ipykernel": ipykernel.__version__,
             "ipywidgets": ipywidgets.__version__}}
_expected = {EXPECTED!r}
_wrong = {{k: v for k, v in _versions.items() if not v.startswith(_expected[k])}}
assert not _wrong, f"not Colab's stack: {{_wrong}} (expected prefixes {{_expected}})"
print("COLAB-STACK " + json.dumps(_versions))"""

# classic Notebook: every code cell shows "In [N]:" once it has run ("In [*]:" while running)
_ALL_CELLS_RAN_JS = """() => {
  const ps = [...document.querySelectorAll('#notebook .code_cell .input_prompt')];
  return ps.length > 0 && ps.every(p => /^In\\s*\\[\\d+\\]:?$/.test(p.innerText.trim()));
}"""


# --------------------------------------------------------------------------- the server


class ClassicNotebook(JupyterServer):
    """Notebook 6 from ``.venv-colab``. Its config, data, runtime and IPython folders live under
    ``work_dir``, so a developer's ~/.jupyter (or a kernelspec in ~/.local) cannot change which kernel
    starts or what the page shows."""

    name = "Notebook 6 (.venv-colab)"
    log_name = "notebook.log"

    def __init__(self, python: Path, root_dir: Path, work_dir: Path) -> None:
        super().__init__(root_dir, work_dir, startup_timeout=T_SERVER)
        self.python = python

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PATH"] = str(self.python.parent) + os.pathsep + env.get("PATH", "")
        for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                         ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(self.work_dir / sub)
        env["JUPYTER_PLATFORM_DIRS"] = "1"  # jupyter_core 5: the folders above, not platformdirs' defaults
        return env

    def _command(self) -> list[str]:
        return [str(self.python), "-m", "notebook", "--no-browser", "--NotebookApp.ip=127.0.0.1",
                f"--NotebookApp.port={self.port}", "--NotebookApp.port_retries=0",
                f"--NotebookApp.token={self.token}", f"--NotebookApp.notebook_dir={self.root_dir}",
                "--NotebookApp.open_browser=False", "--NotebookApp.terminals_enabled=False",
                "--NotebookApp.show_banner=False"]  # no "migrate to Notebook 7" strip over the page


# --------------------------------------------------------------------------- page helpers


def _error_outputs(page) -> list[str]:
    """Tracebacks shown in cell outputs (classic Notebook renders them as .output_error)."""
    return page.locator("#notebook .output_error").all_inner_texts()


def _dismiss_dialogs(page, log: list[str]) -> None:
    """Accept any modal the classic front end shows (e.g. a kernel choice); note what it said."""
    dialogs = page.locator(".modal.in .modal-dialog")
    for _ in range(3):
        if dialogs.count() == 0:
            return
        try:
            log.append("dialog: " + " ".join(dialogs.first.inner_text(timeout=5_000).split())[:200])
            primary = dialogs.first.locator(".modal-footer .btn-primary")
            if primary.count():
                primary.first.click(timeout=5_000)
            else:
                page.keyboard.press("Escape")
            dialogs.first.wait_for(state="detached", timeout=5_000)
        except Exception:  # it closed by itself meanwhile
            pass


def _run_all_cells(page) -> None:
    """Cell > Run All from the menu bar, as a person would."""
    page.locator("#celllink").click(timeout=10_000)
    page.locator("#run_all_cells > a").click(timeout=10_000)


def _wait_notebook(page, log: list[str]) -> None:
    """Wait until every cell has run and the chat widget is shown; fail at once on a traceback."""
    deadline = time.monotonic() + T_WIDGET
    chat = page.locator(INPUT)
    while True:
        _dismiss_dialogs(page, log)
        errors = _error_outputs(page)
        if errors:
            raise AssertionError("a notebook cell failed:\n" + "\n---\n".join(e[-3000:] for e in errors))
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the notebook did not run to its end within {T_WIDGET} s (chat widget shown: "
                                 f"{chat.count() > 0}; prompts: {page.locator('.input_prompt').all_inner_texts()})")
        try:
            page.wait_for_function(_ALL_CELLS_RAN_JS, timeout=min(3_000, left * 1000), polling=250)
            chat.first.wait_for(state="visible", timeout=min(3_000, max(1.0, left) * 1000))
            return
        except Exception:  # playwright's TimeoutError: look for dialogs/errors, then wait again
            continue


def _kernel_versions(page) -> dict:
    text = page.locator("#notebook .output_area", has_text="COLAB-STACK").first.inner_text(timeout=10_000)
    return json.loads(re.search(r"COLAB-STACK (\{.*\})", text).group(1))


def _wait_idle(page) -> None:
    """Send enabled and Stop disabled again: the widget has finished its reply."""
    page.locator(".mnb-send:not([disabled])").wait_for(state="visible", timeout=15_000)
    assert page.locator(".mnb-stop").is_disabled(), "Stop is still enabled after the reply ended"


def _send(page, text: str) -> None:
    """Type into the chat box and send it: Enter in a one-line box, the Send button in a multiline one."""
    box = page.locator(INPUT).first
    box.click()
    box.fill(text)
    if box.evaluate("e => e.tagName") == "INPUT":
        box.press("Enter")
    else:
        page.locator(".mnb-send").click()


def _tokens(caption_text: str) -> int:
    m = re.search(r"(\d+) tokens", caption_text)
    assert m, f"no token count in the reply's caption: {caption_text!r}"
    return int(m.group(1))


_COMPLETE = "(b) => !b.cursor && /\\d+ tokens/.test(b.text)"


def _body(bubble_text: str) -> str:
    """The reply's text without its caption line."""
    return re.sub(r"\s*\d+ tokens, [\d.]+ tok/s.*$", "", bubble_text, flags=re.S).strip()


def _screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        page.locator(".mnb-chat").first.scroll_into_view_if_needed(timeout=2_000)
    except Exception:
        pass
    page.screenshot(path=str(ARTIFACTS / name), timeout=15_000)


# --------------------------------------------------------------------------- fixtures


def _require_env() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: the browser tiers need Debian's Chromium "
                    "(run `apt-get install chromium`; .ci/run installs it)", pytrace=False)
    if not (COLAB_VENV / ".installed-stamp").exists():
        pytest.fail(f"{COLAB_VENV} is missing or incomplete: `make test-browser-colab` builds it "
                    "(scripts/colab_stack_env.sh) and runs this test", pytrace=False)


@pytest.fixture
def notebook_copy(tmp_path) -> Path:
    _require_env()  # before anything is started
    dst = prepare_notebook(NOTEBOOK, tmp_path / "notebooks" / NOTEBOOK.name, OVERRIDES)
    nb = json.loads(dst.read_text(encoding="utf-8"))
    cell = {"cell_type": "code", "execution_count": None, "metadata": {"tags": ["colab-stack-versions"]},
            "outputs": [], "source": _VERSIONS_CELL}
    if nb.get("nbformat_minor", 0) >= 5:
        cell["id"] = "colab-stack-versions"
    first_code = next(i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code")
    nb["cells"].insert(first_code, cell)
    dst.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return dst


@pytest.fixture
def server(notebook_copy, tmp_path):
    with ClassicNotebook(COLAB_PYTHON, root_dir=notebook_copy.parent, work_dir=tmp_path / "nbserver") as srv:
        yield srv


@pytest.fixture
def page(server):
    with chromium_page() as pg:
        yield pg


# --------------------------------------------------------------------------- the test


def test_colab_stack_chat_streams_stops_regenerates_and_undoes(server, page, notebook_copy):
    for stale in ("browser_colab_failure.png", "browser_colab_notebook.log"):
        (ARTIFACTS / stale).unlink(missing_ok=True)
    log: list[str] = []
    t0 = time.monotonic()
    marks: dict[str, float] = {}

    def mark(name: str) -> None:
        marks[name] = round(time.monotonic() - t0, 1)

    try:
        page.goto(server.url(f"notebooks/{notebook_copy.name}"), wait_until="domcontentloaded", timeout=T_PAGE * 1000)
        page.locator("#notebook .code_cell").first.wait_for(state="visible", timeout=T_PAGE * 1000)
        _dismiss_dialogs(page, log)
        page.locator("#kernel_indicator_icon.kernel_idle_icon").wait_for(state="attached", timeout=T_PAGE * 1000)
        mark("notebook open")

        _run_all_cells(page)
        _wait_notebook(page, log)
        server.remember_children()
        mark("chat widget shown")
        versions = _kernel_versions(page)
        for name, prefix in EXPECTED.items():
            assert versions[name].startswith(prefix), f"the kernel runs {name} {versions[name]}, not {prefix}x: {versions}"

        # ---- 1st question: streams, then Stop ends it mid-reply
        _send(page, LONG_QUESTION)
        page.locator(USER, has_text="dragon").wait_for(state="visible", timeout=15_000)
        page.locator(".mnb-stop:not([disabled])").wait_for(state="visible", timeout=15_000)
        b1 = wait_bubble(page, "(b) => b.cursor && b.text.length > 0", None, T_REPLY,
                          "no streamed text appeared in the assistant bubble")
        b2 = wait_bubble(page, "(b, n) => b.cursor && b.text.length > n", len(b1["text"]), T_REPLY,
                          "the streaming reply did not grow")
        assert b2["text"] != b1["text"]
        mark("reply streaming")

        page.locator(".mnb-stop").click(timeout=10_000)
        stopped = wait_bubble(page, "(b) => !b.cursor && b.text.includes('(stopped)')", None, T_STOP,
                               "the reply did not end with '(stopped)' after clicking Stop (if it ran to its "
                               "max_new_tokens, the kernel handled the click only after the reply: the "
                               "ipykernel 6 polling path is broken)")
        mark("stopped")
        _wait_idle(page)
        assert _tokens(stopped["text"]) < OVERRIDES["MAX_NEW_TOKENS"], f"Stop came after the reply ended: {stopped}"
        page.wait_for_timeout(QUIET * 1000)  # a stopped reply stays as it is
        assert last_bubble(page)["text"] == stopped["text"], "the reply kept changing after Stop"
        # the transcript may also show the turn the notebook asked from code: count from here on
        n_user, n_reply = page.locator(USER).count(), page.locator(ASSISTANT).count()

        # ---- Regenerate: the stopped reply is replaced by a new one in the same place
        page.locator(".mnb-regenerate:not([disabled])").click(timeout=10_000)
        regenerated = wait_bubble(page, f"(b, old) => b.text !== old && ({_COMPLETE})(b)", stopped["text"], T_REPLY,
                                   "Regenerate did not produce a new complete reply")
        mark("regenerated")
        _wait_idle(page)
        assert (page.locator(USER).count(), page.locator(ASSISTANT).count()) == (n_user, n_reply), \
            "Regenerate added a bubble instead of replacing the last reply"
        assert "error:" not in regenerated["text"], regenerated["text"]
        assert _body(regenerated["text"]), f"the regenerated reply is empty: {regenerated['text']!r}"

        # ---- 2nd question: answered to the end
        _send(page, SHORT_QUESTION)
        page.locator(USER, has_text="Italy").wait_for(state="visible", timeout=15_000)
        second = wait_bubble(page, f"(b, n) => b.n > n && ({_COMPLETE})(b)", n_reply, T_REPLY,
                              "the second question got no complete answer")
        mark("second answer")
        _wait_idle(page)
        assert "error:" not in second["text"], second["text"]

        # ---- Undo: the last question and its answer leave the transcript
        undo = page.locator(UNDO)
        assert undo.count() == 1, f"the chat widget has no Undo button ({UNDO})"
        undo.click(timeout=10_000)
        try:
            page.wait_for_function("([a, u, na, nu]) => document.querySelectorAll(a).length === na"
                                   " && document.querySelectorAll(u).length === nu",
                                   arg=[ASSISTANT, USER, n_reply, n_user], timeout=15_000, polling=100)
        except Exception as exc:
            raise AssertionError(f"Undo did not remove the last turn: {page.locator(USER).count()} questions, "
                                 f"{page.locator(ASSISTANT).count()} replies shown") from exc
        assert page.locator(USER, has_text="Italy").count() == 0
        assert last_bubble(page)["text"] == regenerated["text"], "Undo changed the reply before the undone turn"
        mark("undone")

        # ---- 3rd question after the undo: the session is still consistent
        _send(page, THIRD_QUESTION)
        page.locator(USER, has_text="colours").wait_for(state="visible", timeout=15_000)
        third = wait_bubble(page, f"(b, n) => b.n > n && ({_COMPLETE})(b)", n_reply, T_REPLY,
                             "the question after Undo got no complete answer")
        mark("answer after undo")
        _wait_idle(page)
        assert "error:" not in third["text"], third["text"]
        assert (page.locator(USER).count(), page.locator(ASSISTANT).count()) == (n_user + 1, n_reply + 1)
        _screenshot(page, "browser_colab_chat.png")
        print(f"colab-stack browser test: kernel {versions}; timeline (s): {marks}; dialogs: {log}; "
              f"stopped: {stopped['text'][-60:]!r}; after undo: {third['text'][:80]!r}")
    except BaseException:
        try:
            _screenshot(page, "browser_colab_failure.png")
        except Exception:
            pass
        try:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "browser_colab_notebook.log").write_text(server.log_tail(200_000))
        except OSError:
            pass
        print(f"colab-stack browser test timeline (s): {marks}; dialogs: {log}")
        raise
