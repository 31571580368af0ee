"""ExpertCache: which experts sit in GPU slots, and moving them between host and GPU.

- GPU slots are rows of one preallocated [buffers, blob_bytes] uint8 tensor; each layer owns
  ``E - offload_per_layer`` of them at a time (a per-layer LRU, as in the article), or its own count
  from ``OffloadConfig.gpu_slots`` (layers may differ), and ``buffer_size`` more are spare, so a miss
  can load into a free buffer while the evicted expert is still being read by queued kernels or
  copied out.
- Host blobs are rows of one page-locked buffer (on CUDA) of exactly their size (:mod:`.hostmem`).
- Host-mirror mode keeps every expert on the host: an eviction just drops the GPU copy (no
  device-to-host traffic). Otherwise (Colab: host RAM too small for all experts) the host holds the
  offloaded experts plus spare buffers, and a swap copies in and out on two different streams. With
  more host blobs than that (``extra_host_slots``), GPU-resident experts also keep a host copy
  ("clean" residents): the spare blobs are handed out evenly over the layers at build time (layers
  with fewer slots, which miss more, first), one blob stays free for write-backs. Evicting a clean
  expert needs no write-back, and the loaded expert then keeps its host copy, so a layer's number of
  clean residents stays constant: with clean-first eviction over the whole layer (``clean_window``
  >= E), a layer with two clean residents never writes back under top-2 routing, one with one rarely.
  Only a dirty eviction (no clean victim) writes back, and the loaded expert then gives its host
  copy to the write-back when no other blob is free.
- A miss queues its host-to-GPU copy before the evicted expert's write-back, so the copy the
  compute waits for starts first.
- Copies run on their own CUDA streams; the compute stream waits on per-buffer events only when a
  copy is still in flight, and copies into a buffer wait on the event recorded after its last use.
- Nothing here synchronises the host with the GPU; on CPU the same logic runs with plain copies.
- The host work of a miss delays its copy (the copy engine idles meanwhile), so the CUDA calls are
  the cheap ones: events record on named streams, copies switch streams with ``set_stream`` and
  back to ``main`` (the compute stream, looked up once per step by the caller), not through
  ``torch.cuda.stream()`` contexts, which cost far more host time.
- The counters (``CacheStats``) are written by the cache alone: callers report what it cannot see
  (``note_uses``, ``note_host_sync``) through its methods.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import OrderedDict, deque
from typing import Callable, Container, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from .config import OffloadConfig
from .expert import ExpertFormat
from .graphs import GraphPool
from .hostmem import HostBuffer


HOST_RESERVE = 1  # swap mode: host blobs kept free for a write-back (each swap frees one as it takes one)


def spread_clean(n: int, slots: list[int], num_experts: int) -> list[int]:
    """How many of each layer's GPU residents start with a host copy when ``n`` spare host blobs are
    handed out: one per layer in turn, layers with fewer slots (more misses) first, at most a layer's
    slots, none where every expert is resident (nothing is ever evicted there). Even spreading
    matters: a layer left with no clean resident writes back on every miss."""
    out = [0] * len(slots)
    order = [i for i in sorted(range(len(slots)), key=lambda i: (slots[i], i)) if slots[i] < num_experts]
    n = max(0, n)
    while n > 0:
        placed = False
        for i in order:
            if n and out[i] < slots[i]:
                out[i] += 1
                n -= 1
                placed = True
        if not placed:
            break
    return out


@dataclasses.dataclass
class CacheStats:
    """One ExpertCache's counters since its last ``reset_stats``; only the cache writes them."""

    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    host_syncs: int = 0
    pred_correct: int = 0  # routing guesses for the next layer that were right
    pred_total: int = 0  # guesses made
    actual_total: int = 0  # experts the scored layers really used


