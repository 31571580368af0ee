"""One cache root (paths.cache_root) and one set of byte units (units.py), used everywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import mixtral_nb
from mixtral_nb import units
from mixtral_nb.paths import cache_root

PACKAGE = Path(mixtral_nb.__file__).parent


def test_units_and_fmt_bytes():
    assert (units.KiB, units.MiB, units.GiB) == (1024, 1024**2, 1024**3)
    assert (units.MB, units.GB) == (10**6, 10**9)
    assert units.fmt_bytes(15095 * units.MiB) == "14.7 GiB"
    assert units.fmt_bytes(2.5e9, "GB", 2) == "2.50 GB"
    assert units.fmt_bytes(None) == "?"
    with pytest.raises(ValueError, match="unknown unit 'gb': use one of B, KiB"):
        units.fmt_bytes(1, "gb")


def test_cache_root_expands_home_and_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MIXTRAL_NB_CACHE", raising=False)
    assert cache_root() == tmp_path / ".cache" / "mixtral_nb"
    monkeypatch.setenv("MIXTRAL_NB_CACHE", "")
    assert cache_root() == tmp_path / ".cache" / "mixtral_nb"
    monkeypatch.setenv("MIXTRAL_NB_CACHE", "~/models")
    assert cache_root() == tmp_path / "models"
    monkeypatch.setenv("BIG_DISK", str(tmp_path / "disk"))
    monkeypatch.setenv("MIXTRAL_NB_CACHE", "$BIG_DISK/mixtral")
    assert cache_root() == tmp_path / "disk" / "mixtral"


def _module(*names: str):
    """The first of ``names`` that imports (modules move between packages during the redesign)."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise AssertionError(f"none of {names} exists")


def test_every_module_uses_the_one_cache_root(monkeypatch, tmp_path):
    from mixtral_nb import embedded, load, quality

    article = _module("mixtral_nb.checkpoint.article", "mixtral_nb.article")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MIXTRAL_NB_CACHE", "~/c")
    want = tmp_path / "c"
    assert load.cache_root() == want and embedded.default_cache_dir() == want
    assert quality._cache_file() == want / "quality" / "results.json"
    # a read-only parent (Kaggle's /kaggle/input): the converted copy goes under the cache root
    monkeypatch.setattr(article.os, "access", lambda path, mode: False)
    assert article.converted_path(tmp_path / "ckpt") == want / "converted" / ("ckpt" + article.SUFFIX)


def _source_lines():
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            yield path.relative_to(PACKAGE).as_posix(), i, code


def test_only_paths_reads_the_cache_variable():
    hits = [(p, i) for p, i, code in _source_lines()
            if "environ" in code and ("MIXTRAL_NB_CACHE" in code or "CACHE_ENV" in code) and p != "paths.py"]
    assert hits == [], f"read $MIXTRAL_NB_CACHE through mixtral_nb.paths.cache_root(), not in {hits}"
    homes = [(p, i) for p, i, code in _source_lines() if '".cache"' in code and p != "paths.py"]
    assert homes == [], f"the default cache folder is spelled in paths.py only, not in {homes}"


def test_only_units_defines_byte_units():
    pattern = re.compile(r"1024\s*\*\*\s*[23]|1\s*<<\s*(20|30)\b|2\s*\*\*\s*(20|30)\b|^\s*(GIB|GiB|MiB|GB)\s*=")
    hits = [(p, i, code.strip()) for p, i, code in _source_lines() if pattern.search(code) and p != "units.py"]
    assert hits == [], f"use mixtral_nb.units (GiB, MiB, GB) instead of {hits}"
