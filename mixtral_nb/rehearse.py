"""The Colab rehearsal: a user's whole walkthrough at Mixtral size, inside a free Colab's limits.

Every part was tested alone; what kills Colab users is the journey: the runtime dying on RAM while
the model loads, VRAM overflowing after a few turns, re-running cells. ``python -m mixtral_nb
rehearse`` runs that journey in one process, the way the walkthrough notebook does (conversion of
the article's files, the "colab-t4" memory plan, ``load``, a ChatSession: turns, Stop, regenerate,
a turn over the context budget, then the load cell and a turn again), while a sampler thread
watches host memory (RSS and pinned), VRAM (NVML, CUDA context included) and disk writes per stage.

Host memory: the expert cache page-locks ordinary memory, which RSS counts; torch's own pinned
allocator maps pages through the driver, which RSS may show as RssShmem or not at all, so
``host = RSS + max(0, torch pinned - RssShmem)`` adds the part RSS may not show, never twice.

VRAM: the cap (15,095 MiB, a T4's usable memory) includes the CUDA context, so the context is
measured after CUDA starts (NVML's figure for this process minus torch's reserved bytes) and torch
may only reserve ``cap - context``; NVML is watched through the run as well.

``rehearse_notebook`` executes notebooks/walkthrough.ipynb itself against a local folder (its
parameters cell overridden, papermill-style) and drives the chat widget from an appended cell.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import sys
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pynvml
import torch

from . import planner
from .build import ReleasedModelError, expert_caches, live_models, release_model
from .chat import ChatSession
from .checkpoint import detect_layout, ensure_converted, load_config, open_checkpoint
from .load import load
from .monitor import nvml_index
from .synthetic import write_article_checkpoint
from .tokenizer import encode_conversation
from .units import GB, MiB

__all__ = ["COLAB_HOST_LIMIT_GB", "COLAB_VRAM_MIB", "LimitExceeded", "MemoryWatch", "RehearsalError",
           "StageRecord", "format_table", "rehearse", "rehearse_main", "rehearse_notebook"]

COLAB_VRAM_MIB = 15095  # a free Colab T4's usable memory, CUDA context included
COLAB_HOST_LIMIT_GB = 11.0  # of Colab's 12.7 GB, what one process may take before the runtime dies
REBUILD_SLACK = 0.10  # a second build may peak this much above the first (allocator noise), no more
REBUILD_SLACK_BYTES = 256 * MiB


class RehearsalError(RuntimeError):
    """A stage of the rehearsal failed; the message names the stage."""


class LimitExceeded(RehearsalError):
    """Host memory or VRAM crossed its limit; the message names the stage and the limit."""


# ------------------------------------------------------------------------------------ measuring


def _status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a process in bytes (Linux; zeros elsewhere)."""
    out = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):

        try:
            out["VmRSS"] = psutil.Process(None if pid == "self" else int(pid)).memory_info().rss
        except Exception:
            pass
    return out


def _write_bytes() -> int | None:
    """Bytes this process sent to storage so far (/proc/self/io), or None where not available."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _folder_bytes(folders: list[Path]) -> int:
    total = 0
    for folder in folders:
        if folder.is_dir():
            for p in folder.rglob("*"):
                with contextlib.suppress(OSError):
                    if p.is_file():
                        total += p.stat().st_size
    return total


def _pinned_bytes() -> tuple[int, int]:
    """Pinned host memory as (torch's pinned allocator, expert-cache host buffers).

    The caches page-lock ordinary anonymous memory (:mod:`.hostmem`), which RSS counts as RssAnon;
    torch's allocator maps pinned pages through the driver, which RSS may show as RssShmem or not."""
    torch_pinned = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never start CUDA from the sampler thread
        with contextlib.suppress(Exception):
            torch_pinned = int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
    caches = 0
    for m in live_models():
        for c in expert_caches(m):
            if c.host_buffer.pinned:
                caches += c.host_bytes
    return torch_pinned, caches


class _Nvml:
    """VRAM of given processes on one GPU through NVML (the CUDA context counts there, unlike in torch)."""

    def __init__(self, device: torch.device) -> None:
        pynvml.nvmlInit()
        self.nv = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(device.index or 0))
        self.total = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).total)
        self.baseline = int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)  # before this run's CUDA work
        self.method = "process"

    def used(self, pids: set[int]) -> int:
        """Bytes used by ``pids``; where NVML cannot see them (another PID namespace), the device's
        used memory minus what was used before the rehearsal started."""
        try:
            procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
            mine = [p.usedGpuMemory for p in procs if p.pid in pids and p.usedGpuMemory is not None]
            if mine:
                self.method = "process"
                return int(sum(mine))
        except Exception:
            pass
        self.method = "device-minus-baseline"
        return max(0, int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used) - self.baseline)


