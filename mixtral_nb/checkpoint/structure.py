"""Structural validation in one place: a config.json on its own, and a config against the tensors.

Every reader (original folders, the article's files, project folders) runs these checks when it
opens a folder, so bad input is refused before quantizing, converting or building starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

from ..families import FAMILIES, Family, UnsupportedModelError, family_for_dict, family_of, skeleton
from .errors import CheckpointError, read_json

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MAX_LAYERS = 1024  # far above any Mixtral; a larger count is a corrupt or foreign config
MAX_EXPERTS = 1024
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
# integer fields of a config: (name, smallest, largest); "experts" and "inter" are the family's own keys
INT_FIELDS = (("vocab_size", 1, 10**7), ("hidden_size", 1, 10**6), ("inter", 1, 10**7),
              ("num_hidden_layers", 1, MAX_LAYERS), ("num_attention_heads", 1, 10**5),
              ("num_key_value_heads", 1, 10**5), ("experts", 1, MAX_EXPERTS),
              ("num_experts_per_tok", 1, MAX_EXPERTS), ("max_position_embeddings", 1, 10**8))
BOOL_FIELDS = ("tie_word_embeddings", "use_cache", "output_router_logits", "output_attentions", "output_hidden_states",
               "return_dict", "is_encoder_decoder")
NONNEG_FLOAT_FIELDS = ("attention_dropout", "initializer_range", "router_aux_loss_coef", "router_jitter_noise")


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}: the file is corrupt or not a valid config; re-download it")


def check_config_dict(data: dict[str, Any], path: Path, family: Family | None = None) -> None:
    """Refuse a config.json whose fields cannot describe its family's model (types, bounds, top_k <= experts)."""
    fam = family or FAMILIES["mixtral"]
    ekey = fam.experts_field(data)
    keys = {"experts": ekey, "inter": fam.inter_key}
    for name, lo, hi in INT_FIELDS:
        name = keys.get(name, name)
        v = data.get(name)
        if name == "max_position_embeddings" and v is None:
            continue
        if name == "num_key_value_heads" and v is None and fam.model_type != "mixtral":
            continue  # transformers defaults it to num_attention_heads
        if type(v) is not int or not lo <= v <= hi:
            raise _bad(path, f"{name} is {v!r}, expected an integer between {lo} and {hi}")
    if data["num_experts_per_tok"] > data[ekey]:
        raise _bad(path, f"num_experts_per_tok={data['num_experts_per_tok']} (top-k) exceeds {ekey}={data[ekey]}")
    hd = data.get("head_dim")
    if hd is not None and (type(hd) is not int or hd < 1):
        raise _bad(path, f"head_dim is {hd!r}, expected a positive integer")
    if hd is None and fam.model_type != "deepseek_v2" and data["hidden_size"] % data["num_attention_heads"]:
        raise _bad(path, f"hidden_size={data['hidden_size']} is not a multiple of "
                         f"num_attention_heads={data['num_attention_heads']}")
    if data["num_attention_heads"] % (data.get("num_key_value_heads") or data["num_attention_heads"]):
        raise _bad(path, f"num_attention_heads={data['num_attention_heads']} is not a multiple of "
                         f"num_key_value_heads={data['num_key_value_heads']}")
    for name in ("dtype", "torch_dtype"):
        v = data.get(name)
        if v is not None and v not in FLOAT_DTYPES:
            raise _bad(path, f"{name} is {v!r}, expected one of {', '.join(FLOAT_DTYPES)}")
    for name in ("rms_norm_eps", "rope_theta"):
        v = data.get(name)
        if v is not None and (type(v) not in (int, float) or not 0 < v < math.inf):
            raise _bad(path, f"{name} is {v!r}, expected a positive number")
    for name in BOOL_FIELDS:
        if name in data and type(data[name]) is not bool:
            raise _bad(path, f"{name} is {data[name]!r}, expected true or false")
    for name in NONNEG_FLOAT_FIELDS:
        v = data.get(name, 0.0)
        if type(v) not in (int, float) or not 0 <= v < math.inf:
            raise _bad(path, f"{name} is {v!r}, expected a number >= 0")
    sw = data.get("sliding_window")
    if sw is not None and (type(sw) is not int or sw < (0 if data.get("use_sliding_window") is False else 1)):
        raise _bad(path, f"sliding_window is {sw!r}, expected a positive integer or null")
    act = data.get("hidden_act", "silu")
    from transformers.activations import ACT2FN  # transformers is heavy: imported when a config is read

    if not isinstance(act, str) or act not in ACT2FN:
        raise _bad(path, f"hidden_act is {act!r}, not an activation transformers knows")


