"""NumbaEngine: runs a loopscope model's inference (prefill, incremental decode with its own KV cache,
test-time loop count, adaptive exit) with the numba kernels only. No torch call on the hot path.

    engine = NumbaEngine.from_model(model)            # exports the weights once
    logits = engine.prefill(idx)                      # [B, T, V]
    cache = engine.new_cache(batch, max_len, policy="per-loop")
    engine.prefill(prompt, cache=cache)               # fills the cache
    next_logits = engine.decode_step(tokens, cache)   # [B, V], one token per row

The math mirrors models/ exactly (read models/blocks.py, gpt.py, parcae.py, recurrence.py, cache.py):
pre-norm blocks (or Huginn sandwich norms), RoPE on (first half, second half) channel pairs, QK-norm after
RoPE, value embeddings gated per head, relu2 or SwiGLU MLPs, the tied head; for looped families the
injection, the loop driver and its exit rules, and the two KV policies with the "latest loop" gap fill.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .attention import kv_cache_shapes, scratch_for
from .decode import decode_block, decode_head
from .export import LayerWeights, ModelWeights, export_model
from .gemm import PackedWeight
from .kernel_set import CpuKernels
from .ops_cpu import rope_tables

F32 = np.float32
KV_POLICIES = ("per-loop", "last-loop")
# Decode of at most this many rows goes through one fused serial call per block (decode.py).
SERIAL_DECODE_MAX_ROWS = 8
_NONE_1D = np.zeros(0, F32)
_NONE_2D = np.zeros((0, 0), F32)
CacheKey = tuple[str, int, int]  # (stage, loop, layer), as models/cache.py


# ------------------------------------------------------------------------------------- memory
class HostMemory:
    """Where the engine's arrays live and how it moves them. The CPU engine's are numpy arrays; the CUDA
    engine (engine_cuda.py) swaps in device memory with the same methods."""

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, F32)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, F32)

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        dst[...] = src

    def fill(self, dst: np.ndarray, value: float) -> None:
        dst[...] = value

    def to_host(self, arr: np.ndarray) -> np.ndarray:
        return arr

    def kv_shapes(self, batch: int, n_heads: int, max_len: int, head_dim: int) -> tuple[tuple[int, ...], ...]:
        return kv_cache_shapes(batch, n_heads, max_len, head_dim)

    def scratch(self, max_len: int) -> np.ndarray:
        return scratch_for(max_len)


# ----------------------------------------------------------------------------------- KV cache
class EngineCache:
    """The engine's KV cache: per entry, K panels [B, H, ceil(max_len/32), hd, 32] and V panels
    [B, H, hd/16, max_len, 16]. Keys and policies as models.KVCache: `per-loop` keeps one entry per (loop,
    core layer), `last-loop` one per physical layer (overwritten each loop)."""

    def __init__(self, batch: int, max_len: int, policy: str, loops: int | None, n_heads: int,
                 head_dim: int, memory: HostMemory | None = None) -> None:
        if policy not in KV_POLICIES:
            raise ValueError(f"EngineCache: policy={policy!r} is not one of {KV_POLICIES}")
        if max_len < 1 or batch < 1:
            raise ValueError(f"EngineCache: batch={batch} and max_len={max_len} must be >= 1")
        self.batch, self.max_len, self.policy, self.loops = batch, max_len, policy, loops
        self.n_heads, self.head_dim = n_heads, head_dim
        self.memory = memory or HostMemory()
        self.pos = 0
        self._entries: dict[CacheKey, tuple[np.ndarray, np.ndarray]] = {}
        self._filled: dict[CacheKey, int] = {}

    def key(self, stage: str, layer: int, loop: int = 0) -> CacheKey:
        if stage == "core" and self.policy == "per-loop":
            return (stage, loop, layer)
        return (stage, 0, layer)

    def entry(self, key: CacheKey, start: int, end: int, kernels: CpuKernels) -> tuple[np.ndarray, np.ndarray]:
        """The (K, V) panels for writing positions [start, end); positions this entry never saw are
        copied from the previous loop's entry (tokens that exited early, as models.KVCache)."""
        if end > self.max_len:
            raise ValueError(f"EngineCache: {end} positions exceed max_len={self.max_len} (entry {key})")
        if key not in self._entries:
            k_shape, v_shape = self.memory.kv_shapes(self.batch, self.n_heads, self.max_len, self.head_dim)
            self._entries[key] = (self.memory.zeros(k_shape), self.memory.zeros(v_shape))
            self._filled[key] = 0
        if self._filled[key] < start:
            stage, loop, layer = key
            source = (stage, loop - 1, layer)
            if loop == 0 or source not in self._entries or self._filled[source] < start:
                raise RuntimeError(f"EngineCache: entry {key} is missing positions {self._filled[key]}..{start} "
                                   "and has no earlier loop to copy from")
            kernels.copy_positions(*self._entries[source], *self._entries[key], self._filled[key], start)
        self._filled[key] = max(self._filled[key], end)
        return self._entries[key]

    def advance(self, n_tokens: int) -> None:
        self.pos += n_tokens

    @property
    def n_entries(self) -> int:
        return len(self._entries)

    def nbytes(self) -> int:
        """Bytes held by allocated entries (whole max_len)."""
        return sum(int(k.nbytes + v.nbytes) for k, v in self._entries.values())

    def used_bytes(self) -> int:
        """Bytes of the committed positions only (as models.KVCache.used_bytes)."""
        per_position = 2 * self.batch * self.n_heads * self.head_dim * 4
        return self.pos * per_position * len(self._entries)


