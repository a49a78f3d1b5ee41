"""Scoring every cell (vectorgeo.scores): percentiles, the query vector, the few-shot classifier, top-k."""

from __future__ import annotations

import numpy as np
import pytest

from vectorgeo import scores
from vectorgeo.errors import RequestError
from vectorgeo.store.vectors import CellVectors


def vectors(n: int = 500, dim: int = 12, seed: int = 0) -> CellVectors:
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, dim)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    h3 = np.sort(rng.choice(2**40, n, replace=False).astype(np.uint64) + np.uint64(0x8500000000000000))
    return CellVectors("t", 5, "sig", h3, rng.uniform(-60, 60, n), rng.uniform(-180, 180, n), e, np.zeros(0, np.uint64))


def test_percentiles_are_ranks_with_ties_sharing_the_lower() -> None:
    raw = np.array([0.3, 0.1, 0.3, 0.9, 0.2], dtype=np.float32)
    assert scores.percentiles(raw).tolist() == pytest.approx([0.5, 0.0, 0.5, 1.0, 0.25])
    rng = np.random.default_rng(1)
    raw = rng.normal(size=1000).astype(np.float32)
    want = np.array([(raw < x).sum() for x in raw]) / 999
    np.testing.assert_allclose(scores.percentiles(raw), want, atol=1e-6)
    assert scores.percentiles(np.zeros(0, np.float32)).size == 0
    assert scores.percentiles(np.array([0.5], np.float32)).tolist() == [0.0]


def test_similar_vector() -> None:
    pos = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    q = scores.similar_vector(pos, np.zeros((0, 3)))
    np.testing.assert_allclose(q, [2**-0.5, 2**-0.5, 0])
    q = scores.similar_vector(pos, np.array([[0, 0, 1.0]]), beta=0.5)
    want = np.array([2**-0.5, 2**-0.5, -0.5])
    np.testing.assert_allclose(q, want / np.linalg.norm(want))
    with pytest.raises(RequestError, match="positives"):
        scores.similar_vector(np.array([[1.0, 0, 0]]), np.array([[1.0, 0, 0]]), beta=1.0)


def test_fit_logistic_matches_scikit_learn() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 6))
    y = (x @ rng.normal(size=6) + 0.3 * rng.normal(size=300) > 0).astype(float)
    w = rng.uniform(0.5, 2.0, 300)
    w /= w.sum()
    coef, b = scores.fit_logistic(x, y, w, l2=0.05)
    ref = LogisticRegression(C=1 / 0.05, tol=1e-12, max_iter=10_000).fit(x, y, sample_weight=w)
    np.testing.assert_allclose(coef, ref.coef_[0], rtol=1e-4, atol=1e-6)
    assert b == pytest.approx(ref.intercept_[0], rel=1e-4, abs=1e-6)


def test_classify_scores_positives_above_negatives() -> None:
    v = vectors()
    pos = np.array([3, 17, 40])
    neg = np.array([7, 99])
    smap = scores.score_all(v, "classify", pos, neg, "00000000000000000000")
    assert smap.kind == "probability" and smap.details["background"] == scores.BACKGROUND_MIN
    assert (smap.readable(pos) > 0.5).all() and (smap.readable(neg) < 0.5).all()
    every = np.arange(v.n)
    np.testing.assert_allclose(smap.readable(every), 1 / (1 + np.exp(-smap.raw.astype(np.float64))), atol=1e-6)
    starts = np.array([0, 100, 350])
    probs = smap.readable(every)
    want = [probs[:100].mean(), probs[100:350].mean(), probs[350:].mean()]
    np.testing.assert_allclose(smap.rollup(3, starts), want, rtol=1e-5)  # parents: mean probability
    again = scores.score_all(v, "classify", pos, neg, "00000000000000000000")
    np.testing.assert_array_equal(again.raw, smap.raw)  # the background sample is seeded by the id


def test_background_sample_leaves_out_the_examples() -> None:
    bg = scores.background_sample(1000, np.array([1, 2, 3]), seed=5)
    assert bg.size == scores.BACKGROUND_MIN and not np.isin(bg, [1, 2, 3]).any() and np.unique(bg).size == bg.size
    assert scores.background_sample(4, np.array([0, 1, 2, 3]), seed=5).size == 0


def test_similar_map_and_rollup() -> None:
    v = vectors()
    smap = scores.score_all(v, "similar", np.array([10]), np.zeros(0, np.int64), "x" * 20)
    np.testing.assert_allclose(smap.raw, v.embedding @ v.embedding[10], atol=1e-6)
    assert smap.readable(np.array([10])).tolist() == [1.0] and smap.shown(np.array([10])).tolist() == [100.0]
    np.testing.assert_allclose(smap.readable(np.arange(v.n)), scores.percentiles(smap.raw))
    starts = np.array([0, 100, 350])
    roll = smap.rollup(4, starts)
    # parents: the percentile among the cells of the children's mean similarity
    means = [smap.raw[:100].mean(), smap.raw[100:350].mean(), smap.raw[350:].mean()]
    np.testing.assert_allclose(roll, [(smap.raw < m).sum() / (v.n - 1) for m in means], atol=1e-6)
    assert smap.rollup(4, starts) is roll  # cached
    with pytest.raises(RequestError, match="mode"):
        scores.score_all(v, "nearest", np.array([1]), np.zeros(0, np.int64), "x" * 20)


def test_top_k_breaks_ties_by_row() -> None:
    raw = np.array([0.5, 0.9, 0.5, 0.9, 0.1, 0.5], dtype=np.float32)
    assert scores.top_k(raw, 3).tolist() == [1, 3, 0]
    assert scores.top_k(raw, 4, np.array([5, 4, 2])).tolist() == [2, 5, 4]
    assert scores.top_k(raw, 10).tolist() == [1, 3, 0, 2, 5, 4]


def test_score_id_ignores_example_order() -> None:
    v = vectors()
    assert scores.score_id(v, "similar", [1, 2], [3]) == scores.score_id(v, "similar", [2, 1, 1], [3])
    assert scores.score_id(v, "similar", [1, 2], [3]) != scores.score_id(v, "classify", [1, 2], [3])
