"""Full-size synthetic Mixtral checkpoints: the real files' names, keys, dtypes and shapes, random values.

Rehearsing the user's whole journey (download, convert, plan, build, chat) at full size needs the
checkpoints themselves, and a GPU machine without hub access cannot download them. So these writers
produce folders that every reader takes for the real thing:

- :func:`write_article_checkpoint`: the article's pre-quantized hqq 0.1.1 folder
  (``lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo``): ``model-00001-of-00257.safetensors``
  holds the trunk (fp16 embeddings, norms, routers and the 4-bit g64 attention, scale meta group 256),
  ``model-000NN`` (NN = 2 + layer * 8 + expert) one expert each (2-bit g16 w1/w2/w3, scale meta group
  128, unprefixed keys ``w1.W_q``, ``w1.meta.scale_q``, ...); the index maps full names to files.
- :func:`write_hf_checkpoint`: the original fp16 folder (``model-0000i-of-0000N.safetensors`` shards
  of at most 5 GB, index, config).

Values: codes are random bytes; the meta values make every dequantized weight W [N, K] have a
standard deviation near 1/sqrt(K) (so each layer's output stays O(1) and the residual stream grows
only like sqrt(layers), finite in fp16 at 32 layers); fp16 weights are random bit patterns with a
power-of-two magnitude near the same target; norms are near 1. Files are streamed: each tensor's
bytes are generated and written in chunks, so memory stays small whatever the file size, and each
file's bytes depend only on the seed and the file's name (deterministic, resumable).

Safety: the total size is computed first and checked against the free disk before anything is
written; the folder is written under a hidden sibling ``.NAME.partial`` and renamed into place at
the end (so an interrupted run never leaves a folder that looks complete; a rerun with the same
settings resumes from the files already finished). ``synthetic.json`` records the settings, so
asking again for an existing folder with the same settings returns it at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from .checkpoint import CheckpointError
from .checkpoint.hub import DISK_MARGIN, check_disk

MARKER = "synthetic.json"
INDEX = "model.safetensors.index.json"
VERSION = 1
HF_SHARD_BYTES = 5_000_000_000  # transformers' default max_shard_size ("5GB")
CHUNK = 32 * 1024 * 1024  # bytes generated and written at a time: bounds the writer's memory

# Mixtral-8x7B-Instruct-v0.1's config.json (fp16, as the article's folder is used)
MIXTRAL_8X7B_CONFIG: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000,
}
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}

# the article's quantization: (bits, group size, scale meta group size); zeros are 8-bit, one meta group
ARTICLE_EXPERTS = (2, 16, 128)
ARTICLE_ATTN = (4, 64, 256)
ROUTER_SCALE = 4.0  # router weights this many times 1/sqrt(hidden): routing varies from token to token

_ITEMSIZE = {"U8": 1, "F16": 2, "I32": 4}


@dataclass(frozen=True)
class _Tensor:
    """One tensor of a file: safetensors dtype, shape, and how its bytes are made."""

    dtype: str
    shape: tuple[int, ...]
    fill: tuple[Any, ...]  # ("bytes",) | ("const", value) | ("weight", std) | ("norm",)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


Layout = dict[str, dict[str, _Tensor]]
Headers = dict[str, dict[str, tuple[str, tuple[int, ...]]]]  # file -> key -> (safetensors dtype, shape)


# ---------------------------------------------------------------------------------------------
# layouts (no writing)


def mixtral_config(config: dict[str, Any] | None = None, num_layers: int | None = None) -> dict[str, Any]:
    """The config.json to write: Mixtral-8x7B-Instruct's (or ``config``), with ``num_layers`` layers."""
    cfg = copy.deepcopy(MIXTRAL_8X7B_CONFIG if config is None else dict(config))
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "num_local_experts", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int) or cfg[k] < 1]
    if missing:
        raise ValueError(f"config lacks positive integer {', '.join(missing)}: pass a Mixtral config.json dict "
                         "(or None for Mixtral-8x7B-Instruct's)")
    cfg.setdefault("model_type", "mixtral")
    cfg.setdefault("architectures", ["MixtralForCausalLM"])
    if num_layers is not None:
        if not isinstance(num_layers, int) or not 1 <= num_layers <= cfg["num_hidden_layers"]:
            raise ValueError(f"num_layers={num_layers!r}: give 1..{cfg['num_hidden_layers']} (the config's layers), "
                             "or None for all of them")
        cfg["num_hidden_layers"] = num_layers
    return cfg


def _shapes(cfg: dict[str, Any]) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
    H, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    attn = {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q)}
    return attn, {"w1": (inter, H), "w2": (H, inter), "w3": (inter, H)}


