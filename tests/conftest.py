"""Shared fixtures: small checkpoints are written once per test session and reused."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def script():
    """``script(name)``: scripts/NAME.py loaded as a module (scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random 4-layer, 8-expert Mixtral in the original hub layout."""
    from mixtral_nb.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_ref(tiny_dir):
    """transformers' own MixtralForCausalLM loaded from the same folder (the reference)."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The exact Mixtral tokenizer, built offline from mistral-common's file into a test folder."""
    from mixtral_nb.tokenizer import mixtral_tokenizer

    return mixtral_tokenizer(cache_dir=tmp_path_factory.mktemp("tokcache"))


def pytest_collection_modifyitems(config, items):
    """Tests that need another process kind run elsewhere, not as skips here: ``gpu`` tests on a
    CUDA machine (`make test-gpu`), ``interpreter`` tests in the TRITON_INTERPRET=1 child pytest
    that tests/test_kernels.py starts."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    keep, drop = [], []
    for item in items:
        if (item.get_closest_marker("gpu") and not torch.cuda.is_available()) or (
                item.get_closest_marker("interpreter") and not interpreting):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
