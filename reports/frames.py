"""Load a run's tidy tables and shape them into the frames the tables and charts need.

Every frame here is a pure function of a RunData; the charts and tables only draw and format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DENSE_FAMILY = "gpt"
FAMILY_ORDER: tuple[str, ...] = ("gpt", "parcae", "rdm", "looped", "ut")
# The kernels workload (kernels/bench.py) writes one `time_ms` row per (kind, name, shape, backend), timed
# round-robin in one process; kinds "op", "model" (prefill) and "decode" are numba-vs-torch comparisons.
KERNEL_KINDS: tuple[str, ...] = ("op", "model", "decode")
TORCH_BASELINES: dict[str, str] = {"torch": "torch", "torch.compile": "torch-compile", "torch-compile": "torch-compile"}

CELL_COLUMNS: tuple[str, ...] = (
    "cell_id", "label", "status", "reason", "model", "family", "workload", "backend", "device", "dtype",
    "batch", "seq_len", "loops_test", "loops_train", "kv_policy", "lr", "depends_on", "wall_s",
)


@dataclass
class RunData:
    run_dir: Path
    manifest: dict[str, Any]
    results: pd.DataFrame
    samples: pd.DataFrame
    cells: dict[str, dict[str, Any]]
    _cell_frame: pd.DataFrame | None = field(default=None, repr=False)

    def metric(self, name: str, *, stat: str | tuple[str, ...] = ("", "mean", "median"),
               ok_only: bool = True) -> pd.DataFrame:
        """Rows of one metric, one per cell (the first matching stat in the given order)."""
        df = self.results[self.results["metric"] == name]
        if ok_only:
            df = df[df["status"] == "ok"]
        stats = (stat,) if isinstance(stat, str) else stat
        parts = [df[df["stat"].fillna("") == s] for s in stats]
        out = pd.concat(parts) if parts else df
        return out.drop_duplicates("cell_id", keep="first")

    def cell_frame(self) -> pd.DataFrame:
        """One row per cell (CELL_COLUMNS), from the cell records, or from the results if there are none."""
        if self._cell_frame is None:
            self._cell_frame = _cell_frame(self)
        return self._cell_frame

    def model_config(self, cell_id: str) -> Any | None:
        """The cell's ModelConfig, or None when the run has no cell record for it."""
        from loopscope.models import ModelConfig

        record = self.cells.get(cell_id)
        if record is None or "model_config" not in record.get("cell", {}):
            return None
        return ModelConfig.from_dict(record["cell"]["model_config"])

    def calibrated_peak(self, dtype: str) -> float:
        """Calibrated GEMM FLOP/s of the run's machine for a dtype (NaN when not calibrated)."""
        key = {"bfloat16": "gemm_bf16_flops", "float16": "gemm_fp16_flops"}.get(dtype, "gemm_fp32_flops")
        value = self.manifest.get("calibration", {}).get(key)
        return float(value) if isinstance(value, (int, float)) else math.nan


def load_run(run_dir: Path) -> RunData:
    """Read a run directory through the one reader (rundir.read_run_dir); a missing or unreadable part
    is a LoopscopeError naming the path. Cell records are the source of truth; a run dir that only
    has results.parquet (copied from elsewhere) is read from that, without the per-cell records."""
    from loopscope.reports.rundir import normalise_results, normalise_samples, read_run_dir

    files = read_run_dir(run_dir)
    where = str(files.path)
    return RunData(files.path, files.manifest, normalise_results(files.results, where=where),
                   normalise_samples(files.samples, where=where), files.cells)


def _cell_frame(run: RunData) -> pd.DataFrame:
    rows = []
    for cid, record in run.cells.items():
        cell = record.get("cell", {})
        cfg = cell.get("model_config", {})
        family = cfg.get("family", "")
        rows.append({
            "cell_id": cid, "label": record.get("label", cid), "status": record.get("status", ""),
            "reason": record.get("reason", ""), "model": cell.get("model", ""), "family": family,
            "workload": cell.get("workload", ""), "backend": cell.get("backend", ""),
            "device": cell.get("device", ""), "dtype": cell.get("dtype", ""), "batch": cell.get("batch"),
            "seq_len": cell.get("seq_len"), "loops_test": cell.get("loops_test"),
            "loops_train": None if family == DENSE_FAMILY else cfg.get("mu_rec"),
            "kv_policy": cell.get("kv_policy"), "lr": cell.get("lr"), "depends_on": cell.get("depends_on"),
            "wall_s": record.get("wall_s"),
        })
    if not rows and not run.results.empty:
        first = run.results.drop_duplicates("cell_id")
        for _, r in first.iterrows():
            rows.append({**{c: r.get(c) for c in CELL_COLUMNS if c in r.index}, "label": r["cell_id"],
                         "lr": r.get("lr"), "depends_on": None, "wall_s": None})
    out = pd.DataFrame(rows, columns=list(CELL_COLUMNS))
    out["lr"] = pd.to_numeric(out["lr"], errors="coerce")
    return out


