"""Search by example: resolve the examples, score every cell (:mod:`vectorgeo.scores`), keep the best k in an area.

Shared by ``POST /query`` and ``vectorgeo query --positive``. A query names positive (and optionally
negative) examples as H3 cells or points; those without an embedding (ocean, unusable, outside the
loaded regions) are left out and reported with the reason, and when no positive is left the query
fails with :class:`NoExamples` (the API's 404) naming each one and why.

The area (all optional, combined with AND) is a radius around a centre (default the first positive),
a bbox, or a polygon; it limits the results, never the score map, which covers every loaded cell.
Examples are never results.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vectorgeo import export, h3cells, scores
from vectorgeo.errors import RequestError, VectorgeoError
from vectorgeo.store.vectors import CellVectors
from vectorgeo.validation import BBox

EARTH_RADIUS_M = 6_371_008.8
M_PER_DEG = math.pi * EARTH_RADIUS_M / 180.0

MissingFn = Callable[[np.ndarray], list[str]]


class NoExamples(VectorgeoError):
    """No positive example has an embedding.

    Attributes:
        param: ``positives``.
        examples: The positives with why each is unusable.
    """

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.param = "positives"
        self.examples = examples
        why = "; ".join(f"{e['param']} ({e['h3']}): {e['reason']}" for e in examples)
        super().__init__(f"no positive example has an embedding: {why}")


@dataclass(frozen=True)
class Area:
    """Where results may lie; every part optional, combined with AND.

    Attributes:
        radius_m: Keep cells within this great-circle distance of ``center``.
        center: (lat, lng) of the radius; required with ``radius_m``.
        bbox: (west, south, east, north); west > east crosses the antimeridian.
        polygon: A shapely (Multi)Polygon in lng/lat.
    """

    radius_m: float | None = None
    center: tuple[float, float] | None = None
    bbox: BBox | None = None
    polygon: Any = None

    def __bool__(self) -> bool:
        return self.radius_m is not None or self.bbox is not None or self.polygon is not None

    def rows(self, vectors: CellVectors, geodesic: bool = False) -> np.ndarray | None:
        """Rows of the cells inside (int64, ascending), or None when there is no area (every cell).

        Args:
            vectors: The loaded embeddings.
            geodesic: Measure the radius on the WGS84 ellipsoid (as the database's similarity queries do)
                instead of on the sphere: the great-circle distance decides every cell outside a thin
                ring (0.99–1.01 of the radius; the two differ by less than 0.6 %), pyproj's geodesic
                the cells in it.
        """
        if not self:
            return None
        lat, lng = vectors.lat, vectors.lng
        keep = np.arange(vectors.n)
        if self.radius_m is not None:
            if self.center is None:
                raise RequestError("center", "a radius needs a centre")
            clat, clng = self.center
            near = cover_rows(vectors, clat, clng, self.radius_m)
            if near is not None:
                keep = near
            band = self.radius_m / M_PER_DEG
            keep = keep[np.abs(lat[keep] - clat) <= band]
            d = haversine_m(clat, clng, lat[keep], lng[keep])
            if geodesic:
                ring = np.flatnonzero((d > 0.99 * self.radius_m) & (d <= 1.01 * self.radius_m))
                inside = d <= 0.99 * self.radius_m
                if ring.size:
                    inside[ring] = geodesic_m(clat, clng, lat[keep[ring]], lng[keep[ring]]) <= self.radius_m
                keep = keep[inside]
            else:
                keep = keep[d <= self.radius_m]
        if self.bbox is not None:
            w, s, e, n = self.bbox
            x, y = lng[keep], lat[keep]
            inside_x = (x >= w) & (x <= e) if w <= e else (x >= w) | (x <= e)
            keep = keep[inside_x & (y >= s) & (y <= n)]
        if self.polygon is not None:
            import shapely

            w, s, e, n = self.polygon.bounds
            x, y = lng[keep], lat[keep]
            keep = keep[(x >= w) & (x <= e) & (y >= s) & (y <= n)]
            shapely.prepare(self.polygon)
            keep = keep[shapely.contains_xy(self.polygon, lng[keep], lat[keep])]
        return keep


# Covering a radius with coarse cells: at most this many rings of them around the centre's
COVER_MAX_RINGS = 24


def cover_level(resolution: int, radius_m: float) -> tuple[int, int] | None:
    """(coarse resolution, rings) of :func:`cover_rows` for cells of ``resolution``, or None when even
    resolution 0 needs more than :data:`COVER_MAX_RINGS` rings."""
    import h3

    for coarse in range(resolution, -1, -1):
        # neighbouring cell centres are at least sqrt(3) x the shortest edge apart
        spacing_m = math.sqrt(3) * 0.5 * h3.average_hexagon_edge_length(coarse, unit="m")
        rings = math.ceil(radius_m / spacing_m) + 1
        if rings <= COVER_MAX_RINGS:
            return coarse, rings
    return None


def cover_rows(vectors: CellVectors, lat: float, lng: float, radius_m: float) -> np.ndarray | None:
    """Rows (ascending) of every cell that may lie within ``radius_m`` of (lat, lng) and few others, or None
    when the radius is too large to cover this way (then every row may).

    The rows are sorted by h3, so the descendants of a coarse cell are one range of rows
    (:func:`vectorgeo.h3cells.descendant_ranges`). The cover: the grid disk of k rings of coarse cells
    around the centre's, at the finest resolution where k <= :data:`COVER_MAX_RINGS`, k counted with
    half the average edge length of that resolution (H3 edges vary by less than 2x) plus one ring, so
    that every cell a great circle of ``radius_m`` from the centre crosses is in it; then only the
    coarse cells whose centre lies within the radius plus twice the average edge (a cell's farthest point
    from its centre is under that) are kept.
    """
    import h3.api.basic_int as h3int
    import h3ronpy.vector as h3v

    res = int(vectors.resolution)
    cover = cover_level(res, radius_m)
    if cover is None:
        return None
    coarse, rings = cover
    disk = np.array(h3cells.disk(h3cells.cell_at(lat, lng, coarse), rings), dtype=np.uint64)
    centres = h3v.cells_to_coordinates(disk)  # vectorised: a Python loop over the cells cost 0.5 ms
    reach = radius_m + 2.0 * h3int.average_hexagon_edge_length(coarse, unit="m")
    near = haversine_m(lat, lng, np.asarray(centres.column("lat")), np.asarray(centres.column("lng"))) <= reach
    disk = disk[near]
    lo, hi = h3cells.descendant_ranges(disk, res)
    starts = np.searchsorted(vectors.h3, lo, side="left")
    ends = np.searchsorted(vectors.h3, hi, side="right")
    order = np.argsort(starts)
    starts, ends = starts[order], ends[order]
    lengths = ends - starts
    # the ranges' rows in one go: 0..total, shifted by each range's start
    offsets = np.cumsum(lengths) - lengths
    out: np.ndarray = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - offsets, lengths)
    return out


@functools.cache
def _wgs84() -> Any:
    from pyproj import Geod

    return Geod(ellps="WGS84")


def geodesic_m(lat: float, lng: float, lats: np.ndarray, lngs: np.ndarray) -> np.ndarray:
    """Geodesic distances in metres on the WGS84 ellipsoid from one point to many (pyproj)."""
    n = lats.shape[0]
    _, _, dist = _wgs84().inv(np.full(n, lng), np.full(n, lat), lngs, lats)
    out: np.ndarray = np.asarray(dist, dtype=np.float64)
    return out


def nearest(vectors: CellVectors, row: int, k: int, area: Area, exclude_self: bool = True) -> np.ndarray:
    """Rows of the ``k`` cells most similar (cosine) to row ``row``, most similar first (ties: lower h3),
    among those inside ``area`` (radius measured on the WGS84 ellipsoid, like the database's queries).

    An exact scan of the area's cells, as the database's exact path, over the in-memory embeddings.
    """
    inside = area.rows(vectors, geodesic=True)
    if inside is None:
        inside = np.arange(vectors.n, dtype=np.int64)
    if exclude_self:
        inside = inside[inside != row]
    sim = vectors.embedding[inside] @ vectors.embedding[row]
    # ``inside`` ascends with h3, so top_k's ties (lower position first) break by h3 as the database's do
    out: np.ndarray = inside[scores.top_k(sim, k)]
    return out


def haversine_m(lat: float, lng: float, lats: np.ndarray, lngs: np.ndarray) -> np.ndarray:
    """Great-circle distances in metres from one point to many (spherical Earth)."""
    p1, p2 = np.radians(lat), np.radians(lats)
    dp, dl = p2 - p1, np.radians(lngs - lng)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    out: np.ndarray = 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0, 1)))
    return out


@dataclass(frozen=True)
class Example:
    """One example as given and as found.

    Attributes:
        role: ``positive`` or ``negative``.
        param: The request parameter, e.g. ``positives[1]``.
        cell: The H3 cell it names.
        row: Its row in the vectors, or -1 when it has no embedding.
        reason: Why it has none (None when it has one).
    """

    role: str
    param: str
    cell: int
    row: int
    reason: str | None = None

    def to_dict(self, vectors: CellVectors) -> dict[str, Any]:
        lat, lng = (float(vectors.lat[self.row]), float(vectors.lng[self.row])) if self.row >= 0 else _centre(self.cell)
        return {
            "role": self.role,
            "param": self.param,
            "h3": h3cells.to_str(self.cell),
            "lat": lat,
            "lng": lng,
            "used": self.row >= 0,
            "reason": self.reason,
        }


def _centre(cell: int) -> tuple[float, float]:
    import h3.api.basic_int as h3int

    lat, lng = h3int.cell_to_latlng(cell)
    return float(lat), float(lng)


def resolve_examples(
    vectors: CellVectors, positives: Sequence[int], negatives: Sequence[int], missing: MissingFn | None
) -> list[Example]:
    """The examples with their rows; reasons for those without an embedding come from ``missing``.

    Raises:
        NoExamples: no positive has an embedding.
    """
    roles = [("positive", "positives", positives), ("negative", "negatives", negatives)]
    cells = np.array([c for _, _, cs in roles for c in cs], dtype=np.uint64)
    rows = vectors.index_of(cells)
    absent = np.flatnonzero(rows < 0)
    reasons = (missing(cells[absent]) if missing else ["no embedding"] * absent.size) if absent.size else []
    why = dict(zip(absent.tolist(), reasons, strict=True))
    out = []
    i = 0
    for role, param, cs in roles:
        for j, c in enumerate(cs):
            out.append(Example(role, f"{param}[{j}]", int(c), int(rows[i]), why.get(i)))
            i += 1
    if not any(e.row >= 0 for e in out if e.role == "positive"):
        raise NoExamples([e.to_dict(vectors) | {"param": e.param} for e in out if e.role == "positive"])
    return out


@dataclass
class Query:
    """A checked search by example.

    Attributes:
        positives: Positive example cells (at the loaded resolution).
        negatives: Negative example cells.
        mode: ``similar`` or ``classify``.
        k: Results wanted.
        area: Where results may lie.
    """

    positives: list[int]
    negatives: list[int] = field(default_factory=list)
    mode: str = "similar"
    k: int = 10
    area: Area = field(default_factory=Area)


@dataclass
class Answer:
    """What a query found.

    Attributes:
        score_map: Every cell's scores.
        examples: Every example, used or not.
        rows: Rows of the results, best first.
        area_cells: Cells inside the area (None: no area).
        pos: Rows of the positives used (sorted, unique).
        neg: Rows of the negatives used (not positives too).
    """

    score_map: scores.ScoreMap
    examples: list[Example]
    rows: np.ndarray
    area_cells: int | None
    pos: np.ndarray
    neg: np.ndarray

    def results(self, boundary: bool = False) -> list[dict[str, Any]]:
        """The results as ``{h3, lat, lng, score}`` (score: percent or probability, :meth:`ScoreMap.shown`).

        Args:
            boundary: Add each cell's hexagon (``boundary``: [lng, lat] vertices, continuous across ±180°).
        """
        v = self.score_map.vectors
        r = self.rows
        h3s = h3cells.to_strs(v.h3[r]).astype(str).tolist()
        shown = self.score_map.shown(r).tolist()
        out = [
            {"h3": h, "lat": la, "lng": lo, "score": s}
            for h, la, lo, s in zip(h3s, v.lat[r].tolist(), v.lng[r].tolist(), shown, strict=True)
        ]
        if boundary:
            for d, c in zip(out, v.h3[r].tolist(), strict=True):
                d["boundary"] = h3cells.boundary(c)
        return out

    def export(self) -> export.Results:
        """The results as columns for :mod:`vectorgeo.export`."""
        v, r, smap = self.score_map.vectors, self.rows, self.score_map
        return export.Results(v.h3[r], v.lat[r], v.lng[r], smap.shown(r), smap.kind, smap.id)


def run(
    vectors: CellVectors,
    query: Query,
    *,
    missing: MissingFn | None = None,
    cached: Callable[[str], scores.ScoreMap | None] | None = None,
) -> Answer:
    """Score every cell for a query and pick its results.

    Args:
        vectors: The loaded embeddings.
        query: The checked query.
        missing: Reasons for example cells without an embedding (e.g. from the database).
        cached: Look-up of an already computed score map by id.

    Raises:
        NoExamples: no positive has an embedding.
        RequestError: examples that cancel out, a radius without a centre.
    """
    examples = resolve_examples(vectors, query.positives, query.negatives, missing)
    pos = np.array(sorted({e.row for e in examples if e.role == "positive" and e.row >= 0}), dtype=np.int64)
    neg = np.array(sorted({e.row for e in examples if e.role == "negative" and e.row >= 0}), dtype=np.int64)
    neg = neg[~np.isin(neg, pos)]
    map_id = scores.score_id(vectors, query.mode, vectors.h3[pos].tolist(), vectors.h3[neg].tolist())
    smap = cached(map_id) if cached is not None else None
    if smap is None:
        smap = scores.score_all(vectors, query.mode, pos, neg, map_id)
    area = query.area
    if area.radius_m is not None and area.center is None:
        first = next(e for e in examples if e.role == "positive" and e.row >= 0)
        centre = (float(vectors.lat[first.row]), float(vectors.lng[first.row]))
        area = Area(area.radius_m, centre, area.bbox, area.polygon)
    inside = area.rows(vectors)
    excluded = np.concatenate([pos, neg])
    if inside is None:  # every cell: mask the examples in a copy instead of listing n candidate rows
        raw = smap.raw.copy()
        raw[excluded] = -np.inf
        rows = scores.top_k(raw, query.k)
        rows = rows[np.isfinite(raw[rows])]
    else:
        rows = scores.top_k(smap.raw, query.k, inside[~np.isin(inside, excluded)])
    return Answer(smap, examples, rows, None if inside is None else int(inside.size), pos, neg)
