"""`moebench report`: PNG plots and one self-contained HTML page from the history.

Plots: throughput against GPU budget, one line per policy, one figure per suite and model (from the latest complete
run that measured it); and each case's throughput over the runs in the history, labelled by commit. Every point is
the median of a case's timed rounds with a bar from their first to their third quartile: a median alone cannot
show whether two points differ by more than the rounds' own spread. The HTML page embeds the plots as base64 PNGs
and the latest run's table, so it can be mailed or archived alone. matplotlib is the optional extra `report`.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from pathlib import Path

from .history import format_run_header, injected
from .table import rows


class ReportError(RuntimeError):
    """The report cannot be made (matplotlib missing, nothing to plot)."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("moebench report needs matplotlib: pip install 'moebench[report]' "
                          "(or pip install matplotlib)") from None
    return plt


def _budget_fraction(record: dict) -> float | None:
    b, t = record.get("budget_bytes"), record.get("total_expert_bytes")
    return b / t if b and t else None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def spread(record: dict) -> tuple[float, float, float] | None:
    """(first quartile, median, third quartile) of a record's per-round tokens/s; with no per-round samples (older
    records) its aggregate tokens/s three times; None when it has neither."""
    import numpy as np

    samples = (record.get("samples") or {}).get("tokens_per_s") or []
    if samples:
        q1, median, q3 = np.percentile(np.asarray(samples, dtype=float), [25, 50, 75])
        return float(q1), float(median), float(q3)
    value = record.get("tokens_per_s")
    return (float(value),) * 3 if value else None


def _plot_spread(ax, xs: Sequence[float], spreads: list[tuple[float, float, float]], **style) -> None:
    """Medians joined by a line, each with its interquartile bar."""
    medians = [m for _, m, _ in spreads]
    below = [m - q1 for q1, m, _ in spreads]
    above = [q3 - m for _, m, q3 in spreads]
    ax.errorbar(xs, medians, yerr=[below, above], marker="o", capsize=3, **style)


def _save(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    data = buf.getvalue()
    path.write_bytes(data)
    return data


def budget_plots(runs: list[dict], out: Path, plt) -> list[tuple[str, Path, bytes]]:
    latest: dict[tuple[str, str], dict[str, dict]] = {}  # (suite, model) -> case -> record (latest wins)
    for run in runs:
        if run.get("status", "complete") != "complete":
            continue
        for r in run.get("records", []):
            if injected(r):
                continue
            latest.setdefault((r.get("suite"), r.get("model")), {})[r.get("case")] = r
    made = []
    for (suite, model), cases in sorted(latest.items(), key=lambda kv: str(kv[0])):
        by_policy: dict[str, list[tuple[float, tuple[float, float, float]]]] = {}
        for r in cases.values():
            x, q = _budget_fraction(r), spread(r)
            if x is not None and q is not None:
                by_policy.setdefault(str(r.get("policy")), []).append((x * 100, q))
        if not by_policy:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy, pts in sorted(by_policy.items()):
            pts.sort()
            _plot_spread(ax, [p[0] for p in pts], [p[1] for p in pts], label=policy)
        ax.set_xlabel("GPU budget (% of all expert bytes)")
        ax.set_ylabel("tokens/s (median, quartiles of the rounds)")
        ax.set_title(f"{suite}: {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        title = f"throughput vs budget: {suite} / {model}"
        path = out / f"budget_{_slug(str(suite))}_{_slug(str(model))}.png"
        made.append((title, path, _save(fig, path)))
        plt.close(fig)
    return made


def history_plots(runs: list[dict], out: Path, plt) -> list[tuple[str, Path, bytes]]:
    series: dict[tuple[str, str], list[tuple[str, tuple[float, float, float], list[float]]]] = {}
    for run in runs:
        if run.get("status", "complete") != "complete":
            continue
        commit = ((run.get("git") or {}).get("commit") or "none")[:8]
        for r in run.get("records", []):
            q = spread(r)
            if q is not None and not injected(r):
                samples = (r.get("samples") or {}).get("tokens_per_s") or []
                series.setdefault((r.get("suite"), r.get("case")), []).append((commit, q, samples))
    made = []
    for (suite, case), pts in sorted(series.items(), key=lambda kv: str(kv[0])):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = list(range(len(pts)))
        for x, (_, _, samples) in zip(xs, pts):
            if samples:
                ax.scatter([x] * len(samples), samples, s=6, alpha=0.3, color="gray")
        _plot_spread(ax, xs, [p[1] for p in pts])
        ax.set_xticks(xs, [p[0] for p in pts], rotation=45, fontsize=7)
        ax.set_xlabel("run (commit)")
        ax.set_ylabel("tokens/s (median, quartiles; rounds in grey)")
        ax.set_title(f"{suite}: {case}", fontsize=9)
        ax.grid(alpha=0.3)
        path = out / f"history_{_slug(str(suite))}_{_slug(str(case))}.png"
        made.append((f"history: {suite} / {case}", path, _save(fig, path)))
        plt.close(fig)
    return made


def _table_html(records: list[dict]) -> str:
    headers, body = rows(records)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    lines = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{lines}</table>"


def write_report(runs: list[dict], out: str | Path) -> Path:
    """Write the PNGs and `index.html` into `out`; returns the HTML path."""
    if not runs:
        raise ReportError("the history holds no runs; run a suite with --moebench first")
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = budget_plots(runs, out, plt) + history_plots(runs, out, plt)
    latest = runs[-1]
    sources = sorted({str(r.get("weight_source", "synthetic")) for r in latest.get("records", [])})
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>moebench report</title><style>"
             "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:640px;margin:4px}"
             "</style></head><body><h1>moebench report</h1>",
             f"<p>{len(runs)} runs in the history. Latest:</p><pre>{html.escape(format_run_header(latest))}</pre>",
             f"<p>weight sources: {html.escape(', '.join(sources))}</p>",
             _table_html(latest.get("records", [])), "<h2>Plots</h2>"]
    for title, _, data in plots:
        parts.append(f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
                     f"{base64.b64encode(data).decode()}'><figcaption>{html.escape(title)}</figcaption></figure>")
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return page
