"""Checkpoint folders: reading original HF Mixtral folders and reading/writing the project format.

Project format (self-describing; loading needs no settings from code):

    config.json                    the HF MixtralConfig
    trunk.safetensors              everything but the experts, transformers-5 names; a quantized
                                   attention projection is stored as its segments, e.g.
                                   ``model.layers.3.self_attn.q_proj.q4`` / ``.scale_q`` / ...
    experts-LLL.safetensors        one uint8 tensor ``blobs`` [E, blob_bytes] per layer: expert e's
                                   blob is row e, ready to copy into a pinned or GPU slot as is
    manifest.json                  format version, quant settings, expert blob layout, attention
                                   specs, file sizes, where it came from; written last, then ``COMPLETE``
    progress.json                  the settings and source fingerprint the folder is being written with

Writing is streamed and resumable: each layer's experts and its trunk tensors (attention, norms,
router) are written as soon as they are ready (``parts/layer-LLL.safetensors`` holds the latter
until the end, when the parts are merged into ``trunk.safetensors``), every file goes to a
temporary name and is renamed, and ``COMPLETE`` is written last. So a folder without ``COMPLETE``
is never taken for a finished checkpoint, and a rerun with the same settings skips finished layers.

Every reader validates a folder before any long work starts: config architecture, every shard's
safetensors header against its file size (truncated or overwritten files), the expected Mixtral
tensors and their shapes, and the quant settings against the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

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
FIX_FILE = "delete it and download (or re-create) it again"

# bytes per element of the dtypes a safetensors header may name
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, corrupt or not what was asked for."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: is this a Mixtral checkpoint folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): re-download or re-create the checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object: re-download or re-create the checkpoint")
    return data


def load_config(folder: Path):
    """The MixtralConfig of a folder, refusing other architectures with a clear message."""
    from transformers import MixtralConfig

    data = _read_json(Path(folder) / "config.json")
    arch = data.get("architectures") or []
    if data.get("model_type") != "mixtral" and "MixtralForCausalLM" not in arch:
        raise CheckpointError(
            f"{Path(folder) / 'config.json'} describes model_type={data.get('model_type')!r} {arch}, not Mixtral: "
            "mixtral_nb runs MixtralForCausalLM checkpoints only; point it at a Mixtral folder"
        )
    data.pop("model_type", None)
    if "torch_dtype" in data:  # the name older configs use; transformers 5 warns about it
        data.setdefault("dtype", data.pop("torch_dtype"))
    return MixtralConfig(**data)


def config_fingerprint(folder: Path) -> str:
    """sha256 of a folder's config.json content (key order and whitespace do not matter)."""
    data = _read_json(folder / "config.json")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attn_shapes(config) -> dict[str, tuple[int, int]]:
    """[out, in] of the four attention projections."""
    H, hd = config.hidden_size, head_dim(config)
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q)}


# ---------------------------------------------------------------------------------------------
# safetensors files


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked against the file size without reading data.

    Catches truncated downloads and overwritten headers in milliseconds, before any long work.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"shard {path} is missing: download it again (or the whole folder)") from None
    if size < 8:
        raise CheckpointError(f"{path} is truncated ({size} bytes): {FIX_FILE}")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path} has a corrupt safetensors header (it claims {n} header bytes in a "
                                  f"{size}-byte file): {FIX_FILE}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON): {FIX_FILE}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: {FIX_FILE}")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        try:
            a, b = info["data_offsets"]
            count = math.prod(info["shape"])
            ok = 0 <= a <= b and b - a == count * _ST_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path} has a corrupt safetensors header (entry {key!r}): {FIX_FILE}")
        end = max(end, b)
    if 8 + n + end != size:
        raise CheckpointError(f"{path} has {size} bytes but its header describes {8 + n + end}: the file is "
                              f"truncated or corrupt; {FIX_FILE}")
    return header


