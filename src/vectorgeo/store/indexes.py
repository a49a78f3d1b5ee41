"""Indexes after the bulk load: GIST on the points, HNSW on the embeddings, then ANALYZE and activation."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import psycopg
from psycopg import sql

from vectorgeo.store.catalog import Dataset, dataset, fetch_one, newest
from vectorgeo.store.settings import IndexSettings


def hnsw_index_name(ds: Dataset, settings: IndexSettings) -> str:
    """Name of the HNSW index of a dataset, carrying its parameters (so that a change rebuilds it)."""
    half = "_half" if settings.hnsw_storage == "halfvec" else ""
    return f"{ds.table}_hnsw{half}_m{settings.hnsw_m}_ef{settings.hnsw_ef_construction}"


def _create_indexes(
    conn: psycopg.Connection[Any], ds: Dataset, settings: IndexSettings, notices: list[str]
) -> dict[str, float]:
    """GIST, HNSW (an HNSW index with other parameters is dropped first), ANALYZE; seconds per step."""
    t = ds.ident
    hnsw_name = hnsw_index_name(ds, settings)
    built = replace(ds, hnsw_storage=settings.hnsw_storage)
    timings: dict[str, float] = {}
    conn.execute(
        "SELECT set_config('maintenance_work_mem', %s, false), "
        "set_config('max_parallel_maintenance_workers', %s, false)",
        (settings.maintenance_work_mem, str(settings.build_workers)),
    )
    t0 = time.perf_counter()
    conn.execute(
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING gist (geom)").format(sql.Identifier(f"{ds.table}_geom"), t)
    )
    timings["gist_s"] = time.perf_counter() - t0
    stale = conn.execute(
        "SELECT indexname FROM pg_indexes WHERE tablename = %s AND indexname LIKE %s AND indexname <> %s",
        (ds.table, f"{ds.table}_hnsw%", hnsw_name),
    ).fetchall()
    for (name,) in stale:
        conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(name)))
    t0 = time.perf_counter()

    # the pgvector notice when the graph outgrows maintenance_work_mem (the build then slows down) goes
    # into the summary
    def notice(d: psycopg.errors.Diagnostic) -> None:
        notices.append(str(d.message_primary))

    conn.add_notice_handler(notice)
    try:
        conn.execute(
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw ({} {}) WITH (m = {}, ef_construction = {})"
            ).format(
                sql.Identifier(hnsw_name),
                t,
                built.hnsw_key(),
                sql.SQL(f"{settings.hnsw_storage}_cosine_ops"),
                sql.Literal(settings.hnsw_m),
                sql.Literal(settings.hnsw_ef_construction),
            )
        )
    finally:
        conn.remove_notice_handler(notice)
    timings["hnsw_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    conn.execute(sql.SQL("ANALYZE {}").format(t))
    timings["analyze_s"] = time.perf_counter() - t0
    return timings


def _record(conn: psycopg.Connection[Any], ds: Dataset, params: dict[str, Any], activate: bool) -> None:
    """Record the index parameters and, with ``activate``, make the dataset the one queries use."""
    with conn.transaction():
        conn.execute(
            "UPDATE vectorgeo_datasets SET indexed_at = now(), index_params = %s WHERE model_version = %s",
            (json.dumps(params), ds.model_version),
        )
        if activate:
            conn.execute(
                """INSERT INTO vectorgeo_state (key, value) VALUES ('active', %s)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value""",
                (ds.model_version,),
            )


def build_indexes(
    conn: psycopg.Connection[Any],
    settings: IndexSettings,
    *,
    model_version: str | None = None,
    activate: bool = True,
) -> dict[str, Any]:
    """Build the GIST (geometry) and HNSW indexes, ANALYZE, and make the dataset the active one.

    Existing indexes with the same parameters are kept (so a rerun after reloading one region costs
    only the ANALYZE).

    Args:
        conn: From :func:`vectorgeo.store.connect`.
        settings: HNSW parameters and the build's memory.
        model_version: Dataset to index; default the newest loaded (the index step activates it).
        activate: Make the dataset the one queries use.

    Returns:
        A summary: model_version, table, rows, hnsw_m, hnsw_ef_construction, hnsw_storage, build_workers,
        hnsw_bytes (the index size), notices (PostgreSQL's, e.g. a graph that outgrew maintenance_work_mem),
        seconds per step.

    Raises:
        DatabaseError: nothing loaded, or the version is unknown.
    """
    ds = dataset(conn, model_version)
    if model_version is None:
        # the newest load, not the currently active one: the index step is what activates it
        ds = newest(conn)
    notices: list[str] = []
    timings = _create_indexes(conn, ds, settings, notices)
    params = {
        "hnsw_m": settings.hnsw_m,
        "hnsw_ef_construction": settings.hnsw_ef_construction,
        "hnsw_storage": settings.hnsw_storage,
    }
    _record(conn, ds, params, activate)
    rows = int(fetch_one(conn, sql.SQL("SELECT count(*) FROM {}").format(ds.ident))[0])
    size = fetch_one(conn, "SELECT pg_relation_size(%s)", (hnsw_index_name(ds, settings),))[0]
    return {
        "model_version": ds.model_version,
        "table": ds.table,
        "rows": rows,
        **params,
        "build_workers": settings.build_workers,
        "hnsw_bytes": int(size),
        "notices": notices,
        **{k: round(v, 3) for k, v in timings.items()},
    }
