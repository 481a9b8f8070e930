"""Synthetic multi-hop reasoning probes that need no download.

`probe:khop` (in-context pointer chasing): each example lists a random permutation f of `symbols` letters
as pairs, then asks for f applied k times to a start letter:  `<pairs>|<x><k>=<y>\\n`, e.g. `acbacb|a2=b`
(f: a->c, b->a, c->b; f(f(a)) = b). Answering needs k sequential lookups in the context, which is where
extra depth (loops) should help. Train and test sets come from different seeds.

`probe:multihop` (composition over parametric facts, the task of the Ohio State "Loop, Think, &
Generalize" paper, in bytes): one fixed random knowledge graph of `entities` lowercase letters and
`relations` uppercase letters (each relation a permutation r(e) = e'), never shown in context; an
example asks for a chain of relations applied to an entity: `<e><r1 r2 .. rk>=<answer>\\n`, e.g.
`cAB=f` (B(A(c)) = f). Training holds every 1-hop fact and compositions of 2..`train_hops`; the test
set asks 1..`test_hops`, so hops beyond `train_hops` measure depth extrapolation (the paper's: more
hops answered with more loops).
Every answer is checked by construction.
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
    """(mapping, start, hops, answer) of one example; the inverse of make_examples. A multi-hop example
    has no in-context mapping (it is {}); its hops are the relation letters after the entity."""
    if SEPARATOR not in example:
        head, _, answer = example.rstrip(END).partition(EQUALS)
        return {}, head[0], len(head) - 1, answer
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
    # multi-hop examples carry no mapping: a uniform guess among the entities these examples use
    entities = {x for _, start, _, answer in parsed for x in (start, answer)}
    chance = sum(1.0 / (len(mapping) or len(entities)) for mapping, _, _, _ in parsed) / len(parsed)
    return {"chance": chance, "echo start": echo}


def probe_splits(spec: ProbeSpec, seed: int = 0) -> tuple[list[str], list[str]]:
    return make_examples(spec.train_examples, spec, seed), make_examples(spec.test_examples, spec, seed + 1)


# --- multi-hop composition over parametric facts (Ohio State task) -------------------------------------
@dataclass(frozen=True)
class MultiHopSpec:
    entities: int = 8
    relations: int = 3
    train_hops: int = 3
    test_hops: int = 6
    train_examples: int = 20_000
    test_examples: int = 1_000
    graph_seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> MultiHopSpec:
        """`probe:multihop?entities=8&relations=3&train_hops=3&test_hops=6&train=20000&test=1000`."""
        _, _, query = spec.partition("?")
        keys = {"entities": "entities", "relations": "relations", "train_hops": "train_hops",
                "test_hops": "test_hops", "train": "train_examples", "test": "test_examples",
                "graph_seed": "graph_seed"}
        values = {}
        for part in filter(None, query.split("&")):
            key, _, value = part.partition("=")
            if key not in keys or not value.isdigit():
                raise ValueError(f"corpus {spec!r}: bad probe option {part!r} (known: {', '.join(keys)}, integers)")
            values[keys[key]] = int(value)
        out = cls(**values)
        if not 2 <= out.entities <= 26 or not 1 <= out.relations <= 26:
            raise ValueError(f"corpus {spec!r}: entities must be 2..26 and relations 1..26")
        if not 1 <= out.train_hops <= out.test_hops:
            raise ValueError(f"corpus {spec!r}: need 1 <= train_hops <= test_hops")
        return out

    @property
    def description(self) -> str:
        return (f"multi-hop composition over parametric facts, {self.entities} entities x {self.relations} "
                f"relations, trained on 1..{self.train_hops} hops, tested on 1..{self.test_hops}")

    def graph(self) -> dict[str, dict[str, str]]:
        """relation letter -> {entity: entity}: a random permutation per relation, fixed by graph_seed
        (permutations keep every composition's answers uniform, so long chains cannot collapse onto a
        few entities that a model could guess)."""
        rng = np.random.default_rng(self.graph_seed)
        ents = string.ascii_lowercase[: self.entities]
        return {string.ascii_uppercase[r]: dict(zip(ents, (ents[i] for i in rng.permutation(self.entities)),
                                                    strict=True))
                for r in range(self.relations)}

    def splits(self, seed: int = 0) -> tuple[list[str], list[str]]:
        graph = self.graph()
        ents, rels = string.ascii_lowercase[: self.entities], string.ascii_uppercase[: self.relations]
        facts = [f"{e}{r}{EQUALS}{graph[r][e]}{END}" for r in rels for e in ents]

        def examples(n: int, max_hops: int, rng: np.random.Generator) -> list[str]:
            out = []
            for _ in range(n):
                x = start = ents[rng.integers(self.entities)]
                chain = "".join(rels[rng.integers(self.relations)] for _ in range(int(rng.integers(1, max_hops + 1))))
                for r in chain:
                    x = graph[r][x]
                out.append(f"{start}{chain}{EQUALS}{x}{END}")
            return out

        train_rng, test_rng = np.random.default_rng(seed), np.random.default_rng(seed + 1)
        repeats = max(1, self.train_examples // (4 * len(facts)))  # a quarter of training: the 1-hop facts
        train = facts * repeats + examples(self.train_examples - repeats * len(facts), self.train_hops, train_rng)
        train = [train[i] for i in train_rng.permutation(len(train))]
        return train, examples(self.test_examples, self.test_hops, test_rng)


def parse_probe(spec: str) -> ProbeSpec | MultiHopSpec:
    """`probe:khop?...` or `probe:multihop?...` (ValueError naming the bad part)."""
    kind = spec.partition("?")[0]
    if kind == "probe:multihop":
        return MultiHopSpec.parse(spec)
    if kind == "probe:khop":
        return ProbeSpec.parse(spec)
    raise ValueError(f"corpus {spec!r}: unknown probe {kind!r} (known: probe:khop, probe:multihop)")


def probe_corpus(spec: str, seed: int = 0) -> tuple[list[str], list[str], str]:
    """(train examples, test examples, description) of a probe corpus spec."""
    probe = parse_probe(spec)
    if isinstance(probe, MultiHopSpec):
        train, test = probe.splits(seed)
        return train, test, probe.description
    train, test = probe_splits(probe, seed)
    return train, test, f"k-hop pointer chasing, {probe.symbols} symbols, 1..{probe.max_hops} hops"
