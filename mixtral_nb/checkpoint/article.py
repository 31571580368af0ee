"""The article's pre-quantized checkpoint (hqq 0.1.1 files), converted once into the project format.

``lavawolfiee/Mixtral-8x7B-Instruct-v0.1-offloading-demo`` (2-bit experts) and its
``-offloading-hqq-4bit-3bit`` sibling store one trunk file and one file per expert; the index maps
full names (``model.layers.L.block_sparse_moe.experts.E.w1.W_q``) to files, while the keys inside an
expert file are unprefixed (``w1.W_q``, ``w1.meta.scale_q``, ...). Only tensors are stored, so the
settings are read off their shapes (bits, group size, meta group sizes); the axis is 0 (hqq 0.1.1's).

Per linear W [N, K] with b bits, group g, M = N*K/g (hqq 0.1.1's packing, read off its source and files):
``W_q`` packs the codes q [g, M] in hqq's "step" order: with R packed rows, row r holds rows r, r+R,
r+2R, ... from the most significant bits down (uint8 for 1/2/4 bits; for 3 bits int32 words of ten
3-bit values in bits 29..0, g padded to a multiple of 10). ``W[f] = (q[f div M, f mod M] - z) * s``
with f = n*K + k, and the 8-bit meta-quantized s and z use exactly our convention (meta groups
strided by M/gs), so conversion only re-packs the codes into our bit planes: it is lossless.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import QuantConfig
from ..expert import NAMES, ExpertFormat
from ..paths import cache_root
from ..quant import QSpec, pack_planes
from .errors import FIX_FILE, CheckpointError, read_json
from .files import SafetensorsFiles
from .hf import read_weight_map
from .layout import INDEX, is_article_folder
from .project import check_quant, write_project
from .structure import attn_shapes, check_extra, config_fingerprint, layer_of, load_config
from .integrity import memo_digests

__all__ = ["ArticleCheckpoint", "convert", "converted_path", "ensure_converted", "is_article_folder", "unpack_hqq",
           "infer_params", "convert_linear"]
META = ("meta.scale_q", "meta.meta_scale.scale", "meta.meta_scale.zero", "meta.zero_q", "meta.meta_zero.scale",
        "meta.meta_zero.zero")
SUFFIX = "-mixtral_nb"


def converted_path(folder: Path) -> Path:
    """Where the converted copy goes: a sibling ``<folder>-mixtral_nb``, or under ``$MIXTRAL_NB_CACHE``
    (default ``~/.cache/mixtral_nb``) when the parent is read-only (e.g. Kaggle's /kaggle/input)."""
    folder = Path(folder).absolute()
    sibling = folder.with_name(folder.name + SUFFIX)
    if sibling.exists() or os.access(folder.parent, os.W_OK):
        return sibling
    return cache_root() / "converted" / (folder.name + SUFFIX)


# ---------------------------------------------------------------------------------------------
# hqq 0.1.1 packing


def unpack_hqq(w_q: Tensor, nbits: int, shape: tuple[int, int], group_size: int) -> Tensor:
    """hqq 0.1.1's packed ``W_q`` -> codes [N, K] (uint8), flat index f = n*K + k.

    Works for the native packing of the grouped [g, M] codes and for the same packing applied to
    the [N, K] view (the article's code re-packs in memory that way); for 1, 2 and 4 bits the two
    are the same bytes.
    """
    n, k = shape
    rows, cols = w_q.shape
    if nbits == 3:
        shifts = torch.arange(27, -1, -3, dtype=torch.int32, device=w_q.device)
        vals = (w_q.to(torch.int32).unsqueeze(0) >> shifts.view(-1, 1, 1)) & 7
        vals = vals.reshape(10 * rows, cols)
        keep = group_size if cols * group_size == n * k else n  # padding rows beyond g (or N) are zero
        vals = vals[:keep]
    else:
        per = 8 // nbits
        shifts = torch.arange(8 - nbits, -1, -nbits, dtype=torch.uint8, device=w_q.device)
        vals = (w_q.to(torch.uint8).unsqueeze(0) >> shifts.view(-1, 1, 1)) & ((1 << nbits) - 1)
        vals = vals.reshape(per * rows, cols)
    if vals.numel() != n * k:
        raise ValueError(f"W_q {tuple(w_q.shape)} does not hold {nbits}-bit codes of a {n}x{k} weight")
    return vals.to(torch.uint8).reshape(n, k)


def infer_params(entries: dict[str, dict[str, Any]], shape: tuple[int, int]) -> dict[str, Any]:
    """Quant settings of one hqq linear from its tensors' header entries (shapes and dtypes only)."""
    n, k = shape
    wq = entries["W_q"]
    quant_scale = "meta.scale_q" in entries
    sq = entries["meta.scale_q" if quant_scale else "meta.scale"]
    m = math.prod(sq["shape"])
    if not m or (n * k) % m:
        raise ValueError(f"{m} scales do not divide a {n}x{k} weight")
    g = n * k // m
    count = math.prod(wq["shape"])
    if wq["dtype"] == "I32":
        nbits = 3
    elif wq["dtype"] == "U8" and (count * 8) % (n * k) == 0 and (count * 8) // (n * k) in (1, 2, 4, 8):
        nbits = (count * 8) // (n * k)
    else:
        raise ValueError(f"W_q {wq['dtype']} {wq['shape']} is not an hqq packing of a {n}x{k} weight")
    if nbits == 1:  # shapes alone cannot tell 1-bit g2x of a weight twice as large from the article's 2-bit gx
        raise ValueError(f"W_q {wq['shape']} would be 1-bit codes of a {n}x{k} weight; the article's checkpoints hold "
                         "2, 3 or 4 bits, so config.json's sizes probably do not match these files")
    scale_group = 128
    if quant_scale:
        scale_group = sq["shape"][0] if len(sq["shape"]) == 2 else m
        if math.prod(entries["meta.meta_scale.scale"]["shape"]) * scale_group != m:
            raise ValueError("meta_scale does not match scale_q")
    zero_group = None
    quant_zero = "meta.zero_q" in entries
    if quant_zero:
        mz = math.prod(entries["meta.meta_zero.scale"]["shape"])
        zero_group = None if mz == 1 else m // mz
    return {"nbits": nbits, "group_size": g, "axis": 0, "quant_scale": quant_scale, "scale_group": scale_group,
            "quant_zero": quant_zero, "zero_group": zero_group, "optimize": True}


def convert_linear(t: dict[str, Tensor], spec: QSpec) -> dict[str, Tensor]:
    """One hqq 0.1.1 linear (keys ``W_q``, ``meta.*``) -> our stored tensors (see quant.py); lossless."""
    codes = unpack_hqq(t["W_q"], spec.nbits, (spec.out_features, spec.in_features), spec.group_size)
    out = pack_planes(codes, spec.nbits)
    for what in ("scale", "zero"):
        if getattr(spec, f"quant_{what}"):
            out[f"{what}_q"] = t[f"meta.{what}_q"].reshape(-1).to(torch.uint8)
            out[f"{what}_ms"] = t[f"meta.meta_{what}.scale"].reshape(-1).to(torch.float16)
            out[f"{what}_mz"] = t[f"meta.meta_{what}.zero"].reshape(-1).to(torch.float16)
        else:
            out[what] = t[f"meta.{what}"].reshape(-1).to(torch.float16)
    return {name: out[name].cpu() for name in spec.layout().names}


# ---------------------------------------------------------------------------------------------
# the folder


def _keys(quant_scale: bool, quant_zero: bool) -> list[str]:
    keys = ["W_q"]
    keys += ["meta.scale_q", "meta.meta_scale.scale", "meta.meta_scale.zero"] if quant_scale else ["meta.scale"]
    keys += ["meta.zero_q", "meta.meta_zero.scale", "meta.meta_zero.zero"] if quant_zero else ["meta.zero"]
    return keys


class ArticleCheckpoint:
    """The article's pre-quantized folder, validated on open (every file's header; no data read)."""

    kind = "article"

    def __init__(self, folder: Path, device: torch.device | str | None = None) -> None:
        self.folder = folder = Path(folder)
        self.config = c = load_config(folder)
        self.weight_map: dict[str, str] = read_weight_map(folder / INDEX)
        self.files = SafetensorsFiles(folder)
        self.dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        L, E, H, inter = c.num_hidden_layers, c.num_local_experts, c.hidden_size, c.intermediate_size
        for name in sorted(set(self.weight_map.values())):
            if not (folder / name).exists():
                raise CheckpointError(f"shard {folder / name} is missing (listed in {INDEX}): download it again")
            self.files.header(name)
        # settings from layer 0's tensors, then every other tensor checked against them
        shapes = {"w1": (inter, H), "w3": (inter, H), "w2": (H, inter)}
        self.ffn = self._infer(self._expert_entries(0, 0, "w1"), shapes["w1"], "model.layers.0 experts.0.w1")
        self.attn = self._infer(self._attn_entries(0, "q_proj"), attn_shapes(c)["q_proj"], "model.layers.0.self_attn.q_proj")
        try:
            self.fmt = ExpertFormat.make(H, inter, self.ffn, torch.float16)
            self.attn_specs = {f"model.layers.{i}.self_attn.{p}": QSpec.make(s, self.attn)
                               for i in range(L) for p, s in attn_shapes(c).items()}
        except ValueError as e:
            raise CheckpointError(f"{folder}: the quantized shapes do not fit config.json ({e}): the config does not "
                                  "belong to these files") from None
        self.quant = QuantConfig.from_json({"ffn": self.ffn, "attn": self.attn})
        for i in range(L):
            for e in range(E):
                for w, spec in zip(NAMES, self.fmt.specs or ()):
                    self._check(self._expert_entries(i, e, w), spec, f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}")
            for p in attn_shapes(c):
                base = f"model.layers.{i}.self_attn.{p}"
                self._check(self._attn_entries(i, p), self.attn_specs[base], base)
            for key in (f"model.layers.{i}.block_sparse_moe.gate.weight", f"model.layers.{i}.input_layernorm.weight",
                        f"model.layers.{i}.post_attention_layernorm.weight"):
                self._entry(key)
        for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            self._entry(key)
        beyond = {k for k in self.weight_map if (layer_of(k) or 0) >= L}
        check_extra(c, beyond, set(), folder)

    # header lookups ------------------------------------------------------------------------

    def _file(self, key: str) -> str:
        name = self.weight_map.get(key)
        if name is None:
            raise CheckpointError(f"{self.folder / INDEX} does not list {key}: the download is incomplete or this is "
                                  "not the article's checkpoint; download it again")
        return name

    def _entry(self, key: str, short: str | None = None) -> tuple[str, str, dict[str, Any]]:
        """(file, key inside the file, header entry): expert files use unprefixed keys."""
        name = self._file(key)
        header = self.files.header(name)
        for k in (key, short):
            if k is not None and k in header:
                return name, k, header[k]
        raise CheckpointError(f"{self.folder / name} does not contain {short or key}: {FIX_FILE}")

    def _linear_entries(self, full: str, short: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
        name = self._file(f"{full}.W_q")
        header = self.files.header(name)
        qs = f"{full}.meta.scale_q" in header or f"{short}.meta.scale_q" in header
        qz = f"{full}.meta.zero_q" in header or f"{short}.meta.zero_q" in header
        return {k: self._entry(f"{full}.{k}", f"{short}.{k}") for k in _keys(qs, qz)}

    def _expert_entries(self, layer: int, e: int, w: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
        return self._linear_entries(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}", w)

    def _attn_entries(self, layer: int, proj: str) -> dict[str, tuple[str, str, dict[str, Any]]]:
        full = f"model.layers.{layer}.self_attn.{proj}"
        return self._linear_entries(full, full)

    def _infer(self, entries: dict[str, tuple[str, str, dict[str, Any]]], shape: tuple[int, int], what: str) -> dict:
        try:
            return infer_params({k: v[2] for k, v in entries.items()}, shape)
        except (ValueError, KeyError) as e:
            name = next(iter(entries.values()))[0]
            raise CheckpointError(f"{self.folder / name}: {what} is not an hqq-quantized {shape[0]}x{shape[1]} weight "
                                  f"({e}): the config does not belong to these files, or the file is corrupt") from None

    def _check(self, entries: dict[str, tuple[str, str, dict[str, Any]]], spec: QSpec, what: str) -> None:
        params = {"nbits": spec.nbits, "group_size": spec.group_size}
        got = self._infer(entries, (spec.out_features, spec.in_features), what)
        if any(got[k] != v for k, v in params.items()) or got["quant_scale"] != spec.quant_scale:
            name = next(iter(entries.values()))[0]
            raise CheckpointError(f"{self.folder / name}: {what} is {got['nbits']}-bit group {got['group_size']}, "
                                  f"unlike the rest ({spec.nbits}-bit group {spec.group_size}): {FIX_FILE}")

    # reading --------------------------------------------------------------------------------

    def _linear(self, entries: dict[str, tuple[str, str, dict[str, Any]]], spec: QSpec) -> dict[str, Tensor]:
        t = {k: self.files.tensor(name, key).to(self.dev) for k, (name, key, _) in entries.items()}
        return convert_linear(t, spec)

    def layer_tensors(self, layer: int) -> dict[str, Tensor]:
        p = f"model.layers.{layer}"
        out: dict[str, Tensor] = {}
        for proj in attn_shapes(self.config):
            base = f"{p}.self_attn.{proj}"
            for k, v in self._linear(self._attn_entries(layer, proj), self.attn_specs[base]).items():
                out[f"{base}.{k}"] = v
        for src, dst in ((f"{p}.block_sparse_moe.gate.weight", f"{p}.mlp.gate.weight"),
                         (f"{p}.input_layernorm.weight", None), (f"{p}.post_attention_layernorm.weight", None)):
            name, key, _ = self._entry(src)
            out[dst or src] = self.files.tensor(name, key).to(torch.float16)
        return out

    def expert_blob(self, layer: int, e: int) -> Tensor:
        tensors = {}
        for w, spec in zip(NAMES, self.fmt.specs or ()):
            for k, v in self._linear(self._expert_entries(layer, e, w), spec).items():
                tensors[f"{w}.{k}"] = v
        return self.fmt.layout.pack(tensors)

    def global_tensors(self) -> dict[str, Tensor]:
        out = {}
        for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            name, k, _ = self._entry(key)
            out[key] = self.files.tensor(name, k).to(torch.float16)
        return out

    def close(self) -> None:
        self.files.close()

    def fingerprint(self, memo: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The digests of every file read (see :mod:`.integrity`; ``memo`` makes unchanged files a ``stat``),
        and the updated memo."""
        names = ["config.json", INDEX, *sorted(set(self.weight_map.values()))]
        digests, memo = memo_digests(self.folder, names, memo or {})
        return {"kind": "article", "config_sha256": config_fingerprint(self.folder), "files": digests}, memo

    def trunk_bytes(self) -> int:
        return self.files.folder.joinpath(self._file("model.embed_tokens.weight")).stat().st_size


def _memo(dst: Path) -> dict[str, Any]:
    path = dst / "source-memo.json"
    return read_json(path) if path.is_file() else {}


def convert(folder: str | os.PathLike, dst: str | os.PathLike | None = None, quant_config: QuantConfig | None = None,
            device: str | torch.device | None = None, progress: bool = True, overwrite: bool = False,
            on_layer: Callable[[int], None] | None = None) -> Path:
    """Convert the article's folder into a project folder (default ``<folder>-mixtral_nb``), resumably.

    ``quant_config`` (optional) is checked against the files before any work starts.
    """
    ck = ArticleCheckpoint(Path(folder), device=device)
    check_quant(ck.quant, quant_config, Path(folder))
    out = Path(dst) if dst is not None else converted_path(Path(folder))
    fingerprint, memo = ck.fingerprint({} if overwrite else _memo(out))
    return write_project(ck, out, quant=ck.quant, fmt=ck.fmt, attn_specs=ck.attn_specs, fingerprint=fingerprint,
                         trunk_bytes=ck.trunk_bytes(), overwrite=overwrite, progress=progress,
                         desc="converting experts", on_layer=on_layer, source_memo=memo)


def _same_source(done: Any, folder: Path, dst: Path) -> bool:
    """Whether a conversion's recorded source is ``folder``'s content (cheap: stat-keyed digests).

    Conversions written before digests existed recorded file sizes: those are compared as they were.
    """
    if not isinstance(done, dict) or done.get("config_sha256") != config_fingerprint(folder):
        return False
    files = done.get("files")
    if isinstance(files, dict) and files and all(type(v) is int for v in files.values()):
        return all((folder / n).is_file() and (folder / n).stat().st_size == v for n, v in files.items())
    names = ["config.json", INDEX, *sorted(set(read_weight_map(folder / INDEX).values()))]
    digests, _ = memo_digests(folder, names, _memo(dst))
    return files == digests


def ensure_converted(folder: Path, quant_config: QuantConfig | None = None, progress: bool = True) -> Path:
    """The converted copy of an article folder, converting it first if needed (with a message)."""
    folder = Path(folder)
    dst = converted_path(folder)
    if (dst / "progress.json").is_file():
        if not _same_source(read_json(dst / "progress.json").get("source"), folder, dst):
            raise CheckpointError(f"{dst} holds a conversion of another checkpoint (its source files differ from "
                                  f"those in {folder}): delete {dst} and run again")
        if (dst / "COMPLETE").exists():
            return dst
    ck_note = "resuming the" if (dst / "progress.json").exists() else "one-time"
    print(f"mixtral_nb: {folder} is the article's pre-quantized (hqq 0.1.1) checkpoint; {ck_note} lossless conversion "
          f"into the mixtral_nb format at {dst} (same size as the source). Later runs load {dst} directly.")
    return convert(folder, dst, quant_config=quant_config, progress=progress)
