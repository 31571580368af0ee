"""The exact Mixtral-8x7B(-Instruct) tokenizer, built offline, and its chat prompt format.

``encode_conversation`` reproduces mistral-common's v1 encoding token for token, so the model sees
what it was fine-tuned on; other tokenizers go through their own chat template.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .paths import cache_root

__all__ = ["MIXTRAL_CHAT_TEMPLATE", "check_messages", "encode_conversation", "is_mixtral_tokenizer", "mixtral_tokenizer"]

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


def _sentencepiece_file() -> Path:
    import mistral_common  # only building the tokenizer needs its sentencepiece file

    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


def _build_tokenizer_folder(target: Path) -> None:
    """Convert mistral-common's sentencepiece model into a tokenizer.json folder.

    Uses the sentencepiece library directly (transformers' own converter needs protobuf) and the
    legacy Llama pipeline (Prepend + Replace normalizer), which reproduces sentencepiece exactly,
    leading spaces included.
    """
    import sentencepiece as spm  # heavy: only building the tokenizer needs these
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast  # heavy: the package import stays fast without it
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
    the default cache folder (a temp dir if those are not writable).
    """
    from transformers import PreTrainedTokenizerFast  # heavy: the package import stays fast without it


    roots = [Path(cache_dir)] if cache_dir is not None else [cache_root(), Path(tempfile.gettempdir()) / "mixtral_nb"]
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


def check_messages(messages: list[dict]) -> None:
    """One clear ValueError for a message no tokenizer can take (before any work, nothing changed).

    Tokenizers reject text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``, e.g. from
    a badly decoded file) with a TypeError from deep inside; this names the message and the fix.
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"message {i}: unsupported role {role!r}; expected system, user or assistant")
        content = m.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string, not {type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = content[exc.start:exc.end]
            raise ValueError(f"message {i} ({m['role']}): not valid text: lone surrogate {bad!r} at character "
                             f"{exc.start}; decode the text with errors='replace' or remove it") from None


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
    check_messages(messages)
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
