"""Checkpoint folders: reading original HF Mixtral folders and reading/writing the project format.

Project format (self-describing; loading needs no settings from code):

    config.json                    the HF MixtralConfig
    trunk.safetensors              everything but the experts, transformers-5 names; a quantized
                                   attention projection is stored as its segments, e.g.
                                   ``model.layers.3.self_attn.q_proj.q4`` / ``.scale_q`` / ...
    experts-LLL.safetensors        one uint8 tensor ``blobs`` [E, blob_bytes] per layer: expert e's
                                   blob is row e, ready to copy into a pinned or GPU slot as is
    manifest.json                  format version, quant settings, expert blob layout, attention
                                   specs, file sizes; written last, then the ``COMPLETE`` marker

Every file is written to a temporary name and renamed, so a folder without ``COMPLETE`` is never
taken for a finished checkpoint, and a rerun of :func:`quantize` skips layers already written.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import QuantConfig
from .expert import ExpertFormat
from .quant import QSpec, quantize as quantize_tensor

FORMAT = "mixtral_nb"
VERSION = 1
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, corrupt or not what was asked for."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: is this a Mixtral checkpoint folder?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-download or re-create the checkpoint") from None


def load_config(folder: Path):
    """The MixtralConfig of a folder, refusing other architectures with a clear message."""
    from transformers import MixtralConfig

    data = _read_json(folder / "config.json")
    arch = data.get("architectures") or []
    if data.get("model_type") != "mixtral" and "MixtralForCausalLM" not in arch:
        raise CheckpointError(
            f"{folder / 'config.json'} describes model_type={data.get('model_type')!r} {arch}, not Mixtral: "
            "mixtral_nb runs MixtralForCausalLM checkpoints only"
        )
    data.pop("model_type", None)
    return MixtralConfig(**data)


class _Files:
    """Lazily opened safetensors files with a clear error for missing or corrupt ones."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: dict[str, Any] = {}

    def get(self, name: str):
        if name not in self._open:
            path = self.folder / name
            if not path.exists():
                raise CheckpointError(f"shard {path} is missing: download it again (or the whole folder)")
            try:
                self._open[name] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(
                    f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; delete it and download again"
                ) from None
        return self._open[name]

    def tensor(self, name: str, key: str) -> Tensor:
        try:
            return self.get(name).get_tensor(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.folder / name}: cannot read tensor {key} ({e}): the file is truncated or corrupt") from None


