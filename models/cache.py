"""An explicit KV cache for incremental decoding (gpt-fast style: generation is plain Python around it).

Entries are keyed by *layer application*, so the cache policy decides what looped models store:
- ``per-loop``  one entry per (loop, core layer), as the official Parcae and Huginn code do; decoding
                reproduces the full-sequence forward exactly. KV memory grows with the effective depth.
- ``last-loop`` one entry per physical core layer, overwritten on every loop, so a past token is seen
                through its last loop's keys/values only (Ouro's decode policy). Cheaper; not exact.

Buffers are allocated on first write with the writer's device and dtype, `max_len` positions long.
"""

from __future__ import annotations

import torch

KV_POLICIES: tuple[str, ...] = ("per-loop", "last-loop")

CacheKey = tuple[str, int, int]  # (stage, loop, layer); stage in {"dense", "prelude", "core", "coda"}


class KVCache:
    def __init__(self, max_len: int, policy: str = "per-loop") -> None:
        if policy not in KV_POLICIES:
            raise ValueError(f"KVCache: policy={policy!r} is not one of {KV_POLICIES}")
        if max_len < 1:
            raise ValueError(f"KVCache: max_len={max_len} must be >= 1")
        self.max_len = max_len
        self.policy = policy
        self.pos = 0  # tokens already committed; the current forward writes at [pos, pos + T)
        self._k: dict[CacheKey, torch.Tensor] = {}
        self._v: dict[CacheKey, torch.Tensor] = {}
        self._filled: dict[CacheKey, int] = {}

    def key(self, stage: str, layer: int, loop: int = 0) -> CacheKey:
        """The entry a layer application uses: core layers get one per loop only under `per-loop`."""
        if stage == "core" and self.policy == "per-loop":
            return (stage, loop, layer)
        return (stage, 0, layer)

    def write(self, key: CacheKey, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, H, T, hd]) at positions [pos, pos+T); return all keys/values up to pos+T."""
        start, end = self.pos, self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache.write: {end} positions exceed max_len={self.max_len} (key {key})")
        if key not in self._k:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self._k[key] = k.new_zeros(shape)
            self._v[key] = v.new_zeros(shape)
            self._filled[key] = 0
        if self._k[key].shape[:2] != k.shape[:2] or self._k[key].shape[3] != k.shape[3]:
            raise ValueError(f"KVCache.write: key {key} holds [batch, heads, :, head_dim] = "
                             f"{tuple(self._k[key].shape)}, got {tuple(k.shape)}; use one cache per batch shape")
        if self._filled[key] < start:
            self._fill_gap(key, start)
        self._k[key][:, :, start:end] = k
        self._v[key][:, :, start:end] = v
        self._filled[key] = max(self._filled[key], end)
        return self._k[key][:, :, :end], self._v[key][:, :, :end]

    def _fill_gap(self, key: CacheKey, start: int) -> None:
        """Past tokens that exited early never ran this loop: reuse their latest loop's entry
        (Huginn's "latest" lookup). Loop 0 always runs, so a source always exists."""
        stage, loop, layer = key
        source = (stage, loop - 1, layer)
        if loop == 0 or source not in self._k or self._filled[source] < start:
            raise RuntimeError(f"KVCache: entry {key} is missing positions "
                               f"{self._filled[key]}..{start} and has no earlier loop to copy from")
        lo = self._filled[key]
        self._k[key][:, :, lo:start] = self._k[source][:, :, lo:start]
        self._v[key][:, :, lo:start] = self._v[source][:, :, lo:start]
        self._filled[key] = start

    def advance(self, n_tokens: int) -> None:
        """Commit the tokens of the forward that just ran."""
        self.pos += n_tokens

    def reset(self) -> None:
        self.pos = 0
        self._k.clear()
        self._v.clear()
        self._filled.clear()

    @property
    def n_entries(self) -> int:
        return len(self._k)

    def nbytes(self) -> int:
        """Bytes held by allocated buffers (whole max_len, as allocated)."""
        return sum(t.numel() * t.element_size() for t in (*self._k.values(), *self._v.values()))

    def used_bytes(self) -> int:
        """Bytes of the committed positions only (what a tightly sized cache would need)."""
        return sum(self.pos * t[:, :, :1].numel() * t.element_size()
                   for t in (*self._k.values(), *self._v.values()))

    def __repr__(self) -> str:
        return f"KVCache(policy={self.policy!r}, pos={self.pos}, entries={self.n_entries}, max_len={self.max_len})"


def kv_slot(cache: KVCache | None, stage: str, layer: int, loop: int = 0) -> tuple[KVCache, CacheKey] | None:
    """What a block's attention gets: None without a cache, else the cache and this application's key."""
    return None if cache is None else (cache, cache.key(stage, layer, loop))
