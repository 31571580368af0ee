"""Ctrl-C at any instant of a reply leaves ChatSession's history and KV cache consistent (issue 17).

A KeyboardInterrupt is raised from a trace function at the n-th Python line executed inside
mixtral_nb, transformers or torch code during ``send``, much as a real Ctrl-C lands between two
bytecodes. After it: the engine holds exactly the ids the session claims, every layer's keys and
values have one length, the history is as before or as after the turn, and the next greedy turn
equals a fresh session's reply given the same history. Both engines, tiny random models on CPU.
"""

from __future__ import annotations

import linecache
import random
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers import MixtralConfig, MixtralForCausalLM

import mixtral_nb
from mixtral_nb.chat import ChatSession

TRACED = tuple(str(Path(m.__file__).parent) for m in (mixtral_nb, transformers, torch))
TRIALS = 45  # per engine
WORDS = "alpha beta gamma delta echo fox golf hotel india juliet kilo lima".split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy-sized ops: a second OpenMP thread only adds start-up and contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    cfg = MixtralConfig(
        vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(cfg).eval()


class InterruptAt:
    """Raise KeyboardInterrupt at the ``n``-th traced line (or at the first line ``where(frame)`` accepts)."""

    def __init__(self, n: int = 0, where=None) -> None:
        self.n, self.where, self.count, self.fired = n, where, 0, False

    def _local(self, frame, event, arg):
        if event == "line" and not self.fired:
            self.count += 1
            if (self.where is not None and self.where(frame)) or self.count == self.n:
                self.fired = True
                raise KeyboardInterrupt  # the trace function is then unset: one interrupt, as one Ctrl-C
        return self._local

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename.startswith(TRACED) else None

    def __enter__(self) -> InterruptAt:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)


def kv_lengths(engine) -> list[tuple[int, int]]:
    """(keys, values) lengths of every layer of a transformers engine's cache; [] for the Decoder."""
    kv = getattr(engine, "kv", None)
    if kv is None:
        return []
    return [(layer.keys.shape[-2], layer.values.shape[-2]) for layer in kv.layers if layer.is_initialized]


def assert_consistent(session: ChatSession) -> None:
    engine = session.cache
    ids = session.cache_ids
    if engine is None:  # interrupted before the first engine was made
        assert ids == []
        return
    assert engine.length == len(ids)
    assert ids == session.encoded_history()[: len(ids)]  # the engine holds a prefix of the conversation
    assert all(k == v == len(ids) for k, v in kv_lengths(engine)), kv_lengths(engine)


def send_interrupted(session: ChatSession, text: str, trap: InterruptAt) -> None:
    with trap:
        try:
            session.send(text)
        except KeyboardInterrupt:  # landed outside the reply loop (before it, or in its cleanup)
            pass


@pytest.mark.parametrize("engine", ["transformers", "decoder"])
def test_interrupt_anywhere_keeps_history_and_cache_consistent(tok, model, engine):
    rng = random.Random(1234)
    kw = dict(max_new_tokens=5, engine=engine, context_budget=256)
    calib = ChatSession(model, tok, **kw)
    calib.send("warm up")
    with InterruptAt(n=10**9) as probe:
        calib.send("how many lines does a turn run")
    lines = probe.count
    assert lines > 1000
    t0 = time.perf_counter()
    fired = 0
    for trial in range(TRIALS):
        session = ChatSession(model, tok, **kw)
        for _ in range(rng.randint(0, 2)):
            session.send(" ".join(rng.choices(WORDS, k=rng.randint(1, 6))))
        before = [dict(m) for m in session.history]
        text = " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
        trap = InterruptAt(n=rng.randint(1, lines))
        send_interrupted(session, text, trap)
        fired += trap.fired
        after = session.history
        assert not session.generating
        assert after == before or (after[:-2] == before and after[-2] == {"role": "user", "content": text}
                                   and after[-1]["role"] == "assistant"), (trial, trap.n, after)
        assert_consistent(session)
        follow = rng.choice(WORDS)
        snapshot = [dict(m) for m in session.history]
        reply = session.send(follow)
        assert_consistent(session)
        fresh = ChatSession(model, tok, **kw)
        fresh.history = snapshot
        assert fresh.send(follow) == reply, (trial, trap.n)
    assert fired >= TRIALS * 3 // 4  # most trials really were interrupted
    assert time.perf_counter() - t0 < 60


def _between_keys_and_values(frame) -> bool:
    """The instant inside transformers' DynamicLayer.update where the keys have grown and the values not yet."""
    return frame.f_code.co_name == "update" and "self.values = torch.cat" in linecache.getline(
        frame.f_code.co_filename, frame.f_lineno)


def test_interrupt_between_keys_and_values_of_one_layer(tok, model):
    """The ~1-in-25 Ctrl-C of issue 17: keys one position longer than values; every later turn used to fail."""
    session = ChatSession(model, tok, max_new_tokens=6, engine="transformers")
    session.send("Hello")
    for _ in range(3):
        trap = InterruptAt(where=_between_keys_and_values)
        send_interrupted(session, "interrupt me", trap)
        assert trap.fired
        assert_consistent(session)
        snapshot = [dict(m) for m in session.history]
        reply = session.send("and again")
        fresh = ChatSession(model, tok, max_new_tokens=6, engine="transformers")
        fresh.history = snapshot
        assert fresh.send("and again") == reply
