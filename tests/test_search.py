"""Search by example without a database (vectorgeo.search): areas, examples, results."""

from __future__ import annotations

import h3
import numpy as np
import pytest
import shapely

from vectorgeo import search
from vectorgeo.errors import RequestError
from vectorgeo.store.vectors import CellVectors


def world(res: int = 2, dim: int = 8) -> CellVectors:
    """Every res-2 cell of the world with random unit embeddings (the cells sorted by h3)."""
    cells = np.array(sorted(h3.str_to_int(c) for r0 in h3.get_res0_cells() for c in h3.cell_to_children(r0, res)))
    ll = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in cells])
    rng = np.random.default_rng(0)
    e = rng.normal(size=(cells.size, dim)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    regions = np.array(sorted(h3.str_to_int(c) for c in h3.get_res0_cells()), dtype=np.uint64)
    return CellVectors("w", res, "sig", cells.astype(np.uint64), ll[:, 0], ll[:, 1], e, regions)


@pytest.fixture(scope="module")
def w() -> CellVectors:
    return world()


def haversine(lat, lng, lats, lngs):
    p1, p2 = np.radians(lat), np.radians(lats)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lngs - lng) / 2) ** 2
    return 2 * 6_371_008.8 * np.arcsin(np.sqrt(a))


def test_radius_across_the_antimeridian_and_near_a_pole(w):
    for centre, r in (((-17.0, 179.5), 900_000.0), ((84.0, 20.0), 1_500_000.0), ((0.0, 0.0), 3_000_000.0)):
        rows = search.Area(radius_m=r, center=centre).rows(w)
        want = np.flatnonzero(haversine(*centre, w.lat, w.lng) <= r)
        assert rows.tolist() == want.tolist() and rows.size > 3
    with pytest.raises(RequestError, match="center"):
        search.Area(radius_m=10.0).rows(w)


@pytest.fixture(scope="module")
def w4() -> CellVectors:
    return world(res=4)