def family_rank(family: str) -> int:
    """Dense first, then the looped families in a fixed order (tables and legends read the same way)."""
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def _with_cell_axes(df: pd.DataFrame, run: RunData, columns: tuple[str, ...] = ("lr", "depends_on", "label")
                    ) -> pd.DataFrame:
    """Add per-cell axes that the tidy rows do not carry (lr, depends_on, label)."""
    cells = run.cell_frame().set_index("cell_id")
    out = df.copy()
    for col in columns:
        out[col] = out["cell_id"].map(cells[col]) if not cells.empty else np.nan
    return out


# --- quality -------------------------------------------------------------------------------------


def quality_frame(run: RunData) -> pd.DataFrame:
    """bpb per eval cell with its model accounting, test-time loops, seed std, lr and train cell."""
    bpb = run.metric("bpb")
    if bpb.empty:
        return bpb
    std = run.metric("bpb_std").set_index("cell_id")["value"]
    out = _with_cell_axes(bpb, run)
    out["bpb_std"] = out["cell_id"].map(std)
    # A looped model evaluated without loops_test ran its training mean loops (mu_rec).
    default = (out["family"] != DENSE_FAMILY) & out["loops_test"].isna()
    out["loops_test"] = out["loops_test"].astype(float).where(~default, out["loops_train"].astype(float))
    return out


def at_training_loops(quality: pd.DataFrame) -> pd.DataFrame:
    """One bpb per model: dense models as they are, looped models at T = their training mean loops
    (or the evaluated T closest to it); with several learning rates, the best one."""
    if quality.empty:
        return quality
    q = quality.copy()
    gap = (q["loops_test"].astype(float) - q["loops_train"].astype(float)).abs()
    q["_gap"] = gap.fillna(0.0)
    closest = q.groupby("model")["_gap"].transform("min")
    q = q[q["_gap"] == closest]
    return q.sort_values(["model", "value"]).drop_duplicates("model").drop(columns="_gap")


def at_training_loops_per_cell(quality: pd.DataFrame) -> pd.DataFrame:
    """The rows at each model's training mean loops (or the evaluated T closest to it), every seed and
    learning rate kept (at_training_loops keeps one row per model)."""
    if quality.empty:
        return quality
    gap = (quality["loops_test"].astype(float) - quality["loops_train"].astype(float)).abs().fillna(0.0)
    return quality[gap == gap.groupby(quality["model"]).transform("min")]


def train_record(run: RunData, eval_cell_id: str) -> dict[str, Any] | None:
    """The record of the train cell an eval cell read its checkpoint from."""
    record = run.cells.get(eval_cell_id)
    dep = record.get("cell", {}).get("depends_on") if record else None
    return run.cells.get(dep) if dep else None


def training_flops(run: RunData, eval_cell_id: str) -> float:
    """FLOPs spent training the checkpoint an eval cell scored: flops_per_token(train) x train_tokens."""
    from loopscope.models import ModelConfig, flops_per_token

    train = train_record(run, eval_cell_id)
    if train is None or train.get("status") != "ok":
        return math.nan
    tokens = [r["value"] for r in train.get("rows", []) if r.get("metric") == "train_tokens"]
    if not tokens or not np.isfinite(tokens[0]):
        return math.nan
    cfg = ModelConfig.from_dict(train["cell"]["model_config"])
    return flops_per_token(cfg, int(train["cell"]["seq_len"]), mode="train") * float(tokens[0])


