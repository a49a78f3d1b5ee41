"""Evaluation: do the embeddings beat cheap baselines on held-out labels?

Every *task* is a label looked up at cell centroids from real data that is not
a model input (config ``evaluate.tasks``): a raster (a ``builtin:`` dataset or
a GeoTIFF, prepared like a layer) or a vector file (polygons with a label
attribute, e.g. Natural Earth countries). Every *method* turns a cell into a
feature vector:

* ``embedding`` -- the cell's vector from the region GeoParquet files;
* the baselines of :mod:`vectorgeo.features`: ``random_init``,
  ``class_histogram``, ``context_histogram``, ``pca_raw``, ``random_features``
  (computed from the same patches the model sees) and ``latlng``;
* ``<method>+latlng`` -- any method's features beside the latlng vector.

Cells in the *selection blocks* (``evaluate.selection_fraction`` of the fold
blocks, chosen by a hash of the block id) are never evaluated here: they are
kept for choosing variants and hyperparameters
(``benchmarks/eval_experiments.py``), so the reported scores are on blocks no
choice was made on.

Probes (logistic regression or ridge, and k-nearest neighbours, all on
standardised features) are scored under spatial-block cross-validation: a
cell's fold is decided by its H3 parent at ``evaluate.fold_resolution``, so a
test cell's neighbours are never in training. All methods share the same cells
and folds; scores are the mean and standard deviation over folds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vectorgeo import atomic
from vectorgeo.config import EvaluateConfig
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.features import latlng_features, patch_features, pca_rgb, random_init_embed_fn, with_latlng
from vectorgeo.labels import TaskSpec, task_labels
from vectorgeo.layers import Layer, LayerSpec
from vectorgeo.probes import (
    MAIN_METRIC,
    comparison_set,
    evaluate_features,
    selection_blocks,
)

log = logging.getLogger("vectorgeo.evaluate")


# --------------------------------------------------------------------------- cells


@dataclass
class Cells:
    """Cells drawn for evaluation, in random order (any prefix is a uniform sample).

    Attributes:
        h3: uint64 cell ids.
        lat: Centroid latitudes.
        lng: Centroid longitudes.
        embedding: float32 (N, d) embeddings.
        model_version: The model version of the embedding files.
        n_ok: Cells with a usable embedding in all files.
    """

    h3: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    embedding: np.ndarray
    model_version: str
    n_ok: int

    def head(self, n: int) -> Cells:
        """The first ``n`` cells."""
        return Cells(self.h3[:n], self.lat[:n], self.lng[:n], self.embedding[:n], self.model_version, self.n_ok)

    def __len__(self) -> int:
        return len(self.h3)


_EMBEDDING_COLUMNS = ("h3", "lat", "lng", "embedding", "status", "model_version")


def read_cells(paths: Sequence[str | Path], n: int, seed: int) -> Cells:
    """Draw ``n`` cells with a usable embedding, uniformly from all region files.

    Two passes with bounded memory: the ``status`` columns first, then only the
    drawn rows of each file. The draw is a random permutation (fixed ``seed``),
    so any prefix of the result is itself a uniform sample.

    Raises:
        DataError: a file is missing columns, unreadable, or the files disagree
            on the model version or embedding dimension.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in paths)
    if not files:
        raise DataError("evaluate", "no embedding files to evaluate")
    ok_rows: list[np.ndarray] = []
    for p in files:
        try:
            schema = pq.read_schema(p)
            missing = [c for c in _EMBEDDING_COLUMNS if c not in schema.names]
            if missing:
                raise DataError(p, f"missing columns {missing}; expected {list(_EMBEDDING_COLUMNS)}")
            status = pq.read_table(p, columns=["status"]).column("status")
        except (OSError, ValueError) as e:
            raise DataError(p, f"cannot be read as Parquet: {e}") from None
        ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
        ok_rows.append(np.flatnonzero(ok))
    counts = np.array([len(r) for r in ok_rows])
    total = int(counts.sum())
    if total == 0:
        raise DataError(files[0], "no cell with status 'ok' in any embedding file")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(total)[: min(n, total)]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    file_of = np.searchsorted(offsets, pick, side="right") - 1
    k = len(pick)
    h3 = np.zeros(k, np.uint64)
    lat = np.zeros(k)
    lng = np.zeros(k)
    emb: np.ndarray | None = None
    version: str | None = None
    for fi, p in enumerate(files):
        pos = np.flatnonzero(file_of == fi)
        if not len(pos):
            continue
        rows = ok_rows[fi][pick[pos] - offsets[fi]]
        t = pq.read_table(p, columns=["h3", "lat", "lng", "embedding", "model_version"]).take(rows)
        h3[pos] = t.column("h3").to_numpy().astype(np.uint64)
        lat[pos] = t.column("lat").to_numpy()
        lng[pos] = t.column("lng").to_numpy()
        col = t.column("embedding").combine_chunks()
        d = col.type.list_size if hasattr(col.type, "list_size") else None
        if d is None:
            raise DataError(p, f"column 'embedding' is {col.type}; expected fixed_size_list<float32>")
        if col.null_count:
            raise DataError(p, f"{col.null_count} rows have status 'ok' but a null embedding")
        vals = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
        if emb is None:
            emb = np.zeros((k, d), np.float32)
        elif emb.shape[1] != d:
            raise DataError(p, f"embedding dimension {d} differs from the other files ({emb.shape[1]})")
        emb[pos] = vals
        versions = set(t.column("model_version").to_pylist())
        if len(versions) != 1 or (version is not None and versions != {version}):
            raise DataError(p, f"model_version {sorted(map(str, versions))} differs from the other files ({version})")
        version = str(next(iter(versions)))
    assert emb is not None and version is not None
    if not np.isfinite(emb).all():
        raise DataError(files[0], "an embedding with status 'ok' is not finite")
    return Cells(h3, lat, lng, emb, version, total)


