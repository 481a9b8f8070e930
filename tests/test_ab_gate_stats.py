"""The A/B gate's statistics on simulated jobs: process-level values drawn from seeded generators.

A simulated process's value is true_time * exp(noise), the noise drawn per process (that is where the
variance lives on a shared machine); a job is `blocks` ABBA/BAAB blocks, judged as the gate judges them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from loopscope.bench.stats import best_of_blocks_change, paired_change, unpaired_change
from loopscope.reports.abjudge import block_pairs, judge_blocks, judge_change


def simulate_job(rng: np.random.Generator, *, blocks: int, sigma: float, slowdown: float = 0.0,
                 cpu_sigma: float | None = None, drift: float = 0.0) -> pd.DataFrame:
    rows = []
    t = 0
    for block in range(blocks):
        order = "ABBA" if rng.random() < 0.5 else "BAAB"
        for pos, side in enumerate(order):
            true = 3.0 * (1.0 + slowdown if side == "B" else 1.0) * (1.0 + drift * t)
            t += 1
            rows.append(dict(block=block, pos=pos, side=side, cell="c", metric="latency_ms",
                             value=true * math.exp(rng.normal(0.0, sigma))))
            if cpu_sigma is not None:
                rows.append(dict(block=block, pos=pos, side=side, cell="c", metric="cpu_latency_ms",
                                 value=true * math.exp(rng.normal(0.0, cpu_sigma))))
    return pd.DataFrame(rows)


def verdicts(n_jobs: int, seed: int, **kwargs) -> pd.Series:
    rng = np.random.default_rng(seed)
    tolerance = kwargs.pop("tolerance", 0.05)
    out = [judge_blocks(simulate_job(rng, **kwargs), tolerance=tolerance).iloc[0]["verdict"]
           for _ in range(n_jobs)]
    return pd.Series(out).value_counts(normalize=True)


def test_block_pairs_pair_each_a_with_its_b_and_give_same_code_differences():
    assert block_pairs(list("ABBA")) == ([(0, 1), (3, 2)], [(0, 3), (1, 2)])
    assert block_pairs(list("BAAB")) == ([(1, 0), (2, 3)], [(1, 2), (0, 3)])


def test_aa_false_regression_rate_is_below_one_percent_over_many_jobs():
    # A/A at a 3% per-process spread, 4 blocks: a fail needs significance at 99% (one-sided 0.5%) AND a
    # change beyond both the tolerance and the floor.
    rates = verdicts(600, seed=1, blocks=4, sigma=0.03)
    assert rates.get("fail", 0.0) <= 0.01, rates


def test_aa_under_noise_above_tolerance_is_unresolved_not_failed():
    rates = verdicts(300, seed=2, blocks=3, sigma=0.10)
    assert rates.get("fail", 0.0) <= 0.01 and rates.get("unresolved", 0.0) >= 0.95, rates


def test_power_a_10_percent_slowdown_at_2_percent_spread_is_caught():
    rates = verdicts(300, seed=3, blocks=4, sigma=0.02, slowdown=0.10)
    assert rates.get("fail", 0.0) >= 0.95, rates


def test_a_25_percent_slowdown_at_5_percent_spread_is_caught():
    rates = verdicts(300, seed=4, blocks=4, sigma=0.05, slowdown=0.25)
    assert rates.get("fail", 0.0) >= 0.9, rates


def test_a_slowdown_below_the_noise_floor_is_unresolved_never_pass():
    # 3% slower, 6% spread: the floor (~20% with 3 blocks) is above both the change and the 2% tolerance.
    rates = verdicts(300, seed=5, blocks=3, sigma=0.06, slowdown=0.03, tolerance=0.02)
    assert rates.get("pass", 0.0) == 0.0 and rates.get("unresolved", 0.0) >= 0.95, rates


def test_linear_drift_does_not_fail_an_aa_job():
    # The machine slows by 1% per process over the job; ABBA's pairs cancel a linear drift on average.
    rates = verdicts(300, seed=6, blocks=4, sigma=0.01, drift=0.01)
    assert rates.get("fail", 0.0) <= 0.01, rates


def test_the_timer_with_the_lower_aa_spread_is_judged_and_named():
    rng = np.random.default_rng(7)
    table = judge_blocks(simulate_job(rng, blocks=4, sigma=0.20, cpu_sigma=0.01, slowdown=0.10), tolerance=0.05)
    row = table.iloc[0]
    assert row["timer"] == "cpu" and row["verdict"] == "fail"
    assert row["statistic"] == "median"
    assert "cpu time, median call: A/A floor" in row["why"] and "wall median" in row["why"]
    table = judge_blocks(simulate_job(rng, blocks=4, sigma=0.01, cpu_sigma=0.20), tolerance=0.05)
    assert table.iloc[0]["timer"] == "wall"


def test_a_base_without_cpu_time_falls_back_to_wall_time_and_says_so():
    rng = np.random.default_rng(8)
    job = simulate_job(rng, blocks=3, sigma=0.01, cpu_sigma=0.01)
    job = job[~((job["side"] == "A") & (job["metric"] == "cpu_latency_ms"))]  # an older base: no CPU time
    row = judge_blocks(job, tolerance=0.05).iloc[0]
    assert row["timer"] == "wall" and "CPU time not recorded by both sides" in row["why"]


def test_paired_change_pools_same_code_differences_with_the_spread_of_block_means():
    base = np.full(8, 3.0)
    cand = base * 1.10
    same = [0.01, -0.01] * 4
    # 4 blocks of 2 pairs, every pair +10%: the block means do not spread, so v = sum(e^2) / (8 + 4 - 1)
    change = paired_change(base, cand, same, blocks=[0, 0, 1, 1, 2, 2, 3, 3], level=0.99)
    assert change.n_pairs == 8 and change.n_same == 8 and change.ratio == pytest.approx(1.10)
    assert change.noise_floor == pytest.approx(math.expm1(3.1058 * 0.01 / math.sqrt(11)), rel=1e-3)
    # without block labels every pair is its own block: 8 + 8 - 1 degrees of freedom
    change = paired_change(base, cand, same, level=0.99)
    assert change.noise_floor == pytest.approx(math.expm1(2.9467 * 0.01 / math.sqrt(15)), rel=1e-3)
    assert math.isnan(paired_change(base, cand, [0.01]).noise_floor)  # one same-code difference: unknown


def test_block_means_that_disagree_widen_the_interval():
    base = np.full(4, 3.0)
    steady = paired_change(base, base * [1.10, 1.10, 1.10, 1.10], [0.01, -0.01] * 2, blocks=[0, 0, 1, 1])
    split = paired_change(base, base * [1.02, 1.02, 1.18, 1.18], [0.01, -0.01] * 2, blocks=[0, 0, 1, 1])
    assert math.log(split.ci_high / split.ci_low) > 3 * math.log(steady.ci_high / steady.ci_low)


def test_aa_false_regression_rate_at_two_blocks_is_at_most_the_one_sided_level():
    # Two ABBA blocks, the size of a two-minute trial: 3k - 1 = 5 degrees of freedom.
    rates = verdicts(2000, seed=12, blocks=2, sigma=0.03)
    assert rates.get("fail", 0.0) <= 0.008, rates


def simulate_shared_machine(rng: np.random.Generator, *, blocks: int, slowdown: float) -> pd.DataFrame:
    """A process lands on a contended core now and then (its median 20-70% slower); its fastest call
    keeps a 1.5% spread."""
    rows = []
    for block in range(blocks):
        order = "ABBA" if rng.random() < 0.5 else "BAAB"
        for pos, side in enumerate(order):
            true = 3.0 * (1.0 + slowdown if side == "B" else 1.0)
            contended = rng.random() < 0.3
            median = true * (1.0 + (rng.uniform(0.2, 0.7) if contended else 0.0)) * math.exp(rng.normal(0, 0.01))
            rows.append(dict(block=block, pos=pos, side=side, cell="c", metric="latency_ms", value=median))
            rows.append(dict(block=block, pos=pos, side=side, cell="c", metric="latency_ms:fastest",
                             value=true * math.exp(rng.normal(0.0, 0.015))))
    return pd.DataFrame(rows)


def test_the_fastest_call_is_judged_when_contention_moves_the_median():
    rng = np.random.default_rng(13)
    judged = [judge_blocks(simulate_shared_machine(rng, blocks=3, slowdown=0.10), tolerance=0.05).iloc[0]
              for _ in range(50)]
    assert sum(r["statistic"] == "fastest" for r in judged) >= 48
    assert sum(r["verdict"] == "fail" for r in judged) >= 48
    aa = [judge_blocks(simulate_shared_machine(rng, blocks=3, slowdown=0.0), tolerance=0.05).iloc[0]["verdict"]
          for _ in range(200)]
    assert aa.count("fail") <= 2


def test_one_value_per_side_has_an_unknown_floor_and_is_unresolved():
    change = unpaired_change([3.0], [3.6])
    assert math.isnan(change.noise_floor) and math.isnan(change.p_value)
    assert judge_change(change, "lower", 0.05).verdict == "unresolved"


def test_unpaired_replicates_catch_a_clear_change_and_pass_a_null():
    rng = np.random.default_rng(9)
    base = 3.0 * np.exp(rng.normal(0, 0.02, 5))
    slow = 3.6 * np.exp(rng.normal(0, 0.02, 5))
    same = 3.0 * np.exp(rng.normal(0, 0.02, 5))
    assert judge_change(unpaired_change(base, slow), "lower", 0.05).verdict == "fail"
    assert judge_change(unpaired_change(base, same), "lower", 0.05).verdict in ("pass", "unresolved")


def test_timing_values_add_the_fastest_call_from_raw_samples():
    from loopscope.reports.abgate import timing_values

    axes = dict(cell_id="c1", model="gpt-micro", workload="prefill", batch=2, seq_len=32, status="ok")
    results = pd.DataFrame([
        dict(axes, metric="latency_ms", stat="median", value=4.0),
        dict(axes, metric="latency_ms", stat="p90", value=5.0),
        dict(axes, metric="tokens_per_s", stat="median", value=16.0),
        dict(axes, metric="cpu_latency_ms", stat="median", value=3.9),
    ])
    samples = pd.DataFrame([dict(cell_id="c1", metric="latency_ms", value=v) for v in (4.0, 3.2, 5.0)]
                           + [dict(cell_id="c1", metric="cpu_latency_ms", value=v) for v in (3.9, 3.0)])
    got = timing_values(results, samples).set_index("metric")["value"]
    assert got["latency_ms"] == 4.0 and got["latency_ms:fastest"] == 3.2
    assert got["tokens_per_s:fastest"] == pytest.approx(16.0 * 4.0 / 3.2)  # units per call / fastest call
    assert got["cpu_latency_ms:fastest"] == 3.0
    assert "cpu_tokens_per_s:fastest" not in got  # no cpu throughput row to scale
    assert set(timing_values(results).set_index("metric").index) == {"latency_ms", "tokens_per_s",
                                                                      "cpu_latency_ms"}


def simulate_slow_processes(rng: np.random.Generator, *, blocks: int, slowdown: float, p_slow: float = 0.3,
                            orders: tuple[str, ...] = ("ABBAAB", "BAABBA")) -> pd.DataFrame:
    """What this 2-core machine showed on a noisy day with one core busy: 1 process in 3 to 6 ran 15-45%
    slower for its whole life, its fastest call included; the others spread by 1.5%."""
    rows = []
    for block in range(blocks):
        order = orders[int(rng.integers(len(orders)))]
        for pos, side in enumerate(order):
            true = 3.0 * (1.0 + slowdown if side == "B" else 1.0)
            slow = rng.uniform(0.15, 0.45) if rng.random() < p_slow else 0.0
            rows.append(dict(block=block, pos=pos, side=side, cell="c", metric="latency_ms:fastest",
                             value=true * (1.0 + slow) * math.exp(rng.normal(0.0, 0.015))))
    return pd.DataFrame(rows)


def test_best_of_block_resolves_what_slow_processes_hide_from_the_pooled_mean():
    rng = np.random.default_rng(21)
    caught = [judge_blocks(simulate_slow_processes(rng, blocks=6, slowdown=0.10), tolerance=0.05).iloc[0]
              for _ in range(100)]
    assert all("best process per side" in r["why"] for r in caught)
    assert sum(r["verdict"] == "fail" for r in caught) >= 90
    aa = [judge_blocks(simulate_slow_processes(rng, blocks=6, slowdown=0.0), tolerance=0.05).iloc[0]["verdict"]
          for _ in range(300)]
    assert aa.count("fail") <= 3  # about the 99% level's one-sided share
    # with fewer blocks the pairs are judged by their mean (pooled floor), and slow processes hide the change
    pooled = [judge_blocks(simulate_slow_processes(rng, blocks=4, slowdown=0.10), tolerance=0.05).iloc[0]
              for _ in range(100)]
    assert all("pooled" in r["why"] for r in pooled)
    assert sum(r["verdict"] == "fail" for r in pooled) < 60


def test_best_of_blocks_change_takes_each_blocks_best_process_and_relabels_within_blocks():
    # five blocks, three processes a side: B is 10% slower; one base process per block ran slow, in block 3
    # a B process too (both ignored: the best of three), in block 4 every B ran slow (a block ratio the
    # trimmed mean drops).
    noise = [0.0, 0.004, -0.003, 0.002, -0.001]
    blocks = []
    for i, e in enumerate(noise):
        base = [3.0 * math.exp(e), 3.01 * math.exp(-e), 3.9]  # one of three ran slow
        cand = [3.3 * math.exp(e), 3.31 * math.exp(-e), 3.305 if i != 3 else 4.3]
        if i == 4:
            cand = [4.5, 4.6, 4.7]
        blocks.append((base, cand))
    change = best_of_blocks_change(blocks, lower_is_better=True, level=0.99)
    assert change.n_pairs == 5 and change.ratio == pytest.approx(1.10, abs=0.002)
    assert change.ci_low > 1.05 and change.noise_floor < 0.05 and change.p_value < 0.01
    again = best_of_blocks_change(blocks, lower_is_better=True, level=0.99)
    assert (again.ci_low, again.noise_floor, again.p_value) == (change.ci_low, change.noise_floor, change.p_value)
    # throughput: the best process is the one with the larger value
    up = best_of_blocks_change([([1 / v for v in a], [1 / v for v in b]) for a, b in blocks], lower_is_better=False)
    assert up.ratio == pytest.approx(1 / change.ratio)
    # no change: the relabelling finds nothing
    same = best_of_blocks_change([(a, [v * math.exp(0.001 * (-1) ** j) for j, v in enumerate(a)])
                                  for a, _ in blocks], lower_is_better=True)
    assert same.p_value > 0.05 and same.ci_low < 1.0 < same.ci_high
