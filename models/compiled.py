"""Compiled inference and training, the way the fastest decoders do it (gpt-fast's recipe), for every family.

- `Decoder`: a static KV cache (models/cache.py, StaticKVCache) and a one-token decode step compiled once,
  with the looped core unrolled at the fixed test-time loop count T; on a GPU the step is captured as a
  CUDA graph (mode "reduce-overhead"). The prompt's prefill is compiled separately. Both KV policies.
- `compile_blocks`: training compiled per block, so a sampled loop count only changes how many times the
  compiled blocks are called and never breaks or re-specialises a graph.

Families are called through their public forward (`model(idx, loops=, cache=, h0=)`), so this keeps working
whatever the loop runner underneath looks like. A random initial state (Parcae, RDM "like-init") is drawn
outside the compiled region, from the model's own generator, exactly as the eager forward draws it: the
compiled and eager paths see the same h0 and give the same logits.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch._dynamo.utils import counters

from .blocks import Block
from .cache import StaticKVCache
from .recurrence import initial_state

COMPILER = "inductor"  # tests swap in "eager"/"aot_eager" to check the plumbing without code generation
CPU_MODE = "default"  # inductor without CUDA graphs
GPU_MODE = "reduce-overhead"  # inductor + CUDA graphs


def default_mode(device: str | torch.device) -> str:
    return GPU_MODE if torch.device(device).type == "cuda" else CPU_MODE


def compile_options(mode: str) -> dict[str, Any]:
    """torch.compile's arguments: a mode only means something to inductor."""
    return {"backend": COMPILER, "mode": mode} if COMPILER == "inductor" else {"backend": COMPILER}


def has_graph(fn: Callable[..., Any]) -> bool:
    """Whether torch.compile holds compiled code for this function (made now or earlier in the process)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return bool(_debug_get_cache_entry_list(getattr(fn, "__func__", fn)))


def compiler_label(mode: str) -> str:
    return f"torch.compile({COMPILER}, {mode})" if COMPILER == "inductor" else f"torch.compile({COMPILER})"


def takes_h0(model: nn.Module) -> bool:
    """Whether the family draws a random initial state that the caller may pass in (`h0=`)."""
    cfg = model.config
    return (cfg.is_looped and cfg.state_init == "like-init"
            and "h0" in inspect.signature(model.forward).parameters and hasattr(model, "rng"))


def draw_h0(model: nn.Module, batch: int, length: int, dtype: torch.dtype,
            device: torch.device) -> torch.Tensor | None:
    """The initial state the eager forward would draw for a [batch, length] input (same generator, shape,
    dtype), or None for families without a random one."""
    if not takes_h0(model):
        return None
    shape_ref = torch.empty(batch, length, model.config.d_model, dtype=dtype, device=device)
    return initial_state(model.config, shape_ref, model.rng.on(device))


class Decoder:
    """Greedy decoding with a static cache: `prefill(prompt) -> next tokens`, then `step(tokens)` per token.

    `compile=False` runs the very same code eagerly (the reference the compiled path is tested against).
    """

    def __init__(self, model: nn.Module, *, batch: int, max_len: int, loops: int | None = None,
                 policy: str = "per-loop", compile: bool = True, mode: str | None = None) -> None:
        param = next(model.parameters())
        self.model = model.eval()
        self.device, self.dtype = param.device, param.dtype
        self.batch, self.max_len = batch, max_len
        self.loops = loops if model.config.is_looped else None
        self.cache = StaticKVCache(max_len, policy, self.device)
        self.mode = mode or default_mode(self.device)
        self.compiled = compile
        self.graphs = 0  # graphs torch.compile made for this decoder, counted as they are made
        self._prefill: Callable[..., torch.Tensor] = self._forward
        self._step: Callable[..., torch.Tensor] = self._forward
        with torch.inference_mode():  # one eager token allocates every cache entry the family uses
            self._forward(torch.zeros(batch, 1, dtype=torch.int64, device=self.device),
                          draw_h0(model, batch, 1, self.dtype, self.device))
        self.cache.reset()
        if compile:
            self._prefill = torch.compile(self._forward, dynamic=False, **compile_options(self.mode))
            self._step = torch.compile(self._forward, dynamic=False, **compile_options(self.mode))

    @property
    def engine(self) -> str:
        """What ran the forward, from the object: inductor and its mode only if it really made a graph."""
        if not self.compiled:
            return "torch-eager (static cache)"
        if self.graphs == 0 and not has_graph(Decoder._forward):
            return "torch-eager (torch.compile made no graph)"
        return compiler_label(self.mode)

    def _forward(self, idx: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"cache": self.cache}
        if self.loops is not None:
            kwargs["loops"] = self.loops
        if h0 is not None:
            kwargs["h0"] = h0
        return self.model(idx, **kwargs)[:, -1]

    def _call(self, fn: Callable[..., torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        h0 = draw_h0(self.model, idx.shape[0], idx.shape[1], self.dtype, self.device)
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        before = counters["stats"]["unique_graphs"]
        with torch.inference_mode():
            out = fn(idx, h0).clone()  # a CUDA-graph output is overwritten by the next replay
        self.graphs += counters["stats"]["unique_graphs"] - before
        return out

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Last-position logits [B, V] of the prompt, from an empty cache."""
        if prompt.shape[1] > self.max_len:
            raise ValueError(f"Decoder.prefill: prompt of {prompt.shape[1]} tokens exceeds max_len={self.max_len}")
        self.cache.reset()
        return self._call(self._prefill, prompt)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after appending one token per sequence ([B] or [B, 1])."""
        return self._call(self._step, tokens.reshape(self.batch, 1))

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy: the prompt followed by `new_tokens` tokens."""
        out = [prompt]
        nxt = self.prefill(prompt).argmax(-1)
        for i in range(new_tokens):
            out.append(nxt[:, None])
            if i < new_tokens - 1:
                nxt = self.step(nxt).argmax(-1)
        return torch.cat(out, dim=1)


def compile_blocks(model: nn.Module, **options: Any) -> int:
    """Compile every transformer block of the model in place (training: the loop stays in Python, so the
    sampled loop count causes no graph break and no recompilation). Returns how many blocks were compiled."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(**{"backend": COMPILER, **options})
    return len(blocks)
