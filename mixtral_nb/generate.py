"""The one token loop: prefill, then sample and feed back one token at a time, on any :class:`~.engine.Engine`.

Chat, the benchmark's timed decode and the CLI all run :func:`generate_tokens`. Tokens are yielded
as 1-element tensors on the logits' device, so a greedy loop with no stop ids never waits for the
GPU (the benchmark measures exactly that); callers that need the number call ``int(token)``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator
from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import Engine

__all__ = ["Sampler", "generate", "generate_tokens", "greedy", "prefill"]


def greedy(logits: Tensor) -> Tensor:
    """The most likely token of logits [1, vocab]: a tensor [1] on the logits' device (no host sync)."""
    return logits.reshape(-1, logits.shape[-1])[-1:].argmax(-1)


@dataclass
class Sampler:
    """Greedy at ``temperature`` <= 0, else temperature + nucleus (``top_p``) sampling drawn from ``generator``.

    Sampling runs on the CPU with a CPU generator, so a seed gives the same replies on any device.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        if self.temperature <= 0:
            return greedy(logits)
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1])[-1].float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > self.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=self.generator)


def prefill(engine: Engine, ids: Tensor, chunk: int | None = None) -> Tensor:
    """Append ``ids`` [T] to the engine, ``chunk`` tokens per forward (bounds activation memory); last logits."""
    ids = ids.reshape(-1)
    if ids.numel() == 0:
        raise ValueError("prefill needs at least one token (the last one's logits pick the next)")
    step = chunk or ids.numel()
    logits = None
    for start in range(0, ids.numel(), step):
        logits = engine.forward(ids[start:start + step])
    assert logits is not None
    return logits


def generate_tokens(engine: Engine, prompt_ids: Tensor, max_new_tokens: int,
                    sampler: Callable[[Tensor], Tensor] = greedy, stop_ids: Collection[int] = (),
                    should_stop: Callable[[], bool] | None = None,
                    prefill_chunk: int | None = None, min_new_tokens: int = 0) -> Generator[Tensor, None, str]:
    """Continue the engine's sequence with ``prompt_ids`` and yield up to ``max_new_tokens`` new tokens.

    The first ``next()`` runs the prefill. A token in ``stop_ids`` ends the loop without being
    yielded or run; ``should_stop()`` is asked after each yielded token, before its forward. Every
    yielded token except the last has been run, so afterwards ``engine.length`` is the prompt plus
    all yielded tokens but the last (fewer if interrupted). Before ``min_new_tokens`` tokens the
    stop ids cannot be sampled (their logits are masked). Returns why it ended: "eos", "length"
    or "stop".
    """
    if max_new_tokens <= 0:
        return "length"
    logits = prefill(engine, prompt_ids, prefill_chunk)
    n = 0
    masked = sorted(stop_ids)
    while True:
        if n < min_new_tokens and masked:
            logits = logits.clone()
            logits[..., masked] = float("-inf")
        token = sampler(logits)
        if stop_ids and int(token) in stop_ids:
            return "eos"
        yield token
        n += 1
        if n >= max_new_tokens:
            return "length"
        if should_stop is not None and should_stop():
            return "stop"
        logits = engine.forward(token)


def generate(engine: Engine, prompt: Tensor, max_new_tokens: int, sampler: Callable[[Tensor], Tensor] = greedy,
             stop_ids: Collection[int] = ()) -> Tensor:
    """New token ids [1, n] continuing ``prompt`` from a fresh sequence (tests, scripts)."""
    engine.reset()
    tokens = list(generate_tokens(engine, prompt, max_new_tokens, sampler, stop_ids))
    return torch.cat(tokens).reshape(1, -1) if tokens else prompt.reshape(1, -1)[:, :0]
