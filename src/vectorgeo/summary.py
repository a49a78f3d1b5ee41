"""A short, human-readable summary of a finished workflow run (``vectorgeo run-summary``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_summary(results: str | Path = "results") -> list[str]:
    """Lines describing what each stage produced under ``results``; missing stages are said to be missing."""
    r = Path(results)
    lines = []
    manifest = _read_json(r / "stencil" / "manifest.json")
    if manifest:
        cells = sum(v["cells"] for v in manifest["regions"].values())
        lines.append(
            f"stencil    {cells:,} land cells at H3 res {manifest['resolution']} "
            f"in {len(manifest['regions'])} regions (res {manifest['region_resolution']})"
        )
    else:
        lines.append("stencil    not built")
    shards = sorted((r / "samples").glob("shard-*.npz"))
    lines.append(f"samples    {len(shards)} shards" if shards else "samples    none")
    metrics = _read_json(r / "model" / "metrics.json")
    if metrics:
        lines.append(
            f"model      {len(metrics.get('epochs', []))} epochs, best val triplet accuracy "
            f"{metrics.get('best_val_triplet_accuracy', float('nan')):.3f}, "
            f"{metrics.get('pca_components_99', '?')} PCA components explain 99%"
        )
    else:
        lines.append("model      not trained")
    emb = sorted((r / "embeddings" / "batches").glob("batch-*/*_*.parquet"))
    if emb:
        import pyarrow.parquet as pq

        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in emb)
        folders = len({p.parent for p in emb})
        where = r / "embeddings" / "batches"
        lines.append(f"embeddings {rows:,} cells in {len(emb)} region files of {folders} batches under {where}")
    else:
        lines.append("embeddings none")
    loaded = _read_json(r / "loaded" / "regions.json")
    if loaded:
        lines.append(f"database   {loaded.get('rows', 0):,} rows loaded from {len(loaded.get('regions', {}))} regions")
    ev = _read_json(r / "eval" / "metrics.json")
    if ev:
        lines.append(
            f"evaluation {r / 'eval' / 'report.html'} ({ev.get('n_cells', '?')} cells, {ev.get('folds', '?')} folds)"
        )
        for task, t in ev.get("tasks", {}).items():
            main = "linear_macro_f1" if t.get("kind") == "classification" else "linear_r2"
            scores = {m: v.get(main, {}).get("mean") for m, v in t.get("methods", {}).items()}
            shown = ", ".join(f"{m} {s:.3f}" for m, s in scores.items() if s is not None)
            lines.append(f"           {task} ({main}): {shown}")
    return lines
