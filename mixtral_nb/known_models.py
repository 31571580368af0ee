"""The full-size MoE models mixtral_nb knows by name, as their public config.json dimensions.

Why: the planner's verdicts and the synthetic benchmark need each model's exact shapes without a
download (no hub on the GPU test machine, no 60 GB fetch to ask "does it fit a T4?"). Only the
dimensions are recorded (layers, widths, experts, top-k, heads, MLA ranks, vocabulary), in the keys
transformers 5's config class of the family takes, ``model_type`` included; everything else takes
the config class's default. ``tests/test_known_models.py`` checks each total parameter count, read
from the model built on the meta device, against the published size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .families import family_for_dict, skeleton

__all__ = ["KNOWN_MODELS", "PUBLISHED_PARAMS", "known_config", "model_config", "param_count"]

_MIXTRAL = {"model_type": "mixtral", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1e6,
            "tie_word_embeddings": False, "router_jitter_noise": 0.0, "num_experts_per_tok": 2, "num_local_experts": 8,
            "num_key_value_heads": 8, "bos_token_id": 1, "eos_token_id": 2}
_QWEN = {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False,
         "decoder_sparse_step": 1, "mlp_only_layers": [], "vocab_size": 151936}

KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # mistralai/Mixtral-8x7B-Instruct-v0.1
    "mixtral-8x7b": {**_MIXTRAL, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 32768},
    # mistralai/Mixtral-8x22B-Instruct-v0.1
    "mixtral-8x22b": {**_MIXTRAL, "vocab_size": 32768, "hidden_size": 6144, "intermediate_size": 16384,
                      "num_hidden_layers": 56, "num_attention_heads": 48, "max_position_embeddings": 65536},
    # microsoft/Phi-3.5-MoE-instruct (its longrope scaling left out: dimensions only)
    "phi-3.5-moe": {"model_type": "phimoe", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 6400,
                    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "num_local_experts": 16, "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True,
                    "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 1e4, "max_position_embeddings": 131072,
                    "tie_word_embeddings": False, "router_jitter_noise": 0.0, "input_jitter_noise": 0.0,
                    "bos_token_id": 1, "eos_token_id": 32000},
    # Qwen/Qwen1.5-MoE-A2.7B(-Chat)
    "qwen1.5-moe-a2.7b": {**_QWEN, "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
                          "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                          "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False,
                          "max_position_embeddings": 8192, "bos_token_id": 151643, "eos_token_id": 151643},
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": {**_QWEN, "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                      "norm_topk_prob": True, "max_position_embeddings": 40960, "bos_token_id": 151643,
                      "eos_token_id": 151645},
    # allenai/OLMoE-1B-7B-0924(-Instruct)
    "olmoe-1b-7b": {"model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
                    "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
                    "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "hidden_act": "silu",
                    "rms_norm_eps": 1e-5, "rope_theta": 1e4, "max_position_embeddings": 4096,
                    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": 50279, "pad_token_id": 1},
    # deepseek-ai/DeepSeek-V2-Lite(-Chat) (its yarn rope scaling left out: dimensions only)
    "deepseek-v2-lite": {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
                         "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                         "num_attention_heads": 16, "num_key_value_heads": 16, "n_routed_experts": 64,
                         "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                         "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                         "v_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                         "routed_scaling_factor": 1.0, "norm_topk_prob": False, "hidden_act": "silu",
                         "rms_norm_eps": 1e-6, "rope_theta": 1e4, "max_position_embeddings": 163840,
                         "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001},
}

# total parameters as the model cards state them (what the parameter-count test holds the configs to)
PUBLISHED_PARAMS: dict[str, float] = {"mixtral-8x7b": 46.7e9, "mixtral-8x22b": 141e9, "phi-3.5-moe": 41.9e9,
                                      "qwen1.5-moe-a2.7b": 14.3e9, "qwen3-30b-a3b": 30.5e9, "olmoe-1b-7b": 6.9e9,
                                      "deepseek-v2-lite": 15.7e9}


def known_config(name: str) -> dict[str, Any]:
    """A copy of ``KNOWN_MODELS[name]``; an unknown name is one error naming it and the known ones."""
    if not isinstance(name, str) or name not in KNOWN_MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(KNOWN_MODELS)}, or a local folder with a "
                         "config.json")
    return copy.deepcopy(KNOWN_MODELS[name])


def model_config(name: str | dict[str, Any]) -> Any:
    """A transformers config object for a known model name, a local folder holding config.json, or a
    config dict (the family from its ``model_type``; an unsupported one is one clear error)."""
    if isinstance(name, dict):
        data, where = dict(name), "config"
    elif isinstance(name, str) and name in KNOWN_MODELS:
        data, where = known_config(name), name
    elif isinstance(name, str) and (Path(name) / "config.json").is_file():
        where = str(Path(name) / "config.json")
        try:
            data = json.loads(Path(where).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{where} is not readable JSON ({e}): pass a model's config.json folder") from None
    else:
        known_config(str(name))  # raises, naming the known models
        raise AssertionError  # pragma: no cover
    fam = family_for_dict(data, where)
    data = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "auto_map")}
    return fam.make_config({**data, "architectures": [fam.architecture]})


def param_count(config: Any) -> int:
    """Total parameters of a config's model (routed experts included), from its meta-device skeleton."""
    sk = skeleton(config)
    total = 0
    for name, shape in sk.shapes.items():
        if name == "lm_head.weight" and sk.tied:
            continue
        n = 1
        for d in shape:
            n *= d
        total += n
    return total + len(sk.moe_layers) * sk.num_experts * 3 * sk.hidden * sk.intermediate

