"""Decoder: a MoE forward pass written out in plain PyTorch, with a static KV cache and CUDA graphs.

It runs the families whose layers have Mixtral's shape (a norm, rotary GQA attention, a router over
routed experts, or a dense MLP in a layer without experts): Mixtral, Qwen3-MoE (q/k RMSNorm per head,
``mlp_only_layers``), OLMoE (q/k RMSNorm over the whole projection, optional q/k/v clipping),
Qwen2-MoE (q/k/v biases, a sigmoid-gated shared expert beside the routed ones) and Phi-3.5-MoE
(LayerNorms, biases, sparsemixer routing). Mixtral's router (and any renormalised softmax top-k) is
one fused kernel; the other routers are the family's own module, called as transformers calls it.
DeepSeek-V2 (MLA) decodes through transformers' forward.

Why: one decode step of Mixtral-8x7B reads ~5 GB of weights (milliseconds on a GPU), while
transformers' forward spends ~2 ms of Python per layer on masks, cache objects and kwargs, and each
of the ~20 kernels per layer costs a launch. This file drives the same modules of a model made by
``build_model`` (norms, quantized projections, routers, offloaded experts) itself:

- K and V live in preallocated [kv_heads, max_len, head_dim] tensors per layer, written in place at
  the token's position, so no address changes from one step to the next;
- attention reads the cache up to a bucket (a multiple of ``bucket`` positions) and masks the rest;
- the router is one fused kernel on ``gate.weight`` (``kernels.route_topk``; ``Decoder.routing``
  replaces it, e.g. with the benchmark's random routing), and q, k and v share one quantization of
  their input;
- on CUDA a decode step replays CUDA graphs, captured once per bucket: one per device when every
  expert is resident (the grouped expert kernels look experts up on the GPU: no host sync at all),
  otherwise one per layer for attention + router, with the experts (one host sync per layer: which
  experts to load) run eagerly in between, and one per device and token for what the layers share
  (rotary rows, attention mask). With offloaded experts those graphs run while the copy engine
  waits for the next layer's routing, so every kernel they save is copy time gained;
- on one GPU with offloaded experts the step is by default one graph too, "streamed": each layer
  sends its routing to the host and waits on the GPU while the host loads its misses
  (``streamed.py``; ``DecoderConfig.stream_experts``), so no layer waits for the host to launch it.

Prefill (several tokens) runs eagerly through the same functions. Logits match transformers' own
forward (tests/test_decoder.py).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .build import on_release
from .families import FAMILIES
from .kernels import rms_norm, rope_and_cache, route_topk
from .graphs import CapturedGraph, GraphPool
from .streamed import ExpertStream, launches_wait


@dataclass
class DecoderConfig:
    """How much KV cache to allocate and whether to use CUDA graphs."""

    max_len: int = 4096  # positions in the KV cache (prompt + reply); K+V take 2*kv_heads*head_dim*2 B each per layer
    bucket: int = 256  # attention reads the cache in multiples of this many positions
    cuda_graphs: bool = True  # replay captured graphs for one-token steps (CUDA only)
    # offloaded experts on one GPU: the whole one-token step as one graph, the host serving its misses
    # while it replays (streamed.py); False: a graph per layer, and a host sync per layer
    stream_experts: bool = True


class Decoder:
    """Runs a ``build_model`` model token by token; see the module docstring. An :class:`~.engine.Engine`.

    ``forward(ids)`` appends ``ids`` [1, T] at position ``pos`` (= ``length``) and returns the logits
    [1, vocab] of the last one; ``truncate(n)`` forgets everything from position n on (chat
    regenerate), ``reset()`` starts a new sequence. ``pos`` only advances once a forward has finished,
    so an interrupted one leaves the sequence as it was (its writes past ``pos`` are overwritten later).
    """

    kind = "decoder"

    def __init__(self, model: Any, config: DecoderConfig | None = None) -> None:
        self.config = config = config or DecoderConfig()
        self.model = model
        c = model.config
        self.layers = list(model.model.layers)
        self.devs = [layer.input_layernorm.weight.device for layer in self.layers]
        self.dtype = model.model.embed_tokens.weight.dtype
        self.nh, self.nkv = c.num_attention_heads, c.num_key_value_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // self.nh
        self.window = getattr(c, "sliding_window", None)
        self.clip = getattr(c, "clip_qkv", None)  # OLMoE: q, k and v clamped to [-clip, clip]
        family = FAMILIES[getattr(model, "mixtral_nb_family", "mixtral")]
        self.router = family.router  # the MoE block's attribute holding the router
        # softmax, top-k, renormalised (Mixtral always, Qwen3 by config): one fused kernel; any other router
        # (OLMoE's and Qwen2-MoE's probabilities as they are, Phi-3.5's sparsemixer) is the family's own module
        self.fused_router = family.model_type == "mixtral" or getattr(c, "norm_topk_prob", False) is True
        n = config.max_len
        rope = getattr(c, "rope_parameters", None) or {}
        short = rope.get("original_max_position_embeddings") if rope.get("rope_type", "default") != "default" else None
        if short and n > short:  # e.g. Phi-3.5's longrope: its scale switches past this length, per sequence
            raise ValueError(f"DecoderConfig.max_len={n} is over this model's {short}-position rotary range "
                             f"({rope.get('rope_type')}): use max_len <= {short}, or engine='transformers'")
        self.k = [torch.zeros(self.nkv, n, self.hd, dtype=self.dtype, device=d) for d in self.devs]
        self.v = [torch.zeros_like(t) for t in self.k]
        first = self.devs[0]
        x = torch.zeros(1, dtype=self.dtype, device=first)
        cos, sin = model.model.rotary_emb(x, torch.arange(n, device=first)[None])
        self.rope: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.arange: dict[torch.device, Tensor] = {}
        self.pos_t: dict[torch.device, Tensor] = {}  # the decode position, a graph input
        half = self.hd // 2
        sign = torch.cat([-torch.ones(half), torch.ones(self.hd - half)]).to(first, sin.dtype)
        for d in dict.fromkeys(self.devs):
            # sin carries rotate_half's signs: rotate_half(q) * sin == roll(q, hd/2) * (sign * sin), exactly
            self.rope[d] = (cos[0].to(d, self.dtype), (sin[0] * sign).to(d, self.dtype))
            self.arange[d] = torch.arange(n, device=d)
            self.pos_t[d] = torch.zeros(1, dtype=torch.long, device=d)
        self.pos = 0
        # (layer index, normed hidden [T, H]) -> (top-k weights [T, k], expert ids [T, k]); None: the router
        self.routing: Any = None
        self._graphs: dict[int, list[Any]] = {}  # bucket length -> stages
        self._pool = GraphPool()
        # each layer's routed experts (None: a dense MLP layer)
        self.experts = [getattr(layer.mlp, "experts", None) for layer in self.layers]
        self.use_graphs = config.cuda_graphs and first.type == "cuda"
        probe = torch.zeros(1, c.hidden_size, dtype=self.dtype, device=first)
        self.static = self.use_graphs and all(
            hasattr(e, "static") and e.static() and e.grouped(probe.to(d))
            for e, d in zip(self.experts, self.devs) if e is not None)
        self._moe = [e for e in self.experts if e is not None]
        self.stream: ExpertStream | None = None
        if (self.use_graphs and not self.static and config.stream_experts and not launches_wait()
                and len(set(self.devs)) == 1
                and self._moe and len({id(e.cache) for e in self._moe}) == 1
                and all(e.streamable(probe) for e in self._moe)):
            self.stream = ExpertStream(self._moe[0].cache, self._moe[0].top_k)
        on_release(model, self.release)  # a re-run notebook cell frees this KV cache and these graphs too

    @property
    def one_graph(self) -> bool:
        """Whether a one-token step is one CUDA graph (every expert resident, or streamed experts)."""
        return self.static or self.stream is not None

    def release(self) -> None:
        """Free the KV cache and the captured graphs (the model was released; this Decoder is done)."""
        self.k, self.v = [], []
        self._graphs, self._pool = {}, GraphPool()
        if self.stream is not None:
            self.stream.release()
            self.stream = None
        self.rope, self.arange, self.pos_t = {}, {}, {}
        self.pos = 0

    def drop_graphs(self) -> None:
        """Forget the captured graphs; the next one-token step captures them again. A graph replays the
        kernels its capture recorded, so hooks added to the modules afterwards (the benchmark's T4
        emulation pads expert calls from hooks) take effect in graphs only once they are recaptured."""
        self._graphs, self._pool = {}, GraphPool()

    # ------------------------------------------------------------------ sequence state

    def reset(self) -> None:
        """Start a new sequence (the cache is overwritten as positions are reused)."""
        self.pos = 0

    def truncate(self, n: int) -> None:
        """Keep positions [0, n): the next token goes to position n."""
        if not 0 <= n <= self.pos:
            raise ValueError(f"truncate({n}): the sequence has {self.pos} positions")
        self.pos = n

    @property
    def length(self) -> int:
        """Positions held."""
        return self.pos

    @property
    def max_length(self) -> int:
        """Positions the static KV cache holds."""
        return self.config.max_len

    @property
    def device(self) -> torch.device:
        """Where input ids go (the first layer's device)."""
        return self.devs[0]

    def _bucket(self, length: int) -> int:
        b = self.config.bucket
        return min(self.config.max_len, -(-length // b) * b)

    # ------------------------------------------------------------------ the math

    def step_inputs(self, dev: torch.device, positions: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What every layer on ``dev`` shares in one forward: positions, their rotary cos and (signed)
        sin [T, hd], and the additive attention mask [g*T, length] (0 = may attend, -inf = not), computed
        once (SDPA would turn a boolean mask into this in every layer)."""
        cos_t, sin_t = self.rope[dev]
        keys = self.arange[dev][:length]
        allowed = keys[None, :] <= positions[:, None]  # [T, length]: causal, and nothing past the sequence
        if self.window:
            allowed = allowed & (keys[None, :] > positions[:, None] - self.window)
        g = self.nh // self.nkv
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        return positions, cos_t.index_select(0, positions), sin_t.index_select(0, positions), mask.repeat(g, 1)

    def attention(self, i: int, x: Tensor, step: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        """Layer i's attention block on x [T, H] (``step`` from ``step_inputs``): returns x + attn(norm(x))."""
        positions, cos, sin, mask = step
        layer = self.layers[i]
        a = layer.self_attn
        T = x.shape[0]
        h = self._norm(layer.input_layernorm, x)
        projs = (a.q_proj, a.k_proj, a.v_proj)
        xq = kernels.shared_x(h, [getattr(p, "spec", None) for p in projs])  # one quantize_x for the three
        q, k, v = (p(h) if xq is None else p(h, xq) for p in projs)
        if getattr(a, "q_norm", None) is not None:  # Qwen3-MoE, OLMoE: RMSNorm of q and k before rotary
            q, k = self._qk_norm(a.q_norm, q), self._qk_norm(a.k_norm, k)
        if self.clip is not None:  # after the norms, as OLMoE does
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        # q rotated to [heads, T, hd]; k rotated and v written into the cache at `positions`
        q = rope_and_cache(q, k, v, cos, sin, self.k[i], self.v[i], positions)
        length = mask.shape[-1]
        K, V = self.k[i][:, :length], self.v[i][:, :length]
        # query heads j*g .. j*g+g-1 share K/V head j: fold them into the query axis of head j, so
        # one plain SDPA call (fp32 softmax inside; memory-efficient kernel on GPUs) serves any T
        g = self.nh // self.nkv
        o = F.scaled_dot_product_attention(q.reshape(self.nkv, g * T, self.hd)[None], K[None], V[None],
                                           attn_mask=mask, scale=self.hd ** -0.5)[0]
        # reshape, not view: some SDPA kernels (fp32 on a GPU) return o with strides a view cannot fold
        o = o.reshape(self.nh, T, self.hd).transpose(0, 1).reshape(T, self.nh * self.hd)
        return x + a.o_proj(o)

    def _qk_norm(self, norm: Any, t: Tensor) -> Tensor:
        """RMSNorm of a projection [T, heads*hd]: per head when the norm's weight is one head wide
        (Qwen3-MoE), else over the whole row (OLMoE)."""
        w = norm.weight
        if w.numel() == self.hd and t.shape[-1] != self.hd:
            return rms_norm(t.reshape(-1, self.hd), w, norm.variance_epsilon).view(t.shape)
        return rms_norm(t, w, norm.variance_epsilon)

    @staticmethod
    def _norm(norm: Any, x: Tensor) -> Tensor:
        """An RMSNorm module as one fused kernel; any other norm (Phi-3.5's LayerNorm) as its module."""
        if hasattr(norm, "variance_epsilon"):
            return rms_norm(x, norm.weight, norm.variance_epsilon)
        return norm(x)

    def post_norm(self, i: int, x: Tensor) -> Tensor:
        """Layer i's post-attention norm."""
        return self._norm(self.layers[i].post_attention_layernorm, x)

    def route(self, i: int, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Layer i's post-attention norm and router: (normed x, top-k weights, top-k expert ids)."""
        layer = self.layers[i]
        h = self.post_norm(i, x)
        if self.routing is not None:
            weights, idx = self.routing(i, h)
        else:
            gate = getattr(layer.mlp, self.router)
            if self.fused_router:
                w = gate.weight.to(h.dtype)
                if w.shape[0] > 32:  # many experts (Qwen3: 128): logits by cuBLAS, not in one program's registers
                    weights, idx = route_topk(F.linear(h, w), None, gate.top_k)
                else:
                    weights, idx = route_topk(h, w, gate.top_k)
            else:
                _, weights, idx = gate(h)
        return h, weights, idx

    def shared(self, i: int, h: Tensor) -> Tensor | None:
        """Layer i's shared expert on the normed h, scaled by its sigmoid gate (Qwen2-MoE); None without one."""
        mlp = self.layers[i].mlp
        if getattr(mlp, "shared_expert", None) is None:
            return None
        return torch.sigmoid(mlp.shared_expert_gate(h)) * mlp.shared_expert(h)

    def layer(self, i: int, x: Tensor, step: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        """One decoder layer on x [T, H]."""
        x = self.attention(i, x, step)
        if self.experts[i] is None:  # a dense layer: its MLP (quantized projections) on the normed x
            return x + self.layers[i].mlp(self.post_norm(i, x))
        h, weights, idx = self.route(i, x)
        y = self.experts[i](h, idx, weights)
        s = self.shared(i, h)
        return x + (y if s is None else y + s)

    def head(self, x: Tensor) -> Tensor:
        """Final norm and lm_head on the last row: logits [1, vocab]."""
        m = self.model
        norm = m.model.norm
        x = self._norm(norm, x[-1:].to(norm.weight.device))
        return m.lm_head(x.to(m.lm_head.weight.device))

    # ------------------------------------------------------------------ running

    @torch.inference_mode()
    def forward(self, ids: Tensor) -> Tensor:
        """Append ``ids`` [1, T] (or [T]) at position ``pos``; logits [1, vocab] of the last token."""
        ids = ids.reshape(-1)
        T = ids.numel()
        if self.pos + T > self.config.max_len:
            raise ValueError(f"the sequence would reach {self.pos + T} positions, over DecoderConfig.max_len="
                             f"{self.config.max_len}: build the Decoder with a larger max_len or start a new sequence")
        length = self._bucket(self.pos + T)
        logits = self._step_graphed(ids, length) if T == 1 and self.use_graphs else self._eager(ids, length)
        self.pos += T
        return logits

    def _eager(self, ids: Tensor, length: int) -> Tensor:
        T = ids.numel()
        x = self.model.model.embed_tokens(ids.to(self.devs[0]))
        steps: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        for i, dev in enumerate(self.devs):
            x = x.to(dev)
            if dev not in steps:
                steps[dev] = self.step_inputs(dev, self.arange[dev][self.pos:self.pos + T], length)
            x = self.layer(i, x, steps[dev])
        return self.head(x)

    def _step_graphed(self, ids: Tensor, length: int) -> Tensor:
        for d, t in self.pos_t.items():
            t.fill_(self.pos)
        stages = self._graphs.get(length)
        if stages is None:
            try:
                stages = self._graphs[length] = self._capture(length)
            except Exception as e:
                if self.stream is not None:  # e.g. a Triton that cannot build the wait: a graph per layer instead
                    warnings.warn(f"streamed decode steps failed to capture ({e}); the Decoder uses a graph per "
                                  "layer and a host sync per layer", RuntimeWarning, stacklevel=3)
                    self.drop_graphs()
                    self.stream.release()
                    self.stream = None
                    return self._step_graphed(ids, length)
                if not isinstance(e, RuntimeError):
                    raise
                # a driver or library that cannot capture: same math, launched one by one
                warnings.warn(f"CUDA graph capture failed ({e}); the Decoder runs without graphs", RuntimeWarning,
                              stacklevel=3)
                self.use_graphs = self.static = False
                return self._eager(ids, length)
        if self.stream is not None:
            return self._step_streamed(ids, stages)
        x = self.model.model.embed_tokens(ids.to(self.devs[0]))
        for si, (kind, first, last, g) in enumerate(stages):
            if kind == "prep":  # rotary rows and mask of this token, shared by the device's layers
                g(self.pos_t[self.devs[first]])
                continue
            x = x.to(self.devs[first])
            if kind == "layers":  # every expert resident (or a dense layer): the whole range is one graph
                x = g(x)
                for e in self.experts[first:last]:
                    if e is not None:
                        e.count_static_step()
            else:  # attention + router replayed, experts eager (they decide which copies to start)
                x_mid, h, weights, idx = g(x)
                y = self.experts[first](h, idx, weights)
                # the residual sum lands in the next graph's input buffer: no copy at its replay
                nxt = stages[si + 1] if si + 1 < len(stages) else None
                if nxt is not None and nxt[0] == "attention" and self.devs[nxt[1]] == self.devs[first]:
                    x = torch.add(x_mid, y, out=nxt[3].inputs[0])
                else:
                    x = x_mid + y
        return self.head(x)

    def _step_streamed(self, ids: Tensor, stages: list[tuple[str, int, int, CapturedGraph]]) -> Tensor:
        """One streamed step: replay the whole-step graph and the head, then serve every MoE layer's
        misses as its routing arrives; an interrupted serve ends the step on the GPU and raises."""
        stream = self.stream
        assert stream is not None and len(stages) == 1
        main = torch.cuda.current_stream(self.devs[0])
        seq = stream.begin(main)
        try:
            logits = self.head(stages[0][3](self.model.model.embed_tokens(ids.to(self.devs[0]))))
            for e in self._moe:
                stream.serve(e, seq, main)
        except BaseException:
            stream.abort(main)  # interrupted in turn: the next begin() aborts again
            raise
        stream.end()
        return logits

    def _capture(self, length: int) -> list[tuple[str, int, int, CapturedGraph]]:
        """The graphs of one decode step for cache length ``length``; their warm-up runs are not uses.
        A streamed step's capture runs with the abort flag up, so its eager warm-up runs (which no
        host serves) do not wait for experts."""
        with contextlib.ExitStack() as stack:
            for cache in {id(e.cache): e.cache for e in self.experts if e is not None}.values():
                stack.enter_context(cache.uncounted())
            if self.stream is not None:
                stack.enter_context(self._streaming())
            return self._capture_stages(length)

    @contextlib.contextmanager
    def _streaming(self) -> Any:
        stream = self.stream
        assert stream is not None
        stream.flags.fill_(1)
        for e in self._moe:
            e.stream = stream
        try:
            yield
        finally:
            for e in self._moe:
                e.stream = None
            stream.flags.zero_()

    def _capture_stages(self, length: int) -> list[tuple[str, int, int, CapturedGraph]]:
        H = self.model.config.hidden_size
        stages: list[tuple[str, int, int, CapturedGraph]] = []

        preps: dict[torch.device, CapturedGraph] = {}
        i = 0
        while i < len(self.layers):
            dev = self.devs[i]
            x = torch.zeros(1, H, dtype=self.dtype, device=dev)
            pos = self.pos_t[dev]
            if self.one_graph or self.experts[i] is None:  # a dense layer makes no host sync either
                j = i + 1
                while self.one_graph and j < len(self.layers) and self.devs[j] == dev:
                    j += 1

                def run(x: Tensor, first: int = i, last: int = j, dev: torch.device = dev, pos: Tensor = pos) -> Tensor:
                    step = self.step_inputs(dev, pos, length)
                    for k in range(first, last):
                        x = self.layer(k, x, step)
                    return x
                stages.append(("layers", i, j, CapturedGraph(run, [x], self._pool)))
            else:
                j = i + 1
                if dev not in preps:
                    preps[dev] = CapturedGraph(lambda p, dev=dev: self.step_inputs(dev, p, length), [pos], self._pool)
                    stages.append(("prep", i, i, preps[dev]))

                def attn_route(x: Tensor, k: int = i, step: tuple[Tensor, ...] = preps[dev].out) -> tuple[Tensor, ...]:
                    x = self.attention(k, x, step)
                    h, weights, idx = self.route(k, x)
                    s = self.shared(k, h)  # a shared expert needs no routing: it runs inside the graph
                    return (x if s is None else x + s, h, weights, idx)
                stages.append(("attention", i, j, CapturedGraph(attn_route, [x], self._pool)))
            i = j
        return stages