def test_radius_rows_come_from_a_cover_of_coarse_cells(w4):
    """The radius's rows are read from a few key ranges (a ring of coarse cells): the same rows as a scan of
    every cell, at random centres (poles and the antimeridian among them) and radii from 3 km to 8,000 km."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(150):
        lat = float(np.degrees(np.arcsin(rng.uniform(-1, 1))))
        lng = float(rng.uniform(-180, 180))
        if trial % 10 == 0:
            lat = float(rng.choice([89.9, -89.9, 85.0, -87.0]))
        if trial % 7 == 0:
            lng = float(rng.choice([179.9, -179.95]))
        r = float(10 ** rng.uniform(3.5, 6.9))
        near = search.cover_rows(w4, lat, lng, r)
        want = np.flatnonzero(haversine(lat, lng, w4.lat, w4.lng) <= r)
        assert search.Area(radius_m=r, center=(lat, lng)).rows(w4).tolist() == want.tolist(), (lat, lng, r)
        if near is not None:
            covered += 1
            assert np.isin(want, near).all() and np.all(np.diff(near) > 0)
            if r < 500_000:
                assert near.size < w4.n // 20  # a few ranges, not the world
    assert covered > 100


def test_nearest_is_the_exact_answer_in_a_radius(w4):
    """nearest(): the k most similar cells within the radius (the query cell left out), ties by h3; the
    radius on the WGS84 ellipsoid (pyproj) where the sphere and the ellipsoid disagree."""
    rng = np.random.default_rng(2)
    for _ in range(20):
        row = int(rng.integers(w4.n))
        lat, lng = float(w4.lat[row]), float(w4.lng[row])
        r = float(rng.uniform(200_000, 2_000_000))
        got = search.nearest(w4, row, 12, search.Area(radius_m=r, center=(lat, lng)))
        inside = np.flatnonzero(search.geodesic_m(lat, lng, w4.lat, w4.lng) <= r)
        inside = inside[inside != row]
        sim = w4.embedding[inside] @ w4.embedding[row]
        want = inside[np.lexsort((inside, -sim))][:12]
        assert got.tolist() == want.tolist()
    # a tie: two cells with the query's own vector come back lowest h3 first
    v = CellVectors(w4.model_version, 4, "s", w4.h3, w4.lat, w4.lng, w4.embedding.copy(), w4.regions)
    a, b = 1000, 1001
    v.embedding[[a, b]] = v.embedding[999]
    got = search.nearest(v, 999, 2, search.Area(radius_m=500_000, center=(float(v.lat[999]), float(v.lng[999]))))
    assert got.tolist() == [a, b]


def test_geodesic_radius_differs_from_the_sphere_only_near_the_edge(w4):
    lat, lng, r = 60.0, 10.0, 1_000_000.0
    sphere = search.Area(radius_m=r, center=(lat, lng)).rows(w4)
    ellipsoid = search.Area(radius_m=r, center=(lat, lng)).rows(w4, geodesic=True)
    assert ellipsoid.tolist() == np.flatnonzero(search.geodesic_m(lat, lng, w4.lat, w4.lng) <= r).tolist()
    d = haversine(lat, lng, w4.lat, w4.lng)
    differ = np.setxor1d(sphere, ellipsoid)
    assert np.all((d[differ] > 0.99 * r) & (d[differ] < 1.01 * r))


def test_bbox_across_the_antimeridian(w):
    rows = search.Area(bbox=(170.0, -30.0, -170.0, 0.0)).rows(w)
    want = np.flatnonzero(((w.lng >= 170) | (w.lng <= -170)) & (w.lat >= -30) & (w.lat <= 0))
    assert rows.tolist() == want.tolist() and rows.size > 5
    assert search.Area().rows(w) is None


def test_polygon(w):
    poly = shapely.MultiPolygon([shapely.box(-10, 35, 30, 60), shapely.box(100, -10, 120, 10)])
    rows = search.Area(polygon=poly).rows(w)
    assert rows.tolist() == np.flatnonzero(shapely.contains_xy(poly, w.lng, w.lat)).tolist()


def test_examples_resolved_and_reported(w):
    a, b = int(w.h3[10]), int(w.h3[500])
    missing = h3.str_to_int("8029fffffffffff")  # a res-0 cell: never a row here
    asked = []

    def why(cells: np.ndarray) -> list[str]:
        asked.append(cells.tolist())
        return ["ocean"] * cells.size

    ex = search.resolve_examples(w, [a, missing], [b], why)
    assert [(e.role, e.param, e.row, e.reason) for e in ex] == [
        ("positive", "positives[0]", 10, None),
        ("positive", "positives[1]", -1, "ocean"),
        ("negative", "negatives[0]", 500, None),
    ]
    assert asked == [[missing]]
    with pytest.raises(search.NoExamples) as e:
        search.resolve_examples(w, [missing], [a], why)
    assert e.value.param == "positives" and "positives[0]" in str(e.value) and "ocean" in str(e.value)


def test_run_never_returns_examples_and_uses_the_cache(w):
    q = search.Query([int(w.h3[3])], [int(w.h3[4])], "similar", 25)
    ans = search.run(w, q)
    assert ans.rows.size == 25 and not np.isin(ans.rows, [3, 4]).any()
    raw = ans.score_map.raw
    assert (np.diff(raw[ans.rows]) <= 0).all()
    assert raw[ans.rows[-1]] >= np.delete(raw, np.concatenate([ans.rows, [3, 4]])).max()
    again = search.run(w, q, cached=lambda i: ans.score_map if i == ans.score_map.id else None)
    assert again.score_map is ans.score_map and again.rows.tolist() == ans.rows.tolist()
    res = ans.results(boundary=True)
    assert res[0]["h3"] == f"{int(w.h3[ans.rows[0]]):015x}" and len(res[0]["boundary"]) in (5, 6)
    # a radius without a centre is around the first usable positive
    near = search.run(w, search.Query([int(w.h3[3])], [], "similar", 5, search.Area(radius_m=2_000_000)))
    d = haversine(w.lat[3], w.lng[3], w.lat[near.rows], w.lng[near.rows])
    assert (d <= 2_000_000).all() and near.area_cells == int((haversine(w.lat[3], w.lng[3], w.lat, w.lng) <= 2e6).sum())
