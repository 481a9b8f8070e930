"""Tokenizers: raw bytes (vocab 256, the default) or a byte-level BPE trained locally on the train split.

Bits per byte needs the number of bytes each scored token stands for; `token_bytes[id]` gives it.
A BPE is trained once per corpus and vocab size with the `tokenizers` library and cached as JSON
beside the run, so every cell of a run uses the same one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loopscope.bench.corpus import Corpus
from loopscope.bench.errors import ConfigError

CHUNK = 1 << 16  # encode in chunks of about this many characters, cut at newlines


@dataclass(frozen=True)
class Tokenized:
    name: str
    vocab_size: int
    train: np.ndarray  # token ids
    val: np.ndarray
    token_bytes: np.ndarray  # bytes per token id


def parse_spec(spec: str) -> tuple[str, int]:
    """`bytes` -> ("bytes", 256); `bpe:4096` -> ("bpe", 4096)."""
    if spec == "bytes":
        return "bytes", 256
    kind, _, size = spec.partition(":")
    if kind != "bpe" or not size.isdigit() or not 260 <= int(size) <= 262_144:
        raise ConfigError(f"data.tokenizer = {spec!r}: expected 'bytes' or 'bpe:<vocab size 260..262144>'")
    return "bpe", int(size)


def vocab_size(spec: str) -> int:
    return parse_spec(spec)[1]


def _chunks(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = text.find("\n", start + CHUNK)
        end = len(text) if end < 0 else end + 1
        out.append(text[start:end])
        start = end
    return out


def _train_bpe(text: str, size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_chunks(text), trainer=trainer)
    return tok


def _encode(tok, text: str) -> np.ndarray:
    ids = [i for enc in tok.encode_batch(_chunks(text)) for i in enc.ids]
    return np.asarray(ids, dtype=np.int32)


def tokenize(corpus: Corpus, spec: str, cache_dir: Path | None) -> Tokenized:
    kind, size = parse_spec(spec)
    if kind == "bytes":
        return Tokenized("bytes", 256, corpus.train, corpus.val, np.ones(256, dtype=np.int64))
    from tokenizers import Tokenizer

    # Byte-level BPE models UTF-8 text; invalid bytes become U+FFFD, and bpb counts the bytes modelled.
    train_text = bytes(corpus.train).decode("utf-8", errors="replace")
    val_text = bytes(corpus.val).decode("utf-8", errors="replace")
    key = hashlib.sha256(corpus.train[: 1 << 20].tobytes() + str(len(corpus.train)).encode()).hexdigest()[:12]
    path = (cache_dir / f"bpe-{size}-{key}.json") if cache_dir else None
    if path is not None and path.is_file():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = _train_bpe(train_text, size)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tok.save(str(tmp))
            os.replace(tmp, path)
    actual = tok.get_vocab_size()
    token_bytes = np.zeros(size, dtype=np.int64)
    for i in range(actual):
        token_bytes[i] = len(tok.id_to_token(i))  # byte-level: one character per byte
    return Tokenized(f"bpe:{size}", size, _encode(tok, train_text), _encode(tok, val_text), token_bytes)
