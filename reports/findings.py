"""The report's opening: what looping bought or cost on this machine, each number with its uncertainty.

Generated from the run, never written by hand. Quality is compared only inside one recipe group and
called a difference only when its 95% interval over training seeds excludes zero; speed ratios carry
the timing CIs of both cells; every sentence that compares two cells names what differs between them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from loopscope.reports import frames, groups
from loopscope.reports.frames import DENSE_FAMILY, RunData

FLOP_MATCH = 1.15  # training FLOPs within this factor count as equal


@dataclass
class Finding:
    topic: str
    text: str
    within_noise: bool | None = None  # None: no uncertainty applies (exact accounting) or not measured
    numbers: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: NaN and infinities become null at any depth, numpy scalars plain numbers."""
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _noise(d: groups.Difference) -> bool | None:
    """True: within seed noise; False: a difference; None: one seed each, the spread is unknown."""
    return (not d.real) if d.spread_known else None


def _all_noise(diffs: list[groups.Difference]) -> bool | None:
    flags = [_noise(d) for d in diffs]
    if any(f is None for f in flags) or not flags:
        return None
    return all(flags)


def _diff_numbers(d: groups.Difference) -> dict[str, Any]:
    return {"a": d.a, "b": d.b, "mean_a": d.mean_a, "mean_b": d.mean_b, "rel": d.rel,
            "rel_ci95": [d.rel_low, d.rel_high], "n_seeds": [d.n_a, d.n_b], "verdict": d.verdict}


def _finite_mean(values: list[float]) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _mean_sd(row: pd.Series) -> str:
    sd = row["bpb_seed_std"]
    n = int(row["n_seeds"])
    spread = f" ± {sd:.3f}" if np.isfinite(sd) else ""
    return f"{row['bpb']:.3f}{spread} bpb ({n} seed{'s' if n != 1 else ''})"


def quality_findings(run: RunData, q: pd.DataFrame | None = None) -> list[Finding]:
    """Equal unique parameters and equal training FLOPs, inside the main recipe group."""
    q = groups.quality_groups(run) if q is None else q
    scores = groups.model_scores(q)
    main = groups.main_group(scores)
    if main is None:
        return [Finding("quality", "Quality: not measured (no eval cell finished).")]
    g = scores[scores["group_key"] == main]
    dense, looped = g[g["family"] == DENSE_FAMILY], g[g["family"] != DENSE_FAMILY]
    recipe = f"{g['recipe'].iloc[0]}, {g['lr'].iloc[0] and g['group'].iloc[0].split(', ')[-1]}"
    if dense.empty or looped.empty:
        return [Finding("quality", f"Quality: no dense and looped model trained on one recipe, so no comparison "
                                   f"(group: {g['group'].iloc[0]}).")]
    flops = {cid: frames.training_flops(run, cid) for ids in g["cell_ids"] for cid in ids}
    g = g.assign(train_flops=[_finite_mean([flops[c] for c in ids]) for ids in g["cell_ids"]])
    dense = g[g["family"] == DENSE_FAMILY]
    iso_param, iso_flop, flop_notes = [], [], []
    param_diffs, flop_diffs = [], []
    for _, lm in g[g["family"] != DENSE_FAMILY].iterrows():
        dm = dense.loc[(np.log(dense["params_unique"] / lm["params_unique"])).abs().idxmin()]
        d = groups.difference(lm["model"], lm["seed_values"], dm["model"], dm["seed_values"])
        T = "" if pd.isna(lm["loops_test"]) else f" at T={int(lm['loops_test'])}"
        iso_param.append(f"{lm['model']}{T} {_mean_sd(lm)} vs {dm['model']} {_mean_sd(dm)} "
                         f"({lm['params_unique'] / dm['params_unique']:.2f}x its parameters): {d.text()}")
        param_diffs.append(d)
        same_flops = dense[(dense["train_flops"] / lm["train_flops"]).between(1 / FLOP_MATCH, FLOP_MATCH)]
        if not same_flops.empty:
            dm2 = same_flops.iloc[0]
            d2 = groups.difference(lm["model"], lm["seed_values"], dm2["model"], dm2["seed_values"])
            iso_flop.append(f"{lm['model']} vs {dm2['model']} ({lm['train_flops'] / dm2['train_flops']:.2f}x its "
                            f"training FLOPs): {d2.text()}")
            flop_diffs.append(d2)
        elif np.isfinite(lm["train_flops"] / dm["train_flops"]):
            flop_notes.append(f"{lm['model']} used {lm['train_flops'] / dm['train_flops']:.2f}x {dm['model']}'s")
    out = [Finding("quality at equal unique parameters",
                   f"Quality at equal unique parameters (one recipe: {recipe}): " + "; ".join(iso_param) + ".",
                   within_noise=_all_noise(param_diffs),
                   numbers={"pairs": [_diff_numbers(d) for d in param_diffs]})]
    if iso_flop:
        out.append(Finding("quality at equal training FLOPs", "Quality at equal training FLOPs: "
                           + "; ".join(iso_flop) + ".", within_noise=_all_noise(flop_diffs),
                           numbers={"pairs": [_diff_numbers(d) for d in flop_diffs]}))
    if flop_notes:
        out.append(Finding("quality at equal training FLOPs", "Quality at equal training FLOPs: not measured for "
                           "every pair; no dense model of this recipe was trained on the same FLOPs ("
                           + "; ".join(flop_notes) + " for the results above)."))
    others = scores[scores["group_key"] != main].drop_duplicates("group_key")
    if not others.empty:
        listed = [f"{r['group']}: {', '.join(scores.loc[scores['group_key'] == r['group_key'], 'model'])}"
                  for _, r in others.iterrows()]
        out.append(Finding("other recipes", "Not compared with the above (trained on another recipe): "
                           + "; ".join(listed) + "."))
    return out


