"""``python -m mixtral_nb bench``: decode/prefill speed of a synthetic full-size Mixtral-8x7B.

Why synthetic: speed depends on shapes, bytes and routing, not on weight values, so random codes in
our quantized layout (meta fields set so activations stay finite) measure the engine with no
87 GB download or quantization. The model is built on the GPU under a T4-like budget: at most
``--vram-gib`` of device memory (``torch.cuda.set_per_process_memory_fraction``), pinned host
blobs capped by ``--pinned-gib`` (host_mirror only when every expert fits), fp16, the article's
quantization (2-bit g16 experts, 4-bit g64 attention).

Modes: default (our engine), ``--baseline`` (the article's algorithm in the same harness: per-layer
LRU, copies on the compute stream, write-back on every miss, no prefetch, one spare buffer),
``--compare`` (both, one process, with the speed ratio), ``--resident`` (every expert on the GPU, no
VRAM cap), ``--routing iid`` (router outputs replaced by top-2 of random logits, so hit rates do not
depend on the random weights), ``--tiny`` (a small model on CPU, so CI covers the harness).
Our engine runs the layers with :mod:`.decoder` (static KV cache, CUDA graphs) unless ``--engine
transformers``; the baseline always goes through transformers' forward, as the article's code does.

T4 projection, per decoded token (printed with its inputs)::

    t4_s = h2d_bytes / 9.7e9 + gpu_read_bytes / 240e9 + overhead_s
    overhead_s = max(0, measured_s - h2d_bytes / measured_h2d_Bps - gpu_read_bytes / measured_hbm_Bps)

h2d_bytes: expert bytes copied host->GPU per token; gpu_read_bytes: weights (trunk, quantized
attention, the experts used), KV cache and lm_head read from GPU memory per token; 9.7 GB/s and
240 GB/s are a Colab T4's pinned-copy and memory bandwidths, as measured on a T4. It assumes no
overlap of copies with compute (pessimistic) and carries over this machine's CPU/launch overhead
unchanged (optimistic if the host CPU is slower, as Colab's is).

``--model NAME`` (a name in :data:`mixtral_nb.known_models.KNOWN_MODELS`; default mixtral-8x7b) builds
another model's exact shapes the same way (Qwen3-30B-A3B, Phi-3.5-MoE, ...): every tensor of the
family's transformers model, the resident projections quantized, run by the Decoder where the family
has Mixtral's layer shape (all but DeepSeek-V2) and by transformers' forward otherwise; ``--tiny``
then gives the family's toy widths with the full model's experts and top-k. ``--plan`` plans for that model.

``--plan NAME`` runs the planner's plan for a machine in ``planner.PRESETS`` (e.g. ``colab-t4``:
per-layer GPU slots, spare host blobs, the VRAM cap of that machine counting the CUDA context).
``--emulate t4`` measures a second time, on the same model, with a T4's limits imposed instead of
projected: every expert copy is followed on its own stream by a GPU-side spin
(``torch.cuda._sleep``, calibrated against the GPU clock) so the stream stays busy as long as the
copy would take at 9.7 GB/s, and each layer's GPU work is padded the same way to what its bytes
take at 240 GB/s (attention before the layer's host sync, the experts after them, lm_head last);
the VRAM cap (15,095 MiB) then counts the CUDA context. Copies still overlap compute exactly as
they would on the T4. ``--copy-only`` measures expert-sized copies, plain and throttled, both
directions (the throttle should read 9.7 GB/s). Every run also reports the time to first token
for a ``--ttft-prompt``-token prompt and D2H/H2D bytes per token.

``--layout article`` groups the synthetic codes along axis 0, as the article's pre-quantized files (and
their converted copy, which the Colab notebook loads) do; the default is the layout ``quantize`` writes.
The two decode through different kernels.

``decode_tok_s`` keeps each token on the GPU (the next step is queued before the host sees it). A chat
cannot: it reads every token to detokenize it and to stop. ``--chat`` measures decode that way too, plus
with the notebook's resource monitor or the rehearsal's memory watch sampling in a thread, and through
``ChatSession`` itself (``chat_*`` figures), so the benchmark's speed and a chat's can be told apart.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import json
import math
import pstats
import statistics
import sys
import time
from typing import Any, Iterator

import torch
from torch import Tensor

from . import kernels, planner
from .build import build_model
from .config import OffloadConfig, QuantConfig, article_quant_config
from .engine import make_engine
from .expert import ExpertFormat
from .families import FAMILIES, decoder_refusal, kv_bytes_per_token, skeleton
from .generate import generate_tokens
from .hostmem import HostBuffer
from .kernels import route_topk
from .quant import QSpec
from .known_models import KNOWN_MODELS, known_config, model_config
from .tiny import tiny_config, tiny_family_config
from .units import GiB as GIB

T4_H2D_BPS = 9.7e9  # a Colab T4's pinned copy bandwidth, both directions
T4_HBM_BPS = 240e9  # its memory bandwidth
T4_VRAM_BYTES = planner.PRESETS["colab-t4"].vram_bytes  # what a T4 offers, CUDA context included
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MIXTRAL_VOCAB = 32000


def mixtral_8x7b_config() -> dict[str, Any]:
    """Mixtral-8x7B's architecture (its published config.json), as a MixtralConfig dict."""
    return {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
            "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "router_jitter_noise": 0.0}


def tiny_bench_config(hidden: int = 64) -> dict[str, Any]:
    """A Mixtral small enough for CI on a CPU, with the real model's structure (``hidden`` 128 gives
    k/v projections of 64 rows, which the article's axis-0 group of 64 needs)."""
    cfg = tiny_config(layers=4, experts=8, hidden=hidden, intermediate=128, heads=4, kv_heads=2, vocab=512)
    for k in ("architectures", "model_type", "torch_dtype", "dtype"):
        cfg.pop(k, None)
    return cfg


def bench_config(model: str, tiny: bool) -> dict[str, Any]:
    """The config dict ``--model``/``--tiny`` benchmark: Mixtral-8x7B's (the default, as it always was), another
    known model's full-size config, or (``tiny``) the family's toy sizes with the full model's expert count and
    top-k, so routing, the plan's per-layer slots and the cache behave like the full model's on a CPU. Toy widths
    that the article's 4-bit g64 attention cannot group (dense MLPs, MLA's kv rank, DeepSeek's shared experts) are
    raised to 128 / 64 / the full model's two experts."""
    if model == "mixtral-8x7b":
        return tiny_bench_config() if tiny else mixtral_8x7b_config()
    full = known_config(model)
    if not tiny:
        return full
    fam = FAMILIES[full["model_type"]]
    config = model_config(full)
    cfg = tiny_family_config(fam.model_type, **{fam.experts_key: skeleton(config).num_experts,
                                                "num_experts_per_tok": skeleton(config).top_k})
    if fam.inter_key != "intermediate_size":
        cfg["intermediate_size"] = 128
    if "kv_lora_rank" in cfg:
        cfg.update(kv_lora_rank=64, n_shared_experts=full["n_shared_experts"])  # shared experts 2 x 32 wide
    cfg.pop("architectures", None)
    return cfg


def _skeleton_of(cfg: dict[str, Any]) -> Any:
    return skeleton(model_config({"model_type": "mixtral", **cfg}))


# ---------------------------------------------------------------------------------------------
# synthetic checkpoint


def fill_quantized(views: dict[str, Tensor], spec: QSpec, gen: torch.Generator) -> None:
    """Random codes plus meta values chosen so that W has std ~ 1/sqrt(in_features).

    Steps land in [0.5, 1.5] x the target step and zero points within +-0.5 of the code range's
    middle, so outputs of every layer stay O(1) however many layers are stacked.
    """
    levels = 1 << spec.nbits
    step = spec.in_features ** -0.5 / math.sqrt((levels * levels - 1) / 12.0)
    mid = (levels - 1) / 2.0
    for name, v in views.items():
        if v.dtype == torch.uint8:
            v.copy_(torch.randint(0, 256, v.shape, dtype=torch.uint8, device=v.device, generator=gen))
    if spec.quant_scale:
        views["scale_ms"].fill_(step / 255.0)
        views["scale_mz"].fill_(-127.5)  # s = (code + 127.5) * step / 255 in [0.5, 1.5] * step
    else:
        views["scale"].copy_((0.5 + torch.rand(views["scale"].shape, device=views["scale"].device,
                                               generator=gen)) * step)
    if spec.quant_zero:
        views["zero_ms"].fill_(1.0 / 255.0)
        views["zero_mz"].fill_(-(mid - 0.5) * 255.0)  # z = mid - 0.5 + code / 255
    else:
        views["zero"].copy_(mid - 0.5 + torch.rand(views["zero"].shape, device=views["zero"].device, generator=gen))


class SyntheticCheckpoint:
    """Random weights in the project layout, generated on ``device``; ProjectCheckpoint's interface.

    ``build_model`` accepts it in place of a folder. Every tensor is made on demand and only once
    (the expert blobs are consumed as the ExpertCache is filled), so nothing is held twice.
    """

    kind = "project"

    def __init__(self, config_dict: dict[str, Any], quant: QuantConfig, device: torch.device | str,
                 dtype: torch.dtype = torch.float16, seed: int = 0, router_scale: float = 4.0) -> None:
        if quant.ffn is None:
            raise ValueError("SyntheticCheckpoint makes quantized experts: give a QuantConfig with an ffn config")
        family = FAMILIES[config_dict.get("model_type", "mixtral")]  # a dict without one is Mixtral's
        self.config = family.make_config({k: v for k, v in config_dict.items() if k != "model_type"})
        self.quant = quant
        self.device = torch.device(device)
        self.dtype = dtype
        self.router_scale = router_scale
        self.skeleton = sk = skeleton(self.config)
        self.fmt = ExpertFormat.make(sk.hidden, sk.intermediate, quant.ffn, dtype)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        # the resident projections build_model quantizes (Mixtral: attention; other families: every *_proj)
        self._quantized = sk.attn_linears(family) if quant.attn is not None else {}
        self.attn_specs: dict[str, dict[str, Any]] = {base: QSpec.make(shape, quant.attn).to_json()
                                                      for base, shape in self._quantized.items()}

    def _randn(self, *shape: int, scale: float) -> Tensor:
        t = torch.randn(*shape, device=self.device, dtype=torch.float32, generator=self.gen)
        return (t * scale).to(self.dtype)

    def _plain(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A floating-point trunk tensor: 1-D ones (norms, scales) or zeros (biases); matrices random with
        std 1/sqrt(in_features), embeddings std 1, routers scaled up so that routing varies."""
        if len(shape) == 1:
            fill = torch.ones if name.endswith("norm.weight") or name.endswith("layernorm.weight") else torch.zeros
            return fill(shape, device=self.device, dtype=self.dtype)
        H = shape[-1]
        if name == "model.embed_tokens.weight":
            return self._randn(*shape, scale=1.0)
        if name.rpartition(".")[0].rpartition(".")[2] in ("gate", "router") and ".mlp." in name:
            return self._randn(*shape, scale=self.router_scale * H ** -0.5)
        return self._randn(*shape, scale=H ** -0.5)

    def trunk(self) -> Iterator[tuple[str, Tensor]]:
        """Every trunk tensor of the family's model (the skeleton's shapes): the globals first, then per layer
        its small tensors and routers, then its projections, quantized in the stored layout where build_model
        expects them (for Mixtral the same random draws, in the same order, as this class always made)."""
        sk = self.skeleton
        shapes = dict(sk.shapes)
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            if name in shapes and not (name == "lm_head.weight" and sk.tied):
                yield name, self._plain(name, shapes[name])
        layers: dict[int, list[str]] = {}
        for name in shapes:
            if name.startswith("model.layers."):
                layers.setdefault(int(name.split(".")[2]), []).append(name)
        rest = [n for n in shapes if not n.startswith("model.layers.") and n not in
                ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")]
        for i in sorted(layers):
            names = layers[i]
            for name in names:
                if name.rpartition(".")[0] not in sk.linears:
                    yield name, self._plain(name, shapes[name])
            for base in (b for b in sk.linears if b.startswith(f"model.layers.{i}.")):
                if base in self._quantized:
                    spec = QSpec(**self.attn_specs[base])
                    tensors = {s.name: torch.empty(s.shape, dtype=s.dtype, device=self.device)
                               for s in spec.layout().segments}
                    fill_quantized(tensors, spec, self.gen)
                    yield from ((f"{base}.{k}", v) for k, v in tensors.items())
                else:
                    yield f"{base}.weight", self._plain(f"{base}.weight", shapes[f"{base}.weight"])
                if f"{base}.bias" in shapes:
                    yield f"{base}.bias", self._plain(f"{base}.bias", shapes[f"{base}.bias"])
        for name in rest:  # e.g. a lm_head bias
            yield name, self._plain(name, shapes[name])

    def blob(self, layer: int, e: int) -> Tensor:
        """A fresh random expert blob (uint8, on the checkpoint's device)."""
        blob = torch.zeros(self.fmt.layout.total_bytes, dtype=torch.uint8, device=self.device)
        for views, spec in zip(self.fmt.views(blob), self.fmt.specs):  # type: ignore[arg-type]
            fill_quantized(views, spec, self.gen)
        return blob

    @property
    def expert_bytes(self) -> int:
        return self.fmt.layout.total_bytes


# ---------------------------------------------------------------------------------------------
# measurements


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, kind: str, mib: int = 256, reps: int = 5) -> float:
    """Bytes/s of a pinned host->device copy (``h2d``), device->host (``d2h``) or device->device copy
    (``d2d``, read+write).

    On CPU all are plain memory copies (``mib`` is capped at 64 there, to stay quick).
    """
    if device.type != "cuda":
        mib = min(mib, 64)
    n = mib << 20
    pin = device.type == "cuda" and kind in ("h2d", "d2h")
    src = torch.empty(n, dtype=torch.uint8, pin_memory=pin and kind == "h2d", device="cpu" if kind == "h2d" else device)
    src.fill_(7)
    dst = torch.empty(n, dtype=torch.uint8, pin_memory=pin and kind == "d2h", device="cpu" if kind == "d2h" else device)
    times = []
    for i in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=pin)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    moved = 2 * n if kind == "d2d" else n
    del src, dst
    return moved / statistics.median(times)


