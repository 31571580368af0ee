"""Routing traces: which experts each MoE layer selected at each step, recorded from a running model.

Why: the expert cache's policy and budget are best chosen by replaying what the router really did
(``policy.simulate``), and real text routes with a temporal locality that random routing lacks.

A :class:`Trace` holds, for every token run, the top-k expert ids of every layer, grouped into steps
(one model forward each: a prefill chunk of several tokens, or one decoded token). It is saved as
JSON or ``.npz`` (no pickle). :func:`record_routing` attaches a :class:`TraceRecorder` to a
``build_model`` model's ``OffloadedExperts``; off by default, the hook costs one attribute test per
layer call. On CPU each call's ids are copied to a list at once. On CUDA the recorder keeps device
copies (a graph's output buffers are overwritten by the next replay) and moves a batch of finished
steps to the host in one copy every ``flush_every`` steps, so no host sync is added per layer.

What is recorded: every call that takes the offloaded path, which is every call on CPU and every call
when some experts are offloaded (the case a cache policy is for). With every expert resident on a
GPU, one-token steps run inside CUDA graphs that Python never sees: :func:`record_routing` warns and
those steps are missing from the trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .moe import OffloadedExperts

__all__ = ["Trace", "TraceRecorder", "record_routing", "routing_visible", "synthetic_trace"]

FORMAT = "mixtral_nb.trace"
VERSION = 1


@dataclass(frozen=True, eq=False)
class Trace:
    """Expert ids ``ids`` [tokens, layers, k] of a run, cut into steps of ``step_tokens`` tokens each;
    ``prefill[i]`` marks a step of several tokens (a prompt chunk) rather than one decoded token (a
    recorded one-token prompt chunk counts as decoded: the router cannot tell them apart)."""

    ids: np.ndarray
    step_tokens: np.ndarray
    prefill: np.ndarray
    num_experts: int
    source: str = ""

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 3:
            raise ValueError(f"Trace ids must be [tokens, layers, k], got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"Trace ids must be integers, got {ids.dtype}")
        steps = np.asarray(self.step_tokens, dtype=np.int64).reshape(-1)
        prefill = np.asarray(self.prefill, dtype=bool).reshape(-1)
        if not isinstance(self.num_experts, (int, np.integer)) or self.num_experts < 1:
            raise ValueError(f"Trace num_experts must be an integer >= 1, got {self.num_experts!r}")
        if steps.shape != prefill.shape:
            raise ValueError(f"Trace has {steps.size} step lengths but {prefill.size} prefill flags")
        if steps.size and steps.min() < 1:
            raise ValueError("every Trace step has at least one token")
        if int(steps.sum()) != ids.shape[0]:
            raise ValueError(f"Trace steps add up to {int(steps.sum())} tokens but ids hold {ids.shape[0]}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"Trace ids must lie in [0, {self.num_experts}) (num_experts), got "
                             f"[{ids.min()}, {ids.max()}]")
        object.__setattr__(self, "ids", ids.astype(np.int16, copy=False))
        object.__setattr__(self, "step_tokens", steps)
        object.__setattr__(self, "prefill", prefill)
        object.__setattr__(self, "num_experts", int(self.num_experts))

    @property
    def num_layers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_steps(self) -> int:
        return int(self.step_tokens.size)

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def decode_tokens(self) -> int:
        return int(self.step_tokens[~self.prefill].sum())

    def steps(self) -> Iterator[tuple[bool, np.ndarray]]:
        """(prefill, ids [T, layers, k]) of each step in order."""
        start = 0
        for n, pre in zip(self.step_tokens.tolist(), self.prefill.tolist()):
            yield pre, self.ids[start:start + n]
            start += n

    def requests(self) -> list[list[list[int]]]:
        """[step][layer] -> the sorted distinct experts that layer needed in that step (what the cache
        is asked for: a prefill chunk needs the union of its tokens' experts)."""
        return [[sorted(set(ids[:, layer].reshape(-1).tolist())) for layer in range(self.num_layers)]
                for _, ids in self.steps()]

    def __repr__(self) -> str:
        return (f"Trace({self.num_steps} steps, {self.tokens} tokens ({self.decode_tokens} decoded), "
                f"{self.num_layers} layers, top-{self.top_k} of {self.num_experts} experts"
                + (f", {self.source}" if self.source else "") + ")")

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write as ``.json`` or ``.npz`` (by the suffix); the file appears whole or not at all."""
        path = Path(path)
        if path.suffix not in (".json", ".npz"):
            raise ValueError(f"{path}: a trace file ends in .json or .npz")
        tmp = path.with_name(f".{path.name}.partial")
        try:
            if path.suffix == ".json":
                doc = {"format": FORMAT, "version": VERSION, "num_experts": self.num_experts,
                       "num_layers": self.num_layers, "top_k": self.top_k, "source": self.source,
                       "step_tokens": self.step_tokens.tolist(), "prefill": self.prefill.tolist(),
                       "ids": self.ids.tolist()}
                tmp.write_text(json.dumps(doc, separators=(",", ":")))
            else:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, format=np.array(FORMAT), version=np.array(VERSION),
                                        num_experts=np.array(self.num_experts), source=np.array(self.source),
                                        ids=self.ids.reshape(self.tokens, self.num_layers, self.top_k),
                                        step_tokens=self.step_tokens, prefill=self.prefill)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such trace file (write one with Trace.save or "
                             "`python -m mixtral_nb policy --embedded --save FILE`)")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    doc = {k: z[k] for k in z.files}
                doc = {k: (v.item() if v.ndim == 0 else v) for k, v in doc.items()}
            else:
                doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("not a trace file")
            if int(doc["version"]) != VERSION:
                raise ValueError(f"trace format version {doc['version']}, this mixtral_nb reads {VERSION}")
            ids = np.asarray(doc["ids"], dtype=np.int64)
            if ids.size == 0:
                ids = ids.reshape(0, int(doc.get("num_layers", 0)), int(doc.get("top_k", 0)))
            return cls(ids, np.asarray(doc["step_tokens"]), np.asarray(doc["prefill"]), int(doc["num_experts"]),
                       str(doc.get("source", "")))
        except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read it as a routing trace ({e}); write traces with Trace.save") from None


class TraceRecorder:
    """Collects the routing of whole model forwards into a :class:`Trace` (see the module docstring).

    ``record(layer, top_k_index)`` is called by each layer's experts in order; a forward that stops
    part way (an interrupt) is dropped when the next one starts, so the trace only holds whole steps.
    Safe to read (``trace()``) from another thread while the model runs.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, flush_every: int = 64,
                 source: str = "") -> None:
        if num_layers < 1 or num_experts < 1 or top_k < 1 or flush_every < 1:
            raise ValueError("TraceRecorder needs num_layers, num_experts, top_k and flush_every >= 1")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.flush_every = flush_every
        self.source = source
        self.visible = True  # False: some steps run where the recorder cannot see them (record_routing warns)
        self.dropped = 0  # unfinished forwards left out
        self._lock = threading.Lock()
        self._current: dict[int, Tensor] = {}
        self._last = -1
        self._pending: list[Tensor] = []  # finished steps [T, layers, k] still on a device
        self._done: list[np.ndarray] = []  # finished steps on the host

    def record(self, layer: int, top_k_index: Tensor) -> None:
        """Note layer ``layer``'s expert ids [T, k] of the current forward."""
        idx = top_k_index.detach().reshape(top_k_index.shape[0], -1)
        # graph outputs are overwritten by the next replay: keep a copy (on the device, no sync)
        idx = idx.clone() if idx.is_cuda else idx.to(torch.int16, copy=True)
        with self._lock:
            if layer <= self._last and self._current:  # a new forward began before the last one finished
                self.dropped += 1
                self._current = {}
            self._last = layer
            self._current[layer] = idx
            if len(self._current) < self.num_layers:
                return
            parts = [self._current[i] for i in sorted(self._current)]
            self._current, self._last = {}, -1
            devices = {p.device for p in parts}
            if len(devices) > 1:  # layers split over several GPUs: gather on the first layer's device
                parts = [p.to(parts[0].device, non_blocking=True) for p in parts]
            step = torch.stack(parts, 1)  # [T, layers, k]
            if step.is_cuda:
                self._pending.append(step)
                if len(self._pending) >= self.flush_every:
                    self._flush_locked()
            else:  # steps still on a device (a prefill) go first: the trace keeps the steps' order
                self._flush_locked()
                self._done.append(step.numpy())

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        lengths = [p.shape[0] for p in self._pending]
        host = torch.cat(self._pending).to(torch.int16).cpu().numpy()  # the one host sync per batch of steps
        self._pending = []
        self._done.extend(np.split(host, np.cumsum(lengths)[:-1]))

    def trace(self) -> Trace:
        """The finished steps so far as a :class:`Trace` (an unfinished forward is left out)."""
        with self._lock:
            self._flush_locked()
            done = list(self._done)
        lengths = np.array([d.shape[0] for d in done], dtype=np.int64)
        ids = (np.concatenate(done) if done else
               np.zeros((0, self.num_layers, self.top_k), dtype=np.int16))
        return Trace(ids, lengths, lengths > 1, self.num_experts, self.source)

    def clear(self) -> None:
        """Forget everything recorded."""
        with self._lock:
            self._current, self._last, self._pending, self._done = {}, -1, [], []
            self.dropped = 0


