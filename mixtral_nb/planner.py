"""Memory planning: which OffloadConfig fits a machine, and a clear error when one does not.

The byte math: an expert blob's size comes from our own layout (2-bit g16 with 8-bit
meta: ~66.4 MB for Mixtral-8x7B), 4-bit g64 attention ~22.3 MB/layer, fp16 embeddings + lm_head
0.52 GB, plus a CUDA context (~0.5 GB), the KV cache for ``context`` tokens and a workspace for
dequantizing one expert matrix (the pure-torch path) and activations. The planner fills the VRAM
left after those with expert slots (a budget in bytes, not a fixed count per layer: layers may get
different counts, more where misses are known to be more frequent), keeps every expert in host RAM
as well when RAM holds them all with a margin ("host mirror": evictions never copy back), and
otherwise swaps, which is what a free Colab T4 (12.7 GB RAM) needs. In swap mode it fills the host
RAM a runtime may use with spare host blobs, which become host copies of GPU-resident experts, so
an eviction rarely has to write an expert back (see :mod:`.cache`).

``MemoryPlanError`` is a ``ValueError``: like OffloadConfig's own checks it means "these settings
do not fit this machine", and its message names the numbers and the setting to change.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from typing import Any

import psutil
import torch

from .config import OffloadConfig, QuantConfig, article_quant_config, check_int
from .expert import ExpertFormat
from .families import FAMILIES, family_of, kv_bytes_per_token, planner_dims, trunk_bytes
from .monitor import nvml_index
from .quant import QSpec
from .units import GiB, MiB, fmt_bytes

CUDA_CONTEXT = 512 * MiB  # what the CUDA runtime and kernels take before any tensor
HOST_OVERHEAD = int(2.5 * GiB)  # Python, torch, transformers, the tokenizer, page cache headroom
HOST_MARGIN = int(1.5 * GiB)  # spare RAM required before choosing host-mirror mode
ACT_MARGIN = 256 * MiB  # activations, logits, allocator fragmentation
MAX_BYTES = 1 << 60  # bound on memory sizes given to the planner (an exbibyte): catches unit mix-ups
VRAM_MARGIN = 384 * MiB  # left unplanned when filling VRAM with slots: covers the Colab rehearsal's peak over its plan
# Swap mode fills host RAM up to (RAM - HOST_KEEP_FREE) with pinned blobs plus the process's peak
# around them: a free Colab (12.7 GB) kills a runtime above 11.0 GB of host memory, pinned + process.
# HOST_PEAK_OVERHEAD is the process's peak beyond its pinned blobs during a (re)build, as the Colab
# rehearsal measures it (BENCHMARKS.md), plus a margin.
HOST_KEEP_FREE = int(1.7e9)
HOST_PEAK_OVERHEAD = int(3.8e9)


class MemoryPlanError(ValueError):
    """A configuration needs more GPU or host memory than the machine has; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# model sizes


MIXTRAL_8X7B = {"num_hidden_layers": 32, "num_local_experts": 8, "hidden_size": 4096, "intermediate_size": 14336,
                "vocab_size": 32000, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "tie_word_embeddings": False}