def gpu_read_bytes_per_token(model: Any, cache: Any, uses_per_token: float, context: float) -> float:
    """Bytes one decode step reads from GPU memory: trunk minus embeddings, experts used, KV cache."""
    c = model.config
    total = 0
    emb = model.model.embed_tokens.weight
    for p in model.parameters():
        if p is not emb:
            total += p.numel() * p.element_size()
    for b in model.buffers():
        total += b.numel() * b.element_size()
    total += emb.shape[1] * emb.element_size()
    total += uses_per_token * cache.layout.raw_bytes
    total += context * kv_bytes_per_token(c, emb.element_size())
    return float(total)


class IIDRouting:
    """Forward hooks that replace every router's choice with the top-k of random logits (k: the family's own).

    Every family's router returns (logits, top-k weights, top-k indices), so one hook serves them all.
    The numbers come from torch's default generators (seeded here): unlike a private Generator,
    those advance on every replay of a CUDA graph that captured the hook.
    """

    def __init__(self, model: Any, seed: int = 1234) -> None:
        torch.manual_seed(seed)
        family = FAMILIES[getattr(model, "mixtral_nb_family", "mixtral")]
        sk = skeleton(model.config)
        self.handles = [getattr(model.model.layers[i].mlp, family.router).register_forward_hook(self._hook)
                        for i in sk.moe_layers]
        self.E, self.k = sk.num_experts, sk.top_k

    def route(self, i: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """The same draw for the Decoder (``Decoder.routing``), which computes routing without the gate
        module: random logits, then the fused softmax/top-k (two launches instead of the router's eight
        plus this hook's eight)."""
        return route_topk(torch.randn(h.shape[0], self.E, device=h.device, dtype=torch.float32), None, self.k)

    def _hook(self, module: Any, inputs: Any, output: Any) -> tuple[Tensor, Tensor, Tensor]:
        logits, scores, _ = output  # MixtralTopKRouter returns (logits, top-k weights, top-k indices)
        r = torch.randn(logits.shape, device=logits.device, dtype=torch.float32)
        top = torch.topk(torch.softmax(r, dim=-1), self.k, dim=-1)
        weights = top.values / top.values.sum(dim=-1, keepdim=True)
        return r.to(logits.dtype), weights.to(scores.dtype), top.indices

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# T4 emulation


def spin_cycles_per_s(device: torch.device, cycles: int = 4_000_000, reps: int = 5) -> float:
    """Clock cycles per second of ``torch.cuda._sleep`` on ``device``: the median of timed spins."""
    times = []
    with torch.cuda.device(device):
        torch.cuda._sleep(cycles)  # warm-up (and lets the clock rise)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    return cycles_per_s(cycles, times)


def cycles_per_s(cycles: int, seconds: list[float]) -> float:
    """The calibration's arithmetic: ``cycles`` spun per run, over the median run time."""
    t = statistics.median(seconds)
    if not t > 0:
        raise ValueError(f"spin calibration measured {t} s for {cycles} cycles: the GPU timer did not advance")
    return cycles / t


@dataclasses.dataclass(frozen=True)
class Throttle:
    """How long to keep a stream busy after work this machine does faster than a T4 would.

    A copy of n bytes takes n / target on the T4 and n / measured here, so the spin after it lasts
    the difference; GPU work reading n bytes likewise, against the memory bandwidths. Never negative:
    a machine slower than the T4 is not sped up.
    """

    h2d_bps: float  # measured here
    d2h_bps: float
    hbm_bps: float
    spin_hz: float  # torch.cuda._sleep cycles per second
    target_copy_bps: float = T4_H2D_BPS
    target_hbm_bps: float = T4_HBM_BPS

    def copy_pad_s(self, kind: str, nbytes: float) -> float:
        measured = self.h2d_bps if kind == "h2d" else self.d2h_bps
        return max(0.0, nbytes / self.target_copy_bps - nbytes / measured)

    def gpu_pad_s(self, nbytes: float) -> float:
        return max(0.0, nbytes / self.target_hbm_bps - nbytes / self.hbm_bps)

    def cycles(self, seconds: float) -> int:
        return int(round(seconds * self.spin_hz))

    def spin(self, seconds: float) -> None:
        """Keep the current stream busy for ``seconds`` (CUDA only)."""
        n = self.cycles(seconds)
        if n > 0:
            torch.cuda._sleep(n)

    def pad_copy(self, kind: str, nbytes: int, stream: Any) -> None:
        """``ExpertCache.copy_pad``: called right after a copy is queued, with ``stream`` current."""
        self.spin(self.copy_pad_s(kind, nbytes))


def layer_read_bytes(model: Any, context: float) -> tuple[float, float, float]:
    """Bytes a one-token step reads per layer before the experts (attention weights, norms, router, KV
    cache at ``context`` positions), per expert used, and for the head (final norm + lm_head)."""
    c = model.config
    layers = model.model.layers
    per_layer = 0.0
    for layer in layers:
        for t in list(layer.parameters()) + list(layer.buffers()):
            per_layer += t.numel() * t.element_size()
    per_layer /= len(layers)
    emb = model.model.embed_tokens.weight
    per_layer += context * kv_bytes_per_token(c, emb.element_size()) / len(layers)
    head = sum(t.numel() * t.element_size() for t in model.lm_head.parameters())
    head += sum(t.numel() * t.element_size() for t in model.model.norm.parameters())
    expert = float(model.expert_cache.layout.raw_bytes)
    return per_layer, expert, float(head)


class T4Emulation:
    """The T4's limits on a running model: copy padding through ``ExpertCache.copy_pad`` and compute
    padding through forward hooks (on each layer's experts, and lm_head). ``remove()`` undoes both."""

    def __init__(self, model: Any, throttle: Throttle, context: float) -> None:
        self.throttle = throttle
        self.caches = [model.expert_cache] if not hasattr(model.expert_cache, "caches") else model.expert_cache.caches
        for c in self.caches:
            c.copy_pad = throttle.pad_copy
        attn, expert, head = layer_read_bytes(model, context)
        self.attn_s = throttle.gpu_pad_s(attn)
        self.expert_s = throttle.gpu_pad_s(expert)
        self.head_s = throttle.gpu_pad_s(head)
        self.handles = []
        for layer in model.model.layers:
            ex = getattr(layer.mlp, "experts", None)
            if ex is None:  # a dense layer (DeepSeek's first, Qwen's mlp_only_layers): no expert calls to pad
                continue
            self.handles.append(ex.register_forward_pre_hook(self._before_experts))
            self.handles.append(ex.register_forward_hook(self._after_experts))
        self.handles.append(model.lm_head.register_forward_hook(self._after_head))

    def _before_experts(self, module: Any, args: Any) -> None:
        # the attention and router of this layer ran just before: pad them before the layer's host sync
        self.throttle.spin(self.attn_s)

    def _after_experts(self, module: Any, args: Any, output: Any) -> None:
        index = args[1]
        used = min(module.num_experts, index.numel())  # one token: its k experts (prefill: at most all of them)
        self.throttle.spin(self.expert_s * used)

    def _after_head(self, module: Any, args: Any, output: Any) -> None:
        self.throttle.spin(self.head_s)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for c in self.caches:
            c.copy_pad = None


def copy_microbench(device: torch.device, nbytes: int, throttle: Throttle | None, copies: int = 24) -> dict[str, float]:
    """GB/s of ``copies`` back-to-back expert-sized copies per direction on a side stream, as the cache
    queues them (pinned host buffer, one blob each), with the throttle's spin after each when given."""
    host = HostBuffer(nbytes, True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device=device)
    out = {}
    try:
        for kind in ("h2d", "d2h"):
            dst, src = (gpu, host.data) if kind == "h2d" else (host.data, gpu)
            times = []
            for rep in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(stream):
                    start.record(stream)
                    for _ in range(copies):
                        dst.copy_(src, non_blocking=True)
                        if throttle is not None:
                            throttle.pad_copy(kind, nbytes, stream)
                    end.record(stream)
                end.synchronize()
                if rep:
                    times.append(start.elapsed_time(end) / 1000.0)
            out[kind] = copies * nbytes / statistics.median(times)
    finally:
        host.release()
    return out


# ---------------------------------------------------------------------------------------------
# one run


def _generate(engine: Any, prompt: Tensor, new_tokens: int, device: torch.device,
              between: Any = None) -> tuple[float, float, Tensor]:
    """Greedy run of :func:`~mixtral_nb.generate.generate_tokens` on a fresh sequence: timed prefill (which
    yields the first token), then ``new_tokens`` timed one-token steps. Tokens stay on the device: no
    host sync in the loop."""
    engine.reset()
    _sync(device)
    t0 = time.perf_counter()
    steps = generate_tokens(engine, prompt, new_tokens + 1)
    tokens = [next(steps)]
    _sync(device)
    t_prefill = time.perf_counter() - t0
    if between is not None:
        between()
    _sync(device)
    t0 = time.perf_counter()
    tokens.extend(steps)
    _sync(device)
    t_decode = time.perf_counter() - t0
    return t_prefill, t_decode, torch.cat(tokens).reshape(1, -1)


def _profile_decode(engine: Any, prompt: Tensor, device: torch.device, path: str) -> None:
    """Where a decode step's time goes: host (cProfile) and device (torch.profiler), 16 one-token steps
    each; both start after the prefill, so its kernels and copies do not mix with the steps'."""
    prof = cProfile.Profile()
    _generate(engine, prompt[:, :16], 16, device, between=prof.enable)
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(45)
    st.sort_stats("cumulative").print_stats(45)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    tp = torch.profiler.profile(activities=acts)
    _generate(engine, prompt[:, :16], 16, device, between=tp.start)
    tp.stop()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    buf.write(tp.key_averages().table(sort_by=sort, row_limit=40))
    tp.export_chrome_trace(path + ".trace.json")
    with open(path, "w") as f:
        f.write(buf.getvalue())


def run_one(args: argparse.Namespace, mode: str) -> dict[str, float]:
    """Build the synthetic model for ``mode`` (ours / baseline / resident), time it, return metrics."""
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # toy-sized ops: OpenMP start-up costs more than it saves (ms per index_add_)
    try:
        return _run_one(args, mode, device)
    finally:
        torch.set_num_threads(threads)


def cuda_context_bytes(device: torch.device) -> int:
    """Device memory this process holds outside torch's allocator (the CUDA context, cuBLAS, kernels)."""
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


def vram_cap_bytes(args: argparse.Namespace, mode: str, plan: Any) -> tuple[float | None, bool]:
    """(cap, counts the CUDA context) for this run: none for ``resident``; a T4's 15,095 MiB with the
    context counted under --emulate or a preset's VRAM with --plan; else --vram-gib for torch alone."""
    if mode == "resident":
        return None, False
    if plan is not None:
        return float(plan.vram_bytes), True
    if args.emulate == "t4":
        return float(T4_VRAM_BYTES), True
    return args.vram_gib * GIB, False


def bench_quant(layout: str) -> QuantConfig:
    """The article's mixed quantization with groups along K (``ours``: what ``quantize`` writes) or along
    the output rows (``article``: hqq 0.1.1's axis 0, what the article's pre-quantized files hold and
    what a converted copy of them keeps), so either layout's kernels can be measured."""
    q = article_quant_config()
    if layout == "ours":
        return q
    axis0 = {part: {**cfg, "weight_quant_params": {**cfg["weight_quant_params"], "axis": 0}}
             for part, cfg in (("ffn_config", q.ffn_config), ("attn_config", q.attn_config))}
    return QuantConfig(**axis0)


def bench_plan(args: argparse.Namespace, num_layers: int) -> Any:
    """The planner's plan for --plan (None without) for the full-size --model, on this model's MoE layer count."""
    if not args.plan:
        return None
    p = planner.preset(args.plan, model=getattr(args, "model", "mixtral-8x7b"))
    if num_layers != p.sizes.num_layers:  # --tiny: the same per-layer settings on fewer layers
        p = dataclasses.replace(p, sizes=dataclasses.replace(p.sizes, num_layers=num_layers))
    return p


def _decode_runs(args: argparse.Namespace, engine: Any, cache: Any, prompt: Tensor, device: torch.device,
                 vocab: int) -> tuple[list[float], list[float], dict[str, float], bool]:
    prefill_times, decode_times = [], []
    totals: dict[str, float] = {}
    finite = True
    for _ in range(args.repeat):
        t_p, t_d, toks = _generate(engine, prompt, args.new_tokens, device, between=cache.reset_stats)
        st = cache.stats(wait=True)
        st.update(pred_correct=cache.pred_correct, pred_total=cache.pred_total, actual_total=cache.actual_total)
        for k, v in st.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        prefill_times.append(t_p)
        decode_times.append(t_d)
        finite = finite and bool((toks >= 0).all() and (toks < vocab).all())
    return prefill_times, decode_times, totals, finite


def _ttft(engine: Any, prompt: Tensor, device: torch.device, reps: int = 2) -> float:
    """Seconds from a fresh sequence to the first token of ``prompt`` (the median after a warm-up run)."""
    times = []
    for i in range(reps + 1):
        engine.reset()
        _sync(device)
        t0 = time.perf_counter()
        next(generate_tokens(engine, prompt, 1))
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)



