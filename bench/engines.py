"""What each backend does, one class per backend: the prefill call, the decode generator, the train/eval model
and the synchronisation its timers need. The table of what is allowed is bench/backends.py (no torch there).

Every object a workload runs carries `engine_name`, read from the object after it ran (for torch.compile:
whether inductor really made a graph), and the workloads write it into every row's `engine` column. A
backend that cannot run on this machine (numba-cuda without a GPU, or a numba-cuda that fails to compile)
raises BackendUnavailable: the cell becomes `unavailable` with the error as its reason, never a fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from loopscope.bench.backends import BACKENDS, BackendUnavailable, canonical_backend
from loopscope.bench.matrix import Cell
from loopscope.bench.workloads.common import DTYPES, build_model, loop_kwargs, synchronize


class PrefillCall:
    """One forward of the cell's batch, as the backend runs it; call it to run it once."""

    def __init__(self, fn: Callable[[], object], model: torch.nn.Module, engine_name: Callable[[], str],
                 numba_engine: Any = None) -> None:
        self.fn, self.model, self._engine_name, self.numba_engine = fn, model, engine_name, numba_engine

    def __call__(self) -> object:
        return self.fn()

    @property
    def engine_name(self) -> str:
        return self._engine_name()


def _graphs_made() -> int:
    """Graphs torch.compile has made in this process (imported lazily: torch._dynamo costs seconds to import)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _prompt(cell: Cell, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(cell.seed)
    return torch.randint(0, vocab, (cell.batch, cell.seq_len), generator=gen)


class TorchBackend:
    """PyTorch eager: the model's own forward, a dynamic KVCache for decode."""

    name = "torch"

    def sync(self, cell: Cell) -> None:
        synchronize(cell.device)

    def timing_device(self, cell: Cell) -> str:
        return cell.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as train and eval run it."""
        return model

    def model_engine_name(self, model: torch.nn.Module) -> str:
        return "torch-eager"

    def prefill(self, cell: Cell) -> PrefillCall:
        model = build_model(cell).to(DTYPES[cell.dtype]).eval()
        idx = _prompt(cell, model.config.vocab_size).to(cell.device)
        kwargs = loop_kwargs(cell)

        def call() -> object:
            with torch.inference_mode():
                return model(idx, **kwargs)
        return PrefillCall(call, model, lambda: "torch-eager")

    def generator(self, cell: Cell) -> Any:
        return TorchGenerator(cell)


class TorchCompileBackend(TorchBackend):
    """torch.compile (inductor): the whole forward for prefill, a static-cache one-token step for decode
    (CUDA graphs on a GPU), per-block compilation for train and eval."""

    name = "torch-compile"

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from loopscope.models.compiled import compile_blocks

        model._compiled_blocks = compile_blocks(model)  # type: ignore[attr-defined]
        model._graphs_before = _graphs_made()  # type: ignore[attr-defined]
        return model

    def model_engine_name(self, model: torch.nn.Module) -> str:
        from loopscope.models.blocks import Block
        from loopscope.models.compiled import has_graph

        made = _graphs_made() - getattr(model, "_graphs_before", 0)
        if not getattr(model, "_compiled_blocks", 0) or not (made or has_graph(Block.forward)):
            return "torch-eager (torch.compile made no graph)"
        from loopscope.models.compiled import COMPILER

        return f"torch.compile({COMPILER}, per block: {model._compiled_blocks} blocks, {made} graphs)"

    def prefill(self, cell: Cell) -> PrefillCall:
        from loopscope.models.compiled import compile_options, compiler_label, default_mode, draw_h0, has_graph

        model = build_model(cell).to(DTYPES[cell.dtype]).eval()
        idx = _prompt(cell, model.config.vocab_size).to(cell.device)
        kwargs = loop_kwargs(cell)
        mode = default_mode(cell.device)
        compiled = torch.compile(model, dynamic=False, **compile_options(mode))
        before = _graphs_made()
        cuda = cell.device.startswith("cuda")

        def call() -> object:
            h0 = draw_h0(model, cell.batch, cell.seq_len, DTYPES[cell.dtype], idx.device)
            extra = {} if h0 is None else {"h0": h0}
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.inference_mode():
                return compiled(idx, **kwargs, **extra)

        def engine_name() -> str:
            made = _graphs_made() - before or has_graph(type(model).forward)
            return compiler_label(mode) if made else "torch-eager (torch.compile made no graph)"
        return PrefillCall(call, model, engine_name)

    def generator(self, cell: Cell) -> Any:
        return CompiledGenerator(cell)


class NumbaBackend:
    """loopscope's Numba CPU engine: weights exported once, every op a numba kernel."""

    name = "numba"

    def sync(self, cell: Cell) -> None:
        return None

    def timing_device(self, cell: Cell) -> str:
        return "cpu"

    def engine_class(self) -> Any:
        from loopscope.kernels.engine import NumbaEngine

        return NumbaEngine

    def engine_label(self, engine: Any) -> str:
        return type(engine).__name__

    def prefill(self, cell: Cell) -> PrefillCall:
        model = build_model(cell.__class__(**{**cell.to_dict(), "device": "cpu"})).eval()
        engine = self.build_engine(model)
        tokens = _prompt(cell, model.config.vocab_size).numpy()
        loops = cell.loops_test

        def call() -> object:
            return engine.prefill(tokens, loops=loops)
        return PrefillCall(call, model, lambda: self.engine_label(engine), numba_engine=engine)

    def build_engine(self, model: torch.nn.Module) -> Any:
        return self.engine_class().from_model(model)

    def generator(self, cell: Cell) -> Any:
        return NumbaGenerator(cell, self)


