"""Write report.md, a self-contained report.html and charts/*.png|svg for a run directory.

The HTML inlines every chart as an SVG data URI and loads nothing from the network. The Markdown
holds the same content for pull-request comments, with images linked as charts/<name>.png.
Every string that comes from a profile, a manifest or a cell record is escaped for its target.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from loopscope.bench.errors import LoopscopeError
from loopscope.bench.matrix import DEFAULTS
from loopscope.bench.store import atomic_write_bytes, atomic_write_text
from loopscope.reports import validity
from loopscope.reports.charts import CHARTS, Chart, Omitted, human_bytes, si
from loopscope.reports.findings import all_findings
from loopscope.reports.frames import RunData, load_run
from loopscope.reports.profile_charts import PROFILE_CHARTS, traced
from loopscope.reports.profile_tables import PROFILE_TABLES
from loopscope.reports.quality_charts import QUALITY_CHARTS
from loopscope.reports.tables import TABLES

PNG_DPI = 110


# --- escaping and number formatting --------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def md_escape(text: object) -> str:
    """Plain text for Markdown: one line, HTML special characters as entities, and no emphasis,
    code, links or table-cell breaks (backslash-escaped)."""
    flat = " ".join(str(text).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(flat, quote=False))


def html_escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: Any, column: str = "") -> str:
    """A table cell as text: bytes humanised, FLOPs in SI, ints with separators, floats to 4 digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)) and not ("bytes" in column or "memory" in column):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if "bytes" in column or "memory" in column:
            return human_bytes(v)
        if "FLOP" in column:
            return si(v)
        if column == "lr":
            return f"{v:g}"
        if (v.is_integer() or abs(v) >= 1000) and abs(v) < 1e15:
            return f"{v:,.0f}"
        if v != 0 and abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}"
    return str(value)


# --- header ---------------------------------------------------------------------------------------


def header_items(run: RunData) -> list[tuple[str, str]]:
    """(label, text) pairs describing the run and the machine, from the manifest's fingerprint."""
    m = run.manifest
    fp = m.get("fingerprint") or {}
    profile = m.get("profile") or {}
    description = (profile.get("settings") or {}).get("profile", {}).get("description", "")
    cells = run.cell_frame()
    ok = int((cells["status"] == "ok").sum()) if not cells.empty else 0
    items = [
        ("run", f"{m.get('run_id', run.run_dir.name)} (created {m.get('created', '?')}, "
                f"updated {m.get('updated', m.get('created', '?'))})"),
        ("profile", f"{profile.get('name', '?')} ({profile.get('hash', '?')})" + (f": {description}" if description
                                                                                     else "")),
        ("cells", f"{ok} ok of {len(cells)}"),
        ("device class", f"{fp.get('device_class', '?')}" + (f" ({fp['device_class_reason']})"
                                                             if fp.get("device_class_reason") else "")),
        ("cpu", _cpu_text(fp.get("cpu"))),
        ("gpu", _gpu_text(fp.get("gpus", fp.get("gpu")))),
        ("memory", human_bytes(float(fp.get("memory", {}).get("total_bytes", math.nan)))
         if isinstance(fp.get("memory"), dict) else "?"),
        ("versions", _versions_text(m.get("versions") or fp.get("versions") or {})),
        ("threads", _threads_text(fp.get("threads"))),
        ("calibration", _calibration_text(m.get("calibration") or {})),
        ("corpus", _corpus_text(m.get("corpus") or {})),
        ("training", _training_text(profile.get("settings") or {}, cells, _train_budgets(run))),
        ("git", _git_text(m.get("git") or fp.get("git"))),
    ]
    return [(k, v) for k, v in items if v]


def _cpu_text(cpu: Any) -> str:
    if not isinstance(cpu, dict):
        return str(cpu or "?")
    cores = cpu.get("logical_cores", cpu.get("cores", "?"))
    isa = ", ".join(cpu.get("isa") or [])
    return f"{cpu.get('model', '?')}, {cores} logical cores" + (f" ({isa})" if isa else "")


def _gpu_text(gpus: Any) -> str:
    if not isinstance(gpus, dict):
        return "none"
    devices = gpus.get("devices") or []
    if not devices:
        return f"none ({gpus['reason']})" if gpus.get("reason") else "none"
    names = "; ".join(f"{d.get('name', '?')} ({human_bytes(float(d.get('memory_total_bytes') or math.nan))})"
                      for d in devices)
    driver = gpus.get("driver_version")
    return names + (f", driver {driver}" if driver else "")


