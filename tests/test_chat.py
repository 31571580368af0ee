"""Prompt format against mistral-common, and ChatSession's cache bookkeeping on a tiny random Mixtral."""

from __future__ import annotations

import json
import random
import threading

import pytest
import torch

from transformers import MixtralConfig, MixtralForCausalLM

from mixtral_nb.chat import ChatSession, SessionBusy
from mixtral_nb.tokenizer import encode_conversation, is_mixtral_tokenizer


def tiny_mixtral(vocab: int = 32000, seed: int = 0) -> MixtralForCausalLM:
    """2 layers, hidden 64, 4 experts; a wide init so greedy replies vary from token to token."""
    cfg = MixtralConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_mixtral()


@pytest.fixture(scope="module")
def mistral():
    """mistral-common's own v1 tokenizer: "test" mode for prompts, "finetuning" for finished dialogues."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = str(MistralTokenizer._data_path() / "tokenizer.model.v1")
    return {"user": MistralTokenizer.from_file(path, mode=ValidationMode.test),
            "assistant": MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)}


def reference_ids(mistral, messages: list[dict]) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    return mistral[messages[-1]["role"]].encode_chat_completion(request).tokens


@pytest.fixture(params=["transformers", "decoder"])
def engine(request):
    """ChatSession runs the model through transformers' forward or through mixtral_nb's Decoder."""
    return request.param


def assert_cache_consistent(session: ChatSession) -> None:
    """The engine holds exactly the encoded conversation (keys and values of every layer alike)."""
    target = session.encoded_history()
    assert session.cache_ids == target
    assert session.cache.length == len(target)
    kv = getattr(session.cache, "kv", None)  # the transformers engine's DynamicCache
    if kv is not None:
        assert all(layer.keys.shape[-2] == layer.values.shape[-2] == len(target) for layer in kv.layers)


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}


# --------------------------------------------------------------------------- tokenizer and format


def test_tokenizer_is_exact_sentencepiece(tok, mistral):
    assert tok("[INST] Hello [/INST]")["input_ids"] == [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]
    assert is_mixtral_tokenizer(tok) and len(tok) == 32000
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    sp = mistral["user"].instruct_tokenizer.tokenizer
    rng = random.Random(0)
    alphabet = list("ab Z  \n\t.,!?09éüßÇ日本語🎉ñ-_'\"[]/<>\\") + [" world", "  ", "\n\n", "</s>", "<s>", "[INST]", "    x"]
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        assert tok.encode(s, add_special_tokens=False, split_special_tokens=True) == sp.encode(s, bos=False, eos=False)
    text = "  Hello\n world, 日本語 🎉"
    assert tok.decode(sp.encode(text, bos=False, eos=False)) == text


CONVERSATIONS = {
    "single": [U("Hello")],
    "system": [S("You are terse."), U("What is 2+2?")],
    "multi_turn": [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke."), A("No."), U("Please?")],
    "system_multi_turn": [S("Be nice."), U("Hello"), A("Hi there!"), U("How are you?")],
    "non_ascii": [S("Réponds en français."), U("Ça va? 日本語 🎉 naïve"), A("Très bien, merci! ✓"), U("Und dir? Ω≈ç√")],
    "consecutive_users": [U("first"), U("second"), A("ok"), U("third")],
    "system_in_middle": [S("S1"), U("Hello"), S("S2"), U("again")],
    "assistant_first": [A("I speak first."), U("fine")],
    "literal_specials": [U("What does </s> or [INST] mean?\n  Indented line")],
    "leading_spaces": [U("  spaced"), A(" leading space reply"), U("x")],
    "ends_with_assistant": [S("sys"), U("Hi"), A("Yo")],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_encode_conversation_matches_mistral_common(tok, mistral, name):
    messages = CONVERSATIONS[name]
    assert encode_conversation(tok, messages) == reference_ids(mistral, messages)


def test_chat_template_on_the_tokenizer_agrees(tok):
    for name in ("single", "system", "multi_turn", "system_multi_turn", "non_ascii"):
        messages = CONVERSATIONS[name]
        assert tok.apply_chat_template(messages, return_dict=False) == encode_conversation(tok, messages)


def test_bad_role_is_rejected(tok):
    with pytest.raises(ValueError):
        encode_conversation(tok, [{"role": "tool", "content": "x"}])


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_tok(tok):
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str()))
    t.add_special_tokens({"bos_token": "<s>", "unk_token": "<unk>", "eos_token": "<|im_end|>",
                          "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def test_other_tokenizers_use_their_chat_template(chatml_tok, model):
    assert not is_mixtral_tokenizer(chatml_tok)
    messages = [S("sys"), U("Hello"), A("Hi"), U("Again")]
    ids = encode_conversation(chatml_tok, messages)
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids == chatml_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids.count(chatml_tok.convert_tokens_to_ids("<|im_start|>")) == 5  # 4 messages + the reply header
    history = encode_conversation(chatml_tok, messages, add_generation_prompt=False)
    assert ids[: len(history)] == history

    chatml_model = tiny_mixtral(vocab=len(chatml_tok), seed=1)
    session = ChatSession(chatml_model, chatml_tok, system_prompt="sys", max_new_tokens=6)
    first = session.send("Hello")
    session.send("Again")
    assert_cache_consistent(session)
    assert session.last_stats["cached_tokens"] > 0
    assert session.history[1]["content"] == first


# --------------------------------------------------------------------------- ChatSession


def test_cached_turns_equal_from_scratch(tok, model, engine):
    session = ChatSession(model, tok, system_prompt="You are a test.", max_new_tokens=8, engine=engine)
    turns = ["Hello there", "Ça va? 日本語", "Third question, please."]
    for i, text in enumerate(turns):
        before = [dict(m) for m in session.history]
        reply = session.send(text)
        assert reply == session.history[-1]["content"]
        assert_cache_consistent(session)
        stats = session.last_stats
        assert stats["tokens"] > 0 and stats["seconds"] >= 0 and stats["tok_s"] >= 0
        if i == 0:
            # independent reference: transformers' own greedy generate on the encoded prompt
            prompt = encode_conversation(tok, session.messages[:-1])
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
            expected = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
            assert reply == expected
        else:
            assert stats["cached_tokens"] > 0
            assert stats["prefill_tokens"] < stats["prompt_tokens"] / 2  # only the new turn was run
            fresh = ChatSession(model, tok, system_prompt="You are a test.", max_new_tokens=8, engine=engine)
            fresh.history = before
            assert fresh.send(text) == reply
            assert fresh.last_stats["cached_tokens"] == 0


def test_stream_yields_the_reply_in_pieces(tok, model):
    session = ChatSession(model, tok, max_new_tokens=10)
    pieces = list(session.stream("Hello"))
    assert len(pieces) > 1 and "".join(pieces) == session.history[-1]["content"]
    assert_cache_consistent(session)


def test_stop_mid_reply_keeps_history_and_cache_consistent(tok, model, engine):
    session = ChatSession(model, tok, max_new_tokens=30, engine=engine)
    seen: list[str] = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            session.stop()

    reply = session.send("Tell me a long story", on_text=on_text)
    assert session.last_stats["stop_reason"] == "stop"
    assert 3 <= session.last_stats["tokens"] < 30
    assert reply == "".join(seen) == session.history[-1]["content"]
    assert_cache_consistent(session)

    # the conversation carries on exactly as if it had been encoded from scratch
    before = [dict(m) for m in session.history]
    follow = session.send("Go on")
    fresh = ChatSession(model, tok, max_new_tokens=30, engine=engine)
    fresh.history = before
    assert fresh.send("Go on") == follow


def test_keyboard_interrupt_inside_the_model(tok, model, engine):
    session = ChatSession(model, tok, max_new_tokens=30, engine=engine)
    session.send("warm up")
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == 5:  # layer 1 of a decode step: layer 0 has already grown its cache
            raise KeyboardInterrupt

    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(hook)  # called by both engines
    try:
        reply = session.send("interrupt me")
    finally:
        handle.remove()
    assert session.last_stats["stop_reason"] == "interrupted"
    assert 0 < session.last_stats["tokens"] < 30
    assert session.history[-1] == {"role": "assistant", "content": reply}
    assert_cache_consistent(session)


def test_abandoned_stream_is_finalised(tok, model, engine):
    session = ChatSession(model, tok, max_new_tokens=30, engine=engine)
    gen = session.stream("Hello")
    next(gen)
    next(gen)
    gen.close()
    assert session.last_stats["stop_reason"] == "interrupted"
    assert not session.generating
    assert_cache_consistent(session)


def test_second_generation_from_another_thread_is_refused(tok, model):
    session = ChatSession(model, tok, max_new_tokens=30)
    gen = session.stream("Hello")
    next(gen)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(SessionBusy, session.send, "x")))
    t.start()
    t.join()
    assert errors
    gen.close()
    session.send("now it works")


def test_history_is_trimmed_oldest_pair_first(tok, model, engine):
    session = ChatSession(model, tok, system_prompt="Keep me.", max_new_tokens=8, context_budget=70, engine=engine)
    for i in range(6):
        session.send(f"Message number {i}")
        seen = session.messages[:1] + session.history[session.trimmed_messages:-1]  # what the model was shown
        prompt = encode_conversation(tok, seen)
        assert len(prompt) + 8 <= 70
        assert session.history[session.trimmed_messages]["role"] == "user"
        assert_cache_consistent(session)
    assert session.trimmed_messages > 0 and session.trimmed_messages % 2 == 0
    assert session.messages[0] == S("Keep me.")
    assert session.history[-2] == U("Message number 5")
    assert len(session.history) == 12  # the transcript keeps everything
    before = list(session.history)
    with pytest.raises(ValueError):
        session.send("word " * 100)
    assert session.history == before


def test_regenerate_reset_export(tok, model, engine):
    session = ChatSession(model, tok, system_prompt="sys", max_new_tokens=6, engine=engine)
    first = session.send("Hello")
    assert session.regenerate() == first  # greedy: same again
    assert len(session.history) == 2
    assert_cache_consistent(session)

    session.temperature, session.top_p = 1.5, 0.9
    session.generator.manual_seed(1)
    sampled = {session.regenerate() for _ in range(3)}
    assert len(sampled) > 1
    assert len(session.history) == 2
    assert_cache_consistent(session)

    md = session.export()
    assert "sys" in md and "Hello" in md and session.history[-1]["content"] in md
    data = json.loads(session.export("json"))
    assert data["system_prompt"] == "sys" and data["messages"] == session.history
    assert len(data["stats"]) == len(session.stats) == 5

    session.reset()
    assert session.history == [] and session.cache_ids == [] and session.last_stats is None
    with pytest.raises(ValueError):
        session.regenerate()
    assert session.send("Hello again")


def test_decoder_grows_with_the_context_budget(tok, model):
    """Raising context_budget mid-conversation re-creates the Decoder's KV cache and replays the prompt."""
    session = ChatSession(model, tok, max_new_tokens=6, context_budget=64, engine="decoder")
    session.send("Hello")
    assert session.cache.max_length == 64
    session.context_budget = 200
    before = [dict(m) for m in session.history]
    reply = session.send("And now a longer conversation")
    assert session.cache.max_length == 200 and session.last_stats["cached_tokens"] == 0
    assert_cache_consistent(session)
    fresh = ChatSession(model, tok, max_new_tokens=6, context_budget=200, engine="decoder")
    fresh.history = before
    assert fresh.send("And now a longer conversation") == reply


