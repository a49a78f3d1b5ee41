"""Vector tiles of a score map: every loaded cell coloured by its score, parents (rollups) at low zooms.

Independent of the base map's tiles: the hexagons come from the in-memory cells of a
:class:`~vectorgeo.store.vectors.CellVectors`, so a score map is drawn the moment it is scored.

Levels: zoom :math:`z` shows H3 resolution :func:`vectorgeo.tiles.level_for_zoom` (the finest whose
cells fit a tile within the feature cap); a parent's score summarises its loaded children
(:meth:`~vectorgeo.scores.ScoreMap.rollup`). Since the cells are sorted by h3 and a parent's
descendants are one run of that order (:mod:`vectorgeo.h3cells`), a level is the run starts of the
parent indexes, found in one pass.

Tile look-up: a level keeps its cells' Web Mercator x (0 at 180° W, 1 at 180° E) sorted, so a tile's
cells are one :func:`numpy.searchsorted` range of x, widened by a margin (twice the mean edge length
of the level, at the tile's highest latitude) and filtered by y; ranges beyond x = 0 or 1 take the
cells of the other side of the antimeridian, shifted by one world. Hexagons (h3ronpy, vectorised) are
unwrapped around their centre, projected to tile coordinates and encoded by :mod:`vectorgeo.mvt`
(layer ``scores``, properties ``h3`` and ``score`` in [0, 1]). Cells reaching beyond the Mercator
latitude limit are left out.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import h3
import numpy as np
import pyarrow as pa
import shapely

from vectorgeo import h3cells, mvt, tiles
from vectorgeo.scores import ScoreMap
from vectorgeo.store.vectors import CellVectors

LAYER = "scores"
BUFFER = 64
MERCATOR_MAX_LAT = 85.0511287798066


def mercator_xy(lat: np.ndarray, lng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Web Mercator in world units: x in [0, 1] west→east, y in [0, 1] north→south (latitudes clamped)."""
    x = (np.asarray(lng, dtype=np.float64) + 180.0) / 360.0
    phi = np.radians(np.clip(np.asarray(lat, dtype=np.float64), -MERCATOR_MAX_LAT, MERCATOR_MAX_LAT))
    y = 0.5 - np.log(np.tan(np.pi / 4 + phi / 2)) / (2 * np.pi)
    return x, y


@dataclass(frozen=True)
class Level:
    """The cells of one H3 resolution over a snapshot: the loaded cells or their parents.

    Attributes:
        res: The resolution.
        cells: Cells (m,), uint64, sorted.
        starts: First row (in the snapshot) of each cell's loaded children (m,).
        order: Cells ordered by Mercator x (m,).
        xs: Mercator x in that order.
        ys: Mercator y in that order.
        lat: Cell centre latitudes (m,), in cell order.
        lng: Cell centre longitudes (m,).
    """

    res: int
    cells: np.ndarray
    starts: np.ndarray
    order: np.ndarray
    xs: np.ndarray
    ys: np.ndarray
    lat: np.ndarray
    lng: np.ndarray


def build_level(vectors: CellVectors, res: int) -> Level:
    """The level of resolution ``res`` (at most the loaded resolution) of a snapshot."""
    from h3ronpy import vector

    if res >= vectors.resolution:
        cells, starts = vectors.h3, np.arange(vectors.n)
        lat, lng = vectors.lat, vectors.lng
    else:
        par = h3cells.parents(vectors.h3, res)
        starts = np.flatnonzero(np.concatenate([[True], par[1:] != par[:-1]])) if par.size else np.zeros(0, np.int64)
        cells = par[starts]
        if cells.size:
            coords = pa.record_batch(vector.cells_to_coordinates(pa.array(cells)))
            lat = coords.column("lat").to_numpy()
            lng = coords.column("lng").to_numpy()
        else:
            lat = lng = np.zeros(0)
    x, y = mercator_xy(lat, lng)
    order = np.argsort(x, kind="stable")
    return Level(min(res, vectors.resolution), cells, starts, order, x[order], y[order], lat, lng)


class Levels:
    """The levels of one snapshot, built when first asked for (thread-safe)."""

    def __init__(self, vectors: CellVectors) -> None:
        self.vectors = vectors
        self._levels: dict[int, Level] = {}
        self._lock = threading.Lock()

    def get(self, res: int) -> Level:
        with self._lock:
            level = self._levels.get(res)
            if level is None:
                level = build_level(self.vectors, res)
                self._levels[res] = level
            return level


def _ranges(lo: float, hi: float) -> list[tuple[float, float, float]]:
    """x ranges (lo, hi, shift) covering [lo, hi] in a world that repeats every 1 in x."""
    out = [(max(lo, 0.0), min(hi, 1.0), 0.0)]
    if lo < 0:
        out.append((lo + 1.0, 1.0, -1.0))
    if hi > 1:
        out.append((0.0, hi - 1.0, 1.0))
    return [r for r in out if r[0] <= r[1]]


