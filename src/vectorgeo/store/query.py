"""Queries: one cell's row, and the k most similar cells (cosine) to a cell, a point or a vector.

A similarity query is checked (:func:`_check_request`), its query vector and centre looked up
(:func:`_query_point`), its plan chosen (:func:`vectorgeo.store.plan.use_exact`) and run by
:func:`_exact_sql` or :func:`_index_sql`. Queries run with parallel workers and JIT off: both cost
more than they save at a few milliseconds per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from vectorgeo import h3cells
from vectorgeo.errors import RequestError
from vectorgeo.store.catalog import Dataset, dataset, resolution
from vectorgeo.store.connection import database_error
from vectorgeo.store.plan import SpatialFilter, spatial_filter, use_exact
from vectorgeo.store.settings import QuerySettings
from vectorgeo.validation import (
    BBox,
    check_center,
    check_k,
    check_lat_lng,
    check_method,
    check_radius,
    check_vector,
    parse_bbox,
    parse_cell,
)


def _to_numpy(value: Any) -> np.ndarray:
    """A loaded vector (pgvector ``Vector`` or array) as float32 numpy."""
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.float32)


def get_cell(
    conn: psycopg.Connection[Any], h3: Any, model_version: str | None = None, ds: Dataset | None = None
) -> dict[str, Any] | None:
    """One cell's row, or None when the cell is not in the database.

    Args:
        conn: From :func:`vectorgeo.store.connect`.
        h3: The cell (int or hex string).
        model_version: Dataset to read; default the active one.
        ds: The dataset when the caller has it (a server that keeps it): no catalog lookup.

    Returns:
        Keys h3 (int), lat, lng, embedding (float32 array or None), status, region (hex), model_version.

    Raises:
        RequestError: ``h3`` is not a valid cell.
    """
    cell = parse_cell(h3)
    ds = ds or dataset(conn, model_version)
    row = conn.execute(
        sql.SQL("SELECT h3, ST_Y(geom), ST_X(geom), embedding, status, region FROM {} WHERE h3 = %s").format(ds.ident),
        (cell,),
    ).fetchone()
    if row is None:
        return None
    return {
        "h3": int(row[0]),
        "lat": float(row[1]),
        "lng": float(row[2]),
        "embedding": None if row[3] is None else _to_numpy(row[3]),
        "status": row[4],
        "region": h3cells.to_str(row[5]),
        "model_version": ds.model_version,
    }


@dataclass(frozen=True)
class _Request:
    """The checked parameters of a similarity query."""

    k: int
    method: str
    radius_m: float | None
    bbox: BBox | None
    center: tuple[float, float] | None


@dataclass(frozen=True)
class _QueryPoint:
    """The query vector, the query cell (None for a vector query) and the radius centre."""

    vector: np.ndarray
    cell: int | None
    center: tuple[float, float] | None


def _check_request(h3: Any, vector: Any, k: Any, method: Any, radius_m: Any, bbox: Any, center: Any) -> _Request:
    """The parameters that need no database, checked.

    Raises:
        RequestError: naming the first invalid parameter.
    """
    k = check_k(k)
    if (h3 is None) == (vector is None):
        raise RequestError("h3", "give exactly one of h3 and vector")
    method = check_method(method)
    radius = None if radius_m is None else check_radius(radius_m)
    box = None if bbox is None else parse_bbox(bbox)
    if radius is not None and center is None and vector is not None:
        raise RequestError("center", "a radius around a query vector needs center=(lat, lng)")
    return _Request(k, method, radius, box, None if center is None else check_center(center))


def _query_point(
    conn: psycopg.Connection[Any], ds: Dataset, h3: Any, vector: Any, center: tuple[float, float] | None
) -> _QueryPoint:
    """The query vector: the embedding of cell ``h3`` (whose centroid is the default centre), or ``vector``.

    Raises:
        RequestError: invalid cell or vector, a cell not loaded or without embedding.
    """
    if h3 is None:
        return _QueryPoint(check_vector(vector, ds.dim), None, center)
    cell = parse_cell(h3)
    row = conn.execute(
        sql.SQL("SELECT embedding, ST_Y(geom), ST_X(geom), status FROM {} WHERE h3 = %s").format(ds.ident),
        (cell,),
    ).fetchone()
    if row is None:
        raise RequestError(
            "h3", f"cell {h3cells.to_str(cell)} is not in the database (model_version {ds.model_version!r})"
        )
    if row[0] is None:
        raise RequestError("h3", f"cell {h3cells.to_str(cell)} has no embedding (status {row[3]!r})")
    return _QueryPoint(_to_numpy(row[0]), cell, center or (float(row[1]), float(row[2])))


def _exact_sql(ds: Dataset, cond: sql.Composable) -> sql.Composed:
    """Every filtered row ranked: "+ 0" makes an ORDER BY expression the HNSW index cannot serve."""
    return sql.SQL(
        "SELECT h3, ST_Y(geom), ST_X(geom), 1 - (embedding <=> %(q)s) FROM {t} WHERE {cond} "
        "ORDER BY (embedding <=> %(q)s) + 0, h3 LIMIT %(k)s"
    ).format(t=ds.ident, cond=cond)


def _index_sql(ds: Dataset, cond: sql.Composable, local: bool = False) -> sql.Composed:
    """The first ``candidates`` rows of an HNSW scan (relaxed order with an iterative scan), re-ranked
    exactly with the float32 embeddings (also when the index holds half-precision ones); the best k.

    ``candidates`` is the scan's candidate list (``ef_search``): the scan has their index distances at
    hand anyway, and re-ranking them all, not only the first k, recovers neighbours that the index's
    (float16, relaxed) order puts just after the k-th.

    With ``local``, the cells ``%(local)s`` (the query cell's neighbourhood, by primary key) that pass
    the same filter join the candidates: an HNSW search can miss a badly connected neighbourhood whatever
    its candidate list, and a cell's most similar cells are often its neighbours.
    """
    local_sql = sql.SQL(
        " UNION SELECT h3, geom, embedding <=> %(q)s AS dist FROM {t} WHERE h3 = ANY(%(local)s) AND {cond}"
    )
    return sql.SQL(
        "WITH c AS MATERIALIZED ((SELECT h3, geom, embedding <=> %(q)s AS dist FROM {t} WHERE {cond} "
        "ORDER BY {key} <=> {q} LIMIT %(candidates)s){local}) "
        "SELECT h3, ST_Y(geom), ST_X(geom), 1 - dist FROM c ORDER BY dist, h3 LIMIT %(k)s"
    ).format(
        t=ds.ident,
        cond=cond,
        key=ds.hnsw_key(),
        q=ds.hnsw_query("q"),
        local=local_sql.format(t=ds.ident, cond=cond) if local else sql.SQL(""),
    )


def _index_gucs(settings: QuerySettings, k: int, iterative: bool) -> tuple[str, ...]:
    """(name, value) pairs of the HNSW scan settings, flattened."""
    return (
        "hnsw.ef_search",
        str(max(settings.ef_search, k)),
        "hnsw.iterative_scan",
        "relaxed_order" if iterative else "off",
        "hnsw.max_scan_tuples",
        str(settings.max_scan_tuples),
    )


def _run(
    conn: psycopg.Connection[Any], query: sql.Composed, params: dict[str, Any], gucs: tuple[str, ...]
) -> list[tuple[Any, ...]]:
    """Run a query with its settings, parallel workers and JIT off, in a transaction: the caller's when it
    has one open (a server request: the settings then last until its end, no savepoint), else its own."""

    def run() -> list[tuple[Any, ...]]:
        # parallel workers and JIT compilation (triggered by the HNSW scan's huge cost estimate) cost
        # more than they save on queries of a few milliseconds
        conn.execute(
            "SELECT set_config('max_parallel_workers_per_gather', '0', true), set_config('jit', 'off', true)"
            + ", set_config(%s, %s, true)" * (len(gucs) // 2),
            gucs,
        )
        rows: list[tuple[Any, ...]] = conn.execute(query, params).fetchall()
        return rows

    if conn.info.transaction_status == TransactionStatus.INTRANS:
        return run()
    with conn.transaction():
        return run()


def _search(
    conn: psycopg.Connection[Any],
    ds: Dataset,
    settings: QuerySettings,
    req: _Request,
    point: _QueryPoint,
    exclude_self: bool,
) -> list[tuple[Any, ...]]:
    """Plan and run the query; rows (h3, lat, lng, similarity)."""
    spatial: SpatialFilter = spatial_filter(req.radius_m, point.center, req.bbox)
    params: dict[str, Any] = {"k": req.k, "q": point.vector, **spatial.params}
    where: list[sql.Composable] = [sql.SQL("embedding IS NOT NULL")]
    if exclude_self and point.cell is not None:
        where.append(sql.SQL("h3 <> %(self)s"))
        params["self"] = point.cell
    try:
        if use_exact(conn, ds, spatial, req.k, req.method, settings.exact_scan_max_rows):
            return _run(conn, _exact_sql(ds, sql.SQL(" AND ").join(where + spatial.exact)), params, ())
        gucs = _index_gucs(settings, req.k, iterative=bool(spatial) or exclude_self)
        params["candidates"] = max(settings.ef_search, req.k)
        local = point.cell is not None and settings.local_rings > 0
        if local:
            assert point.cell is not None
            params["local"] = h3cells.disk(point.cell, settings.local_rings)
        return _run(conn, _index_sql(ds, sql.SQL(" AND ").join(where + spatial.index), local), params, gucs)
    except psycopg.Error as e:
        raise database_error("similarity query", e) from None


def similar(
    conn: psycopg.Connection[Any],
    settings: QuerySettings,
    *,
    h3: Any = None,
    vector: Any = None,
    k: int = 10,
    radius_m: float | None = None,
    bbox: Any = None,
    exclude_self: bool = True,
    center: tuple[float, float] | None = None,
    model_version: str | None = None,
    method: str = "auto",
    ds: Dataset | None = None,
) -> list[dict[str, Any]]:
    """The k cells most similar (cosine) to a cell or a vector, optionally spatially filtered.

    Args:
        conn: From :func:`vectorgeo.store.connect`.
        settings: HNSW search settings and the exact-scan threshold (config section ``database``).
        h3: Query cell (int or hex string); its embedding is the query vector.
        vector: Query vector of the embedding dimension (instead of ``h3``).
        k: Number of results, 1..:data:`~vectorgeo.validation.MAX_K`.
        radius_m: Keep cells within this geodesic distance (metres) of ``center``, default the
            query cell's centroid.
        bbox: Keep cells inside (west, south, east, north) degrees; west > east crosses the antimeridian.
        exclude_self: Leave the query cell out of the results.
        center: (lat, lng) of the radius centre; needed with ``vector`` and ``radius_m``.
        model_version: Dataset to query; default the active one.
        method: ``auto`` (exact when the filter is estimated to keep at most
            :func:`~vectorgeo.store.plan.exact_scan_limit` rows, else HNSW with an iterative scan),
            ``exact`` or ``index``.
        ds: The dataset when the caller has it (a server that keeps it): no catalog lookup.

    Returns:
        Dicts with keys h3 (int), lat, lng, similarity (1 - cosine distance), most similar first.

    Raises:
        RequestError: invalid parameter, unknown query cell, or a cell without embedding.
        DatabaseError: nothing loaded, or the query failed.
    """
    req = _check_request(h3, vector, k, method, radius_m, bbox, center)
    ds = ds or dataset(conn, model_version)
    point = _query_point(conn, ds, h3, vector, req.center)
    rows = _search(conn, ds, settings, req, point, exclude_self)
    return [{"h3": int(r[0]), "lat": float(r[1]), "lng": float(r[2]), "similarity": float(r[3])} for r in rows]


def similar_to_point(
    conn: psycopg.Connection[Any],
    settings: QuerySettings,
    lat: Any,
    lng: Any,
    *,
    k: int = 10,
    radius_m: float | None = None,
    bbox: Any = None,
    exclude_self: bool = True,
    model_version: str | None = None,
    method: str = "auto",
) -> list[dict[str, Any]]:
    """The k most similar cells to the cell containing (lat, lng); a radius is measured from the point.

    Arguments are those of :func:`similar`.

    Raises:
        RequestError: invalid parameter, or no loaded cell with an embedding at the point.
        DatabaseError: nothing loaded, or the query failed.
    """
    y, x = check_lat_lng(lat, lng)
    cell = h3cells.cell_at(y, x, resolution(conn, model_version))
    return similar(
        conn,
        settings,
        h3=cell,
        k=k,
        radius_m=radius_m,
        bbox=bbox,
        exclude_self=exclude_self,
        center=(y, x),
        model_version=model_version,
        method=method,
    )