def test_seeded_sampling_is_reproducible(tok, model):
    replies = []
    for _ in range(2):
        session = ChatSession(model, tok, max_new_tokens=8, temperature=0.8, top_p=0.95, seed=123)
        replies.append(session.send("Hello"))
    assert replies[0] == replies[1]


def test_offloaded_engine_model(tok, tmp_path, engine):
    """The engine's MixtralForCausalLM (experts in an ExpertCache) behind a ChatSession and a ResourceMonitor."""
    from mixtral_nb import OffloadConfig, QuantConfig, build_model
    from mixtral_nb.monitor import ResourceMonitor
    from mixtral_nb.tiny import write_tiny

    folder = write_tiny(tmp_path / "tiny", seed=0, layers=2, vocab=32000)
    offload = OffloadConfig(main_size=2 * 3, offload_size=2 * 5, buffer_size=2, offload_per_layer=5, prefetch=1)
    built = build_model("cpu", QuantConfig(None, None), offload, folder)
    monitor = ResourceMonitor(built, device="cpu")
    session = ChatSession(built, tok, system_prompt="sys", max_new_tokens=6, engine=engine)
    with monitor:
        session.send("Hello")
        before = [dict(m) for m in session.history]
        second = session.send("Again")
    assert_cache_consistent(session)
    fresh = ChatSession(built, tok, system_prompt="sys", max_new_tokens=6, engine=engine)
    fresh.history = before
    assert fresh.send("Again") == second
    last = monitor.samples[-1]
    assert last["cache_hits"] + last["cache_misses"] > 0 and 0 <= last["cache_hit_rate"] <= 1