class NumbaCudaBackend(NumbaBackend):
    """The numba-cuda engine. Unavailable (never a fallback) when numba-cuda cannot import, sees no GPU, or
    cannot compile its kernels: a one-token probe forward runs before anything is measured."""

    name = "numba-cuda"

    def sync(self, cell: Cell) -> None:
        from numba import cuda

        cuda.synchronize()

    def engine_class(self) -> Any:
        try:
            from numba import cuda
        except Exception as err:  # noqa: BLE001 - any import failure means the backend cannot run here
            raise BackendUnavailable(f"numba-cuda cannot be imported: {type(err).__name__}: {err}") from None
        if not cuda.is_available():
            raise BackendUnavailable("numba-cuda: no CUDA GPU is visible to numba (numba.cuda.is_available() "
                                     "is False); install loopscope[cuda] on a machine with an NVIDIA driver")
        try:
            from loopscope.kernels.engine_cuda import CudaEngine
        except Exception as err:  # noqa: BLE001
            raise BackendUnavailable(f"numba-cuda engine cannot be imported: {type(err).__name__}: {err}") from None
        return CudaEngine

    def engine_label(self, engine: Any) -> str:
        sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        return type(engine).__name__ + (" (numba CUDA simulator)" if sim else "")

    def build_engine(self, model: torch.nn.Module) -> Any:
        engine = self.engine_class().from_model(model)
        try:  # compile every kernel the forward uses on one token; a failure here is the library, not the cell
            engine.prefill(np.zeros((1, 1), dtype=np.int64))
            self.sync_now()
        except Exception as err:  # noqa: BLE001
            raise BackendUnavailable(f"numba-cuda cannot compile or run its kernels here: "
                                     f"{type(err).__name__}: {err}"[:500]) from None
        return engine

    @staticmethod
    def sync_now() -> None:
        from numba import cuda

        cuda.synchronize()


