"""Scores of every loaded cell for a search by example: similarity to the examples, or a few-shot classifier.

Both modes score all :math:`n` cells of a :class:`~vectorgeo.store.vectors.CellVectors` with one
matrix–vector product over its in-memory ``(n, d)`` float32 matrix :math:`E` (unit rows :math:`e_i`).

``similar`` (Rocchio's query update): with :math:`\\hat{x}` the unit vector along :math:`x`,

.. math:: q = \\widehat{\\hat p - \\beta \\hat m}, \\quad p = \\bar e_P, \\quad m = \\bar e_N,

(:math:`\\bar e_P, \\bar e_N` the mean embeddings of the positives and negatives, :math:`\\beta` =
:data:`NEGATIVE_WEIGHT`; :math:`q = \\hat p` without negatives) and the raw score is the
cosine :math:`s_i = e_i \\cdot q`. Raw cosines of embeddings crowd near 1, so the readable score is the
percentile: :math:`r(s) = |\\{j : s_j < s\\}| / (n - 1)`, 0 for the least similar cell and 1 for the
most similar (tied cells share the lower rank), given in answers in percent (100 = the most similar).
It is looked up in the sorted scores when needed (:func:`ranks_in`), never computed for every cell.

``classify``: an L2-regularised logistic regression :math:`P(y = 1 \\mid e) = \\sigma(w \\cdot e + b)`
fitted by Newton's method on the positives (:math:`y = 1`), the negatives and a background sample of
loaded cells (:math:`y = 0`; :func:`background_sample`), with class-balanced weights: the positives weigh
1/2 in all, the negatives 1/2 (the explicit ones half of that when there are any, the background the
rest). Features are standardised by the background's mean and spread, so that the penalty
:math:`\\tfrac{\\lambda}{2}\\lVert w \\rVert^2` (:data:`L2`) treats each dimension alike. The raw score is
the logit, the readable score the probability: the chance of the positive class under equal priors, a
probability a person can read, not the frequency of the class in the world.

Rollups (a parent cell at low zooms): ``similar``: the percentile, among the cells, of the mean raw score
of the parent's children; ``classify``: the mean probability of the children.

Cost for :math:`n` cells of dimension :math:`d`: the product reads :math:`4 n d` bytes (memory bound; it
runs in numpy's own loop, :func:`matvec`), ``similar`` sorts :math:`n` floats once (:math:`O(n \\log n)`,
a radix-like sort that takes tens of milliseconds at 4M), top-k and rollups are :math:`O(n)`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vectorgeo.errors import RequestError
from vectorgeo.store.vectors import CellVectors

NEGATIVE_WEIGHT = 0.5
L2 = 0.1
BACKGROUND_MIN = 200
BACKGROUND_PER_EXAMPLE = 20
NEWTON_STEPS = 50
KINDS = {"similar": "percentile", "classify": "probability"}
SCALES = {"percentile": 100.0, "probability": 1.0}


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to unit length (float64); zeros stay zeros."""
    v = np.asarray(v, dtype=np.float64)
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def similar_vector(positives: np.ndarray, negatives: np.ndarray, beta: float = NEGATIVE_WEIGHT) -> np.ndarray:
    """The query vector :math:`q` of ``similar`` (module docstring) from example embeddings (rows).

    Raises:
        RequestError: the positives cancel out, or equal the negatives (``positives``).
    """
    q = unit(positives.mean(axis=0))
    if negatives.shape[0]:
        q = q - beta * unit(negatives.mean(axis=0))
    if float(np.linalg.norm(q)) < 1e-6:
        raise RequestError("positives", "the examples cancel out (the positives equal the negatives); change them")
    return unit(q)


