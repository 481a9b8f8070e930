"""Hugging Face corpora: streamed through a seam, cached, split like any corpus; offline fails fast."""

from __future__ import annotations

import time

import pytest

from loopscope.bench import hf_corpus
from loopscope.bench.corpus import split_documents
from loopscope.bench.errors import ConfigError


def fake_load_dataset(name, config, split, streaming):
    assert (name, config, split, streaming) == ("org/wiki", "raw", "train", True)
    return ({"text": f"article {i} " * 50} if i % 7 else {"text": "  "} for i in range(1000))


def test_streamed_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPSCOPE_CACHE", str(tmp_path))
    docs = list(hf_corpus.cached_documents("hf:org/wiki:raw", 20_000, load_dataset=fake_load_dataset,
                                           reachable=lambda: True))
    assert docs and all(d.startswith(b"article") for _, d in docs)
    assert 40_000 <= sum(len(d) for _, d in docs) < 41_000  # stops after 2 x max_bytes
    # second time from the cache, without the hub
    again = list(hf_corpus.cached_documents("hf:org/wiki:raw", 20_000, load_dataset=None, reachable=None))
    assert again == docs
    train, val = split_documents(iter(docs), 20_000)
    assert len(train) == 19_000 and len(val) > 0


def test_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPSCOPE_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="cannot be reached"):
        list(hf_corpus.cached_documents("hf:org/wiki:raw", 1000, load_dataset=fake_load_dataset,
                                        reachable=lambda: False))
    assert time.perf_counter() - start < 1.0
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written is left


def test_without_the_extra_the_message_says_what_to_install(tmp_path, monkeypatch):
    try:
        import datasets  # noqa: F401
        pytest.skip("the hf extra is installed here")
    except ImportError:
        pass
    monkeypatch.setenv("LOOPSCOPE_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match=r"loopscope\[hf\]"):
        list(hf_corpus.cached_documents("hf:org/wiki", 1000))


def test_unreachable_endpoint_is_detected_quickly():
    start = time.perf_counter()
    assert not hf_corpus.hub_reachable("https://127.0.0.1:9", timeout_s=1.0)
    assert time.perf_counter() - start < 2.0
