"""Probes under spatial-block cross-validation: how well do features predict a held-out label?

Probes (logistic regression or ridge, and k-nearest neighbours, all on standardised features) are scored
under spatial-block cross-validation: a cell's fold is decided by its H3 parent at
``evaluate.fold_resolution``, so a test cell's neighbours are never in training. All methods share the
same cells and folds; scores are the mean and standard deviation over folds.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vectorgeo import h3cells
from vectorgeo.config import SAME_INPUT_BASELINES, EvaluateConfig
from vectorgeo.errors import ConfigError

if TYPE_CHECKING:
    from vectorgeo.labels import TaskSpec

log = logging.getLogger("vectorgeo.evaluate")

TaskKind = Literal["classification", "regression"]

CLASSIFICATION_METRICS: tuple[str, ...] = ("linear_macro_f1", "linear_accuracy", "knn_macro_f1")
REGRESSION_METRICS: tuple[str, ...] = ("linear_r2", "knn_r2")
MAIN_METRIC: dict[str, str] = {"classification": "linear_macro_f1", "regression": "linear_r2"}
"""The metric a task is judged by."""

DEFAULTS = EvaluateConfig()
"""The ``evaluate`` section's defaults (from the config models), the library's defaults too."""


@dataclass
class Labels:
    """Labels of one task at the evaluated cells.

    Attributes:
        y: int64 class ids (classification) or float64 values (regression).
        valid: True where the cell has a label (and, for classification, its
            class has enough cells).
        class_names: Classification: name of each class id.
    """

    y: np.ndarray
    valid: np.ndarray
    class_names: list[str] = field(default_factory=list)


def drop_rare_classes(labels: Labels, min_cells: int) -> Labels:
    """Mark cells of classes with fewer than ``min_cells`` valid cells invalid."""
    if not labels.class_names:
        return labels
    y = np.where(labels.valid, labels.y, 0)
    counts = np.bincount(y[labels.valid], minlength=len(labels.class_names))
    keep = counts >= min_cells
    return Labels(labels.y, labels.valid & keep[y], labels.class_names)


def spatial_folds(h3: np.ndarray, resolution: int, n_folds: int, seed: int) -> np.ndarray:
    """Assign cells to folds by their H3 parent block.

    Blocks (parents at ``resolution``) are shuffled with ``seed`` and cut into
    ``n_folds`` runs of about equal cell count, so every cell of a block lands
    in the same fold.

    Returns:
        int64 fold index (0..n_folds-1) per cell.

    Raises:
        ConfigError: fewer blocks than folds.
    """
    parents = h3cells.parents(h3, resolution)
    blocks, inverse, sizes = np.unique(parents, return_inverse=True, return_counts=True)
    if len(blocks) < n_folds:
        raise ConfigError(
            "evaluate.fold_resolution",
            f"the cells fall in only {len(blocks)} blocks at resolution {resolution}, fewer than "
            f"evaluate.folds ({n_folds}); choose a finer fold_resolution or fewer folds",
        )
    order = np.random.default_rng(seed).permutation(len(blocks))
    start = np.cumsum(sizes[order]) - sizes[order]
    fold_of_ordered = np.minimum((start * n_folds) // max(len(h3), 1), n_folds - 1)
    fold_of_block = np.empty(len(blocks), np.int64)
    fold_of_block[order] = fold_of_ordered
    return fold_of_block[inverse.ravel()]


def selection_blocks(h3: np.ndarray, resolution: int, fraction: float, seed: int) -> np.ndarray:
    """True for cells whose block (H3 parent at ``resolution``) is held out for model selection.

    A block is held out when a hash of its id and ``seed`` falls below ``fraction``: the choice depends on
    the block alone, never on which cells were drawn, so the selection cells and the evaluated cells are
    disjoint in space for any draw.
    """
    if fraction <= 0:
        return np.zeros(len(h3), dtype=bool)
    parents = h3cells.parents(np.asarray(h3, dtype=np.uint64), resolution).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = parents ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
        x = (x ^ (x >> np.uint64(33))) * np.uint64(0xC4CEB9FE1A85EC53)
        x = x ^ (x >> np.uint64(33))
    u = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    out: np.ndarray = u < fraction
    return out


def probe_scores(
    x: np.ndarray,
    y: np.ndarray,
    kind: TaskKind,
    folds: np.ndarray,
    *,
    knn_k: int = DEFAULTS.knn_k,
    logistic_c: float = DEFAULTS.logistic_c,
    logistic_max_iter: int = DEFAULTS.logistic_max_iter,
    ridge_alpha: float = DEFAULTS.ridge_alpha,
    train_fraction: float = 1.0,
    seed: int = DEFAULTS.seed,
    linear_only: bool = False,
) -> dict[str, list[float]]:
    """Scores of the linear and kNN probes on each fold (standardised features).

    A fold is skipped when its training part has a single class or fewer
    cells than ``knn_k``, or its test part is empty.

    Args:
        x: (N, F) features.
        y: Labels.
        kind: classification or regression.
        folds: Fold of each cell.
        knn_k: Neighbours of the kNN probe.
        logistic_c: Inverse regularisation of the logistic probe.
        logistic_max_iter: Its iteration limit.
        ridge_alpha: Penalty of the ridge probe.
        train_fraction: Train on this fraction of each training part (drawn with ``seed``; the same cells
            for every method), score on the whole test fold.
        seed: Seed of that draw.
        linear_only: Fit the linear probe only.

    Returns:
        metric -> one score per scored fold.
    """
    from threadpoolctl import threadpool_limits

    scores: dict[str, list[float]] = {}
    x = np.asarray(x, dtype=np.float64)
    # One BLAS/OpenMP thread: the problems are small, and multi-threaded BLAS on a loaded machine
    # waits for descheduled threads (logistic regression measured 60x slower on 2 busy cores).
    with threadpool_limits(limits=1):
        for f in np.unique(folds):
            test = folds == f
            train = ~test
            if train_fraction < 1.0:
                rng = np.random.default_rng([seed, int(f)])
                idx = np.flatnonzero(train)
                keep = rng.permutation(len(idx))[: max(1, round(train_fraction * len(idx)))]
                train = np.zeros_like(train)
                train[idx[keep]] = True
            got = _score_fold(
                x, y, kind, test, knn_k, logistic_c, logistic_max_iter, ridge_alpha, train=train, knn=not linear_only
            )
            for k, v in got.items():
                scores.setdefault(k, []).append(v)
    return scores


def _score_fold(
    x: np.ndarray,
    y: np.ndarray,
    kind: TaskKind,
    test: np.ndarray,
    knn_k: int = DEFAULTS.knn_k,
    logistic_c: float = DEFAULTS.logistic_c,
    logistic_max_iter: int = DEFAULTS.logistic_max_iter,
    ridge_alpha: float = DEFAULTS.ridge_alpha,
    *,
    train: np.ndarray | None = None,
    knn: bool = True,
) -> dict[str, float]:
    """Fit the probes on ``train`` (default: the cells outside ``test``) and score them on ``test``.

    Returns {} when the fold is not scorable; only the linear metric when ``knn`` is False.
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import accuracy_score, f1_score, r2_score
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    train = ~test if train is None else train
    if test.sum() == 0 or train.sum() < knn_k:
        return {}
    if kind == "classification" and len(np.unique(y[train])) < 2:
        return {}
    scaler = StandardScaler().fit(x[train])
    xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
    ytr, yte = y[train], y[test]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and ill-conditioning notes, kept out of logs
        if kind == "classification":
            pred = LogisticRegression(C=logistic_c, max_iter=logistic_max_iter).fit(xtr, ytr).predict(xte)
            if not knn:
                return {"linear_macro_f1": float(f1_score(yte, pred, average="macro", zero_division=0))}
            knn_pred = KNeighborsClassifier(n_neighbors=knn_k).fit(xtr, ytr).predict(xte)
            return {
                "linear_macro_f1": float(f1_score(yte, pred, average="macro", zero_division=0)),
                "linear_accuracy": float(accuracy_score(yte, pred)),
                "knn_macro_f1": float(f1_score(yte, knn_pred, average="macro", zero_division=0)),
            }
        pred = Ridge(alpha=ridge_alpha).fit(xtr, ytr).predict(xte)
        if not knn:
            return {"linear_r2": float(r2_score(yte, pred))}
        knn_pred = KNeighborsRegressor(n_neighbors=knn_k).fit(xtr, ytr).predict(xte)
        return {"linear_r2": float(r2_score(yte, pred)), "knn_r2": float(r2_score(yte, knn_pred))}


