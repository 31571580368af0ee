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