MODELS = {"mixtral-8x7b": MIXTRAL_8X7B}
_COUNTS = ("num_hidden_layers", "num_local_experts", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class ModelSizes:
    """Byte sizes of one model under one quant config (what the planner adds up)."""

    num_layers: int
    num_experts: int
    hidden: int
    intermediate: int
    expert_bytes: int  # one expert blob, as stored in a GPU slot / host buffer
    attn_bytes: int  # all layers' attention projections
    embed_bytes: int  # embeddings + lm_head
    small_bytes: int  # norms and routers
    kv_bytes_per_token: int

    @classmethod
    def of(cls, model: str | Any = "mixtral-8x7b", quant: QuantConfig | None = None, dtype_bytes: int = 2,
           expert_bytes: int | None = None) -> "ModelSizes":
        """From a model name in ``MODELS`` or ``known_models.KNOWN_MODELS``, a config dict or a transformers
        config (another family's: :func:`family_sizes`); quant defaults to the article's. A ModelSizes is
        returned as it is.

        ``expert_bytes`` overrides the blob size (build_model passes the checkpoint's own layout).
        """
        if isinstance(model, ModelSizes):
            return model
        if isinstance(model, str) and model not in MODELS:
            from .known_models import KNOWN_MODELS, model_config  # the named full-size configs of every family

            if model not in KNOWN_MODELS:
                raise ValueError(f"unknown model {model!r}: use one of {sorted(set(MODELS) | set(KNOWN_MODELS))} or "
                                 "pass its config")
            return family_sizes(model_config(model), quant, dtype_bytes, expert_bytes)
        mt = model.get("model_type") if isinstance(model, dict) else getattr(model, "model_type", None)
        if mt in FAMILIES and mt != "mixtral":
            if isinstance(model, dict):
                from .known_models import model_config

                model = model_config(model)
            return family_sizes(model, quant, dtype_bytes, expert_bytes)
        if isinstance(model, str):
            c = dict(MODELS[model])
        elif isinstance(model, dict):
            c = dict(model)
        elif callable(getattr(model, "to_dict", None)):
            c = model.to_dict()
        else:
            raise ValueError(f"model must be a name in {sorted(MODELS)}, a config dict or a transformers config, "
                             f"got {type(model).__name__}")
        if quant is not None and not isinstance(quant, QuantConfig):
            raise ValueError(f"quant must be a QuantConfig or None, got {type(quant).__name__}")
        quant = quant if quant is not None else article_quant_config()
        dims = {}
        for key in ("num_hidden_layers", "num_local_experts", "hidden_size", "intermediate_size", "vocab_size",
                    "num_attention_heads", "num_key_value_heads"):
            if key not in c:
                raise ValueError(f"model config lacks {key!r}: pass a Mixtral config (see planner.MIXTRAL_8X7B)")
            dims[key] = check_int(c[key], f"model config {key}", 1, 1 << 12 if key in _COUNTS else 1 << 24)
        L, E, H, inter = (dims[k] for k in ("num_hidden_layers", "num_local_experts", "hidden_size", "intermediate_size"))
        if c.get("head_dim") is not None:
            hd = check_int(c["head_dim"], "model config head_dim", 1, 1 << 24)
        elif H % dims["num_attention_heads"]:
            raise ValueError(f"model config: hidden_size={H} is not a multiple of num_attention_heads="
                             f"{dims['num_attention_heads']}: set head_dim")
        else:
            hd = H // dims["num_attention_heads"]
        q, kv = dims["num_attention_heads"] * hd, dims["num_key_value_heads"] * hd
        c["vocab_size"] = dims["vocab_size"]
        dtype_bytes = check_int(dtype_bytes, "dtype_bytes", 1, 8)
        if expert_bytes is not None:
            expert_bytes = check_int(expert_bytes, "expert_bytes", 1, MAX_BYTES)
        blob = expert_bytes or ExpertFormat.make(H, inter, quant.ffn, _dtype(dtype_bytes)).layout.total_bytes
        attn = 0
        for shape in ((q, H), (kv, H), (kv, H), (H, q)):
            attn += QSpec.make(shape, quant.attn).layout().total_bytes if quant.attn else shape[0] * shape[1] * dtype_bytes
        embed = (1 if c.get("tie_word_embeddings") else 2) * c["vocab_size"] * H * dtype_bytes
        small = L * (2 * H + E * H) * dtype_bytes + H * dtype_bytes
        return cls(L, E, H, inter, blob, L * attn, embed, small, 2 * L * kv * dtype_bytes)

    @property
    def trunk_bytes(self) -> int:
        return self.attn_bytes + self.embed_bytes + self.small_bytes

    def runtime_bytes(self, context: int) -> int:
        """KV cache for ``context`` tokens + dequantizing one expert matrix (fp32 codes + weight, fp16 copy)."""
        return self.kv_bytes_per_token * context + 10 * self.hidden * self.intermediate + ACT_MARGIN


def family_sizes(config: Any, quant: QuantConfig | None = None, dtype_bytes: int = 2,
                 expert_bytes: int | None = None) -> ModelSizes:
    """ModelSizes of any family's transformers config, counted from the config through the family
    functions: the MoE layers and routed experts as layers and experts, every other resident tensor
    (attention of any kind, shared experts, dense layers, biases) exactly as build_model holds it
    (``families.trunk_bytes``), and the KV cache at the family's own head widths. Mixtral keeps the
    planner's own arithmetic, so its figures do not move."""
    quant = quant if quant is not None else article_quant_config()
    base = ModelSizes.of(planner_dims(config), quant, dtype_bytes, expert_bytes)
    if family_of(config).model_type == "mixtral":
        return base
    try:
        rest = trunk_bytes(config, quant.attn, dtype_bytes) - base.embed_bytes - base.small_bytes
    except ValueError:  # widths the quant settings cannot pack (toy models): the estimate the planner had
        return base
    return replace(base, attn_bytes=max(0, rest), kv_bytes_per_token=kv_bytes_per_token(config, dtype_bytes))


def _dtype(nbytes: int):
    return {1: torch.uint8, 2: torch.float16, 4: torch.float32}.get(nbytes, torch.float16)


def cache_bytes(sizes: ModelSizes, offload_per_layer: int, buffer_size: int, host_mirror: bool,
                extra_host_slots: int = 0, slots: int | None = None) -> tuple[int, int]:
    """(GPU-slot bytes, host-buffer bytes) the ExpertCache allocates for these settings; ``slots``: the
    total of per-layer GPU slots when layers differ (None: layers x (experts - offload_per_layer))."""
    L, E, b = sizes.num_layers, sizes.num_experts, sizes.expert_bytes
    resident = L * (E - offload_per_layer) if slots is None else slots
    gpu = (resident + buffer_size) * b
    host = L * E * b if host_mirror else (L * E - resident + buffer_size + extra_host_slots) * b
    return gpu, host


def distribute_slots(total: int, num_layers: int, num_experts: int, miss_rates: Any = None) -> list[int]:
    """``total`` GPU slots over the layers, 1 to ``num_experts`` each: evenly, or, with measured per-layer
    ``miss_rates``, each next slot to the layer where rate x offloaded experts is largest (a layer that
    misses more, and still has more to gain, first)."""
    L, E = num_layers, num_experts
    total = max(L, min(total, L * E))
    if miss_rates is None:
        base, rest = divmod(total, L)
        return [base + (1 if i < rest else 0) for i in range(L)]
    w = list(miss_rates)
    slots = [1] * L
    for _ in range(total - L):
        best = max((i for i in range(L) if slots[i] < E), key=lambda i: (w[i] * (E - slots[i]), -i))
        slots[best] += 1
    return slots


def _check_rates(miss_rates: Any, num_layers: int) -> list[float] | None:
    if miss_rates is None:
        return None
    try:
        rates = [float(r) for r in miss_rates]
    except (TypeError, ValueError):
        raise ValueError(f"miss_rates must be a sequence of per-layer miss rates (floats in [0, 1]), got "
                         f"{miss_rates!r}") from None
    if len(rates) != num_layers or not all(0.0 <= r <= 1.0 for r in rates):
        raise ValueError(f"miss_rates needs {num_layers} values in [0, 1] (one per layer), got {len(rates)}: "
                         f"{rates[:4]}...")
    return rates


# ---------------------------------------------------------------------------------------------
# plans


@dataclass
class Plan:
    """A memory plan: the OffloadConfig settings and what they are expected to use."""

    device: str  # "cuda" or "cpu"
    offload_per_layer: int
    buffer_size: int
    prefetch: int
    host_mirror: bool
    gpu_bytes: int  # expected peak GPU memory (0 on CPU)
    pinned_bytes: int  # host buffers of the expert cache (pinned on CUDA)
    host_bytes: int  # expected host RAM use, pinned buffers + process overhead
    vram_bytes: int
    host_ram_bytes: int
    sizes: ModelSizes
    context: int = 4096
    disk_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    num_gpus: int = 1  # layers split over this many GPUs; gpu_bytes/vram_bytes are per GPU
    gpu_slots: tuple[int, ...] | None = None  # GPU slots per layer (None: experts - offload_per_layer each)
    extra_host_slots: int = 0  # swap mode: spare host blobs (host copies of resident experts), per GPU
    clean_window: int = 3  # OffloadConfig.clean_window (the whole layer in swap plans)

    def devices(self) -> list[str]:
        """The ``device`` argument for build_model: one GPU, or all of them (layers split across)."""
        if self.device == "cpu":
            return ["cpu"]
        return [f"cuda:{i}" for i in range(max(1, self.num_gpus))]

    def layer_slots(self) -> list[int]:
        """GPU slots of each of the model's layers. A plan whose ``offload_per_layer`` was changed by hand
        (``dataclasses.replace``) gets that count everywhere; one for fewer layers than planned (a quick
        rehearsal) keeps the first layers' counts."""
        L, E = self.sizes.num_layers, self.sizes.num_experts
        if self.gpu_slots is None or E - min(self.gpu_slots) != self.offload_per_layer:
            return [E - self.offload_per_layer] * L
        return [self.gpu_slots[i % len(self.gpu_slots)] for i in range(L)]

    def offload_config(self) -> OffloadConfig:
        """The article-style OffloadConfig of this plan (``gpu_slots`` when layers differ)."""
        L, E = self.sizes.num_layers, self.sizes.num_experts
        slots = self.layer_slots()
        kw: dict[str, Any] = {"buffer_size": self.buffer_size, "prefetch": self.prefetch,
                              "host_mirror": self.host_mirror, "clean_window": self.clean_window}
        extra = 0 if self.host_mirror else self.extra_host_slots
        if extra and self.gpu_slots is not None and L < len(self.gpu_slots):  # fewer layers: their share
            extra = extra * L // len(self.gpu_slots)
        kw["extra_host_slots"] = extra
        if len(set(slots)) == 1:
            return OffloadConfig.for_model(L, E, offload_per_layer=E - slots[0], **kw)
        return OffloadConfig.for_slots(E, tuple(slots), **kw)

    def explain(self) -> str:
        """A few lines a notebook can print: what goes where and why."""
        s = self.sizes
        L, E = s.num_layers, s.num_experts
        if self.offload_per_layer == 0:
            mode = "nothing offloaded: host RAM holds no expert copies"
        elif self.host_mirror:
            mode = "host mirror: every expert also stays in host RAM, evictions never copy back"
        else:
            mode = "swap: host RAM holds the offloaded experts, a miss swaps through spare buffers"
            if self.extra_host_slots:
                mode += (f"; {self.extra_host_slots} spare host blobs keep copies of resident experts, so "
                         "evictions rarely write back")
        where = "GPU" if self.device == "cuda" else "RAM (CPU run)"
        lines = [
            f"Memory plan ({self.device}, {_g(self.vram_bytes)} VRAM, {_g(self.host_ram_bytes)} host RAM):",
            f"  expert blob {s.expert_bytes / 1e6:.1f} MB x {L * E} experts = {_g(s.expert_bytes * L * E)}",
            f"  {self._slots_text()} in {where} (offload_per_layer="
            f"{self.offload_per_layer}), {self.buffer_size} spare buffers, prefetch {self.prefetch}",
            f"  {mode}",
            f"  expected GPU use {_g(self.gpu_bytes)}{' per GPU' if self.num_gpus > 1 else ''}; "
            f"host buffers {_g(self.pinned_bytes)}, host total ~{_g(self.host_bytes)}",
            f"  (trunk {_g(s.trunk_bytes)}: attention {_g(s.attn_bytes)}, embeddings+lm_head {_g(s.embed_bytes)}; "
            f"KV cache for {self.context} tokens {_g(s.kv_bytes_per_token * self.context)})",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _slots_text(self) -> str:
        slots = self.layer_slots()
        E = self.sizes.num_experts
        if len(set(slots)) == 1:
            return f"{slots[0]} of {E} experts per layer"
        counts = {s: slots.count(s) for s in sorted(set(slots), reverse=True)}
        return (f"{sum(slots)} of {len(slots) * E} experts (" + ", ".join(f"{n} layers x {s}" for s, n in counts.items())
                + ")")


def _g(n: int | float | None) -> str:
    return fmt_bytes(n, "GiB")


def _needs(sizes: ModelSizes, opl: int, buffers: int, mirror: bool, cuda: bool, context: int,
           loaded: bool = False, extra_host: int = 0, slots: int | None = None) -> tuple[int, int, int]:
    """(GPU bytes, host-buffer bytes, host total) for a setting; ``loaded``: the trunk is already in memory;
    ``slots``: total GPU slots when layers differ."""
    gpu_slots, host_buf = cache_bytes(sizes, opl, buffers, mirror, extra_host, slots)
    base = 0 if loaded else sizes.trunk_bytes + (CUDA_CONTEXT if cuda else 0)
    runtime = sizes.runtime_bytes(context)
    if cuda:
        return gpu_slots + base + runtime, host_buf, host_buf + (0 if loaded else HOST_OVERHEAD)
    host = gpu_slots + host_buf + base + runtime + (0 if loaded else HOST_OVERHEAD)
    return 0, host_buf, host


def plan(vram_bytes: int, host_ram_bytes: int, disk_bytes: int | None = None, num_gpus: int = 1,
         model: str | Any = "mixtral-8x7b", quant: QuantConfig | None = None, context: int = 4096,
         buffer_size: int = 4, prefetch: int = 2, miss_rates: Any = None) -> Plan:
    """The best OffloadConfig for a machine: VRAM filled with expert slots, host mirror if RAM allows.

    ``vram_bytes`` is the usable memory of one GPU (0: CPU only, CUDA context included: the plan
    subtracts it); ``host_ram_bytes`` the RAM the process may use. ``miss_rates`` (one per layer,
    e.g. measured by a trace at an earlier plan) gives layers that miss more the spare slots; None:
    evenly. Raises :class:`MemoryPlanError` when no setting fits.
    """
    vram_bytes = check_int(vram_bytes, "vram_bytes", 0, MAX_BYTES, why=" (0: CPU only)")
    host_ram_bytes = check_int(host_ram_bytes, "host_ram_bytes", 0, MAX_BYTES)
    if disk_bytes is not None:
        disk_bytes = check_int(disk_bytes, "disk_bytes", 0, MAX_BYTES)
    num_gpus = check_int(num_gpus, "num_gpus", 0, 1024)
    context = check_int(context, "context", 1, 1 << 24)
    buffer_size = check_int(buffer_size, "buffer_size", 1, why=" (a miss needs a spare GPU buffer)")
    prefetch = check_int(prefetch, "prefetch", 0)
    sizes = ModelSizes.of(model, quant)
    L, E = sizes.num_layers, sizes.num_experts
    notes: list[str] = []
    cuda = vram_bytes > 0
    if not cuda:
        # all experts in (CPU) slots, nothing to swap: the least RAM a CPU run can take
        gpu, pinned, host = _needs(sizes, 0, 1, False, False, context)
        p = Plan("cpu", 0, 1, 0, False, gpu, pinned, host, 0, host_ram_bytes, sizes, context, disk_bytes, notes)
        if host > host_ram_bytes:
            raise MemoryPlanError(f"a CPU run needs {_g(host)} of RAM, {_g(host_ram_bytes)} available: use a machine "
                                  "with more RAM or a GPU, or fewer bits per expert")
        notes.append("CPU run: every expert lives in RAM once; a model of Mixtral-8x7B's size takes seconds per token")
        _disk_note(p)
        return p
    n = max(1, num_gpus)
    part = per_gpu(sizes, n)
    if n > 1:
        notes.append(f"{n} GPUs: {part.num_layers} layers on each, hidden states cross once per boundary")
    buffers = min(buffer_size, max(1, E))
    lp, b = part.num_layers, sizes.expert_bytes
    # the VRAM budget in bytes: what is left after the trunk, the runtime and the spare buffers, in slots
    fixed, _, _ = _needs(part, 0, buffers, False, True, context, slots=0)
    total = (vram_bytes - VRAM_MARGIN - fixed) // b
    if total < lp:
        gpu, _, _ = _needs(part, E - 1, buffers, False, True, context)
        raise MemoryPlanError(f"even offload_per_layer={E - 1} needs {_g(gpu)} of VRAM, {_g(vram_bytes)} available: "
                              "use a GPU with more memory, fewer bits, or a shorter context")
    rates = _check_rates(miss_rates, L)
    part_rates = None if rates is None else rates[:lp]  # (one GPU: all layers)
    slots = distribute_slots(int(total), lp, E, part_rates)
    resident = sum(slots)
    opl = E - min(slots)
    if opl == 0:
        buffers = 1  # nothing ever misses: one spare buffer (OffloadConfig needs one) is enough
        notes.append("every expert fits on the GPU: no offloading, no misses")
    all_experts = L * E * b
    mirror = opl > 0 and all_experts + HOST_OVERHEAD + HOST_MARGIN <= host_ram_bytes
    extra = 0
    if opl > 0 and not mirror:
        # fill the host RAM a runtime may use: spare blobs become host copies of resident experts
        required = (lp * E - resident + buffers) * b
        budget = (host_ram_bytes - HOST_KEEP_FREE - HOST_PEAK_OVERHEAD) // n - required
        extra = int(max(0, min(budget // b, sum(s for s in slots if s < E))))
    gpu, pinned, host = _needs(part, opl, buffers, mirror, True, context, extra_host=extra, slots=resident)
    pinned, host = pinned * n, host + pinned * (n - 1)  # every GPU's cache keeps its own host buffers
    if host > host_ram_bytes:
        raise MemoryPlanError(f"offload_per_layer={opl} needs {_g(host)} of host RAM ({_g(pinned)} of expert buffers), "
                              f"{_g(host_ram_bytes)} available: use a machine with more RAM or fewer bits per expert")
    if opl > 0 and not mirror:
        notes.append(f"host RAM cannot also hold all {L * E} experts ({_g(all_experts)}): swap mode, host memory "
                     f"at most {_g(pinned + HOST_PEAK_OVERHEAD)} at its peak (pinned + process)")
    gpu_slots = tuple(slots[i % lp] for i in range(L)) if len(set(slots)) > 1 else None
    p = Plan("cuda", opl, buffers, prefetch if opl > 0 else 0, mirror, gpu, pinned, host, vram_bytes, host_ram_bytes,
             sizes, context, disk_bytes, notes, n, gpu_slots, extra, E if opl > 0 and not mirror else 3)
    _disk_note(p)
    return p


def per_gpu(sizes: ModelSizes, num_gpus: int) -> ModelSizes:
    """One GPU's share when layers are split over ``num_gpus`` (the first also holds embeddings + lm_head)."""
    if num_gpus <= 1:
        return sizes
    L = sizes.num_layers
    lp = -(-L // num_gpus)
    return replace(sizes, num_layers=lp, attn_bytes=sizes.attn_bytes * lp // L, small_bytes=sizes.small_bytes * lp // L,
                   kv_bytes_per_token=sizes.kv_bytes_per_token * lp // L)


def _disk_note(p: Plan) -> None:
    if p.disk_bytes is None:
        return
    s = p.sizes
    ckpt = s.num_layers * s.num_experts * s.expert_bytes + s.trunk_bytes
    if 2 * ckpt > p.disk_bytes:
        p.notes.append(f"disk: {_g(p.disk_bytes)} free, the pre-quantized checkpoint plus its converted copy need "
                       f"~{_g(2 * ckpt)}: free some space first")
    else:
        p.notes.append(f"disk: {_g(p.disk_bytes)} free; the pre-quantized checkpoint plus its converted copy need "
                       f"~{_g(2 * ckpt)}; quantizing the original fp16 model yourself needs ~{_g(87e9 + ckpt)}")


@dataclass(frozen=True)
class Machine:
    """A machine people run the notebook on: usable VRAM per GPU, host RAM, GPUs, disk."""

    vram_bytes: int
    host_ram_bytes: int
    num_gpus: int = 1
    disk_bytes: int | None = None
    description: str = ""

    def plan(self, **kw: Any) -> Plan:
        return plan(self.vram_bytes, self.host_ram_bytes, self.disk_bytes, self.num_gpus, **kw)


PRESETS: dict[str, Machine] = {
    "colab-t4": Machine(15095 * MiB, int(12.7e9), 1, int(78e9), "free Colab: T4 (15,095 MiB usable), 12.7 GB RAM"),
    "12gb": Machine(int(11.5 * GiB), 32 * GiB, 1, None, "12 GB card (RTX 3060/4070), 32 GB RAM"),
    "kaggle-2xt4": Machine(15095 * MiB, int(29e9), 2, int(73e9), "Kaggle: 2 x T4, 29 GB RAM"),
    "24gb": Machine(int(23.5 * GiB), 64 * GiB, 1, None, "24 GB card (RTX 3090/4090, A10/L4 class), 64 GB RAM"),
    "a100-40gb": Machine(int(39.4 * GiB), 85 * GiB, 1, None, "A100 40 GB, 85 GB RAM"),
    "a100-80gb": Machine(int(79.1 * GiB), 117 * GiB, 1, None, "A100 80 GB, 117 GB RAM"),
    "cpu": Machine(0, 32 * GiB, 0, None, "CPU only, 32 GB RAM"),
}


def preset(name: str, **kw: Any) -> Plan:
    """The plan for a named machine in :data:`PRESETS`."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: use one of {sorted(PRESETS)}")
    return PRESETS[name].plan(**kw)


def own_context_bytes(index: int) -> int:
    """Device memory this process holds on GPU ``index`` outside torch's allocator (its CUDA context),
    from NVML's per-process figures; 0 when NVML cannot say (the plan then stays on the safe side)."""
    try:
        import pynvml  # optional: a missing or broken NVML only makes the plan more conservative

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(index))
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        used = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid == os.getpid())
    except Exception:  # noqa: BLE001 - any NVML failure means "unknown"
        return 0
    return max(0, used - int(torch.cuda.memory_reserved(index)))


def _usable_vram(index: int) -> int:
    """Free VRAM plus this process's own CUDA context: plans count the context themselves
    (CUDA_CONTEXT), and measuring initialised it, so it must not be subtracted twice."""
    return int(torch.cuda.mem_get_info(index)[0]) + min(own_context_bytes(index), CUDA_CONTEXT)


def machine(device: Any = None) -> Machine:
    """This machine: usable VRAM of ``device`` (default: current CUDA device, if any; free memory plus
    this process's CUDA context, which plans count), available RAM, free disk."""
    ram = psutil.virtual_memory().available
    disk = shutil.disk_usage(".").free
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        if device is not None:  # one named GPU
            dev = torch.device(device)
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            return Machine(_usable_vram(index), int(ram), 1, disk, torch.cuda.get_device_name(dev))
        n = torch.cuda.device_count()  # all GPUs (layers are split across them); plan for the smallest
        free = min(_usable_vram(i) for i in range(n))
        return Machine(int(free), int(ram), n, disk, f"{n} x {torch.cuda.get_device_name(0)}")
    return Machine(0, int(ram), 0, disk, "CPU")


def detect(device: Any = None, **kw: Any) -> Plan:
    """The plan for this machine (VRAM via torch.cuda.mem_get_info and NVML, available RAM via psutil)."""
    return machine(device).plan(**kw)


# ---------------------------------------------------------------------------------------------
# checking a configuration


def check_fits(what: Plan | OffloadConfig, vram_bytes: int | None, ram_bytes: int, sizes: ModelSizes | None = None,
               *, host_mirror: bool | None = None, context: int = 4096, loaded: bool = False) -> None:
    """Raise :class:`MemoryPlanError` if ``what`` needs more than ``vram_bytes``/``ram_bytes``.

    ``vram_bytes=None`` means a CPU run (expert slots then live in RAM). For an OffloadConfig,
    ``sizes`` describes the model (default: Mixtral-8x7B with the article's quant config) and
    ``loaded=True`` counts only the expert cache and runtime (the trunk is already in memory, as in
    build_model just before the cache is created).
    """
    if vram_bytes is not None:
        vram_bytes = check_int(vram_bytes, "vram_bytes", 0, MAX_BYTES, why=" (None: a CPU run)")
    ram_bytes = check_int(ram_bytes, "ram_bytes", 0, MAX_BYTES)
    context = check_int(context, "context", 1, 1 << 24)
    if host_mirror is not None and not isinstance(host_mirror, bool):
        raise ValueError(f"host_mirror must be True, False or None, got {host_mirror!r}")
    if sizes is not None and not isinstance(sizes, ModelSizes):
        raise ValueError(f"sizes must be a ModelSizes (planner.ModelSizes.of(...)), got {type(sizes).__name__}")
    extra = 0
    slots: int | None = None  # total GPU slots when layers differ
    if isinstance(what, Plan):
        sizes, opl, buffers, context = per_gpu(what.sizes, what.num_gpus), what.offload_per_layer, what.buffer_size, \
            what.context
        mirror = what.host_mirror if host_mirror is None else host_mirror
        extra = 0 if mirror else what.extra_host_slots
        if what.gpu_slots is not None:
            slots = sum(what.layer_slots()[:sizes.num_layers])
    elif isinstance(what, OffloadConfig):
        sizes = sizes or ModelSizes.of()
        what.gpu_slots_per_layer(sizes.num_experts)  # offload_per_layer must leave a GPU slot
        opl, buffers, extra = what.offload_per_layer, what.buffer_size, what.extra_host_slots
        mirror = what.host_mirror if host_mirror is None else host_mirror
        mirror = True if mirror is None else mirror
        if what.gpu_slots is not None:
            slots = sum(what.slots_per_layer(sizes.num_layers, sizes.num_experts))
    else:
        raise ValueError(f"check_fits needs a Plan or an OffloadConfig, got {type(what).__name__}")
    cuda = vram_bytes is not None
    E = sizes.num_experts
    gpu, pinned, host = _needs(sizes, opl, buffers, mirror, cuda, context, loaded, extra, slots)
    if cuda and gpu > vram_bytes and slots is not None:
        over = -(-(gpu - vram_bytes) // sizes.expert_bytes)
        raise MemoryPlanError(f"needs {_g(gpu)} of VRAM, {_g(vram_bytes)} free: give gpu_slots {over} fewer slots "
                              "in all (planner.detect() fills the VRAM it measures)")
    if cuda and gpu > vram_bytes:
        fix = next((o for o in range(opl + 1, E) if _needs(sizes, o, buffers, mirror, cuda, context, loaded)[0]
                    <= vram_bytes), None)
        hint = (f"set offload_per_layer={fix}" if fix is not None
                else f"even offload_per_layer={E - 1} does not fit: free GPU memory or use fewer bits per expert")
        raise MemoryPlanError(f"needs {_g(gpu)} of VRAM, {_g(vram_bytes)} free: {hint}")
    if host > ram_bytes:
        if mirror and opl > 0 and _needs(sizes, opl, buffers, False, cuda, context, loaded, slots=slots)[2] <= ram_bytes:
            hint = "set host_mirror=False (swap mode keeps only the offloaded experts in RAM)"
        elif extra and _needs(sizes, opl, buffers, mirror, cuda, context, loaded, slots=slots)[2] <= ram_bytes:
            hint = f"lower extra_host_slots (now {extra}): each spare host blob takes {_g(sizes.expert_bytes)}"
        elif cuda:
            fix = next((o for o in range(opl - 1, -1, -1)
                        if _needs(sizes, o, buffers, False, cuda, context, loaded)[2] <= ram_bytes
                        and _needs(sizes, o, buffers, False, cuda, context, loaded)[0] <= vram_bytes), None)
            hint = (f"set offload_per_layer={fix}, host_mirror=False" if fix is not None
                    else "use a machine with more RAM or fewer bits per expert")
        else:
            hint = "use a machine with more RAM or fewer bits per expert"
        raise MemoryPlanError(f"needs {_g(host)} of host RAM ({_g(pinned)} of expert buffers), {_g(ram_bytes)} "
                              f"available: {hint}")


def choose_host_mirror(sizes: ModelSizes, offload_per_layer: int, ram_bytes: int) -> bool:
    """Host mirror when available RAM holds every expert with a margin (and some are offloaded)."""
    all_experts = sizes.num_layers * sizes.num_experts * sizes.expert_bytes
    return offload_per_layer > 0 and all_experts + HOST_MARGIN <= ram_bytes
