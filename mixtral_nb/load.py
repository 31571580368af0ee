"""load(): one call that gives notebooks and the CLI a chat-ready (model, tokenizer).

"auto" means Mixtral-8x7B-Instruct (the article's pre-quantized checkpoint, with a memory plan for
this machine) when a CUDA GPU is present, and the embedded SmolLM2-based Mixtral otherwise, so the
same notebook runs on a Colab T4 and on a laptop or CI machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .build import build_model, parse_devices
from .checkpoint import download, load_config, quantize
from .config import OffloadConfig, QuantConfig
from .embedded import build_embedded
from .paths import cache_root
from .planner import detect
from .tokenizer import mixtral_tokenizer

__all__ = ["EMBEDDED", "MIXTRAL_REPO", "cache_root", "default_device", "embedded_checkpoint", "embedded_quant_config",
           "load", "resolve", "tokenizer_for"]

MIXTRAL_REPO = "lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo"
EMBEDDED = "embedded"


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve(model: str) -> str:
    """"auto" -> the Mixtral repo with a GPU, the embedded model without one."""
    if model == "auto":
        return MIXTRAL_REPO if torch.cuda.is_available() else EMBEDDED
    return model


def embedded_quant_config() -> QuantConfig:
    """The embedded model's default: the smallest measured setting whose multi-turn answers stay
    sensible (``quality.TURNS``): 3-bit g32 experts, attention kept in floating point
    (notebooks/quality_embedded.json). With 4-bit attention the same experts still say Paris, but a
    follow-up then names the wrong language."""
    meta = {"scale_quant_params": {"nbits": 8, "group_size": 128}, "zero_quant_params": {"nbits": 8, "group_size": None}}
    ffn = {"weight_quant_params": {"nbits": 3, "group_size": 32, "axis": 1}, **meta}
    return QuantConfig(ffn_config=ffn, attn_config=None)


def embedded_checkpoint(quant: QuantConfig | None = None, progress: bool = False) -> Path:
    """The embedded model quantized into the project format (built once, then reused)."""
    quant = quant or embedded_quant_config()
    src = build_embedded()
    tag = "fp" if quant.ffn is None else f"e{quant.ffn['nbits']}g{quant.ffn['group_size']}"
    tag += "-afp" if quant.attn is None else f"-a{quant.attn['nbits']}g{quant.attn['group_size']}"
    dst = src.parent / f"{src.name}-{tag}"
    if not (dst / "COMPLETE").exists():
        quantize(src, dst, quant, device="cpu", progress=progress)
    return dst


def tokenizer_for(folder: Path) -> Any:
    """The folder's own tokenizer if it ships one, else the exact Mixtral tokenizer (no HF token)."""
    if any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer  # heavy: the package import stays fast without it

        return AutoTokenizer.from_pretrained(folder)
    return mixtral_tokenizer()


def load(model: str = "auto", device: str | torch.device | list | None = None, offload_config: OffloadConfig | None = None,
         quant_config: QuantConfig | None = None, token: str | None = None, *,
         keep_previous: bool = False) -> tuple[Any, Any]:
    """Build the chat model named by ``model`` ("auto", "embedded", a folder or a hub id) and its tokenizer.

    A model loaded earlier from the same files on the same device is released first (a re-run cell
    must not hold two copies); ``keep_previous=True`` keeps it (see ``build_model``).
    """
    if isinstance(device, (list, tuple)) and len(device) == 1:
        device = device[0]
    if isinstance(device, (list, tuple)):  # several GPUs: build_model splits the layers across them
        devs = parse_devices(device)
        dev, target_all = devs[0], devs
    else:
        dev = parse_devices(device)[0] if device is not None else default_device()
        target_all = None
    name = resolve(model)
    if name == EMBEDDED:
        folder = embedded_checkpoint(quant_config)
        tok_dir = build_embedded()
        cfg = offload_config
        if cfg is None:
            c = load_config(folder)
            cfg = OffloadConfig.for_model(c.num_hidden_layers, c.num_local_experts, offload_per_layer=4, buffer_size=2,
                                          prefetch=1)
        return build_model(target_all or dev, None, cfg, folder, keep_previous=keep_previous), tokenizer_for(tok_dir)
    folder = Path(name)
    if not folder.exists():
        folder = download(name, cache_root() / "hub" / name.replace("/", "--"), token=token)
    target: Any = target_all or dev
    if offload_config is None:
        p = detect(device)  # device None: every GPU of the machine (Kaggle's 2 x T4 split the layers)
        offload_config = p.offload_config()
        if device is None:
            target = p.devices()
    return (build_model(target, quant_config, offload_config, folder, keep_previous=keep_previous),
            tokenizer_for(folder))