class HFCheckpoint:
    """An original (floating-point) Mixtral folder in either hub key layout."""

    kind = "hf"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.config = load_config(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            self.weight_map: dict[str, str] = _read_json(index)["weight_map"]
        else:
            single = folder / "model.safetensors"
            if not single.exists():
                raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
            self.files = _Files(folder)
            self.weight_map = {k: "model.safetensors" for k in self.files.get("model.safetensors").keys()}
        self.files = _Files(folder)
        for name in sorted(set(self.weight_map.values())):
            if not (folder / name).exists():
                raise CheckpointError(f"shard {folder / name} is missing (listed in the index): download it again")
        self.fused = any(".mlp.experts.gate_up_proj" in k for k in self.weight_map)

    def _t(self, key: str) -> Tensor:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {key} is missing from the checkpoint")
        return self.files.tensor(self.weight_map[key], key)

    def trunk(self) -> Iterator[tuple[str, Tensor]]:
        """Non-expert tensors under transformers-5 names (router: ``mlp.gate.weight``)."""
        for key in self.weight_map:
            if ".experts." in key:
                continue
            name = key.replace(".block_sparse_moe.gate.", ".mlp.gate.")
            yield name, self._t(key)

    def expert(self, layer: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """w1 (gate), w3 (up), w2 (down) of one expert, float."""
        p = f"model.layers.{layer}"
        if self.fused:
            key = f"{p}.mlp.experts.gate_up_proj"
            gu = self.files.get(self.weight_map[key]).get_slice(key)[e]
            inter = gu.shape[0] // 2
            dkey = f"{p}.mlp.experts.down_proj"
            down = self.files.get(self.weight_map[dkey]).get_slice(dkey)[e]
            return gu[:inter], gu[inter:], down
        q = f"{p}.block_sparse_moe.experts.{e}"
        return self._t(f"{q}.w1.weight"), self._t(f"{q}.w3.weight"), self._t(f"{q}.w2.weight")


class ProjectCheckpoint:
    """A folder written by :func:`quantize` (or :func:`save_project`)."""

    kind = "project"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        if not (folder / "COMPLETE").exists():
            raise CheckpointError(
                f"{folder} is an unfinished mixtral_nb checkpoint (no COMPLETE marker): rerun quantize() to finish it"
            )
        self.manifest = _read_json(folder / "manifest.json")
        for key in ("format", "version", "quant", "expert_format", "attn_specs", "files"):
            if key not in self.manifest:
                raise CheckpointError(f"{folder / 'manifest.json'} has no '{key}' field: re-create the checkpoint with quantize()")
        if self.manifest["version"] > VERSION:
            raise CheckpointError(f"{folder} uses format version {self.manifest['version']}; upgrade mixtral_nb")
        for name, size in self.manifest["files"].items():
            path = folder / name
            if not path.exists():
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-create or re-download it")
            if path.stat().st_size != size:
                raise CheckpointError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {size}: truncated or corrupt; re-create it"
                )
        self.config = load_config(folder)
        self.quant = QuantConfig.from_json(self.manifest["quant"])
        self.fmt = ExpertFormat.from_json(self.manifest["expert_format"])
        self.attn_specs = {k: QSpec(**v) for k, v in self.manifest["attn_specs"].items()}
        self.files = _Files(folder)

    def trunk(self) -> Iterator[tuple[str, Tensor]]:
        f = self.files.get("trunk.safetensors")
        for key in f.keys():
            yield key, self.files.tensor("trunk.safetensors", key)

    def blob(self, layer: int, e: int) -> Tensor:
        name = f"experts-{layer:03d}.safetensors"
        return self.files.get(name).get_slice("blobs")[e]


def open_checkpoint(path: str | os.PathLike) -> HFCheckpoint | ProjectCheckpoint:
    """Detect a folder's layout and open it."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist: download() or quantize() it first")
    if (folder / "manifest.json").exists() or (folder / "COMPLETE").exists():
        return ProjectCheckpoint(folder)
    return HFCheckpoint(folder)


# ---------------------------------------------------------------------------------------------
# writing


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def attn_key(name: str) -> bool:
    return any(name.endswith(f"self_attn.{p}.weight") for p in ATTN)


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant_config: QuantConfig,
             device: str | torch.device | None = None, progress: bool = True) -> Path:
    """Original HF Mixtral folder -> project-format folder, one layer at a time (resumable).

    Peak host memory stays near one layer's experts; layers whose file already exists are skipped,
    so an interrupted run continues where it stopped.
    """
    src_ck = open_checkpoint(src)
    if not isinstance(src_ck, HFCheckpoint):
        raise CheckpointError(f"{src} is already a mixtral_nb checkpoint; quantize() reads original HF folders")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "COMPLETE").unlink(missing_ok=True)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = src_ck.config
    fmt = ExpertFormat.make(cfg.hidden_size, cfg.intermediate_size, quant_config.ffn, torch.float16)
    E, L = cfg.num_local_experts, cfg.num_hidden_layers
    from tqdm.auto import tqdm

    for layer in tqdm(range(L), desc="experts", disable=not progress):
        path = dst / f"experts-{layer:03d}.safetensors"
        if path.exists():
            continue
        blobs = torch.stack([fmt.encode(*(w.to(dev) for w in src_ck.expert(layer, e))) for e in range(E)])
        _atomic_save({"blobs": blobs}, path)

    trunk: dict[str, Tensor] = {}
    attn_specs: dict[str, dict[str, Any]] = {}
    for name, t in src_ck.trunk():
        if quant_config.attn is not None and attn_key(name):
            spec = QSpec.make(tuple(t.shape), quant_config.attn)
            base = name.removesuffix(".weight")
            for k, v in quantize_tensor(t.to(dev), spec).items():
                trunk[f"{base}.{k}"] = v.cpu()
            attn_specs[base] = spec.to_json()
        else:
            trunk[name] = t.to(torch.float16) if t.is_floating_point() else t
    _atomic_save(trunk, dst / "trunk.safetensors")
    cfg.save_pretrained(dst)
    files = {p.name: p.stat().st_size for p in sorted(dst.glob("*.safetensors"))}
    manifest = {"format": FORMAT, "version": VERSION, "quant": quant_config.to_json(),
                "expert_format": fmt.to_json(), "attn_specs": attn_specs, "files": files}
    _atomic_text(json.dumps(manifest, indent=1), dst / "manifest.json")
    _atomic_text("ok\n", dst / "COMPLETE")
    return dst


def layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None
