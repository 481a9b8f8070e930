"""Bits-per-byte against hand-computed values, the window arithmetic, and training that learns."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loopscope.bench.workloads.evaluate import bits_per_byte, heldout_nll, window_spans
from loopscope.bench.workloads.train import batch_offsets, get_batch, lr_at


class FixedPredictor(torch.nn.Module):
    """Predicts token (x+1) % 4 with probability p, the rest spread evenly over the other 255 bytes."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, idx: torch.Tensor, **_: object) -> torch.Tensor:
        probs = torch.full((*idx.shape, 256), (1 - self.p) / 255)
        probs.scatter_(-1, ((idx + 1) % 4).unsqueeze(-1), self.p)
        return probs.log()


def test_bpb_of_uniform_model_is_eight_bits():
    tokens = np.arange(65, dtype=np.uint8)
    model = FixedPredictor(1 / 256)
    nll, count, n_bytes = heldout_nll(model, tokens, seq_len=16, batch=3, stride=None, device="cpu")
    assert count == n_bytes == 64
    assert bits_per_byte(nll, count) == pytest.approx(8.0, rel=1e-6)


def test_bpb_matches_hand_computation():
    # Text 0,1,2,3,0,1,... : every next byte is (x+1)%4, except where we plant misses.
    tokens = (np.arange(33) % 4).astype(np.uint8)
    tokens[10] = 7  # position 9 predicts 10 (miss: 7 is not 10%4+... ), position 10 predicts 11 (miss)
    p = 0.9
    nll, count, _ = heldout_nll(FixedPredictor(p), tokens, seq_len=8, batch=2, stride=None, device="cpu")
    hits = sum(int(tokens[i + 1]) == (int(tokens[i]) + 1) % 4 for i in range(32))
    expected = -(hits * math.log(p) + (32 - hits) * math.log((1 - p) / 255))
    assert count == 32 and hits == 30
    assert nll == pytest.approx(expected, rel=1e-6)
    assert bits_per_byte(nll, count) == pytest.approx(expected / math.log(2) / 32, rel=1e-6)


def test_bpb_divides_by_the_bytes_each_token_stands_for():
    tokens = (np.arange(100, 165) * 7 % 256).astype(np.uint8)
    token_bytes = 1 + np.arange(256) % 3  # a token id i stands for 1 + i % 3 bytes
    nll, count, n_bytes = heldout_nll(FixedPredictor(1 / 256), tokens, seq_len=16, batch=4, stride=None,
                                      device="cpu", token_bytes=token_bytes)
    expected_bytes = int(token_bytes[tokens[1:]].sum())
    assert (count, n_bytes) == (64, expected_bytes) and expected_bytes != 64
    assert bits_per_byte(nll, n_bytes) == pytest.approx(8.0 * 64 / expected_bytes, rel=1e-6)


def test_window_spans_disjoint_and_strided():
    assert window_spans(17, 8) == [(0, 8, 0), (8, 16, 0)]
    spans = window_spans(21, 8, stride=4)
    assert spans[0] == (0, 8, 0) and spans[1] == (4, 12, 4)
    # every target position is scored exactly once
    scored = [s + p + 1 for s, e, f in spans for p in range(f, e - s)]
    assert scored == list(range(1, spans[-1][1] + 1))
    with pytest.raises(ValueError):
        window_spans(100, 8, stride=9)


def test_trapezoid_schedule():
    lrs = [lr_at(s, 100, 1.0, 0.1, 0.5) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[20] == 1.0 and lrs[49] == 1.0
    assert lrs[50] == pytest.approx(1.0) and lrs[99] == pytest.approx(0.02)
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:], strict=False))


def test_data_order_depends_only_on_seed():
    a = batch_offsets(10_000, 32, 4, 10, seed=3)
    b = batch_offsets(10_000, 32, 4, 10, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, batch_offsets(10_000, 32, 4, 10, seed=4))
    data = np.arange(200, dtype=np.uint8)
    x, y = get_batch(data, np.array([5, 50]), 8, "cpu")
    assert x[0, 0] == 5 and y[0, 0] == 6 and torch.equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("name", ["gpt-micro", "parcae-micro"])
def test_training_steps_lower_the_loss(name):
    from loopscope.bench.corpus import load_corpus
    from loopscope.models import build

    torch.manual_seed(0)
    model = build(name, seed=0)
    model.train()
    corpus = load_corpus(max_bytes=200_000)
    x, y = get_batch(corpus.train, batch_offsets(len(corpus.train), 32, 8, 1, seed=0)[0], 32, "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
