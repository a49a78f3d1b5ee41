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
from vectorgeo.config import EvaluateConfig
from vectorgeo.errors import ConfigError

if TYPE_CHECKING:
    from vectorgeo.evaluate import TaskSpec

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
) -> dict[str, list[float]]:
    """Scores of the linear and kNN probes on each fold (standardised features).

    A fold is skipped when its training part has a single class or fewer
    cells than ``knn_k``, or its test part is empty.

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
            got = _score_fold(x, y, kind, folds == f, knn_k, logistic_c, logistic_max_iter, ridge_alpha)
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
) -> dict[str, float]:
    """Fit the probes on the cells outside ``test`` and score them on ``test`` ({} if not scorable)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import accuracy_score, f1_score, r2_score
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    train = ~test
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
            knn_pred = KNeighborsClassifier(n_neighbors=knn_k).fit(xtr, ytr).predict(xte)
            return {
                "linear_macro_f1": float(f1_score(yte, pred, average="macro", zero_division=0)),
                "linear_accuracy": float(accuracy_score(yte, pred)),
                "knn_macro_f1": float(f1_score(yte, knn_pred, average="macro", zero_division=0)),
            }
        pred = Ridge(alpha=ridge_alpha).fit(xtr, ytr).predict(xte)
        knn_pred = KNeighborsRegressor(n_neighbors=knn_k).fit(xtr, ytr).predict(xte)
        return {"linear_r2": float(r2_score(yte, pred)), "knn_r2": float(r2_score(yte, knn_pred))}


def summarise(scores: Mapping[str, Sequence[float]], metrics: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Mean and (population) standard deviation over folds; None where no fold was scored."""
    out: dict[str, dict[str, float | None]] = {}
    for m in metrics:
        v = np.asarray(scores.get(m, []), dtype=np.float64)
        out[m] = {
            "mean": float(v.mean()) if len(v) else None,
            "std": float(v.std()) if len(v) else None,
        }
    return out


@dataclass
class TaskResult:
    """What the report needs beyond metrics.json for one task."""

    n_cells: int
    n_classes: int
    n_folds_scored: int
    class_names: list[str] = field(default_factory=list)


def evaluate_features(
    features: Mapping[str, np.ndarray],
    h3: np.ndarray,
    tasks: Mapping[str, TaskSpec],
    labels: Mapping[str, Labels],
    params: EvaluateConfig,
) -> tuple[dict[str, Any], dict[str, TaskResult]]:
    """Score every method on every task, on the same cells and folds.

    Args:
        features: method -> (N, F) features of the N evaluated cells.
        h3: The cells' ids (for the spatial folds).
        tasks: The tasks.
        labels: task -> labels at the N cells.
        params: Probe hyperparameters, folds and seed.

    Returns:
        (metrics, details): ``metrics`` in the metrics.json layout;
        ``details`` per task (cell and class counts).
    """
    folds_all = spatial_folds(h3, params.fold_resolution, params.folds, params.seed)
    out: dict[str, Any] = {"tasks": {}, "n_cells": len(h3), "folds": params.folds}
    details: dict[str, TaskResult] = {}
    for name, task in tasks.items():
        lab = labels[name]
        if task.kind == "classification":
            lab = drop_rare_classes(lab, task.min_class_cells)
        idx = np.flatnonzero(lab.valid)
        y = lab.y[idx]
        folds = folds_all[idx]
        methods: dict[str, Any] = {}
        n_scored = 0
        for m in params.methods:
            if m not in features:
                continue
            sc = probe_scores(
                features[m][idx],
                y,
                task.kind,
                folds,
                knn_k=params.knn_k,
                logistic_c=params.logistic_c,
                logistic_max_iter=params.logistic_max_iter,
                ridge_alpha=params.ridge_alpha,
            )
            methods[m] = summarise(sc, task.metrics)
            n_scored = len(sc.get(task.main_metric, []))
            log.info("task %s method %s: %s", name, m, {k: round(v["mean"], 4) for k, v in methods[m].items()})
        out["tasks"][name] = {"kind": task.kind, "methods": methods}
        details[name] = TaskResult(
            n_cells=len(idx),
            n_classes=len(np.unique(y)) if task.kind == "classification" else 0,
            n_folds_scored=n_scored,
            class_names=lab.class_names,
        )
    return out, details