class _Files:
    """Lazily opened safetensors files of one folder, with clear errors; ``close()`` unmaps them.

    Readers close the files after every layer so pages of finished layers do not stay mapped
    (mapped pages count in the process's resident memory).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._open: dict[str, Any] = {}
        self._headers: dict[str, dict[str, Any]] = {}

    def header(self, name: str) -> dict[str, Any]:
        if name not in self._headers:
            self._headers[name] = read_header(self.folder / name)
        return self._headers[name]

    def get(self, name: str):
        if name not in self._open:
            self.header(name)
            try:
                self._open[name] = safe_open(str(self.folder / name), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"{self.folder / name} is not a readable safetensors file ({e}): {FIX_FILE}") from None
        return self._open[name]

    def tensor(self, name: str, key: str) -> Tensor:
        f = self.get(name)
        try:
            return f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.folder / name}: cannot read tensor {key} ({e}): {FIX_FILE}") from None

    def slice(self, name: str, key: str):
        try:
            return self.get(name).get_slice(key)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.folder / name}: cannot read tensor {key} ({e}): {FIX_FILE}") from None

    def close(self) -> None:
        self._open.clear()

    def keep_only(self, names: set[str]) -> None:
        """Unmap every open file but ``names`` (readers going through a folder layer by layer)."""
        for name in [n for n in self._open if n not in names]:
            del self._open[name]


# ---------------------------------------------------------------------------------------------
# original (floating-point) folders


def layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def attn_key(name: str) -> bool:
    return any(name.endswith(f"self_attn.{p}.weight") for p in ATTN)


class HFCheckpoint:
    """An original (floating-point) Mixtral folder in either key layout, validated on open.

    Layouts: ``block_sparse_moe.experts.N.w{1,2,3}.weight`` (the hub's files, and what transformers 5
    ``save_pretrained`` writes by default) or the fused ``mlp.experts.gate_up_proj``/``down_proj``
    (``save_pretrained(save_original_format=False)``).
    """

    kind = "hf"

    def __init__(self, folder: Path) -> None:
        self.folder = folder = Path(folder)
        self.config = load_config(folder)
        self.files = _Files(folder)
        index = folder / "model.safetensors.index.json"
        if index.exists():
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index} has no weight_map: download it again")
            self.weight_map: dict[str, str] = wm
        elif (folder / "model.safetensors").exists():
            self.weight_map = {k: "model.safetensors" for k in self.files.header("model.safetensors")}
        else:
            raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json: "
                                  "download the whole checkpoint folder")
        for name in sorted(set(self.weight_map.values())):
            if not (folder / name).exists():
                raise CheckpointError(f"shard {folder / name} is missing (listed in the index): download it again")
            self.files.header(name)
        self.fused = any(".mlp.experts.gate_up_proj" in k for k in self.weight_map)
        self._check_tensors()
        self.layer_keys: dict[int | None, list[str]] = {}
        for key in self.weight_map:
            if ".experts." not in key:
                self.layer_keys.setdefault(layer_of(key), []).append(key)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a Mixtral of this config must have, with its shape."""
        c = self.config
        H, inter, E, V = c.hidden_size, c.intermediate_size, c.num_local_experts, c.vocab_size
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = (V, H)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}"
            out[f"{p}.input_layernorm.weight"] = (H,)
            out[f"{p}.post_attention_layernorm.weight"] = (H,)
            for proj, shape in attn_shapes(c).items():
                out[f"{p}.self_attn.{proj}.weight"] = shape
            if self.fused:
                out[f"{p}.mlp.gate.weight"] = (E, H)
                out[f"{p}.mlp.experts.gate_up_proj"] = (E, 2 * inter, H)
                out[f"{p}.mlp.experts.down_proj"] = (E, H, inter)
            else:
                out[f"{p}.block_sparse_moe.gate.weight"] = (E, H)
                for e in range(E):
                    q = f"{p}.block_sparse_moe.experts.{e}"
                    out.update({f"{q}.w1.weight": (inter, H), f"{q}.w3.weight": (inter, H), f"{q}.w2.weight": (H, inter)})
        return out

    def _check_tensors(self) -> None:
        for key, shape in self.expected_shapes().items():
            if key not in self.weight_map and self.fused and key.endswith(".mlp.gate.weight"):
                key = key.replace(".mlp.gate.", ".block_sparse_moe.gate.")
            if key not in self.weight_map:
                raise CheckpointError(
                    f"{self.folder}: tensor {key} is missing; config.json describes {self.config.num_hidden_layers} "
                    f"layers x {self.config.num_local_experts} experts: the download is incomplete, download it again"
                )
            name = self.weight_map[key]
            info = self.files.header(name).get(key)
            if info is None:
                raise CheckpointError(f"{self.folder / name} does not contain {key}, which the index places there: "
                                      f"{FIX_FILE}")
            if tuple(info["shape"]) != shape:
                raise CheckpointError(f"{self.folder / name}: tensor {key} has shape {tuple(info['shape'])}, "
                                      f"config.json implies {shape}: the config does not belong to these weights")

    def _t(self, key: str) -> Tensor:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {key} is missing from the checkpoint")
        return self.files.tensor(self.weight_map[key], key)

    def tensor(self, key: str) -> Tensor:
        return self._t(key)

    def trunk(self) -> Iterator[tuple[str, Tensor]]:
        """Non-expert tensors under transformers-5 names (router: ``mlp.gate.weight``)."""
        for key in self.weight_map:
            if ".experts." in key:
                continue
            yield trunk_name(key), self._t(key)

    def expert(self, layer: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """w1 (gate), w3 (up), w2 (down) of one expert, as stored (bf16/fp16/fp32)."""
        p = f"model.layers.{layer}"
        if self.fused:
            key = f"{p}.mlp.experts.gate_up_proj"
            self.files.keep_only({self.weight_map[key], self.weight_map[f"{p}.mlp.experts.down_proj"]})
            gu = self.files.slice(self.weight_map[key], key)[e]
            inter = gu.shape[0] // 2
            dkey = f"{p}.mlp.experts.down_proj"
            down = self.files.slice(self.weight_map[dkey], dkey)[e]
            return gu[:inter], gu[inter:], down
        q = f"{p}.block_sparse_moe.experts.{e}"
        keys = [f"{q}.w1.weight", f"{q}.w3.weight", f"{q}.w2.weight"]
        self.files.keep_only({self.weight_map[k] for k in keys if k in self.weight_map})
        w1, w3, w2 = (self._t(k) for k in keys)
        return w1, w3, w2

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this source: its config and its files' sizes (cheap; no hashing of data)."""
        names = sorted(set(self.weight_map.values()))
        return {"kind": "hf", "config_sha256": config_fingerprint(self.folder),
                "files": {n: (self.folder / n).stat().st_size for n in names}}

    def float_bytes(self) -> int:
        """Bytes of the non-expert tensors stored in fp16 (an upper bound on the trunk file)."""
        total = 0
        for keys in self.layer_keys.values():
            for key in keys:
                total += 2 * math.prod(self.files.header(self.weight_map[key])[key]["shape"])
        return total


def trunk_name(key: str) -> str:
    """Original key -> transformers-5 name (the router moved from ``block_sparse_moe`` to ``mlp``)."""
    return key.replace(".block_sparse_moe.gate.", ".mlp.gate.")


# ---------------------------------------------------------------------------------------------
# project folders


def _same_quant(given: dict[str, Any] | None, have: dict[str, Any] | None) -> bool:
    """Bits and group size decide what the files hold; the axis is a storage detail the manifest records
    (hqq 0.2.8's BaseQuantizeConfig defaults to axis 1, the article's files are axis 0)."""
    if given is None or have is None:
        return given is have
    return all(given[k] == have[k] for k in ("nbits", "group_size"))


def _describe(p: dict[str, Any] | None) -> str:
    return "floating point" if p is None else f"{p['nbits']}-bit group {p['group_size']}"


def check_quant(have: QuantConfig, given: QuantConfig | None, where: Path) -> None:
    """Refuse a quant_config that disagrees with what a folder's files hold (None accepts the files')."""
    if given is None:
        return
    for part in ("ffn", "attn"):
        g, h = getattr(given, part), getattr(have, part)
        if not _same_quant(g, h):
            what = "experts" if part == "ffn" else "attention"
            raise CheckpointError(
                f"{where} holds {_describe(h)} {what}, but quant_config asks for {_describe(g)}: pass "
                f"quant_config=None to use the checkpoint's settings, or quantize the original model again"
            )


class ProjectCheckpoint:
    """A folder written by :func:`quantize` (or converted by :mod:`mixtral_nb.article`), validated on open."""

    kind = "project"

    def __init__(self, folder: Path) -> None:
        self.folder = folder = Path(folder)
        if not (folder / "COMPLETE").exists():
            raise CheckpointError(
                f"{folder} is an unfinished mixtral_nb checkpoint (no COMPLETE marker): rerun quantize() with the "
                "same arguments to finish it"
            )
        self.manifest = m = _read_json(folder / "manifest.json")
        for key in ("format", "version", "quant", "expert_format", "attn_specs", "files"):
            if key not in m:
                raise CheckpointError(f"{folder / 'manifest.json'} has no '{key}' field: re-create the checkpoint "
                                      "with quantize(..., overwrite=True)")
        if m["format"] != FORMAT:
            raise CheckpointError(f"{folder / 'manifest.json'} is not a mixtral_nb manifest (format={m['format']!r})")
        if m["version"] > VERSION:
            raise CheckpointError(f"{folder} uses format version {m['version']}; upgrade mixtral_nb (pip install -U)")
        for name, size in m["files"].items():
            path = folder / name
            if not path.exists():
                raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; re-create or re-download it")
            if path.stat().st_size != size:
                raise CheckpointError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says {size}: truncated or corrupt; re-create it"
                )
        self.config = load_config(folder)
        try:
            self.quant = QuantConfig.from_json(m["quant"])
            self.fmt = ExpertFormat.from_json(m["expert_format"])
            self.attn_specs: dict[str, dict[str, Any]] = m["attn_specs"]  # QSpec fields, as build_model reads them
            specs = {k: QSpec(**v) for k, v in self.attn_specs.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / 'manifest.json'} is malformed ({e!r}): re-create the checkpoint") from None
        self.files = _Files(folder)
        self._check_files(specs)

    def _check_files(self, attn_specs: dict[str, QSpec]) -> None:
        """Headers against the manifest: expert blobs and attention segments have the shapes it promises."""
        c = self.config
        if (self.fmt.hidden, self.fmt.intermediate) != (c.hidden_size, c.intermediate_size):
            raise CheckpointError(f"{self.folder / 'manifest.json'}: expert shapes disagree with config.json; "
                                  "re-create the checkpoint")
        blob = [c.num_local_experts, self.fmt.layout.total_bytes]
        for layer in range(c.num_hidden_layers):
            name = f"experts-{layer:03d}.safetensors"
            info = self.files.header(name).get("blobs")
            if info is None or info["dtype"] != "U8" or info["shape"] != blob:
                got = None if info is None else (info["dtype"], info["shape"])
                raise CheckpointError(f"{self.folder / name} holds {got}, the manifest's quant settings need uint8 "
                                      f"{blob}: the files and manifest.json disagree; re-create the checkpoint")
        trunk = self.files.header("trunk.safetensors")
        for base, spec in attn_specs.items():
            for seg in spec.layout().segments:
                info = trunk.get(f"{base}.{seg.name}")
                if info is None or tuple(info["shape"]) != seg.shape:
                    raise CheckpointError(
                        f"{self.folder / 'trunk.safetensors'}: {base}.{seg.name} is {None if info is None else info['shape']}"
                        f", the manifest's attention settings need {seg.shape}: re-create the checkpoint"
                    )

    def trunk(self) -> Iterator[tuple[str, Tensor]]:
        for key in self.files.header("trunk.safetensors"):
            yield key, self.files.tensor("trunk.safetensors", key)

    def blob(self, layer: int, e: int) -> Tensor:
        """One expert's blob (a copy); only the current layer's file stays mapped."""
        name = f"experts-{layer:03d}.safetensors"
        self.files.keep_only({name})
        return self.files.slice(name, "blobs")[e]


