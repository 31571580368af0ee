"""build_model: a transformers MixtralForCausalLM (or another supported MoE family's model, see
:mod:`mixtral_nb.families`) whose experts live in an ExpertCache.

The skeleton is built on the meta device, so the full-precision experts (87 GB for Mixtral-8x7B)
are never materialised; ``layer.mlp.experts`` of every MoE layer is replaced by
:class:`OffloadedExperts` and, with an attention quant config, the attention projections (for
other families every resident projection) by :class:`QuantLinear`. Everything else is the stock
transformers model, so ``generate()``, streamers and KV caches work as usual.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from torch import nn

from .cache import CacheGroup, ExpertCache
from .checkpoint import CheckpointError, CorruptFileError, layer_of, resolve_checkpoint
from .config import OffloadConfig, QuantConfig
from .expert import ExpertFormat
from .families import family_of, planner_dims, skeleton
from .moe import OffloadedExperts
from .planner import ModelSizes, check_fits, choose_host_mirror
from .qlinear import QuantLinear
from .quant import QSpec


class ReleasedModelError(RuntimeError):
    """A model whose memory was handed to a newer build_model call of the same checkpoint was used."""


RELEASED = ("this model was released because build_model was called again for the same checkpoint on the same "
            "device (its memory went to the new model): use the new model (and a new ChatSession on it), or pass "
            "keep_previous=True to build_model / load to keep both")


class _ReleasedCache:
    """Stands in for a released model's ExpertCache: statistics read as empty (monitors keep running),
    anything that would compute raises :class:`ReleasedModelError`."""

    released = True
    _COUNTERS = frozenset(("hits", "misses", "prefetch_issued", "prefetch_used", "bytes_h2d", "bytes_d2h",
                           "host_syncs", "pred_correct", "pred_total", "actual_total", "gpu_bytes", "host_bytes"))

    def stats(self, wait: bool = False) -> dict[str, float]:
        return {}

    def reset_stats(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._COUNTERS:
            return 0
        raise ReleasedModelError(RELEASED)


def _raise_released(*_args: Any, **_kwargs: Any) -> None:
    raise ReleasedModelError(RELEASED)


# Models build_model made, as (checkpoint key, devices, weak reference): a re-run notebook cell
# builds the same checkpoint again while the old model is still bound to a variable.
_BUILT: list[tuple[str, frozenset[str], weakref.ref]] = []


def _key(state_path: Any, ck: Any) -> str:
    folder = getattr(ck, "folder", None)
    if folder is None:
        folder = state_path if isinstance(state_path, (str, os.PathLike)) else f"object-{id(ck)}"
    return str(Path(folder).resolve()) if isinstance(folder, (str, os.PathLike)) else str(folder)


def expert_caches(model: Any) -> list[ExpertCache]:
    cache = getattr(model, "expert_cache", None)
    if isinstance(cache, CacheGroup):
        return list(cache.caches)
    return [cache] if isinstance(cache, ExpertCache) else []


def live_models() -> list[Any]:
    """The models built by build_model that are still alive and not released (oldest first)."""
    out = []
    for _, _, ref in _BUILT:
        m = ref()
        if m is not None and not getattr(m, "mixtral_nb_released", False):
            out.append(m)
    return out


def model_bytes(model: Any) -> dict[str, int]:
    """What one build_model model holds: expert-cache slots, expert-cache host buffers, trunk tensors."""
    caches = expert_caches(model)
    trunk = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta":
            trunk += t.numel() * t.element_size()
    return {"slots": sum(c.gpu_bytes for c in caches), "host": sum(c.host_bytes for c in caches), "trunk": trunk}


def on_release(model: Any, fn: Callable[[], None]) -> None:
    """Call ``fn`` when ``model`` is released: what is built on a model and holds memory of its own
    (a Decoder's KV cache and CUDA graphs) frees it with the model. ``fn`` is held weakly when it is a
    bound method, so registering does not keep its object alive."""
    hooks = model.__dict__.setdefault("mixtral_nb_on_release", [])
    hooks.append(weakref.WeakMethod(fn) if hasattr(fn, "__self__") else (lambda: fn))


def release_model(model: Any) -> None:
    """Free a build_model model's memory now (expert-cache slots and host buffers, trunk weights).

    The object stays, but using it raises :class:`ReleasedModelError` (one clear message) instead
    of computing on freed memory; its monitors read empty cache statistics. Idempotent.
    """
    if getattr(model, "mixtral_nb_released", False):
        return
    for ref in model.__dict__.pop("mixtral_nb_on_release", []):
        fn = ref()
        if fn is not None:
            fn()
    released = _ReleasedCache()
    for cache in expert_caches(model):
        cache.free()
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            m._cache = (released,)
            m._graphs, m._staging = {}, None
            m._next_gate, m._next_module = (), ()
        elif isinstance(m, QuantLinear):
            m._dense = None
    model.expert_cache = released
    model.to_empty(device="meta")  # every parameter and buffer: storage freed, shapes kept
    model.register_forward_pre_hook(_raise_released)
    model.model.embed_tokens.register_forward_pre_hook(_raise_released)  # the Decoder enters here
    model.mixtral_nb_released = True
    gc.collect()
    if any(d.type == "cuda" for d in _model_devices(model)) and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the host blobs were unpinned by ExpertCache.free (they never used torch's pool)


def _model_devices(model: Any) -> set[torch.device]:
    return getattr(model, "mixtral_nb_devices", set())


def _release_previous(key: str, devices: list[torch.device]) -> None:
    """Release the live models built from the same checkpoint on any of ``devices`` (a re-run cell)."""
    names = {str(d) for d in devices}
    keep = []
    for k, devs, ref in _BUILT:
        m = ref()
        if m is None:
            continue
        if k == key and devs & names:
            release_model(m)
            continue
        keep.append((k, devs, ref))
    _BUILT[:] = keep


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (exact and fast enough), fp16 on GPUs (T4 has no bf16)."""
    return torch.float32 if device.type == "cpu" else torch.float16


def _check_memory(config, quant: QuantConfig, fmt: ExpertFormat, offload_config: OffloadConfig, device: torch.device,
                  dtype: torch.dtype, host_mirror: bool | None, share: int = 1) -> bool:
    """Refuse an OffloadConfig that cannot fit before the cache allocates anything; returns host_mirror.

    host_mirror None (the default, and what the article's code leaves) means: mirror every expert in
    host RAM when it fits with a margin, else swap through spare buffers (Colab's 12.7 GB).
    """
    sizes = ModelSizes.of(config if isinstance(config, dict) else planner_dims(config), quant,
                          expert_bytes=fmt.layout.total_bytes, dtype_bytes=dtype.itemsize)
    ram = psutil.virtual_memory().available // share  # several GPUs share one host's RAM
    mirror = host_mirror if host_mirror is not None else offload_config.host_mirror
    if mirror is None:
        mirror = choose_host_mirror(sizes, offload_config.offload_per_layer, ram)
    vram = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    check_fits(offload_config, vram, ram, sizes, host_mirror=mirror, loaded=True)
    return bool(mirror)


def _machine_devices() -> str:
    """What ``device=`` may name here, for error messages."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return "this machine has no CUDA GPU (torch.cuda.is_available() is False): use \"cpu\""
    names = ", ".join(f"cuda:{i}" for i in range(n))
    return f"this machine has {n} CUDA GPU{'s' if n > 1 else ''} ({names}) and \"cpu\""


def parse_devices(device: Any) -> list[torch.device]:
    """"cuda:0", torch.device, or a list of them (layers are split across a list).

    Only "cpu" and CUDA GPUs this machine has are accepted: anything else is one ValueError naming
    the device and what the machine offers, before anything is built.
    """
    items = list(device) if isinstance(device, (list, tuple)) else [device]
    if not items:
        raise ValueError("build_model needs at least one device: pass \"cpu\", \"cuda:0\" or a list of them")
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, torch.device, int)):
            raise ValueError(f"device {item!r} ({type(item).__name__}) is not a device: pass a string like "
                             f"\"cuda:0\" or a torch.device; {_machine_devices()}")
        try:
            d = torch.device(item)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"device {item!r} is not a device name: {_machine_devices()}") from None
        if d.type == "cpu":
            out.append(torch.device("cpu"))
            continue
        if d.type != "cuda":
            raise ValueError(f"device {item!r}: mixtral_nb runs on \"cpu\" or CUDA GPUs only; {_machine_devices()}")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (d.index is not None and d.index >= n):
            raise ValueError(f"device {item!r} is not on this machine: {_machine_devices()}")
        if d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())
        out.append(d)
    return out


def split_layers(num_layers: int, num_devices: int) -> list[int]:
    """Device index of each layer: contiguous, balanced ranges (hidden states cross once per boundary)."""
    return [i * num_devices // num_layers for i in range(num_layers)]


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    return x


def _hop_devices(model: Any, layer_dev: list[torch.device], devices: list[torch.device]) -> None:
    """Forward pre-hooks that move activations to the next device at each layer-split boundary."""
    def mover(dev: torch.device):
        def hook(module, args, kwargs):
            return _to(args, dev), {k: _to(v, dev) for k, v in kwargs.items()}
        return hook

    for layer, dev in zip(model.model.layers, layer_dev):
        if dev != devices[0]:  # every such layer: the mask and rotary tables come from the first device
            layer.register_forward_pre_hook(mover(dev), with_kwargs=True)
    model.model.norm.register_forward_pre_hook(mover(devices[-1]), with_kwargs=True)
    model.lm_head.register_forward_pre_hook(mover(devices[0]), with_kwargs=True)


def _add_bias(ql: QuantLinear, bias: torch.Tensor) -> None:
    """A quantized projection whose original has a bias (Qwen2's q/k/v, Phi-3.5's attention): the bias
    stays a floating-point parameter, added after the product."""
    ql.bias = nn.Parameter(bias, requires_grad=False)
    ql.register_forward_hook(lambda m, _args, out: out + m.bias.to(out.dtype))


def build_model(device: torch.device | str, quant_config: QuantConfig | None, offload_config: OffloadConfig,
                state_path: str | os.PathLike | Any, dtype: torch.dtype | None = None,
                host_mirror: bool | None = None, verify: bool | None = None, *, keep_previous: bool = False):
    """Load a Mixtral checkpoint (or another supported family's) with offloaded experts; see the module docstring.

    ``state_path`` is anything :func:`mixtral_nb.checkpoint.resolve_checkpoint` accepts: a
    project-format folder (settings come from its manifest; a ``quant_config`` that disagrees is an
    error), the article's pre-quantized folder (converted once), an original HF folder (quantized
    as it is read, with ``quant_config``), a hub id, or an opened checkpoint object with
    ProjectCheckpoint's interface (the benchmark's synthetic model). ``device`` is "cpu" or any
    "cuda:N". ``verify``: check a project folder's file digests (None: unless checked since the files
    last changed).

    A model built earlier from the same checkpoint on the same device is released first (its
    memory goes to the new one; using it raises :class:`ReleasedModelError`), so re-running a
    notebook's load cell does not hold two copies; ``keep_previous=True`` keeps it.
    """
    corrupt = None
    try:
        return _build(device, quant_config, offload_config, state_path, dtype, host_mirror, verify, keep_previous)
    except CorruptFileError as e:  # a read-time check failed midway (checkpoint.project)
        corrupt = CorruptFileError(str(e))
    # raised out here, once the first error and its traceback are gone: their frames held the half-built
    # model, whose GPU and pinned memory now go back before the user sees the error
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise corrupt


def _build(device: torch.device | str, quant_config: QuantConfig | None, offload_config: OffloadConfig,
           state_path: str | os.PathLike | Any, dtype: torch.dtype | None, host_mirror: bool | None,
           verify: bool | None, keep_previous: bool):
    if not isinstance(offload_config, OffloadConfig):
        raise ValueError(f"offload_config must be an OffloadConfig, got {type(offload_config).__name__}: use "
                         "OffloadConfig.for_model(num_layers, num_experts, offload_per_layer=...)")
    if quant_config is not None and not isinstance(quant_config, QuantConfig):
        raise ValueError(f"quant_config must be a QuantConfig or None, got {type(quant_config).__name__}: wrap hqq "
                         "dicts as QuantConfig(ffn_config=..., attn_config=...)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}: e.g. torch.float16")
    if host_mirror is not None and not isinstance(host_mirror, bool):
        raise ValueError(f"host_mirror must be True, False or None, got {host_mirror!r}")
    devices = parse_devices(device)
    device = devices[0]
    dtype = dtype or default_dtype(device)
    ck = resolve_checkpoint(state_path, quant_config, device=device, dtype=dtype, verify=verify)
    config, quant, fmt = ck.config, ck.quant, ck.fmt
    family, sk = family_of(config), skeleton(config)

    L, E, moe = config.num_hidden_layers, sk.num_experts, list(sk.moe_layers)
    if len(devices) > L:
        raise ValueError(f"{len(devices)} devices for {L} layers: give at most one device per layer")
    offload_config.check_model(len(moe), E)  # main_size/offload_size must describe this model's MoE layers
    linears = getattr(ck, "attn_specs", {}) if quant.attn is not None else {}

    key = _key(state_path, ck)
    if not keep_previous:
        _release_previous(key, devices)

    config.dtype = dtype
    with torch.device("meta"):
        model = family.model_class()(config)
    for i in moe:
        model.model.layers[i].mlp.experts = nn.Module()  # placeholder until the cache exists; never materialised
    biases: dict[str, torch.Tensor] = {}
    for base in linears:  # quantized projections: placeholders too, filled from their stored segments
        module_path, _, proj = base.rpartition(".")
        setattr(model.get_submodule(module_path), proj, nn.Module())
    layer_part = split_layers(L, len(devices))
    layer_dev = [devices[k] for k in layer_part]
    for layer, dev in zip(model.model.layers, layer_dev):
        layer.to_empty(device=dev)
    model.model.embed_tokens.to_empty(device=devices[0])
    model.lm_head.to_empty(device=devices[0])  # logits land where generate() keeps input_ids
    model.model.norm.to_empty(device=devices[-1])
    model.to(dtype)
    # what transformers keeps in fp32 whatever the dtype (DeepSeek-V2's router), as from_pretrained does
    keep = [*(getattr(model, "_keep_in_fp32_modules_strict", None) or ()), *(getattr(model, "_keep_in_fp32_modules", None) or ())]
    for name, p in model.named_parameters():
        if keep and any(k in name for k in keep):
            p.data = p.data.float()
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)

    # trunk: embeddings, norms, routers, attention
    params = dict(model.named_parameters())
    seen: set[str] = set()
    attn_parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in ck.trunk():
        base, _, seg = name.rpartition(".")
        if base in linears:
            if seg == "bias":
                biases[base] = t
            else:
                attn_parts.setdefault(base, {})[seg] = t
            continue
        if name not in params:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise CheckpointError(f"{state_path}: unexpected tensor {name} (not a {family.architecture} parameter)")
        if tuple(params[name].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{state_path}: tensor {name} has shape {tuple(t.shape)}, the config expects {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(t)
        seen.add(name)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        seen.add("lm_head.weight")
    missing = sorted(set(params) - seen)
    if missing:
        raise CheckpointError(f"{state_path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    if set(attn_parts) != set(linears):
        gone = sorted(set(linears) - set(attn_parts))
        raise CheckpointError(f"{state_path}: quantized projections missing: {gone[:5]}{' ...' if len(gone) > 5 else ''}")
    for base, parts in attn_parts.items():
        module_path, _, proj = base.rpartition(".")
        dev = layer_dev[layer_of(base)]
        ql = QuantLinear(QSpec(**ck.attn_specs[base]), parts)
        if sk.linears.get(base, (None, False))[1]:
            if base not in biases:
                raise CheckpointError(f"{state_path}: tensor {base}.bias is missing")
            _add_bias(ql, biases[base].to(dtype))
        setattr(model.get_submodule(module_path), proj, ql.to(dev))

    # experts
    def load_blob(layer: int, e: int) -> torch.Tensor:
        return ck.blob(layer, e)

    from transformers.activations import ACT2FN  # heavy: the package import stays fast without it

    caches: list[ExpertCache] = []
    mods: list[OffloadedExperts] = []
    for k, dev in enumerate(devices):
        layers = [i for i in moe if layer_part[i] == k]
        if not layers:
            continue
        part = planner_dims(config)
        part["num_hidden_layers"] = len(layers)
        dev_config = offload_config.part([moe.index(i) for i in layers])  # per-MoE-layer GPU slots: this device's
        mirror = _check_memory(part, quant, fmt, dev_config, dev, dtype, host_mirror, share=len(devices))
        cache = ExpertCache(fmt, len(layers), E, dev_config, dev,
                            lambda j, e, layers=layers: load_blob(layers[j], e),
                            host_mirror=mirror)
        caches.append(cache)
        for j, i in enumerate(layers):
            mods.append(OffloadedExperts(i, cache, sk.top_k, ACT2FN[config.hidden_act],
                                         offload_config.prefetch, cache_layer=j))
            model.model.layers[i].mlp.experts = mods[-1]
    for i, m in enumerate(mods):  # prefetch: the next MoE layer's router (a top-k over its logits)
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        router = getattr(model.model.layers[nxt.layer_idx].mlp, family.router) if nxt else None
        m.set_next_router(router.weight if nxt else None, nxt)
    if len(devices) > 1:
        _hop_devices(model, layer_dev, devices)
    model.expert_cache = caches[0] if len(caches) == 1 else CacheGroup(caches)
    model.eval()
    model.mixtral_nb_devices = set(devices)
    model.mixtral_nb_family = family.model_type
    _BUILT.append((key, frozenset(str(d) for d in devices), weakref.ref(model)))
    return model