def summarise(scores: Mapping[str, Sequence[float]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Mean, (population) standard deviation and the per-fold scores; None where no fold was scored."""
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        v = np.asarray(scores.get(m, []), dtype=np.float64)
        out[m] = {
            "mean": float(v.mean()) if len(v) else None,
            "std": float(v.std()) if len(v) else None,
            "folds": [float(x) for x in v],
        }
    return out


@dataclass
class TaskResult:
    """What the report needs beyond metrics.json for one task."""

    n_cells: int
    n_classes: int
    n_folds_scored: int
    class_names: list[str] = field(default_factory=list)


def _job(
    x: np.ndarray, y: np.ndarray, kind: TaskKind, folds: np.ndarray, params: EvaluateConfig, fraction: float
) -> dict[str, list[float]]:
    return probe_scores(
        x,
        y,
        kind,
        folds,
        knn_k=params.knn_k,
        logistic_c=params.logistic_c,
        logistic_max_iter=params.logistic_max_iter,
        ridge_alpha=params.ridge_alpha,
        train_fraction=fraction,
        seed=params.seed,
        linear_only=fraction < 1.0,
    )


def task_methods(location: bool, methods: Sequence[str]) -> list[str]:
    """The methods scored on a task: ``<method>+latlng`` only on location tasks, where they are the comparison.

    A location task is scored with embedding, latlng and the ``+latlng`` methods; a content task with every
    method that is not a ``+latlng`` one (position is no part of what such a task asks of the content).
    """
    if location:
        return [m for m in methods if m in ("embedding", "latlng") or m.endswith("+latlng")]
    return [m for m in methods if not m.endswith("+latlng")]


def comparison_set(method: str, location: bool, methods: Sequence[str]) -> tuple[str, list[str]]:
    """The method that stands for the embedding on a task, and the baselines it is compared with.

    Content tasks: ``embedding`` against every same-input baseline present. Location tasks:
    ``embedding+latlng`` against ``latlng`` and every ``<baseline>+latlng`` present.
    """
    if location:
        rivals = ["latlng", *(f"{b}+latlng" for b in SAME_INPUT_BASELINES)]
        return f"{method}+latlng", [m for m in rivals if m in methods]
    return method, [m for m in SAME_INPUT_BASELINES if m in methods]


def paired_differences(scores: Mapping[str, Any], main: str, ours: str, rivals: Sequence[str]) -> dict[str, Any]:
    """Per-fold differences ``ours - best rival`` (best by mean) on the main metric, and the folds won."""
    if ours not in scores:
        return {}
    scored = [r for r in rivals if r in scores and scores[r][main]["mean"] is not None]
    if not scored:
        return {}
    best = max(scored, key=lambda r: scores[r][main]["mean"])
    a = np.asarray(scores[ours][main]["folds"], dtype=np.float64)
    b = np.asarray(scores[best][main]["folds"], dtype=np.float64)
    if len(a) != len(b):
        return {}
    d = a - b
    wins = {
        r: int(np.sum(a > np.asarray(scores[r][main]["folds"]))) for r in scored
    }  # folds where ours beats each rival
    return {
        "method": ours,
        "best_baseline": best,
        "diffs": [float(v) for v in d],
        "mean_diff": float(d.mean()) if len(d) else None,
        "folds_won": wins,
        "folds": len(d),
    }


def evaluate_features(
    features: Mapping[str, np.ndarray],
    h3: np.ndarray,
    tasks: Mapping[str, TaskSpec],
    labels: Mapping[str, Labels],
    params: EvaluateConfig,
    n_jobs: int = 1,
) -> tuple[dict[str, Any], dict[str, TaskResult]]:
    """Score every method on every task, on the same cells and folds.

    Besides each method's scores (mean, std and per-fold), every task gets ``paired`` (per-fold
    differences of the embedding, or embedding+latlng on a location task, against the best baseline) and
    ``label_efficiency`` (the main metric of the linear probe trained on each of
    ``params.label_fractions`` of every training fold).

    Args:
        features: method -> (N, F) features of the N evaluated cells.
        h3: The cells' ids (for the spatial folds).
        tasks: The tasks.
        labels: task -> labels at the N cells.
        params: Probe hyperparameters, folds and seed.
        n_jobs: Probes fitted in parallel processes.

    Returns:
        (metrics, details): ``metrics`` in the metrics.json layout;
        ``details`` per task (cell and class counts).
    """
    from joblib import Parallel, delayed

    folds_all = spatial_folds(h3, params.fold_resolution, params.folds, params.seed)
    out: dict[str, Any] = {"tasks": {}, "n_cells": len(h3), "folds": params.folds}
    details: dict[str, TaskResult] = {}
    prepared: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]] = {}
    for name, task in tasks.items():
        lab = labels[name]
        if task.kind == "classification":
            lab = drop_rare_classes(lab, task.min_class_cells)
        idx = np.flatnonzero(lab.valid)
        prepared[name] = (idx, lab.y[idx], folds_all[idx], lab.class_names)
    methods = [m for m in params.methods if m in features]
    fractions = sorted({float(f) for f in params.label_fractions} | {1.0})
    by_task = {t: task_methods(task.location, methods) for t, task in tasks.items()}
    jobs = [(t, m, f) for t in tasks for f in fractions for m in by_task[t]]
    results = Parallel(n_jobs=n_jobs, backend="loky" if n_jobs > 1 else "sequential")(
        delayed(_job)(features[m][prepared[t][0]], prepared[t][1], tasks[t].kind, prepared[t][2], params, f)
        for t, m, f in jobs
    )
    by_job = dict(zip(jobs, results, strict=True))
    for name, task in tasks.items():
        idx, y, _, class_names = prepared[name]
        main = task.main_metric
        per_method = {m: summarise(by_job[(name, m, 1.0)], task.metrics) for m in by_task[name]}
        for m in by_task[name]:
            log.info("task %s method %s: %s", name, m, {k: v["mean"] for k, v in per_method[m].items()})
        ours, rivals = comparison_set("embedding", task.location, by_task[name])
        curve = {str(f): {m: summarise(by_job[(name, m, f)], [main])[main] for m in by_task[name]} for f in fractions}
        margins = {}
        for f, per in curve.items():
            scored = [r for r in rivals if per[r]["mean"] is not None]
            if ours in per and per[ours]["mean"] is not None and scored:
                best = max(scored, key=lambda r: per[r]["mean"])
                margins[f] = {"best_baseline": best, "margin": per[ours]["mean"] - per[best]["mean"]}
        out["tasks"][name] = {
            "kind": task.kind,
            "location": task.location,
            "n_cells": len(idx),
            "methods": per_method,
            "paired": paired_differences(per_method, main, ours, rivals),
            "label_efficiency": {"method": ours, "scores": curve, "margins": margins},
        }
        details[name] = TaskResult(
            n_cells=len(idx),
            n_classes=len(np.unique(y)) if task.kind == "classification" else 0,
            n_folds_scored=len(by_job[(name, by_task[name][0], 1.0)].get(main, [])) if by_task[name] else 0,
            class_names=class_names,
        )
    return out, details
