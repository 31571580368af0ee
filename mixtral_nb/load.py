"""load(): one call that gives notebooks and the CLI a chat-ready (model, tokenizer).

"auto" means Mixtral-8x7B-Instruct (the article's pre-quantized checkpoint, with a memory plan for
this machine) when a CUDA GPU is present, and the embedded SmolLM2-based Mixtral otherwise, so the
same notebook runs on a Colab T4 and on a laptop or CI machine. A folder or hub id of any supported
family (:mod:`mixtral_nb.families`: Mixtral-8x7B/8x22B, Qwen3-30B-A3B, Phi-3.5-MoE, OLMoE,
DeepSeek-V2-Lite, Qwen2-MoE) loads the same way, with the model's own tokenizer and chat template;
an unsupported architecture is refused from its config.json before anything large is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .build import build_model, parse_devices
from .checkpoint import CheckpointError, detect_layout, download, load_config, quantize, read_json
from .checkpoint.quantize import check_hub_family
from .config import OffloadConfig, QuantConfig
from .embedded import build_embedded
from .families import family_of, planner_dims
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


def _folder_quant(folder: Path) -> QuantConfig | None:
    """A project folder's own quantization (its manifest); None (the article's mix) for other layouts."""
    if detect_layout(folder) != "project":
        return None
    try:
        return QuantConfig.from_json(read_json(folder / "manifest.json")["quant"])
    except (KeyError, TypeError, ValueError):
        return None  # a malformed manifest: build_model names the problem when it opens the folder


def tokenizer_for(folder: Path) -> Any:
    """The folder's own tokenizer (and its chat template) if it ships one, else, for Mixtral, the exact
    Mixtral tokenizer (no HF token); another family without tokenizer files is one clear error."""
    folder = Path(folder)
    if any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer  # heavy: the package import stays fast without it

        return AutoTokenizer.from_pretrained(folder)
    if (folder / "config.json").exists():
        family = family_of(load_config(folder))
        if family.model_type != "mixtral":
            raise CheckpointError(f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json): a "
                                  f"{family.architecture} needs its own tokenizer and chat template; download them "
                                  f"with the model (e.g. from {family.example.split(' ')[0]})")
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
            d = planner_dims(load_config(folder))
            cfg = OffloadConfig.for_model(d["num_hidden_layers"], d["num_local_experts"], offload_per_layer=4,
                                          buffer_size=2, prefetch=1)
        return build_model(target_all or dev, None, cfg, folder, keep_previous=keep_previous), tokenizer_for(tok_dir)
    folder = Path(name)
    if not folder.exists():
        local = cache_root() / "hub" / name.replace("/", "--")
        check_hub_family(name, token=token)  # an unsupported architecture: refused before the download
        folder = download(name, local, token=token)
    target: Any = target_all or dev
    if offload_config is None:
        # the folder's own sizes, counted per family at its own quantization (Mixtral-8x7B's give the same
        # plan as before); device None: every GPU (Kaggle's 2 x T4)
        p = detect(device, model=load_config(folder), quant=quant_config or _folder_quant(folder))
        offload_config = p.offload_config()
        if device is None:
            target = p.devices()
    return (build_model(target, quant_config, offload_config, folder, keep_previous=keep_previous),
            tokenizer_for(folder))