class _Streams:
    """CUDA streams and events for one device; every method is a no-op on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.h2d = self.d2h = None  # copy streams (CPU: none, copies are plain)
        if self.cuda:
            # an int index: torch.cuda.current_stream(torch.device) spends host time resolving the device
            self.index = device.index if device.index is not None else torch.cuda.current_device()
            self.h2d = torch.cuda.Stream(device=device)
            self.d2h = torch.cuda.Stream(device=device)

    def event(self, timing: bool = False) -> torch.cuda.Event | None:
        return torch.cuda.Event(enable_timing=timing) if self.cuda else None

    def compute(self) -> torch.cuda.Stream | None:
        """The stream the model computes on (the current one): callers that need it several times in
        one step look it up once and pass it on as ``main``."""
        return torch.cuda.current_stream(self.index) if self.cuda else None


def hits_first(experts: Iterable[int], resident: Container[int]) -> list[int]:
    """The order a layer fetches ``experts`` in: the resident ones first (they compute while the misses
    load), ascending ids within each part. The LRU order follows it, so the cache and the policy
    simulator both take it from here."""
    return sorted(experts, key=lambda e: (e not in resident, e))


class ExpertCache:
    """Per-layer LRU of experts in GPU slots, fed from host blobs; see the module docstring."""

    def __init__(self, fmt: ExpertFormat, num_layers: int, num_experts: int, config: OffloadConfig,
                 device: torch.device | str, load_blob: Callable[[int, int], Tensor],
                 host_mirror: bool | None = None) -> None:
        self.fmt = fmt
        self.layout = fmt.layout
        self.blob_bytes = self.layout.total_bytes
        self.L, self.E = num_layers, num_experts
        self.config = config
        self.device = torch.device(device)
        self.layer_slots = config.slots_per_layer(num_layers, num_experts)
        self.slots = min(self.layer_slots)  # every layer has at least this many (all E: nothing ever misses)
        self.mirror = config.host_mirror if host_mirror is None else host_mirror
        if self.mirror is None:
            self.mirror = True
        self.s = _Streams(self.device)
        pin = self.s.cuda and config.pin_memory

        n_gpu = sum(self.layer_slots) + config.buffer_size
        self.gpu = torch.empty(n_gpu, self.blob_bytes, dtype=torch.uint8, device=self.device)
        self.gpu_rows = list(self.gpu.unbind(0))  # one view per buffer, made once (indexing costs a dispatch)
        self.gpu_views = [fmt.views(row) for row in self.gpu_rows]
        self.loaded = [self.s.event() for _ in range(n_gpu)]  # after the H2D copy into the buffer
        self.last_use = [self.s.event() for _ in range(n_gpu)]  # after the last kernel reading it
        self.written_back = [self.s.event() for _ in range(n_gpu)]  # after its D2H copy
        self.pending: set[int] = set()  # buffers whose H2D copy the compute stream has not waited on
        # On CPU a slot's dequantized weights are kept until the slot is reloaded: dequantizing
        # costs far more than the matmul there, and CPU RAM is plentiful compared to a T4's VRAM.
        self.keep_dense = self.device.type == "cpu" and fmt.specs is not None
        self._dense: dict[int, tuple] = {}

        n_spare_host = 0 if self.mirror else config.buffer_size + config.extra_host_slots
        n_host = (self.L * self.E if self.mirror else sum(self.E - s for s in self.layer_slots)) + n_spare_host
        # swap mode: the spare blobs, all but one, start as host copies of GPU-resident experts
        clean = [0] * self.L if self.mirror else spread_clean(n_spare_host - HOST_RESERVE, self.layer_slots, self.E)
        self.host_buffer = HostBuffer(n_host * self.blob_bytes, pin)  # exact size: torch's pinned allocator rounds up
        self.host: list[Tensor] = self.host_buffer.rows(n_host, self.blob_bytes)
        self.host_read = [self.s.event() for _ in self.host]  # after an H2D copy read the buffer

        # placement: the first `slots` experts of each layer start on the GPU (like the article); in swap
        # mode the first clean[layer] of them also keep a host copy
        self.lru: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(self.L)]
        self.host_of: list[list[int | None]] = [[None] * self.E for _ in range(self.L)]
        self.prefetched: list[set[int]] = [set() for _ in range(self.L)]
        b = h = 0
        for layer in range(self.L):
            for e in range(self.E):
                blob = load_blob(layer, e)
                if blob.numel() != self.blob_bytes:
                    raise ValueError(f"expert blob ({layer}, {e}) has {blob.numel()} bytes, layout expects {self.blob_bytes}")
                slots = self.layer_slots[layer]
                if self.mirror or e >= slots or e < clean[layer]:
                    self.host[h].copy_(blob)
                    self.host_of[layer][e] = h
                    h += 1
                if e < slots:
                    self.gpu[b].copy_(blob)
                    self.lru[layer][e] = b
                    b += 1
        self._slot_table: Tensor | None = None
        self.version = 0  # counts changes of which experts sit in GPU buffers (streamed.py mirrors them)
        self.graph_pool = GraphPool()  # for the CUDA graphs of this cache's expert groups
        self.gpu_free: deque[tuple[int, torch.cuda.Event | None]] = deque((i, None) for i in range(b, n_gpu))
        self.host_free: deque[tuple[int, torch.cuda.Event | None]] = deque((i, None) for i in range(h, len(self.host)))
        self.copy_pad: Callable[[str, int, torch.cuda.Stream], None] | None = None
        self.reset_stats()

    # ------------------------------------------------------------------ counters

    def reset_stats(self) -> None:
        """Zero the counters (the benchmark calls this between prefill and decode)."""
        self._stats = CacheStats()
        self._recent = (0.0, 0.0)  # decayed (right, guessed) counts behind prefetch_useful()
        self._timings: list[tuple[str, object, object]] = []  # (kind, start, end) events or seconds
        self._done = {"wait": 0.0, "h2d": 0.0, "d2h": 0.0}
        self._lock = threading.Lock()  # monitors read stats() from other threads

    def _time(self, kind: str, start: object, end: object) -> None:
        with self._lock:
            self._timings.append((kind, start, end))
        if len(self._timings) > 4096:
            self._fold(block=False)

    def _fold(self, block: bool) -> None:
        with self._lock:
            self._fold_locked(block)

    def _fold_locked(self, block: bool) -> None:
        keep = []
        for kind, a, b in self._timings:
            if isinstance(a, float):
                self._done[kind] += b - a  # type: ignore[operator]
            elif block or b.query():  # type: ignore[union-attr]
                if block:
                    b.synchronize()  # type: ignore[union-attr]
                self._done[kind] += a.elapsed_time(b) / 1000.0  # type: ignore[union-attr]
            else:
                keep.append((kind, a, b))
        self._timings = keep

    def stats(self, wait: bool = False) -> dict[str, float]:
        """Counters so far. Copy timings count once their copies finish; ``wait=True`` waits for all
        (benchmarks), the default never blocks (live monitors read this while the model runs)."""
        self._fold(block=wait)
        c = self._stats
        uses = c.hits + c.misses
        return {
            "hits": c.hits, "misses": c.misses, "hit_rate": c.hits / uses if uses else 0.0,
            "prefetch_issued": c.prefetch_issued, "prefetch_used": c.prefetch_used,
            "prefetch_precision": c.pred_correct / c.pred_total if c.pred_total else 0.0,
            "prefetch_recall": c.pred_correct / c.actual_total if c.actual_total else 0.0,
            "bytes_h2d": c.bytes_h2d, "bytes_d2h": c.bytes_d2h,
            "wait_s": self._done["wait"], "h2d_s": self._done["h2d"], "d2h_s": self._done["d2h"],
            "host_syncs": c.host_syncs,
        }

    @property
    def counters(self) -> CacheStats:
        """A copy of the counters (the cache's own object is written by the cache alone)."""
        return dataclasses.replace(self._stats)

    # read-only views of single counters (monitors and probes read these per layer call)
    hits = property(lambda self: self._stats.hits)
    misses = property(lambda self: self._stats.misses)
    prefetch_issued = property(lambda self: self._stats.prefetch_issued)
    prefetch_used = property(lambda self: self._stats.prefetch_used)
    bytes_h2d = property(lambda self: self._stats.bytes_h2d)
    bytes_d2h = property(lambda self: self._stats.bytes_d2h)
    host_syncs = property(lambda self: self._stats.host_syncs)
    pred_correct = property(lambda self: self._stats.pred_correct)
    pred_total = property(lambda self: self._stats.pred_total)
    actual_total = property(lambda self: self._stats.actual_total)

    def note_uses(self, n: int) -> None:
        """Count ``n`` expert uses served without a ``fetch`` call, all hits: a replayed CUDA graph of
        the all-resident path runs the expert kernels but not the Python that fetches."""
        self._stats.hits += n

    def note_host_sync(self) -> None:
        """Count one host sync a caller made to learn which experts to fetch."""
        self._stats.host_syncs += 1

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Uses, copies and syncs inside the block are not counted (warm-up runs, graph captures)."""
        saved = dataclasses.replace(self._stats)
        try:
            yield
        finally:
            self._stats = saved

    def copy_on_compute_stream(self) -> None:
        """Queue every later copy on the compute stream, behind (and blocking) the compute kernels:
        the article's behaviour, which the benchmark's baseline measures. Call it before the first
        forward (no copy may be in flight); a no-op on CPU."""
        if self.s.cuda:
            self.s.h2d = self.s.d2h = torch.cuda.current_stream(self.device)

    # ------------------------------------------------------------------ cache operations

    def slot_table(self) -> Tensor:
        """[layers, experts] int32 on the device: the GPU buffer of every expert, when all are resident.

        Only then is the mapping fixed, so kernels can look experts up on the GPU without a host sync.
        """
        if any(s != self.E for s in self.layer_slots):
            raise RuntimeError("slot_table() needs every expert resident (offload_per_layer=0)")
        if self._slot_table is None:
            table = np.empty((self.L, self.E), dtype=np.int32)
            for layer in range(self.L):
                self.placement(layer, table[layer])
            self._slot_table = torch.from_numpy(table).to(self.device)
        return self._slot_table

    def placement(self, layer: int, out: np.ndarray) -> None:
        """Write layer ``layer``'s map expert -> GPU buffer into ``out`` [E] (-1: not on the GPU), the
        row a device-side lookup reads (``slot_table``, streamed steps' table)."""
        lru = self.lru[layer]
        out.fill(-1)
        out[list(lru)] = list(lru.values())

    def resident(self, layer: int, expert: int) -> bool:
        return expert in self.lru[layer]

    def hits_first(self, layer: int, experts: Iterable[int]) -> list[int]:
        """``experts`` in the order layer ``layer`` fetches them (:func:`hits_first`)."""
        return hits_first(experts, self.lru[layer])

    def fetch(self, layer: int, expert: int, protect: set[int] | frozenset[int] = frozenset(),
              prefetch: bool = False, main: torch.cuda.Stream | None = None) -> int | None:
        """Make ``expert`` resident (starting a copy if needed) and return its GPU buffer.

        Returns None when the layer is full of protected experts (the caller computes some first).
        A hit moves the expert to the most-recent end of the layer's LRU. ``main``: the compute
        stream, if the caller has it (else it is looked up).
        """
        lru = self.lru[layer]
        if expert in lru:
            if not prefetch:
                lru.move_to_end(expert)
                self._stats.hits += 1
                if expert in self.prefetched[layer]:
                    self.prefetched[layer].discard(expert)
                    self._stats.prefetch_used += 1
            return lru[expert]
        victim = None
        victim_clean = False
        if len(lru) >= self.layer_slots[layer]:
            victim = self._victim(layer, protect)
            if victim is None:
                return None
            victim_clean = self.host_of[layer][victim] is not None
            if not self.gpu_free:  # no spare buffer: the victim's buffer must be freed first
                self._evict(layer, victim, main)
                victim = None
        self.version += 1
        if not prefetch:
            self._stats.misses += 1
        else:
            self._stats.prefetch_issued += 1
            self.prefetched[layer].add(expert)
        buf, ready = self.gpu_free.popleft()
        h = self.host_of[layer][expert]
        assert h is not None, f"expert ({layer}, {expert}) is neither on the GPU nor on the host"
        self._copy_in(h, buf, ready, main)
        if not self.mirror and not victim_clean and len(self.host_free) <= HOST_RESERVE:
            # swap mode, a write-back coming and no spare blob: give this one to it (the expert now lives
            # on the GPU only). A clean victim frees no blob but needs none either: this one stays a copy.
            self.host_free.append((h, self.host_read[h]))
            self.host_of[layer][expert] = None
        lru[expert] = buf
        if victim is not None:  # queued after the copy in, so the copy the compute needs starts first
            self._evict(layer, victim, main)
        return buf

    def _victim(self, layer: int, protect: set[int] | frozenset[int]) -> int | None:
        """The expert to evict: the least recently used one not in ``protect``, except that among the
        ``clean_window`` least recent a clean one (its host copy still exists) goes first, since
        evicting it needs no write-back (swap mode). None when every resident expert is protected."""
        window = self.config.clean_window if not self.mirror else 1
        first = None
        for e in self.lru[layer]:  # least recent first
            if e in protect:
                continue
            if first is None:
                first = e
            if self.host_of[layer][e] is not None:
                return e
            window -= 1
            if window <= 0:
                break
        return first

    def _copy_in(self, h: int, buf: int, ready: torch.cuda.Event | None, main: torch.cuda.Stream | None) -> None:
        self._stats.bytes_h2d += self.blob_bytes
        self._dense.pop(buf, None)
        self._queue_copy("h2d", self.s.h2d, main, (ready,), self.gpu_rows[buf], self.host[h],
                         (self.loaded[buf], self.host_read[h]))
        if self.s.cuda:
            self.pending.add(buf)

    def _evict(self, layer: int, expert: int, main: torch.cuda.Stream | None = None) -> None:
        buf = self.lru[layer].pop(expert)
        self.version += 1
        self.prefetched[layer].discard(expert)
        if self.mirror or self.host_of[layer][expert] is not None:  # the host still has it: no write-back
            self.gpu_free.append((buf, self.last_use[buf]))
            return
        h, ready = self.host_free.popleft()  # the oldest freed blob: its last reader is long done
        self._stats.bytes_d2h += self.blob_bytes
        # after a prefetched copy into the buffer (it may still be arriving) and the buffer's last reader
        self._queue_copy("d2h", self.s.d2h, main, (self.loaded[buf], self.last_use[buf], ready),
                         self.host[h], self.gpu_rows[buf], (self.written_back[buf],))
        self.gpu_free.append((buf, self.written_back[buf]))
        self.host_of[layer][expert] = h

    def _queue_copy(self, kind: str, stream: torch.cuda.Stream | None, main: torch.cuda.Stream | None,
                    waits: tuple, dst: Tensor, src: Tensor, done: tuple) -> None:
        """Copy ``src`` into ``dst``, timed as ``kind``. On CUDA: on ``stream`` once it has waited for
        ``waits``, recording ``done`` after it; the copy enqueues through ``set_stream`` and back to
        ``main`` (looked up if None). On CPU: a plain copy."""
        if not self.s.cuda:
            t0 = time.perf_counter()
            dst.copy_(src)
            self._time(kind, t0, time.perf_counter())
            return
        main = main or self.s.compute()
        start, end = self.s.event(True), self.s.event(True)
        for ev in waits:
            if ev is not None:
                stream.wait_event(ev)
        start.record(stream)
        torch.cuda.set_stream(stream)  # copy_ enqueues on the current stream
        try:
            dst.copy_(src, non_blocking=True)
            if self.copy_pad is not None:  # e.g. the benchmark's T4 emulation: the stream stays busy longer
                self.copy_pad(kind, src.numel() * src.element_size(), stream)
        finally:
            torch.cuda.set_stream(main)
        end.record(stream)
        for ev in done:
            ev.record(stream)
        self._time(kind, start, end)

    def use(self, buf: int, dtype: torch.dtype = torch.float32,
            main: torch.cuda.Stream | None = None) -> tuple[tuple, tuple | None]:
        """(weights, specs) of a resident buffer for compute; the compute stream waits for its copy.

        specs is None when the weights are floating point (float experts, or dense on CPU).
        """
        if self.keep_dense:
            dense = self._dense.get(buf)
            if dense is None:
                dense = self._dense[buf] = self.fmt.dense(self.gpu_rows[buf], dtype)
            return dense, None
        if buf in self.pending:
            self.pending.discard(buf)
            ev = self.loaded[buf]
            if not ev.query():
                stream = main or self.s.compute()
                start, end = self.s.event(True), self.s.event(True)
                start.record(stream)
                stream.wait_event(ev)
                end.record(stream)
                self._time("wait", start, end)
        return self.gpu_views[buf], self.fmt.specs

    def release(self, *bufs: int, main: torch.cuda.Stream | None = None) -> None:
        """Mark the end of the kernels that read ``bufs`` (copies into them will wait for them)."""
        if self.s.cuda:
            stream = main or self.s.compute()
            for buf in bufs:
                self.last_use[buf].record(stream)

    def note_prediction(self, predicted: set[int], actual: set[int]) -> None:
        """Score a next-layer routing guess once the real routing is known."""
        right = len(predicted & actual)
        self._stats.pred_correct += right
        self._stats.pred_total += len(predicted)
        self._stats.actual_total += len(actual)
        self._recent = (0.98 * self._recent[0] + right, 0.98 * self._recent[1] + len(predicted))

    def prefetch_useful(self) -> bool:
        """Whether recent guesses were right often enough to pay for their copies.

        A wrong guess costs a full expert copy (and in swap mode a write-back); when routing does
        not follow the hidden state (e.g. random routing) guesses are right k/E of the time, so
        prefetching is paused, while guesses keep being scored so it resumes when they improve.
        """
        correct, total = self._recent
        return total < 16 or correct >= 0.5 * total

    def free(self) -> None:
        """Free the GPU slots and the host blobs now (a newer build of the same checkpoint needs them)."""
        self.gpu = torch.empty(0, self.blob_bytes, dtype=torch.uint8, device=self.device)
        self.gpu_rows, self.gpu_views, self.host = [], [], []
        self.host_buffer.release()
        self.host_buffer = HostBuffer(0, False)
        self._dense, self._slot_table, self.graph_pool = {}, None, None
        self.lru = [type(lru)() for lru in self.lru]

    # ------------------------------------------------------------------ sizes

    @property
    def gpu_bytes(self) -> int:
        return self.gpu.numel()

    @property
    def host_bytes(self) -> int:
        return len(self.host) * self.blob_bytes


class CacheGroup:
    """The caches of a model split over several GPUs, read as one (stats summed)."""

    def __init__(self, caches: list[ExpertCache]) -> None:
        self.caches = caches
        self.fmt, self.layout, self.E = caches[0].fmt, caches[0].layout, caches[0].E

    def __getattr__(self, name: str) -> int:
        if name in ("hits", "misses", "prefetch_issued", "prefetch_used", "bytes_h2d", "bytes_d2h", "host_syncs",
                    "pred_correct", "pred_total", "actual_total"):
            return sum(getattr(c, name) for c in self.caches)
        raise AttributeError(name)

    def copy_on_compute_stream(self) -> None:
        for c in self.caches:
            c.copy_on_compute_stream()

    def stats(self, wait: bool = False) -> dict[str, float]:
        parts = [c.stats(wait) for c in self.caches]
        out = {k: sum(p[k] for p in parts) for k in parts[0]}
        uses = out["hits"] + out["misses"]
        out["hit_rate"] = out["hits"] / uses if uses else 0.0
        pc = sum(c.pred_correct for c in self.caches)
        pt = sum(c.pred_total for c in self.caches)
        at = sum(c.actual_total for c in self.caches)
        out["prefetch_precision"] = pc / pt if pt else 0.0
        out["prefetch_recall"] = pc / at if at else 0.0
        return out

    def reset_stats(self) -> None:
        for c in self.caches:
            c.reset_stats()

    @property
    def gpu_bytes(self) -> int:
        return sum(c.gpu_bytes for c in self.caches)

    @property
    def host_bytes(self) -> int:
        return sum(c.host_bytes for c in self.caches)
