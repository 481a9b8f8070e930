"""Write report.md, a self-contained report.html and charts/*.png|svg for a run directory."""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from loopscope.bench.store import atomic_write_text
from loopscope.reports.charts import CHARTS, Chart, Omitted
from loopscope.reports.frames import RunData, load_run
from loopscope.reports.tables import failed_table, quality_table, summary_table, throughput_table

TABLES = (("Summary per model", summary_table), ("Quality (held-out bits per byte)", quality_table),
          ("Throughput and latency", throughput_table), ("Cells that did not finish", failed_table))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.4g}"
    return str(value)


def _md_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "_none_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _header(run: RunData) -> list[tuple[str, str]]:
    m = run.manifest
    fp = m.get("fingerprint", {})
    cal = m.get("calibration", {})
    items = [
        ("run", m.get("run_id", "")),
        ("profile", f"{m.get('profile', {}).get('name', '')} ({m.get('profile', {}).get('hash', '')})"),
        ("device class", fp.get("device_class", "")),
        ("cpu", f"{fp.get('cpu', {}).get('model', '')} × {fp.get('cpu', {}).get('logical_cores', '')}"
         if isinstance(fp.get("cpu"), dict) else str(fp.get("cpu", ""))),
        ("gpu", str(fp.get("gpu", {}).get("name", "none")) if isinstance(fp.get("gpu"), dict) else "none"),
        ("corpus", f"{m.get('corpus', {}).get('name', '')}, held-out sha256 "
         f"{m.get('corpus', {}).get('val_sha256', '')[:16]}"),
        ("calibrated fp32 GEMM", f"{cal.get('gemm_fp32_flops', float('nan')) / 1e9:.1f} GFLOP/s"),
        ("calibrated bandwidth", f"{cal.get('mem_bw_bytes_per_s', float('nan')) / 1e9:.1f} GB/s"),
        ("git", str(m.get("git", {}))),
    ]
    return items


def write_report(run_dir: Path) -> dict[str, Path]:
    run = load_run(Path(run_dir))
    charts_dir = run.run_dir / "charts"
    charts_dir.mkdir(exist_ok=True)
    md: list[str] = [f"# loopscope report: {run.manifest.get('run_id', run.run_dir.name)}\n"]
    md += [f"- **{k}**: {v}" for k, v in _header(run)]
    body: list[str] = ["<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
                                        for k, v in _header(run)) + "</dl>"]
    md.append("\n## Charts\n")
    body.append("<h2>Charts</h2>")
    for make in CHARTS:
        chart = make(run)
        if isinstance(chart, Omitted):
            md.append(f"- _{chart.title}: not drawn ({chart.why})._")
            body.append(f"<p class='omitted'>{html.escape(chart.title)}: not drawn ({html.escape(chart.why)}).</p>")
            continue
        svg = _save(chart, charts_dir)
        md.append(f"### {chart.title}\n\n![{chart.title}](charts/{chart.name}.png)\n\n{chart.reading}\n")
        b64 = base64.b64encode(svg).decode("ascii")
        body.append(f"<figure><h3>{html.escape(chart.title)}</h3><img alt='{html.escape(chart.title)}' "
                    f"src='data:image/svg+xml;base64,{b64}'><figcaption>{html.escape(chart.reading)}"
                    "</figcaption></figure>")
    for title, make_table in TABLES:
        df = make_table(run)
        md.append(f"\n## {title}\n\n{_md_table(df)}")
        body.append(f"<h2>{html.escape(title)}</h2>{_html_table(df)}")
    md_path, html_path = run.run_dir / "report.md", run.run_dir / "report.html"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    atomic_write_text(html_path, _page(f"loopscope report: {run.manifest.get('run_id', '')}", "\n".join(body)))
    return {"md": md_path, "html": html_path}


def _save(chart: Chart, charts_dir: Path) -> bytes:
    chart.figure.tight_layout()
    chart.figure.savefig(charts_dir / f"{chart.name}.png")
    buf = io.BytesIO()
    chart.figure.savefig(buf, format="svg")
    plt.close(chart.figure)
    svg = buf.getvalue()
    (charts_dir / f"{chart.name}.svg").write_bytes(svg)
    return svg


def _page(title: str, body: str) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 6px;text-align:right}th{background:#f3f3f3}dl{display:grid;grid-template-columns:"
             "max-content auto;gap:2px 12px}dt{font-weight:600}figure{margin:2em 0}img{max-width:100%}"
             "figcaption{color:#444;font-size:14px}.omitted{color:#777;font-style:italic}")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")
