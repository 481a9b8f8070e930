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
import torch.nn.functional as F

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

    def attend(self, key: CacheKey, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this application's k, v and attend q ([B, H, T, hd]) over every cached position."""
        start, T = self.pos, q.shape[2]
        k, v = self.write(key, k, v)
        if T == 1:
            return F.scaled_dot_product_attention(q, k, v)
        if start == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # a chunk after a prefix: query i sees keys up to start+i (SDPA's is_causal is top-left)
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

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


class StaticKVCache:
    """A KV cache whose buffers never change shape or address, for a compiled (graph-captured) decode step.

    The position is a 0-d int64 tensor on the model's device, advanced in place, so one compiled graph
    serves every step; attention always reads all `max_len` positions under a mask (gpt-fast's layout).
    Buffers are allocated on first write, so one eager forward allocates every entry a family uses before
    anything is compiled. There is no early exit here: the loop count is fixed, so no entry has gaps.
    """

    def __init__(self, max_len: int, policy: str = "per-loop", device: str | torch.device = "cpu") -> None:
        if policy not in KV_POLICIES:
            raise ValueError(f"StaticKVCache: policy={policy!r} is not one of {KV_POLICIES}")
        if max_len < 1:
            raise ValueError(f"StaticKVCache: max_len={max_len} must be >= 1")
        self.max_len = max_len
        self.policy = policy
        self.pos = torch.zeros((), dtype=torch.int64, device=device)
        self._positions = torch.arange(max_len, device=device)
        self._k: dict[CacheKey, torch.Tensor] = {}
        self._v: dict[CacheKey, torch.Tensor] = {}
        _mark_static(self.pos)
        _mark_static(self._positions)

    key = KVCache.key

    def _buffers(self, key: CacheKey, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._k:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self._k[key], self._v[key] = k.new_zeros(shape), v.new_zeros(shape)
            _mark_static(self._k[key])
            _mark_static(self._v[key])
        return self._k[key], self._v[key]

    def attend(self, key: CacheKey, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_all, v_all = self._buffers(key, k, v)
        where = self.pos + self._positions[: k.shape[2]]
        k_all.index_copy_(2, where, k)
        v_all.index_copy_(2, where, v)
        mask = self._positions[None, :] <= where[:, None]  # [T, max_len]: query i sees keys up to pos + i
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)

    def advance(self, n_tokens: int) -> None:
        self.pos.add_(n_tokens)

    def reset(self) -> None:
        """Back to position 0; the buffers stay (stale positions are masked until rewritten)."""
        self.pos.zero_()

    @property
    def n_entries(self) -> int:
        return len(self._k)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k.values(), *self._v.values()))

    def used_bytes(self) -> int:
        pos = int(self.pos)
        return sum(pos * t[:, :, :1].numel() * t.element_size() for t in (*self._k.values(), *self._v.values()))

    def __repr__(self) -> str:
        return (f"StaticKVCache(policy={self.policy!r}, pos={int(self.pos)}, entries={self.n_entries}, "
                f"max_len={self.max_len})")


def _mark_static(t: torch.Tensor) -> None:
    """Tell torch.compile the tensor keeps its address, so CUDA graphs may read and write it in place."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)


def kv_slot(cache: KVCache | StaticKVCache | None, stage: str, layer: int,
            loop: int = 0) -> tuple[KVCache | StaticKVCache, CacheKey] | None:
    """What a block's attention gets: None without a cache, else the cache and this application's key."""
    return None if cache is None else (cache, cache.key(stage, layer, loop))
