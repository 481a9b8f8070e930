"""Hugging Face corpora (optional extra `loopscope[hf]`): streamed once, cached as bytes locally.

`hf:<dataset>[:<config>]`, e.g. `hf:Salesforce/wikitext:wikitext-103-raw-v1`. The documents go through
the same hash-based train/validation split as every other corpus. Offline, it fails at once with a
clear message instead of hanging on the network.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from loopscope.bench.errors import ConfigError

PROBE_TIMEOUT_S = 3.0


def cache_dir() -> Path:
    return Path(os.environ.get("LOOPSCOPE_CACHE", Path.home() / ".cache" / "loopscope")) / "hf"


def hub_reachable(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def parse(spec: str) -> tuple[str, str | None]:
    name, _, config = spec.removeprefix("hf:").partition(":")
    if not name:
        raise ConfigError(f"corpus {spec!r}: expected hf:<dataset>[:<config>]")
    return name, config or None


def stream_documents(spec: str, max_bytes: int | None, *, load_dataset=None,
                     reachable=None) -> Iterator[tuple[str, bytes]]:
    """(name, text bytes) of the dataset's train split, streamed; stops after about 2 x max_bytes."""
    name, config = parse(spec)
    if load_dataset is None:
        try:
            from datasets import load_dataset
            from huggingface_hub import constants
        except ImportError:
            raise ConfigError(f"corpus {spec!r} needs the optional extra: pip install 'loopscope[hf]'") from None
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(f"corpus {spec!r}: HF_HUB_OFFLINE=1 and the corpus is not cached in {cache_dir()}")
        reachable = reachable or (lambda: hub_reachable(constants.ENDPOINT))
    if reachable is not None and not reachable():
        raise ConfigError(f"corpus {spec!r}: the Hugging Face hub cannot be reached (offline?) and the corpus "
                          f"is not cached in {cache_dir()}; use 'default' or a local path")
    dataset = load_dataset(name, config, split="train", streaming=True)
    budget = None if max_bytes is None else 2 * max_bytes  # leave room for the split's hashing
    total = 0
    for i, row in enumerate(dataset):
        text = row.get("text") or ""
        if not text.strip():
            continue
        data = text.encode("utf-8")
        total += len(data)
        yield f"{spec}:{i}", data
        if budget is not None and total >= budget:
            break


def cached_documents(spec: str, max_bytes: int | None, **kwargs) -> Iterator[tuple[str, bytes]]:
    """Documents from the local cache, filling it from the hub on first use (atomically)."""
    safe = spec.removeprefix("hf:").replace("/", "__").replace(":", "--")
    path = cache_dir() / f"{safe}-{max_bytes or 'all'}.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                for name, data in stream_documents(spec, max_bytes, **kwargs):
                    fh.write(name.encode("utf-8").replace(b"\t", b" ") + b"\t" + data.replace(b"\x00", b"") + b"\x00")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    for record in path.read_bytes().split(b"\x00"):
        if record:
            name, _, data = record.partition(b"\t")
            yield name.decode("utf-8"), data