class TorchGenerator:
    """Greedy decoding with the model's dynamic KVCache (eager)."""

    def __init__(self, cell: Cell) -> None:
        self.model = build_model(cell).to(DTYPES[cell.dtype]).eval()
        self.cell = cell
        self.kwargs = loop_kwargs(cell)
        self.cache = None
        self.engine_name = "torch-eager"

    @torch.inference_mode()
    def prefill(self, prompt: np.ndarray, max_len: int) -> np.ndarray:
        from loopscope.models import KVCache

        self.cache = KVCache(max_len, policy=self.cell.kv_policy or "per-loop")
        idx = torch.from_numpy(prompt).to(self.cell.device)
        logits = self.model(idx, cache=self.cache, **self.kwargs)
        return logits[:, -1].argmax(-1).cpu().numpy()

    @torch.inference_mode()
    def step(self, tokens: np.ndarray) -> np.ndarray:
        idx = torch.from_numpy(tokens[:, None]).to(self.cell.device)
        logits = self.model(idx, cache=self.cache, **self.kwargs)
        return logits[:, -1].argmax(-1).cpu().numpy()

    def cache_bytes(self) -> int:
        return self.cache.used_bytes()


class CompiledGenerator:
    """Greedy decoding with a static cache and a compiled one-token step (models/compiled.py)."""

    def __init__(self, cell: Cell) -> None:
        from loopscope.models.compiled import Decoder

        self.model = build_model(cell).to(DTYPES[cell.dtype]).eval()
        self.cell = cell
        dec = cell.settings["decode"]
        self.decoder = Decoder(self.model, batch=cell.batch, max_len=cell.seq_len + 1, loops=cell.loops_test,
                               policy=cell.kv_policy or "per-loop")
        self._max_len = self.decoder.max_len
        self.new_tokens = int(dec["new_tokens"])

    @property
    def engine_name(self) -> str:
        return self.decoder.engine

    def prefill(self, prompt: np.ndarray, max_len: int) -> np.ndarray:
        if max_len > self._max_len:
            raise ValueError(f"CompiledGenerator: {max_len} positions exceed the static cache's {self._max_len}")
        idx = torch.from_numpy(prompt).to(self.cell.device)
        return self.decoder.prefill(idx).argmax(-1).cpu().numpy()

    def step(self, tokens: np.ndarray) -> np.ndarray:
        idx = torch.from_numpy(tokens).to(self.cell.device)
        return self.decoder.step(idx).argmax(-1).cpu().numpy()

    def cache_bytes(self) -> int:
        return self.decoder.cache.used_bytes()


class NumbaGenerator:
    """Greedy decoding with a numba engine's own KV cache (no torch call on the hot path)."""

    def __init__(self, cell: Cell, backend: NumbaBackend) -> None:
        self.model = build_model(Cell(**{**cell.to_dict(), "device": "cpu"})).eval()
        self.engine = backend.build_engine(self.model)  # `engine`: what the profiler's region timers read
        self.engine_name = backend.engine_label(self.engine)
        self.cell = cell
        self.loops = cell.loops_test
        self.cache = None

    def prefill(self, prompt: np.ndarray, max_len: int) -> np.ndarray:
        self.cache = self.engine.new_cache(prompt.shape[0], max_len, policy=self.cell.kv_policy or "per-loop",
                                           loops=self.loops)
        logits = self.engine.prefill(prompt, loops=self.loops, cache=self.cache)
        return np.asarray(logits)[:, -1].argmax(-1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self.engine.decode_step(tokens, self.cache)).argmax(-1)

    def cache_bytes(self) -> int:
        return int(self.cache.used_bytes())


IMPLEMENTATIONS: dict[str, type] = {"torch": TorchBackend, "torch-compile": TorchCompileBackend,
                                    "numba": NumbaBackend, "numba-cuda": NumbaCudaBackend}
assert set(IMPLEMENTATIONS) == set(BACKENDS), "every declared backend has one implementation"


def backend_for(cell: Cell) -> Any:
    name = canonical_backend(cell.backend)
    if name is None:
        raise ValueError(f"cell {cell.label}: backend {cell.backend!r} is unknown")
    return IMPLEMENTATIONS[name]()
