"""Model families: what differs between the MoE architectures mixtral_nb runs, as data.

Every family runs through its stock transformers model (``<Family>ForCausalLM``): its own router,
attention variant (q/k norms, MLA), norms, shared experts and dense layers stay transformers' code.
mixtral_nb replaces only ``mlp.experts`` of the MoE layers (transformers 5 calls it as
``experts(hidden, top_k_index, top_k_weights)`` in every family) and, with an attention quant
config, the resident projection matrices. So a family is described by:

- how its original (hub) checkpoint names things: the per-expert key pattern and the three
  matrices (``w1``/``w3``/``w2`` or ``gate_proj``/``up_proj``/``down_proj``), and the renames from
  hub names to transformers-5 module names (Mixtral's ``block_sparse_moe.gate`` is ``mlp.gate``);
- the config keys holding the expert count and the expert width;
- where the router sits (``mlp.gate`` or ``mlp.router``), which prefetch reads;
- whether the CUDA-graph Decoder can run it (every family but DeepSeek-V2, whose MLA decodes through
  transformers' forward, :class:`mixtral_nb.engine.HFEngine`).

Everything else (which layers are MoE layers, every parameter's shape, which linears stay resident)
is read from the family's transformers model built on the meta device, so it cannot drift from
transformers. Routing differences, for the record (all inside the stock routers): Mixtral, OLMoE,
Qwen softmax then top-k (Mixtral always renormalises, the others when ``norm_topk_prob``);
DeepSeek-V2 softmax, greedy or group-limited top-k, scaled by ``routed_scaling_factor``, no
renormalisation; Phi-3.5-MoE's sparsemixer. Shared experts (Qwen2-MoE, DeepSeek-V2) and dense
layers (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers / decoder_sparse_step) are part
of the resident trunk, quantized like attention.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .quant import QSpec

__all__ = ["FAMILIES", "Family", "UnsupportedModelError", "decoder_refusal", "family_of", "family_for_dict", "skeleton",
           "Skeleton", "kv_bytes_per_token", "planner_dims", "supported", "trunk_bytes"]


class UnsupportedModelError(ValueError):
    """A config describes an architecture mixtral_nb does not run."""


@dataclass(frozen=True)
class Family:
    """One MoE architecture, as the data the rest of mixtral_nb needs (see the module docstring)."""

    model_type: str
    architecture: str  # transformers class name, also what config.json's "architectures" lists
    config_class: str
    example: str  # a hub id, for messages and docs
    experts_key: str  # config key of the routed-expert count
    inter_key: str  # config key of one expert's intermediate width
    hub_expert: str  # per-expert key prefix in the hub layout; {layer} and {e} filled in
    hub_names: tuple[str, str, str]  # gate, up, down matrices in the hub layout
    renames: tuple[tuple[str, str], ...]  # hub name fragment -> transformers-5 fragment (trunk tensors)
    router: str  # attribute of the MoE block holding the router (weight [E, H])
    decoder: bool = False  # the CUDA-graph Decoder (decoder.py) implements this family

    def model_class(self) -> Any:
        import transformers  # heavy: the package import stays fast without it

        return getattr(transformers, self.architecture)

    def make_config(self, data: dict[str, Any]) -> Any:
        import transformers

        return getattr(transformers, self.config_class)(**data)

    def experts_field(self, data: dict[str, Any]) -> str:
        """The key holding the routed-expert count in a config.json: the family's own, or the name a
        transformers-5 ``save_pretrained`` writes for it (Qwen3's ``num_experts`` as ``num_local_experts``)."""
        for key in (self.experts_key, "num_local_experts", "num_experts", "n_routed_experts"):
            if key in data:
                return key
        return self.experts_key

    def trunk_name(self, key: str) -> str:
        """A hub-layout tensor name -> the transformers-5 parameter name."""
        for old, new in self.renames:
            key = key.replace(old, new)
        return key

    def hub_name(self, name: str) -> str:
        """The inverse of :meth:`trunk_name` (what an original folder calls a parameter)."""
        for old, new in reversed(self.renames):
            name = name.replace(new, old)
        return name

    def expert_keys(self, layer: int, e: int) -> tuple[str, str, str]:
        """Hub-layout keys of expert ``e`` of ``layer``: gate, up, down."""
        p = self.hub_expert.format(layer=layer, e=e)
        return tuple(f"{p}.{n}.weight" for n in self.hub_names)  # type: ignore[return-value]

    def fused_keys(self, layer: int) -> tuple[str, str]:
        """transformers-5 fused keys (``save_pretrained(save_original_format=False)``): gate_up, down."""
        return f"model.layers.{layer}.mlp.experts.gate_up_proj", f"model.layers.{layer}.mlp.experts.down_proj"


_MIX = "model.layers.{layer}.block_sparse_moe.experts.{e}"
_QWEN = "model.layers.{layer}.mlp.experts.{e}"
_GUD = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", "MixtralForCausalLM", "MixtralConfig", "mistralai/Mixtral-8x7B-Instruct-v0.1 (or 8x22B)",
           "num_local_experts", "intermediate_size", _MIX, ("w1", "w3", "w2"),
           ((".block_sparse_moe.gate.", ".mlp.gate."),), "gate", decoder=True),
    Family("phimoe", "PhimoeForCausalLM", "PhimoeConfig", "microsoft/Phi-3.5-MoE-instruct",
           "num_local_experts", "intermediate_size", _MIX, ("w1", "w3", "w2"),
           ((".block_sparse_moe.gate.", ".mlp.router."),), "router", decoder=True),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "Qwen/Qwen3-30B-A3B",
           "num_experts", "moe_intermediate_size", _QWEN, _GUD, (), "gate", decoder=True),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", "Qwen/Qwen1.5-MoE-A2.7B-Chat",
           "num_experts", "moe_intermediate_size", _QWEN, _GUD, (), "gate", decoder=True),
    Family("olmoe", "OlmoeForCausalLM", "OlmoeConfig", "allenai/OLMoE-1B-7B-0924-Instruct",
           "num_experts", "intermediate_size", _QWEN, _GUD, (), "gate", decoder=True),
    Family("deepseek_v2", "DeepseekV2ForCausalLM", "DeepseekV2Config", "deepseek-ai/DeepSeek-V2-Lite-Chat",
           "n_routed_experts", "moe_intermediate_size", _QWEN, _GUD, (), "gate"),
)}


