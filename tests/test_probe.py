"""The reasoning probe: deterministic generation, correct answers, accuracy measured as claimed."""

from __future__ import annotations

import pytest
import torch

from loopscope.bench.corpus import load_corpus
from loopscope.bench.errors import ConfigError
from loopscope.bench.probe import ProbeSpec, baselines, chase, make_examples, parse_example
from loopscope.bench.workloads.evaluate import probe_accuracy


def test_generation_is_deterministic_and_seeded():
    spec = ProbeSpec(symbols=5, max_hops=3)
    assert make_examples(50, spec, seed=1) == make_examples(50, spec, seed=1)
    assert make_examples(50, spec, seed=1) != make_examples(50, spec, seed=2)


def test_answers_are_correct_by_independent_check():
    spec = ProbeSpec(symbols=6, max_hops=4)
    for ex in make_examples(200, spec, seed=0):
        mapping, start, hops, answer = parse_example(ex)
        assert sorted(mapping) == sorted(mapping.values()) == list("abcdef")  # a permutation
        x = start
        for _ in range(hops):
            x = mapping[x]
        assert answer == x == chase(mapping, start, hops)
        assert 1 <= hops <= 4 and len(ex) == 2 * 6 + 6


def test_worked_example():
    mapping, start, hops, answer = parse_example("acbacb|a2=b\n")
    assert mapping == {"a": "c", "b": "a", "c": "b"} and (start, hops, answer) == ("a", 2, "b")


def test_probe_corpus_and_bad_spec():
    c = load_corpus("probe:khop?symbols=4&hops=2&train=100&test=10")
    assert len(c.probe_test) == 10 and len(c.val) == 10 * (2 * 4 + 6)
    with pytest.raises(ConfigError, match="bad probe option"):
        load_corpus("probe:khop?colours=3")


class Oracle(torch.nn.Module):
    """Solves the probe by reading the pairs from its input: accuracy must be 1."""

    def forward(self, idx: torch.Tensor, **_: object) -> torch.Tensor:
        out = torch.zeros(*idx.shape, 256)
        for b, row in enumerate(idx.tolist()):
            text = bytes(row).decode()
            mapping, start, hops, _ = parse_example(text + "?")
            out[b, -1, ord(chase(mapping, start, hops))] = 1.0
        return out


def test_accuracy_of_an_oracle_and_of_a_constant_guess():
    examples = tuple(make_examples(40, ProbeSpec(symbols=5, max_hops=3), seed=3))
    counts = probe_accuracy(Oracle(), examples, batch=7, device="cpu")
    assert all(c == n for c, n in counts.values()) and sum(n for _, n in counts.values()) == 40

    class AlwaysA(torch.nn.Module):
        def forward(self, idx, **_):
            out = torch.zeros(*idx.shape, 256)
            out[..., ord("a")] = 1.0
            return out

    counts = probe_accuracy(AlwaysA(), examples, batch=7, device="cpu")
    expected = sum(parse_example(e)[3] == "a" for e in examples)
    assert sum(c for c, _ in counts.values()) == expected < 40


def test_baselines_count_the_start_letter_shortcut():
    # f: a->b, b->a, c->c. a2 = a (echo right), a1 = b (echo wrong), c1 = c (echo right), c3 = c (echo right)
    examples = ["abbacc|a2=a\n", "abbacc|a1=b\n", "abbacc|c1=c\n", "abbacc|c3=c\n"]
    assert baselines(examples) == {"chance": pytest.approx(1 / 3), "echo start": 0.75}
    examples = make_examples(2000, ProbeSpec(symbols=5, max_hops=3), seed=3)
    echo = baselines(examples)["echo start"]
    # x lies on a cycle of length L with probability 1/5 for each L: k=1 -> 1/5, k=2 -> 2/5, k=3 -> 2/5
    assert echo == pytest.approx(1 / 3, abs=0.03)


def test_multihop_probe_composes_parametric_facts_and_tests_more_hops():
    from loopscope.bench.probe import MultiHopSpec, probe_corpus

    spec = MultiHopSpec(entities=5, relations=2, train_hops=2, test_hops=5, train_examples=400, test_examples=300)
    graph = spec.graph()
    train, test = spec.splits()
    for ex in train + test:  # every answer is the chain applied to the entity
        head, answer = ex.rstrip("\n").split("=")
        x = head[0]
        for r in head[1:]:
            x = graph[r][x]
        assert x == answer
    assert max(parse_example(ex)[2] for ex in train) == 2
    assert max(parse_example(ex)[2] for ex in test) == 5  # hops beyond training: depth extrapolation
    facts = {f"{e}{r}={graph[r][e]}\n" for r in "AB" for e in "abcde"}
    assert facts <= set(train)  # every 1-hop fact is trained on
    assert baselines(test)["chance"] == pytest.approx(1 / 5)
    c = load_corpus("probe:multihop?entities=5&relations=2&train_hops=2&test_hops=5&train=400&test=300")
    assert len(c.probe_test) == 300 and "parametric facts" in c.description
    with pytest.raises(ConfigError, match="train_hops <= test_hops"):
        load_corpus("probe:multihop?train_hops=4&test_hops=2")
    with pytest.raises(ValueError, match="unknown probe"):
        probe_corpus("probe:nope")
