"""vectorgeo.tiles: zoom levels, Web Mercator hexagons, tile bounds, and vector tiles of a small loaded region."""

from __future__ import annotations

import gzip
import math
from dataclasses import replace
from typing import Any

import h3
import mapbox_vector_tile
import numpy as np
import psycopg
import pytest
import shapely
from conftest import LoadedRegion

from vectorgeo import db, store, tiles
from vectorgeo.errors import RequestError

MAX_FEATURES = db.config_section(None, "serve")["tile_max_features"]  # the default config's

R = 6378137.0  # the Web Mercator sphere


def lnglat_to_3857(lng: np.ndarray, lat: np.ndarray) -> np.ndarray:
    return np.column_stack([np.radians(lng) * R, np.log(np.tan(np.pi / 4 + np.radians(lat) / 2)) * R])


def tile_xy(lat: float, lng: float, z: int) -> tuple[int, int]:
    n = 2**z
    return int((lng + 180) / 360 * n), int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)


# --- zoom levels -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [3, 5, 7, 9])
@pytest.mark.parametrize("max_features", [150, 4000])
def test_level_for_zoom_is_the_finest_resolution_that_fits(resolution: int, max_features: int) -> None:
    """The docstring's rule: the finest p <= r with W² / Ā_p <= TILE_FILL * max_features (W the tile width)."""
    levels = [tiles.level_for_zoom(z, resolution, max_features) for z in range(tiles.MAX_ZOOM + 1)]
    assert levels == sorted(levels)  # never coarser when zooming in
    assert levels[-1] == resolution and all(0 <= p <= resolution for p in levels)
    for z, p in enumerate(levels):
        area = (tiles.EQUATOR_KM / 2**z) ** 2
        fits = [
            q
            for q in range(1, resolution + 1)
            if area / h3.average_hexagon_area(q, "km^2") <= tiles.TILE_FILL * max_features
        ]
        assert p == max(fits, default=0), (z, p)


def test_fewer_features_per_tile_means_coarser_levels() -> None:
    for z in range(0, 12):
        assert tiles.level_for_zoom(z, 7, 150) <= tiles.level_for_zoom(z, 7, 4000)
    assert tiles.level_for_zoom(6, 7, 150) < tiles.level_for_zoom(6, 7, 4000)


@pytest.mark.parametrize("resolution", [1, 3, 5, 7, 9])
def test_max_zoom_is_the_first_zoom_that_shows_the_loaded_resolution(resolution: int) -> None:
    z = tiles.max_zoom(resolution, 4000)
    assert tiles.level_for_zoom(z, resolution, 4000) == resolution
    if z > 0:
        assert tiles.level_for_zoom(z - 1, resolution, 4000) < resolution
    assert tiles.max_zoom(resolution + 2, 4000) > z  # finer cells need closer zooms


# --- hexagons ------------------------------------------------------------------------------------------------
def test_hexagons_are_h3_boundaries_in_web_mercator() -> None:
    cells = np.array(
        [h3.str_to_int(h3.latlng_to_cell(lat, lng, 5)) for lat, lng in [(36.1, -5.4), (-33.9, 18.4), (64.1, -21.9)]]
        + [h3.str_to_int(c) for c in h3.get_pentagons(4)[:1]],  # a pentagon: five vertices
        dtype=np.uint64,
    )
    index, geoms = tiles.hexagons_3857(cells)
    assert index.tolist() == [0, 1, 2, 3]
    for i, g in zip(index, geoms, strict=True):
        boundary = np.array(h3.cell_to_boundary(h3.int_to_str(int(cells[i]))))  # (lat, lng) vertices
        want = lnglat_to_3857(boundary[:, 1], boundary[:, 0])
        ring = np.array(g.exterior.coords)[:-1]
        assert len(ring) == len(want)
        # the same vertices (in some rotation and orientation), to a millimetre
        dist = np.linalg.norm(ring[:, None, :] - want[None, :, :], axis=2)
        assert dist.min(axis=1).max() < 1e-3 and dist.min(axis=0).max() < 1e-3
        assert shapely.get_srid(g) in (0, 3857)
    assert [len(g.exterior.coords) - 1 for g in geoms] == [6, 6, 6, 5]


