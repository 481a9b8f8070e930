"""Text corpora as byte arrays with a fixed, hashed train/validation split.

The embedded default needs no network: the documentation topics of `pydoc_data` (English prose)
and the standard library's own `.py` sources, as bytes (vocab 256). Documents are assigned to the
validation split by a hash of their name, so the split does not depend on file order or size caps.
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loopscope.bench.errors import ConfigError

VAL_EVERY = 20  # one document in VAL_EVERY (by name hash) is held out
DOC_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    name: str
    train: np.ndarray  # uint8 bytes
    val: np.ndarray
    description: str
    probe_test: tuple[str, ...] = ()  # the held-out probe examples, for accuracy (probe corpora only)

    @property
    def val_hash(self) -> str:
        """sha256 of the held-out bytes; recorded in the manifest so evals are comparable."""
        return hashlib.sha256(self.val.tobytes()).hexdigest()


def _is_val(name: str) -> bool:
    return zlib.crc32(name.encode()) % VAL_EVERY == 0


def _default_documents() -> Iterator[tuple[str, bytes]]:
    from pydoc_data import topics

    for key in sorted(topics.topics):
        yield f"pydoc:{key}", topics.topics[key].encode("utf-8")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if skip.intersection(rel.parts):
            continue
        yield f"stdlib:{rel.as_posix()}", path.read_bytes()


def _file_documents(pattern: str) -> Iterator[tuple[str, bytes]]:
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise ConfigError(f"corpus {pattern!r}: no file matches (give a file, a directory or a glob)")
    for file in files:
        yield str(file), file.read_bytes()


def split_documents(docs: Iterator[tuple[str, bytes]], max_bytes: int | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents into train and val byte arrays, each capped at its share of max_bytes.

    Both splits are never empty: when the name hash leaves one side without a document (a corpus of
    one file, or of a few), the documents are joined and the last 1/VAL_EVERY of the bytes is held out.
    A corpus with fewer than two bytes is refused."""
    train_cap = val_cap = None
    if max_bytes is not None:
        val_cap = max(max_bytes // VAL_EVERY, 1)
        train_cap = max(max_bytes - val_cap, 1)
    train: list[bytes] = []
    val: list[bytes] = []
    sizes = {"train": 0, "val": 0}
    for name, text in docs:
        if not text:
            continue
        split, parts, cap = ("val", val, val_cap) if _is_val(name) else ("train", train, train_cap)
        if cap is not None and sizes[split] >= cap:
            continue
        parts.append(text + DOC_SEPARATOR)
        sizes[split] += len(text) + len(DOC_SEPARATOR)
    if not val or not train:  # a tiny corpus: hold out the tail of all of it
        blob = b"".join(train + val)
        if max_bytes is not None:
            blob = blob[:max_bytes]
        blob = blob[:-len(DOC_SEPARATOR)] if blob.endswith(DOC_SEPARATOR) else blob
        if len(blob) < 2:
            raise ConfigError(f"corpus holds {len(blob)} byte(s) of text: too little to split into training "
                              "and held-out parts (data.corpus)")
        cut = min(max(int(len(blob) * (1 - 1 / VAL_EVERY)), 1), len(blob) - 1)
        return np.frombuffer(blob[:cut], dtype=np.uint8).copy(), np.frombuffer(blob[cut:], dtype=np.uint8).copy()
    as_array = lambda parts, cap: np.frombuffer(b"".join(parts)[:cap], dtype=np.uint8).copy()  # noqa: E731
    return as_array(train, train_cap), as_array(val, val_cap)


def load_corpus(spec: str = "default", *, max_bytes: int | None = None) -> Corpus:
    """`default` (embedded Python docs and sources) or a local file, directory or glob."""
    if spec == "default":
        train, val = split_documents(_default_documents(), max_bytes)
        return Corpus("default", train, val, "pydoc_data topics + Python standard library sources, bytes")
    if spec.startswith("probe:"):
        from loopscope.bench.probe import probe_corpus

        try:
            train_ex, test_ex, description = probe_corpus(spec)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        as_bytes = lambda ex: np.frombuffer("".join(ex).encode("ascii"), dtype=np.uint8).copy()  # noqa: E731
        return Corpus(spec, as_bytes(train_ex), as_bytes(test_ex), description, tuple(test_ex))
    if spec.startswith("hf:"):
        from loopscope.bench.hf_corpus import cached_documents

        train, val = split_documents(cached_documents(spec, max_bytes), max_bytes)
        return Corpus(spec, train, val, f"Hugging Face dataset {spec[3:]} (train split, streamed), bytes")
    try:
        train, val = split_documents(_file_documents(spec), max_bytes)
    except ConfigError as err:
        raise ConfigError(f"corpus {spec!r}: {err}") from None
    return Corpus(spec, train, val, f"local text from {spec}, bytes")