def quality_vs_flops(run: RunData) -> pd.DataFrame:
    """bpb at training loops with the training FLOPs of its checkpoint (rows without FLOPs dropped)."""
    q = at_training_loops(quality_frame(run))
    if q.empty:
        return q
    q = q.assign(train_flops=[training_flops(run, cid) for cid in q["cell_id"]])
    return q[np.isfinite(q["train_flops"])]


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated in (smaller x, smaller y), sorted by x."""
    order = np.lexsort((y, x))
    front, best = [], np.inf
    for i in order:
        if y[i] < best:
            front.append(i)
            best = y[i]
    return np.asarray(front, dtype=int)


# --- speed, memory, energy -----------------------------------------------------------------------


def speed_frame(run: RunData) -> pd.DataFrame:
    """tokens/s median (with its CI) of prefill and decode cells, with latency percentiles and MFU."""
    tps = run.metric("tokens_per_s", stat=("median",))
    if tps.empty:
        return tps
    tps = tps[tps["workload"].isin(("prefill", "decode"))]
    out = tps.copy()
    for stat in ("median", "p90", "p99"):
        lat = run.metric("latency_ms", stat=(stat,)).set_index("cell_id")["value"]
        out[f"latency_{stat}_ms"] = out["cell_id"].map(lat)
    for name, col in (("ttft_ms", "ttft_median_ms"), ("mfu", "mfu"), ("peak_mem_bytes", "peak_mem_bytes")):
        m = run.metric(name, stat=("median", ""))
        out[col] = out["cell_id"].map(m.set_index("cell_id")["value"]) if not m.empty else np.nan
    return out


def memory_frame(run: RunData) -> pd.DataFrame:
    """Decode cells: weights and KV-cache bytes at their context (measured KV when there is one)."""
    weights = run.metric("weights_bytes")
    if weights.empty:
        return weights
    weights = weights[weights["workload"] == "decode"]
    if weights.empty:
        return weights
    kv = run.metric("kv_cache_bytes", stat=("measured", "analytic"))
    out = weights[["cell_id", "model", "family", "backend", "device", "dtype", "batch", "seq_len",
                   "loops_test", "loops_train", "kv_policy", "value"]].rename(columns={"value": "weights_bytes"})
    kv = kv.set_index("cell_id")
    out["kv_cache_bytes"] = out["cell_id"].map(kv["value"])
    out["kv_source"] = out["cell_id"].map(kv["stat"])
    out["kv_policy"] = out["kv_policy"].fillna("full (dense)")
    return out[np.isfinite(out["kv_cache_bytes"])]


def energy_frame(run: RunData) -> tuple[pd.DataFrame, list[str]]:
    """(energy_j_per_token rows that were measured, the distinct reasons the others were not)."""
    e = run.metric("energy_j_per_token")
    if e.empty:
        return e, []
    measured = e[np.isfinite(e["value"])].copy()
    power = run.metric("avg_power_w").set_index("cell_id")["value"]
    measured["avg_power_w"] = measured["cell_id"].map(power)
    why = sorted(set(e.loc[~np.isfinite(e["value"]), "source"].astype(str)))
    return measured, why


def row_label(row: pd.Series) -> str:
    """A readable cell name from a result row's axes (for runs read without cell records)."""
    parts = [str(row.get("workload", "")), str(row.get("model", "")), str(row.get("backend", ""))]
    if pd.notna(row.get("loops_test")):
        parts.append(f"T={int(row['loops_test'])}")
    if pd.notna(row.get("batch")) and pd.notna(row.get("seq_len")):
        parts.append(f"b{int(row['batch'])}x{int(row['seq_len'])}")
    if row.get("dtype") and str(row.get("dtype")) != "float32":
        parts.append(str(row["dtype"]))
    return " ".join(p for p in parts if p and p != "nan")


def mfu_frame(run: RunData) -> pd.DataFrame:
    """MFU per cell (finite only), with the cell's label (or one made from its axes)."""
    m = run.metric("mfu")
    if m.empty:
        return m
    out = _with_cell_axes(m[np.isfinite(m["value"])], run)
    made = [row_label(r) for _, r in out.iterrows()]
    out["label"] = [lab if isinstance(lab, str) and lab and lab != cid else alt
                    for lab, cid, alt in zip(out["label"], out["cell_id"], made, strict=True)]
    return out


# --- stability -----------------------------------------------------------------------------------


# Linear gain of the state update, > 1 can blow the state up: Parcae's rho(A_bar) (< 1 by construction),
# the RDM concat adapter's spectral norm on its state half.
STABILITY_PROXIES: tuple[str, ...] = ("spectral_radius", "adapter_spectral_norm")


