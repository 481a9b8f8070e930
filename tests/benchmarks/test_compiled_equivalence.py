"""Inductor-compiled decode equals eager decode for every family and both KV policies (fp32, tight tolerance).

Heavy (each case compiles a prefill and a one-token step with inductor, minutes on 2 cores): run with
`tox -e benchmarks`. The default suite checks one looped family the same way (tests/test_compiled.py).
"""

from __future__ import annotations

import pytest

from tests.test_compiled import CASES, compiled_vs_eager


@pytest.mark.benchmark_heavy
@pytest.mark.parametrize("name,policy", CASES)
def test_compiled_decode_equals_eager_every_family(name, policy):
    compiled_vs_eager(name, policy)
