"""Score-map tiles (vectorgeo.scoretiles): which cells a tile holds, their hexagons and rollup scores."""

from __future__ import annotations

import h3
import mapbox_vector_tile
import numpy as np
import pytest
import shapely
from test_search import world

from vectorgeo import scores, scoretiles, tiles


@pytest.fixture(scope="module")
def smap() -> scores.ScoreMap:
    w = world()
    return scores.score_all(w, "similar", np.array([100]), np.zeros(0, np.int64), "a" * 20)


def features(smap, z, x, y, max_features):
    data = scoretiles.score_tile(smap, scoretiles.Levels(smap.vectors), z, x, y, max_features)
    return mapbox_vector_tile.decode(data, default_options={"y_coord_down": True}).get("scores", {}).get("features", [])


def tile_polygon(cell: str, z: int, x: int, y: int) -> shapely.Polygon:
    """The cell's hexagon in this tile's coordinates (longitudes unwrapped around the centre), per h3-py."""
    _, lng = h3.cell_to_latlng(cell)
    b = np.array(h3.cell_to_boundary(cell))
    lngs = b[:, 1] - 360 * np.round((b[:, 1] - lng) / 360)
    mx, my = scoretiles.mercator_xy(b[:, 0], lngs)
    return shapely.Polygon(np.column_stack([(mx * 2**z - x) * 4096, (my * 2**z - y) * 4096]))


@pytest.mark.parametrize(("z", "x", "y"), [(1, 0, 0), (2, 3, 2), (2, 0, 2), (3, 7, 4), (3, 0, 3), (3, 4, 1)])
def test_tile_holds_every_cell_reaching_it(smap, z, x, y):
    """Every cell whose hexagon reaches the tile (also across ±180°) is there once, none far outside."""
    max_features = 400
    level = tiles.level_for_zoom(z, smap.vectors.resolution, max_features)
    feats = features(smap, z, x, y, max_features)
    got = [f["properties"]["h3"] for f in feats]
    assert all(h3.get_resolution(c) == level for c in got)
    lv = scoretiles.build_level(smap.vectors, level)
    box = shapely.box(0, 0, 4096, 4096)
    want = set()
    for c in lv.cells.tolist():
        s = h3.int_to_str(c)
        if max(abs(la) for la, _ in h3.cell_to_boundary(s)) >= scoretiles.MERCATOR_MAX_LAT:
            continue
        for shift in (-4096 * 2**z, 0, 4096 * 2**z):
            p = shapely.affinity.translate(tile_polygon(s, z, x, y), xoff=shift)
            if p.intersection(box).area > 1.0:
                want.add(s)
    assert want and want <= set(got)
    assert len(got) == len(set(got)) or z <= 1  # a cell appears twice only in a tile spanning the whole world
    buffered = shapely.box(-scoretiles.BUFFER, -scoretiles.BUFFER, 4096 + scoretiles.BUFFER, 4096 + scoretiles.BUFFER)
    for f in feats:
        assert shapely.Polygon(f["geometry"]["coordinates"][0]).intersects(buffered)


def test_rollup_scores_are_percentiles_of_the_childrens_mean(smap):
    max_features = 50
    level = tiles.level_for_zoom(1, smap.vectors.resolution, max_features)
    assert level < smap.vectors.resolution
    feats = features(smap, 1, 1, 0, max_features)
    parents = np.array([h3.str_to_int(h3.cell_to_parent(h3.int_to_str(int(c)), level)) for c in smap.vectors.h3])
    n = smap.raw.size
    for f in feats:
        mean = smap.raw[parents == h3.str_to_int(f["properties"]["h3"])].astype(np.float64).mean()
        assert f["properties"]["score"] == pytest.approx((smap.raw < mean).sum() / (n - 1), abs=1e-6)


def test_loaded_resolution_scores_and_hexagons(smap):
    z, x, y = 4, 8, 6
    feats = features(smap, z, x, y, 20000)
    assert feats
    rows = smap.vectors.index_of(np.array([h3.str_to_int(f["properties"]["h3"]) for f in feats]))
    assert (rows >= 0).all()
    np.testing.assert_allclose([f["properties"]["score"] for f in feats], smap.readable(rows), atol=1e-7)
    for f in feats[:30]:
        got = shapely.Polygon(f["geometry"]["coordinates"][0])
        want = tile_polygon(f["properties"]["h3"], z, x, y)
        assert got.symmetric_difference(want).area < 0.01 * want.area


def test_empty_and_bad_tiles(smap):
    from vectorgeo.errors import RequestError

    assert features(smap, 6, 0, 0, 400) == []  # the Arctic Ocean corner beyond the Mercator limit
    with pytest.raises(RequestError, match="'x'"):
        scoretiles.score_tile(smap, scoretiles.Levels(smap.vectors), 2, 4, 0, 400)