@dataclasses.dataclass
class StageRecord:
    """One row of the table: what a stage took."""

    name: str
    wall_s: float = 0.0
    peak_rss: int = 0
    peak_rss_file: int = 0  # file-backed part of RSS (mapped checkpoint pages: the kernel can drop them)
    peak_pinned: int = 0
    peak_host: int = 0
    peak_vram: int | None = None
    torch_max_reserved: int | None = None
    disk_written: int = 0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(peak_rss_gb=self.peak_rss / GB, peak_rss_file_gb=self.peak_rss_file / GB,
                 peak_pinned_gb=self.peak_pinned / GB, peak_host_gb=self.peak_host / GB,
                 peak_vram_mib=None if self.peak_vram is None else self.peak_vram / MiB,
                 disk_written_gb=self.disk_written / GB)
        return d


class MemoryWatch:
    """A sampler thread (every ``interval`` s): RSS and pinned host memory, NVML VRAM; per-stage peaks
    and the first time a limit was crossed. ``pids``: more processes to count (a notebook kernel)."""

    def __init__(self, device: torch.device, host_limit: float, vram_cap: int | None, interval: float = 0.05) -> None:
        self.device = device
        self.host_limit, self.vram_cap = host_limit, vram_cap
        self.interval = interval
        self.nvml: _Nvml | None = None
        if device.type == "cuda":
            try:
                self.nvml = _Nvml(device)
            except Exception as e:  # no NVML: VRAM is then torch's reserved bytes only (no context)
                print(f"rehearse: NVML unavailable ({e}); VRAM is torch's reserved memory only", file=sys.stderr)
        self.stage: StageRecord | None = None
        self.crossed: tuple[str, str, float, float] | None = None  # (stage, what, value, limit)
        self.children_only = False  # count the child processes only (the notebook kernel), not this one
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0

    def start(self) -> MemoryWatch:
        self._thread = threading.Thread(target=self._run, name="mixtral_nb-rehearse-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._halt.wait(self.interval):
            with contextlib.suppress(Exception):  # a sample must never kill the run it watches
                self.sample()

    def _pids(self) -> list[int]:
        if not self.children_only:
            return [os.getpid()]
        with contextlib.suppress(Exception):
            return [c.pid for c in psutil.Process().children(recursive=True)]
        return []

    def sample(self) -> None:
        """Take one sample and fold it into the current stage's peaks."""
        pids = self._pids()
        rss = shmem = rss_file = 0
        for pid in pids:
            st = _status("self" if pid == os.getpid() else pid)
            rss, shmem, rss_file = rss + st["VmRSS"], shmem + st["RssShmem"], rss_file + st["RssFile"]
        torch_pinned, cache_pinned = (0, 0) if self.children_only else _pinned_bytes()
        pinned = torch_pinned + cache_pinned
        host = rss + max(0, torch_pinned - shmem)  # cache buffers are in RSS already
        vram = None
        if self.nvml is not None:
            vram = self.nvml.used(set(pids))
        elif self.device.type == "cuda" and not self.children_only:
            vram = torch.cuda.memory_reserved(self.device)
        with self._lock:
            self.samples += 1
            st_rec = self.stage
            if st_rec is None:
                return
            st_rec.peak_rss = max(st_rec.peak_rss, rss)
            st_rec.peak_rss_file = max(st_rec.peak_rss_file, rss_file)
            st_rec.peak_pinned = max(st_rec.peak_pinned, pinned)
            st_rec.peak_host = max(st_rec.peak_host, host)
            if vram is not None:
                st_rec.peak_vram = max(st_rec.peak_vram or 0, vram)
            if self.crossed is None:
                if host > self.host_limit:
                    self.crossed = (st_rec.name, "host memory", host, self.host_limit)
                elif self.vram_cap is not None and vram is not None and vram > self.vram_cap:
                    self.crossed = (st_rec.name, "VRAM", vram, self.vram_cap)

    def limit_message(self) -> str | None:
        if self.crossed is None:
            return None
        stage, what, value, limit = self.crossed
        if what == "VRAM":
            return (f"VRAM crossed the cap of {limit / MiB:,.0f} MiB (CUDA context included) during stage "
                    f"'{stage}': {value / MiB:,.0f} MiB")
        return (f"host memory crossed the limit of {limit / GB:.3f} GB (--host-limit-gb) during stage '{stage}': "
                f"{value / GB:.3f} GB")


class Recorder:
    """Stages in order, each timed and measured by one MemoryWatch; fails fast on a crossed limit."""

    def __init__(self, watch: MemoryWatch, folders: Callable[[], list[Path]]) -> None:
        self.watch = watch
        self.folders = folders
        self.stages: list[StageRecord] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        rec = StageRecord(name)
        cuda = self.watch.device.type == "cuda" and torch.cuda.is_initialized()  # the cuda-init stage starts it
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.watch.device)
        io0, size0 = _write_bytes(), _folder_bytes(self.folders())
        with self.watch._lock:
            self.watch.stage = rec
        self.stages.append(rec)
        print(f"rehearse: stage {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            self.watch.sample()
            yield rec
        except LimitExceeded:
            raise
        except BaseException as e:
            rec.error = f"{type(e).__name__}: {e}"
            raise RehearsalError(f"stage '{name}' failed: {type(e).__name__}: {e}") from e
        finally:
            rec.wall_s = time.perf_counter() - t0
            self.watch.sample()
            if cuda or self.watch.device.type == "cuda" and torch.cuda.is_initialized():
                rec.torch_max_reserved = int(torch.cuda.max_memory_reserved(self.watch.device))
                if self.watch.nvml is None:
                    rec.peak_vram = max(rec.peak_vram or 0, rec.torch_max_reserved)
            io1, size1 = _write_bytes(), _folder_bytes(self.folders())
            rec.disk_written = max(0 if io0 is None or io1 is None else io1 - io0, size1 - size0)
            with self.watch._lock:
                self.watch.stage = None
        msg = self.watch.limit_message()
        if msg is not None:
            raise LimitExceeded(msg)


def format_table(stages: list[StageRecord]) -> str:
    """stage | wall s | peak RSS GB | peak pinned GB | peak host GB | peak VRAM MiB | disk GB written"""
    head = ("stage", "wall s", "peak RSS GB", "peak pinned GB", "peak host GB", "peak VRAM MiB", "disk GB written")
    rows = [head]
    for s in stages:
        rows.append((s.name + (" (failed)" if s.error else ""), f"{s.wall_s:.1f}", f"{s.peak_rss / GB:.2f}",
                     f"{s.peak_pinned / GB:.2f}", f"{s.peak_host / GB:.2f}",
                     "-" if s.peak_vram is None else f"{s.peak_vram / MiB:,.0f}", f"{s.disk_written / GB:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the VRAM cap


def cap_vram(device: torch.device, cap_bytes: int) -> dict[str, Any]:
    """Start CUDA on ``device`` and let torch reserve at most ``cap - context`` bytes, so that the
    process (CUDA context included, as NVML counts it) stays within ``cap_bytes``."""
    torch.cuda.set_device(device)
    torch.zeros(1, device=device)  # creates the context (and cuBLAS-free allocator state)
    torch.cuda.synchronize(device)
    total = torch.cuda.get_device_properties(device).total_memory
    context = None
    with contextlib.suppress(Exception):
        nv = _Nvml(device)
        context = nv.used({os.getpid()}) - torch.cuda.memory_reserved(device)
    if context is None or context <= 0:
        free, total = torch.cuda.mem_get_info(device)
        context = total - free - torch.cuda.memory_reserved(device)  # alone on the GPU: the context
    if cap_bytes - context <= 0:
        raise RehearsalError(f"the CUDA context alone takes {context / MiB:,.0f} MiB, over the cap of {cap_bytes / MiB:,.0f} MiB")
    fraction = (cap_bytes - context) / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return {"context_bytes": int(context), "total_bytes": int(total), "fraction": fraction, "cap_bytes": cap_bytes}


# ------------------------------------------------------------------------------------ the journey


def _plan_for(folder: Path, device: torch.device) -> Any:
    """The "colab-t4" plan for the model in ``folder``: planned for the full depth of Mixtral-8x7B when
    the folder holds fewer of its layers (a quicker rehearsal keeps the per-layer settings)."""

    ck = open_checkpoint(folder, progress=False)
    cfg = load_config(folder).to_dict()
    full = dict(cfg)
    mixtral = planner.MIXTRAL_8X7B
    if all(cfg.get(k) == mixtral[k] for k in ("hidden_size", "intermediate_size", "num_local_experts")):
        full["num_hidden_layers"] = mixtral["num_hidden_layers"]
    plan = planner.PRESETS["colab-t4"].plan(model=full, quant=ck.quant)
    plan = dataclasses.replace(plan, sizes=dataclasses.replace(plan.sizes, num_layers=cfg["num_hidden_layers"]))
    if device.type != "cuda":
        plan = dataclasses.replace(plan, device="cpu")
    return plan


def _overflow_message(session: Any, new_tokens: int) -> str:
    """A user message that fits the context budget alone but not after the history: the turn that
    makes the session drop its oldest messages."""

    tok, budget = session.tokenizer, session.context_budget
    head = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
    unit = "Please keep this sentence in mind while you answer the question that follows. "
    size = lambda msgs: len(encode_conversation(tok, msgs)) + new_tokens  # noqa: E731
    base = size(session.messages + [{"role": "user", "content": ""}])
    per = max(1, len(tok.encode(unit, add_special_tokens=False)))
    n = max(1, (budget - base) // per - 1)
    while size(session.messages + [{"role": "user", "content": unit * n}]) <= budget:
        n += 1
    if size(head + [{"role": "user", "content": unit * n}]) > budget:
        raise RehearsalError(f"the history ({base} tokens) is too short against the context budget {budget} to build a "
                             "message that only fits after trimming: use more --new-tokens")
    return unit * n


def _force_length(session: ChatSession) -> str:
    """Make every reply run to max_new_tokens (random weights may pick end-of-sequence early)."""
    session.min_new_tokens = session.max_new_tokens
    return "min_new_tokens"


def _turn(session: Any, make: Callable[[], Iterator[str]], stop_after: int | None = None) -> dict[str, Any]:
    """Run one streamed reply; with ``stop_after``, Stop is pressed from another thread once that many
    pieces have arrived (and the reply waits for the press, so the point is exact)."""
    t0 = time.perf_counter()
    ttft = None
    pieces = 0
    for _ in make():
        pieces += 1
        if ttft is None:
            ttft = time.perf_counter() - t0
        if stop_after is not None and pieces == stop_after:
            press = threading.Thread(target=session.stop, name="rehearse-stop")
            press.start()
            press.join()
    s = dict(session.last_stats or {})
    return {"tokens": s.get("tokens", 0), "tok_s": s.get("tok_s", 0.0), "ttft_s": ttft, "stop_reason": s.get("stop_reason"),
            "prompt_tokens": s.get("prompt_tokens"), "prefill_tokens": s.get("prefill_tokens"),
            "wall_s": time.perf_counter() - t0}


def rehearse(article: Path | None = None, synthetic: Path | None = None, layers: int | None = None,
             device: str = "cuda:0", vram_cap_mib: float = COLAB_VRAM_MIB, host_limit_gb: float = COLAB_HOST_LIMIT_GB,
             new_tokens: int = 128, notebook: bool = False, skip: tuple[str, ...] = (),
             interval: float = 0.05) -> dict[str, Any]:
    """Run the journey; returns the report (stages, chat figures). Raises LimitExceeded or
    RehearsalError (the message names the stage) with the report so far in ``exc.report``."""

    if (article is None) == (synthetic is None):
        raise ValueError("give exactly one of --article PATH (an existing article-layout folder) or --synthetic DIR")
    if new_tokens < 4:
        raise ValueError(f"--new-tokens must be at least 4 (Stop is pressed mid-reply), got {new_tokens}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    cap = int(vram_cap_mib * MiB) if dev.type == "cuda" else None
    report: dict[str, Any] = {"device": str(dev), "host_limit_gb": host_limit_gb, "vram_cap_mib": vram_cap_mib,
                              "new_tokens": new_tokens, "host_metric": "RSS + max(0, torch pinned - RssShmem)"}
    folder = Path(synthetic if synthetic is not None else article)  # type: ignore[arg-type]
    folders = lambda: [folder, folder.with_name(folder.name + "-mixtral_nb")]  # noqa: E731
    watch = MemoryWatch(dev, host_limit_gb * GB, cap, interval)
    rec = Recorder(watch, folders)
    report["stages"] = rec.stages
    watch.start()
    try:
        if cap is not None:
            with rec.stage("cuda-init") as st:
                report["vram"] = st.info = cap_vram(dev, cap)
        if synthetic is not None and "synthetic" not in skip:
            with rec.stage("synthetic") as st:

                folder = Path(write_article_checkpoint(synthetic, num_layers=layers, progress=True))
        if not folder.is_dir():
            raise ValueError(f"{folder} does not exist: write it first (--synthetic DIR) or give an article folder")
        with rec.stage("convert") as st:

            if detect_layout(folder) == "article":

                st.info["converted"] = str(ensure_converted(folder, progress=False))
        with rec.stage("plan") as st:
            plan = _plan_for(folder, dev)
            st.info = {"offload_per_layer": plan.offload_per_layer, "buffer_size": plan.buffer_size,
                       "prefetch": plan.prefetch, "host_mirror": plan.host_mirror,
                       "expected_gpu_bytes": plan.gpu_bytes, "expected_host_bytes": plan.host_bytes}
            print(plan.explain())
        devices = [str(dev)]
        with rec.stage("build") as st:
            model, tokenizer = load(str(folder), device=devices, offload_config=plan.offload_config())
            _check_vocab(model, tokenizer)
        chat = _chat_stages(rec, model, tokenizer, new_tokens, report)
        if "rebuild" not in skip:
            session = chat.pop("session")
            with rec.stage("rebuild"):  # the notebook's load cell run again; the old model is still bound
                model, tokenizer = load(str(folder), device=devices, offload_config=plan.offload_config())
            with rec.stage("rechat") as st:
                try:
                    session.send("Are you still there?")
                    st.info["old_session"] = "still answers (not released)"
                except ReleasedModelError as e:
                    st.info["old_session"] = f"ReleasedModelError: {str(e)[:60]}..."
                session = _session(model, tokenizer, new_tokens)
                st.info["turn"] = _turn(session, lambda: session.stream("Tell me a story about a lighthouse."))
            first, second = _stage(rec, "build"), _stage(rec, "rebuild")
            report["rebuild_vs_build"] = {"host": second.peak_host / max(1, first.peak_host),
                                          "vram": (second.peak_vram or 0) / max(1, first.peak_vram or 1)}
            for what, a, b in (("host memory", first.peak_host, second.peak_host),
                               ("VRAM", first.peak_vram or 0, second.peak_vram or 0)):
                if b > a * (1 + REBUILD_SLACK) + REBUILD_SLACK_BYTES:
                    raise LimitExceeded(f"stage 'rebuild' peaked at {b / GB:.2f} GB of {what}, the first build at "
                                        f"{a / GB:.2f} GB: the second build did not free the first model")
            del session
        if notebook:

            del model, chat
            for m in live_models():  # the kernel runs alone, as on Colab: this process gives its memory back
                release_model(m)
            with rec.stage("notebook") as st:
                watch.children_only = True  # the kernel's memory only
                try:
                    st.info = rehearse_notebook(folder, device=str(dev), new_tokens=new_tokens,
                                                vram_cap_mib=vram_cap_mib if cap is not None else None)
                finally:
                    watch.children_only = False
    except Exception as e:
        e.report = report  # type: ignore[attr-defined]
        raise
    finally:
        watch.stop()
    return report


def _stage(rec: Recorder, name: str) -> StageRecord:
    return next(s for s in rec.stages if s.name == name)


def _check_vocab(model: Any, tokenizer: Any) -> None:
    n = model.config.vocab_size
    if len(tokenizer) > n:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the model's vocabulary {n}: the folder needs "
                         "its own tokenizer files (or a vocabulary of 32000, Mixtral's)")


def _session(model: Any, tokenizer: Any, new_tokens: int) -> Any:

    session = ChatSession(model, tokenizer, max_new_tokens=new_tokens)  # engine "auto": the Decoder on a GPU
    session.rehearse_forced = _force_length(session)
    return session


def _chat_stages(rec: Recorder, model: Any, tokenizer: Any, new_tokens: int, report: dict[str, Any]) -> dict[str, Any]:
    """Three turns, Stop mid-reply, regenerate, a turn over the context budget; chat figures into ``report``."""
    cache = model.expert_cache
    with rec.stage("chat") as st:
        session = _session(model, tokenizer, new_tokens)
        cache.reset_stats()
        turns = []
        for q in ("What is the capital of France?", "Tell me about its history, in detail.",
                  "And what is it famous for today?"):
            turns.append(_turn(session, lambda q=q: session.stream(q)))
        st.info = {"engine": session.engine, "length": session.rehearse_forced, "turns": turns}
        stats = cache.stats()
        short = [t for t in turns if t["tokens"] < new_tokens]
        if short and session.rehearse_forced != "not forced":
            raise RehearsalError(f"a reply had {short[0]['tokens']} tokens, fewer than --new-tokens {new_tokens}")
    report["chat"] = {
        "engine": session.engine,
        "tok_s": sum(t["tok_s"] for t in turns) / len(turns),
        "ttft_s": turns[0]["ttft_s"], "ttft_s_mean": sum(t["ttft_s"] or 0 for t in turns) / len(turns),
        "tokens": [t["tokens"] for t in turns], "expert_cache_hit_rate": stats.get("hit_rate"),
        "expert_cache": {k: v for k, v in stats.items() if isinstance(v, (int, float))},
    }
    with rec.stage("stop") as st:
        k = max(2, new_tokens // 4)
        st.info = _turn(session, lambda: session.stream("Count slowly from one to one thousand."), stop_after=k)
        if st.info["stop_reason"] != "stop" or st.info["tokens"] >= new_tokens:
            raise RehearsalError(f"Stop after {k} tokens ended the reply with {st.info['tokens']} tokens "
                                 f"({st.info['stop_reason']}), not early")
    with rec.stage("regenerate") as st:
        st.info = _turn(session, session.stream_regenerate)
    with rec.stage("overflow") as st:
        budget, before = session.context_budget, session.trimmed_messages
        used = len(session.encoded_history())
        msg = _overflow_message(session, new_tokens)
        st.info = _turn(session, lambda: session.stream(msg))
        st.info.update(context_budget=budget, history_tokens_before=used, trimmed=session.trimmed_messages - before)
        if st.info["trimmed"] <= 0:
            raise RehearsalError(f"a {st.info['prompt_tokens']}-token turn after {used} tokens of history did not trim "
                                 f"the history (context budget {budget})")
    report["chat"]["expert_cache_after"] = {k: v for k, v in cache.stats().items() if isinstance(v, (int, float))}
    return {"session": session}


# ------------------------------------------------------------------------------------ the notebook


NOTEBOOK_PACKAGES = ("nbformat", "nbclient", "jupyter_client", "ipykernel", "IPython", "ipywidgets", "matplotlib",
                     "zmq", "tornado", "traitlets")  # import names the notebook stage needs (jupyter_ui_poll optional)

_DRIVER = '''
# rehearsal: drive the chat widget from code (send, Stop mid-reply, regenerate)
import asyncio, gc, json, threading, time
from mixtral_nb.ui import ChatUI

_ui = [o for o in gc.get_objects() if type(o) is ChatUI][-1]  # type(): weak proxies raise on isinstance

async def _idle(limit=1800.0):
    t0 = time.monotonic()
    while _ui.send_button.disabled:  # busy while a reply streams (ipykernel 7 pumps it from the event loop)
        if time.monotonic() - t0 > limit:
            raise TimeoutError("the chat widget did not finish its reply")
        await asyncio.sleep(0.05)

def _press_stop(after):
    def run():
        while _ui.session.progress.get("tokens", 0) < after:
            time.sleep(0.005)
        _ui.stop()
    threading.Thread(target=run, daemon=True).start()

_sess = _ui.session
_sess.min_new_tokens = 10**6  # random weights: every reply runs to its length (the slider's max_new_tokens)
_out = {}
for _name, _act, _stop in (("send", lambda: _ui.send("Tell me about lighthouses."), None),
                           ("stop", lambda: _ui.send("Count from one to one thousand."), __STOP__),
                           ("regenerate", _ui.regenerate, None)):
    if _stop is not None:
        _sess.progress = {"tokens": 0, "seconds": 0.0, "tok_s": 0.0}  # not the last reply's count
        _press_stop(_stop)
    _t0 = time.perf_counter()
    _act()
    await _idle()
    if _ui.last_error is not None:
        raise _ui.last_error
    _s = dict(_sess.last_stats or {})
    _out[_name] = {"tokens": _s.get("tokens"), "stop_reason": _s.get("stop_reason"), "tok_s": _s.get("tok_s"),
                   "wall_s": time.perf_counter() - _t0}
assert _out["stop"]["stop_reason"] == "stop" and _out["stop"]["tokens"] < _sess.max_new_tokens, _out
assert _out["regenerate"]["tokens"], _out
_out["max_new_tokens"] = _sess.max_new_tokens  # the widget's slider, which starts at the notebook's value
print("REHEARSE_WIDGET " + json.dumps(_out))
'''


def rehearse_notebook(folder: Path, device: str = "cpu", new_tokens: int = 16, vram_cap_mib: float | None = None,
                      notebook: Path | None = None, timeout: int = 1800, out: Path | None = None) -> dict[str, Any]:
    """Execute the walkthrough notebook against ``folder`` (parameters overridden, chat widget driven
    from an appended cell); returns per-cell wall times and the widget's results. Raises
    RehearsalError naming the cell on any cell error."""
    missing = [m for m in NOTEBOOK_PACKAGES if not _importable(m)]
    if missing:
        raise RehearsalError(f"the notebook stage needs {', '.join(missing)}: pip install them (import names)")
    import nbformat  # checked above: the notebook-stage packages are optional
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = notebook or Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"
    nb = nbformat.read(str(path), as_version=4)
    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if idx is None:
        raise RehearsalError(f"{path} has no cell tagged 'parameters'")
    cuda = torch.device(device).type == "cuda"
    params = {"MODEL": str(Path(folder).resolve()), "DEVICE": device, "MAX_NEW_TOKENS": new_tokens,
              "PRESET": "colab-t4" if cuda else None, "QUESTION": "What is the capital of France?"}
    lines = ["# injected by mixtral_nb rehearse"] + [f"{k} = {v!r}" for k, v in params.items()]
    if cuda and vram_cap_mib is not None:
        lines += ["from mixtral_nb.rehearse import cap_vram as _cap_vram",
                  f"import torch as _torch; print(_cap_vram(_torch.device({device!r}), {int(vram_cap_mib * MiB)!r}))"]
    injected = nbformat.v4.new_code_cell("\n".join(lines))
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(idx + 1, injected)
    nb.cells.append(nbformat.v4.new_code_cell(_DRIVER.replace("__STOP__", str(max(2, new_tokens // 4)))))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(path.parent)}})
    root = str(Path(__file__).resolve().parent.parent)  # the kernel imports this checkout's mixtral_nb
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    error = None
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        error = e
    finally:
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, str(out))
    cells = []
    widget = None
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        ex = c.metadata.get("execution", {})
        wall = None
        if "iopub.execute_input" in ex and "shell.execute_reply" in ex:
            t0, t1 = (datetime.fromisoformat(ex[k].replace("Z", "+00:00")) for k in ("iopub.execute_input",
                                                                                    "shell.execute_reply"))
            wall = (t1 - t0).total_seconds()
        failed = any(o.get("output_type") == "error" for o in c.get("outputs", []))
        cells.append({"cell": i, "first_line": "".join(c.source).strip().splitlines()[0][:60] if c.source else "",
                      "wall_s": wall, "error": failed})
        for o in c.get("outputs", []):
            text = o.get("text", "") if o.get("output_type") == "stream" else ""
            for line in text.splitlines():
                if line.startswith("REHEARSE_WIDGET "):
                    widget = json.loads(line.split(" ", 1)[1])
    if error is not None:
        bad = next((c for c in cells if c["error"]), None)
        where = f"cell {bad['cell']} ({bad['first_line']!r})" if bad else "a cell"

        last = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()[-1]
        raise RehearsalError(f"notebook {path.name}: {where} raised: {last[:300]}")
    if widget is None:
        raise RehearsalError("the widget driver cell printed no REHEARSE_WIDGET line")
    return {"cells": cells, "widget": widget}


def _importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------ command line


def _json_default(o: Any) -> Any:
    if isinstance(o, StageRecord):
        return o.to_json()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _print_report(report: dict[str, Any]) -> None:
    print(format_table(report.get("stages", [])))
    chat = report.get("chat")
    if chat:
        hit = chat.get("expert_cache_hit_rate")
        ttft = chat.get("ttft_s")
        print(f"chat ({chat['engine']}): {chat['tok_s']:.2f} tok/s, time to first token "
              f"{'-' if ttft is None else f'{ttft:.2f}'} s, expert-cache hit rate "
              f"{'-' if hit is None else f'{hit:.1%}'}")
    for st in report.get("stages", []):
        for c in (st.info or {}).get("cells", []) if st.name == "notebook" else []:
            print(f"  notebook cell {c['cell']:>3}: {c['wall_s'] or 0:7.2f} s  {c['first_line']}")
    if "vram" in report:
        v = report["vram"]
        print(f"VRAM cap {v['cap_bytes'] / MiB:,.0f} MiB = CUDA context {v['context_bytes'] / MiB:,.0f} MiB + torch "
              f"{(v['cap_bytes'] - v['context_bytes']) / MiB:,.0f} MiB (fraction {v['fraction']:.4f})")


def rehearse_main(argv: list[str] | None = None) -> int:
    """``python -m mixtral_nb rehearse ...``: 0 when every stage ran within the limits."""
    p = argparse.ArgumentParser(prog="python -m mixtral_nb rehearse", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--article", type=Path, help="an existing folder in the article's pre-quantized layout")
    src.add_argument("--synthetic", type=Path, help="write a full-size synthetic article folder here (kept; reused)")
    p.add_argument("--layers", type=int, default=None, help="synthetic: layers to write (all 32 when not given)")
    p.add_argument("--device", default="cuda:0", help="where the model runs (cpu for a quick check)")
    p.add_argument("--vram-cap-mib", type=float, default=COLAB_VRAM_MIB,
                   help="VRAM the process may use, CUDA context included (a T4's usable memory)")
    p.add_argument("--host-limit-gb", type=float, default=COLAB_HOST_LIMIT_GB,
                   help="host memory (RSS + pinned) past which the rehearsal fails")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per chat reply")
    p.add_argument("--json", type=Path, default=None, help="write the whole report here")
    p.add_argument("--notebook", action="store_true", help="also execute notebooks/walkthrough.ipynb, driving its widget")
    p.add_argument("--skip", default="", help="comma-separated stages to skip: synthetic (folder exists), rebuild")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    a = p.parse_args(argv)
    skip = tuple(s for s in a.skip.split(",") if s)
    bad = set(skip) - {"synthetic", "rebuild"}
    if bad:
        p.error(f"--skip {','.join(sorted(bad))}: only synthetic and rebuild can be skipped")
    code, report = 0, {}
    try:
        report = rehearse(a.article, a.synthetic, a.layers, a.device, a.vram_cap_mib, a.host_limit_gb, a.new_tokens,
                          a.notebook, skip, a.interval)
        report["ok"] = True
    except LimitExceeded as e:
        report = getattr(e, "report", {})
        report.update(ok=False, error=str(e))
        code = 2
    except RehearsalError as e:
        report = getattr(e, "report", {})
        report.update(ok=False, error=str(e), traceback=traceback.format_exc())
        traceback.print_exc()
        code = 1
    except ValueError as e:
        report = getattr(e, "report", {})
        report.update(ok=False, error=str(e))
        code = 1
    except Exception as e:  # outside any stage: still a table, a JSON and a traceback
        report = getattr(e, "report", {})
        report.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        traceback.print_exc()
        code = 1
    _print_report(report)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=_json_default))
        os.replace(tmp, a.json)
    if code:
        print(f"rehearse: FAILED: {report.get('error')}", file=sys.stderr)
    else:
        print("rehearse: OK, every stage within the limits")
    return code