# --------------------------------------------------------------------------- goal and notes


def goal_check(metrics: Mapping[str, Any], min_folds: int | None = None) -> dict[str, Any]:
    """The acceptance goal on the main metric of each task.

    * Content tasks: ``embedding`` beats every same-input baseline present (class_histogram,
      context_histogram, pca_raw, random_init, random_features) on the mean over folds and on at least
      ``min_folds`` folds (default: all but one).
    * Location tasks: ``embedding+latlng`` beats latlng and every ``<baseline>+latlng`` on the mean.
    * Label efficiency: on every content task, the embedding's margin over the best baseline at the
      smallest label fraction is larger than at the full training folds.

    Returns:
        {"beats": {baseline: {task: bool}}, "label_efficiency": {task: bool}, "passed": bool}.
    """
    beats: dict[str, dict[str, bool]] = {}
    efficiency: dict[str, bool] = {}
    for task, t in metrics["tasks"].items():
        main = MAIN_METRIC[t["kind"]]
        ms = t["methods"]
        location = bool(t.get("location"))
        ours, rivals = comparison_set("embedding", location, list(ms))
        if ours not in ms:
            continue
        e = ms[ours][main]
        need = min_folds if min_folds is not None else max(len(e["folds"]) - 1, 1)
        for base in rivals:
            b = ms[base][main]
            won_mean = e["mean"] is not None and (b["mean"] is None or bool(e["mean"] > b["mean"]))
            won_folds = location or sum(x > y for x, y in zip(e["folds"], b["folds"], strict=False)) >= need
            beats.setdefault(base, {})[task] = bool(won_mean and won_folds)
        margins = (t.get("label_efficiency") or {}).get("margins") or {}
        if not location and len(margins) >= 2:
            fr = sorted(margins, key=float)
            efficiency[task] = bool(margins[fr[0]]["margin"] > margins[fr[-1]]["margin"])
    passed = bool(beats) and all(all(v.values()) for v in beats.values()) and all(efficiency.values())
    return {"beats": beats, "label_efficiency": efficiency, "passed": passed}


def elevation_note(tasks: Mapping[str, TaskSpec], model_layers: Mapping[str, LayerSpec]) -> list[str]:
    """Say, for each regression task, whether the model sees the same quantity as an input.

    A regression task whose source is also a continuous model layer is held out
    only when that layer is normalised per patch (min-max: relief, not level).
    """
    notes = []
    for t in tasks.values():
        if t.kind != "regression":
            continue
        same = [s for s in model_layers.values() if s.kind == "continuous" and s.source == t.source]
        if not same:
            notes.append(f"Task '{t.name}': its source ({t.source}) is not a model input layer; it is held out.")
            continue
        for s in same:
            if s.normalize == "both":
                notes.append(
                    f"Task '{t.name}': the model input layer '{s.name}' comes from the same source, as relief and "
                    "as globally standardised level, so the model sees absolute values; so do the baselines "
                    "(class_histogram and context_histogram carry the patch means). The task measures how well "
                    "each method keeps that input in a linearly readable form."
                )
            elif s.normalize == "patch_minmax":
                notes.append(
                    f"Task '{t.name}': the model input layer '{s.name}' comes from the same source but is "
                    "normalised per patch (min-max), so the model sees only relief, never absolute level: "
                    "the task is held out. The class_histogram baseline does see the patch mean, so it "
                    "is expected to win this task."
                )
            else:
                notes.append(
                    f"Task '{t.name}': the model input layer '{s.name}' comes from the same source and is "
                    f"globally standardised ({s.normalize}), so the model sees absolute values: this task "
                    "is NOT held out and measures how well the model keeps its input."
                )
    return notes