def detect_layout(folder: Path) -> str:
    """"project", "article" (the article's pre-quantized files) or "hf" (original floating point)."""
    if any((folder / n).exists() for n in ("manifest.json", "COMPLETE", "progress.json")):
        return "project"
    from .article import is_article_folder

    return "article" if is_article_folder(folder) else "hf"


def _looks_like_repo_id(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", s)) and not s.startswith((".", "/"))


def open_checkpoint(path: str | os.PathLike, quant_config: QuantConfig | None = None,
                    progress: bool = True) -> HFCheckpoint | ProjectCheckpoint:
    """Detect a folder's layout and open it, validated.

    The article's pre-quantized folder is converted once into a sibling ``<folder>-mixtral_nb``
    (lossless; a message says so) and that is opened. ``quant_config`` is checked against
    pre-quantized files before any conversion starts.
    """
    folder = Path(path)
    if not folder.is_dir():
        hint = (f"download it first: mixtral_nb.hub.download({str(path)!r}, local_dir)" if _looks_like_repo_id(str(path))
                else "download() or quantize() it first")
        raise CheckpointError(f"checkpoint folder {folder} does not exist: {hint}")
    kind = detect_layout(folder)
    if kind == "article":
        from .article import ensure_converted

        folder = ensure_converted(folder, quant_config=quant_config, progress=progress)
        kind = "project"
    if kind == "project":
        ck = ProjectCheckpoint(folder)
        check_quant(ck.quant, quant_config, folder)
        return ck
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


class Source(Protocol):
    """What :func:`write_project` reads: tensors already in project names and encodings, layer by layer."""

    config: Any

    def layer_tensors(self, layer: int) -> dict[str, Tensor]: ...  # attention, norms, router of one layer
    def expert_blob(self, layer: int, e: int) -> Tensor: ...  # one expert's blob, uint8 [blob_bytes]
    def global_tensors(self) -> dict[str, Tensor]: ...  # embeddings, final norm, lm_head
    def close(self) -> None: ...  # unmap the files read so far


def _ours(path: Path) -> bool:
    n = path.name
    return (n in ("progress.json", "manifest.json", "COMPLETE", "config.json", "trunk.safetensors", "parts")
            or n.endswith(".tmp") or bool(re.fullmatch(r"experts-\d{3}\.safetensors", n)))


class _Writer:
    """The resumable, never-complete-early side of a project folder (see the module docstring)."""

    def __init__(self, dst: Path, settings: dict[str, Any], overwrite: bool) -> None:
        self.dst, self.settings = dst, settings
        prog = dst / "progress.json"
        if dst.exists() and not dst.is_dir():
            raise CheckpointError(f"{dst} exists and is not a folder: choose another destination")
        ours = [p for p in dst.iterdir() if _ours(p)] if dst.is_dir() else []
        if ours and not overwrite:
            if not prog.exists():
                raise CheckpointError(f"{dst} already holds checkpoint files not written by this version (no "
                                      "progress.json): pass overwrite=True to start over, or choose another destination")
            old = _read_json(prog)
            if old != settings:
                diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
                detail = "; ".join(f"{k}: folder has {old.get(k)}, asked for {settings.get(k)}" for k in diff)
                raise CheckpointError(f"{dst} was started with different settings ({detail}): pass overwrite=True "
                                      "to start over, or choose another destination")
        if overwrite:
            for p in ours:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            ours = []
        (dst / "parts").mkdir(parents=True, exist_ok=True)
        for p in list(dst.glob("*.tmp")) + list((dst / "parts").glob("*.tmp")):
            p.unlink()  # left by an interrupted write
        if not prog.exists():
            _atomic_text(json.dumps(settings, indent=1, sort_keys=True), prog)

    @property
    def complete(self) -> bool:
        return (self.dst / "COMPLETE").exists()

    def layer_done(self, layer: int) -> bool:
        return (self.dst / f"experts-{layer:03d}.safetensors").exists() and self._part(layer).exists()

    def _part(self, layer: int | None) -> Path:
        return self.dst / "parts" / ("globals.safetensors" if layer is None else f"layer-{layer:03d}.safetensors")

    def write_layer(self, layer: int, trunk_part: dict[str, Tensor], blobs: Tensor) -> None:
        _atomic_save(trunk_part, self._part(layer))
        _atomic_save({"blobs": blobs}, self.dst / f"experts-{layer:03d}.safetensors")

    def globals_done(self) -> bool:
        return self._part(None).exists()

    def write_globals(self, tensors: dict[str, Tensor]) -> None:
        _atomic_save(tensors, self._part(None))

    def finish(self, config_json: str, manifest: dict[str, Any], num_layers: int) -> None:
        trunk: dict[str, Tensor] = {}
        for layer in [None, *range(num_layers)]:
            with safe_open(str(self._part(layer)), framework="pt", device="cpu") as f:
                for k in f.keys():
                    trunk[k] = f.get_tensor(k)
        _atomic_save(trunk, self.dst / "trunk.safetensors")
        del trunk
        _atomic_text(config_json, self.dst / "config.json")
        files = {p.name: p.stat().st_size for p in sorted(self.dst.glob("*.safetensors"))}
        _atomic_text(json.dumps({**manifest, "files": files}, indent=1), self.dst / "manifest.json")
        _atomic_text("ok\n", self.dst / "COMPLETE")
        shutil.rmtree(self.dst / "parts", ignore_errors=True)


def write_project(source: Source, dst: Path, *, quant: QuantConfig, fmt: ExpertFormat,
                  attn_specs: dict[str, QSpec], fingerprint: dict[str, Any], trunk_bytes: int,
                  overwrite: bool = False, progress: bool = True, desc: str = "experts",
                  on_layer: Callable[[int], None] | None = None) -> Path:
    """Stream a source into a project folder, layer by layer; resumable and atomic (module docstring).

    ``on_layer(i)`` runs after layer i's files are written (progress hooks; tests use it to interrupt).
    """
    from tqdm.auto import tqdm

    from .hub import check_disk

    cfg = source.config
    L, E = cfg.num_hidden_layers, cfg.num_local_experts
    settings = {"format": FORMAT, "version": VERSION, "quant": quant.to_json(), "source": fingerprint}
    writer = _Writer(dst, settings, overwrite)
    if writer.complete:
        return dst
    todo = [layer for layer in range(L) if not writer.layer_done(layer)]
    need = {f"experts-{layer:03d}.safetensors": E * fmt.layout.total_bytes for layer in todo}
    need["trunk (parts + merged)"] = 2 * trunk_bytes
    check_disk(need, dst)

    bar = tqdm(total=L * E, desc=desc, unit="expert", disable=not progress)
    bar.update((L - len(todo)) * E)
    for layer in todo:
        part = source.layer_tensors(layer)
        blobs = torch.empty(E, fmt.layout.total_bytes, dtype=torch.uint8)
        for e in range(E):
            blobs[e] = source.expert_blob(layer, e)
            bar.update(1)
        writer.write_layer(layer, part, blobs)
        del part, blobs
        source.close()
        if on_layer is not None:
            on_layer(layer)
    bar.close()
    if not writer.globals_done():
        writer.write_globals(source.global_tensors())
        source.close()
    manifest = {"format": FORMAT, "version": VERSION, "quant": quant.to_json(), "expert_format": fmt.to_json(),
                "attn_specs": {k: v.to_json() for k, v in attn_specs.items()}, "source": fingerprint}
    writer.finish(cfg.to_json_string(use_diff=True), manifest, L)
    return dst


class _HFQuantizer:
    """An original folder seen as a :class:`Source`: quantizes each tensor as it is read."""

    def __init__(self, ck: HFCheckpoint, quant: QuantConfig, fmt: ExpertFormat, attn_specs: dict[str, QSpec],
                 device: torch.device) -> None:
        self.ck, self.config, self.quant, self.fmt, self.attn_specs, self.dev = ck, ck.config, quant, fmt, attn_specs, device

    def _encode(self, key: str) -> dict[str, Tensor]:
        name = trunk_name(key)
        t = self.ck.tensor(key)
        base = name.removesuffix(".weight")
        if base in self.attn_specs:
            return {f"{base}.{k}": v.cpu() for k, v in quantize_tensor(t.to(self.dev), self.attn_specs[base]).items()}
        return {name: t.to(torch.float16) if t.is_floating_point() else t}

    def layer_tensors(self, layer: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for key in self.ck.layer_keys.get(layer, []):
            out.update(self._encode(key))
        return out

    def expert_blob(self, layer: int, e: int) -> Tensor:
        return self.fmt.encode(*(w.to(self.dev) for w in self.ck.expert(layer, e)))

    def global_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for key in self.ck.layer_keys.get(None, []):
            out.update(self._encode(key))
        return out

    def close(self) -> None:
        self.ck.files.close()


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant_config: QuantConfig,
             device: str | torch.device | None = None, progress: bool = True, overwrite: bool = False,
             on_layer: Callable[[int], None] | None = None, download_dir: str | os.PathLike | None = None,
             token: str | None = None) -> Path:
    """Original HF Mixtral folder (or hub id) -> project-format folder, streamed and resumable.

    Peak host memory stays near one layer of the source (files are unmapped after each layer) plus
    one layer of output. The quant settings and the source's fingerprint are recorded in
    ``dst/progress.json`` first: a rerun with the same settings skips finished layers; different
    settings are refused unless ``overwrite=True``, which starts over. Uses the GPU when present
    (``device`` overrides). A hub id is downloaded first into ``download_dir`` (default: a sibling
    of ``dst`` named after the repo).
    """
    src_path, dst = Path(src), Path(dst)
    if not src_path.exists() and _looks_like_repo_id(str(src)):
        from .hub import download

        src_path = download(str(src), Path(download_dir) if download_dir else dst.parent / str(src).replace("/", "--"),
                            token=token)
    if not src_path.is_dir():
        raise CheckpointError(f"source folder {src_path} does not exist: pass an original Mixtral folder or a hub id")
    if src_path.resolve() == dst.resolve():
        raise CheckpointError(f"quantize() would overwrite its source {src_path}: choose another dst")
    kind = detect_layout(src_path)
    if kind == "project":
        raise CheckpointError(f"{src_path} is already a mixtral_nb checkpoint: pass it to build_model(state_path=...)")
    if kind == "article":
        raise CheckpointError(f"{src_path} is the article's pre-quantized checkpoint: pass it to "
                              "build_model(state_path=...) (it is converted automatically), or use mixtral_nb.article.convert()")
    ck = HFCheckpoint(src_path)
    cfg = ck.config
    try:
        fmt = ExpertFormat.make(cfg.hidden_size, cfg.intermediate_size, quant_config.ffn, torch.float16)
        attn_specs = {}
        if quant_config.attn is not None:
            for layer in range(cfg.num_hidden_layers):
                for proj, shape in attn_shapes(cfg).items():
                    attn_specs[f"model.layers.{layer}.self_attn.{proj}"] = QSpec.make(shape, quant_config.attn)
    except ValueError as e:
        raise CheckpointError(f"quant_config does not fit the shapes in {src_path / 'config.json'}: {e}") from None
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = _HFQuantizer(ck, quant_config, fmt, attn_specs, dev)
    return write_project(source, dst, quant=quant_config, fmt=fmt, attn_specs=attn_specs, fingerprint=ck.fingerprint(),
                         trunk_bytes=ck.float_bytes(), overwrite=overwrite, progress=progress, desc="quantizing experts",
                         on_layer=on_layer)
