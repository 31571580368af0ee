"""Multi-turn chat on top of any transformers causal LM, with an exact Mixtral-Instruct prompt format.

The decode loop is written by hand (not ``generate``) so that stopping, Ctrl-C and the KV cache
bookkeeping are exact: after every reply the cache holds precisely the tokens of the encoded
conversation, and the next turn only runs the tokens that are new.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .decoder import Decoder, DecoderConfig
from .paths import cache_root

__all__ = ["ChatSession", "SessionBusy", "encode_conversation", "is_mixtral_tokenizer", "mixtral_tokenizer"]

MIXTRAL_VOCAB_SIZE = 32000
_TOKENIZER_DIRNAME = "mixtral-8x7b-instruct-v0.1-tokenizer"

# Approximates the mistral-common v1 layout for callers of ``tokenizer.apply_chat_template``.
# ``encode_conversation`` is the exact path (it also merges consecutive same-role messages).
MIXTRAL_CHAT_TEMPLATE = (
    "{%- set sys = namespace(text='', first=true) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' and m['content'] -%}"
    "{%- set sys.text = sys.text + ('\\n\\n' if sys.text else '') + m['content'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{%- if sys.first and sys.text -%}"
    "{{- '[INST] ' + sys.text + '\\n\\n' + m['content'] + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST] ' + m['content'] + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- set sys.first = false -%}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- ' ' + m['content'] + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


# --------------------------------------------------------------------------- tokenizer


def _cache_root() -> Path:
    return cache_root()


def _sentencepiece_file() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def _build_tokenizer_folder(target: Path) -> None:
    """Convert mistral-common's sentencepiece model into a tokenizer.json folder.

    Uses the sentencepiece library directly (transformers' own converter needs protobuf) and the
    legacy Llama pipeline (Prepend + Replace normalizer), which reproduces sentencepiece exactly,
    leading spaces included.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(_sentencepiece_file()))
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n)}
    specials = ("<unk>", "<s>", "</s>")
    merges = generate_merges(vocab, scores, skip_tokens=set(specials))

    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    tok.chat_template = MIXTRAL_CHAT_TEMPLATE
    tok.save_pretrained(str(target))


def mixtral_tokenizer(cache_dir: str | os.PathLike | None = None) -> Any:
    """Return the exact Mixtral-8x7B(-Instruct) tokenizer as a transformers fast tokenizer.

    Built offline from the sentencepiece file shipped with mistral-common, so no Hugging Face token or
    download is needed; the converted folder is cached under ``$MIXTRAL_NB_CACHE`` or
    ``~/.cache/mixtral_nb`` (a temp dir if those are not writable).
    """
    from transformers import PreTrainedTokenizerFast

    roots = [Path(cache_dir)] if cache_dir is not None else [_cache_root(), Path(tempfile.gettempdir()) / "mixtral_nb"]
    last_error: Exception | None = None
    for root in roots:
        folder = root / _TOKENIZER_DIRNAME
        try:
            if not (folder / "tokenizer.json").is_file():
                root.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=".tok-", dir=root))
                try:
                    _build_tokenizer_folder(staging)
                    try:
                        staging.rename(folder)  # atomic: concurrent builders never see half a folder
                    except OSError:
                        if not (folder / "tokenizer.json").is_file():
                            raise
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            return PreTrainedTokenizerFast.from_pretrained(str(folder))
        except OSError as exc:  # read-only home, full disk: try the next location
            last_error = exc
    raise RuntimeError(f"could not build the Mixtral tokenizer: {last_error}")


def is_mixtral_tokenizer(tokenizer: Any) -> bool:
    """True for the Mistral/Mixtral v1 sentencepiece vocabulary (ours or the Hub's)."""
    try:
        if len(tokenizer) != MIXTRAL_VOCAB_SIZE:
            return False
        ids = tokenizer.convert_tokens_to_ids(["<s>", "</s>", "▁[", "INST", "]"])
    except Exception:
        return False
    return list(ids) == [1, 2, 733, 16289, 28793]


# --------------------------------------------------------------------------- prompt format


