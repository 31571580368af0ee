"""Original (floating-point) folders of any supported MoE family, validated on open: config, every
shard header, every tensor (names and shapes from the family's transformers model)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

from torch import Tensor

from ..families import FAMILIES, family_of, skeleton
from .errors import FIX_FILE, CheckpointError, read_json
from .files import SafetensorsFiles
from .integrity import memo_digests
from .structure import check_extra, config_fingerprint, hf_shapes, layer_of, load_config

INDEX = "model.safetensors.index.json"


def trunk_name(key: str, config: Any = None) -> str:
    """Original key -> transformers-5 name (Mixtral's router moved from ``block_sparse_moe`` to ``mlp``;
    other families rename as :class:`mixtral_nb.families.Family` says). ``config`` None: Mixtral."""
    return (FAMILIES["mixtral"] if config is None else family_of(config)).trunk_name(key)


def read_weight_map(index: Path) -> dict[str, str]:
    """An index's ``weight_map`` (tensor -> shard file name), type-checked."""
    wm = read_json(index).get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) and v and "/" not in v
                                                     for k, v in wm.items()):
        raise CheckpointError(f"{index} has no valid weight_map (tensor name -> shard file): download it again")
    return wm


class HFCheckpoint:
    """An original (floating-point) folder in either key layout, validated on open.

    Layouts: per-expert keys (Mixtral's and Phi-3.5-MoE's ``block_sparse_moe.experts.N.w{1,2,3}.weight``,
    the others' ``mlp.experts.N.{gate,up,down}_proj.weight``: the hub's files, and what transformers 5
    ``save_pretrained`` writes by default) or the fused ``mlp.experts.gate_up_proj``/``down_proj``
    (``save_pretrained(save_original_format=False)``).
    """

    kind = "hf"

    def __init__(self, folder: Path) -> None:
        self.folder = folder = Path(folder)
        self.config = load_config(folder)
        self.family = family_of(self.config)
        self.skeleton = skeleton(self.config)
        self.files = SafetensorsFiles(folder)
        index = folder / INDEX
        if index.exists():
            self.weight_map: dict[str, str] = read_weight_map(index)
        elif (folder / "model.safetensors").exists():
            self.weight_map = {k: "model.safetensors" for k in self.files.header("model.safetensors")}
        else:
            raise CheckpointError(f"{folder} has neither model.safetensors nor {INDEX}: download the whole checkpoint folder")
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
        """Every tensor a model of this config must have, with its shape."""
        return hf_shapes(self.config, self.fused)

    def _check_tensors(self) -> None:
        expected = self.expected_shapes()
        seen = set()
        for key, shape in expected.items():
            if key not in self.weight_map and self.fused:
                key = self.family.hub_name(key)  # a fused export may keep hub names for the trunk
            seen.add(key)
            if key not in self.weight_map:
                raise CheckpointError(
                    f"{self.folder}: tensor {key} is missing; config.json describes {self.config.num_hidden_layers} "
                    f"layers, {len(self.skeleton.moe_layers)} of them with {self.skeleton.num_experts} experts: "
                    "the download is incomplete, download it again"
                )
            name = self.weight_map[key]
            info = self.files.header(name).get(key)
            if info is None:
                raise CheckpointError(f"{self.folder / name} does not contain {key}, which the index places there: "
                                      f"{FIX_FILE}")
            if tuple(info["shape"]) != shape:
                raise CheckpointError(f"{self.folder / name}: tensor {key} has shape {tuple(info['shape'])}, "
                                      f"config.json implies {shape}: the config does not belong to these weights")
            if info["dtype"] not in ("F32", "F16", "BF16"):
                raise CheckpointError(f"{self.folder / name}: tensor {key} is {info['dtype']}, not floating point: "
                                      "this is not an original (unquantized) checkpoint")
        allowed = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        check_extra(self.config, set(self.weight_map), seen, self.folder, allowed)

    def _t(self, key: str) -> Tensor:
        if key not in self.weight_map:
            raise CheckpointError(f"{self.folder}: tensor {key} is missing from the checkpoint")
        return self.files.tensor(self.weight_map[key], key)

    def tensor(self, key: str) -> Tensor:
        return self._t(key)

    def trunk(self) -> Iterator[tuple[str, Tensor]]:
        """Non-expert tensors under transformers-5 names (Mixtral's router: ``mlp.gate.weight``)."""
        for key in self.weight_map:
            if ".experts." in key:
                continue
            if key == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            yield self.family.trunk_name(key), self._t(key)

    def expert(self, layer: int, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """w1 (gate), w3 (up), w2 (down) of one expert, as stored (bf16/fp16/fp32)."""
        if self.fused:
            key, dkey = self.family.fused_keys(layer)
            self.files.keep_only({self.weight_map[key], self.weight_map[dkey]})
            gu = self.files.slice(self.weight_map[key], key)[e]
            inter = gu.shape[0] // 2
            down = self.files.slice(self.weight_map[dkey], dkey)[e]
            return gu[:inter], gu[inter:], down
        keys = list(self.family.expert_keys(layer, e))
        self.files.keep_only({self.weight_map[k] for k in keys if k in self.weight_map})
        w1, w3, w2 = (self._t(k) for k in keys)
        return w1, w3, w2

    def file_names(self) -> list[str]:
        names = sorted(set(self.weight_map.values()))
        if (self.folder / INDEX).exists():
            names.append(INDEX)
        return ["config.json", *names]

    def fingerprint(self, memo: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """What identifies this source's content: the digest of every file it is read from.

        ``memo`` (see :mod:`.integrity`) makes this a ``stat`` per unchanged file. Returns the
        fingerprint and the updated memo.
        """
        digests, memo = memo_digests(self.folder, self.file_names(), memo or {})
        return {"kind": "hf", "config_sha256": config_fingerprint(self.folder), "files": digests}, memo

    def float_bytes(self) -> int:
        """Bytes of the non-expert tensors stored in fp16 (an upper bound on the trunk file)."""
        total = 0
        for keys in self.layer_keys.values():
            for key in keys:
                total += 2 * math.prod(self.files.header(self.weight_map[key])[key]["shape"])
        return total