def matvec(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``matrix @ vector`` in float32 through numpy's own SIMD loop (:func:`numpy.einsum`), not BLAS.

    A threaded BLAS is no faster here (the product is memory bound) and its threads contend when
    several requests score at once; einsum runs in the request's own thread.
    """
    out: np.ndarray = np.einsum("ij,j->i", matrix, np.asarray(vector, dtype=matrix.dtype))
    return out


def ranks_in(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How many of ``sorted_values`` are strictly below each ``x`` (int64); ``x`` is looked up in sorted
    order, so the binary searches walk the array forwards (many times faster than random look-ups)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    out = np.empty(x.shape[0], dtype=np.int64)
    out[order] = np.searchsorted(sorted_values, x[order], side="left")
    return out


def percentiles(raw: np.ndarray) -> np.ndarray:
    """Percentile ranks in [0, 1] (float32) of every value: the fraction of the others strictly lower."""
    n = raw.shape[0]
    out: np.ndarray = (ranks_in(np.sort(raw), raw) / max(n - 1, 1)).astype(np.float32)
    return out


def background_sample(n: int, exclude: np.ndarray, seed: int) -> np.ndarray:
    """Rows of background cells for ``classify``: a seeded uniform sample of the loaded cells, not the examples.

    Size: ``max(BACKGROUND_MIN, BACKGROUND_PER_EXAMPLE * examples)``, at most the cells left.
    """
    size = min(max(BACKGROUND_MIN, BACKGROUND_PER_EXAMPLE * exclude.size), n - np.unique(exclude).size)
    if size <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    picked = rng.choice(n, size=min(n, size + exclude.size), replace=False)
    picked = picked[~np.isin(picked, exclude)][:size]
    return np.sort(picked).astype(np.int64)


def fit_logistic(
    x: np.ndarray, y: np.ndarray, weight: np.ndarray, l2: float = L2, steps: int = NEWTON_STEPS
) -> tuple[np.ndarray, float]:
    """Weighted L2-regularised logistic regression by Newton's method (the intercept is not penalised).

    Minimises :math:`\\sum_i w_i [\\log(1 + e^{z_i}) - y_i z_i] + \\tfrac{\\lambda}{2} \\lVert w \\rVert^2`,
    :math:`z = X w + b`.

    Args:
        x: Features (m, d).
        y: Labels 0/1 (m,).
        weight: Sample weights (m,).
        l2: The penalty :math:`\\lambda`.
        steps: Most Newton steps (it stops when the step is below 1e-8).

    Returns:
        ``(w (d,), b)``.
    """
    m, d = x.shape
    xa = np.hstack([x, np.ones((m, 1))])
    beta = np.zeros(d + 1)
    reg = np.full(d + 1, l2)
    reg[-1] = 1e-9
    # einsum, not BLAS: on matrices this small a threaded BLAS spends more time waking its threads than
    # computing (tens of milliseconds a product on a busy machine, against about one)
    for _ in range(steps):
        z = np.clip(np.einsum("ij,j->i", xa, beta), -40, 40)
        p = 1.0 / (1.0 + np.exp(-z))
        grad = np.einsum("ij,i->j", xa, weight * (p - y)) + reg * beta
        hess = np.einsum("ij,ik->jk", xa * (weight * p * (1 - p))[:, None], xa) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return beta[:-1], float(beta[-1])


@dataclass(frozen=True)
class Classifier:
    """A fitted ``classify`` model in the space of the raw embeddings: logit = ``embedding @ coef + intercept``."""

    coef: np.ndarray
    intercept: float
    background: int


def fit_classifier(vectors: CellVectors, pos: np.ndarray, neg: np.ndarray, seed: int) -> Classifier:
    """The logistic model of ``classify`` (module docstring) on example rows ``pos`` and ``neg``."""
    examples = np.concatenate([pos, neg])
    bg = background_sample(vectors.n, examples, seed)
    xb = vectors.embedding[bg].astype(np.float64)
    mu = xb.mean(axis=0) if bg.size else np.zeros(vectors.dim)
    sd = xb.std(axis=0) if bg.size > 1 else np.ones(vectors.dim)
    sd = np.where(sd > 1e-6, sd, 1e-6)
    rows = np.concatenate([pos, neg, bg])
    x = (vectors.embedding[rows].astype(np.float64) - mu) / sd
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size + bg.size)])
    w_neg = (0.25 / neg.size) if neg.size else 0.0
    w_bg = ((0.25 if neg.size else 0.5) / bg.size) if bg.size else 0.0
    if not neg.size and not bg.size:
        raise RequestError("negatives", "classify needs cells of the other class: give negatives or load more cells")
    weight = np.concatenate([np.full(pos.size, 0.5 / pos.size), np.full(neg.size, w_neg), np.full(bg.size, w_bg)])
    w, b = fit_logistic(x, y, weight)
    coef = w / sd
    return Classifier(coef=coef, intercept=b - float(mu @ coef), background=int(bg.size))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function, float32, without overflow warnings."""
    out: np.ndarray = (0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float32)))).astype(np.float32)
    return out


def score_id(vectors: CellVectors, mode: str, positives: Sequence[int], negatives: Sequence[int]) -> str:
    """Id of a score map: a hash of the dataset snapshot, the mode and the example cells (order ignored)."""
    key = f"{vectors.signature}|{mode}|{sorted(set(positives))}|{sorted(set(negatives))}"
    return hashlib.sha1(key.encode()).hexdigest()[:20]