def _synced_decode(engine: Any, prompt: Tensor, new_tokens: int) -> float:
    """Decode tok/s when the host reads each token before the next step, as a chat must (to detokenize
    and to stop); :func:`_generate` keeps tokens on the device, which no interactive use can."""
    engine.reset()
    steps = generate_tokens(engine, prompt, new_tokens + 1)
    int(next(steps))  # the prefill's token
    t0 = time.perf_counter()
    for token in steps:
        int(token)  # the host waits for this step, as a chat's detokenizer does
    return new_tokens / (time.perf_counter() - t0)


def _chat_paths(args: argparse.Namespace, engine: Any, model: Any, prompt: Tensor, device: torch.device,
                routing: Any) -> dict[str, float]:
    """``--chat``: decode the ways a chat runs it, in this process (median of --repeat runs each):
    each token read by the host; the same with the notebook's resource monitor running (0.5 s) and with
    the rehearsal's memory watch (0.05 s); and (full-size Mixtral: its tokenizer's ids fit the model)
    through ChatSession itself (Mixtral, whose tokenizer ships offline; --tiny widens the toy vocabulary to
    its 32,000 ids), greedy replies of exactly --new-tokens, with and without the watch."""
    from .monitor import ResourceMonitor
    from .rehearse import MemoryWatch

    def median_of(run: Any, sampler: Any = None) -> float:
        """The median of --repeat runs, with ``sampler``'s thread running through them if given."""
        if sampler is not None:
            sampler.start()
        try:
            return statistics.median(run() for _ in range(args.repeat))
        finally:
            if sampler is not None:
                sampler.stop()

    def synced() -> float:
        return _synced_decode(engine, prompt, args.new_tokens)

    def watch() -> Any:
        return MemoryWatch(device, math.inf, None, interval=0.05)

    out = {"chat_synced_tok_s": median_of(synced),
           "chat_synced_monitor_tok_s": median_of(synced, ResourceMonitor(model, device, interval=0.5)),
           "chat_synced_watch_tok_s": median_of(synced, watch())}
    if args.model != "mixtral-8x7b":
        print("# chat: the ChatSession runs need the model's own tokenizer, shipped offline for Mixtral only")
        return out
    from .chat import ChatSession
    from .tokenizer import mixtral_tokenizer

    session = ChatSession(model, mixtral_tokenizer(), max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, engine=args.engine or "auto")
    chat_engine = session._ensure_engine()  # its own engine, sized to the chat's context budget
    if routing is not None and getattr(chat_engine, "kind", "") == "decoder":
        chat_engine.routing = routing.route
    session.send("Tell me about the history of Rome.")  # the first reply captures the graphs

    def reply() -> float:
        session.regenerate()  # the same prompt (cached), the same cache length: no new capture
        return float(session.last_stats["tok_s"])

    out["chat_session_tok_s"] = median_of(reply)
    out["chat_session_watch_tok_s"] = median_of(reply, watch())
    session.reset()
    return out