def state_norm_frame(run: RunData) -> pd.DataFrame:
    """state_norm per loop iteration (stat "loopN" -> loop N) of train cells, with lr and the cell's
    stability proxy (`proxy`, named in `proxy_name`: spectral_radius or adapter_spectral_norm)."""
    s = run.results[(run.results["metric"] == "state_norm") & (run.results["status"] == "ok")]
    if s.empty:
        return s
    s = s[s["stat"].str.fullmatch(r"loop\d+")]
    s = _with_cell_axes(s, run).assign(loop=s["stat"].str[4:].astype(int))
    proxies = {name: run.metric(name).set_index("cell_id")["value"].to_dict() for name in STABILITY_PROXIES}
    found = [next(((n, float(v[cid])) for n, v in proxies.items() if np.isfinite(v.get(cid, np.nan))), ("", np.nan))
             for cid in s["cell_id"]]
    s["proxy_name"] = [n for n, _ in found]  # the first proxy a cell has wins
    s["proxy"] = [v for _, v in found]
    return s.sort_values(["model", "lr", "loop"])


DEGRADED_FACTOR = 1.2  # final train loss above this x the best of the same model's lr sweep


def stability_frame(run: RunData) -> pd.DataFrame:
    """One row per train cell: outcome, the step it diverged at, final loss, spikes, rho / adapter norm, and
    the growth of the last loop's state norm over training (last sample / first).

    outcome: "diverged" (a non-finite loss ended the cell), "degraded" (finite, but the final train loss is
    above DEGRADED_FACTOR x the best learning rate's of the same model: the run trained and got worse or
    never learnt), "converged", or the cell's status when it did not finish otherwise."""
    cells = run.cell_frame()
    train = cells[cells["workload"] == "train"]
    if train.empty:
        return pd.DataFrame(columns=["family", "model", "lr", "outcome", "status", "diverged_step",
                                     "train_loss", "loss_spikes", "spectral_radius", "state_norm_growth",
                                     "reason"])
    res = run.results
    by_metric = {m: res[res["metric"] == m].drop_duplicates("cell_id").set_index("cell_id")["value"]
                 for m in ("diverged_step", "train_loss", "loss_spikes", "spectral_radius",
                           "adapter_spectral_norm")}
    out = train[["cell_id", "family", "model", "lr", "status", "reason"]].copy()
    for m, values in by_metric.items():
        out[m] = out["cell_id"].map(values)
    norms = run.samples[run.samples["metric"] == "state_norm_last_loop"].sort_values(["cell_id", "index"])
    growth = norms.groupby("cell_id")["value"].agg(lambda v: v.iloc[-1] / v.iloc[0] if v.iloc[0] > 0 else np.nan)
    out["state_norm_growth"] = out["cell_id"].map(growth)
    seeds = res.drop_duplicates("cell_id").set_index("cell_id")["seed"] if "seed" in res.columns else {}
    out["seed"] = out["cell_id"].map(seeds) if len(seeds) else np.nan
    best = out[out["status"] == "ok"].groupby("model")["train_loss"].min()
    degraded = (out["status"] == "ok") & (out["train_loss"] > DEGRADED_FACTOR * out["model"].map(best))
    out["outcome"] = out["status"].map({"ok": "converged", "diverged": "diverged"}).fillna(out["status"])
    out.loc[degraded, "outcome"] = "degraded"
    out["_rank"] = out["family"].map(family_rank)
    return out.sort_values(["_rank", "model", "lr"]).drop(columns="_rank").reset_index(drop=True)


def loss_curves(run: RunData) -> pd.DataFrame:
    """Per-step train loss samples with the train cell's model, family, lr and status."""
    s = run.samples[run.samples["metric"] == "train_loss"]
    if s.empty:
        return s
    cells = run.cell_frame().set_index("cell_id")
    out = s.copy()
    for col in ("model", "family", "lr", "status"):
        out[col] = out["cell_id"].map(cells[col]) if not cells.empty else np.nan
    return out.sort_values(["cell_id", "index"])


# --- numba vs torch ------------------------------------------------------------------------------


