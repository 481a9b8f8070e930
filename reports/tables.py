"""pandas tables of a run: per-model summary and failed cells."""

from __future__ import annotations

import pandas as pd

from loopscope.reports.frames import RunData, at_training_loops, quality_frame


def summary_table(run: RunData) -> pd.DataFrame:
    """One row per model: size, depth, quality at its training loops, and speed."""
    res = run.results
    if res.empty:
        return pd.DataFrame()
    models = res.drop_duplicates("model")[["model", "family", "params_unique", "loops_train"]]
    out = models.set_index("model")
    quality = at_training_loops(quality_frame(run))
    if not quality.empty:
        out["bpb"] = quality.set_index("model")["value"]
    train = run.metric("train_loss")
    if not train.empty:
        out["train_loss"] = train.drop_duplicates("model").set_index("model")["value"]
    tps = run.metric("tokens_per_s", stat=("mean",))
    tps = tps[tps["workload"] == "train"] if not tps.empty else tps
    if not tps.empty:
        out["train_tokens_per_s"] = tps.drop_duplicates("model").set_index("model")["value"]
    pre = run.metric("tokens_per_s", stat=("median",))
    pre = pre[pre["workload"] == "prefill"] if not pre.empty else pre
    if not pre.empty:
        best = pre.sort_values("value", ascending=False).drop_duplicates("model")
        out["prefill_tokens_per_s_best"] = best.set_index("model")["value"]
    return out.reset_index()


def failed_table(run: RunData) -> pd.DataFrame:
    rows = [{"cell": r.get("label", cid), "cell_id": cid, "status": r["status"], "reason": r["reason"][:160]}
            for cid, r in run.cells.items() if r["status"] != "ok"]
    return pd.DataFrame(rows, columns=["cell", "cell_id", "status", "reason"])


def quality_table(run: RunData) -> pd.DataFrame:
    q = quality_frame(run)
    if q.empty:
        return q
    cols = ["model", "family", "params_unique", "loops_train", "loops_test", "value", "bpb_std", "source"]
    return q[cols].rename(columns={"value": "bpb"}).sort_values(["model", "loops_test"])


def throughput_table(run: RunData) -> pd.DataFrame:
    tps = run.metric("tokens_per_s", stat=("median",))
    if tps.empty:
        return tps
    lat = run.metric("latency_ms", stat=("p90",)).set_index("cell_id")["value"]
    out = tps.assign(latency_p90_ms=tps["cell_id"].map(lat))
    cols = ["workload", "model", "backend", "device", "batch", "seq_len", "loops_test", "effective_depth",
            "value", "ci_low", "ci_high", "latency_p90_ms"]
    return out[cols].rename(columns={"value": "tokens_per_s"}).sort_values(["workload", "model", "loops_test"])
