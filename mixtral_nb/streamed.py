"""Streamed decode: a whole one-token step as one CUDA graph, while the host serves its expert misses.

Why: with offloaded experts the Decoder used to stop at every layer: replay the layer's attention
graph, read its routing back (a host sync), start the misses' copies, launch the experts. Each stop
costs a round trip (the GPU finishing, the host waking, Python deciding, launches) during which the
copy engine idles, and a layer whose experts are all resident still waits for the host. Here the
GPU runs the step without the host; the host only starts copies:

- the GPU keeps the cache's placement as a table [layers, experts] int32 (the expert's GPU buffer,
  -1: not loaded). In the graph each MoE layer copies its expert ids to pinned host memory, then the
  step's number (its arrival says the ids arrived), then ``kernels.wait_slots`` polls the layer's
  table row until every chosen expert is loaded and hands the buffers to the grouped expert kernels;
- the host, after launching the graph, reads each layer's ids as they arrive (polling pinned
  memory), runs the cache's own ``fetch`` (LRU, clean-first eviction, write-backs) and, when the
  layer missed, writes the layer's whole table row with one small copy on the copy stream, behind
  the layer's expert copies: the row lands after the experts it names, and with it the evictions;
- only the layer being served changes its row, so the GPU never reads a row that names a buffer a
  copy is overwriting: while layer l is served the graph waits in (or before) layer l, other rows
  already name only what they hold, and a buffer freed by an eviction was last read before layer
  l's routing was copied out (stream order), so no event has to guard its reuse;
- speculative prefetch does not run in streamed steps (it would change the next layer's row while
  the graph may read it);
- an interrupted serve (Stop, an error, a timeout) sets the abort flag through the copy stream: the
  waiting graph finishes with garbage, the host waits for it, rewrites the whole table from the
  cache, and the Decoder does not advance (the step never happened).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import Tensor

from . import kernels
from .cache import ExpertCache

# the host gives up on a layer's routing after this long; the GPU's wait counts polls (kernels.fused.WAIT_SPINS),
# which on the H200 test machine ran out sooner
SERVE_TIMEOUT_S = 60.0
_RING = 64  # pinned rows for table writes in flight


def launches_wait() -> bool:
    """Whether CUDA launches block until their work is done (``CUDA_LAUNCH_BLOCKING=1``, a debugging
    setting): a streamed graph, which waits for the host, would then never return to it."""
    return os.environ.get("CUDA_LAUNCH_BLOCKING", "0") not in ("", "0")


def _pinned(*shape: int, dtype: torch.dtype = torch.int32) -> Tensor:
    """Pinned by PyTorch's own allocator: a copy into host memory inside a CUDA graph capture must be
    to memory PyTorch knows as pinned (a cudaHostRegister'd buffer is refused there)."""
    return torch.zeros(shape, dtype=dtype, pin_memory=True)


class ExpertStream:
    """One cache's streamed-decode state: the device table, the routing rows and the serve loop."""

    def __init__(self, cache: ExpertCache, top_k: int) -> None:
        if cache.device.type != "cuda":
            raise ValueError("streamed decode needs a CUDA device")
        L, E, dev = cache.L, cache.E, cache.device
        self.cache, self.top_k = cache, top_k
        self.table = torch.full((L, E), -1, dtype=torch.int32, device=dev)
        self.flags = torch.zeros(2, dtype=torch.int32, device=dev)  # [abort, gave up]
        self.seq = torch.zeros(1, dtype=torch.int32, device=dev)  # the step's number, written before each replay
        self.host_ids = _pinned(L, top_k, dtype=torch.int64)  # the router's ids, as it gives them
        self.host_seq = _pinned(L)
        self._ring, self._full, self._one = _pinned(_RING, E), _pinned(L, E), _pinned(1)
        self.host_seq.fill_(-1)
        self._one.fill_(1)
        self._ids_np, self._seq_np, self._ring_np = self.host_ids.numpy(), self.host_seq.numpy(), self._ring.numpy()
        self._ring_ev: list[torch.cuda.Event | None] = [None] * _RING
        self._full_ev: torch.cuda.Event | None = None
        self._next = 0
        self._counter = 0
        self._seen = -1  # the cache version the table mirrors (-1: never written)
        self.open = False  # a step began and was not served to its end (an interrupt, even inside abort())

    # ------------------------------------------------------------------ graph side (recorded once)

    def publish(self, layer: int, ids: Tensor) -> None:
        """Copy layer ``layer``'s expert ids [1, k] (int64) to the host, then the step's number."""
        self.host_ids[layer].copy_(ids.view(-1), non_blocking=True)
        self.host_seq[layer:layer + 1].copy_(self.seq, non_blocking=True)

    def wait(self, layer: int, ids: Tensor) -> Tensor:
        """The GPU buffers of the chosen experts, once the host has loaded them (int32 [k])."""
        return kernels.wait_slots(ids.view(-1), self.table[layer], self.flags)

    # ------------------------------------------------------------------ host side (every step)

    def begin(self, main: torch.cuda.Stream) -> int:
        """Before a replay: end a step left open (its graph may still wait), refresh the table if the
        cache changed outside streamed steps (a prefill, another engine), then number the step;
        returns the number the serve loop waits for. ``end()`` closes the step."""
        if self.open:
            self.abort(main)
        elif self._seen != self.cache.version:
            self.sync(main)
        self._counter = self._counter % (2**31 - 2) + 1
        self.seq.fill_(self._counter)
        self.open = True
        return self._counter

    def end(self) -> None:
        """Every MoE layer of the step was served."""
        self.open = False

    def serve(self, module: Any, seq: int, main: torch.cuda.Stream) -> None:
        """Serve one layer of step ``seq``: wait for its routing, fetch its experts, write its row."""
        layer, cache = module.cache_layer, self.cache
        seqs = self._seq_np
        if seqs[layer] != seq:
            t0, spins = time.perf_counter(), 0
            while seqs[layer] != seq:
                spins += 1
                if spins % 4096 == 0 and time.perf_counter() - t0 > SERVE_TIMEOUT_S:
                    raise RuntimeError(f"streamed decode: layer {module.layer_idx}'s routing did not arrive in "
                                       f"{SERVE_TIMEOUT_S:.0f} s (the GPU stopped?)")
        ids = self._ids_np[layer].tolist()
        before = cache.version
        protect = set(ids)
        for e in cache.hits_first(layer, protect):
            if cache.fetch(layer, e, protect, main=main) is None:  # the Decoder checks slots >= top_k
                raise RuntimeError(f"streamed decode: layer {module.layer_idx} has no slot for expert {e}")
        if cache.version != before:
            self._write_row(layer, main)
        self._seen = cache.version
        if module.recorder is not None:  # after the row: a recorder that syncs (its flush) must not stall the graph
            module.recorder.record(module.layer_idx, torch.tensor([ids]))

    def _write_row(self, layer: int, main: torch.cuda.Stream) -> None:
        """Copy the layer's placement into its table row on the copy stream, behind its expert copies."""
        i = self._next
        self._next = (i + 1) % _RING
        ev = self._ring_ev[i]
        if ev is not None and not ev.query():
            ev.synchronize()
        self.cache.placement(layer, self._ring_np[i])
        stream = self.cache.s.h2d
        torch.cuda.set_stream(stream)
        try:
            self.table[layer].copy_(self._ring[i], non_blocking=True)
        finally:
            torch.cuda.set_stream(main)
        if ev is None:
            ev = self._ring_ev[i] = torch.cuda.Event()
        ev.record(stream)

    def sync(self, main: torch.cuda.Stream) -> None:
        """The whole table from the cache, on the compute stream once every copy queued so far has landed."""
        if self._full_ev is not None:
            self._full_ev.synchronize()
        full = self._full.numpy()
        for layer in range(self.cache.L):
            self.cache.placement(layer, full[layer])
        main.wait_stream(self.cache.s.h2d)
        self.table.copy_(self._full, non_blocking=True)
        self.flags.zero_()
        self._full_ev = torch.cuda.Event()
        self._full_ev.record(main)
        self._seen = self.cache.version

    def abort(self, main: torch.cuda.Stream) -> None:
        """End a step the host stopped serving: release the graph's waits (the abort flag, written by the
        copy engine, since the compute stream is busy waiting), let it finish, rewrite the table."""
        stream = self.cache.s.h2d
        torch.cuda.set_stream(stream)
        try:
            self.flags[0:1].copy_(self._one, non_blocking=True)
        finally:
            torch.cuda.set_stream(main)
        torch.cuda.synchronize(self.cache.device)
        self.sync(main)
        self.open = False

    def release(self) -> None:
        """Let the host rows go (the Decoder that owns this stream is done), once no copy uses them."""
        torch.cuda.synchronize(self.cache.device)
        self.host_ids = self.host_seq = self._ring = self._full = self._one = torch.empty(0, dtype=torch.int32)