def _ratio_ci(a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
    """a/b of two medians with an interval from their CIs (NaN bounds when a CI is missing)."""
    ratio = a["value"] / b["value"]
    lo = a["ci_low"] / b["ci_high"] if np.isfinite(a["ci_low"]) and np.isfinite(b["ci_high"]) else math.nan
    hi = a["ci_high"] / b["ci_low"] if np.isfinite(a["ci_high"]) and np.isfinite(b["ci_low"]) and b["ci_low"] > 0 \
        else math.nan
    return float(ratio), float(lo), float(hi)


def _shared_setting(s: pd.DataFrame) -> pd.DataFrame:
    """The rows of the (backend, device, dtype, batch, seq_len) setting most models were measured at."""
    keys = ["backend", "device", "dtype", "batch", "seq_len"]
    counts = s.groupby(keys, dropna=False)["model"].nunique().reset_index()
    counts["_torch"] = counts["backend"] == "torch"  # the reference backend first on a tie
    best = tuple(counts.sort_values(["model", "_torch"], ascending=False).iloc[0][keys])
    mask = np.ones(len(s), dtype=bool)
    for k, v in zip(keys, best, strict=True):
        mask &= (s[k].isna() if pd.isna(v) else s[k] == v).to_numpy()
    return s[mask]


def _closest_dense(dense: pd.DataFrame, looped: pd.Series) -> pd.Series:
    """The dense row closest in unique parameters to a looped row (its iso-parameter partner)."""
    target = float(looped["params_unique"])
    return dense.loc[(np.log(dense["params_unique"].astype(float) / target)).abs().idxmin()]


def speed_findings(run: RunData) -> list[Finding]:
    speed = frames.speed_frame(run)
    out = []
    for workload in ("prefill", "decode"):
        s = speed[speed["workload"] == workload] if not speed.empty else speed
        if s.empty:
            out.append(Finding(f"{workload} speed", f"{workload.capitalize()} speed: not measured in this run."))
            continue
        s = _shared_setting(s)
        if workload == "decode":  # the looped default: a KV cache per loop
            s = s[s["kv_policy"].isna() | (s["kv_policy"] == "per-loop")]
        dense, looped = s[s["family"] == DENSE_FAMILY], s[s["family"] != DENSE_FAMILY]
        if dense.empty or looped.empty:
            continue
        first = s.iloc[0]
        where = f"{first['backend']} on {first['device']}, batch {int(first['batch'])} x {int(first['seq_len'])} tokens"
        parts, noisy, pairs = [], [], []
        for model, g in looped.groupby("model", sort=False):
            gap = (g["loops_test"].astype(float) - g["loops_train"].astype(float)).abs()
            lm = g.loc[gap.idxmin()]
            dm = _closest_dense(dense, lm)
            ratio, lo, hi = _ratio_ci(lm, dm)
            ci = f" [{lo:.2f}, {hi:.2f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
            within = bool(np.isfinite(lo) and np.isfinite(hi) and lo <= 1 <= hi)
            noisy.append(within)
            T = "" if pd.isna(lm["loops_test"]) else f" T={int(lm['loops_test'])}"
            parts.append(f"{model}{T} vs {dm['model']} ({lm['params_unique'] / dm['params_unique']:.2f}x its "
                         f"parameters) {ratio:.2f}x{ci}" + (" (within timing noise)" if within else ""))
            pairs.append({"looped": model, "dense": dm["model"], "ratio": ratio, "ci95": [lo, hi]})
        kv = ", per-loop KV cache" if workload == "decode" else ""
        text = (f"{workload.capitalize()} speed ({where}{kv}; tokens/s ratio, 95% CI from both medians' CIs): "
                + "; ".join(parts) + ".")
        out.append(Finding(f"{workload} speed", text, within_noise=all(noisy) if noisy else None,
                           numbers={"where": where, "pairs": pairs}))
    return out


def memory_findings(run: RunData) -> list[Finding]:
    mem = frames.memory_frame(run)
    if mem.empty:
        return [Finding("memory", "Memory per token: not measured (no decode cell).")]
    mem = mem.assign(kv_per_token=mem["kv_cache_bytes"] / (mem["batch"] * mem["seq_len"]))
    setting = mem.groupby(["batch", "seq_len", "dtype"])["model"].nunique().idxmax()
    m = mem[(mem["batch"] == setting[0]) & (mem["seq_len"] == setting[1]) & (mem["dtype"] == setting[2])]
    dense, looped = m[m["family"] == DENSE_FAMILY], m[m["family"] != DENSE_FAMILY]
    if dense.empty or looped.empty:
        return []
    dense = dense.assign(params_unique=[frames_params(run, c) for c in dense["cell_id"]])
    looped = looped.assign(params_unique=[frames_params(run, c) for c in looped["cell_id"]])
    parts = []
    for (model, loops), g in looped.groupby(["model", "loops_test"], sort=False, dropna=False):
        dm = _closest_dense(dense, g.iloc[0])
        by_policy = g.set_index("kv_policy")["kv_per_token"]
        text = f"{model} T={int(loops)}" if pd.notna(loops) else model
        text += (f" vs {dm['model']} ({human(dm['kv_per_token'])}/token): "
                 + ", ".join(f"{v / dm['kv_per_token']:.1f}x ({p})" for p, v in by_policy.items()))
        parts.append(text)
    text = (f"KV cache per token (batch {int(setting[0])}, {int(setting[1])} tokens, {setting[2]}; exact, from the "
            f"cache's bytes): " + "; ".join(parts) + ".")
    return [Finding("memory per token", text, within_noise=None)]


def frames_params(run: RunData, cell_id: str) -> float:
    rows = run.results[run.results["cell_id"] == cell_id]["params_unique"]
    return float(rows.iloc[0]) if len(rows) else float("nan")


def human(value: float) -> str:
    from loopscope.reports.charts import human_bytes

    return human_bytes(value)


def energy_findings(run: RunData) -> list[Finding]:
    e, why = frames.energy_frame(run)
    if e.empty:
        reason = why[0] if why else "no prefill or decode cell"
        return [Finding("energy per token", f"Energy per token: not measured ({reason}).")]
    s = _shared_setting(e.assign(ci_low=np.nan, ci_high=np.nan))
    dense, looped = s[s["family"] == DENSE_FAMILY], s[s["family"] != DENSE_FAMILY]
    if dense.empty or looped.empty:
        return []
    parts = []
    for model, g in looped.groupby("model", sort=False):
        gap = (g["loops_test"].astype(float) - g["loops_train"].astype(float)).abs()
        lm = g.loc[gap.idxmin()]
        dm = _closest_dense(dense, lm)
        T = "" if pd.isna(lm["loops_test"]) else f" T={int(lm['loops_test'])}"
        parts.append(f"{model}{T} vs {dm['model']} {lm['value'] / dm['value']:.2f}x")
    first = s.iloc[0]
    return [Finding("energy per token", f"Energy per token ({first['workload']}, {first['backend']} on "
                                        f"{first['device']}, batch {int(first['batch'])} x {int(first['seq_len'])}; "
                                        "one energy window per cell, no interval): " + "; ".join(parts) + ".")]


def loop_findings(run: RunData, q: pd.DataFrame | None = None) -> list[Finding]:
    """Test-time loops in the main group: the gain up to the training loops, then saturation or overthinking,
    each judged against the seed spread."""
    q = groups.quality_groups(run) if q is None else q
    per_T = groups.model_scores(q, at_training_loops=False)
    main = groups.main_group(groups.model_scores(q))
    if per_T.empty or main is None:
        return []
    per_T = per_T[(per_T["group_key"] == main) & per_T["loops_test"].notna()]
    out = []
    for model, g in per_T.groupby("model", sort=False):
        if g["loops_test"].nunique() < 2:
            continue
        g = g.sort_values("loops_test")
        train_T = float(g["loops_train"].iloc[0])
        first = g.iloc[0]
        at_train = g.iloc[int((g["loops_test"] - train_T).abs().argmin())]
        parts = []
        if at_train["loops_test"] != first["loops_test"]:
            d = groups.difference(f"T={int(at_train['loops_test'])}", at_train["seed_values"],
                                  f"T={int(first['loops_test'])}", first["seed_values"])
            parts.append(f"T={int(first['loops_test'])} to T={int(at_train['loops_test'])}: {d.text()}")
        beyond = g[g["loops_test"] > at_train["loops_test"]]
        verdicts = []
        if not beyond.empty:
            last = beyond.iloc[-1]
            d = groups.difference(f"T={int(last['loops_test'])}", last["seed_values"],
                                  f"T={int(at_train['loops_test'])}", at_train["seed_values"])
            word = ("overthinking (worse beyond its training loops)" if d.real and d.rel > 0 else
                    "still improving" if d.real else "saturated (flat within seed noise)" if d.spread_known
                    else "")
            verdicts.append(d)
            parts.append(f"T={int(at_train['loops_test'])} to T={int(last['loops_test'])}: {d.text()}"
                         + (f": {word}" if word else ""))
        noise = _noise(verdicts[0]) if verdicts else None
        out.append(Finding("test-time loops beyond training", f"Test-time loops, {model} (trained at {train_T:g}): "
                           + "; ".join(parts) + ".", within_noise=noise))
    return out


def seed_spread_finding(q: pd.DataFrame) -> list[Finding]:
    scores = groups.model_scores(q)
    seeded = scores[scores["n_seeds"] > 1]
    if seeded.empty:
        return [Finding("seed spread", "Seed spread: every model trained with one seed, so no quality gap here can be "
                                       "told from seed noise.")]
    parts = [f"{r['model']} {r['bpb_seed_std']:.4f} bpb ({r['bpb_seed_std'] / r['bpb'] * 100:.2f}% of its mean, "
             f"{int(r['n_seeds'])} seeds)" for _, r in seeded.iterrows()]
    return [Finding("seed spread", "Seed spread (std of bpb over training seeds): " + "; ".join(parts) + ".",
                    numbers={r["model"]: r["bpb_seed_std"] for _, r in seeded.iterrows()})]


def all_findings(run: RunData) -> list[Finding]:
    q = groups.quality_groups(run)
    items = (quality_findings(run, q) + speed_findings(run) + memory_findings(run) + energy_findings(run)
             + loop_findings(run, q) + (seed_spread_finding(q) if not q.empty else []))
    noise = [f.topic for f in items if f.within_noise]
    if noise:
        items.append(Finding("within noise", "Within noise (not a difference on this evidence): "
                             + ", ".join(dict.fromkeys(noise)) + "."))
    return items