def _hqq_linear(n: int, k: int, nbits: int, group: int, scale_group: int) -> dict[str, _Tensor]:
    """hqq 0.1.1's tensors of a [n, k] weight (axis 0): codes [group, M] packed in rows of 8/nbits codes,
    8-bit scales in meta groups of ``scale_group`` (strided by M/scale_group), 8-bit zeros in one group."""
    if nbits not in (1, 2, 4, 8):
        raise ValueError(f"{nbits}-bit codes: the synthetic writer packs 1, 2, 4 or 8 bits into uint8")
    m = n * k // group
    if (n * k) % group or m % scale_group or (group * nbits) % 8:
        raise ValueError(f"a {n}x{k} weight does not split into groups of {group} and scale meta groups of "
                         f"{scale_group}: choose sizes that divide")
    levels = 1 << nbits
    step = k ** -0.5 / math.sqrt((levels * levels - 1) / 12.0)  # uniform codes * step: std 1/sqrt(k)
    mid = (levels - 1) / 2.0
    return {
        "W_q": _Tensor("U8", (group * nbits // 8, m), ("bytes",)),
        "meta.scale_q": _Tensor("U8", (scale_group, m // scale_group), ("bytes",)),
        "meta.meta_scale.scale": _Tensor("F16", (1, m // scale_group), ("const", step / 255.0)),
        "meta.meta_scale.zero": _Tensor("F16", (1, m // scale_group), ("const", -127.5)),  # s in [0.5, 1.5] step
        "meta.zero_q": _Tensor("U8", (1, m), ("bytes",)),
        "meta.meta_zero.scale": _Tensor("F16", (), ("const", 1.0 / 255.0)),
        "meta.meta_zero.zero": _Tensor("F16", (), ("const", -(mid - 0.5) * 255.0)),  # z in mid +- 0.5
    }


def _trunk_plain(cfg: dict[str, Any], router_key: str) -> Iterator[tuple[str, _Tensor]]:
    H, V, E = cfg["hidden_size"], cfg["vocab_size"], cfg["num_local_experts"]
    yield "model.embed_tokens.weight", _Tensor("F16", (V, H), ("weight", 1.0))
    yield "model.norm.weight", _Tensor("F16", (H,), ("norm",))
    if not cfg.get("tie_word_embeddings"):
        yield "lm_head.weight", _Tensor("F16", (V, H), ("weight", H ** -0.5))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", _Tensor("F16", (H,), ("norm",))
        yield f"{p}.post_attention_layernorm.weight", _Tensor("F16", (H,), ("norm",))
        yield f"{p}.{router_key}", _Tensor("F16", (E, H), ("weight", ROUTER_SCALE * H ** -0.5))


def article_layout(config: dict[str, Any] | None = None, num_layers: int | None = None) -> Headers:
    """{file name: {key inside the file: (safetensors dtype, shape)}} of the article's folder."""
    return _public(_article_layout(mixtral_config(config, num_layers)))


def hf_layout(config: dict[str, Any] | None = None, num_layers: int | None = None,
              shard_bytes: int = HF_SHARD_BYTES) -> Headers:
    """{file name: {key: (safetensors dtype, shape)}} of the original fp16 folder."""
    return _public(_hf_layout(mixtral_config(config, num_layers), shard_bytes))


def _public(layout: Layout) -> Headers:
    return {name: {k: (t.dtype, t.shape) for k, t in entries.items()} for name, entries in layout.items()}


def _article_layout(cfg: dict[str, Any]) -> Layout:
    L, E = cfg["num_hidden_layers"], cfg["num_local_experts"]
    attn, ffn = _shapes(cfg)
    count = 1 + L * E
    name = lambda i: f"model-{i:05d}-of-{count:05d}.safetensors"  # noqa: E731
    trunk = dict(_trunk_plain(cfg, "block_sparse_moe.gate.weight"))
    for i in range(L):
        for proj, (n, k) in attn.items():
            for key, t in _hqq_linear(n, k, *ARTICLE_ATTN).items():
                trunk[f"model.layers.{i}.self_attn.{proj}.{key}"] = t
    layout: Layout = {name(1): trunk}
    for i in range(L):
        for e in range(E):
            layout[name(2 + i * E + e)] = {f"{w}.{key}": t for w, (n, k) in ffn.items()
                                           for key, t in _hqq_linear(n, k, *ARTICLE_EXPERTS).items()}
    return layout


def _article_weight_map(cfg: dict[str, Any], layout: Layout) -> dict[str, str]:
    names = list(layout)
    wm = {key: names[0] for key in layout[names[0]]}
    E = cfg["num_local_experts"]
    for j, name in enumerate(names[1:]):
        prefix = f"model.layers.{j // E}.block_sparse_moe.experts.{j % E}"
        wm.update({f"{prefix}.{key}": name for key in layout[name]})  # unprefixed inside the file
    return wm


def _hf_layout(cfg: dict[str, Any], shard_bytes: int) -> Layout:
    attn, ffn = _shapes(cfg)
    plain = dict(_trunk_plain(cfg, "block_sparse_moe.gate.weight"))
    order: list[tuple[str, _Tensor]] = [("model.embed_tokens.weight", plain.pop("model.embed_tokens.weight"))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        order += [(k, plain.pop(k)) for k in list(plain) if k.startswith(f"{p}.")]
        order += [(f"{p}.self_attn.{proj}.weight", _Tensor("F16", s, ("weight", s[1] ** -0.5))) for proj, s in attn.items()]
        for e in range(cfg["num_local_experts"]):
            order += [(f"{p}.block_sparse_moe.experts.{e}.{w}.weight", _Tensor("F16", s, ("weight", s[1] ** -0.5)))
                      for w, s in ffn.items()]
    order += list(plain.items())  # final norm, lm_head
    shards: list[dict[str, _Tensor]] = [{}]
    size = 0
    for key, t in order:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += t.nbytes
    n = len(shards)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}


def _data_order(entries: dict[str, _Tensor]) -> list[str]:
    """Wider dtypes first (every tensor stays aligned to its item size), then by name, as safetensors does."""
    return sorted(entries, key=lambda k: (-_ITEMSIZE[entries[k].dtype], k))


def _header(entries: dict[str, _Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header (8-byte length + JSON, padded with spaces to a multiple of 8)."""
    table: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in _data_order(entries):
        t = entries[key]
        table[key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(table, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def file_sizes(layout: dict[str, dict[str, Any]], metadata: dict[str, str] | None = None) -> dict[str, int]:
    """Exact size in bytes of every safetensors file of a layout (``article_layout``/``hf_layout``'s or internal)."""
    out = {}
    for name, entries in layout.items():
        ts = {k: t if isinstance(t, _Tensor) else _Tensor(t[0], tuple(t[1]), ("bytes",)) for k, t in entries.items()}
        out[name] = len(_header(ts, metadata)) + sum(t.nbytes for t in ts.values())
    return out


def safetensors_header(entries: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The header bytes the writer puts in front of a file with these (dtype, shape) entries."""
    return _header({k: _Tensor(d, tuple(s), ("bytes",)) for k, (d, s) in entries.items()}, metadata)


# ---------------------------------------------------------------------------------------------
# values


def _f16_bits(bits: np.ndarray, std: float) -> np.ndarray:
    """Random 16-bit patterns -> fp16 values of random sign with magnitude in [a, 2a), a a power of two
    chosen so that the standard deviation (a * 1.53) is within a factor of two of ``std``."""
    exp = math.floor(math.log2(std / math.sqrt(7 / 3)))
    if not -14 <= exp <= 15:
        raise ValueError(f"weight scale {std} is outside fp16's normal range")
    bits &= 0x83FF  # sign and mantissa
    bits |= (exp + 15) << 10
    return bits


def _chunks(t: _Tensor, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """A tensor's bytes, at most CHUNK at a time."""
    total = t.nbytes
    done = 0
    while done < total:
        n = min(CHUNK, total - done)
        kind = t.fill[0]
        if kind == "const":
            yield np.full(n // 2, t.fill[1], dtype=np.float16)
        else:
            raw = rng.bit_generator.random_raw(-(-n // 8))
            if kind == "bytes":
                yield raw.view(np.uint8)[:n]
            elif kind == "weight":
                yield _f16_bits(raw.view(np.uint16)[: n // 2], t.fill[1])
            elif kind == "norm":  # 1 + small: [1, 1.0625)
                bits = raw.view(np.uint16)[: n // 2]
                bits &= 0x003F
                bits |= 15 << 10
                yield bits
            else:
                raise AssertionError(kind)
        done += n


def _rng(seed: int, name: str) -> np.random.Generator:
    """Each file's own stream: its bytes depend on the seed and its name only (files resume independently)."""
    digest = hashlib.sha256(name.encode()).digest()
    return np.random.Generator(np.random.PCG64([seed, int.from_bytes(digest[:8], "little")]))


def _write_safetensors(path: Path, entries: dict[str, _Tensor], rng: np.random.Generator,
                       metadata: dict[str, str] | None = None, on_bytes: Any = None) -> None:
    """Stream one safetensors file to ``path`` (via ``path.tmp`` and a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_header(entries, metadata))
        for key in _data_order(entries):
            for chunk in _chunks(entries[key], rng):
                f.write(memoryview(chunk).cast("B"))
                if on_bytes is not None:
                    on_bytes(chunk.nbytes)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# writing


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def _complete(folder: Path, marker: dict[str, Any]) -> bool:
    """``folder`` holds a finished synthetic checkpoint written with exactly these settings."""
    try:
        got = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if got != marker:
        return False
    return all((folder / n).is_file() and (folder / n).stat().st_size == s for n, s in marker["files"].items())


def _write(kind: str, dst: str | os.PathLike, cfg: dict[str, Any], layout: Layout, weight_map: dict[str, str],
           seed: int, metadata: dict[str, str] | None, progress: bool, extra: dict[str, Any]) -> Path:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r}: give a non-negative integer")
    dst = Path(dst).expanduser()
    sizes = file_sizes(layout, metadata)
    total = sum(t.nbytes for entries in layout.values() for t in entries.values())  # tensor bytes, as transformers counts
    small = {"config.json": _json_bytes(cfg), "generation_config.json": _json_bytes(GENERATION_CONFIG),
             INDEX: _json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})}
    sizes.update({n: len(b) for n, b in small.items()})
    marker = {"format": "mixtral_nb-synthetic", "version": VERSION, "layout": kind, "seed": seed, **extra,
              "config": cfg, "files": sizes}
    marker = json.loads(json.dumps(marker))  # as read back from disk (tuples -> lists, ...)
    if dst.exists():
        if _complete(dst, marker):
            return dst
        if not dst.is_dir() or any(dst.iterdir()):
            raise CheckpointError(
                f"{dst} already exists and is not a synthetic {kind} checkpoint written with these settings "
                f"(seed {seed}, {cfg['num_hidden_layers']} layers, this config): delete it or choose another destination"
            )
    staging = dst.with_name(f".{dst.name}.partial")
    if staging.exists():
        try:
            same = json.loads((staging / MARKER).read_text()) == marker
        except (OSError, ValueError):
            same = False
        if not same:  # an unfinished run with other settings: its files are of no use
            shutil.rmtree(staging)
    done = {n for n, size in sizes.items() if (staging / n).is_file() and (staging / n).stat().st_size == size}
    check_disk({n: size for n, size in sizes.items() if n not in done}, dst, margin=DISK_MARGIN)
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise CheckpointError(f"cannot create {staging} next to {dst} (permission denied): choose a destination in a "
                              "folder you can write to") from None
    (staging / MARKER).write_bytes(_json_bytes(marker))
    for name, data in small.items():
        (staging / name).write_bytes(data)

    bar = tqdm(total=sum(sizes[n] for n in layout), unit="B", unit_scale=True, disable=not progress,
               desc=f"writing a synthetic {kind} checkpoint")
    try:
        for name, entries in layout.items():
            path = staging / name
            if path.is_file() and path.stat().st_size == sizes[name]:  # finished by an interrupted run
                bar.update(sizes[name])
                continue
            _write_safetensors(path, entries, _rng(seed, name), metadata, on_bytes=bar.update)
    finally:
        bar.close()
    if dst.exists():
        dst.rmdir()  # empty (checked above); rename needs the name free on some systems
    os.replace(staging, dst)
    return dst


def write_article_checkpoint(dst: str | os.PathLike, *, num_layers: int | None = None, seed: int = 0,
                             config: dict[str, Any] | None = None, progress: bool = False) -> Path:
    """Write the article's pre-quantized folder (hqq 0.1.1, 2-bit experts, 4-bit attention) with random codes.

    Same file names, keys, dtypes and shapes as ``lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo``
    (``config`` defaults to Mixtral-8x7B-Instruct's; ``num_layers`` keeps the first layers only).
    Returns ``dst``; an existing folder written with the same settings is returned as is.
    """
    cfg = mixtral_config(config, num_layers)
    layout = _article_layout(cfg)
    return _write("article", dst, cfg, layout, _article_weight_map(cfg, layout), seed, None, progress, {})


def write_hf_checkpoint(dst: str | os.PathLike, *, num_layers: int | None = None, seed: int = 0,
                        config: dict[str, Any] | None = None, progress: bool = False,
                        shard_bytes: int = HF_SHARD_BYTES) -> Path:
    """Write the original fp16 folder (``model-0000i-of-0000N.safetensors`` + index) with random weights.

    ``shard_bytes`` caps each shard's tensor bytes (transformers' 5 GB by default).
    """
    cfg = mixtral_config(config, num_layers)
    layout = _hf_layout(cfg, shard_bytes)
    wm = {key: name for name, entries in layout.items() for key in entries}
    return _write("hf", dst, cfg, layout, wm, seed, {"format": "pt"}, progress, {"shard_bytes": shard_bytes})
