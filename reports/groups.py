"""Comparable groups and the seed spread: what may be compared with what, and when a gap is a difference.

Two quality numbers are only compared (a Pareto frontier, an "x% vs y", "dominates") inside one recipe
group: cells trained on the same data, token budget, batch, sequence length, schedule and optimizer, and
the same learning rate or the same rule for choosing it (the best of one lr sweep). Each model's score
in a group is the mean over its training seeds; a gap between two models is called a difference only when
its 95% interval (Welch's t over the seeds) excludes zero, otherwise it is "within seed noise".
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from loopscope.bench.matrix import DEFAULTS
from loopscope.reports import frames
from loopscope.reports.frames import RunData

# What decides how a model trains (besides its architecture and seed). lr is handled as a rule below.
RECIPE_TRAIN_KEYS: tuple[str, ...] = ("tokens", "tokens_per_param", "flops", "warmup_frac", "cooldown_frac",
                                      "weight_decay", "grad_clip", "betas", "optimizer", "muon_momentum")
RECIPE_DATA_KEYS: tuple[str, ...] = ("corpus", "max_bytes", "tokenizer")
CONFIDENCE = 0.95


# --- recipes -------------------------------------------------------------------------------------


def train_recipe(train_cell: dict[str, Any]) -> dict[str, Any]:
    """The recipe of a train cell (a Cell dict), without the learning rate."""
    settings = train_cell.get("settings") or {}
    train = {**DEFAULTS["train"], **(settings.get("train") or {})}
    data = {**DEFAULTS["data"], **(settings.get("data") or {})}
    recipe: dict[str, Any] = {f"data.{k}": data.get(k) for k in RECIPE_DATA_KEYS}
    recipe.update({k: train.get(k) for k in RECIPE_TRAIN_KEYS if train.get(k) is not None})
    recipe["optimizer"] = train.get("optimizer", "adamw")
    recipe["batch"], recipe["seq_len"] = train_cell.get("batch"), train_cell.get("seq_len")
    return recipe


def _profile_recipe(run: RunData) -> dict[str, Any]:
    """A run read without cell records (results only): the recipe of the profile's [train] settings, which
    misses per-sweep batch or seq_len overrides, so it says where it came from."""
    settings = (run.manifest.get("profile") or {}).get("settings") or {}
    if not settings:
        return {}
    train = {**DEFAULTS["train"], **(settings.get("train") or {})}
    recipe = train_recipe({"settings": settings, "batch": train["batch"], "seq_len": train["seq_len"]})
    recipe["source"] = "profile [train] settings (no cell records)"
    return recipe


def recipe_text(recipe: dict[str, Any], keys: list[str] | None = None) -> str:
    """A recipe (or only `keys` of it) as short readable text."""
    if not recipe:
        return "recipe not recorded"
    parts = []
    show = keys if keys is not None else ["tokens", "tokens_per_param", "flops", "batch", "optimizer"]
    for key in show:
        value = recipe.get(key)
        if value is None:
            continue
        if key == "tokens":
            parts.append(f"{int(value):,} tokens")
        elif key == "tokens_per_param":
            parts.append(f"{value:g} tokens/param")
        elif key == "flops":
            parts.append(f"{value:.3g} FLOPs")
        elif key == "batch":
            parts.append(f"batch {value}x{recipe.get('seq_len')}")
        elif key == "seq_len":
            if "batch" not in show:
                parts.append(f"seq_len {value}")
        elif key.startswith("data."):
            parts.append(f"{key[5:]} {value}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def _key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _lr_text(lrs: list[float]) -> str:
    if len(lrs) == 1:
        return f"lr {lrs[0]:g}"
    return "best of lr " + "/".join(f"{x:g}" for x in lrs)


# --- seeds ---------------------------------------------------------------------------------------


def t_half_width(std: float, n: int) -> float:
    """Half-width of the 95% interval of a mean of n seeds (NaN with one seed: no spread known)."""
    if n < 2 or not np.isfinite(std):
        return math.nan
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n))


def seed_stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    n = int(v.size)
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    return {"mean": float(v.mean()) if n else math.nan, "std": std, "n": n, "ci95": t_half_width(std, n)}


@dataclass(frozen=True)
class Difference:
    """a against b: relative gap of the means and its 95% interval over training seeds."""
    a: str
    b: str
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int
    rel: float
    rel_low: float
    rel_high: float

    @property
    def spread_known(self) -> bool:
        return np.isfinite(self.rel_low) and np.isfinite(self.rel_high)

    @property
    def real(self) -> bool:
        """The 95% interval excludes zero: a difference, not seed noise."""
        return self.spread_known and (self.rel_low > 0 or self.rel_high < 0)

    @property
    def verdict(self) -> str:
        if not self.spread_known:
            return "one seed each: spread unknown"
        if not self.real:
            return "within seed noise"
        return "lower" if self.rel < 0 else "higher"

    def text(self, unit: str = "") -> str:
        """'-3.1% [95% CI -4.0, -2.2] over 3 vs 3 seeds' with the verdict when it is not a difference."""
        core = f"{self.rel * 100:+.1f}%"
        if not self.spread_known:
            return core + " (one seed each: spread unknown)"
        core += (f" [95% CI {self.rel_low * 100:+.1f}, {self.rel_high * 100:+.1f}] over {self.n_a} vs {self.n_b} "
                 "seeds")
        return core + (": within seed noise" if not self.real else ": beyond seed noise")


def difference(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> Difference:
    """Welch's t interval of mean(a) - mean(b), relative to mean(b). With one seed on one side, the other
    side's spread stands for both; with one seed on both, the interval is unknown (NaN)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    ma, mb = float(a.mean()), float(b.mean())
    na, nb = a.size, b.size
    va = float(a.var(ddof=1)) if na > 1 else math.nan
    vb = float(b.var(ddof=1)) if nb > 1 else math.nan
    low = high = math.nan
    if na > 1 or nb > 1:
        va = vb if not np.isfinite(va) else va
        vb = va if not np.isfinite(vb) else vb
        se2 = va / na + vb / nb
        if se2 == 0:
            dof = float(max(na, nb) - 1)
        else:
            parts = [(v / n) ** 2 / (n - 1) for v, n in ((va, na), (vb, nb)) if n > 1]
            dof = se2**2 / sum(parts) if sum(parts) > 0 else float(max(na, nb) - 1)
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, max(dof, 1.0))) * math.sqrt(se2)
        low, high = (ma - mb - half) / mb, (ma - mb + half) / mb
    return Difference(a_name, b_name, ma, mb, na, nb, ma / mb - 1, low, high)


