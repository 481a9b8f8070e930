"""A synthetic multi-hop reasoning probe that needs no download: k-hop pointer chasing.

Each example lists a random permutation f of `symbols` letters as pairs, then asks for f applied k
times to a start letter:  `<pairs>|<x><k>=<y>\\n`, e.g. `acbacb|a2=b` (f: a->c, b->a, c->b; f(f(a)) = b).
Answering needs k sequential lookups in the context, which is where extra depth (loops) should help.
Train and test sets come from different seeds; every answer is checked by construction.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

SEPARATOR, EQUALS, END = "|", "=", "\n"


@dataclass(frozen=True)
class ProbeSpec:
    symbols: int = 8
    max_hops: int = 4
    train_examples: int = 20_000
    test_examples: int = 1_000

    @classmethod
    def parse(cls, spec: str) -> ProbeSpec:
        """`probe:khop` or `probe:khop?symbols=8&hops=4&train=20000&test=1000`."""
        _, _, query = spec.partition("?")
        keys = {"symbols": "symbols", "hops": "max_hops", "train": "train_examples", "test": "test_examples"}
        values = {}
        for part in filter(None, query.split("&")):
            key, _, value = part.partition("=")
            if key not in keys or not value.isdigit():
                raise ValueError(f"corpus {spec!r}: bad probe option {part!r} (known: {', '.join(keys)}, integers)")
            values[keys[key]] = int(value)
        out = cls(**values)
        if not 2 <= out.symbols <= 26 or not 1 <= out.max_hops <= 9:
            raise ValueError(f"corpus {spec!r}: symbols must be 2..26 and hops 1..9")
        return out


def chase(mapping: dict[str, str], start: str, hops: int) -> str:
    x = start
    for _ in range(hops):
        x = mapping[x]
    return x


def make_examples(n: int, spec: ProbeSpec, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = string.ascii_lowercase[: spec.symbols]
    out = []
    for _ in range(n):
        image = rng.permutation(spec.symbols)
        mapping = {letters[i]: letters[j] for i, j in enumerate(image)}
        order = rng.permutation(spec.symbols)
        pairs = "".join(letters[i] + mapping[letters[i]] for i in order)
        start = letters[rng.integers(spec.symbols)]
        hops = int(rng.integers(1, spec.max_hops + 1))
        out.append(f"{pairs}{SEPARATOR}{start}{hops}{EQUALS}{chase(mapping, start, hops)}{END}")
    return out


def parse_example(example: str) -> tuple[dict[str, str], str, int, str]:
    """(mapping, start, hops, answer) of one example; the inverse of make_examples."""
    pairs, _, query = example.rstrip(END).partition(SEPARATOR)
    mapping = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}
    head, _, answer = query.partition(EQUALS)
    return mapping, head[0], int(head[1:]), answer


def baselines(examples: tuple[str, ...] | list[str]) -> dict[str, float]:
    """Accuracies a model reaches without chasing any pointer, on these examples: "chance" (a uniform guess
    among the symbols) and "echo start" (answering the start letter, right whenever x lies on a cycle of
    f whose length divides k: a shortcut a model can learn from the answers alone)."""
    parsed = [parse_example(ex) for ex in examples]
    echo = sum(start == answer for _, start, _, answer in parsed) / len(parsed)
    chance = sum(1.0 / len(mapping) for mapping, _, _, _ in parsed) / len(parsed)
    return {"chance": chance, "echo start": echo}


def probe_splits(spec: ProbeSpec, seed: int = 0) -> tuple[list[str], list[str]]:
    return make_examples(spec.train_examples, spec, seed), make_examples(spec.test_examples, spec, seed + 1)