def _check_messages(messages: list[dict]) -> None:
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"unsupported role {m.get('role')!r}; expected system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise ValueError("message content must be a string")


def _mixtral_v1_turns(messages: list[dict]) -> list[tuple[str, str]]:
    """Normalise messages the way mistral-common's v1 request normaliser does.

    System prompts are joined with a blank line and prepended to the first user message;
    consecutive messages of one role are merged (a system message also ends a run).
    """
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    runs: list[tuple[str, list[str]]] = []
    for m in messages:
        if runs and runs[-1][0] == m["role"]:
            runs[-1][1].append(m["content"])
        else:
            runs.append((m["role"], [m["content"]]))
    turns = [(role, "\n\n".join(parts)) for role, parts in runs if role != "system"]
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    if system:
        turns[0] = ("user", system + "\n\n" + turns[0][1])
    return turns


def encode_conversation(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation, ready for the model to write the next assistant reply.

    For the Mixtral vocabulary this reproduces mistral-common's v1 encoding token for token
    (``<s>[INST] user [/INST] reply</s>[INST] ...``), encoding each segment separately as it does.
    Other tokenizers go through their own chat template. ``add_generation_prompt`` only matters for
    templated tokenizers (the Mixtral format has no separate assistant header).
    """
    _check_messages(messages)
    if is_mixtral_tokenizer(tokenizer):

        def enc(text: str) -> list[int]:
            # split_special_tokens: literal "</s>" in user text stays text, as in sentencepiece
            return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

        ids = [tokenizer.bos_token_id]
        for role, content in _mixtral_v1_turns(messages):
            if role == "user":
                ids += enc(f"[INST] {content} [/INST]")
            else:
                ids += enc(content) + [tokenizer.eos_token_id]
        return ids

    out = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    if hasattr(out, "keys"):  # some versions still hand back a BatchEncoding
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(i) for i in out]


# --------------------------------------------------------------------------- cache helpers


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _crop_cache(cache: Any, keep: int) -> None:
    """Cut every layer of a DynamicCache (or a :class:`~mixtral_nb.decoder.Decoder`) back to ``keep`` tokens.

    Layer by layer, because an interrupt inside a forward can leave early layers one step ahead.
    Negative crop arguments mean "remove n tokens" in every transformers 5 release.
    """
    if isinstance(cache, Decoder):  # its position only advances once a forward completes
        cache.truncate(min(keep, cache.pos))
        return
    layers = getattr(cache, "layers", None)
    if layers is None:
        extra = cache.get_seq_length() - keep
        if extra > 0:
            cache.crop(-extra)
        return
    for layer in layers:
        if not getattr(layer, "is_initialized", True):
            continue
        extra = layer.get_seq_length() - keep
        if extra > 0:
            layer.crop(-extra)


# --------------------------------------------------------------------------- session


class SessionBusy(RuntimeError):
    """Raised when a second reply is requested while one is being generated."""


class ChatSession:
    """A multi-turn conversation that keeps the model's KV cache between turns.

    ``history`` holds the user/assistant messages (the system prompt lives in ``system_prompt``).
    Before each turn the encoded conversation is compared with the tokens in the cache; only the
    part after their common prefix is run through the model, so editing ``history`` or
    ``system_prompt`` by hand is safe. ``stop()`` and Ctrl-C keep the partial reply, and the cache
    is then brought back in line with the encoded history.

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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        config = getattr(model, "config", None)
        if engine not in ("auto", "decoder", "transformers"):
            raise ValueError(f"engine={engine!r}: use 'auto', 'decoder' or 'transformers'")
        if engine == "auto":
            on_gpu = self._input_device_of(model).type == "cuda"
            engine = "decoder" if on_gpu and getattr(model, "expert_cache", None) is not None else "transformers"
        self.engine = engine
        default_budget = 4096 if engine == "decoder" else getattr(config, "max_position_embeddings", 0) or 4096
        self.context_budget = int(context_budget or default_budget)
        self.history: list[dict] = []
        self.stats: list[dict] = []
        self.last_stats: dict | None = None
        self.trimmed_messages = 0
        self.progress: dict[str, float] = {"tokens": 0, "seconds": 0.0, "tok_s": 0.0}
        self.generator = torch.Generator(device="cpu")
        if seed is not None:
            self.generator.manual_seed(seed)
        self._cache: Any = None
        self._decoder: Decoder | None = None
        self._cache_ids: list[int] = []
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._active: Any = None  # the generator producing the current reply
        self._active_thread = 0
        self._stop_ids = self._find_stop_ids()
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params

    # ---- public state

    @property
    def messages(self) -> list[dict]:
        """The whole conversation, system prompt first, as role/content dicts."""
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return head + [dict(m) for m in self.history]

    @property
    def cache(self) -> Any:
        """The transformers DynamicCache or the Decoder in use (None before the first turn)."""
        return self._cache

    @property
    def cache_ids(self) -> list[int]:
        """Exactly the token ids whose keys/values are in ``cache``."""
        return list(self._cache_ids)

    @property
    def generating(self) -> bool:
        """True while a reply is being produced (or a stream was started and not finished)."""
        return self._active is not None

    def encoded_history(self) -> list[int]:
        """Token ids of the conversation so far (what the cache holds after a reply)."""
        return encode_conversation(self.tokenizer, self.messages, add_generation_prompt=False)

    # ---- public actions

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message and return the assistant's reply.

        ``on_text`` gets each decoded piece as it arrives. Ctrl-C ends the reply early and returns
        the partial text (kept in history) instead of raising.
        """
        return self._consume(self.stream(text), on_text)

    def stream(self, text: str) -> Iterator[str]:
        """Add a user message and yield the reply piece by piece as it is decoded."""
        self._begin()
        try:
            self.history.append({"role": "user", "content": text})
            try:
                prompt = self._fit_context()
            except ValueError:
                self.history.pop()
                raise
            return self._generate(prompt)
        except BaseException:
            self._active = None
            raise

    def regenerate(self, on_text: Callable[[str], None] | None = None) -> str:
        """Drop the last reply and answer the last user message again."""
        return self._consume(self.stream_regenerate(), on_text)

    def stream_regenerate(self) -> Iterator[str]:
        """Streaming version of ``regenerate``."""
        self._begin()
        try:
            if self.history and self.history[-1]["role"] == "assistant":
                self.history.pop()
            if not self.history:
                raise ValueError("nothing to regenerate: the conversation is empty")
            return self._generate(self._fit_context())
        except BaseException:
            self._active = None
            raise

    def stop(self) -> None:
        """Ask the running reply to end after the current token (safe from any thread)."""
        self._stop.set()

    def reset(self) -> None:
        """Forget the conversation, the cache and the statistics (the system prompt stays)."""
        self._begin()
        self.history = []
        self.stats = []
        self.last_stats = None
        self.trimmed_messages = 0
        self._cache = None
        self._cache_ids = []
        self._active = None

    def export(self, fmt: str = "markdown") -> str:
        """The conversation as Markdown (for reading) or JSON (for reloading into ``history``)."""
        if fmt == "json":
            payload = {
                "system_prompt": self.system_prompt,
                "messages": [dict(m) for m in self.history],
                "stats": list(self.stats),
                "settings": {
                    "max_new_tokens": self.max_new_tokens,
                    "temperature": self.temperature,
                    "top_p": self.top_p,
                    "context_budget": self.context_budget,
                },
            }
            return json.dumps(payload, indent=2, ensure_ascii=False)
        if fmt not in ("markdown", "md"):
            raise ValueError("fmt must be 'markdown' or 'json'")
        parts = ["# Conversation"]
        if self.system_prompt:
            parts.append("**System:** " + self.system_prompt)
        for m in self.history:
            parts.append(f"### {m['role'].capitalize()}\n\n{m['content']}")
        return "\n\n".join(parts) + "\n"

    # ---- generation internals

    def _begin(self) -> None:
        """Claim the session for one reply.

        Refuses while another thread is generating; closes a stream this thread abandoned
        (which finalises it: partial reply kept, cache synced).
        """
        with self._state_lock:
            active = self._active
            if active is not None:
                foreign = self._active_thread != threading.get_ident()
                running = not inspect.isgenerator(active) or inspect.getgeneratorstate(active) == inspect.GEN_RUNNING
                if foreign or running:
                    raise SessionBusy("the session is already generating a reply; call stop() first")
                active.close()
            self._active = True  # claimed; replaced by the generator in _generate
            self._active_thread = threading.get_ident()
            self._stop.clear()

    def _consume(self, gen: Iterator[str], on_text: Callable[[str], None] | None) -> str:
        try:
            for piece in gen:
                if on_text is not None:
                    on_text(piece)
        except KeyboardInterrupt:
            gen.close()
        return self.history[-1]["content"]

    def _generate(self, prompt: list[int]) -> Iterator[str]:
        gen = self._generate_impl(prompt)
        self._active = gen
        self._active_thread = threading.get_ident()
        return gen

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

    def _fit_context(self) -> list[int]:
        """Prompt ids, after dropping the oldest user/assistant pairs that do not fit the budget.

        History is only trimmed when the result fits; otherwise ValueError and nothing changes.
        """
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        start = 0
        while True:
            ids = encode_conversation(self.tokenizer, head + self.history[start:], add_generation_prompt=True)
            remaining = len(self.history) - start
            if len(ids) + self.max_new_tokens <= self.context_budget or remaining <= 1:
                break
            pair = remaining > 2 and self.history[start + 1]["role"] == "assistant"
            start += 2 if pair else 1
        if len(ids) >= self.context_budget:
            raise ValueError(
                f"the prompt alone is {len(ids)} tokens, over the context budget of {self.context_budget}"
            )
        if start:
            del self.history[:start]
            self.trimmed_messages += start
        return ids

    @staticmethod
    def _input_device_of(model: Any) -> torch.device:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        return emb.weight.device if emb is not None else torch.device("cpu")

    def _input_device(self) -> torch.device:
        return self._input_device_of(self.model)

    def _fits(self, decoder: Decoder | None) -> bool:
        """Whether ``decoder`` exists and its KV cache holds ``context_budget`` positions."""
        return decoder is not None and decoder.config.max_len >= self.context_budget

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        if self.engine == "decoder":  # one Decoder per session: its graphs and KV memory are reused
            if not self._fits(self._decoder):
                self._decoder = None  # free the old one's KV memory before allocating the new
                self._decoder = Decoder(self.model, DecoderConfig(max_len=self.context_budget))
            self._decoder.reset()
            return self._decoder

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()

    def _truncate(self, keep: int) -> None:
        if keep <= 0 or self._cache is None or not getattr(self._cache, "is_croppable", True):
            self._cache = self._new_cache()
            self._cache_ids = []
            return
        _crop_cache(self._cache, keep)
        self._cache_ids = self._cache_ids[:keep]

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Run ``ids`` through the model on top of the cache; return the last position's logits."""
        device = self._input_device()
        logits = None
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            kwargs: dict[str, Any] = {self._cache_kwarg: self._cache, "use_cache": True}
            if self._has_logits_to_keep:
                kwargs["logits_to_keep"] = 1
            if isinstance(self._cache, Decoder):
                logits = self._cache.forward(torch.tensor([chunk], device=device))[0]
                self._cache_ids.extend(chunk)
                continue
            with torch.no_grad():
                out = self.model(input_ids=torch.tensor([chunk], device=device), **kwargs)
            self._cache_ids.extend(chunk)  # only after the forward finished: an interrupt leaves it exact
            logits = out.logits[0, -1]
        assert logits is not None
        return logits

    def _prefill(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        """Reuse the cached common prefix of ``ids`` and run the rest; return (logits, reused)."""
        if self._cache is None or isinstance(self._cache, Decoder) and not self._fits(self._cache):
            self._cache = self._new_cache()  # first turn, or context_budget raised past the Decoder's KV cache
            self._cache_ids = []
        _crop_cache(self._cache, len(self._cache_ids))  # undo a half-finished forward, if any
        keep = min(_common_prefix(self._cache_ids, ids), len(ids) - 1)  # the last token yields the logits
        self._truncate(keep)
        keep = len(self._cache_ids)
        return self._forward(ids[keep:]), keep

    def _pick(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > self.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def sync_cache(self, max_forward: int | None = None) -> None:
        """Make the cache hold exactly ``encoded_history()``.

        Needed after every reply: the history ends with an end-of-sequence token the model never
        ran, and re-encoding the reply text can differ from the sampled ids. With ``max_forward``,
        a longer gap is left for the next turn to fill (the cache stays a valid prefix).
        """
        if self._cache is None:
            return
        target = self.encoded_history()
        _crop_cache(self._cache, len(self._cache_ids))
        self._truncate(_common_prefix(self._cache_ids, target))
        missing = target[len(self._cache_ids) :]
        if missing and (max_forward is None or len(missing) <= max_forward):
            self._forward(missing)

    def _generate_impl(self, prompt: list[int]) -> Iterator[str]:
        reason = "length"
        reply_ids: list[int] = []
        emitted = ""
        t_start = time.perf_counter()
        t_first = t_start
        prompt_len = reused = 0
        prefill_s = 0.0
        added_reply = False
        self.progress = {"tokens": 0, "seconds": 0.0, "tok_s": 0.0}
        try:
            prompt_len = len(prompt)
            max_new = min(self.max_new_tokens, self.context_budget - prompt_len)
            self.history.append({"role": "assistant", "content": ""})
            added_reply = True
            logits, reused = self._prefill(prompt)
            t_first = time.perf_counter()
            prefill_s = t_first - t_start
            pending: int | None = None
            while True:
                if self._stop.is_set():
                    reason = "stop"
                    break
                if pending is not None:
                    logits = self._forward([pending])
                token = self._pick(logits)
                if token in self._stop_ids:
                    reason = "eos"
                    break
                reply_ids.append(token)
                text = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
                self.history[-1]["content"] = text
                elapsed = time.perf_counter() - t_first
                self.progress = {
                    "tokens": len(reply_ids),
                    "seconds": elapsed,
                    # the first token comes with the prefill, so rate the ones after it
                    "tok_s": (len(reply_ids) - 1) / elapsed if len(reply_ids) > 1 and elapsed > 0 else 0.0,
                }
                # decode-by-diff; hold back a trailing U+FFFD (a multi-byte char still incomplete)
                safe = text.rstrip("\ufffd")
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    piece, emitted = safe[len(emitted) :], safe
                    yield piece
                if len(reply_ids) >= max_new:
                    break
                pending = token
            final = self.history[-1]["content"]
            if final.startswith(emitted) and len(final) > len(emitted):
                tail, emitted = final[len(emitted) :], final
                yield tail
        except (KeyboardInterrupt, GeneratorExit):
            reason = "interrupted"
            raise
        except BaseException:
            reason = "error"
            raise
        finally:
            self._finish(added_reply, reason, reply_ids, t_start, t_first, prompt_len, reused, prefill_s)

    def _finish(
        self,
        added_reply: bool,
        reason: str,
        reply_ids: list[int],
        t_start: float,
        t_first: float,
        prompt_len: int,
        reused: int,
        prefill_s: float,
    ) -> None:
        """Record stats and bring the cache in line with the history, whatever ended the reply."""
        now = time.perf_counter()
        decode_s = now - t_first if reply_ids else 0.0
        try:
            if added_reply:
                self.history[-1]["content"] = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
                # after Ctrl-C only finish the last step or two (not a whole interrupted prefill);
                # after an error run nothing, so the original exception is the one reported
                max_forward = {"interrupted": 8, "error": 0}.get(reason)
                try:
                    self.sync_cache(max_forward)
                except KeyboardInterrupt:
                    # a second Ctrl-C: drop any half-written step; the next turn re-runs what is missing
                    _crop_cache(self._cache, len(self._cache_ids))
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
                self.stats.append(stats)
        finally:
            self._active = None