def method_notes(tasks: Mapping[str, TaskSpec], params: EvaluateConfig) -> list[str]:
    """How to read the scores: what the baselines see, and what spatial blocking does to rare classes."""
    notes = []
    if "pca_raw" in params.methods:
        notes.append(
            f"pca_raw is fitted without labels on {params.pca_fit_cells} of the evaluated cells (all folds), "
            "as the model is trained without labels on cells from everywhere."
        )
    for t in tasks.values():
        if t.type == "vector":
            notes.append(
                f"Task '{t.name}': labels from polygons ({t.source}, attribute {t.field}); classes with fewer "
                f"than {t.min_class_cells} evaluated cells are dropped. Under spatial blocks a class whose cells "
                "all fall in the test blocks is never seen in training and scores F1 = 0 for every method alike, "
                "which keeps macro-F1 low; compare methods, not absolute values."
            )
    if "latlng" in params.methods:
        notes.append(
            "latlng with kNN can interpolate labels across block borders from nearby training cells; "
            "the linear probe on latlng cannot, so it is a weak baseline for the main metric."
        )
    return notes


# --------------------------------------------------------------------------- run


def training_seed(metadata: Mapping[str, Any], default: int) -> int:
    """The seed training initialised the model with (``metadata['train']['seed']``), else ``default``."""
    seed = (metadata.get("train") or {}).get("seed", default)
    return int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else default


def baseline_features(
    lat: np.ndarray,
    lng: np.ndarray,
    layers: Mapping[str, Layer],
    meta: Mapping[str, Any],
    params: EvaluateConfig,
) -> dict[str, np.ndarray]:
    """Every baseline's features at the cells (and ``<method>+latlng`` needs no model: see :func:`all_features`).

    The patch-based baselines see exactly the patches the model sees (its ``patch_px``, ``patch_km`` and
    ``scales``); context_histogram gathers its own patches at ``params.context_scales``.
    """
    from vectorgeo import model as vg_model
    from vectorgeo import sampling

    specs = vg_model.specs_of(meta)
    patch_px, patch_km = int(meta["patch_px"]), float(meta["patch_km"] or 0.0)
    scales = [float(x) for x in meta.get("scales") or [1.0]]
    base = {m.split("+")[0] for m in params.methods}
    out: dict[str, np.ndarray] = {}
    if "latlng" in base or any(m.endswith("+latlng") for m in params.methods):
        out["latlng"] = latlng_features(lat, lng)
    seed = training_seed(meta, params.seed)
    out.update(
        patch_features(
            lat,
            lng,
            lambda la, ln: sampling.patches(layers, la, ln, patch_px, patch_km, scales),
            specs,
            base,
            encode_fn=lambda b: vg_model.encode(b, meta).numpy(),
            embed_fn=random_init_embed_fn(meta, seed) if "random_init" in base else None,
            context_fn=lambda la, ln: sampling.patches(
                layers,
                la,
                ln,
                params.context_px,
                patch_km * params.context_scales[0],
                [x / params.context_scales[0] for x in params.context_scales],
            ),
            context_scales=len(params.context_scales),
            pca_dim=int(meta.get("embedding_dim") or 0) or 16,
            pca_fit_cells=params.pca_fit_cells,
            random_features=params.random_features,
            batch_size=params.batch_size,
            seed=params.seed,
        )
    )
    return out


def all_features(
    embedding: np.ndarray, baselines: Mapping[str, np.ndarray], lat: np.ndarray, lng: np.ndarray, methods: Sequence[str]
) -> dict[str, np.ndarray]:
    """The features of every method in ``methods``: the embedding, the baselines and their ``+latlng`` forms."""
    base = {"embedding": embedding, **baselines}
    every = {**base, **with_latlng(base, lat, lng)}
    return {m: every[m] for m in methods if m in every}


def evaluation_cells(cells: Cells, params: EvaluateConfig) -> Cells:
    """The cells that are evaluated: outside the selection blocks, the first ``max_cells`` of the draw."""
    keep = ~selection_blocks(cells.h3, params.fold_resolution, params.selection_fraction, params.seed)
    idx = np.flatnonzero(keep)[: params.max_cells]
    return Cells(cells.h3[idx], cells.lat[idx], cells.lng[idx], cells.embedding[idx], cells.model_version, cells.n_ok)


