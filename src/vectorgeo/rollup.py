"""Region embedding files after embedding: rollups to coarser cells, superseded files, audit.

Rollup
------
For a parent resolution ``p`` the rollup embedding of a parent cell ``q`` is the
mean of its ``ok`` children's embeddings, re-normalised:

.. math::

    e_q = \\frac{\\sum_{c \\in ok(q)} e_c}{\\lVert \\sum_{c \\in ok(q)} e_c \\rVert}

(the mean and the sum point the same way), with ``children = |ok(q)|``. Parents
without an ``ok`` child are left out. Region files are reduced one at a time to
partial sums per parent, then the partials are reduced again, so memory is
bounded by the number of parents, not of cells.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vectorgeo import geoparquet, h3cells, regionfiles
from vectorgeo import model as vg_model
from vectorgeo.atomic import write_parquet_atomic
from vectorgeo.embed import REGION_FILE, STATUS_OK, STATUSES
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.stencil import centroids, change_resolution

log = logging.getLogger(__name__)


def _reduce(parents: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group rows by parent: (unique parents, summed vectors, summed counts). Vectorised."""
    uniq, inv = np.unique(parents, return_inverse=True)
    out = np.zeros((uniq.shape[0], sums.shape[1]), dtype=np.float64)
    np.add.at(out, inv, sums)
    return uniq, out, np.bincount(inv, weights=counts, minlength=uniq.shape[0]).astype(np.int64)


def rollup(
    region_files: Sequence[str | Path], resolutions: Sequence[int], out_paths: Sequence[str | Path]
) -> dict[int, int]:
    """Write one rollup file per parent resolution from region embedding files (see the module docstring).

    Output columns: ``h3`` uint64, ``lat``, ``lng`` float64 (parent centroid), ``embedding``
    fixed_size_list<float32>[d] (unit vectors), ``children`` int32 (ok children averaged); sorted by h3.

    Returns:
        Rows written per resolution.

    Raises:
        DataError: a region file is unreadable, or the files disagree on the dimension or model version.
    """
    if len(resolutions) != len(out_paths):
        raise ConfigError("embed.rollup_resolutions", f"{len(resolutions)} resolutions but {len(out_paths)} outputs")
    partial: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {int(p): [] for p in resolutions}
    dim: int | None = None
    version: str | None = None
    for f in region_files:
        data = geoparquet.read_region(f, expected_dim=dim)
        dim = data.dim
        if version is not None and data.model_version != version and len(data):
            raise DataError(str(f), f"model_version {data.model_version} differs from the other files' {version}")
        version = data.model_version if len(data) else version
        ok = data.valid
        cells = data.h3[ok]
        vec = data.embedding[ok].astype(np.float64)
        res = h3cells.resolution(cells[0]) if cells.size else 15
        for p in partial:
            if cells.size == 0:
                continue
            if p > res:
                raise ConfigError("embed.rollup_resolutions", f"rollup resolution {p} is finer than the cells' {res}")
            partial[p].append(_reduce(change_resolution(cells, p), vec, np.ones(cells.shape[0])))
    written: dict[int, int] = {}
    for p, out in zip(resolutions, out_paths, strict=True):
        parts = partial[int(p)]
        d = dim or 0
        if parts:
            q, s, c = _reduce(
                np.concatenate([x[0] for x in parts]),
                np.concatenate([x[1] for x in parts]),
                np.concatenate([x[2] for x in parts]),
            )
        else:
            q, s, c = np.zeros(0, np.uint64), np.zeros((0, d)), np.zeros(0, np.int64)
        norm = np.linalg.norm(s, axis=1, keepdims=True)
        keep = norm[:, 0] > 1e-9  # opposite children can cancel out exactly; such a parent has no direction
        q, s, c, norm = q[keep], s[keep], c[keep], norm[keep]
        e = (s / norm).astype(np.float32)
        lat, lng = centroids(q)
        table = pa.table(
            {
                "h3": pa.array(q, pa.uint64()),
                "lat": pa.array(lat, pa.float64()),
                "lng": pa.array(lng, pa.float64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(e.reshape(-1), pa.float32()), d),
                "children": pa.array(c.astype(np.int32), pa.int32()),
            }
        )
        meta = {"resolution": int(p), "model_version": version, "embedding_dim": d, "region_files": len(region_files)}
        table = table.replace_schema_metadata({b"vectorgeo": json.dumps(meta).encode()})
        write_parquet_atomic(out, table)
        written[int(p)] = int(q.shape[0])
    return written