# --------------------------------------------------------------------------- issue 17: bad input, budgets, idle streams


def test_untokenizable_message_is_refused_and_history_unchanged(tok, model):
    session = ChatSession(model, tok, max_new_tokens=4)
    session.send("Hello")
    before = [dict(m) for m in session.history]
    with pytest.raises(ValueError, match="surrogate"):
        session.send("bad \ud800 text")
    assert session.history == before and not session.generating
    assert session.send("Still fine?")  # later turns work
    assert len(session.history) == 4


def test_max_new_tokens_over_the_budget_is_refused_and_transcript_kept(tok, model):
    session = ChatSession(model, tok, max_new_tokens=8, context_budget=200)
    session.send("Hello")
    session.send("Again")
    before = [dict(m) for m in session.history]
    session.max_new_tokens = 200
    with pytest.raises(ValueError, match=r"max_new_tokens=200.*context_budget=200|context_budget=200.*max_new_tokens=200"):
        session.send("Third")
    assert session.history == before
    assert json.loads(session.export("json"))["messages"] == before


def test_trimming_never_deletes_the_transcript(tok, model):
    session = ChatSession(model, tok, max_new_tokens=8, context_budget=70)
    sent = [f"Message number {i}" for i in range(6)]
    for text in sent:
        session.send(text)
    users = [m["content"] for m in session.history if m["role"] == "user"]
    assert users == sent  # the exported conversation is whole; only the model's view was trimmed
    assert [m["content"] for m in json.loads(session.export("json"))["messages"] if m["role"] == "user"] == sent


