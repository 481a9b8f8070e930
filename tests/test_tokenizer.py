"""Tokenizers: bytes is the identity; a locally trained byte-level BPE round-trips and counts bytes exactly."""

from __future__ import annotations

import numpy as np
import pytest

from loopscope.bench.corpus import load_corpus
from loopscope.bench.errors import ConfigError
from loopscope.bench.tokenizer import parse_spec, tokenize


def test_bytes_tokenizer_is_identity():
    corpus = load_corpus(max_bytes=100_000)
    tok = tokenize(corpus, "bytes", None)
    assert tok.vocab_size == 256 and tok.train is corpus.train and (tok.token_bytes == 1).all()


def test_bpe_counts_the_bytes_of_every_token(tmp_path):
    corpus = load_corpus(max_bytes=300_000)
    tok = tokenize(corpus, "bpe:512", tmp_path)
    assert tok.vocab_size == 512 and tok.train.max() < 512
    assert len(tok.val) < 0.7 * len(corpus.val)  # it compresses
    # the bytes of the tokens add up to the (valid UTF-8) text they encode
    assert tok.token_bytes[tok.val].sum() == len(bytes(corpus.val).decode("utf-8", "replace").encode("utf-8"))
    cached = list(tmp_path.glob("bpe-512-*.json"))
    assert len(cached) == 1
    again = tokenize(corpus, "bpe:512", tmp_path)  # from the cache
    assert np.array_equal(again.val, tok.val)


@pytest.mark.parametrize("spec", ["bpe", "bpe:12", "wordpiece:1000", "bpe:abc"])
def test_bad_tokenizer_spec(spec):
    with pytest.raises(ConfigError, match="data.tokenizer"):
        parse_spec(spec)
