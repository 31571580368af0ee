"""One interface for whatever runs the model token by token, so chat, the benchmark and the CLI share one loop.

An :class:`Engine` holds one sequence's KV state. ``forward(ids)`` appends tokens and returns the
last one's logits; ``length`` is the number of positions held; ``truncate(n)`` keeps positions
[0, n) of keys and values alike; ``reset()`` empties it. Two implementations:
:class:`~mixtral_nb.decoder.Decoder` (static KV cache, CUDA graphs; for ``build_model`` models) and
:class:`HFEngine` (any transformers causal LM through its own forward and a DynamicCache).

Both keep ``length`` exact under interrupts: it only advances once a forward has finished, and
whatever a half-finished forward wrote past it is cut before the next one runs.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .decoder import Decoder, DecoderConfig
from .families import decoder_refusal

__all__ = ["ENGINE_KINDS", "Engine", "HFEngine", "engine_kind", "make_engine"]

ENGINE_KINDS = ("auto", "decoder", "transformers")


@runtime_checkable
class Engine(Protocol):
    """What the generate loop and ChatSession need from a model runner (see the module docstring)."""

    kind: str  # "decoder" or "transformers"

    @property
    def length(self) -> int: ...  # positions held

    @property
    def max_length(self) -> int: ...  # positions it can hold

    @property
    def device(self) -> torch.device: ...  # where input ids go

    def forward(self, ids: Tensor) -> Tensor: ...  # ids [T] or [1, T] -> logits [1, vocab] of the last one

    def truncate(self, n: int) -> None: ...  # keep positions [0, n), 0 <= n <= length

    def reset(self) -> None: ...  # length 0


def input_device(model: Any) -> torch.device:
    """Where a model's input ids go: its embedding's device (CPU if it has none)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb.weight.device if emb is not None else torch.device("cpu")


def _decoder_refusal(model: Any) -> str | None:
    """Why the Decoder cannot run this model (None: it can): its family's layers must have Mixtral's shape
    (``Family.decoder``) and every layer attend alike (one mask per step: no mix of sliding and full layers)."""
    family = getattr(model, "mixtral_nb_family", "mixtral")
    why = decoder_refusal(family)
    if why is None and len(set(getattr(getattr(model, "config", None), "layer_types", None) or ())) > 1:
        why = f"needs every layer to attend alike; this {family} model mixes sliding-window and full layers"
    return why


def engine_kind(model: Any, kind: str = "auto") -> str:
    """Resolve ``kind``: "auto" is the Decoder for a ``build_model`` model on a GPU, else transformers' forward."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"engine={kind!r}: use one of {', '.join(map(repr, ENGINE_KINDS))}")
    why = _decoder_refusal(model)
    if kind == "auto":
        on_gpu = input_device(model).type == "cuda"
        return "decoder" if on_gpu and why is None and getattr(model, "expert_cache", None) is not None else "transformers"
    if kind == "decoder" and why is not None:
        raise ValueError(f"engine='decoder' {why}: use engine='transformers' (or 'auto', which picks it)")
    return kind


def default_max_length(model: Any, kind: str) -> int:
    """The Decoder allocates its whole KV cache up front, so 4096; transformers' cache grows, so the model's limit."""
    if engine_kind(model, kind) == "decoder":
        return 4096
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 4096)


def make_engine(model: Any, kind: str = "auto", max_length: int | None = None) -> Engine:
    """An engine of ``kind`` ("auto", "decoder", "transformers") over ``model`` holding ``max_length`` positions."""
    kind = engine_kind(model, kind)
    n = int(max_length or default_max_length(model, kind))
    if kind == "decoder":
        return Decoder(model, DecoderConfig(max_len=n))
    return HFEngine(model, max_length=n)


class HFEngine:
    """:class:`Engine` over a transformers causal LM: its own forward, a DynamicCache inside.

    ``truncate`` cuts every layer's keys and values to an absolute length. transformers' cache
    grows keys, then values, layer by layer, so an interrupt inside a forward can leave some layers
    (or the keys of one) a step ahead; ``length`` is only advanced after a forward completes and the
    excess is cut before anything else runs.
    """

    kind = "transformers"

    def __init__(self, model: Any, max_length: int | None = None) -> None:
        self.model = model
        self._max_length = int(max_length or default_max_length(model, "transformers"))
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # transformers 5 may rename it
        self._logits_to_keep = "logits_to_keep" in params
        self._length = 0
        self._dirty = False  # a forward or cut may have been interrupted: layers may hold more than _length
        self._kv = self._new_cache()
        self._device = input_device(model)

    @property
    def length(self) -> int:
        return self._length

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def kv(self) -> Any:
        """The DynamicCache (read it, do not change it: the engine's ``length`` is the truth)."""
        return self._kv

    def _new_cache(self) -> Any:
        from transformers import DynamicCache  # heavy: the package import stays fast without it

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # releases whose DynamicCache takes no config
            return DynamicCache()

    def forward(self, ids: Tensor) -> Tensor:
        ids = ids.reshape(1, -1)
        T = ids.shape[1]
        if self._length + T > self._max_length:
            raise ValueError(f"the sequence would reach {self._length + T} positions, over the engine's max_length="
                             f"{self._max_length}: make the engine with a larger max_length or start a new sequence")
        if self._dirty:
            self._cut(self._length)
        self._dirty = True
        kwargs: dict[str, Any] = {self._cache_kwarg: self._kv, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        try:
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self._device), **kwargs).logits[:, -1]
        except BaseException:
            self._cut(self._length)  # drop whatever the unfinished forward appended
            raise
        self._length += T
        self._dirty = False
        return logits

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self._length:
            raise ValueError(f"truncate({n}): the sequence has {self._length} positions")
        self._dirty = True
        self._length = n
        self._cut(n)

    def reset(self) -> None:
        self._dirty = True
        self._length = 0
        self._kv = self._new_cache()
        self._dirty = False

    def _cut(self, n: int) -> None:
        """Make every layer hold exactly ``n`` positions (idempotent: an interrupted cut is finished by the next)."""
        kv = self._kv
        if not getattr(kv, "is_croppable", True):  # e.g. sliding-window layers: start over
            self._length = 0
            self._kv = self._new_cache()
            self._dirty = False
            return
        with torch.inference_mode():
            for layer in getattr(kv, "layers", ()):
                if not getattr(layer, "is_initialized", True):
                    continue
                if layer.keys.shape[-2] < n or layer.values.shape[-2] < n:  # cannot happen through this class
                    self._length = 0
                    self._kv = self._new_cache()
                    break
                if layer.keys.shape[-2] > n:
                    layer.keys = layer.keys[..., :n, :]
                if layer.values.shape[-2] > n:
                    layer.values = layer.values[..., :n, :]
        self._dirty = False