def run_evaluation(
    embedding_paths: Sequence[str | Path],
    model_path: str | Path,
    layer_paths: Mapping[str, str | Path],
    tasks: Mapping[str, TaskSpec],
    label_paths: Mapping[str, str | Path],
    params: EvaluateConfig,
    out_metrics: str | Path,
    out_report: str | Path,
    model_metrics_path: str | Path | None = None,
    n_jobs: int = 1,
) -> dict[str, Any]:
    """Evaluate the embeddings against the baselines; write metrics.json and report.html.

    Args:
        embedding_paths: Region GeoParquet files.
        model_path: The model file the embeddings were made with.
        layer_paths: Layer name -> prepared ``.npy`` (every model input layer).
        tasks: The tasks.
        label_paths: Task name -> prepared raster ``.npy`` or vector file.
        params: Hyperparameters.
        out_metrics: Destination of metrics.json.
        out_report: Destination of report.html.
        model_metrics_path: The training metrics.json (curves in the report), optional.
        n_jobs: Probes fitted in parallel processes.

    Returns:
        The metrics (as written).

    Raises:
        DataError: the embeddings were made by another model, or inputs are malformed.
        ConfigError: a model layer or task label has no prepared file.
    """
    import torch

    from vectorgeo import model as vg_model
    from vectorgeo.objectives import effective_rank
    from vectorgeo.report import write_report

    cells = read_cells(embedding_paths, max(params.max_cells, params.map_cells), params.seed)
    ev = evaluation_cells(cells, params)
    log.info(
        "read %d cells (%d usable in all files); evaluating %d outside the selection blocks",
        len(cells),
        cells.n_ok,
        len(ev),
    )
    _, meta = vg_model.load(model_path)
    if meta["model_version"] != cells.model_version:
        raise DataError(
            str(model_path),
            f"model_version {meta['model_version']} differs from that of the embeddings ({cells.model_version})",
        )
    specs = vg_model.specs_of(meta)
    missing = [n for n in specs if n not in layer_paths]
    if missing:
        raise ConfigError("layers", f"the model's input layers {missing} have no prepared file")
    layers = {n: Layer.open(s, layer_paths[n]) for n, s in specs.items()}
    dim = int(meta.get("embedding_dim") or ev.embedding.shape[1])
    baselines = baseline_features(ev.lat, ev.lng, layers, meta, params)
    features = all_features(ev.embedding, baselines, ev.lat, ev.lng, params.methods)
    log.info("features: %s", {m: f.shape for m, f in features.items()})
    missing_tasks = [t for t in tasks if t not in label_paths]
    if missing_tasks:
        raise ConfigError("evaluate.tasks", f"tasks {missing_tasks} have no label file")
    labels = {n: task_labels(t, label_paths[n], ev.lat, ev.lng) for n, t in tasks.items()}
    metrics, details = evaluate_features(features, ev.h3, tasks, labels, params, n_jobs=n_jobs)
    metrics["embedding_dim"] = dim
    metrics["effective_rank"] = round(effective_rank(torch.from_numpy(ev.embedding)), 2)
    metrics["goal"] = goal_check(metrics)
    atomic.write_json_atomic(out_metrics, metrics, allow_nan=False)
    training = None
    if model_metrics_path is not None and Path(model_metrics_path).exists():
        with open(model_metrics_path) as f:
            training = json.load(f)
    notes = elevation_note(tasks, specs) + method_notes(tasks, params)
    write_report(
        out_report,
        metrics,
        details={n: vars(d) for n, d in details.items()},
        goal=metrics["goal"],
        map_lat=cells.lat,
        map_lng=cells.lng,
        map_rgb=pca_rgb(cells.embedding, params.seed),
        training=training,
        notes=notes,
        info={
            "model_version": cells.model_version,
            "cells_with_embedding": cells.n_ok,
            "cells_evaluated": len(ev),
            "cells_on_map": len(cells),
            "embedding_dim": dim,
            "effective_rank": metrics["effective_rank"],
            "patch_px": int(meta["patch_px"]),
            "patch_km": float(meta["patch_km"] or 0.0),
            "scales": meta.get("scales") or [1.0],
            "fold_resolution": params.fold_resolution,
            "params": params.model_dump(mode="json", exclude={"tasks"}),
            "tasks": {n: t.to_dict() for n, t in tasks.items()},
        },
    )
    return metrics
