"""The evaluation report: one self-contained HTML file with inline PNG figures.

Figures are drawn with matplotlib's Agg backend and embedded as base64
``data:`` URIs, so the file opens offline and can be mailed as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vectorgeo.atomic import write_text_atomic
from vectorgeo.probes import MAIN_METRIC

METHOD_COLOURS = {
    "embedding": "#1f77b4",
    "random_init": "#7f7f7f",
    "class_histogram": "#2ca02c",
    "context_histogram": "#17becf",
    "pca_raw": "#ff7f0e",
    "random_features": "#d62728",
    "latlng": "#9467bd",
}


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def map_figure(lat: np.ndarray, lng: np.ndarray, rgb: np.ndarray) -> str:
    """World (or extent) map of cells coloured by the first three PCA components; a data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 6))
    ax.set_facecolor("#dde6ee")
    size = float(np.clip(4e4 / max(len(lat), 1), 0.3, 12.0))
    ax.scatter(lng, lat, c=rgb, s=size, marker="s", linewidths=0, rasterized=True)
    if len(lat):
        w, e = float(np.min(lng)), float(np.max(lng))
        s, n = float(np.min(lat)), float(np.max(lat))
        if e - w > 180:
            w, e = -180.0, 180.0
        pad = max(1.0, 0.03 * max(e - w, n - s))
        ax.set_xlim(max(-180, w - pad), min(180, e + pad))
        ax.set_ylim(max(-90, s - pad), min(90, n + pad))
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(f"{len(lat)} cells, colour = first 3 principal components of the embeddings (RGB)")
    return _png(fig)


def _num(v: float | None) -> float:
    return math.nan if v is None else float(v)