def tile_cells(level: Level, z: int, x: int, y: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells of a level whose hexagon may reach into tile z/x/y.

    Returns:
        ``(index, shift)``: positions into ``level.cells`` and the world shift (-1, 0, 1) of each.
    """
    n = 2.0**z
    _, s, _, north = tiles.tile_bounds(z, x, y)
    phi = math.radians(min(max(abs(s), abs(north)), MERCATOR_MAX_LAT))
    edge_km = h3.average_hexagon_edge_length(level.res, unit="km")
    margin = 2.0 * edge_km / (tiles.EQUATOR_KM * math.cos(phi)) + 1.0 / (n * 4)
    x0, x1 = x / n - margin, (x + 1) / n + margin
    y0, y1 = y / n - margin, (y + 1) / n + margin
    idx, shift = [], []
    for lo, hi, sh in _ranges(x0, x1):
        a, b = np.searchsorted(level.xs, [lo, hi], side="left")
        sel = np.arange(a, b)
        sel = sel[(level.ys[sel] >= y0) & (level.ys[sel] <= y1)]
        idx.append(level.order[sel])
        shift.append(np.full(sel.size, sh))
    return np.concatenate(idx), np.concatenate(shift)


def hexagon_rings(cells: np.ndarray, lng_centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (lng, lat) of each cell, unclosed, longitudes unwrapped to within 180° of the centre.

    Returns:
        ``(xy (V, 2), offsets (m + 1,))``.
    """
    from h3ronpy import vector

    if cells.size == 0:
        return np.zeros((0, 2)), np.zeros(1, dtype=np.int64)
    wkb = pa.array(vector.cells_to_wkb_polygons(pa.array(cells.astype(np.uint64)))).to_numpy(zero_copy_only=False)
    geoms = shapely.from_wkb(wkb)
    xy, ring = shapely.get_coordinates(geoms, return_index=True)
    counts = np.bincount(ring, minlength=cells.size)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    keep = np.ones(xy.shape[0], dtype=bool)
    keep[offsets[1:] - 1] = False  # the closing vertex
    xy = xy[keep]
    offsets = np.concatenate([[0], np.cumsum(counts - 1)])
    ring = np.repeat(np.arange(cells.size), counts - 1)
    d = xy[:, 0] - lng_centre[ring]
    xy[:, 0] -= 360.0 * np.round(d / 360.0)
    return xy, offsets


def score_tile(smap: ScoreMap, levels: Levels, z: int, x: int, y: int, max_features: int) -> bytes:
    """One tile of a score map (uncompressed MVT; empty bytes when no cell reaches it).

    Args:
        smap: The score map.
        levels: The levels of the snapshot the map scored (``levels.vectors is smap.vectors``).
        z: Zoom.
        x: Column.
        y: Row.
        max_features: Feature cap the zoom levels are chosen for (:func:`vectorgeo.tiles.level_for_zoom`).

    Raises:
        RequestError: tile coordinates out of range.
    """
    tiles.check_tile(z, x, y)
    vectors = smap.vectors
    if vectors.n == 0:
        return b""
    level = levels.get(tiles.level_for_zoom(z, vectors.resolution, max_features))
    idx, shift = tile_cells(level, z, x, y)
    if idx.size == 0:
        return b""
    full = level.res >= vectors.resolution  # then the level's cells are the rows themselves
    lng_c = level.lng[idx] + 360.0 * shift
    xy, offsets = hexagon_rings(level.cells[idx], lng_c)
    ring = np.repeat(np.arange(idx.size), np.diff(offsets))
    reach = np.abs(xy[:, 1]) < MERCATOR_MAX_LAT
    polar = np.bincount(ring, weights=~reach, minlength=idx.size) > 0
    mx, my = mercator_xy(xy[:, 1], xy[:, 0])
    scale = 2.0**z * mvt.EXTENT
    tx = (mx - x / 2.0**z) * scale
    ty = (my - y / 2.0**z) * scale
    lo, hi = -BUFFER, mvt.EXTENT + BUFFER
    out_x = (np.maximum.reduceat(tx, offsets[:-1]) < lo) | (np.minimum.reduceat(tx, offsets[:-1]) > hi)
    out_y = (np.maximum.reduceat(ty, offsets[:-1]) < lo) | (np.minimum.reduceat(ty, offsets[:-1]) > hi)
    keep = np.flatnonzero(~(out_x | out_y | polar))
    if keep.size == 0:
        return b""
    vkeep = np.isin(ring, keep)
    offsets_k = np.concatenate([[0], np.cumsum(np.diff(offsets)[keep])])
    props = {
        "h3": h3cells.to_strs(level.cells[idx[keep]]),
        "score": smap.readable(idx[keep]) if full else smap.rollup(level.res, level.starts)[idx[keep]],
    }
    return mvt.encode_polygons(LAYER, np.column_stack([tx[vkeep], ty[vkeep]]), offsets_k, props)
