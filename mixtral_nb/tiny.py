"""Small random Mixtral checkpoints in the original hub layout, for tests and demos.

Router weights are scaled up so that routing actually varies from token to token (with tiny random
weights every token would pick nearly the same experts, and the cache would never miss).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_config(layers: int = 4, experts: int = 8, hidden: int = 64, intermediate: int = 128,
                heads: int = 4, kv_heads: int = 2, vocab: int = 512, top_k: int = 2) -> dict:
    """A MixtralConfig dict with the real model's structure at toy sizes."""
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_local_experts": experts,
        "num_experts_per_tok": top_k, "hidden_act": "silu", "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "dtype": "float32", "router_jitter_noise": 0.0,
    }


def write_tiny(path: str | os.PathLike, seed: int = 0, shards: int = 1, router_scale: float = 4.0,
               **sizes: int) -> Path:
    """Write a random Mixtral in the hub layout (``block_sparse_moe.experts.N.wK``) to ``path``."""
    cfg = tiny_config(**sizes)
    g = torch.Generator().manual_seed(seed)
    H, inter, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = H // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def rnd(*shape: int, scale: float = 0.0) -> torch.Tensor:
        s = scale or shape[-1] ** -0.5
        return torch.randn(*shape, generator=g) * s

    tensors = {"model.embed_tokens.weight": rnd(V, H, scale=1.0), "model.norm.weight": 1 + 0.1 * rnd(H, scale=1.0),
               "lm_head.weight": rnd(V, H)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = 1 + 0.1 * rnd(H, scale=1.0)
        tensors[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * rnd(H, scale=1.0)
        tensors[f"{p}.self_attn.q_proj.weight"] = rnd(H, H)
        tensors[f"{p}.self_attn.k_proj.weight"] = rnd(kv, H)
        tensors[f"{p}.self_attn.v_proj.weight"] = rnd(kv, H)
        tensors[f"{p}.self_attn.o_proj.weight"] = rnd(H, H)
        tensors[f"{p}.block_sparse_moe.gate.weight"] = rnd(cfg["num_local_experts"], H, scale=router_scale * H ** -0.5)
        for e in range(cfg["num_local_experts"]):
            q = f"{p}.block_sparse_moe.experts.{e}"
            tensors[f"{q}.w1.weight"] = rnd(inter, H)
            tensors[f"{q}.w3.weight"] = rnd(inter, H)
            tensors[f"{q}.w2.weight"] = rnd(H, inter)

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"))
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in names[s * per:(s + 1) * per]}
            save_file(part, str(out / fname))
            weight_map.update({k: fname for k in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return out


# --------------------------------------------------------------------------- other MoE families

_COMMON = {"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu"}
# per family: toy sizes with the real model's structure (shared experts, dense layers, q/k norms, MLA, biases)
TINY_FAMILIES: dict[str, dict] = {
    "mixtral": {"num_local_experts": 8, "intermediate_size": 96, "num_experts_per_tok": 2, "router_jitter_noise": 0.0},
    "phimoe": {"num_local_experts": 8, "intermediate_size": 96, "num_experts_per_tok": 2, "attention_bias": True,
               "lm_head_bias": True, "router_jitter_noise": 0.0, "input_jitter_noise": 0.0},
    "qwen3_moe": {"num_experts": 16, "moe_intermediate_size": 32, "intermediate_size": 96, "num_experts_per_tok": 4,
                  "head_dim": 16, "norm_topk_prob": True, "mlp_only_layers": [1], "decoder_sparse_step": 1},
    "qwen2_moe": {"num_experts": 8, "moe_intermediate_size": 32, "intermediate_size": 96, "num_experts_per_tok": 2,
                  "shared_expert_intermediate_size": 64, "norm_topk_prob": False, "mlp_only_layers": [0],
                  "decoder_sparse_step": 1},
    "olmoe": {"num_experts": 16, "intermediate_size": 32, "num_experts_per_tok": 4, "norm_topk_prob": False},
    "deepseek_v2": {"n_routed_experts": 8, "moe_intermediate_size": 32, "intermediate_size": 96,
                    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32,
                    "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
                    "topk_method": "greedy", "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                    "num_key_value_heads": 4},  # MLA expands keys and values to every head
}


def tiny_family_config(model_type: str, **overrides: object) -> dict:
    """A config dict of ``model_type`` (a key of :data:`TINY_FAMILIES`) at toy sizes."""
    from .families import FAMILIES

    if model_type not in TINY_FAMILIES:
        raise ValueError(f"no tiny config for {model_type!r}: use one of {sorted(TINY_FAMILIES)}")
    fam = FAMILIES[model_type]
    return {"model_type": model_type, "architectures": [fam.architecture], **_COMMON, **TINY_FAMILIES[model_type],
            **overrides}


def write_tiny_family(path: str | os.PathLike, model_type: str, seed: int = 0, router_scale: float = 4.0,
                      fused: bool = False, **overrides: object) -> Path:
    """A random ``model_type`` model built with transformers' own config and model classes, written by
    its ``save_pretrained`` (the hub's per-expert layout; ``fused=True``: transformers 5's fused one).

    Routers are scaled up so that routing varies from token to token, and norms and biases are
    perturbed away from their initial 1/0 so that a weight loaded in the wrong place shows.
    """
    from .families import FAMILIES

    cfg_dict = tiny_family_config(model_type, **overrides)
    fam = FAMILIES[model_type]
    data = {k: v for k, v in cfg_dict.items() if k not in ("model_type", "architectures")}
    config = fam.make_config({**data, "architectures": [fam.architecture], "dtype": "float32"})
    torch.manual_seed(seed)
    model = fam.model_class()(config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            H = p.shape[-1]
            if name.endswith(f"mlp.{fam.router}.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * router_scale * H ** -0.5)
            elif p.ndim == 1:
                p.copy_((1.0 if name.endswith("norm.weight") or name.endswith("layernorm.weight") else 0.0)
                        + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * H ** -0.5)
    out = Path(path)
    model.save_pretrained(out, save_original_format=not fused)
    return out