def _versions_text(versions: dict) -> str:
    first = [k for k in ("python", "torch", "numba", "numpy") if k in versions]
    keys = first + sorted(k for k in versions if k not in first)
    return ", ".join(f"{k} {versions[k]}" for k in keys if versions[k])


def _threads_text(threads: Any) -> str:
    if not isinstance(threads, dict):
        return ""
    parts = [f"torch {threads['torch_num_threads']}"] if threads.get("torch_num_threads") else []
    for pool in threads.get("blas_pools") or []:
        user, internal = pool.get("user_api", "?"), pool.get("internal_api", "?")
        parts.append(f"{user if user == internal else f'{user} ({internal})'} {pool.get('num_threads', '?')}")
    return ", ".join(dict.fromkeys(parts))


def _calibration_text(cal: dict) -> str:
    if not cal:
        return "not calibrated (MFU unavailable)"
    parts = []
    for key, label in (("gemm_fp32_flops", "fp32 GEMM"), ("gemm_bf16_flops", "bf16 GEMM"),
                       ("gemm_fp16_flops", "fp16 GEMM")):
        value = cal.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {si(value, 'FLOP/s')}")
    bw = cal.get("mem_bw_bytes_per_s")
    if isinstance(bw, (int, float)) and math.isfinite(bw):
        parts.append(f"memory bandwidth {bw / 1e9:.3g} GB/s")
    probes = cal.get("probes")
    if isinstance(probes, int) and probes > 1:
        parts.append(f"the best of {probes} probes spread over the run (MFU is against these peaks)")
    return ", ".join(parts)


def _corpus_text(corpus: dict) -> str:
    if not corpus:
        return ""
    if corpus.get("read") is False:
        return f"{corpus.get('name', '?')}: not read ({corpus.get('why', 'no cell reads text')})"
    return (f"{corpus.get('name', '?')}: {corpus.get('train_bytes', '?')} train / {corpus.get('val_bytes', '?')} "
            f"held-out bytes, held-out sha256 {str(corpus.get('val_sha256', ''))[:16]}")


def _budget_text(train: dict) -> str:
    if train.get("tokens_per_param"):
        return f"{train['tokens_per_param']:g} tokens/param"
    if train.get("flops"):
        return f"{train['flops']:.3g} FLOPs (iso-FLOP)"
    return f"{train['tokens']:,} tokens"


def _train_budgets(run: RunData) -> list[str]:
    """The distinct training budgets of the run's train cells (a sweep's `tokens` axis sets its own)."""
    budgets: dict[str, None] = {}
    for record in run.cells.values():
        cell = record.get("cell") or {}
        train = (cell.get("settings") or {}).get("train")
        if cell.get("workload") == "train" and isinstance(train, dict):
            budgets[_budget_text({**DEFAULTS["train"], **train})] = None
    return list(budgets)


def _training_text(settings: dict, cells: pd.DataFrame, budgets: list[str] | None = None) -> str:
    """The optimizer and schedule every train cell shared (blank when the run trains nothing), and the
    training budgets the cells were given (`budgets`, from the cell records; else the profile's)."""
    if cells.empty or "workload" not in cells or not (cells["workload"] == "train").any():
        return ""
    train = {**DEFAULTS["train"], **settings.get("train", {})}
    optimizer = ("Muon (attention and MLP matrices) + AdamW (the rest)" if train.get("optimizer") == "muon"
                 else "AdamW")
    budget = (" or ".join(budgets) + " (by sweep: see the recipe groups)" if budgets and len(budgets) > 1
              else budgets[0] if budgets else _budget_text(train))
    return (f"{budget} per model and training seed (a seed fixes the initialisation and the data order, "
            f"the same for every model); {optimizer}, trapezoid schedule (warm-up "
            f"{train['warmup_frac']:g}, cool-down {train['cooldown_frac']:g} of the steps), grad clip "
            f"{train['grad_clip']:g}, weight decay {train['weight_decay']:g}")


def _git_text(git: Any) -> str:
    if not isinstance(git, dict):
        return "not a git checkout"
    commit = git.get("commit") or "no commit"
    return f"{commit[:12]}" + (" (uncommitted changes)" if git.get("dirty") else "")


# --- charts ---------------------------------------------------------------------------------------