def numba_ratio_frame(run: RunData) -> pd.DataFrame:
    """numba time / torch time per op (kernels workload) and per model (prefill and decode cells).

    Columns: kind ("op" | "model"), name, baseline ("torch" | "torch-compile"), ratio, source.
    A ratio below 1 means numba is faster.
    """
    parts = [_kernel_ratios(run), _engine_ratios(run)]
    parts = [p for p in parts if not p.empty]
    if not parts:
        return pd.DataFrame(columns=["kind", "name", "baseline", "ratio", "source"])
    out = pd.concat(parts, ignore_index=True)
    return out[np.isfinite(out["ratio"]) & (out["ratio"] > 0)].reset_index(drop=True)


def _kernel_ratios(run: RunData) -> pd.DataFrame:
    """numba variant time / torch time of each benchmark of the kernels workload, same shape, same rounds."""
    res = run.results
    k = res[(res["workload"] == "kernels") & (res["status"] == "ok") & (res["metric"] == "time_ms")]
    if k.empty or "name" not in k.columns:
        return pd.DataFrame()
    k = k.assign(kind=k["kind"] if "kind" in k.columns else "op", shape=k["shape"] if "shape" in k.columns else "")
    k = k[k["kind"].isin(KERNEL_KINDS)]
    rows = []
    for (kind, name, _shape), g in k.groupby(["kind", "name", "shape"], dropna=False, sort=False):
        times = g.drop_duplicates("backend").set_index("backend")["value"]
        numba = [b for b in times.index if str(b).startswith("numba")]
        for base_name, baseline in TORCH_BASELINES.items():
            if base_name not in times.index:
                continue
            for backend in numba:
                label = str(name) if backend == "numba" else f"{name} [{backend}]"
                rows.append({"kind": "op" if kind == "op" else "model", "name": label, "baseline": baseline,
                             "ratio": times[backend] / times[base_name],
                             "source": "kernels workload (median times, timed round-robin)"})
    return pd.DataFrame(rows)


def _engine_ratios(run: RunData) -> pd.DataFrame:
    """Prefill/decode cells of numba and a torch backend that agree on every other axis."""
    tps = run.metric("tokens_per_s", stat=("median",))
    if tps.empty:
        return pd.DataFrame()
    tps = tps[tps["workload"].isin(("prefill", "decode"))]
    keys = ["workload", "model", "device", "dtype", "batch", "seq_len", "loops_test", "kv_policy"]
    key = ["|".join(str(v) for v in row) for row in tps[keys].itertuples(index=False)]
    tps = tps.assign(_key=key)
    numba = tps[tps["backend"] == "numba"].set_index("_key")
    rows = []
    for baseline in ("torch", "torch-compile"):
        base = tps[tps["backend"] == baseline].set_index("_key")
        for k in numba.index.intersection(base.index):
            n, b = numba.loc[k], base.loc[k]
            loops = "" if pd.isna(n["loops_test"]) else f" T={int(n['loops_test'])}"
            name = f"{n['workload']} {n['model']}{loops} b{int(n['batch'])}x{int(n['seq_len'])}"
            # time ratio = inverse throughput ratio
            rows.append({"kind": "model", "name": name, "baseline": baseline,
                         "ratio": b["value"] / n["value"], "source": "tokens/s medians"})
    return pd.DataFrame(rows)


# --- matched comparisons -------------------------------------------------------------------------

MATCH_KINDS: dict[str, str] = {
    "iso-param": "unique parameters",
    "iso-FLOP": "training FLOPs/token",
    "iso-memory": "weights + KV bytes",
}


@dataclass(frozen=True)
class ModelFacts:
    """A model of the run, with the quantities it is matched on and its outcomes in this run."""
    model: str
    family: str
    config: Any
    seq_len: int   # the training (or first) sequence length, for FLOPs/token
    context: int   # the context for iso-memory: the run's decode context, else seq_len
    dtype_bytes: int = 4

    def key(self, kind: str) -> float:
        from loopscope.models import flops_per_token, memory_bytes, param_counts

        if kind == "iso-param":
            return float(param_counts(self.config).unique)
        if kind == "iso-FLOP":
            return flops_per_token(self.config, self.seq_len, mode="train")
        if kind == "iso-memory":
            return float(memory_bytes(self.config, self.context, dtype_bytes=self.dtype_bytes))
        raise ValueError(f"unknown match kind {kind!r}; known: {', '.join(MATCH_KINDS)}")


