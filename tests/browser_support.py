"""Helpers for the browser tier: a throwaway JupyterLab server, a prepared notebook copy, page helpers.

Nothing here writes into the repository except ``artifacts/`` (screenshots and, on failure, the
server log). The server runs with its own config, settings, workspace and runtime folders under a
tmp dir, so a developer's ~/.jupyter cannot change what the test sees.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-gpu",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
]

# JupyterLab user settings for the run: no news/update toasts, and every cell kept in the DOM
# (the default "full" windowing detaches cells scrolled out of view).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- notebook copy


def prepare_notebook(src: Path, dst: Path, overrides: dict[str, Any]) -> Path:
    """Copy ``src`` to ``dst`` with a cell setting ``overrides`` inserted after the parameters cell.

    The parameters cell is the code cell tagged "parameters" (papermill's convention), else the
    first code cell. Every overridden name must be assigned in that cell: a renamed parameter
    fails here instead of being ignored silently.
    """
    nb = json.loads(Path(src).read_text(encoding="utf-8"))
    cells = nb["cells"]
    code = [i for i, c in enumerate(cells) if c.get("cell_type") == "code"]
    if not code:
        raise AssertionError(f"{src} has no code cell")
    tagged = [i for i in code if "parameters" in cells[i].get("metadata", {}).get("tags", [])]
    at = tagged[0] if tagged else code[0]
    source = cells[at]["source"]
    source = "".join(source) if isinstance(source, list) else source
    assigned = {line.split("=", 1)[0].strip().split(":")[0].strip() for line in source.splitlines() if "=" in line}
    missing = sorted(set(overrides) - assigned)
    if missing:
        raise AssertionError(f"{src}: the parameters cell does not set {missing}; it sets {sorted(assigned)}")
    for c in cells:  # start clean even if the source was saved with outputs
        if c.get("cell_type") == "code":
            c["outputs"], c["execution_count"] = [], None
    lines = ["# injected by tests/test_browser.py"] + [f"{k} = {v!r}" for k, v in overrides.items()]
    cell = {"cell_type": "code", "execution_count": None, "metadata": {"tags": ["injected-parameters"]},
            "outputs": [], "source": "\n".join(lines)}
    if nb.get("nbformat", 4) >= 4 and nb.get("nbformat_minor", 0) >= 5:
        cell["id"] = "injected-parameters"
    cells.insert(at + 1, cell)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return dst


# --------------------------------------------------------------------------- the server


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if pytest dies without cleaning up (e.g. killed by a CI timeout)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class JupyterServer:
    """A Jupyter server on 127.0.0.1, a free port and a random token, ended by its pid (with every
    kernel it started). Subclasses say which server runs (``_command``) and how its folders are kept
    under ``work_dir`` (``_env``), so a developer's ~/.jupyter cannot change what the test sees."""

    name = "Jupyter server"
    log_name = "server.log"

    def __init__(self, root_dir: Path, work_dir: Path, startup_timeout: float = 90.0) -> None:
        self.root_dir = Path(root_dir)
        self.work_dir = Path(work_dir)
        self.startup_timeout = startup_timeout
        self.token = secrets.token_hex(24)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = self.work_dir / self.log_name
        self._log: Any = None
        self._children: list[Any] = []  # psutil.Process objects (safe against pid reuse)

    def _command(self) -> list[str]:
        """The server's command line (``self.port`` and ``self.token`` are set)."""
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        """The server's environment, its folders under ``work_dir``."""
        raise NotImplementedError

    def __enter__(self) -> JupyterServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        env = self._env()
        env["PYTHONUNBUFFERED"] = "1"
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            cmd = self._command()
            if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI containers run as root
                cmd.append("--allow-root")
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(cmd, cwd=self.root_dir, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            if self._wait_ready():
                return
            self.stop()
            if "already in use" not in self.log_tail():
                break
        raise AssertionError(f"{self.name} did not start; its log:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        url = f"http://127.0.0.1:{self.port}/api/status"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                req = urllib.request.Request(url, headers={"Authorization": f"token {self.token}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}?token={self.token}"

    def remember_children(self) -> None:
        """Note the kernels (and anything else) the server started, to end them by pid if it does not."""
        try:
            import psutil

            if self.proc is not None:
                known = {c.pid for c in self._children}
                self._children += [c for c in psutil.Process(self.proc.pid).children(recursive=True) if c.pid not in known]
        except Exception:
            pass

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            self.remember_children()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down on SIGTERM
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            self._kill_leftovers()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _kill_leftovers(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        alive = []
        for p in self._children:
            try:
                p.terminate()  # psutil checks the pid still names the same process
                alive.append(p)
            except psutil.Error:
                pass
        _gone, still = psutil.wait_procs(alive, timeout=10)
        for p in still:
            try:
                p.kill()
            except psutil.Error:
                pass
        self._children.clear()

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def save_log(self, dst: Path) -> None:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log_path, dst)
        except OSError:
            pass


class JupyterLab(JupyterServer):
    """``python -m jupyterlab`` from this environment; settings, workspaces and runtime under ``work_dir``."""

    name = "JupyterLab"
    log_name = "jupyterlab.log"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)  # MIXTRAL_NB_CACHE, HF_HUB_OFFLINE, ... reach the kernel
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                         ("IPYTHONDIR", "ipython")):
            (self.work_dir / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(self.work_dir / sub)
        for name, value in LAB_SETTINGS.items():
            path = self.work_dir / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        return env

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "jupyterlab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.open_browser=False", "--ServerApp.terminals_enabled=False",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",  # no PyPI queries from the extension manager
        ]

    def url(self, path: str = "lab") -> str:
        return super().url(path)


# --------------------------------------------------------------------------- page helpers

ASSISTANT = ".mnb-msg-assistant"
USER = ".mnb-msg-user"

# JS: the last assistant bubble as {n: bubbles, text: body without the cursor, cursor: bool}; ui.py draws the
# cursor (U+258C) while a reply streams and replaces it with a caption ("N tokens, x tok/s") at the end
LAST_BUBBLE_JS = """(sel) => {
  const els = document.querySelectorAll(sel);
  if (!els.length) return {n: 0, text: '', cursor: false};
  const t = els[els.length - 1].innerText;
  return {n: els.length, text: t.replace('\\u258c', '').trim(), cursor: t.includes('\\u258c')};
}"""


@contextmanager
def chromium_page() -> Iterator[Any]:
    """A page in a headless Debian Chromium (1400 x 1000, 30 s default waits), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def last_bubble(page: Any) -> dict:
    return page.evaluate(LAST_BUBBLE_JS, ASSISTANT)


def wait_bubble(page: Any, condition_js: str, arg: Any, timeout: float, what: str) -> dict:
    """Wait until ``condition_js(bubble, arg)`` holds for the last assistant bubble; return the bubble."""
    js = f"([sel, arg]) => {{ const b = ({LAST_BUBBLE_JS})(sel); return ({condition_js})(b, arg) ? b : null; }}"
    try:
        handle = page.wait_for_function(js, arg=[ASSISTANT, arg], timeout=timeout * 1000, polling=50)
    except Exception as exc:
        raise AssertionError(f"{what} (within {timeout:.0f} s); last bubble: {last_bubble(page)}") from exc
    return handle.json_value()