@dataclass
class DrawnChart:
    chart: Chart
    svg: bytes


def draw_charts(run: RunData, charts_dir: Path) -> list[DrawnChart | Omitted]:
    """Every chart, saved as PNG and SVG; a chart that fails to draw becomes an Omitted naming the error."""
    charts_dir.mkdir(exist_ok=True)
    out: list[DrawnChart | Omitted] = []
    # "Where the time goes" (profile charts) only for traced runs
    for make in CHARTS + QUALITY_CHARTS + (PROFILE_CHARTS if traced(run) else ()):
        try:
            # Names and labels come from users: `$` or `^` in a model name is text, never mathtext.
            with plt.rc_context({"text.parse_math": False, "text.usetex": False}):
                chart = make(run)
                drawn = chart if isinstance(chart, Omitted) else DrawnChart(chart, _save(chart, charts_dir))
        except (OSError, LoopscopeError):
            plt.close("all")
            raise  # a full disk is the run's problem, not one chart's
        except Exception as err:  # one broken chart must not cost the whole report
            traceback.print_exc(file=sys.stderr)
            name = make.__name__
            out.append(Omitted(name, name.replace("_", " "), f"could not be drawn: {type(err).__name__}: {err}"))
            plt.close("all")
            continue
        if isinstance(drawn, Omitted):
            for suffix in (".png", ".svg"):  # a chart left out now must not be read from an older report
                (charts_dir / f"{drawn.name}{suffix}").unlink(missing_ok=True)
        out.append(drawn)
    return out


def _save(chart: Chart, charts_dir: Path) -> bytes:
    fig = chart.figure
    if fig._suptitle is None:  # a chart shared alone keeps its context
        fig.suptitle(chart.title, fontsize=11, fontweight="bold", y=1.0, va="bottom")
    try:
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=PNG_DPI, bbox_inches="tight")
        buf = io.BytesIO()
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    finally:
        plt.close(fig)
    svg = buf.getvalue()
    atomic_write_bytes(charts_dir / f"{chart.name}.png", png.getvalue())
    atomic_write_bytes(charts_dir / f"{chart.name}.svg", svg)
    return svg


# --- the two documents -----------------------------------------------------------------------------


def load_checked(run_dir: Path) -> RunData:
    """The run, with MFU against its best calibration probe and a `validity` flag on every row."""
    run = load_run(Path(run_dir))
    run.results = validity.annotate(run.results, run.manifest)
    return run


def findings_json(run_dir: Path) -> dict[str, Any]:
    """The findings for machines (`loopscope report --format json`)."""
    run = load_checked(run_dir)
    flagged = run.results[run.results["validity"] != validity.OK]
    return {"run_id": run.manifest.get("run_id", run.run_dir.name),
            "findings": [f.as_dict() for f in all_findings(run)],
            "invalid_rows": [{"cell_id": r["cell_id"], "metric": r["metric"], "stat": r["stat"],
                              "value": None if not np.isfinite(r["value"]) else float(r["value"]),
                              "validity": r["validity"]} for _, r in flagged.iterrows()]}