def test_stream_never_iterated_does_not_hold_the_session(tok, model):
    session = ChatSession(model, tok, max_new_tokens=4)
    session.stream("never read")
    errors = []

    def other() -> None:
        try:
            session.send("from another thread")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert not errors, errors
    assert not session.generating


def test_stop_frees_a_suspended_stream(tok, model):
    session = ChatSession(model, tok, max_new_tokens=30)
    gen = session.stream("Hello")
    next(gen)
    session.stop()
    assert not session.generating
    t = threading.Thread(target=lambda: session.send("from another thread"))
    t.start()
    t.join()
    assert session.history[-2] == U("from another thread")
    assert list(gen) == []  # the stopped stream is over


def test_undo_of_the_only_exchange_with_a_chat_template(chatml_tok):
    """A templated tokenizer refuses an empty conversation: undoing the only exchange must still work
    (the notebooks' widget opens with one), and the next turn equals a fresh session's."""
    chatml_model = tiny_mixtral(vocab=len(chatml_tok), seed=1)
    session = ChatSession(chatml_model, chatml_tok, max_new_tokens=6)
    session.send("Hello")
    removed = session.undo()
    assert [m["role"] for m in removed] == ["user", "assistant"] and session.history == []
    assert_cache_consistent(session)
    fresh = ChatSession(chatml_model, chatml_tok, max_new_tokens=6)
    assert session.send("Again") == fresh.send("Again")