# --- quality in groups ---------------------------------------------------------------------------


def quality_groups(run: RunData) -> pd.DataFrame:
    """Every eval row with its training seed, recipe group and the group's label.

    Columns added to frames.quality_frame: seed, recipe_key, lr_rule, group (label naming what sets the
    group apart), recipe (readable), selected (the row is at its model's chosen lr in the group)."""
    q = frames.quality_frame(run)
    if q.empty:
        return q.assign(seed=[], recipe_key=[], lr_rule=[], group=[], recipe=[], selected=[])
    seeds, recipes = [], []
    fallback = _profile_recipe(run)
    for cid in q["cell_id"]:
        train = frames.train_record(run, cid)
        cell = (train or {}).get("cell") or {}
        record_cell = (run.cells.get(cid) or {}).get("cell") or {}
        seeds.append(int(cell.get("seed", record_cell.get("seed", 0)) or 0))
        recipes.append(train_recipe(cell) if cell else fallback)
    if "seed" in q.columns and q["seed"].notna().any() and not run.cells:
        seeds = [int(s) if pd.notna(s) else 0 for s in q["seed"]]
    q = q.assign(seed=seeds, recipe_key=[_key(r) for r in recipes], _recipe=recipes)
    # The lr rule: a model trained at several lrs under one recipe is read at its best lr (mean over seeds
    # at its training loops); at one lr, at that lr.
    rules, selected = [], []
    at_train = frames.at_training_loops_per_cell(q)
    for (key, model), g in q.groupby(["recipe_key", "model"], sort=False):
        lrs = sorted(g["lr"].dropna().unique())
        rule = _lr_text(lrs) if lrs else "lr not recorded"
        if len(lrs) > 1:
            t = at_train[(at_train["recipe_key"] == key) & (at_train["model"] == model)]
            best = t.groupby("lr")["value"].mean().idxmin()
            chosen = g["lr"] == best
        else:
            chosen = pd.Series(True, index=g.index)
        rules.append(pd.Series(rule, index=g.index))
        selected.append(chosen)
    q["lr_rule"] = pd.concat(rules)
    q["selected"] = pd.concat(selected).astype(bool)
    q["group_key"] = q["recipe_key"] + "|" + q["lr_rule"]
    labels = group_labels(q)
    q["group"] = q["group_key"].map(labels)
    q["recipe"] = [recipe_text(r) for r in q["_recipe"]]
    return q.drop(columns="_recipe")