def load_config(folder: Path) -> Any:
    """The transformers config of a folder (its family's config class), validated; architectures
    mixtral_nb does not run are refused with one message naming the model type and the supported list."""
    path = Path(folder) / "config.json"
    data = read_json(path)
    try:
        fam = family_for_dict(data, str(path))
    except UnsupportedModelError as e:
        raise CheckpointError(str(e)) from None
    check_config_dict(data, path, fam)
    data.pop("model_type", None)
    if "torch_dtype" in data:  # the name older configs use; transformers 5 warns about it
        data.setdefault("dtype", data.pop("torch_dtype"))
        data.pop("torch_dtype", None)
    try:
        return fam.make_config(data)
    except Exception as e:  # transformers validates some fields itself (rope settings, ...)
        raise _bad(path, f"transformers refuses it ({type(e).__name__}: {e})") from None


def config_fingerprint(folder: Path) -> str:
    """sha256 of a folder's config.json content (key order and whitespace do not matter)."""
    data = read_json(Path(folder) / "config.json")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attn_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """[out, in] of the four attention projections."""
    H, hd = config.hidden_size, head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q)}


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name (``model.layers.N.``), None for global tensors."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def attn_key(name: str) -> bool:
    return any(name.endswith(f"self_attn.{p}.weight") for p in ATTN)


def hf_shapes(config: Any, fused: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor an original checkpoint of this config must have (hub names), with its shape.

    Read from the family's transformers model on the meta device, so every family's trunk (q/k
    norms, biases, MLA projections, shared experts, dense layers) is exactly what transformers builds.
    """
    fam = family_of(config)
    sk = skeleton(config)
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in sk.shapes.items():
        if name == "lm_head.weight" and sk.tied:
            continue
        out[name if fused else fam.hub_name(name)] = shape
    if not sk.tied and "lm_head.weight" not in out:
        out["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    H, inter, E = sk.hidden, sk.intermediate, sk.num_experts
    for i in sk.moe_layers:
        if fused:
            gu, down = fam.fused_keys(i)
            out[gu], out[down] = (E, 2 * inter, H), (E, H, inter)
            continue
        for e in range(E):
            g, u, d = fam.expert_keys(i, e)
            out.update({g: (inter, H), u: (inter, H), d: (H, inter)})
    return out


IGNORED = ("rotary_emb.inv_freq",)  # buffers older exports store; never read


def check_extra(config: Any, present: set[str], expected: set[str], where: Path, allowed: set[str] = frozenset()) -> None:
    """Refuse tensors the config does not describe: a config with fewer layers (or experts) than the
    weights would otherwise drop them silently."""
    extra = sorted(k for k in present - expected - allowed if not k.endswith(IGNORED))
    if not extra:
        return
    layers = {layer_of(k) for k in extra} - {None}
    if layers and max(layers) >= config.num_hidden_layers:
        raise CheckpointError(
            f"{where}: the weights hold layer {max(layers)} but config.json says num_hidden_layers="
            f"{config.num_hidden_layers}: the config does not belong to these weights; use the config.json that came "
            "with them"
        )
    raise CheckpointError(f"{where}: tensors {extra[:3]}{' ...' if len(extra) > 3 else ''} are not part of a "
                          f"{family_of(config).architecture} with this config.json: the config does not belong to these weights")