# ------------------------------------------------------------------------------ region timers
@dataclass
class RegionTimers:
    """Wall time per region, summed over calls; the labels of models/regions.py (embed, blocks > block[j],
    prelude, injection, loop[i] > injection and core[j], readout, coda, head).
    CPU kernels run synchronously, so perf_counter around them is exact; set `sync` for asynchronous ones."""

    enabled: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sync: Any = None  # called before each clock read (the CUDA engine's kernels are asynchronous)

    def start(self) -> float:
        if not self.enabled:
            return 0.0
        if self.sync is not None:
            self.sync()
        return time.perf_counter()

    def stop(self, region: str, t0: float) -> None:
        if self.enabled:
            if self.sync is not None:
                self.sync()
            self.seconds[region] += time.perf_counter() - t0
            self.calls[region] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


# --------------------------------------------------------------------------------- workspace
class Workspace:
    """Activation buffers for one (rows, seq) shape, reused across calls of that shape."""

    def __init__(self, rows: int, seq: int, d: int, d_hidden: int, d_act: int, vocab: int,
                 n_heads: int, head_dim: int, memory: HostMemory) -> None:
        empty = memory.empty
        self.x = empty((rows, d))          # the residual stream of the stage being run
        self.xn = empty((rows, d))         # normalised input of a sub-block
        self.qkv = empty((rows, 3 * d))
        self.att = empty((rows, d))
        self.tmp = empty((rows, d))        # a sub-block's output before a sandwich norm
        self.hid = empty((rows, d_hidden))
        self.act = self.hid if d_act == d_hidden else empty((rows, d_act))
        self.h = empty((rows, d))          # loop state
        self.h_next = empty((rows, d))
        self.e = empty((rows, d))          # prelude output
        self.drive = empty((rows, d))      # loop-invariant part of the injection
        self.head_x = empty((rows, d))     # the readout/coda stream
        self.logits = empty((rows, vocab))
        self.logp = empty((rows, vocab))
        self.prev_logp = empty((rows, vocab))
        k_shape, v_shape = memory.kv_shapes(rows // seq, n_heads, seq, head_dim)
        self.k_panels = memory.zeros(k_shape)  # K/V of the layer being run when there is no cache
        self.v_panels = memory.zeros(v_shape)
        self.scratch = memory.scratch(seq)


@dataclass
class _Call:
    """What one forward needs besides the weights: token ids, positions, the cache."""

    idx: np.ndarray       # [rows] int64
    seq: int              # tokens per row (T for prefill, 1 for decode)
    start: int            # position of the first token
    cache: EngineCache | None
    ws: Workspace
    scratch: np.ndarray


# ------------------------------------------------------------------------------------- engine
class NumbaEngine:
    def __init__(self, weights: ModelWeights, *, fastmath: bool = True, seed: int = 0,
                 serial_decode: bool | None = None) -> None:
        cfg = weights.config
        self.weights = weights
        self.config = cfg
        self.kernels = CpuKernels(fastmath)
        self.memory = HostMemory()
        self.fastmath = fastmath
        self.timers = RegionTimers()
        self.d, self.n_heads, self.head_dim = cfg.d_model, cfg.n_heads, cfg.head_dim
        self.eps = F32(cfg.norm_eps)
        self.d_ff = int(cfg.d_ff)
        self.vocab = cfg.vocab_size
        self.rng = np.random.default_rng(seed)
        self._rope: tuple[np.ndarray, np.ndarray] = rope_tables(cfg.max_seq_len, self.head_dim, cfg.rope_theta)
        self._workspaces: dict[tuple[int, int], Workspace] = {}
        # the fused decode block is compiled with fastmath only
        self.serial_decode = fastmath if serial_decode is None else serial_decode

    @classmethod
    def from_model(cls, model: Any, *, fastmath: bool = True, seed: int = 0,
                   serial_decode: bool | None = None) -> NumbaEngine:
        """Export `model`'s weights (once) and build an engine for them. `serial_decode`: None uses the fused
        decode block (one call per block) when fastmath is on; True/False forces it on/off."""
        return cls(export_model(model), fastmath=fastmath, seed=seed, serial_decode=serial_decode)

    # ------------------------------------------------------------------------------ public API
    def prefill(self, idx: np.ndarray, loops: int | None = None, *, cache: EngineCache | None = None,
                exit: Any = None, h0: np.ndarray | None = None, stats: dict | None = None) -> np.ndarray:
        """Logits [B, T, V] for token ids idx [B, T]. With `cache` (empty), also fills it."""
        idx = self._tokens(idx, 2, "prefill")
        B, T = idx.shape
        if cache is not None:
            self._check_cache(cache, B)
            if cache.pos != 0:
                raise ValueError(f"prefill: cache already holds {cache.pos} positions; use decode_step")
        if loops is None and cache is not None:
            loops = cache.loops
        logits = self._forward(idx.reshape(-1), T, 0, cache, loops, exit, h0, stats)
        return np.array(self.memory.to_host(logits)).reshape(B, T, self.vocab)  # a copy: buffers are reused

    def decode_step(self, tokens: np.ndarray, cache: EngineCache, *, loops: int | None = None,
                    exit: Any = None, h0: np.ndarray | None = None, stats: dict | None = None) -> np.ndarray:
        """Logits [B, V] for one new token per row (tokens [B]), attending to everything in `cache`."""
        tokens = self._tokens(tokens, 1, "decode_step")
        self._check_cache(cache, tokens.shape[0])
        if cache.pos == 0:
            raise ValueError("decode_step: the cache is empty; run prefill(prompt, cache=cache) first")
        logits = self._forward(tokens, 1, cache.pos, cache, loops if loops is not None else cache.loops,
                               exit, h0, stats)
        return np.array(self.memory.to_host(logits))  # a copy: buffers are reused

    def new_cache(self, batch: int, max_len: int, policy: str = "per-loop", loops: int | None = None) -> EngineCache:
        """An empty KV cache; `loops` is the loop count prefill/decode use with it (None: the model's default,
        mu_rec, or ACT halting up to act_max_steps for ut)."""
        return EngineCache(batch, max_len, policy, loops, self.n_heads, self.head_dim, self.memory)

    def warmup(self) -> float:
        """Compile (or load from numba's disk cache) the kernels the engine uses; returns the seconds spent."""
        t0 = time.perf_counter()
        timers_were = self.timers.enabled
        self.timers.enabled = False
        prompt = np.zeros((1, 9), np.int64)
        cache = self.new_cache(1, 12)
        self.prefill(prompt, cache=cache)
        self.decode_step(np.zeros(1, np.int64), cache)
        self.timers.enabled = timers_were
        return time.perf_counter() - t0

    def enable_timers(self, on: bool = True) -> None:
        self.timers.enabled = on
        self.timers.reset()

    def region_times(self) -> dict[str, float]:
        """Seconds per region since timers were enabled (summed over calls)."""
        return dict(self.timers.seconds)

    # ------------------------------------------------------------------------------- internals
    def _default_loops(self) -> int:
        return int(self.config.mu_rec) if self.config.is_looped else 1

    def _tokens(self, idx: np.ndarray, ndim: int, where: str) -> np.ndarray:
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if idx.ndim != ndim:
            raise ValueError(f"{where}: token ids must have {ndim} dims, got shape {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.vocab):
            raise ValueError(f"{where}: token ids must lie in [0, {self.vocab}), got {idx.min()}..{idx.max()}")
        return idx

    def _check_cache(self, cache: EngineCache, batch: int) -> None:
        if cache.batch != batch:
            raise ValueError(f"cache was made for batch {cache.batch}, got {batch} rows")

    def _workspace(self, rows: int, seq: int) -> Workspace:
        key = (rows, seq)
        if key not in self._workspaces:
            d_hidden = 2 * self.d_ff if self.config.mlp == "swiglu" else self.d_ff
            self._workspaces[key] = Workspace(rows, seq, self.d, d_hidden, self.d_ff, self.vocab,
                                              self.n_heads, self.head_dim, self.memory)
        return self._workspaces[key]

    def _rope_tables(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        if self._rope[0].shape[0] < length:
            self._rope = rope_tables(max(length, 2 * self._rope[0].shape[0]), self.head_dim,
                                     self.config.rope_theta)
        return self._rope

    def _forward(self, idx: np.ndarray, seq: int, start: int, cache: EngineCache | None, loops: int | None,
                 exit: Any, h0: np.ndarray | None, stats: dict | None) -> np.ndarray:
        if loops is not None and loops < 1:
            raise ValueError(f"loops={loops} must be >= 1")
        family = self.config.family
        if exit is not None and exit.kind not in ("state", "kl"):
            raise NotImplementedError(f"NumbaEngine: exit kind {exit.kind!r} is not implemented (only 'state', 'kl')")
        if exit is not None and family in ("gpt", "ut"):
            if family == "ut":
                raise ValueError("ut: adaptive exit is ACT halting; pass exit=None (act_eps sets the threshold)")
            exit = None  # a dense model has nothing to exit from (models/gpt.py ignores it too)
        rows = idx.shape[0]
        ws = self._workspace(rows, seq)
        call = _Call(idx=idx, seq=seq, start=start, cache=cache, ws=ws, scratch=ws.scratch)
        self._rope_tables(start + seq)
        t0 = self.timers.start()
        if self._serial(call):
            np.take(self.weights.wte, idx, axis=0, out=ws.x)  # a few rows: no parallel dispatch
        else:
            self.kernels.gather_rows(self.weights.wte, idx, ws.x)
        self.timers.stop("embed", t0)
        if family == "gpt":
            self._stage("blocks", ws.x, call)
            logits = self._logits(ws.x, call)
            if stats is not None:
                stats["loops_used"] = 1.0
        elif family == "ut":
            logits = self._ut(call, loops, h0, stats)
        elif family in ("parcae", "rdm", "looped"):
            h = self._looped(call, loops if loops is not None else self._default_loops(), exit, h0, stats)
            logits = self._readout(h, call)
        else:
            raise NotImplementedError(f"NumbaEngine: family {family!r} is not supported")
        if cache is not None:
            cache.advance(seq)
        return logits

    # ----- the looped families
    def _prelude(self, call: _Call) -> None:
        """Prelude blocks on ws.x, then e = ln_prelude(x) (or x) into ws.e."""
        ws, ex = call.ws, self.weights.extras
        self._stage("prelude", ws.x, call)
        if "ln_prelude" in ex:
            self.kernels.rmsnorm_rows(ws.x, ex["ln_prelude"], self.eps, ws.e)
        else:
            self.memory.copy(ws.e, ws.x)

    def _looped(self, call: _Call, loops: int, exit: Any, h0: np.ndarray | None, stats: dict | None) -> np.ndarray:
        """parcae / rdm / looped (models/recurrence.LoopedLM): prelude, the loop-invariant part of the
        injection, then the loops; the family's own math is in the four methods below."""
        ws = call.ws
        self._prelude(call)
        t0 = self.timers.start()
        self._injection_setup(ws)
        self._initial_state(ws, h0)
        self.timers.stop("injection", t0)

        def step(h: np.ndarray, out: np.ndarray, loop: int) -> None:
            t1 = self.timers.start()
            self._inject(h, out, ws)
            self.timers.stop("injection", t1)
            self._stage("core", out, call, loop=loop)

        h = self._run_loops(step, call, loops, exit, stats)
        if stats is not None:
            self._loop_stats(stats)
        return h

    # the family's own math (models/parcae.py, rdm.py, looped.py: make_injection, read_state, loop_stats)
    def _injection_setup(self, ws: Workspace) -> None:
        """What the injection computes once per forward (e is the same every loop)."""
        ex, family = self.weights.extras, self.config.family
        if family == "parcae":  # drive = dt * (e @ B.T)
            self._matmul(ws.e, ex["B"], ws.drive)
            self.kernels.scale_columns_rows(ws.drive, ex["dt"])
        elif "adapter_e" in ex:  # rdm concat: W [h; e] = h @ W_h.T + (e @ W_e.T, computed once)
            self._matmul(ws.e, ex["adapter_e"], ws.drive)

    def _inject(self, h: np.ndarray, out: np.ndarray, ws: Workspace) -> None:
        """The core's input on one loop."""
        ex, family = self.weights.extras, self.config.family
        if family == "parcae":
            self.kernels.diagonal_injection_rows(h, ws.drive, ex["decay"], out)
        elif "adapter_e" in ex:
            self.memory.copy(out, ws.drive)
            self._matmul(h, ex["adapter_h"], out, accumulate=True)
        elif self.config.injection == "add":
            self.kernels.add_rows(h, ws.e, out)
        else:
            self.memory.copy(out, h)

    def _read_state(self, h: np.ndarray, ws: Workspace) -> None:
        """The coda's input from the final state (parcae: C @ h | rdm: ln_f(h) | looped: h) into ws.head_x."""
        family = self.config.family
        if family == "parcae":
            self._matmul(h, self.weights.extras["readout"], ws.head_x)
        elif family == "rdm":  # Huginn reuses ln_f on the state before the coda
            self.kernels.rmsnorm_rows(h, self.weights.ln_f, self.eps, ws.head_x)
        else:
            self.memory.copy(ws.head_x, h)

    def _loop_stats(self, stats: dict) -> None:
        ex = self.weights.extras
        if self.config.family == "parcae":
            stats["spectral_radius"] = float(ex["decay"].max())
        if "adapter_spectral_norm" in ex:
            stats["adapter_spectral_norm"] = ex["adapter_spectral_norm"]

    def _ut(self, call: _Call, loops: int | None, h0: np.ndarray | None, stats: dict | None) -> np.ndarray:
        """Universal Transformer with ACT (models/ut.py): the output is the halting-weighted sum of states."""
        k, ws, ex, cfg = self.kernels, call.ws, self.weights.extras, self.config
        max_steps = cfg.act_max_steps if loops is None else loops
        if loops is not None and loops > cfg.act_max_steps:
            raise ValueError(f"ut: loops={loops} must be in [1, act_max_steps={cfg.act_max_steps}]")
        self._prelude(call)
        rows = ws.x.shape[0]
        h = ws.h
        self.memory.copy(h, ws.e if h0 is None else np.asarray(h0, F32).reshape(h.shape))
        out = ws.head_x
        self.memory.fill(out, 0.0)
        halt_sum, remainder = np.zeros(rows, F32), np.zeros(rows, F32)
        n_updates, weight = np.zeros(rows, F32), np.zeros(rows, F32)
        threshold = F32(1.0 - cfg.act_eps)
        norms: list[float] = []
        steps = 0
        for t in range(max_steps):
            t_loop = self.timers.start()
            t0 = self.timers.start()
            running = k.act_halting_step(h, ex["halt_w"], ex["halt_b"], halt_sum, remainder, n_updates, weight,
                                         threshold, t == max_steps - 1)
            k.add_vector_rows(h, ex["step_embed"][t], h)
            if cfg.injection == "add":
                k.add_rows(h, ws.e, h)
            self.timers.stop("injection", t0)
            self._stage("core", h, call, loop=t)
            k.add_scaled_rows(out, weight, h)
            if stats is not None:
                norms.append(float(np.linalg.norm(self.memory.to_host(h), axis=-1).mean()))
            steps += 1
            self.timers.stop(f"loop[{t}]", t_loop)
            if loops is None and running == 0:
                break
        self._stage("coda", out, call)
        logits = self._logits(out, call)
        if stats is not None:
            stats["state_norm"] = norms
            stats["loops_used"] = float(n_updates.mean())
            stats["steps_computed"] = steps
            stats["ponder"] = float((n_updates + remainder).mean())
        return logits

    def _initial_state(self, ws: Workspace, h0: np.ndarray | None) -> None:
        if h0 is not None:
            self.memory.copy(ws.h, np.asarray(h0, F32).reshape(ws.h.shape))
            return
        init = self.config.state_init
        if init == "zero":
            self.memory.fill(ws.h, 0.0)
        elif init == "embed":
            self.memory.copy(ws.h, ws.e)
        else:  # "like-init": trunc-normal, std sqrt(2/(5d)), cut at +-3 std, fresh every forward
            std = np.sqrt(2.0 / (5.0 * self.d))
            draw = self.rng.standard_normal(ws.h.shape)
            bad = np.abs(draw) > 3.0
            while bad.any():
                draw[bad] = self.rng.standard_normal(int(bad.sum()))
                bad = np.abs(draw) > 3.0
            self.memory.copy(ws.h, (draw * std).astype(F32))

    def _run_loops(self, step: Any, call: _Call, loops: int, exit: Any, stats: dict | None) -> np.ndarray:
        """`loops` steps of h <- step(h), stopping early under `exit` (models.recurrence.run_loops)."""
        ws, k = call.ws, self.kernels
        h, nxt = ws.h, ws.h_next
        measures: list[float] = []
        norms: list[float] = []
        have_prev_logp = False
        used = 0
        for loop in range(loops):
            t0 = self.timers.start()
            step(h, nxt, loop)
            self.timers.stop(f"loop[{loop}]", t0)
            used += 1
            if stats is not None:
                norms.append(float(np.linalg.norm(self.memory.to_host(nxt), axis=-1).mean()))
            stop = False
            if exit is not None:
                if exit.kind == "state":
                    measure = float(k.max_relative_change(nxt, h))
                else:  # "kl": readout of the new state, KL to the previous readout
                    self._readout(nxt, call)
                    k.log_softmax_rows(call.ws.logits, ws.logp)
                    measure = float(k.max_kl_rows(ws.logp, ws.prev_logp)) if have_prev_logp else float("inf")
                    ws.logp, ws.prev_logp = ws.prev_logp, ws.logp
                    have_prev_logp = True
                measures.append(measure)
                stop = used >= exit.min_loops and measure < exit.threshold
            h, nxt = nxt, h
            if stop:
                break
        ws.h, ws.h_next = h, nxt
        if stats is not None:
            stats["loops_used"] = float(used)
            stats["state_norm"] = norms
            if exit is not None:
                stats["exit_measure"] = measures
                stats["exited_early"] = used < loops
        return h

    def _readout(self, h: np.ndarray, call: _Call) -> np.ndarray:
        """Looped families after the loops: (parcae: C @ h | rdm: ln_f(h) | looped: h) -> coda -> ln_f -> head."""
        ws = call.ws
        t0 = self.timers.start()
        self._read_state(h, ws)
        self.timers.stop("readout", t0)
        self._stage("coda", ws.head_x, call)
        return self._logits(ws.head_x, call)

    def _logits(self, x: np.ndarray, call: _Call) -> np.ndarray:
        ws = call.ws
        t0 = self.timers.start()
        if self._serial(call):
            decode_head(x, self.weights.ln_f, self.eps, self.weights.head.panels, self.vocab, ws.xn, ws.logits)
        else:
            self.kernels.rmsnorm_rows(x, self.weights.ln_f, self.eps, ws.xn)
            self._matmul(ws.xn, self.weights.head, ws.logits)
        self.timers.stop("head", t0)
        return ws.logits

    # ----- blocks
    def _stage(self, stage: str, x: np.ndarray, call: _Call, loop: int = 0) -> None:
        layers = self.weights.stages[stage]
        if not layers:
            return
        region = "blocks" if stage == "blocks" else stage
        layer_region = {"blocks": "block", "core": "core"}.get(stage)  # per-layer labels, as models/regions.py
        t0 = self.timers.start()
        cache_stage = "dense" if stage == "blocks" else stage
        for j, lw in enumerate(layers):
            t1 = self.timers.start()
            self._block(lw, x, call, cache_stage, loop)
            if layer_region is not None:
                self.timers.stop(f"{layer_region}[{j}]", t1)
        if stage != "core":  # the core's time is reported per loop
            self.timers.stop(region, t0)

    def _serial(self, call: _Call) -> bool:
        """Decode of a few rows on the fused path (one call per block, see decode.py)."""
        return (self.serial_decode and call.seq == 1 and call.cache is not None
                and call.idx.shape[0] <= SERIAL_DECODE_MAX_ROWS)

    def _block(self, lw: LayerWeights, x: np.ndarray, call: _Call, cache_stage: str, loop: int) -> None:
        if self._serial(call):
            self._decode_block(lw, x, call, cache_stage, loop)
            return
        k, ws, eps = self.kernels, call.ws, self.eps
        d, H, hd = self.d, self.n_heads, self.head_dim
        k.rmsnorm_rows(x, lw.attn_norm, eps, ws.xn)
        self._matmul(ws.xn, lw.qkv, ws.qkv)
        if lw.ve_table is not None:
            k.add_value_embed_rows(ws.qkv, ws.xn, lw.ve_gate, lw.ve_table, call.idx, H, hd, 2 * d)
        cos, sin = self._rope
        # q and k are adjacent in qkv: RoPE + QK-norm over 2H heads in one pass
        k.rope_qknorm_rows(ws.qkv, call.seq, call.start, cos, sin, 2 * H, hd, 0, eps, True)
        if call.cache is not None:
            key = call.cache.key(cache_stage, lw.layer_id, loop)
            k_panels, v_panels = call.cache.entry(key, call.start, call.start + call.seq, k)
            scratch = self._cache_scratch(call)
        else:
            k_panels, v_panels, scratch = ws.k_panels, ws.v_panels, ws.scratch
        k.store_kv(ws.qkv, call.seq, call.start, H, hd, k_panels, v_panels)
        if call.seq == 1 and call.start > 0:
            k.attention_decode(ws.qkv, call.start + 1, H, hd, k_panels, v_panels, scratch, ws.att)
        else:
            k.causal_attention_prefill(ws.qkv, call.seq, H, hd, k_panels, v_panels, scratch, ws.att)
        if lw.post_attn_norm is None:
            self._matmul(ws.att, lw.o, x, accumulate=True)
        else:
            self._matmul(ws.att, lw.o, ws.tmp)
            k.add_rmsnorm_rows(x, ws.tmp, lw.post_attn_norm, eps)
        k.rmsnorm_rows(x, lw.mlp_norm, eps, ws.xn)
        self._matmul(ws.xn, lw.fc, ws.hid)
        if self.config.mlp == "swiglu":
            k.swiglu_rows(ws.hid, self.d_ff, ws.act)
        else:
            k.relu2_rows(ws.hid, ws.act)
        if lw.post_mlp_norm is None:
            self._matmul(ws.act, lw.proj, x, accumulate=True)
        else:
            self._matmul(ws.act, lw.proj, ws.tmp)
            k.add_rmsnorm_rows(x, ws.tmp, lw.post_mlp_norm, eps)

    def _decode_block(self, lw: LayerWeights, x: np.ndarray, call: _Call, cache_stage: str, loop: int) -> None:
        """The whole block in one serial call (decode.py) for a few decode rows."""
        ws, cache = call.ws, call.cache
        assert cache is not None
        key = cache.key(cache_stage, lw.layer_id, loop)
        k_panels, v_panels = cache.entry(key, call.start, call.start + 1, self.kernels)
        cos, sin = self._rope
        sandwich = lw.post_attn_norm is not None
        has_ve = lw.ve_table is not None
        decode_block(x, call.idx, call.start, cos, sin, self.n_heads, self.head_dim, self.eps,
                     lw.attn_norm, lw.qkv.panels, lw.o.panels, lw.mlp_norm, lw.fc.panels, lw.proj.panels,
                     self.d_ff, self.config.mlp == "swiglu",
                     lw.post_attn_norm if sandwich else _NONE_1D, lw.post_mlp_norm if sandwich else _NONE_1D,
                     sandwich, lw.ve_gate if has_ve else _NONE_2D, lw.ve_table if has_ve else _NONE_2D, has_ve,
                     k_panels, v_panels, ws.xn, ws.qkv, ws.att, ws.tmp, ws.hid, ws.act,
                     self._cache_scratch(call)[0])

    def _cache_scratch(self, call: _Call) -> np.ndarray:
        """Attention scratch long enough for every key in the cache."""
        need = call.cache.max_len if call.cache is not None else call.seq
        if call.scratch is not None and call.scratch.shape[1] < need:
            call.scratch = self.memory.scratch(need)
            call.ws.scratch = call.scratch
        return call.scratch

    def _matmul(self, x: np.ndarray, w: PackedWeight, out: np.ndarray, accumulate: bool = False) -> None:
        self.kernels.matmul_packed(x, w.panels, out, w.n_out, accumulate)