def prune_superseded(folder: str | Path, current: Sequence[str | Path]) -> list[Path]:
    """Delete embed batch folders in ``folder`` that are not among ``current`` (older digests, another
    ``embed.batch_cells``), and region files left directly under ``folder``'s parent by the earlier
    one-file-per-job layout.

    Only names matching :data:`~vectorgeo.regionfiles.BATCH_DIR` and :data:`REGION_FILE` are touched;
    temp files and the rollup folder are left alone.

    Returns:
        The folders and files removed.
    """
    keep = {Path(p).name for p in current}
    removed: list[Path] = []
    folder = Path(folder)
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_dir() and regionfiles.BATCH_DIR.match(f.name) and f.name not in keep:
                held = sorted(p.name for p in f.iterdir() if REGION_FILE.match(p.name))
                log.info("removing superseded embed batch %s: %s", f.name, ", ".join(held) or "no region files")
                shutil.rmtree(f, ignore_errors=True)
                removed.append(f)
    if folder.parent.is_dir():
        for f in sorted(folder.parent.iterdir()):
            if f.is_file() and REGION_FILE.match(f.name):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def audit(results: str | Path, model_path: str | Path | None = None) -> dict[str, Any]:
    """Check a finished stage 3 against its stencil and model; return the figures.

    Checks that the embed batch folders hold exactly one file per current region (named with
    its stencil digest), that the files' cells are the stencil's cells (each exactly once),
    that ok embeddings are finite unit vectors and null ones are not ok, and that every file's
    ``model_version`` is the model file's.

    Args:
        results: The results folder (``config['results']``).
        model_path: The model file; default ``<results>/model/model.pt``.

    Returns:
        Figures, with ``ok`` True when every check passed.
    """
    results = Path(results)
    with open(results / "stencil" / "manifest.json") as f:
        manifest = json.load(f)
    version = vg_model.load(model_path or results / "model" / "model.pt")[1]["model_version"]
    folder = results / "embeddings"
    expected = {f"{r}_{v['digest']}.parquet": r for r, v in manifest["regions"].items()}
    # region files in the batch folders (and any left directly in the folder: extra)
    paths = {p.name: p for p in folder.glob(f"{regionfiles.BATCHES_FOLDER}/*/*.parquet") if REGION_FILE.match(p.name)}
    loose = [p.name for p in folder.glob("*.parquet") if REGION_FILE.match(p.name)]
    present = set(paths) | set(loose)
    stencil_cells, rows, mismatched, wrong_version = 0, 0, [], []
    counts = dict.fromkeys(STATUSES, 0)
    max_norm_err, nonfinite, all_h3 = 0.0, 0, []
    for name, region in sorted(expected.items()):
        cells = pq.read_table(results / "stencil" / "regions" / f"{region}.parquet", columns=["h3"])
        stencil_h3 = cells.column("h3").to_numpy()
        stencil_cells += stencil_h3.shape[0]
        if name not in paths:
            continue
        data = geoparquet.read_region(paths[name])
        rows += len(data)
        all_h3.append(data.h3)
        if not np.array_equal(np.sort(data.h3), np.sort(stencil_h3)):
            mismatched.append(name)
        if len(data) and data.model_version != version:
            wrong_version.append(name)
        status = np.asarray(data.status.to_pylist(), dtype=object)
        for s in STATUSES:
            counts[s] += int((status == s).sum())
        if not np.array_equal(data.valid, status == STATUS_OK):
            mismatched.append(name)
        ok = data.embedding[data.valid]
        nonfinite += int((~np.isfinite(ok)).any(axis=1).sum())
        if ok.size:
            max_norm_err = max(max_norm_err, float(np.abs(np.linalg.norm(ok.astype(np.float64), axis=1) - 1).max()))
    h3_all = np.concatenate(all_h3) if all_h3 else np.zeros(0, np.uint64)
    duplicates = int(h3_all.shape[0] - np.unique(h3_all).shape[0])
    missing = sorted(set(expected) - present)
    extra = sorted((present - set(expected)) | set(loose))
    out = {
        "regions": len(expected),
        "files": len(present),
        "missing_files": missing,
        "extra_files": extra,
        "stencil_cells": stencil_cells,
        "rows": rows,
        "duplicate_h3": duplicates,
        "files_not_matching_stencil": mismatched,
        "status_counts": counts,
        "nonfinite_ok_embeddings": nonfinite,
        "max_abs_norm_minus_1": max_norm_err,
        "model_version": version,
        "files_with_other_model_version": wrong_version,
    }
    out["ok"] = bool(
        not missing
        and not extra
        and rows == stencil_cells
        and duplicates == 0
        and not mismatched
        and not wrong_version
        and nonfinite == 0
        and max_norm_err < 1e-3
    )
    return out