def test_hexagons_accept_signed_indexes_and_nothing() -> None:
    cell = h3.str_to_int(h3.latlng_to_cell(36.1, -5.4, 6))
    i1, g1 = tiles.hexagons_3857(np.array([cell], dtype=np.uint64))
    i2, g2 = tiles.hexagons_3857(np.array([cell], dtype=np.int64))
    assert i1.tolist() == i2.tolist() == [0] and shapely.equals_exact(g1[0], g2[0], tolerance=0)
    index, geoms = tiles.hexagons_3857(np.zeros(0, dtype=np.uint64))
    assert index.shape == (0,) and geoms.shape == (0,)


# --- tile bounds -------------------------------------------------------------------------------------------
def test_tile_bounds_contain_their_points_and_tile_the_world() -> None:
    w, s, e, n = tiles.tile_bounds(0, 0, 0)
    assert (w, e) == (-180.0, 180.0) and s == pytest.approx(-tiles.MERCATOR_MAX_LAT) and n == -s
    rng = np.random.default_rng(3)
    for lat, lng, z in zip(
        rng.uniform(-80, 80, 50), rng.uniform(-179.9, 179.9, 50), rng.integers(0, 19, 50), strict=True
    ):
        x, y = tile_xy(float(lat), float(lng), int(z))
        w, s, e, n = tiles.tile_bounds(int(z), x, y)
        assert w <= lng < e and s <= lat < n
        # neighbours share their edges: the tiles cover the map without gaps
        assert tiles.tile_bounds(int(z), x + 1, y)[0] == pytest.approx(e)
        assert tiles.tile_bounds(int(z), x, y + 1)[3] == pytest.approx(s)
        # four children cover their parent
        kids = [tiles.tile_bounds(int(z) + 1, 2 * x + dx, 2 * y + dy) for dx in (0, 1) for dy in (0, 1)]
        assert min(k[0] for k in kids) == pytest.approx(w) and max(k[2] for k in kids) == pytest.approx(e)
        assert min(k[1] for k in kids) == pytest.approx(s) and max(k[3] for k in kids) == pytest.approx(n)


def test_tile_bounds_agree_with_postgis(pg_url: str) -> None:
    """The same envelope as PostGIS's ST_TileEnvelope (an independent implementation), back in degrees."""
    coords = [(0, 0, 0), (3, 3, 3), (8, 127, 98), (14, 8101, 6340), (18, 0, 262143)]
    with psycopg.connect(pg_url) as conn:
        for z, x, y in coords:
            row = conn.execute(
                "SELECT ST_XMin(g), ST_YMin(g), ST_XMax(g), ST_YMax(g) "
                "FROM (SELECT ST_Transform(ST_TileEnvelope(%s, %s, %s), 4326) AS g) t",
                (z, x, y),
            ).fetchone()
            assert row is not None
            assert tiles.tile_bounds(z, x, y) == pytest.approx(row, abs=1e-9), (z, x, y)


# --- tiles of a loaded region --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tile_meta(loaded_region: LoadedRegion) -> tiles.TileMeta:
    with store.connect(loaded_region.url) as conn:
        return tiles.ensure(conn, max_features=MAX_FEATURES)


def fetch(url: str, meta: tiles.TileMeta, z: int, x: int, y: int) -> list[dict[str, Any]]:
    with store.connect(url) as conn:
        data = tiles.tile(conn, meta, z, x, y)
        raw = tiles.tile(conn, meta, z, x, y, compress=False)
    assert gzip.decompress(data) == raw
    features: list[dict[str, Any]] = mapbox_vector_tile.decode(raw).get("cells", {}).get("features", [])
    return features


def expected_colour(meta: tiles.TileMeta, e: np.ndarray) -> np.ndarray:
    """The module docstring's colour of a unit vector: first three principal components scaled to 0..255."""
    comps, lo, hi, mdot = (np.array(meta.pca[k]) for k in ("components", "lo", "hi", "mean_dot"))
    return np.clip(np.round((comps @ e - mdot - lo) * 255 / (hi - lo)), 0, 255)


def test_tile_meta_describes_the_loaded_cells(loaded_region: LoadedRegion, tile_meta: tiles.TileMeta) -> None:
    s = loaded_region
    assert tile_meta.model_version == s.model_version and tile_meta.resolution == 5
    assert tile_meta.cells == int(s.valid.sum())
    w, south, e, n = tile_meta.bounds
    ok = s.valid
    assert w == pytest.approx(s.lng[ok].min()) and e == pytest.approx(s.lng[ok].max())
    assert south == pytest.approx(s.lat[ok].min()) and n == pytest.approx(s.lat[ok].max())
    with store.connect(s.url) as conn:
        assert tiles.ensure(conn, max_features=MAX_FEATURES).build_id == tile_meta.build_id  # up to date: not rebuilt
        assert tiles.read_meta(conn, s.model_version) == tile_meta


