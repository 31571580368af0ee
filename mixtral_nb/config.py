"""Settings of the engine: how experts are split between GPU and host, and how weights are quantized.

The field names follow the article ("Fast Inference of Mixture-of-Experts Language Models with
Offloading") so its notebook code runs unchanged with only the import line swapped.
"""

from __future__ import annotations

import copy
import numbers
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

MAX_COUNT = 1 << 24  # bound on every count: far above any MoE model (experts, layers), far below float overflow


def check_int(value: Any, name: str, low: int, high: int = MAX_COUNT, why: str = "") -> int:
    """``value`` as a plain int in [low, high], or a ValueError naming the field, the value and the fix.

    Strings, floats and bools are refused rather than converted: ``int(2.7)`` would silently be 2.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fix = ""
        if (isinstance(value, str) and value.strip().lstrip("+-").isdigit()) or (
                isinstance(value, float) and value.is_integer()):
            fix = f": use {re.findall(r'[A-Za-z_]+', name)[-1]}={int(value)}"
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__}){fix}")
    v = int(value)
    if not low <= v <= high:
        raise ValueError(f"{name} must be between {low} and {high}{why}, got {v}")
    return v


def check_bool(value: Any, name: str, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "True, False or None" if allow_none else "True or False"
        raise ValueError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    return value


@dataclass(frozen=True)
class OffloadConfig:
    """How many experts live on the GPU (``main_size``) and on the host (``offload_size``).

    For a model of L layers of E experts the cache uses L * (E - offload_per_layer) GPU slots and
    L * offload_per_layer host slots. As in the article, ``main_size`` and ``offload_size`` are
    those totals; larger values are accepted (the article's Mixtral numbers also build a smaller
    test model), smaller ones are refused by build_model; :meth:`for_model` derives them exactly.
    Frozen: ``dataclasses.replace`` derives a changed copy.

    ``offload_per_layer`` experts of every layer start on the host; the rest of the layer's experts
    own GPU slots. ``buffer_size`` spare GPU buffers let a miss load while the evicted expert is
    still being read or written back. ``prefetch`` is how many of the next layer's predicted
    experts to start loading early (0 disables speculative prefetch). ``host_mirror`` keeps every
    expert in host RAM so evictions never copy back (None: whenever host RAM holds them all).
    ``extra_host_slots`` (swap mode only) adds host blobs beyond the minimum: experts copied to the
    GPU keep their host copy while spare blobs last, so evicting them later needs no write-back.
    ``clean_window``: eviction may pass over up to this many - 1 least recently used experts to pick
    one that still has its host copy (no write-back); 1 is the article's strict LRU. Simulated over
    32 layers with 45 spare blobs: 3 cuts write-backs per miss from 0.65 to 0.25 at the same hit rate.
    A window of ``num_experts`` (the whole layer, what the planner uses) keeps each layer's number of
    clean residents constant once spare blobs are handed out, so write-backs nearly vanish.

    ``gpu_slots`` (optional, one count per layer): GPU slots of each layer when layers differ (the
    planner fills the VRAM it measures and gives more slots to layers that miss more). None: every
    layer has ``num_experts - offload_per_layer``. :meth:`for_slots` derives the article's fields
    from it (``offload_per_layer`` is then the most any layer offloads).
    """

    main_size: int
    offload_size: int
    buffer_size: int = 4
    offload_per_layer: int = 4
    prefetch: int = 2
    host_mirror: bool | None = None
    pin_memory: bool = True
    extra_host_slots: int = 0
    clean_window: int = 3
    gpu_slots: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        ints = {
            "main_size": (1, " (at least one GPU slot per layer)"),
            "offload_size": (0, ""),
            "buffer_size": (1, " (a miss needs a spare GPU buffer)"),
            "offload_per_layer": (0, ""),
            "prefetch": (0, " (0 disables prefetch)"),
            "extra_host_slots": (0, ""),
            "clean_window": (1, " (1 = strict LRU)"),
        }
        for name, (low, why) in ints.items():
            object.__setattr__(self, name, check_int(getattr(self, name), f"OffloadConfig.{name}", low, why=why))
        for f in fields(self):  # the switches: annotated "bool" or "bool | None"
            if f.type in ("bool", "bool | None"):
                check_bool(getattr(self, f.name), f"OffloadConfig.{f.name}", allow_none=f.type != "bool")
        if self.gpu_slots is not None:
            slots = self.gpu_slots
            if isinstance(slots, (str, bytes)) or not isinstance(slots, (tuple, list)) or not slots:
                raise ValueError(f"OffloadConfig.gpu_slots must be a non-empty tuple of ints (one per layer) or None, "
                                 f"got {slots!r} ({type(slots).__name__})")
            object.__setattr__(self, "gpu_slots", tuple(
                check_int(v, f"OffloadConfig.gpu_slots[{i}]", 1, why=" (a layer needs at least one GPU slot)")
                for i, v in enumerate(slots)))
        if self.offload_size < self.offload_per_layer:
            raise ValueError(
                f"OffloadConfig.offload_size={self.offload_size} is smaller than offload_per_layer="
                f"{self.offload_per_layer}: offload_size is layers x offload_per_layer "
                "(OffloadConfig.for_model(num_layers, num_experts, offload_per_layer=...) derives it)"
            )

    @classmethod
    def for_model(cls, num_layers: int, num_experts: int, offload_per_layer: int = 4, **kw: Any) -> "OffloadConfig":
        """The config for a model of ``num_layers`` x ``num_experts`` experts: main_size/offload_size derived.

        ``kw`` are the other fields (buffer_size, prefetch, host_mirror, ...).
        """
        L = check_int(num_layers, "num_layers", 1)
        E = check_int(num_experts, "num_experts", 1)
        opl = check_int(offload_per_layer, "OffloadConfig.offload_per_layer", 0, E - 1,
                   why=f" (a layer of {E} experts needs at least one GPU slot)")
        for bad in ("main_size", "offload_size"):
            if bad in kw:
                raise ValueError(f"OffloadConfig.for_model derives {bad}: pass offload_per_layer instead")
        return cls(main_size=L * (E - opl), offload_size=L * opl, offload_per_layer=opl, **kw)

    @classmethod
    def for_slots(cls, num_experts: int, gpu_slots: Any, **kw: Any) -> "OffloadConfig":
        """The config with ``gpu_slots[i]`` GPU slots in layer i (layers may differ); the article's fields
        derived: main_size = sum, offload_size = the rest, offload_per_layer = the most any layer offloads."""
        E = check_int(num_experts, "num_experts", 1)
        probe = cls(main_size=1, offload_size=0, offload_per_layer=0, gpu_slots=gpu_slots)  # validates the counts
        slots = probe.gpu_slots
        assert slots is not None
        for i, s in enumerate(slots):
            if s > E:
                raise ValueError(f"OffloadConfig.gpu_slots[{i}]={s} is more than the layer's {E} experts: use at most {E}")
        for bad in ("main_size", "offload_size", "offload_per_layer"):
            if bad in kw:
                raise ValueError(f"OffloadConfig.for_slots derives {bad}: pass gpu_slots only")
        return cls(main_size=sum(slots), offload_size=len(slots) * E - sum(slots), offload_per_layer=E - min(slots),
                   gpu_slots=slots, **kw)

    def slots_per_layer(self, num_layers: int, num_experts: int) -> list[int]:
        """GPU slots of each of ``num_layers`` layers (``gpu_slots``, or the same count everywhere)."""
        if self.gpu_slots is None:
            return [self.gpu_slots_per_layer(num_experts)] * num_layers
        if len(self.gpu_slots) != num_layers:
            raise ValueError(f"OffloadConfig.gpu_slots has {len(self.gpu_slots)} entries, the model has {num_layers} "
                             "layers: give one count per layer (or None)")
        for i, s in enumerate(self.gpu_slots):
            if s > num_experts:
                raise ValueError(f"OffloadConfig.gpu_slots[{i}]={s} is more than the layer's {num_experts} experts: "
                                 f"use at most {num_experts}")
        return list(self.gpu_slots)

    def part(self, layers: list[int]) -> "OffloadConfig":
        """This config for a subset of the layers (a model split over GPUs: one cache per device)."""
        if self.gpu_slots is None:
            return self
        return replace(self, gpu_slots=tuple(self.gpu_slots[i] for i in layers))

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """Refuse main_size/offload_size too small for a model of these sizes (one clear error)."""
        if self.gpu_slots is not None:
            slots_l = self.slots_per_layer(num_layers, num_experts)
            main, off = sum(slots_l), num_layers * num_experts - sum(slots_l)
            if self.main_size < main or self.offload_size < off:
                raise ValueError(
                    f"OffloadConfig(main_size={self.main_size}, offload_size={self.offload_size}) is too small for "
                    f"gpu_slots summing to {main} of {num_layers * num_experts} experts: use main_size={main}, "
                    f"offload_size={off}, or OffloadConfig.for_slots({num_experts}, gpu_slots)")
            return
        slots = self.gpu_slots_per_layer(num_experts)
        main, off = num_layers * slots, num_layers * self.offload_per_layer
        if self.main_size < main or self.offload_size < off:
            raise ValueError(
                f"OffloadConfig(main_size={self.main_size}, offload_size={self.offload_size}) is too small for a model "
                f"of {num_layers} layers x {num_experts} experts at offload_per_layer={self.offload_per_layer}: "
                f"use main_size={main} ({num_layers} x {slots}), offload_size={off} "
                f"({num_layers} x {self.offload_per_layer}), or OffloadConfig.for_model({num_layers}, {num_experts}, "
                f"offload_per_layer={self.offload_per_layer})"
            )

    def gpu_slots_per_layer(self, num_experts: int) -> int:
        """Experts of one layer that hold a GPU slot at any time (with ``gpu_slots``: the fewest of any layer)."""
        slots = num_experts - self.offload_per_layer
        if slots < 1:
            raise ValueError(
                f"OffloadConfig.offload_per_layer={self.offload_per_layer} leaves no GPU slot for a layer "
                f"of {num_experts} experts: use at most {num_experts - 1}"
            )
        return slots


NBITS = (1, 2, 3, 4, 8)
META_NBITS = 8  # scales and zeros are always meta-quantized to 8 bits


def _dict(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict (hqq's BaseQuantizeConfig), got {value!r} ({type(value).__name__})")
    return value


def _meta(cfg: dict[str, Any], key: str, name: str) -> tuple[bool, int | None]:
    """(quantized?, group size) of a scale/zero meta config; absent means quantized with the default group."""
    if key not in cfg:
        return True, None
    sub = cfg[key]
    if sub is None:
        return False, None
    sub = _dict(sub, f"{name}[{key!r}]")
    nbits = sub.get("nbits", META_NBITS)
    if isinstance(nbits, bool) or nbits != META_NBITS:
        raise ValueError(f"{name}[{key!r}]['nbits']={nbits!r} is not supported: scales and zeros are quantized "
                         f"to {META_NBITS} bits (use nbits={META_NBITS}, or {key}=None to keep them unquantized)")
    group = sub.get("group_size")
    if group is not None:
        group = check_int(group, f"{name}[{key!r}]['group_size']", 1)
    return True, group


def _quant_params(cfg: dict[str, Any] | None, name: str = "QuantConfig") -> dict[str, Any] | None:
    """Normalise an hqq ``BaseQuantizeConfig`` dict (or a flat dict) into our flat settings."""
    if cfg is None:
        return None
    cfg = _dict(cfg, name)
    wname = f"{name}['weight_quant_params']" if "weight_quant_params" in cfg else name
    w = _dict(cfg.get("weight_quant_params", cfg), wname)
    for key in ("nbits", "group_size"):
        if key not in w:
            raise ValueError(f"{wname} has no {key!r}: pass e.g. BaseQuantizeConfig(nbits=2, group_size=16)")
    nbits = w["nbits"]
    if isinstance(nbits, bool) or not isinstance(nbits, numbers.Integral) or int(nbits) not in NBITS:
        raise ValueError(f"{wname}['nbits']={nbits!r} is not supported: use one of {', '.join(map(str, NBITS))}")
    group_size = check_int(w["group_size"], f"{wname}['group_size']", 1)
    axis = w.get("axis", 1)
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or int(axis) not in (0, 1):
        raise ValueError(f"{wname}['axis']={axis!r} is not supported: use 0 or 1")
    optimize = check_bool(w.get("optimize", True), f"{wname}['optimize']")
    quant_scale, scale_group = _meta(cfg, "scale_quant_params", name)
    quant_zero, zero_group = _meta(cfg, "zero_quant_params", name)
    return {
        "nbits": int(nbits),
        "group_size": group_size,
        "axis": int(axis),
        "quant_scale": quant_scale,
        "scale_group": scale_group if scale_group is not None else 128,
        "quant_zero": quant_zero,
        "zero_group": zero_group,  # None: one scale/zero for the whole tensor, as hqq 0.1.1 did
        "optimize": optimize,
    }


@dataclass
class QuantConfig:
    """hqq ``BaseQuantizeConfig`` dicts for the experts and the attention; None keeps floating point.

    hqq 0.2.8 accepts ``quant_scale``/``quant_zero`` but no longer applies them, so the 8-bit
    quantization of scales and zeros (what makes 2-bit experts ~3 bits/param) is done by mixtral_nb.
    """

    ffn_config: dict[str, Any] | None = None
    attn_config: dict[str, Any] | None = None
    ffn: dict[str, Any] | None = field(init=False, repr=False)
    attn: dict[str, Any] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ffn_config = copy.deepcopy(self.ffn_config)
        self.attn_config = copy.deepcopy(self.attn_config)
        self.ffn = _quant_params(self.ffn_config, "QuantConfig.ffn_config")
        self.attn = _quant_params(self.attn_config, "QuantConfig.attn_config")

    def to_json(self) -> dict[str, Any]:
        """The normalised settings, as stored in a checkpoint manifest."""
        return {"ffn": self.ffn, "attn": self.attn}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_json`."""
        def back(p: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
            if p is None:
                return None
            p = _dict(p, f"QuantConfig.from_json: {name!r}")
            missing = [k for k in ("nbits", "group_size", "axis", "scale_group", "quant_scale", "zero_group", "quant_zero")
                       if k not in p]
            if missing:
                raise ValueError(f"QuantConfig.from_json: {name!r} lacks {missing}: pass what QuantConfig.to_json() wrote")
            return {
                "weight_quant_params": {
                    "nbits": p["nbits"], "group_size": p["group_size"], "axis": p["axis"],
                    "optimize": p.get("optimize", True),
                },
                "scale_quant_params": {"nbits": 8, "group_size": p["scale_group"]} if p["quant_scale"] else None,
                "zero_quant_params": {"nbits": 8, "group_size": p["zero_group"]} if p["quant_zero"] else None,
            }
        data = _dict(data, "QuantConfig.from_json's argument")
        return cls(ffn_config=back(data.get("ffn"), "ffn"), attn_config=back(data.get("attn"), "attn"))


def article_quant_config() -> QuantConfig:
    """The article's mixed config: 4-bit g64 attention (scale meta g256), 2-bit g16 experts."""
    attn = {
        "weight_quant_params": {"nbits": 4, "group_size": 64, "axis": 1, "optimize": True},
        "scale_quant_params": {"nbits": 8, "group_size": 256},
        "zero_quant_params": {"nbits": 8, "group_size": None},
    }
    ffn = {
        "weight_quant_params": {"nbits": 2, "group_size": 16, "axis": 1, "optimize": True},
        "scale_quant_params": {"nbits": 8, "group_size": 128},
        "zero_quant_params": {"nbits": 8, "group_size": None},
    }
    return QuantConfig(ffn_config=ffn, attn_config=attn)
