"""Multi-turn chat on top of any transformers causal LM, with an exact Mixtral-Instruct prompt format.

The model runs through an :class:`~mixtral_nb.engine.Engine` (the Decoder or transformers' forward)
and the one token loop of :mod:`mixtral_nb.generate`. The KV cache is kept between turns: only the
tokens after the common prefix of the cache and the new prompt are run.

State changes are atomic, so Stop, Ctrl-C or an error at any instant leave the session usable:
the history gains the turn in one assignment; the engine only holds a prefix of ``_ids`` (ids are
recorded before they are run, and the engine is cut before ``_ids`` is replaced), so
``cache_ids`` (``_ids`` up to the engine's length) is always exactly what the engine holds.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import torch

from .engine import Engine, default_max_length, engine_kind, make_engine
from .generate import Sampler, generate_tokens, prefill
from .tokenizer import check_messages, encode_conversation

__all__ = ["ChatSession", "SessionBusy"]


def _iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds") if t is not None else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SessionBusy(RuntimeError):
    """Raised when a second reply is requested while one is being generated."""


class _Reply:
    """The iterator ``stream()`` returns: claims the session at its first ``next()``, not before.

    Each step runs under the session's lock, so ``stop()`` (or another thread taking over a
    stopped or abandoned reply) can close it between two steps without racing the consumer.
    """

    def __init__(self, session: ChatSession, base: Callable[[], list[dict]]) -> None:
        self._session = session
        self._base = base
        self._gen: Any = None
        self._closed = False
        self.owner = 0

    def __iter__(self) -> _Reply:
        return self

    def __next__(self) -> str:
        s = self._session
        if self._gen is None:
            if self._closed:
                raise StopIteration
            if not s._lock.acquire(blocking=False):
                raise SessionBusy("the session is already generating a reply; call stop() first")
            try:
                s._claim(self)
                self._gen = s._reply(self._base())
                return next(self._gen)
            finally:
                s._lock.release()
        with s._lock:
            return next(self._gen)

    def close(self) -> None:
        """End the reply (the partial text is kept); safe to call more than once."""
        with self._session._lock:
            self._closed = True
            if self._gen is not None:
                self._gen.close()

    @property
    def state(self) -> str:
        return inspect.GEN_CREATED if self._gen is None else inspect.getgeneratorstate(self._gen)

    @property
    def running(self) -> bool:
        """Started and not finished (running now, or suspended between two pieces)."""
        return self._gen is not None and self.state != inspect.GEN_CLOSED


class ChatSession:
    """A multi-turn conversation that keeps the model's KV cache between turns.

    ``history`` holds every user/assistant message (the system prompt lives in ``system_prompt``);
    it is never trimmed (``undo()`` removes the last exchange on request). When the conversation
    outgrows ``context_budget``, the model is shown only the latest messages that fit (oldest
    user/assistant pairs left out first; ``trimmed_messages`` says how many). Editing ``history`` or
    ``system_prompt`` by hand is safe. ``stop()`` and Ctrl-C keep the partial reply.
    ``message_info`` gives a message's time and a reply's stats.

    ``engine``: "decoder" runs the model through :class:`~mixtral_nb.decoder.Decoder` (static KV
    cache of ``context_budget`` positions, CUDA graphs: several times faster on a GPU),
    "transformers" through the model's own forward with a DynamicCache; "auto" picks the Decoder
    for a ``build_model`` model on a GPU. With the Decoder, ``context_budget`` defaults to 4096.
    """

    prefill_chunk = 512  # prompt tokens per forward: bounds activation memory on long prompts

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system_prompt: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        context_budget: int | None = None,
        seed: int | None = None,
        engine: str = "auto",
        min_new_tokens: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.min_new_tokens = min_new_tokens  # replies end at end-of-sequence only after this many tokens
        self.engine = engine_kind(model, engine)
        self.context_budget = int(context_budget or default_max_length(model, self.engine))
        self.history: list[dict] = []
        self.stats: list[dict] = []
        self.last_stats: dict | None = None
        self.trimmed_messages = 0
        self.progress: dict[str, float] = {"tokens": 0, "seconds": 0.0, "tok_s": 0.0}
        self.generator = torch.Generator(device="cpu")
        if seed is not None:
            self.generator.manual_seed(seed)
        self._engine: Engine | None = None
        self._ids: list[int] = []  # the engine holds _ids[:engine.length]
        self._window = 0  # history index of the first message the model saw in the last turn
        self._meta: dict[int, tuple[dict, dict]] = {}  # id(message) -> (message, {"time": ..., "stats": ...})
        self._stop = threading.Event()
        self._lock = threading.RLock()  # held while a reply runs a step
        self._active: _Reply | None = None
        self._stop_ids = self._find_stop_ids()

    # ---- public state

    @property
    def messages(self) -> list[dict]:
        """The whole conversation, system prompt first, as role/content dicts."""
        return self._head() + [dict(m) for m in self.history]

    @property
    def cache(self) -> Engine | None:
        """The :class:`~mixtral_nb.engine.Engine` holding the KV cache (None before the first turn)."""
        return self._engine

    @property
    def cache_ids(self) -> list[int]:
        """Exactly the token ids whose keys/values the engine holds."""
        return self._ids[: self._engine.length] if self._engine is not None else []

    @property
    def generating(self) -> bool:
        """True while a reply is being produced (or a started stream is suspended between pieces)."""
        active = self._active
        return active is not None and active.running

    def message_info(self, message: dict) -> dict:
        """When ``message`` (a dict of ``history``) was added and, for a reply, its stats (or None each).

        Kept by identity, so a message edited or replaced by hand simply has no record: the chat widget's
        captions and the export's timestamps read it, and ``history`` stays plain role/content dicts.
        """
        entry = self._meta.get(id(message))
        if entry is None or entry[0] is not message:
            return {"time": None, "stats": None}
        return dict(entry[1])

    def encoded_history(self) -> list[int]:
        """Token ids of the conversation as the model last saw it (what the cache holds after a reply)."""
        start = min(self._window, len(self.history))
        return self._history_ids(self._head() + self.history[start:])

    def _history_ids(self, messages: list[dict]) -> list[int]:
        # nothing said yet is no tokens (chat templates refuse an empty conversation)
        return encode_conversation(self.tokenizer, messages, add_generation_prompt=False) if messages else []

    # ---- public actions

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message and return the assistant's reply.

        ``on_text`` gets each decoded piece as it arrives. Ctrl-C ends the reply early and returns
        the partial text (kept in history) instead of raising.
        """
        return self._consume(self.stream(text), on_text)

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message and yield the reply piece by piece as it is decoded.

        Bad input raises ValueError here, with nothing changed; the session is claimed at the
        first piece asked for (a stream never iterated holds nothing).
        """
        if not isinstance(text, str):
            raise ValueError(f"the message must be a string, not {type(text).__name__}")
        self._plan(self.history + [{"role": "user", "content": text}])
        return _Reply(self, lambda: self.history + [{"role": "user", "content": text}])

    def regenerate(self, on_text: Callable[[str], None] | None = None) -> str:
        """Drop the last reply and answer the last user message again."""
        return self._consume(self.stream_regenerate(), on_text)

    def stream_regenerate(self) -> Iterator[str]:
        """Streaming version of ``regenerate``."""
        self._plan(self._regenerate_base())
        return _Reply(self, self._regenerate_base)

    def stop(self) -> None:
        """End the running reply after the current token (safe from any thread).

        A stream suspended between pieces is closed at once, so the session is free again.
        """
        self._stop.set()
        if not self._lock.acquire(blocking=False):
            return  # a step is running: it sees the flag before the next token
        try:
            active = self._active
            if active is not None and active.state == inspect.GEN_SUSPENDED:
                active.close()
        finally:
            self._lock.release()

    def undo(self) -> list[dict]:
        """Remove the last user message and the reply to it, in one step; return them (oldest first).

        The engine keeps only what still matches the shorter conversation, so the next turn reuses
        the cache up to there. Nothing changes on error: ValueError when there is nothing to undo,
        SessionBusy while a reply runs (call stop() first).
        """
        if not self._lock.acquire(blocking=False):
            raise SessionBusy("the session is generating a reply; call stop() first")
        try:
            self._claim(None)
            history = list(self.history)
            if not history:
                raise ValueError("nothing to undo: the conversation is empty")
            cut = len(history) - 1
            if history[cut]["role"] == "assistant" and cut > 0 and history[cut - 1]["role"] == "user":
                cut -= 1
            removed, kept = history[cut:], history[:cut]
            window = min(self._window, len(kept))
            target = self._history_ids(self._head() + kept[window:])
            engine = self._engine
            if engine is not None:  # cut first: the engine then holds a prefix of both the old and the new ids
                engine.truncate(_common_prefix(self.cache_ids, target))
            self._ids = target
            self._window = window
            self.trimmed_messages = min(self.trimmed_messages, window)
            self.history = kept  # the undo happens here (one assignment)
            alive = {id(m) for m in kept}  # a record holds its message, so an id here names that same object
            self._meta = {k: v for k, v in self._meta.items() if k in alive}
            return [dict(m) for m in removed]
        finally:
            self._lock.release()

    def reset(self) -> None:
        """Forget the conversation, the cache and the statistics (the system prompt stays)."""
        if not self._lock.acquire(blocking=False):
            raise SessionBusy("the session is generating a reply; call stop() first")
        try:
            self._claim(None)
            self.history = []
            self._meta = {}
            self.stats = []
            self.last_stats = None
            self.trimmed_messages = 0
            self._window = 0
            if self._engine is not None:
                self._engine.reset()  # kept: a Decoder's KV memory and CUDA graphs are reused
            self._ids = []
        finally:
            self._lock.release()

    def sync_cache(self, max_forward: int | None = None) -> None:
        """Make the engine hold exactly ``encoded_history()``.

        After a reply the history ends with an end-of-sequence token the model never ran, and
        re-encoding the reply text can differ from the sampled ids. With ``max_forward``, a longer
        gap is left for the next turn to fill (the cache stays a valid prefix).
        """
        engine = self._engine
        if engine is None:
            return
        target = self.encoded_history()
        keep = _common_prefix(self.cache_ids, target)
        engine.truncate(keep)
        self._ids = target  # the engine holds target[:keep]
        missing = len(target) - keep
        if missing and len(target) <= engine.max_length and (max_forward is None or missing <= max_forward):
            prefill(engine, torch.tensor(target[keep:]), self.prefill_chunk)

    def export(self, fmt: str = "markdown", names: dict[str, str] | None = None) -> str:
        """The conversation as Markdown (for reading) or JSON (for reloading into ``history``).

        ``names`` maps a role ("user", "assistant", "system") to the name shown for it (default: the
        role, capitalised). Timestamps are local time with its UTC offset, where known (``message_info``).
        """
        if fmt not in ("markdown", "md", "json"):
            raise ValueError(f"fmt must be 'markdown' or 'json', not {fmt!r}")
        shown = {role: role.capitalize() for role in ("system", "user", "assistant")}
        shown.update(names or {})
        history = list(self.history)
        infos = [self.message_info(m) for m in history]
        stamps = [_iso(info["time"]) for info in infos]
        if fmt == "json":
            payload = {
                "system_prompt": self.system_prompt,
                "messages": [dict(m) for m in history],
                "names": {role: shown[role] for role in ("user", "assistant")},
                "message_times": stamps,
                "message_stats": [info["stats"] for info in infos],
                "stats": list(self.stats),
                "settings": {
                    "max_new_tokens": self.max_new_tokens,
                    "temperature": self.temperature,
                    "top_p": self.top_p,
                    "context_budget": self.context_budget,
                },
            }
            return json.dumps(payload, indent=2, ensure_ascii=False)
        parts = ["# Conversation"]
        if self.system_prompt:
            parts.append(f"**{shown['system']}:** " + self.system_prompt)
        for m, stamp in zip(history, stamps):
            role = m["role"]
            title = f"### {shown.get(role, role.capitalize())}" + (f" · {stamp}" if stamp else "")
            parts.append(f"{title}\n\n{m['content']}")
        return "\n\n".join(parts) + "\n"

    # ---- internals

    def _head(self) -> list[dict]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    def _regenerate_base(self) -> list[dict]:
        base = list(self.history)
        if base and base[-1]["role"] == "assistant":
            base.pop()
        if not base:
            raise ValueError("nothing to regenerate: the conversation is empty")
        return base

    def _claim(self, reply: _Reply | None) -> None:
        """Make ``reply`` the active one (caller holds the lock). A suspended reply of this thread, or one
        asked to stop, is closed (its partial text kept); anything else in progress is refused."""
        active = self._active
        if active is not None and active is not reply and active.running:
            mine = active.owner == threading.get_ident()
            if active.state == inspect.GEN_RUNNING or not (mine or self._stop.is_set()):
                raise SessionBusy("the session is already generating a reply; call stop() first")
            active.close()
        self._active = reply
        if reply is not None:
            reply.owner = threading.get_ident()
        self._stop.clear()

    def _consume(self, reply: Iterator[str], on_text: Callable[[str], None] | None) -> str:
        try:
            for piece in reply:
                if on_text is not None:
                    on_text(piece)
        except KeyboardInterrupt:
            reply.close()  # type: ignore[attr-defined]
        last = self.history[-1] if self.history else None
        return last["content"] if last is not None and last["role"] == "assistant" else ""

    def _find_stop_ids(self) -> set[int]:
        ids: set[int] = set()
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        gen_cfg = getattr(self.model, "generation_config", None)
        eos = getattr(gen_cfg, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(i) for i in eos)
        return ids

    def _plan(self, history: list[dict]) -> tuple[list[int], int]:
        """(prompt ids, index of the first history message the model sees); ValueError if nothing fits.

        The oldest user/assistant pairs are left out until prompt + ``max_new_tokens`` fits the budget.
        """
        if not 0 < self.max_new_tokens < self.context_budget:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1 and below context_budget="
                             f"{self.context_budget} (the prompt needs room too): lower max_new_tokens or raise "
                             "context_budget")
        head = self._head()
        check_messages(head + history)
        start = 0
        while True:
            ids = encode_conversation(self.tokenizer, head + history[start:], add_generation_prompt=True)
            remaining = len(history) - start
            if len(ids) + self.max_new_tokens <= self.context_budget or remaining <= 1:
                break
            pair = remaining > 2 and history[start + 1]["role"] == "assistant"
            start += 2 if pair else 1
        if len(ids) >= self.context_budget:
            raise ValueError(f"the prompt alone is {len(ids)} tokens, over the context budget of "
                             f"{self.context_budget}: shorten the message or raise context_budget")
        return ids, start

    def _ensure_engine(self) -> Engine:
        """The session's engine, made (again) when it cannot hold ``context_budget`` positions."""
        if self._engine is None or self._engine.max_length < self.context_budget:
            self._ids = []
            self._engine = None  # free the old one's KV memory before allocating the new
            self._engine = make_engine(self.model, self.engine, max_length=self.context_budget)
        return self._engine

    def _reply(self, base: list[dict]) -> Iterator[str]:
        """The body of one reply (runs under the lock, step by step): plan, reuse the cache, generate."""
        ids, start = self._plan(base)
        engine = self._ensure_engine()
        message = {"role": "assistant", "content": ""}
        reply_ids: list[int] = []
        reason = "error"
        t_start = t_first = time.perf_counter()
        reused = 0
        prefill_s = 0.0
        self.progress = {"tokens": 0, "seconds": 0.0, "tok_s": 0.0}
        self._window = start
        self.trimmed_messages = start
        now = time.time()
        kept = base + [message]
        meta = {id(m): (m, {"time": now, "stats": None}) for m in kept[-2:]}
        alive = {id(m) for m in kept}  # a record holds its message, so an id here names that same object
        meta.update({k: v for k, v in self._meta.items() if k in alive})  # earlier records win
        self._meta = meta
        self.history = kept  # the turn is in the history (one assignment)
        try:
            reused = min(_common_prefix(self.cache_ids, ids), len(ids) - 1)  # the last token yields the logits
            engine.truncate(reused)
            self._ids = list(ids)  # the engine holds ids[:reused]; the rest is recorded before it is run
            tokens = generate_tokens(
                engine, torch.tensor(ids[reused:]), min(self.max_new_tokens, self.context_budget - len(ids)),
                Sampler(self.temperature, self.top_p, self.generator), self._stop_ids, self._stop.is_set,
                self.prefill_chunk, self.min_new_tokens)
            emitted = ""
            while True:
                try:
                    token = int(next(tokens))
                except StopIteration as end:
                    reason = end.value
                    break
                self._ids.append(token)
                reply_ids.append(token)
                now = time.perf_counter()
                if len(reply_ids) == 1:
                    t_first = now
                    prefill_s = now - t_start
                text = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
                message["content"] = text
                elapsed = now - t_first
                self.progress = {
                    "tokens": len(reply_ids),
                    "seconds": elapsed,
                    # the first token comes with the prefill, so rate the ones after it
                    "tok_s": (len(reply_ids) - 1) / elapsed if len(reply_ids) > 1 and elapsed > 0 else 0.0,
                }
                # decode-by-diff; hold back a trailing U+FFFD (a multi-byte char still incomplete)
                safe = text.rstrip("\ufffd")
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    piece, emitted = safe[len(emitted):], safe
                    yield piece
            if not reply_ids:  # an end-of-sequence right after the prefill
                prefill_s = time.perf_counter() - t_start
            final = message["content"]
            if final.startswith(emitted) and len(final) > len(emitted):
                yield final[len(emitted):]
        except (KeyboardInterrupt, GeneratorExit):
            reason = "stop" if self._stop.is_set() else "interrupted"
            raise
        finally:
            self._finish(message, reason, reply_ids, t_start, t_first, len(ids), reused, prefill_s)

    def _finish(self, message: dict, reason: str, reply_ids: list[int], t_start: float, t_first: float,
                prompt_len: int, reused: int, prefill_s: float) -> None:
        """Whatever ended the reply: final text, the cache brought in line with the history, stats.

        Each step is idempotent and a Ctrl-C during one repeats it (it cuts, or runs at most a few
        tokens), so the session is never left half-updated.
        """
        decode_s = time.perf_counter() - t_first if reply_ids else 0.0
        for _ in range(3):
            try:
                message["content"] = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
                engine = self._engine
                if engine is not None:
                    engine.truncate(engine.length)  # finish cutting what an interrupted forward wrote
                # after Ctrl-C only finish the last step or two (not a whole interrupted prefill);
                # after an error run nothing, so the original exception is the one reported
                self.sync_cache({"interrupted": 8, "error": 0}.get(reason))
                break
            except KeyboardInterrupt:
                reason = "interrupted"
            except Exception:
                break  # the error that ended the reply is the one reported; the cache is a valid prefix
        stats = {
            "tokens": len(reply_ids),
            "seconds": decode_s,
            "tok_s": len(reply_ids) / decode_s if decode_s > 0 else 0.0,
            "prompt_tokens": prompt_len,
            "cached_tokens": reused,
            "prefill_tokens": prompt_len - reused,
            "prefill_s": prefill_s,
            "total_s": time.perf_counter() - t_start,
            "stop_reason": reason,
        }
        self.last_stats = stats
        self.stats = self.stats + [stats]
        entry = self._meta.get(id(message))
        if entry is not None and entry[0] is message:  # the reply's own stats, for its caption and the export
            self._meta = {**self._meta, id(message): (message, {**entry[1], "stats": stats})}