def group_labels(q: pd.DataFrame) -> dict[str, str]:
    """Each group named by what sets it apart from the others (one group: by its recipe and lr rule)."""
    firsts = q.drop_duplicates("group_key")
    recipes = {r["group_key"]: r["_recipe"] for _, r in firsts.iterrows()}
    rules = {r["group_key"]: r["lr_rule"] for _, r in firsts.iterrows()}
    keys = sorted({k for r in recipes.values() for k in r})
    differing = [k for k in keys if len({json.dumps(r.get(k), default=str) for r in recipes.values()}) > 1]
    labels = {}
    for gk, recipe in recipes.items():
        what = recipe_text(recipe, differing) if differing else recipe_text(recipe)
        labels[gk] = ", ".join(p for p in (what, rules[gk]) if p)
    return labels


def model_scores(q: pd.DataFrame, *, at_training_loops: bool = True) -> pd.DataFrame:
    """One row per (group, model[, loops_test]): bpb mean, std, n and 95% half-width over training seeds,
    with the model's accounting, the mean h0 std and the per-seed values (list)."""
    if q.empty:
        return pd.DataFrame()
    sel = q[q["selected"]]
    if at_training_loops:
        sel = frames.at_training_loops_per_cell(sel)
    keys = ["group_key", "group", "model"] + ([] if at_training_loops else ["loops_test"])
    rows = []
    for key, g in sel.groupby(keys, sort=False, dropna=False):
        per_seed = g.groupby("seed")["value"].mean()
        s = seed_stats(per_seed.to_numpy())
        first = g.iloc[0]
        rows.append({**dict(zip(keys, key, strict=True)), "family": first["family"],
                     "params_unique": first["params_unique"], "loops_train": first["loops_train"],
                     "loops_test": first["loops_test"], "lr": first["lr"], "recipe": first["recipe"],
                     "bpb": s["mean"], "bpb_seed_std": s["std"], "n_seeds": s["n"], "bpb_ci95": s["ci95"],
                     "bpb_h0_std": float(g["bpb_std"].mean()) if g["bpb_std"].notna().any() else math.nan,
                     "seed_values": per_seed.to_numpy(), "cell_ids": list(g["cell_id"])})
    out = pd.DataFrame(rows)
    out["_rank"] = out["family"].map(frames.family_rank)
    return out.sort_values(["group_key", "_rank", "params_unique"]).drop(columns="_rank").reset_index(drop=True)


def main_group(scores: pd.DataFrame) -> str | None:
    """The group key of the run's main comparison: the group with a dense and a looped model and the most
    training seeds, then the most models."""
    if scores.empty:
        return None
    ranked = []
    for key, g in scores.groupby("group_key"):
        mixed = int((g["family"] == frames.DENSE_FAMILY).any() and (g["family"] != frames.DENSE_FAMILY).any())
        ranked.append((mixed, int(g["n_seeds"].max()), len(g), key))
    return max(ranked)[3]
