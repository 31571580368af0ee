"""OffloadedExperts: the module that replaces transformers' ``layer.mlp.experts``.

It has the forward signature of ``MixtralExperts`` (hidden [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H], so the rest of transformers' Mixtral runs unchanged. Per call it
makes one host sync (the per-expert token counts, plus the next layer's routing guess, in one small
tensor), asks the ExpertCache for the experts it needs (hits first, so they compute while misses
load), starts prefetching the next layer's predicted experts, and sums the experts' outputs.

Decoding one token on a GPU, the k experts run as one group: two grouped kernel launches (w1 and w3
of every expert, then w2 of every expert) that find each expert's weights from GPU buffer numbers
held in a device tensor. When every expert of the layer is resident, those numbers come from a
device-side table indexed by the router's output, so the layer makes no host sync at all and can
be captured in a CUDA graph (see ``decoder.py``). Otherwise the Decoder may capture the whole step
anyway, streamed: the layer then hands its routing to the host and waits on the GPU for the host to
load its misses (see ``streamed.py``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels
from .cache import ExpertCache
from .kernels import route_topk, weighted_sum
from .graphs import CapturedGraph
from .quant import QSpec


def linear(x: Tensor, w: Any, spec: QSpec | None) -> Tensor:
    """``x @ w.T`` for a float matrix or a quantized one (fused kernel when one applies)."""
    if spec is None:
        return F.linear(x, w.to(x.dtype) if w.dtype != x.dtype else w)
    return kernels.qlinear(x, w, spec)


def expert_forward(x: Tensor, weights: tuple[Any, Any, Any], specs: tuple[QSpec, QSpec, QSpec] | None,
                   act: Callable[[Tensor], Tensor]) -> Tensor:
    """SwiGLU expert on rows ``x`` [T, H] -> [T, H] (weights as ``ExpertFormat.views`` gives them);
    ``specs`` None means float weights."""
    s1, s3, s2 = specs if specs is not None else (None, None, None)
    h = act(linear(x, weights[0], s1)) * linear(x, weights[1], s3)
    return linear(h, weights[2], s2)


class OffloadedExperts(nn.Module):
    """Experts of one MoE layer, living in an :class:`ExpertCache` instead of module parameters."""

    def __init__(self, layer_idx: int, cache: ExpertCache, top_k: int, act_fn: Callable[[Tensor], Tensor],
                 prefetch: int = 0, cache_layer: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # in the model
        self.cache_layer = layer_idx if cache_layer is None else cache_layer  # in its (per-device) cache
        self.num_experts = cache.E
        self.top_k = top_k
        self.act_fn = act_fn
        self.prefetch = min(prefetch, cache.slots) if cache.slots < cache.E else 0  # all resident: nothing to fetch
        self._paused_calls = 0
        self._cache = (cache,)  # a tuple so nn.Module does not treat the shared cache as a child
        self._next_gate: tuple[Tensor, ...] = ()  # weight [E, H] of the next layer's router
        self.predicted: set[int] | None = None  # guess made by the previous layer, scored here
        self._staging: tuple[Tensor, Tensor, Any] | None = None  # pinned host, device, numpy view of host
        self._graphs: dict[tuple, Any] = {}
        self.graphs = True  # replay captured graphs for one-token expert groups (CUDA)
        self.recorder: Any = None  # trace.record_routing sets it to see each call's routing (off: None)
        self.stream: Any = None  # a streamed.ExpertStream while the Decoder captures a streamed step, else None

    @property
    def cache(self) -> ExpertCache:
        return self._cache[0]

    def set_next_router(self, weight: Tensor | None, next_module: "OffloadedExperts | None") -> None:
        """Enable speculative prefetch: apply the next layer's router to this layer's input.

        The router weight is copied to this layer's device when the next layer lives on another GPU.
        """
        if weight is not None and weight.device != self.cache.device:
            weight = weight.detach().to(self.cache.device)
        self._next_gate = () if weight is None else (weight,)
        self._next_module = (next_module,) if next_module is not None else ()

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, device={self.cache.device}, experts={self.num_experts}, "
                f"gpu_slots={self.cache.slots}, prefetch={self.prefetch}")

    def grouped(self, x: Tensor) -> bool:
        """Whether one token ``x`` can take the grouped-kernel path (quantized experts on a GPU)."""
        specs = self.cache.fmt.specs
        return x.shape[0] == 1 and specs is not None and all(kernels.can_fuse(x, s) for s in specs)

    def static(self) -> bool:
        """Whether a decode step through this layer makes no host sync (every expert resident,
        nothing to prefetch): the layer can then be captured in a CUDA graph."""
        return self.cache.slots == self.num_experts

    def run_group(self, x: Tensor, bufs: Tensor, weights: Tensor, cols: Tensor | None = None) -> Tensor:
        """``sum_i weights[cols[i]] * expert_i(x)`` (cols None: i) for one token x [1, H], experts at GPU
        buffers ``bufs`` (int32 [n], on the device): w1 and w3 of all n in one launch, w2 of all n in
        another; [1, H] in x's dtype."""
        cache = self.cache
        s1, s2 = cache.fmt.specs[0], cache.fmt.specs[2]
        n = bufs.numel()
        y13 = kernels.qgemv_grouped(x, cache.gpu_views[0][0], s1, bufs, cache.blob_bytes, 2,
                                    cache.fmt.w3_offset).view(n, 2, -1)
        h = self.act_fn(y13[:, 0]) * y13[:, 1]
        # w2 is short and wide ([H, I]): K may be split so enough programs run (fp32 partial sums [split, n, H])
        split = kernels.grouped_split(s2, h.device)
        y = kernels.qgemv_grouped(h, cache.gpu_views[0][2], s2, bufs, cache.blob_bytes,
                                  split=split).view(-1, n, s2.out_features)
        return weighted_sum(y, weights, cols, h.dtype)

    def streamable(self, x: Tensor) -> bool:
        """Whether one-token steps through this layer can run in a streamed whole-step graph
        (:mod:`.streamed`): the grouped kernels apply, and the layer has a GPU slot for each of its
        top-k experts, so a miss always finds a victim."""
        return (x.is_cuda and self.grouped(x) and kernels.HAVE_TRITON and not self.static()
                and min(self.cache.layer_slots) >= self.top_k)

    def _decode_streamed(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The graph's part of a streamed step: routing out to the host, wait for the experts' buffers
        (the host loads the misses meanwhile), then the grouped kernels on them."""
        self.stream.publish(self.cache_layer, top_k_index)
        bufs = self.stream.wait(self.cache_layer, top_k_index)
        return self.run_group(x, bufs, top_k_weights.view(-1))

    def count_static_step(self) -> None:
        """Count one token's expert uses on the all-resident path (every use is a hit). The Decoder
        calls it per graph replay, since a replay runs the kernels but not this Python."""
        self.cache.note_uses(self.top_k)

    def _decode_static(self, x: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        bufs = self.cache.slot_table()[self.cache_layer].index_select(0, top_k_index.view(-1))
        self.count_static_step()
        return self.run_group(x, bufs, top_k_weights.view(-1))

    def _run_groups(self, x: Tensor, order: list[int], bufs: dict[int, int], col: dict[int, int],
                    top_k_weights: Tensor, main: Any) -> Tensor:
        """Experts ``order`` in at most two groups: those already on the GPU, then those still arriving.

        Each group is one replay of a CUDA graph (captured per group position and size) that reads
        the group's buffer numbers and weight columns from a device row, filled from pinned memory.
        """
        cache, k = self.cache, self.top_k
        if self._staging is None:
            host = torch.zeros(cache.L, 2, 2 * k, dtype=torch.int32, pin_memory=True)
            self._staging = (host, torch.zeros(cache.L, 2, 2 * k, dtype=torch.int32, device=x.device), host.numpy())
        _, dev, host_np = self._staging
        arriving = [e for e in order if bufs[e] in cache.pending]
        groups = [g for g in ([e for e in order if bufs[e] not in cache.pending], arriving) if g]
        out: Tensor | None = None
        w = top_k_weights.view(-1)
        for gi, group in enumerate(groups):
            n = len(group)
            host_np[self.cache_layer, gi, :n] = [bufs[e] for e in group]
            host_np[self.cache_layer, gi, k:k + n] = [col[e] for e in group]
            # read by the GPU before this layer's next sync, one token later: safe to overwrite then
            dev[self.cache_layer, gi].copy_(self._staging[0][self.cache_layer, gi], non_blocking=True)
            for e in group:
                cache.use(bufs[e], x.dtype, main)
            y = self._group_graph(gi, n, x, w)(x, w)
            cache.release(*(bufs[e] for e in group), main=main)
            out = y if out is None else out + y
        assert out is not None
        return out

    def _group_graph(self, gi: int, n: int, x: Tensor, w: Tensor) -> Any:
        """The captured ``run_group`` for group ``gi`` of size ``n`` (eager when graphs are off)."""
        key = (gi, n, x.dtype, w.dtype)
        g = self._graphs.get(key)
        if g is None:
            row = self._staging[1][self.cache_layer, gi]
            k = self.top_k

            def fn(x: Tensor, w: Tensor) -> Tensor:
                return self.run_group(x, row[:n], w, row[k:k + n])
            g = fn
            if self.graphs:
                try:
                    g = CapturedGraph(fn, [torch.zeros_like(x), torch.zeros_like(w)], pool=self.cache.graph_pool)
                except RuntimeError as e:  # cannot capture here: launch the same kernels one by one
                    warnings.warn(f"CUDA graph capture failed ({e}); expert groups run without graphs",
                                  RuntimeWarning, stacklevel=2)
                    self.graphs = False
            self._graphs[key] = g
        return g

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        cache, layer, E = self.cache, self.cache_layer, self.num_experts
        decode = hidden_states.shape[0] == 1
        grouped = decode and self.grouped(hidden_states)
        if grouped and self.static():
            return self._decode_static(hidden_states, top_k_index, top_k_weights)
        if grouped and self.stream is not None:
            return self._decode_streamed(hidden_states, top_k_index, top_k_weights)
        if self.recorder is not None:  # a routing trace; the graph path above is not recorded
            self.recorder.record(self.layer_idx, top_k_index)
        flat = top_k_index.reshape(-1)
        # decode sends the k expert ids themselves; prefill sends per-expert token counts
        parts = [flat if decode else torch.bincount(flat, minlength=E)]
        guess = self.prefetch > 0 and bool(self._next_gate)
        if guess and not self._next_module[0].cache.prefetch_useful():
            # paused: still guess one call in 8, so the score that would resume prefetching stays current
            self._paused_calls += 1
            guess = self._paused_calls % 8 == 0
        if guess:
            gate = self._next_gate[0].to(hidden_states.dtype)
            if decode:  # one fused launch (router GEMV + top-k) instead of a matmul and a two-kernel top-k
                parts.append(route_topk(hidden_states, gate, min(self.prefetch, E))[1].reshape(-1))
            else:
                logits = F.linear(hidden_states, gate)
                parts.append(torch.bincount(torch.topk(logits, self.top_k, dim=-1).indices.reshape(-1), minlength=E))
        main = cache.s.compute()  # looked up once, before the sync: every cache call below needs it
        host = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()  # the one host sync of this layer
        cache.note_host_sync()
        n = self.top_k if decode else E
        if decode:
            slot_of = {e: j for j, e in enumerate(host[:n])}
            needed = sorted(slot_of)
        else:
            counts = host[:E]
            needed = [e for e in range(E) if counts[e] > 0]
        if self.predicted is not None:
            cache.note_prediction(self.predicted, set(needed))
            self.predicted = None

        # hits first: they compute while the misses' copies are in flight
        order = cache.hits_first(layer, needed)
        protect = set(needed)
        bufs: dict[int, int] = {}
        for e in order:
            b = cache.fetch(layer, e, protect, main=main)
            if b is None:
                break  # layer full of experts still needed: load the rest as these finish
            bufs[e] = b

        if guess:
            nxt = self._next_module[0]
            if decode:
                chosen = host[n:]
            else:
                pred = host[n:]
                chosen = sorted((e for e in range(E) if pred[e] > 0), key=lambda e: -pred[e])[: self.prefetch]
            if nxt.cache.prefetch_useful():
                for e in chosen:
                    nxt.cache.fetch(nxt.cache_layer, e, set(chosen), prefetch=True)
            nxt.predicted = set(chosen)

        if grouped and len(bufs) == len(order):
            return self._run_groups(hidden_states, order, bufs, slot_of, top_k_weights, main)
        out: Tensor | None = None
        if not decode:
            sort_idx = torch.argsort(flat, stable=True)
            weights = top_k_weights.reshape(-1)
            out = torch.zeros_like(hidden_states)
            offsets = [0] * E
            for e in range(1, E):
                offsets[e] = offsets[e - 1] + counts[e - 1]
        for e in order:
            b = bufs.get(e)
            if b is None:
                b = cache.fetch(layer, e, protect, main=main)
                assert b is not None, "an expert slot must be free once earlier experts are computed"
            w, specs = cache.use(b, hidden_states.dtype, main)
            if decode:  # one token: no sorting, gathering or scattering
                y = expert_forward(hidden_states, w, specs, self.act_fn)
                cache.release(b, main=main)
                j = slot_of[e]
                y = (y * top_k_weights[:, j:j + 1]).to(hidden_states.dtype)
                out = y if out is None else out + y
            else:
                pos = sort_idx[offsets[e]: offsets[e] + counts[e]]
                tok = pos // self.top_k
                y = expert_forward(hidden_states[tok], w, specs, self.act_fn)
                cache.release(b, main=main)
                out.index_add_(0, tok, (y * weights[pos, None]).to(out.dtype))
            protect.discard(e)
        assert out is not None
        return out