def supported() -> str:
    """The supported architectures, for error messages."""
    return ", ".join(f"{f.model_type} ({f.architecture}, e.g. {f.example})" for f in FAMILIES.values())


def decoder_refusal(model_type: str) -> str | None:
    """Why the Decoder cannot run ``model_type`` (None: it can), in the words of an error message."""
    if model_type in FAMILIES and FAMILIES[model_type].decoder:
        return None
    runs = ", ".join(f.model_type for f in FAMILIES.values() if f.decoder)
    return f"runs {runs} models only; this model is {model_type}"


def family_for_dict(data: dict[str, Any], where: str = "config.json") -> Family:
    """The family a config.json (as a dict) describes; one clear error naming it and the supported list."""
    mt = data.get("model_type")
    arch = data.get("architectures")
    arch = arch if isinstance(arch, list) else []
    fam = FAMILIES.get(mt) if isinstance(mt, str) else None
    if fam is None and mt is None:
        fam = next((f for f in FAMILIES.values() if f.architecture in arch), None)
    if fam is None:
        hint = (" (DeepSeek-V2's own remote-code config: use a transformers-5 export with model_type deepseek_v2)"
                if isinstance(mt, str) and mt.startswith("deepseek") else "")
        raise UnsupportedModelError(
            f"{where} describes model_type={mt!r} {arch}, which mixtral_nb does not run{hint}: supported "
            f"architectures are {supported()}")
    return fam


def family_of(config: Any) -> Family:
    """The family of a transformers config object (or a config dict)."""
    if isinstance(config, dict):
        return family_for_dict(config)
    return family_for_dict({"model_type": getattr(config, "model_type", None),
                            "architectures": getattr(config, "architectures", None)}, type(config).__name__)


@dataclass(frozen=True)
class Skeleton:
    """What a config's transformers model holds, read from the model built on the meta device."""

    moe_layers: tuple[int, ...]  # model layers whose mlp holds routed experts
    num_experts: int
    hidden: int
    intermediate: int  # of one routed expert
    top_k: int
    shapes: dict[str, tuple[int, ...]]  # every trunk parameter (transformers-5 names, experts excluded)
    linears: dict[str, tuple[tuple[int, int], bool]]  # resident projections: [out, in], has bias
    tied: bool  # lm_head shares the embedding

    def attn_linears(self, family: Family) -> dict[str, tuple[int, int]]:
        """The projections an attention quant config quantizes: Mixtral's four attention projections
        (as always); for other families every resident ``*_proj`` linear (attention, shared experts,
        dense MLPs; their biases stay floating point)."""
        if family.model_type == "mixtral":
            return {k: s for k, (s, _) in self.linears.items() if ".self_attn." in k}
        return {k: s for k, (s, _) in self.linears.items()}


