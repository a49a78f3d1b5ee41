"""Spatial filters of a similarity query and the choice between an exact scan and the HNSW index.

With a radius or bbox, the planner's row estimate R for the filter's bounding boxes (geometry
statistics) decides. R at most :func:`exact_scan_limit` (sqrt(2 N k) by default) → exact: the rows
in the boxes are fetched through the GIST index, kept when within the radius (geodesic on WGS84; a
great-circle test first decides all but a thin ring) and all ranked by cosine distance. Larger →
pgvector's HNSW index with an iterative scan (``hnsw.iterative_scan = relaxed_order``, then an exact
re-sort of the k found), which keeps fetching candidates in order of distance until k of them pass
the filter (a cheap lat/lng box test, then the geodesic distance); a filter that keeps at least that
share of the rows makes this near-exact (recall measured by benchmarks/load.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from vectorgeo.store.catalog import Dataset, fetch_one
from vectorgeo.validation import BBox

# exact vs HNSW for a filter estimated to keep R of N rows: the exact scan costs ~R row visits, the
# iterative HNSW scan ~N k / R candidates at ~1.5 times the cost each (measured at 4M rows with
# benchmarks/load.py: an exact scan ~1.2 us per filtered row, the index ~1.9 us per candidate): exact
# when R <= sqrt(2 N k), about 4,500 rows for N = 1M and 8,900 for N = 4M at k = 10
EXACT_SCAN_COST_RATIO = 2.0
EARTH_MEAN_RADIUS_M = 6_371_008.8


@dataclass
class SpatialFilter:
    """A radius and/or bbox filter, each condition in two SQL forms.

    Attributes:
        exact: Indexable conditions (GIST on geom), for the exact path.
        index: The same conditions, not indexable: checked on HNSW candidates only, so that the
            planner cannot trade the HNSW scan for a GIST scan.
        envelopes: Per condition, the lat/lng boxes covering it (for the row estimate).
        params: Named query parameters of the conditions.
    """

    exact: list[sql.Composable] = field(default_factory=list)
    index: list[sql.Composable] = field(default_factory=list)
    envelopes: list[list[BBox]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.exact)


def circle_envelopes(lat: float, lng: float, radius_m: float) -> list[BBox]:
    """Lat/lng boxes (west, south, east, north) covering a spherical cap; two when it crosses ±180°.

    With angular radius δ = r / R: latitudes lat ± δ (clipped; a cap that reaches a pole spans all
    longitudes), longitudes lng ± asin(sin δ / cos lat) (all when sin δ ≥ cos lat).
    """
    delta = radius_m / EARTH_MEAN_RADIUS_M
    dlat = math.degrees(delta)
    south, north = lat - dlat, lat + dlat
    if south <= -90 or north >= 90 or math.sin(delta) >= math.cos(math.radians(lat)):
        return [(-180.0, max(south, -90.0), 180.0, min(north, 90.0))]
    dlng = math.degrees(math.asin(math.sin(delta) / math.cos(math.radians(lat))))
    west, east = lng - dlng, lng + dlng
    if west < -180:
        return [(west + 360, south, 180.0, north), (-180.0, south, east, north)]
    if east > 180:
        return [(west, south, 180.0, north), (-180.0, south, east - 360, north)]
    return [(west, south, east, north)]


def _add_radius(f: SpatialFilter, radius_m: float, center: tuple[float, float]) -> None:
    delta = radius_m / EARTH_MEAN_RADIUS_M
    f.params.update(
        radius=radius_m,
        clat=center[0],
        clng=center[1],
        cos_clat=math.cos(math.radians(center[0])),
        hav_in=math.sin(0.99 * delta / 2) ** 2,
        hav_out=math.sin(min(1.01 * delta, math.pi) / 2) ** 2,
    )
    point = "ST_SetSRID(ST_MakePoint(%(clng)s, %(clat)s), 4326)::geography"
    # Boxes around the circle, computed on the sphere for 1.01 r. Geodesic (WGS84) and great-circle
    # (sphere of the mean radius) distances differ by less than 0.6%, so: within the boxes (GIST on
    # geom, or two float comparisons on an HNSW candidate), great-circle distance <= 0.99 r means
    # inside, > 1.01 r means outside, and only the ring between needs the slower geodesic distance.
    # The great-circle test compares the haversine term of the point's own lat/lng with the one of
    # 0.99 r and 1.01 r: a few float operations, 2.4x faster than PostGIS's spherical distance of a
    # geography (which dominated an exact scan's time: benchmarks/load.py).
    boxes = circle_envelopes(center[0], center[1], radius_m * 1.01)
    in_box: list[sql.Composable] = []
    on_box: list[sql.Composable] = []
    for j, (bw, bs, be, bn) in enumerate(boxes):
        f.params.update({f"bw{j}": bw, f"bs{j}": bs, f"be{j}": be, f"bn{j}": bn})
        in_box.append(
            sql.SQL(f"(ST_X(geom) BETWEEN %(bw{j})s AND %(be{j})s AND ST_Y(geom) BETWEEN %(bs{j})s AND %(bn{j})s)")
        )
        on_box.append(sql.SQL(f"geom && ST_MakeEnvelope(%(bw{j})s, %(bs{j})s, %(be{j})s, %(bn{j})s, 4326)"))
    hav = (
        "(sind((ST_Y(geom) - %(clat)s) / 2) ^ 2 "
        "+ cosd(ST_Y(geom)) * %(cos_clat)s * sind((ST_X(geom) - %(clng)s) / 2) ^ 2)"
    )
    # ST_Distance rather than ST_DWithin: not indexable, so that the planner keeps the HNSW scan
    distance = sql.SQL(
        f"({hav} <= %(hav_in)s OR ({hav} <= %(hav_out)s AND ST_Distance(geom::geography, {point}) <= %(radius)s))"
    )
    f.exact += [sql.SQL("(") + sql.SQL(" OR ").join(on_box) + sql.SQL(")"), distance]
    f.index += [sql.SQL("(") + sql.SQL(" OR ").join(in_box) + sql.SQL(")"), distance]
    f.envelopes.append(boxes)


def _add_bbox(f: SpatialFilter, bbox: BBox) -> None:
    w, s, e, n = bbox
    f.params.update(w=w, s=s, e=e, n=n)
    if w < e:
        f.exact.append(sql.SQL("geom && ST_MakeEnvelope(%(w)s, %(s)s, %(e)s, %(n)s, 4326)"))
        f.index.append(sql.SQL("ST_X(geom) BETWEEN %(w)s AND %(e)s AND ST_Y(geom) BETWEEN %(s)s AND %(n)s"))
        f.envelopes.append([(w, s, e, n)])
        return
    f.exact.append(
        sql.SQL(
            "(geom && ST_MakeEnvelope(%(w)s, %(s)s, 180, %(n)s, 4326) "
            "OR geom && ST_MakeEnvelope(-180, %(s)s, %(e)s, %(n)s, 4326))"
        )
    )
    f.index.append(sql.SQL("(ST_X(geom) >= %(w)s OR ST_X(geom) <= %(e)s) AND ST_Y(geom) BETWEEN %(s)s AND %(n)s"))
    f.envelopes.append([(w, s, 180.0, n), (-180.0, s, e, n)])


def spatial_filter(radius_m: float | None, center: tuple[float, float] | None, bbox: BBox | None) -> SpatialFilter:
    """The filter of validated parameters: within ``radius_m`` of ``center`` (lat, lng), inside ``bbox``."""
    f = SpatialFilter()
    if radius_m is not None:
        if center is None:
            raise ValueError("a radius needs a center")
        _add_radius(f, radius_m, center)
    if bbox is not None:
        _add_bbox(f, bbox)
    return f


def estimate_rows(conn: psycopg.Connection[Any], query: sql.Composable, params: Any) -> float:
    """The planner's row estimate for a query (EXPLAIN, not executed)."""
    plan = fetch_one(conn, sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params)[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def estimate_envelope_rows(conn: psycopg.Connection[Any], ds: Dataset, boxes: Sequence[BBox]) -> float:
    """Planner estimate of the rows whose point lies in any of the boxes (geometry statistics)."""
    query = sql.SQL("SELECT 1 FROM {} WHERE ").format(ds.ident) + sql.SQL(" OR ").join(
        sql.SQL("geom && ST_MakeEnvelope(%s, %s, %s, %s, 4326)") for _ in boxes
    )
    return estimate_rows(conn, query, [x for b in boxes for x in b])


def exact_scan_limit(conn: psycopg.Connection[Any], ds: Dataset, k: int, exact_scan_max_rows: int | None) -> float:
    """Largest estimated filtered row count answered by an exact scan: ``exact_scan_max_rows``, else
    sqrt(EXACT_SCAN_COST_RATIO * N * k) with N the table's row estimate (pg_class.reltuples)."""
    if exact_scan_max_rows is not None:
        return float(exact_scan_max_rows)
    row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (ds.table,)).fetchone()
    n = max(float(row[0]) if row else 0.0, 1.0)
    return math.sqrt(EXACT_SCAN_COST_RATIO * n * k)


def use_exact(
    conn: psycopg.Connection[Any],
    ds: Dataset,
    spatial: SpatialFilter,
    k: int,
    method: str,
    exact_scan_max_rows: int | None,
) -> bool:
    """True when the query runs as an exact scan: ``method`` exact, or auto with a filter estimated
    to keep at most :func:`exact_scan_limit` rows (the most selective condition counts)."""
    if method != "auto":
        return method == "exact"
    if not spatial:
        return False
    est = min(estimate_envelope_rows(conn, ds, env) for env in spatial.envelopes)
    return est <= exact_scan_limit(conn, ds, k, exact_scan_max_rows)