def write_report(run_dir: Path) -> dict[str, Path]:
    run = load_checked(Path(run_dir))
    title = f"loopscope report: {run.manifest.get('run_id', run.run_dir.name)}"
    header = header_items(run)
    found = [f.text for f in all_findings(run)]
    charts = draw_charts(run, run.run_dir / "charts")
    tables = [(spec, spec.make(run)) for spec in TABLES + (PROFILE_TABLES if traced(run) else ())]
    md_path, html_path = run.run_dir / "report.md", run.run_dir / "report.html"
    atomic_write_text(md_path, render_markdown(title, header, charts, tables, found))
    atomic_write_text(html_path, render_html(title, header, charts, tables, found))
    return {"md": md_path, "html": html_path}


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_markdown(title: str, header: list[tuple[str, str]], charts: list, tables: list,
                    found: list[str] | None = None) -> str:
    md = [f"# {md_escape(title)}", ""]
    if found:
        md += ["## Findings", ""] + [f"- {md_escape(text)}" for text in found] + ["", "## Run", ""]
    md += [f"- **{md_escape(k)}**: {md_escape(v)}" for k, v in header]
    md += ["", "## Charts", ""]
    for item in charts:
        if isinstance(item, Omitted):
            md.append(f"- _{md_escape(item.title)}: not drawn ({md_escape(item.why)})._")
            continue
        c = item.chart
        md += ["", f"### {md_escape(c.title)}", "", f"![{md_escape(c.title)}](charts/{c.name}.png)", "",
               md_escape(c.reading), ""]
    md += ["", "## Tables", ""]
    for spec, df in tables:
        md += [f"### {md_escape(spec.title)}", ""]
        if spec.note:
            md += [f"_{md_escape(spec.note)}_", ""]
        md += [_md_table(df), ""]
    return "\n".join(md).rstrip() + "\n"


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return f"_none: {md_escape(df.attrs.get('why', 'no data'))}_"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(md_escape(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(md_escape(fmt(v, c)) for v, c in zip(row, cols, strict=True)) + " |")
    return "\n".join(lines)


def render_html(title: str, header: list[tuple[str, str]], charts: list, tables: list,
                found: list[str] | None = None) -> str:
    body = [f"<h1>{html_escape(title)}</h1>"]
    if found:
        body.append("<section id='findings'><h2>Findings</h2><ul class='findings'>"
                    + "".join(f"<li>{html_escape(text)}</li>" for text in found) + "</ul></section><h2>Run</h2>")
    body.append("<dl class='header'>")
    body += [f"<dt>{html_escape(k)}</dt><dd>{html_escape(v)}</dd>" for k, v in header]
    body.append("</dl>")
    toc = [f"<li><a href='#{_anchor(i.chart.title)}'>{html_escape(i.chart.title)}</a></li>"
           for i in charts if not isinstance(i, Omitted)]
    toc += [f"<li><a href='#{_anchor(s.title)}'>{html_escape(s.title)}</a></li>" for s, _ in tables]
    body.append(f"<nav><h2>Contents</h2><ol>{''.join(toc)}</ol></nav>")
    body.append("<h2>Charts</h2>")
    omitted = [i for i in charts if isinstance(i, Omitted)]
    for item in charts:
        if isinstance(item, Omitted):
            continue
        c = item.chart
        b64 = base64.b64encode(item.svg).decode("ascii")
        body.append(f"<figure id='{_anchor(c.title)}'><h3>{html_escape(c.title)}</h3>"
                    f"<img alt='{html_escape(c.title)}' src='data:image/svg+xml;base64,{b64}'>"
                    f"<figcaption>{html_escape(c.reading)}</figcaption></figure>")
    if omitted:
        body.append("<h3>Not drawn</h3><ul class='omitted'>" + "".join(
            f"<li>{html_escape(o.title)}: {html_escape(o.why)}.</li>" for o in omitted) + "</ul>")
    body.append("<h2>Tables</h2>")
    for spec, df in tables:
        body.append(f"<section id='{_anchor(spec.title)}'><h3>{html_escape(spec.title)}</h3>")
        if spec.note:
            body.append(f"<p class='note'>{html_escape(spec.note)}</p>")
        body.append(_html_table(df) + "</section>")
    return _page(title, "\n".join(body))


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return f"<p class='empty'>none: {html_escape(df.attrs.get('why', 'no data'))}</p>"
    cols = [str(c) for c in df.columns]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]
    head = "".join(f"<th>{html_escape(c)}</th>" for c in cols)
    rows = []
    for row in df.itertuples(index=False):
        cells = "".join(f"<td class='{'num' if n else 'txt'}'>{html_escape(fmt(v, c))}</td>"
                        for v, c, n in zip(row, cols, numeric, strict=True))
        rows.append(f"<tr>{cells}</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;"
    "color:#222;line-height:1.4}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"
    "dl.header{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:14px}"
    "dt{font-weight:600}dd{margin:0}nav ol{columns:2;font-size:14px}"
    "figure{margin:1.5em 0 2.5em}img{max-width:100%;min-width:min(100%,720px);height:auto}"
    "ul.findings{font-size:15px;background:#f7f9fc;border-left:4px solid #4a78b5;padding:0.6em 1.2em 0.6em 2em}"
    "ul.findings li{margin:0.3em 0}figcaption{color:#333;font-size:14px;max-width:900px}"
    ".omitted,.empty,.note{color:#666;font-size:14px}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12.5px;margin:0.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:3px 7px}th{background:#f3f3f3;text-align:left}"
    "td.num{text-align:right;font-variant-numeric:tabular-nums}td.txt{text-align:left}"
)


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{html_escape(title)}</title><style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")