def model_facts(run: RunData) -> list[ModelFacts]:
    """One ModelFacts per model of the run that has a cell record (first train cell preferred)."""
    cells = run.cell_frame()
    if cells.empty:
        return []
    decode = cells.loc[cells["workload"] == "decode", "seq_len"].dropna()
    facts = []
    order = cells.assign(_w=(cells["workload"] != "train").astype(int)).sort_values(["model", "_w"])
    for model, g in order.groupby("model", sort=True):
        first = g.iloc[0]
        cfg = run.model_config(first["cell_id"])
        if cfg is None:
            continue
        seq_len = int(first["seq_len"])
        context = int(decode.max()) if not decode.empty else seq_len
        dtype_bytes = {"bfloat16": 2, "float16": 2}.get(str(first["dtype"]), 4)
        facts.append(ModelFacts(str(model), cfg.family, cfg, seq_len, context, dtype_bytes))
    return facts


def matched_pairs(run: RunData, kind: str) -> pd.DataFrame:
    """Each looped model of the run with the dense model of the run closest to it on `kind`
    (nearest in log ratio), with the matched quantity and the outcomes of both, and their ratios."""
    facts = model_facts(run)
    dense = [f for f in facts if f.family == DENSE_FAMILY]
    looped = [f for f in facts if f.family != DENSE_FAMILY]
    if not dense or not looped:
        return pd.DataFrame()
    outcomes = _model_outcomes(run)
    rows = []
    for lm in looped:
        lk = lm.key(kind)
        best = min(dense, key=lambda d: abs(math.log(lk / d.key(kind))))
        dk = best.key(kind)
        row: dict[str, Any] = {"looped": lm.model, "dense": best.model,
                               f"looped {MATCH_KINDS[kind]}": lk, f"dense {MATCH_KINDS[kind]}": dk,
                               "match ratio": lk / dk}
        if kind == "iso-memory":
            row["context"] = lm.context
        # bpb is only compared within one training recipe (groups.py); speeds share one measured setting.
        same_recipe = outcomes.get((lm.model, "recipe")) == outcomes.get((best.model, "recipe"))
        for name in ("bpb", "prefill tokens/s", "decode tokens/s"):
            a = outcomes.get((lm.model, name), math.nan)
            b = outcomes.get((best.model, name), math.nan)
            if math.isnan(a) and math.isnan(b):
                continue
            row[f"looped {name}"], row[f"dense {name}"] = a, b
            row[f"{name} ratio"] = a / b if b and (name != "bpb" or same_recipe) else math.nan
            if name == "bpb" and not same_recipe:
                row["bpb compared"] = "no: trained on different recipes"
        rows.append(row)
    return pd.DataFrame(rows)


def _model_outcomes(run: RunData) -> dict[tuple[str, str], float]:
    """(model, outcome) -> value: bpb at training loops; prefill/decode tokens/s of the torch backend
    on the device/batch/context shared by most models, at training loops (looped) or as is (dense)."""
    from loopscope.reports import groups

    out: dict[tuple[str, str], Any] = {}
    scores = groups.model_scores(groups.quality_groups(run))
    if not scores.empty:
        main = groups.main_group(scores)
        scores = scores.assign(_main=scores["group_key"] != main).sort_values("_main", kind="stable")
        for _, r in scores.drop_duplicates("model").iterrows():  # a model's main-group mean over seeds
            out[(r["model"], "bpb")] = float(r["bpb"])
            out[(r["model"], "recipe")] = r["group_key"]
    speed = speed_frame(run)
    if speed.empty:
        return out
    for workload in ("prefill", "decode"):
        s = speed[(speed["workload"] == workload)]
        if s.empty:
            continue
        torch_rows = s[s["backend"] == "torch"]
        s = torch_rows if not torch_rows.empty else s
        gap = (s["loops_test"].astype(float) - s["loops_train"].astype(float)).abs().fillna(0.0)
        s = s.assign(_gap=gap)
        s = s[s["_gap"] == s.groupby("model")["_gap"].transform("min")]
        # One shared setting so the ratio compares like with like.
        setting = s.groupby(["device", "batch", "seq_len"])["model"].nunique().idxmax()
        s = s[(s["device"] == setting[0]) & (s["batch"] == setting[1]) & (s["seq_len"] == setting[2])]
        for model, g in s.groupby("model"):
            out[(model, f"{workload} tokens/s")] = float(g["value"].max())
    return out