def _config_key(config: Any) -> str:
    return f"{type(config).__name__}:{config.to_json_string(use_diff=False)}"


def skeleton(config: Any) -> Skeleton:
    """The :class:`Skeleton` of a config (cached per config content)."""
    return _skeleton(_config_key(config), config)


_CACHE: dict[str, Skeleton] = {}


def _skeleton(key: str, config: Any) -> Skeleton:
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    import torch
    from torch import nn

    fam = family_of(config)
    with torch.device("meta"):
        model = fam.model_class()(config)
    moe, E, inter, H = [], 0, 0, config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            continue
        shapes[name] = tuple(p.shape)
    for i, layer in enumerate(model.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            moe.append(i)
            E, inter = experts.gate_up_proj.shape[0], experts.gate_up_proj.shape[1] // 2
    linears = {}
    for name, m in model.named_modules():
        last = name.rpartition(".")[2]
        if (isinstance(m, nn.Linear) and name.startswith("model.layers.") and ".experts" not in name
                and ("proj" in last) and m.in_features > 1 and m.out_features > 1):
            linears[name] = ((m.out_features, m.in_features), m.bias is not None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    sk = Skeleton(tuple(moe), int(E), H, int(inter), int(config.num_experts_per_tok), shapes, linears, tied)
    if len(_CACHE) > 16:
        _CACHE.clear()
    _CACHE[key] = sk
    return sk


def planner_dims(config: Any) -> dict[str, Any]:
    """A config in the planner's Mixtral terms (``planner.ModelSizes.of`` takes this dict): the MoE
    layers as ``num_hidden_layers``, routed experts and their width; attention sizes as the config
    gives them (an estimate for MLA; the expert blob size, which dominates, is passed exactly by
    build_model)."""
    sk = skeleton(config)
    d = json.loads(config.to_json_string(use_diff=False))
    heads = config.num_attention_heads
    out = {"num_hidden_layers": len(sk.moe_layers), "num_local_experts": sk.num_experts, "hidden_size": sk.hidden,
           "intermediate_size": sk.intermediate, "vocab_size": config.vocab_size, "num_attention_heads": heads,
           "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
           "tie_word_embeddings": sk.tied}
    hd = d.get("head_dim")
    if isinstance(hd, int) and hd > 0:
        out["head_dim"] = hd
    elif sk.hidden % heads:
        out["head_dim"] = max(1, sk.hidden // heads)
    return out


def trunk_bytes(config: Any, attn_quant: dict[str, Any] | None, dtype_bytes: int = 2) -> int:
    """Bytes of everything but the routed experts, exactly as build_model holds it: the projections
    ``Skeleton.attn_linears`` names in ``attn_quant``'s format (a ``QuantConfig.attn`` dict; None:
    floating point), every other trunk parameter at ``dtype_bytes`` (MLA, shared experts, dense
    layers, biases and norms included; quantized tensors as stored, without the blob alignment).
    The planner's ``ModelSizes`` assumes Mixtral's attention; this is the per-family figure for it."""
    fam, sk = family_of(config), skeleton(config)
    quantized = sk.attn_linears(fam) if attn_quant is not None else {}
    total = 0
    for name, shape in sk.shapes.items():
        if name == "lm_head.weight" and sk.tied:
            continue
        base, _, seg = name.rpartition(".")
        if base in quantized and seg == "weight":
            total += sum(seg.nbytes for seg in QSpec.make(quantized[base], attn_quant).layout().segments)
        else:
            n = 1
            for d in shape:
                n *= d
            total += n * dtype_bytes
    return total


def kv_bytes_per_token(config: Any, dtype_bytes: int = 2) -> int:
    """Bytes transformers' KV cache holds per token: every layer (dense ones too), keys and values at
    their own head widths (MLA caches keys of ``qk_nope + qk_rope`` and values of ``v_head_dim`` per
    head), so the planner's KV figure is right for DeepSeek-V2 and Qwen3's wide heads."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // heads
    k = getattr(config, "qk_head_dim", None) or hd
    v = getattr(config, "v_head_dim", None) or hd
    return config.num_hidden_layers * kv * (k + v) * dtype_bytes
