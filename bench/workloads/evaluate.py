"""Evaluation workload: bits-per-byte and perplexity on the fixed held-out split.

Windows are disjoint by default (each token is scored once, with the context inside its window);
with `stride` < seq_len, windows overlap and each scores only its last `stride` tokens, so every
token gets at least seq_len - stride tokens of context. The report states which was used.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from loopscope.bench.context import RunContext
from loopscope.bench.corpus import load_corpus
from loopscope.bench.matrix import Cell
from loopscope.bench.schema import metric_row
from loopscope.bench.tokenizer import tokenize
from loopscope.bench.workloads import WorkloadResult
from loopscope.bench.workloads.common import autocast, build_model, loop_kwargs, reseed

LN2 = math.log(2.0)


def window_spans(n_tokens: int, seq_len: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """(start, end, first_scored) per window over tokens[0:n_tokens]; targets are tokens[start+1:end+1].

    Position p of a window predicts token start+p+1; positions < first_scored are context only.
    """
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"eval.stride = {stride} must be in 1..seq_len ({seq_len})")
    spans = []
    start = 0
    while start + seq_len + 1 <= n_tokens:
        first = 0 if start == 0 else seq_len - stride
        spans.append((start, start + seq_len, first))
        start += stride
    return spans


def bits_per_byte(nll_nats_sum: float, n_bytes: int) -> float:
    """Summed next-token NLL (nats) over a text of n_bytes, in bits per byte."""
    return nll_nats_sum / LN2 / n_bytes


@torch.no_grad()
def heldout_nll(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, batch: int,
                stride: int | None, device: str, token_bytes: np.ndarray | None = None,
                **forward_kwargs) -> tuple[float, int, int]:
    """Summed NLL (nats), scored tokens and the bytes they stand for, over the held-out tokens."""
    spans = window_spans(len(tokens), seq_len, stride)
    total, count, n_bytes = 0.0, 0, 0
    for i in range(0, len(spans), batch):
        group = spans[i:i + batch]
        idx = np.stack([np.arange(s, e + 1) for s, e, _ in group])
        chunk = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
        logits = model(chunk[:, :-1], **forward_kwargs).float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[:, 1:].reshape(-1),
                              reduction="none").view(len(group), -1)
        for row, targets, (_, _, first) in zip(nll, tokens[idx[:, 1:]], group, strict=True):
            total += float(row[first:].sum(dtype=torch.float64))
            count += row.numel() - first
            n_bytes += int(token_bytes[targets[first:]].sum()) if token_bytes is not None else row.numel() - first
    return total, count, n_bytes


@torch.no_grad()
def probe_accuracy(model: torch.nn.Module, examples: tuple[str, ...], batch: int, device: str,
                   **forward_kwargs) -> dict[int, tuple[int, int]]:
    """Greedy answer accuracy on probe examples: {hops: (correct, total)}."""
    from loopscope.bench.probe import EQUALS, parse_example

    by_hops: dict[int, list[int]] = {}
    for i in range(0, len(examples), batch):
        group = examples[i:i + batch]
        prefix = [ex[: ex.index(EQUALS) + 1] for ex in group]
        idx = torch.tensor([list(p.encode("ascii")) for p in prefix], dtype=torch.long, device=device)
        guess = model(idx, **forward_kwargs)[:, -1].argmax(-1).tolist()
        for ex, g in zip(group, guess, strict=True):
            _, _, hops, answer = parse_example(ex)
            by_hops.setdefault(hops, [0, 0])
            by_hops[hops][0] += int(g == ord(answer))
            by_hops[hops][1] += 1
    return {k: (v[0], v[1]) for k, v in sorted(by_hops.items())}


def run(cell: Cell, ctx: RunContext) -> WorkloadResult:
    ev = cell.settings["eval"]
    data_cfg = cell.settings["data"]
    corpus = load_corpus(data_cfg["corpus"], max_bytes=data_cfg["max_bytes"])
    tok = tokenize(corpus, data_cfg["tokenizer"], Path(ctx.run_dir) / "tokenizers")
    tokens = tok.val[: int(ev["max_tokens"]) + 1]
    from loopscope.bench.engines import backend_for

    backend = backend_for(cell)
    model = backend.prepare_model(build_model(cell))
    ckpt = ctx.checkpoints_dir / f"{cell.depends_on}.safetensors"
    model.load_state_dict(load_file(str(ckpt)))
    model.eval()

    stride = ev.get("stride")
    method = f"disjoint windows of {cell.seq_len}" if stride is None else \
        f"strided windows of {cell.seq_len}, stride {stride}"
    seeds = int(ev["seeds"]) if cell.family in ("parcae", "rdm") else 1
    bpbs, ppls = [], []
    for s in range(seeds):
        reseed(model, 10_000 + s)  # h0 draws differ per eval seed and match across models
        with autocast(cell):
            nll, count, n_bytes = heldout_nll(model, tokens, cell.seq_len, cell.batch, stride, cell.device,
                                              token_bytes=tok.token_bytes, **loop_kwargs(cell))
        bpbs.append(bits_per_byte(nll, n_bytes))
        ppls.append(math.exp(nll / count))
    result = WorkloadResult(engine=backend.model_engine_name(model))
    source = f"held-out split ({method}; {count} {tok.name} tokens = {n_bytes} bytes; {seeds} seed(s))"
    result.rows.append(metric_row("bpb", float(np.mean(bpbs)), "bits/byte", source=source, n_samples=seeds))
    if seeds > 1:
        result.rows.append(metric_row("bpb_std", float(np.std(bpbs, ddof=1)), "bits/byte",
                                      source=f"std over {seeds} h0 seeds", n_samples=seeds))
    result.rows.append(metric_row("perplexity", float(np.mean(ppls)), f"per token ({tok.name} tokenizer)",
                                  source=source, n_samples=seeds))
    result.add_samples("bpb", "bits/byte", bpbs)
    if corpus.probe_test:
        result.rows += _probe_rows(model, corpus.probe_test, cell)
    return result


def _probe_rows(model: torch.nn.Module, examples: tuple[str, ...], cell: Cell) -> list[dict]:
    from loopscope.bench.probe import baselines

    reseed(model, 10_000)
    counts = probe_accuracy(model, examples, cell.batch, cell.device, **loop_kwargs(cell))
    correct = sum(c for c, _ in counts.values())
    total = sum(n for _, n in counts.values())
    src = f"greedy answer byte on {total} held-out k-hop examples"
    rows = [metric_row("probe_accuracy", correct / total, "fraction", source=src, n_samples=total)]
    rows += [metric_row("probe_accuracy", c / n, "fraction", stat=f"hops={k}", source=src, n_samples=n)
             for k, (c, n) in counts.items()]
    rows += [metric_row("probe_baseline", value, "fraction", stat=name, n_samples=total,
                        source=f"accuracy without chasing pointers ({name}) on the same {total} examples")
             for name, value in baselines(examples).items()]
    return rows