def _experts(model: Any) -> list[OffloadedExperts]:
    layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)] if hasattr(model, "modules") else []
    if not layers:
        raise ValueError("record_routing: this model has no offloaded experts: record a model made by "
                         "mixtral_nb's build_model or load")
    return sorted(layers, key=lambda m: m.layer_idx)


def routing_visible(model: Any) -> bool:
    """Whether every step's routing reaches the recorder: not when every expert is resident on a GPU
    (one-token steps then run inside CUDA graphs)."""
    return not any(m.cache.device.type == "cuda" and m.static() for m in _experts(model))


@contextlib.contextmanager
def record_routing(model: Any, recorder: TraceRecorder | None = None,
                   flush_every: int = 64) -> Iterator[TraceRecorder]:
    """Record the routing of every forward of ``model`` inside the block into a :class:`TraceRecorder`
    (a new one, or ``recorder`` to continue one); the hooks are removed on exit."""
    layers = _experts(model)
    if any(m.recorder is not None for m in layers):
        raise ValueError("record_routing: this model is already being recorded (nested record_routing blocks)")
    ids = [m.layer_idx for m in layers]
    if ids != list(range(len(layers))):
        raise ValueError(f"record_routing: the model's expert layers are numbered {ids}, expected 0..{len(layers) - 1}")
    if recorder is None:
        recorder = TraceRecorder(len(layers), layers[0].num_experts, layers[0].top_k, flush_every,
                                 source=type(model).__name__)
    elif (recorder.num_layers, recorder.num_experts, recorder.top_k) != (len(layers), layers[0].num_experts,
                                                                       layers[0].top_k):
        raise ValueError(f"record_routing: the recorder is for {recorder.num_layers} layers of top-{recorder.top_k} "
                         f"of {recorder.num_experts} experts, this model has {len(layers)} layers of top-"
                         f"{layers[0].top_k} of {layers[0].num_experts}: make a new recorder")
    if not routing_visible(model):
        recorder.visible = False
        warnings.warn("record_routing: every expert of this model is resident on the GPU, so one-token steps run "
                      "inside CUDA graphs whose routing is not recorded (only prefill steps are); build with "
                      "offload_per_layer >= 1, or on CPU, to record decode steps", RuntimeWarning, stacklevel=3)
    for m in layers:
        m.recorder = recorder
    try:
        yield recorder
    finally:
        for m in layers:
            m.recorder = None