def bar_figure(metrics: Mapping[str, Any]) -> str:
    """Per task: the main metric and the kNN metric of each method (mean ± std over folds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = metrics["tasks"]
    fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(5 * max(len(tasks), 1), 4), squeeze=False)
    for ax, (name, t) in zip(axes[0], tasks.items(), strict=False):
        main = MAIN_METRIC[t["kind"]]
        knn = "knn_macro_f1" if t["kind"] == "classification" else "knn_r2"
        methods = list(t["methods"])
        x = np.arange(len(methods))
        for off, metric, alpha in ((-0.2, main, 1.0), (0.2, knn, 0.45)):
            means = [_num(t["methods"][m][metric]["mean"]) for m in methods]
            stds = [_num(t["methods"][m][metric]["std"]) for m in methods]
            ax.bar(
                x + off,
                means,
                0.4,
                yerr=stds,
                color=[METHOD_COLOURS.get(m.split("+")[0], "#333333") for m in methods],
                alpha=alpha,
                capsize=3,
                label=metric,
            )
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_title(f"{name} ({t['kind']})")
        ax.set_ylabel("score (solid: linear, light: kNN)")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def training_figure(training: Mapping[str, Any]) -> str | None:
    """Loss and validation triplet accuracy per epoch, from the training metrics.json."""
    epochs = training.get("epochs") or []
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(k: str) -> list[float]:
        return [float(e[k]) if e.get(k) is not None else math.nan for e in epochs]

    ep = col("epoch")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    a1.plot(ep, col("train_loss"), marker="o", label="train loss")
    a1.plot(ep, col("val_loss"), marker="o", label="validation loss")
    a1.set_xlabel("epoch")
    a1.set_ylabel(f"{training.get('objective', 'triplet')} loss")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(ep, col("val_triplet_accuracy"), marker="o", color="#2ca02c")
    a2.set_xlabel("epoch")
    a2.set_ylabel("validation triplet accuracy")
    a2.set_ylim(0, 1)
    a2.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _fmt(v: Mapping[str, float]) -> str:
    m, s = v.get("mean", math.nan), v.get("std", math.nan)
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    return f"{m:.3f} ± {s:.3f}"


def _table(metrics: Mapping[str, Any], metric_of: Any, caption: str) -> str:
    tasks = metrics["tasks"]
    methods: list[str] = []
    for t in tasks.values():
        methods += [m for m in t["methods"] if m not in methods]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in methods)
    rows = []
    for name, t in tasks.items():
        for metric in metric_of(t):
            vals = {m: t["methods"][m][metric] for m in methods if m in t["methods"]}
            finite = [v["mean"] for v in vals.values() if v["mean"] is not None and not math.isnan(v["mean"])]
            best = max(finite) if finite else None
            cells = []
            for m in methods:
                v = vals.get(m)
                text = _fmt(v) if v else "–"
                strong = v is not None and best is not None and v["mean"] == best
                cells.append(f"<td>{'<b>' + text + '</b>' if strong else text}</td>")
            rows.append(f"<tr><th>{html.escape(name)}</th><td>{html.escape(metric)}</td>{''.join(cells)}</tr>")
    return (
        f"<table><caption>{html.escape(caption)}</caption><tr><th>task</th><th>metric</th>{head}</tr>"
        + "".join(rows)
        + "</table>"
    )


def paired_table(metrics: Mapping[str, Any]) -> str:
    """Per task: the per-fold differences of the embedding (or embedding+latlng) against the best baseline."""
    rows = []
    for name, t in metrics["tasks"].items():
        p = t.get("paired") or {}
        if not p:
            continue
        diffs = " ".join(f"{d:+.3f}" for d in p["diffs"])
        worst = min(p["folds_won"].values()) if p["folds_won"] else 0
        rows.append(
            f"<tr><th>{html.escape(name)}</th><td>{html.escape(p['method'])}</td>"
            f"<td>{html.escape(p['best_baseline'])}</td><td>{diffs}</td><td>{p['mean_diff']:+.3f}</td>"
            f"<td>{worst}/{p['folds']}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<table><caption>Paired per-fold differences on the main metric (method − best baseline by mean); "
        "folds won = the fewest folds won against any baseline</caption><tr><th>task</th><th>method</th>"
        "<th>best baseline</th><th>per fold</th><th>mean</th><th>folds won</th></tr>" + "".join(rows) + "</table>"
    )


def label_efficiency_table(metrics: Mapping[str, Any]) -> str:
    """Per task and label fraction: the method's main metric, the best baseline's and the margin."""
    rows = []
    for name, t in metrics["tasks"].items():
        le = t.get("label_efficiency") or {}
        for f, m in sorted((le.get("margins") or {}).items(), key=lambda kv: float(kv[0])):
            ours = le["scores"][f][le["method"]]["mean"]
            best = le["scores"][f][m["best_baseline"]]["mean"]
            rows.append(
                f"<tr><th>{html.escape(name)}</th><td>{float(f):.0%}</td><td>{ours:.3f}</td>"
                f"<td>{html.escape(m['best_baseline'])} {best:.3f}</td><td>{m['margin']:+.3f}</td></tr>"
            )
    if not rows:
        return ""
    return (
        "<table><caption>Label efficiency: linear probe trained on a fraction of each training fold</caption>"
        "<tr><th>task</th><th>labels</th><th>embedding</th><th>best baseline</th><th>margin</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def label_efficiency_figure(metrics: Mapping[str, Any]) -> str | None:
    """Main metric against the fraction of training labels, per task and method (log x axis)."""
    tasks = {n: t for n, t in metrics["tasks"].items() if (t.get("label_efficiency") or {}).get("scores")}
    if not tasks:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, (name, t) in zip(axes[0], tasks.items(), strict=True):
        scores = t["label_efficiency"]["scores"]
        fr = sorted(scores, key=float)
        for m in scores[fr[0]]:
            if "+latlng" in m and not t.get("location"):
                continue
            ys = [_num(scores[f][m]["mean"]) for f in fr]
            style = {"linestyle": "--" if "+latlng" in m else "-", "linewidth": 2.2 if m.startswith("embedding") else 1}
            ax.plot([float(f) for f in fr], ys, marker="o", label=m, color=METHOD_COLOURS.get(m.split("+")[0]), **style)
        ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("fraction of training labels")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("main metric")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}caption{text-align:left;font-weight:600;padding:.3em 0}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f4f4f4}
td:nth-child(2){text-align:left}img{max-width:100%;height:auto}
.pass{color:#116611;font-weight:600}.fail{color:#aa1111;font-weight:600}
pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.85em}
"""