@dataclass
class ScoreMap:
    """Every cell's raw score for one query (cosine or logit), and its readable scores on demand.

    Attributes:
        id: :func:`score_id`.
        mode: ``similar`` or ``classify``.
        vectors: The snapshot that was scored (rows line up with its arrays).
        raw: (n,) float32; orders the results.
        sorted_raw: ``similar``: ``raw`` sorted (the percentiles' reference); ``classify``: None.
        details: What the scoring used (e.g. the background size of classify).
    """

    id: str
    mode: str
    vectors: CellVectors
    raw: np.ndarray
    sorted_raw: np.ndarray | None = None
    details: dict[str, Any] = field(default_factory=dict)
    _rollups: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def kind(self) -> str:
        """``percentile`` or ``probability``."""
        return KINDS[self.mode]

    def readable_of(self, raw: np.ndarray) -> np.ndarray:
        """Readable scores in [0, 1] (float32) of raw scores: percentile among the cells, or probability."""
        if self.sorted_raw is None:
            return sigmoid(raw)
        n = self.sorted_raw.shape[0]
        out: np.ndarray = (ranks_in(self.sorted_raw, raw) / max(n - 1, 1)).astype(np.float32)
        return out

    def readable(self, rows: np.ndarray) -> np.ndarray:
        """Readable scores in [0, 1] of some cells (rows of the snapshot)."""
        return self.readable_of(self.raw[rows])

    def shown(self, rows: np.ndarray) -> np.ndarray:
        """Readable scores of some rows in the units answers use: percent (0–100) or probability (0–1)."""
        out: np.ndarray = self.readable(rows).astype(np.float64) * SCALES[self.kind]
        return out

    def rollup(self, level: int, starts: np.ndarray) -> np.ndarray:
        """Readable score of each parent of one H3 level (float32, module docstring), cached per level.

        Args:
            level: The level's resolution (cache key).
            starts: First row of each parent's children (the rows are sorted by h3, so each parent's
                children are one run of rows).
        """
        with self._lock:
            out = self._rollups.get(level)
        if out is None:
            n = self.raw.shape[0]
            counts = np.maximum(np.diff(np.append(starts, n)), 1)
            if starts.size == 0:
                out = np.zeros(0, dtype=np.float32)
            elif self.sorted_raw is None:
                out = (np.add.reduceat(sigmoid(self.raw).astype(np.float64), starts) / counts).astype(np.float32)
            else:
                out = self.readable_of(np.add.reduceat(self.raw.astype(np.float64), starts) / counts)
            with self._lock:
                self._rollups[level] = out
        return out


def score_all(vectors: CellVectors, mode: str, pos: np.ndarray, neg: np.ndarray, map_id: str) -> ScoreMap:
    """Score every cell of ``vectors`` for example rows ``pos`` (at least one) and ``neg``.

    Raises:
        RequestError: unknown mode, examples that cancel out, or nothing to contrast ``classify`` with.
    """
    emb = vectors.embedding
    if mode == "similar":
        raw = matvec(emb, similar_vector(emb[pos], emb[neg]))
        return ScoreMap(map_id, mode, vectors, raw, np.sort(raw), {"negative_weight": NEGATIVE_WEIGHT})
    if mode == "classify":
        seed = int(map_id[:8], 16)
        model = fit_classifier(vectors, pos, neg, seed)
        raw = matvec(emb, model.coef) + np.float32(model.intercept)
        return ScoreMap(map_id, mode, vectors, raw, None, {"background": model.background, "l2": L2})
    raise RequestError("mode", f"expected one of {', '.join(KINDS)}, got {mode!r}")


def top_k(raw: np.ndarray, k: int, candidates: np.ndarray | None = None) -> np.ndarray:
    """Rows of the ``k`` highest raw scores (ties: lower row, i.e. lower h3, first).

    Args:
        raw: Scores (n,).
        k: How many.
        candidates: Rows to choose from (default all).
    """
    idx = np.arange(raw.shape[0]) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if idx.size > k:
        part = np.argpartition(-raw[idx], k - 1)[:k]
        kth = raw[idx[part]].min()
        idx = idx[raw[idx] >= kth]  # every row tied with the k-th, so that ties break by row
    order = np.lexsort((idx, -raw[idx]))
    out: np.ndarray = idx[order][:k]
    return out