def synthetic_trace(num_layers: int = 32, num_experts: int = 8, top_k: int = 2, tokens: int = 256,
                    repeat: float = 0.5, zipf: float = 0.0, prefill: int = 0, seed: int = 0) -> Trace:
    """A trace with tunable temporal locality: each of a token's k picks repeats the expert of the same
    pick at the previous token with probability ``repeat``, else is drawn from the layer's popularity
    (uniform for ``zipf`` 0, else ``rank ** -zipf`` over a random order of the experts), never twice in
    one token. ``prefill`` > 0 puts that many tokens first, as one prefill step."""
    checks = {"num_layers": (num_layers, 1), "num_experts": (num_experts, 1), "top_k": (top_k, 1),
              "tokens": (tokens, 1), "prefill": (prefill, 0)}
    for name, (value, low) in checks.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"synthetic_trace: {name}={value!r} must be an integer >= {low}")
    if top_k > num_experts:
        raise ValueError(f"synthetic_trace: top_k={top_k} is more than num_experts={num_experts}")
    if not 0.0 <= repeat <= 1.0:
        raise ValueError(f"synthetic_trace: repeat={repeat!r} is a probability: give a number in [0, 1]")
    if not (np.isfinite(zipf) and zipf >= 0):
        raise ValueError(f"synthetic_trace: zipf={zipf!r}: give an exponent >= 0 (0: uniform popularity)")
    rng = np.random.default_rng(seed)
    n = prefill + tokens
    ids = np.zeros((n, num_layers, top_k), dtype=np.int16)
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(zipf)
    for layer in range(num_layers):
        pop = np.empty(num_experts)
        pop[rng.permutation(num_experts)] = weights / weights.sum()
        prev: list[int] | None = None
        for t in range(n):
            chosen: list[int] = []
            for j in range(top_k):
                if prev is not None and prev[j] not in chosen and rng.random() < repeat:
                    chosen.append(prev[j])
                    continue
                p = pop.copy()
                p[chosen] = 0.0
                chosen.append(int(rng.choice(num_experts, p=p / p.sum())))
            ids[t, layer] = chosen
            prev = chosen
    steps = ([prefill] if prefill else []) + [1] * tokens
    flags = ([True] if prefill else []) + [False] * tokens
    return Trace(ids, np.array(steps), np.array(flags), num_experts,
                 f"synthetic repeat={repeat} zipf={zipf} seed={seed}")


def concat(traces: Sequence[Trace]) -> Trace:
    """One trace of several in order (e.g. chat turns recorded apart)."""
    if not traces:
        raise ValueError("concat: no traces given")
    shapes = {(t.num_layers, t.top_k, t.num_experts) for t in traces}
    if len(shapes) > 1:
        raise ValueError(f"concat: the traces are of different models (layers, k, experts): {sorted(shapes)}")
    return Trace(np.concatenate([t.ids for t in traces]), np.concatenate([t.step_tokens for t in traces]),
                 np.concatenate([t.prefill for t in traces]), traces[0].num_experts, traces[0].source)
