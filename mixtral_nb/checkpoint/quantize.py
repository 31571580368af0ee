"""Original HF folders -> the project format: :func:`quantize` writes a folder, :class:`QuantizedView`
quantizes as :func:`build_model` reads (same numbers, nothing written).

Resume fingerprint: the digests of the source's files (config.json, index, shards; see
:mod:`.integrity`), recorded in ``progress.json``. The stat-keyed memo of those digests is kept
in the destination (``source-memo.json``), so resuming with an unchanged source costs a ``stat``
per file, and a source replaced by other weights of the same sizes is detected and refused.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..config import QuantConfig
from ..expert import ExpertFormat
from ..quant import QSpec, quantize as quantize_tensor
from .errors import CheckpointError, read_json
from ..families import UnsupportedModelError, family_for_dict, family_of, skeleton
from .hf import HFCheckpoint
from . import hub
from .layout import detect_layout
from .project import write_project


def looks_like_repo_id(s: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", s)) and not s.startswith((".", "/"))


def check_hub_family(repo_id: str, token: str | None = None) -> None:
    """Fetch a hub repo's config.json alone (a few KB, into a temporary folder, so nothing is left
    behind) and refuse an architecture mixtral_nb does not run before gigabytes are downloaded. When
    the hub cannot be asked (offline, gated, no config.json), the download itself reports what is wrong."""
    with tempfile.TemporaryDirectory(prefix="mixtral_nb-config-") as tmp:
        try:
            from huggingface_hub import hf_hub_download  # heavy: only hub calls need huggingface_hub

            path = Path(hf_hub_download(repo_id, "config.json", local_dir=tmp, token=token))
            data = read_json(path)
        except Exception:
            return
    try:
        family_for_dict(data, f"{repo_id}/config.json")
    except UnsupportedModelError as e:
        raise CheckpointError(str(e)) from None


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_specs(config: Any, quant: QuantConfig, expert_dtype: torch.dtype, where: Path) -> tuple[ExpertFormat, dict[str, QSpec]]:
    """The expert format and attention specs a quant config gives for a config's shapes (checked first).

    The attention specs cover the projections the family keeps resident (``Skeleton.attn_linears``:
    Mixtral's attention; other families' attention, shared experts and dense MLPs too)."""
    sk = skeleton(config)
    try:
        fmt = ExpertFormat.make(sk.hidden, sk.intermediate, quant.ffn, expert_dtype)
        attn_specs = {}
        if quant.attn is not None:
            for base, shape in sk.attn_linears(family_of(config)).items():
                attn_specs[base] = QSpec.make(shape, quant.attn)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"quant_config does not fit the shapes in {where / 'config.json'}: {e}") from None
    return fmt, attn_specs


class HFQuantizer:
    """An original folder seen as a :class:`.project.Source`: quantizes each tensor as it is read.

    ``float_dtype`` is the storage dtype of the tensors that stay floating point.
    """

    def __init__(self, ck: HFCheckpoint, fmt: ExpertFormat, attn_specs: dict[str, QSpec], device: torch.device,
                 float_dtype: torch.dtype = torch.float16) -> None:
        self.ck, self.config, self.fmt, self.attn_specs, self.dev = ck, ck.config, fmt, attn_specs, device
        self.float_dtype = float_dtype

    def encode(self, key: str) -> dict[str, Tensor]:
        name = self.ck.family.trunk_name(key)
        t = self.ck.tensor(key)
        base = name.removesuffix(".weight")
        if base in self.attn_specs:
            return {f"{base}.{k}": v.cpu() for k, v in quantize_tensor(t.to(self.dev), self.attn_specs[base]).items()}
        return {name: t.to(self.float_dtype) if t.is_floating_point() else t}

    def layer_tensors(self, layer: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for key in self.ck.layer_keys.get(layer, []):
            out.update(self.encode(key))
        return out

    def expert_blob(self, layer: int, e: int) -> Tensor:
        return self.fmt.encode(*(w.to(self.dev) for w in self.ck.expert(layer, e)))

    def global_tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for key in self.ck.layer_keys.get(None, []):
            out.update(self.encode(key))
        return out

    def close(self) -> None:
        self.ck.files.close()


class QuantizedView:
    """An original folder with :class:`.project.ProjectCheckpoint`'s reading interface, quantized on the fly.

    What build_model gets for an HF folder: the trunk in the source's precision (attention quantized
    on ``device`` when the quant config says so), experts encoded on demand in ``dtype`` or quantized.
    """

    kind = "project"

    def __init__(self, ck: HFCheckpoint, quant: QuantConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.folder, self.config, self.quant = ck.folder, ck.config, quant
        self.fmt, specs = plan_specs(ck.config, quant, dtype, ck.folder)
        self.attn_specs = {k: v.to_json() for k, v in specs.items()}
        self.enc_dev = device if device.type == "cuda" else torch.device("cpu")
        self._q = HFQuantizer(ck, self.fmt, specs, self.enc_dev, float_dtype=dtype)
        self.ck = ck

    def trunk(self) -> Iterator[tuple[str, Tensor]]:
        for layer, keys in self.ck.layer_keys.items():
            for key in keys:
                if key == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue
                name = self.ck.family.trunk_name(key)
                if name.removesuffix(".weight") in self._q.attn_specs:
                    yield from self._q.encode(key).items()
                else:
                    yield name, self.ck.tensor(key)

    def blob(self, layer: int, e: int) -> Tensor:
        return self._q.expert_blob(layer, e)


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant_config: QuantConfig,
             device: str | torch.device | None = None, progress: bool = True, overwrite: bool = False,
             on_layer: Callable[[int], None] | None = None, download_dir: str | os.PathLike | None = None,
             token: str | None = None) -> Path:
    """Original HF folder (or hub id) of a supported family -> project-format folder, streamed and resumable.

    Peak host memory stays near one layer of the source (files are unmapped after each layer) plus
    one layer of output. The quant settings and the source's content fingerprint are recorded in
    ``dst/progress.json`` first: a rerun with the same settings and source skips finished layers;
    different settings or a changed source are refused unless ``overwrite=True``, which starts
    over. Two runs into one ``dst`` are refused (a lock file). Uses the GPU when present
    (``device`` overrides). A hub id is downloaded first into ``download_dir`` (default: a sibling
    of ``dst`` named after the repo).
    """
    src_path, dst = Path(src), Path(dst)
    if not src_path.exists() and looks_like_repo_id(str(src)):
        local = Path(download_dir) if download_dir else dst.parent / str(src).replace("/", "--")
        check_hub_family(str(src), token=token)
        src_path = hub.download(str(src), local, token=token)
    if not src_path.is_dir():
        what = "is a file, not a folder" if src_path.exists() else "does not exist"
        raise CheckpointError(f"source folder {src_path} {what}: pass an original checkpoint folder or a hub id")
    if src_path.resolve() == dst.resolve():
        raise CheckpointError(f"quantize() would overwrite its source {src_path}: choose another dst")
    kind = detect_layout(src_path)
    if kind == "project":
        raise CheckpointError(f"{src_path} is already a mixtral_nb checkpoint: pass it to build_model(state_path=...)")
    if kind == "article":
        raise CheckpointError(f"{src_path} is the article's pre-quantized checkpoint: pass it to build_model(state_path=...)"
                              " (it is converted automatically), or use mixtral_nb.checkpoint.convert()")
    ck = HFCheckpoint(src_path)
    fmt, attn_specs = plan_specs(ck.config, quant_config, torch.float16, src_path)
    dev = torch.device(device) if device is not None else default_device()
    memo_path = dst / "source-memo.json"
    memo = read_json(memo_path) if memo_path.is_file() and not overwrite else {}
    fingerprint, memo = ck.fingerprint(memo)
    source = HFQuantizer(ck, fmt, attn_specs, dev)
    return write_project(source, dst, quant=quant_config, fmt=fmt, attn_specs=attn_specs, fingerprint=fingerprint,
                         trunk_bytes=ck.float_bytes(), overwrite=overwrite, progress=progress, desc="quantizing experts",
                         on_layer=on_layer, source_memo=memo, tokenizer_from=ck.folder)