def _run_one(args: argparse.Namespace, mode: str, device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    devices = [torch.device(d) for d in args.devices.split(",")] if args.devices and device.type == "cuda" else [device]
    device = devices[0]
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    cfg = bench_config(args.model, args.tiny)
    if args.tiny and args.layout == "article" and args.model == "mixtral-8x7b":
        cfg = tiny_bench_config(hidden=128)
    if args.chat and args.tiny and args.model == "mixtral-8x7b":
        cfg["vocab_size"] = MIXTRAL_VOCAB  # ChatSession's tokenizer is Mixtral's own
    sk = _skeleton_of(cfg)
    L, E = len(sk.moe_layers), sk.num_experts  # the cache's layers: the MoE ones
    plan = bench_plan(args, L)
    cap, with_context = vram_cap_bytes(args, mode, plan)
    context_bytes = 0
    for dev in devices:
        if dev.type == "cuda":
            total = torch.cuda.get_device_properties(dev).total_memory
            torch.cuda.init()
            torch.empty(1, device=dev)  # the context exists before it is measured
            context_bytes = cuda_context_bytes(dev) if with_context else 0
            frac = 1.0 if cap is None else min(1.0, max(0.0, cap - context_bytes) / total)
            torch.cuda.set_per_process_memory_fraction(frac, dev)
            torch.cuda.reset_peak_memory_stats(dev)

    h2d_bps = copy_bandwidth(device, "h2d")
    d2h_bps = copy_bandwidth(device, "d2h")
    hbm_bps = copy_bandwidth(device, "d2d", mib=512)

    ck = SyntheticCheckpoint(cfg, bench_quant(args.layout), device, dtype, seed=args.seed)
    blob_bytes = ck.expert_bytes
    opl = 0 if mode == "resident" else args.offload_per_layer
    pinned_limit = args.pinned_gib * GIB
    if mode == "ours" and plan is not None:
        off = plan.offload_config()
        mirror = bool(off.host_mirror)
        pinned_limit = math.inf  # the plan sized its host buffers itself
    elif mode == "ours":
        mirror = L * E * blob_bytes <= args.pinned_gib * GIB
        # swap mode: spend the rest of the pinned budget on host copies of GPU-resident experts
        extra = 0 if mirror or opl == 0 else max(0, int(args.pinned_gib * GIB // blob_bytes) - (L * opl + 4))
        if args.extra_host_slots >= 0:
            extra = args.extra_host_slots
        off = OffloadConfig.for_model(L, E, offload_per_layer=opl, buffer_size=4, prefetch=args.prefetch, host_mirror=mirror,
                                      clean_window=args.clean_window)
        off = dataclasses.replace(off, extra_host_slots=min(extra, off.main_size))
    else:
        mirror = False
        if plan is not None and mode == "baseline":  # the article's code at the plan's offload_per_layer
            opl = plan.offload_per_layer
            pinned_limit = math.inf
        off = OffloadConfig.for_model(L, E, offload_per_layer=opl, buffer_size=1, prefetch=0, host_mirror=False)
    slots = off.slots_per_layer(L, E)
    host_need = (L * E if mirror else L * E - sum(slots) + off.buffer_size + off.extra_host_slots) * blob_bytes
    if device.type == "cuda" and host_need > pinned_limit:
        raise SystemExit(f"bench: {mode} needs {host_need / GIB:.1f} GiB of pinned host memory, over "
                         f"--pinned-gib {args.pinned_gib}: raise it or lower --offload-per-layer")

    t0 = time.perf_counter()
    with torch.inference_mode():
        model = build_model(devices if len(devices) > 1 else device, None, off, ck, dtype=dtype, host_mirror=mirror)
    build_s = time.perf_counter() - t0
    cache = model.expert_cache
    if mode == "baseline":  # the article's behaviour: expert copies queue behind the compute kernels
        cache.copy_on_compute_stream()
    del ck
    routing = IIDRouting(model, seed=args.seed + 1) if args.routing == "iid" else None

    specs = list(cache.fmt.specs or ())
    specs += [m.spec for m in model.modules() if hasattr(m, "spec") and isinstance(m.spec, QSpec)]
    kernels.warmup(specs, device, dtype)

    gen = torch.Generator().manual_seed(args.seed + 2)
    vocab = cfg["vocab_size"]
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen).to(device)
    long_prompt = torch.randint(0, vocab, (1, args.ttft_prompt), generator=gen).to(device)

    kind = "transformers" if mode == "baseline" else args.engine  # the article's code runs transformers' forward
    engine = make_engine(model, kind, max_length=max(args.prompt_len + args.new_tokens, args.ttft_prompt) + 1)
    if routing is not None and kind == "decoder":
        engine.routing = routing.route  # the Decoder computes routing without the gate module's hook
    with torch.inference_mode():
        # warm-up (allocator, launchers); the decoder's is the measured run itself, so it captures the
        # graphs of every cache length that run reaches
        if kind == "decoder":
            _generate(engine, prompt, args.new_tokens, device)
        else:
            _generate(engine, prompt, 4, device)
            _generate(engine, prompt[:, : min(8, args.prompt_len)], 4, device)
        if args.profile:
            _profile_decode(engine, prompt, device, args.profile)
        prefill_times, decode_times, totals, finite = _decode_runs(args, engine, cache, prompt, device, vocab)
        ttft = _ttft(engine, long_prompt, device)
        chat = _chat_paths(args, engine, model, prompt, device, routing) if args.chat and mode == "ours" else {}
        gc.collect()  # the chat's own engine (KV cache, graphs) goes before the emulated runs
        emulated: dict[str, float] = {}
        if args.emulate == "t4" and device.type == "cuda":
            rates = copy_microbench(device, cache.blob_bytes, None)  # expert-sized copies, as the cache makes them
            throttle = Throttle(rates["h2d"], rates["d2h"], hbm_bps, spin_cycles_per_s(device))
            emu = T4Emulation(model, throttle, args.prompt_len + args.new_tokens / 2)
            # a whole-step Decoder graph (every expert resident, or streamed experts) runs the expert calls the
            # emulation pads from hooks: it must be recaptured under the emulation to record them (per-layer
            # graphs hold none)
            regraph = engine.drop_graphs if getattr(engine, "one_graph", False) else None
            try:
                if regraph:  # recaptured by a warm-up run, as before the plain runs
                    regraph()
                    _generate(engine, prompt, args.new_tokens, device)
                e_pre, e_dec, e_tot, e_fin = _decode_runs(args, engine, cache, prompt, device, vocab)
                e_ttft = _ttft(engine, long_prompt, device, reps=1)
            finally:
                emu.remove()
                if regraph:
                    regraph()
            finite = finite and e_fin
            e_tok = args.new_tokens * args.repeat
            emulated = {
                "emulated_t4_tok_s": args.new_tokens / statistics.median(e_dec),
                "emulated_t4_prefill_tok_s": args.prompt_len / statistics.median(e_pre),
                "emulated_t4_ttft_s": e_ttft,
                "emulated_t4_hit_rate": e_tot["hits"] / max(1.0, e_tot["hits"] + e_tot["misses"]),
                "emulated_t4_h2d_bytes_per_token": e_tot["bytes_h2d"] / e_tok,
                "emulated_t4_d2h_bytes_per_token": e_tot["bytes_d2h"] / e_tok,
                "emulated_t4_h2d_busy_s_per_token": e_tot["h2d_s"] / e_tok,
                "emulated_t4_copy_wait_s_per_token": e_tot["wait_s"] / e_tok,
                # the same efficiency as the plain run's, against the T4's copy rate the throttle holds
                "emulated_t4_efficiency": _efficiency(args.new_tokens / statistics.median(e_dec),
                                                      e_tot["bytes_h2d"] / e_tok, T4_H2D_BPS),
                "spin_ghz": throttle.spin_hz / 1e9,
                "t4_pad_attention_ms_per_layer": emu.attn_s * 1e3,
                "t4_pad_expert_ms": emu.expert_s * 1e3,
                "t4_pad_h2d_ms_per_expert": throttle.copy_pad_s("h2d", cache.blob_bytes) * 1e3,
            }
        logits = model(input_ids=prompt[:, :4]).logits
        finite = finite and bool(torch.isfinite(logits).all())

    n_tok = args.new_tokens * args.repeat
    s_tok = statistics.median(decode_times) / args.new_tokens
    uses = (totals["hits"] + totals["misses"]) / n_tok
    h2d_tok = totals["bytes_h2d"] / n_tok
    d2h_tok = totals["bytes_d2h"] / n_tok
    gpu_read = gpu_read_bytes_per_token(model, cache, uses, args.prompt_len + args.new_tokens / 2)
    limit = h2d_bps / h2d_tok if h2d_tok else math.inf
    overhead = max(0.0, s_tok - h2d_tok / h2d_bps - gpu_read / hbm_bps)
    t4_s = h2d_tok / T4_H2D_BPS + gpu_read / T4_HBM_BPS + overhead
    decode_tok_s = 1.0 / s_tok
    prefill_s = statistics.median(prefill_times)
    m = {
        "decode_tok_s": decode_tok_s,
        "prefill_tok_s": args.prompt_len / prefill_s,
        "prefill_s": prefill_s,
        "ttft_s": ttft,
        "ttft_prompt_tokens": float(args.ttft_prompt),
        "h2d_bytes_per_token": h2d_tok,
        "d2h_bytes_per_token": d2h_tok,
        "d2h_per_h2d": d2h_tok / h2d_tok if h2d_tok else 0.0,
        "hit_rate": totals["hits"] / max(1.0, totals["hits"] + totals["misses"]),
        "expert_uses_per_token": uses,
        "prefetch_recall": totals["pred_correct"] / totals["actual_total"] if totals.get("actual_total") else 0.0,
        "prefetch_precision": totals["pred_correct"] / totals["pred_total"] if totals.get("pred_total") else 0.0,
        "prefetch_issued_per_token": totals["prefetch_issued"] / n_tok,
        "copy_wait_s_per_token": totals["wait_s"] / n_tok,
        "h2d_busy_s_per_token": totals["h2d_s"] / n_tok,
        "host_syncs_per_token": totals["host_syncs"] / n_tok,
        "peak_vram_gib": max(torch.cuda.max_memory_allocated(d) for d in devices) / GIB if device.type == "cuda" else 0.0,
        "vram_cap_gib": (cap or 0.0) / GIB if device.type == "cuda" else 0.0,
        "cuda_context_gib": context_bytes / GIB,
        "devices": float(len(devices)),
        "gpu_expert_slots": float(sum(slots)),
        "extra_host_slots": float(off.extra_host_slots),
        "pinned_host_gib": cache.host_bytes / GIB,
        "gpu_expert_slots_gib": cache.gpu_bytes / GIB,
        "h2d_gbps": h2d_bps / 1e9,
        "d2h_gbps": d2h_bps / 1e9,
        "hbm_copy_gbps": hbm_bps / 1e9,
        "transfer_limit_tok_s": limit,
        "efficiency": _efficiency(decode_tok_s, h2d_tok, h2d_bps),
        "gpu_read_bytes_per_token": gpu_read,
        "overhead_s_per_token": overhead,
        "t4_projected_tok_s": 1.0 / t4_s,
        **chat,
        **emulated,
        "host_mirror": float(mirror),
        "moe_layers": float(L),
        "top_k": float(sk.top_k),
        "build_s": build_s,
        "outputs_finite": float(finite),
    }
    if routing is not None:
        routing.remove()
    model.expert_cache = None
    del model, cache, engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return m


def _efficiency(tok_s: float, h2d_bytes_per_token: float, h2d_bps: float) -> float:
    """Decode speed over the copy-bound limit (the speed if the copy engine never idled); NaN without copies."""
    return tok_s * h2d_bytes_per_token / h2d_bps if h2d_bytes_per_token else math.nan


# ---------------------------------------------------------------------------------------------
# command line


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mixtral_nb bench", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--baseline", action="store_true", help="the article's algorithm in the same harness")
    g.add_argument("--compare", action="store_true", help="ours, then the baseline, in one process; prints the ratio")
    g.add_argument("--resident", action="store_true", help="every expert on the GPU, no VRAM cap")
    p.add_argument("--model", choices=list(KNOWN_MODELS), default="mixtral-8x7b",
                   help="whose exact shapes to build (random codes in the quantized layout)")
    p.add_argument("--engine", choices=("decoder", "transformers"), default=None,
                   help="what runs the layers: mixtral_nb's Decoder (static KV cache, CUDA graphs; every family "
                        "but DeepSeek-V2) or transformers' forward; none: the Decoder where it applies, else "
                        "transformers' forward; --baseline always uses transformers' forward, as the article's code "
                        "does")
    p.add_argument("--routing", choices=("model", "iid"), default="model",
                   help="iid: replace router outputs with the top-k (the model's own k) of random logits")
    p.add_argument("--tiny", action="store_true",
                   help="a small model of --model's family on CPU (CI): toy widths, the full model's experts and top-k")
    p.add_argument("--profile", default=None, metavar="PATH", help="write a host + device profile of 16 decode steps")
    p.add_argument("--devices", default=None, help="e.g. cuda:0,cuda:1: split layers over GPUs, each capped at --vram-gib")
    p.add_argument("--plan", choices=sorted(planner.PRESETS), default=None,
                   help="run the planner's plan for this machine (per-layer GPU slots, spare host blobs, its VRAM "
                        "counting the CUDA context) instead of --offload-per-layer/--vram-gib/--pinned-gib; "
                        "colab-t4 is what a free Colab runs")
    p.add_argument("--emulate", choices=("t4",), default=None,
                   help="also measure with a T4's limits imposed: copies throttled to 9.7 GB/s on their streams, "
                        "GPU work padded to 240 GB/s, VRAM capped at 15,095 MiB counting the CUDA context (CUDA only)")
    p.add_argument("--copy-only", action="store_true",
                   help="only the copy microbenchmark: expert-sized copies each way, plain and throttled to a T4's "
                        "rate (CUDA only)")
    p.add_argument("--layout", choices=("ours", "article"), default="ours",
                   help="how the synthetic weights group their codes: ours (along K, as mixtral_nb quantizes) or "
                        "article (hqq 0.1.1's axis 0, as the article's pre-quantized checkpoint, which the Colab "
                        "notebook loads, and its converted copy hold)")
    p.add_argument("--chat", action="store_true",
                   help="also measure decode as a chat runs it (each token read by the host; with the notebook's "
                        "monitor and the rehearsal's memory watch running; through ChatSession): chat_* figures")
    p.add_argument("--ttft-prompt", type=int, default=512, help="prompt tokens for the time-to-first-token figure")
    p.add_argument("--offload-per-layer", type=int, default=4, help="experts of each layer kept off the GPU")
    p.add_argument("--prefetch", type=int, default=2, help="next-layer experts to load early (0: no prefetch)")
    p.add_argument("--vram-gib", type=float, default=15.0, help="VRAM cap per GPU")
    p.add_argument("--pinned-gib", type=float, default=11.0, help="pinned host memory the expert cache may use")
    p.add_argument("--extra-host-slots", type=int, default=-1,
                   help="swap mode: host blobs beyond the minimum (-1: whatever --pinned-gib allows)")
    p.add_argument("--clean-window", type=int, default=OffloadConfig.__dataclass_fields__["clean_window"].default,
                   help="eviction may skip this many - 1 LRU experts for one with a host copy (1 = strict LRU)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (None: 128, or 16 with --tiny)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to decode (None: 128, or 16 with --tiny)")
    p.add_argument("--repeat", type=int, default=1, help="decode runs; the median is reported")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and the prompt")
    p.add_argument("--json", default=None, metavar="PATH", help="write every number to PATH")
    return p


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    if abs(v) >= 1e6:
        return f"{v:.4g}"
    return f"{v:.4f}"


def copy_main(args: argparse.Namespace) -> int:
    """``bench --copy-only``: the throttle alone, on expert-sized copies (prints ``copy.*`` lines)."""
    device = torch.device("cuda", torch.cuda.current_device())
    sk = _skeleton_of(bench_config(args.model, False))
    blob = ExpertFormat.make(sk.hidden, sk.intermediate, article_quant_config().ffn, torch.float16).layout.total_bytes
    plain = copy_microbench(device, blob, None)
    throttle = Throttle(plain["h2d"], plain["d2h"], copy_bandwidth(device, "d2d", mib=512), spin_cycles_per_s(device))
    slow = copy_microbench(device, blob, throttle)
    out = {"expert_bytes": float(blob), "spin_ghz": throttle.spin_hz / 1e9, "target_gbps": T4_H2D_BPS / 1e9,
           "h2d_plain_gbps": plain["h2d"] / 1e9, "d2h_plain_gbps": plain["d2h"] / 1e9,
           "h2d_t4_gbps": slow["h2d"] / 1e9, "d2h_t4_gbps": slow["d2h"] / 1e9,
           "h2d_t4_error": slow["h2d"] / T4_H2D_BPS - 1, "d2h_t4_error": slow["d2h"] / T4_H2D_BPS - 1}
    print(f"# mixtral_nb bench --copy-only: {torch.cuda.get_device_name(device)}, {out['expert_bytes']:.0f}-byte "
          "copies on a side stream, throttled = each followed by a calibrated spin on the same stream")
    for k, v in out.items():
        print(f"copy.{k} = {_fmt(v)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "copy": out}, f, indent=1, default=str)
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m mixtral_nb bench``; prints ``name = value`` lines."""
    parser = _parser()
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if (args.emulate or args.copy_only) and not cuda:
        parser.error(f"{'--copy-only' if args.copy_only else '--emulate ' + args.emulate} needs a CUDA GPU "
                     "(this run is on the CPU): leave it out, or run on a GPU machine")
    if args.emulate and args.resident:
        parser.error("--emulate pads the offloaded path (copies, per-layer expert calls): --resident has neither; "
                     "leave one out")
    if args.ttft_prompt < 1:
        parser.error(f"--ttft-prompt must be at least 1, got {args.ttft_prompt}")
    if args.layout == "article" and args.model != "mixtral-8x7b":
        parser.error(f"--layout article is the layout of the article's Mixtral-8x7B checkpoint: leave it out for "
                     f"{args.model}")
    family = FAMILIES[KNOWN_MODELS[args.model]["model_type"]]
    if args.engine == "decoder" and not family.decoder:
        parser.error(f"--engine decoder {decoder_refusal(family.model_type)} ({args.model}): leave --engine out "
                     "(transformers' forward)")
    args.engine = args.engine or ("decoder" if family.decoder else "transformers")
    if args.copy_only:
        return copy_main(args)
    default_len = 16 if args.tiny else 128
    args.prompt_len = args.prompt_len or default_len
    args.new_tokens = args.new_tokens or default_len
    modes = ["ours", "baseline"] if args.compare else ["baseline"] if args.baseline else \
        ["resident"] if args.resident else ["ours"]
    info = kernels.available()
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    print(f"# mixtral_nb bench: model={args.model}{' (tiny)' if args.tiny else ''} modes={modes} routing={args.routing} "
          f"device={device_name} "
          f"triton={info['triton_version']} fused_kernels={info['fused'] and device_name != 'cpu'}")
    print(f"# engine={args.engine} (baseline: transformers) prompt_len={args.prompt_len} "
          f"new_tokens={args.new_tokens} repeat={args.repeat} "
          f"offload_per_layer={args.offload_per_layer} prefetch={args.prefetch} vram_gib={args.vram_gib} "
          f"pinned_gib={args.pinned_gib} plan={args.plan} emulate={args.emulate} ttft_prompt={args.ttft_prompt}")
    if args.plan:
        try:
            shown = bench_plan(args, planner.ModelSizes.of(args.model).num_layers)
        except planner.MemoryPlanError as e:
            parser.error(f"--plan {args.plan} has no plan for {args.model}: {e}")
        print("# plan: " + shown.explain().replace("\n", "\n# "))
    print("# t4_s = h2d_bytes/9.7e9 + gpu_read_bytes/240e9 + overhead_s;  overhead_s = max(0, measured_s"
          " - h2d_bytes/h2d_Bps - gpu_read_bytes/hbm_Bps)")
    results: dict[str, dict[str, float]] = {}
    for mode in modes:
        m = run_one(args, mode)
        results[mode] = m
        for k, v in m.items():
            print(f"{mode}.{k} = {_fmt(v)}")
        sys.stdout.flush()
    out: dict[str, Any] = {"args": vars(args), "device": device_name, "kernels": info, "runs": results}
    if args.compare:
        ratio = results["ours"]["decode_tok_s"] / results["baseline"]["decode_tok_s"]
        out["speedup_decode"] = ratio
        out["speedup_prefill"] = results["ours"]["prefill_tok_s"] / results["baseline"]["prefill_tok_s"]
        print(f"compare.speedup_decode = {_fmt(ratio)}")
        print(f"compare.speedup_prefill = {_fmt(out['speedup_prefill'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(bench_main())