def test_tile_at_max_zoom_holds_the_cells_it_covers(loaded_region: LoadedRegion, tile_meta: tiles.TileMeta) -> None:
    s = loaded_region
    z = tiles.max_zoom(5, tile_meta.max_features)
    x, y = tile_xy(float(np.median(s.lat)), float(np.median(s.lng)), z)
    features = fetch(s.url, tile_meta, z, x, y)
    got = {int(f["properties"]["h3"], 16): f for f in features}
    assert len(got) == len(features) > 0  # each cell once
    # every cell in the tile is a loaded cell with an embedding, and every such cell well inside the tile is there
    loaded = {int(c) for c in s.h3[s.valid]}
    assert set(got) <= loaded
    w, south, e, n = tiles.tile_bounds(z, x, y)
    pad = 0.1
    inside = s.valid & (s.lng > w + pad) & (s.lng < e - pad) & (s.lat > south + pad) & (s.lat < n - pad)
    assert inside.sum() > 5 and {int(c) for c in s.h3[inside]} <= set(got)
    lo, hi = lnglat_to_3857(np.array([w, e]), np.array([south, n]))
    for i in np.flatnonzero(inside):
        f = got[int(s.h3[i])]
        assert f["properties"]["res"] == 5 and f["properties"]["children"] == 1
        rgb = [int(f["properties"]["color"][k : k + 2], 16) for k in (1, 3, 5)]
        assert np.abs(np.array(rgb) - expected_colour(tile_meta, s.embedding[i].astype(np.float64))).max() <= 1
        # the hexagon, in tile coordinates (extent 4096, y up as decoded), to within rounding
        boundary = np.array(h3.cell_to_boundary(h3.int_to_str(int(s.h3[i]))))
        merc = lnglat_to_3857(boundary[:, 1], boundary[:, 0])
        want = (merc - lo) / (hi - lo) * tiles.EXTENT
        ring = np.array(f["geometry"]["coordinates"][0], dtype=np.float64)
        dist = np.linalg.norm(want[:, None, :] - ring[None, :, :], axis=2)
        assert f["geometry"]["type"] == "Polygon" and dist.min(axis=1).max() <= 1.5


def test_whole_world_tile_holds_every_cell_as_rollups(loaded_region: LoadedRegion, tile_meta: tiles.TileMeta) -> None:
    """At zoom 0 the cells are rolled up: each loaded cell with an embedding is counted once."""
    s = loaded_region
    level = tiles.level_for_zoom(0, 5, tile_meta.max_features)
    assert level < 5
    features = fetch(s.url, tile_meta, 0, 0, 0)
    assert {f["properties"]["res"] for f in features} == {level}
    parents = {h3.str_to_int(h3.cell_to_parent(h3.int_to_str(int(c)), level)) for c in s.h3[s.valid]}
    assert {int(f["properties"]["h3"], 16) for f in features} == parents
    assert sum(f["properties"]["children"] for f in features) == int(s.valid.sum())


def test_tile_far_from_the_data_is_empty_and_cap_is_respected(
    loaded_region: LoadedRegion, tile_meta: tiles.TileMeta
) -> None:
    s = loaded_region
    z = tiles.max_zoom(5, tile_meta.max_features)
    assert fetch(s.url, tile_meta, z, *tile_xy(-40.0, 150.0, z)) == []
    capped = replace(tile_meta, max_features=10)
    for zoom in range(0, z + 1):
        x, y = tile_xy(36.0, -5.0, zoom)
        assert len(fetch(s.url, capped, zoom, x, y)) <= 10


@pytest.mark.parametrize(("z", "x", "y", "param"), [(23, 0, 0, "z"), (-1, 0, 0, "z"), (2, 4, 0, "x"), (2, 0, -1, "y")])
def test_tile_out_of_range_names_the_coordinate(
    loaded_region: LoadedRegion, tile_meta: tiles.TileMeta, z: int, x: int, y: int, param: str
) -> None:
    with store.connect(loaded_region.url) as conn, pytest.raises(RequestError) as e:
        tiles.tile(conn, tile_meta, z, x, y)
    assert e.value.param == param