def render_report(
    metrics: Mapping[str, Any],
    *,
    details: Mapping[str, Mapping[str, Any]],
    goal: Mapping[str, Any],
    map_lat: np.ndarray,
    map_lng: np.ndarray,
    map_rgb: np.ndarray,
    training: Mapping[str, Any] | None,
    notes: Sequence[str],
    info: Mapping[str, Any],
) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>vectorgeo evaluation</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>vectorgeo evaluation report</h1>",
        f"<p>Model <code>{html.escape(str(info.get('model_version')))}</code>; "
        f"{metrics['n_cells']} cells evaluated (drawn with a fixed seed from "
        f"{info.get('cells_with_embedding')} cells with an embedding), "
        f"{metrics['folds']}-fold spatial-block cross-validation "
        f"(blocks = H3 parents at resolution {info.get('fold_resolution')}). "
        "Scores are mean ± standard deviation over folds; features are standardised.</p>",
    ]
    verdict = "pass" if goal.get("passed") else "fail"
    lines = []
    for base, per_task in goal.get("beats", {}).items():
        won = [t for t, b in per_task.items() if b]
        won_text = ", ".join(won) or "none"
        lines.append(f"<li>beats <b>{html.escape(base)}</b> on {len(won)}/{len(per_task)} tasks ({won_text})</li>")
    for task, ok in goal.get("label_efficiency", {}).items():
        lines.append(
            f"<li>{html.escape(task)}: margin over the best baseline larger with the fewest labels than with all: "
            f"{'yes' if ok else 'no'}</li>"
        )
    parts.append(
        f"<h2>Goal</h2><p class='{verdict}'>Goal {'met' if goal.get('passed') else 'not met'}: on every content "
        "task the embedding beats every same-input baseline on the mean and on all folds but one; on location "
        "tasks embedding+latlng beats latlng and every &lt;baseline&gt;+latlng; with the fewest labels the "
        "embedding's margin is larger than with all (main metric).</p><ul>" + "".join(lines) + "</ul>"
    )
    parts.append("<h2>Results</h2>")
    parts.append(_table(metrics, lambda t: [MAIN_METRIC[t["kind"]]], "Main metric (tasks × methods)"))
    parts.append(paired_table(metrics))
    parts.append(label_efficiency_table(metrics))
    fig = label_efficiency_figure(metrics)
    if fig:
        parts.append(f"<img alt='label efficiency' src='{fig}'>")
    parts.append(
        _table(metrics, lambda t: list(next(iter(t["methods"].values())).keys()) if t["methods"] else [], "All metrics")
    )
    drows = "".join(
        f"<tr><th>{html.escape(n)}</th><td>{d.get('n_cells')}</td><td>{d.get('n_classes') or '–'}</td>"
        f"<td>{d.get('n_folds_scored')}</td></tr>"
        for n, d in details.items()
    )
    parts.append(
        "<table><caption>Cells per task (labelled cells; rare classes dropped)</caption>"
        f"<tr><th>task</th><th>cells</th><th>classes</th><th>folds scored</th></tr>{drows}</table>"
    )
    parts.append(f"<img alt='scores per task' src='{bar_figure(metrics)}'>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Embedding map</h2>")
    parts.append(f"<img alt='map of embeddings' src='{map_figure(map_lat, map_lng, map_rgb)}'>")
    parts.append("<h2>Training</h2>")
    fig = training_figure(training) if training else None
    if fig:
        best = training.get("best_val_triplet_accuracy") if training else None
        pcs = training.get("pca_components_99") if training else None
        rank = training.get("effective_rank") if training else None
        parts.append(
            f"<p>Best validation triplet accuracy: {best}; principal components for 99% variance: {pcs}; "
            f"effective rank of the validation embeddings: {rank} (of {info.get('embedding_dim')}).</p>"
        )
        parts.append(f"<img alt='training curves' src='{fig}'>")
    else:
        parts.append("<p>No training metrics were available.</p>")
    parts.append("<h2>Settings</h2><pre>" + html.escape(json.dumps(info, indent=2, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(path: str | Path, metrics: Mapping[str, Any], **kwargs: Any) -> None:
    """Render the report (keyword arguments of :func:`render_report`) and write it atomically."""
    write_text_atomic(path, render_report(metrics, **kwargs))
