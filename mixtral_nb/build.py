"""build_model: a transformers MixtralForCausalLM whose experts live in an ExpertCache.

The skeleton is built on the meta device, so the full-precision experts (87 GB for Mixtral-8x7B)
are never materialised; ``layer.mlp.experts`` is replaced by :class:`OffloadedExperts` and, with an
attention quant config, the attention projections by :class:`QuantLinear`. Everything else is the
stock transformers model, so ``generate()``, streamers and KV caches work as usual.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from .cache import CacheGroup, ExpertCache
from .checkpoint import CheckpointError, HFCheckpoint, attn_key, layer_of, open_checkpoint
from .config import OffloadConfig, QuantConfig
from .expert import ExpertFormat
from .moe import OffloadedExperts
from .qlinear import QuantLinear
from .quant import QSpec


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (exact and fast enough), fp16 on GPUs (T4 has no bf16)."""
    return torch.float32 if device.type == "cpu" else torch.float16


def _same_quant(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    keys = ("nbits", "group_size")  # the axis is a storage detail (hqq 0.2.8 defaults to 1, the article's files are 0)
    if a is None or b is None:
        return a is b
    return all(a[k] == b[k] for k in keys)


def _check_memory(config, quant: QuantConfig, fmt: ExpertFormat, offload_config: OffloadConfig, device: torch.device,
                  dtype: torch.dtype, host_mirror: bool | None, share: int = 1) -> bool:
    """Refuse an OffloadConfig that cannot fit before the cache allocates anything; returns host_mirror.

    host_mirror None (the default, and what the article's code leaves) means: mirror every expert in
    host RAM when it fits with a margin, else swap through spare buffers (Colab's 12.7 GB).
    """
    import psutil

    from .planner import ModelSizes, check_fits, choose_host_mirror

    sizes = ModelSizes.of(config, quant, expert_bytes=fmt.layout.total_bytes, dtype_bytes=dtype.itemsize)
    ram = psutil.virtual_memory().available // share  # several GPUs share one host's RAM
    mirror = host_mirror if host_mirror is not None else offload_config.host_mirror
    if mirror is None:
        mirror = choose_host_mirror(sizes, offload_config.offload_per_layer, ram)
    vram = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    check_fits(offload_config, vram, ram, sizes, host_mirror=mirror, loaded=True)
    return bool(mirror)


def parse_devices(device: Any) -> list[torch.device]:
    """"cuda:0", torch.device, or a list of them (layers are split across a list)."""
    items = list(device) if isinstance(device, (list, tuple)) else [device]
    if not items:
        raise ValueError("build_model needs at least one device")
    out = []
    for d in items:
        d = torch.device(d)
        if d.type == "cuda" and d.index is None:
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


def build_model(device: torch.device | str, quant_config: QuantConfig | None, offload_config: OffloadConfig,
                state_path: str | os.PathLike | Any, dtype: torch.dtype | None = None,
                host_mirror: bool | None = None):
    """Load a Mixtral checkpoint folder with offloaded experts; see the module docstring.

    ``state_path`` may be a project-format folder (settings come from its manifest; a
    ``quant_config`` that disagrees is an error) or an original HF folder (quantized on the fly
    with ``quant_config``). ``device`` is "cpu" or any "cuda:N". ``state_path`` may also be an
    opened checkpoint object with ProjectCheckpoint's interface (the benchmark's synthetic model).
    """
    from transformers import MixtralForCausalLM

    devices = parse_devices(device)
    device = devices[0]
    dtype = dtype or default_dtype(device)
    ck = (open_checkpoint(state_path, quant_config=quant_config) if isinstance(state_path, (str, os.PathLike))
          else state_path)
    config = ck.config
    if ck.kind == "project":
        if quant_config is not None and not (_same_quant(quant_config.ffn, ck.quant.ffn)
                                             and _same_quant(quant_config.attn, ck.quant.attn)):
            raise CheckpointError(
                f"{state_path} was quantized with {ck.quant.to_json()}, but build_model was given "
                f"{quant_config.to_json()}: pass quant_config=None to use the checkpoint's settings, or re-quantize"
            )
        quant = ck.quant
        fmt = ck.fmt
    else:
        quant = quant_config or QuantConfig(None, None)
        fmt = ExpertFormat.make(config.hidden_size, config.intermediate_size, quant.ffn, dtype)

    L, E = config.num_hidden_layers, config.num_local_experts
    if len(devices) > L:
        raise ValueError(f"{len(devices)} devices for {L} layers: give at most one device per layer")
    if offload_config.main_size < L * offload_config.gpu_slots_per_layer(E):
        raise ValueError(
            f"OffloadConfig.main_size={offload_config.main_size} is smaller than layers x GPU slots per layer = "
            f"{L} x {E - offload_config.offload_per_layer}: use main_size={L * (E - offload_config.offload_per_layer)}"
        )

    config.dtype = dtype
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp.experts = nn.Module()  # placeholder until the cache exists; never materialised
        if quant.attn is not None:
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, p, nn.Module())
    layer_part = split_layers(L, len(devices))
    layer_dev = [devices[k] for k in layer_part]
    for layer, dev in zip(model.model.layers, layer_dev):
        layer.to_empty(device=dev)
    model.model.embed_tokens.to_empty(device=devices[0])
    model.lm_head.to_empty(device=devices[0])  # logits land where generate() keeps input_ids
    model.model.norm.to_empty(device=devices[-1])
    model.to(dtype)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)

    # trunk: embeddings, norms, routers, attention
    params = dict(model.named_parameters())
    seen: set[str] = set()
    attn_parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in ck.trunk():
        if quant.attn is not None and (attn_key(name) or ".self_attn." in name and not name.endswith(".weight")):
            base, _, seg = name.rpartition(".")
            attn_parts.setdefault(base, {})[seg] = t
            continue
        if name not in params:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            raise CheckpointError(f"{state_path}: unexpected tensor {name} (not a Mixtral parameter)")
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

    if quant.attn is not None:
        for base, parts in attn_parts.items():
            module_path, _, proj = base.rpartition(".")
            attn = model.get_submodule(module_path)
            dev = layer_dev[layer_of(base)]
            if "weight" in parts:  # original checkpoint: quantize now, on the target device
                ql = QuantLinear.from_weight(parts["weight"], quant.attn, dev)
            else:
                spec = QSpec(**ck.attn_specs[base])
                ql = QuantLinear(spec, parts)
            setattr(attn, proj, ql.to(dev))

    # experts
    if isinstance(ck, HFCheckpoint):
        enc_dev = device if device.type == "cuda" else torch.device("cpu")

        def load_blob(layer: int, e: int) -> torch.Tensor:
            return fmt.encode(*(w.to(enc_dev) for w in ck.expert(layer, e)))
    else:
        def load_blob(layer: int, e: int) -> torch.Tensor:
            return ck.blob(layer, e)

    from transformers.activations import ACT2FN

    caches: list[ExpertCache] = []
    mods: list[OffloadedExperts] = []
    for k, dev in enumerate(devices):
        layers = [i for i in range(L) if layer_part[i] == k]
        part = copy.copy(config)
        part.num_hidden_layers = len(layers)
        mirror = _check_memory(part, quant, fmt, offload_config, dev, dtype, host_mirror, share=len(devices))
        cache = ExpertCache(fmt, len(layers), E, offload_config, dev,
                            lambda j, e, layers=layers: load_blob(layers[j], e),
                            host_mirror=mirror)
        caches.append(cache)
        for j, i in enumerate(layers):
            mods.append(OffloadedExperts(i, cache, config.num_experts_per_tok, ACT2FN[config.hidden_act],
                                         offload_config.prefetch, cache_layer=j))
            model.model.layers[i].mlp.experts = mods[-1]
    for i, m in enumerate(mods):
        nxt = mods[i + 1] if i + 1 < L else None
        m.set_next_router(model.model.layers[i + 1].mlp.gate.weight if nxt else None, nxt)
    if len(devices) > 1:
        _hop_devices(model, layer_dev, devices)
    model.expert_cache = caches[0] if len(caches) == 1 else CacheGroup(caches)
    model.eval()
    return model
