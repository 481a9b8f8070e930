"""The embedded corpus needs no network and splits deterministically."""

from __future__ import annotations

import pytest

from loopscope.bench.corpus import load_corpus
from loopscope.bench.errors import ConfigError


def test_default_corpus_is_deterministic_and_split():
    a = load_corpus(max_bytes=500_000)
    b = load_corpus(max_bytes=500_000)
    assert a.val_hash == b.val_hash
    assert len(a.train) == 475_000 and len(a.val) == 25_000
    assert a.train.dtype.name == "uint8"
    text = bytes(a.train[:2000]).decode("utf-8", "replace")
    assert "statement" in text or "def " in text


def test_local_directory_corpus(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i} " * 20)
    c = load_corpus(str(tmp_path))
    assert len(c.val) > 0 and len(c.train) > len(c.val)
    assert c.val_hash == load_corpus(str(tmp_path / "*.txt")).val_hash


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no file matches"):
        load_corpus(str(tmp_path / "nothing-here-*.txt"))
