"""The catalog: one table per model version, listed in ``vectorgeo_datasets``, and which one is active.

Each ``model_version`` gets its own table ``cells_<sha1(model_version)[:16]>`` (``h3 bigint primary
key``, ``geom geometry(Point,4326)``, ``embedding vector(d)`` (null when the cell is unusable),
``status text``, ``region bigint``), listed in the catalog table ``vectorgeo_datasets``
(model_version, table, dim, resolution, index parameters), with the loaded regions in
``vectorgeo_regions``. Why not one table with a ``model_version`` column:

- versions can differ in dimension, and a ``vector(d)`` column has one d;
- an HNSW index over several versions would mix unrelated vector spaces, and every query would need
  a ``model_version`` filter, turning each kNN into a filtered ANN search with worse recall;
- a new version is loaded and indexed next to the one being served, and becomes the one that
  queries use (``vectorgeo_state.active``) only when its index is built: an atomic switch, and the
  old version can be dropped with one ``DROP TABLE`` instead of a huge ``DELETE``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from vectorgeo import h3cells
from vectorgeo.errors import DatabaseError, DataError
from vectorgeo.validation import parse_cell

LOCK_KEY = 0x7665_6374_6F72  # advisory lock serialising catalog changes ("vector")

CATALOG_SQL = """
CREATE TABLE IF NOT EXISTS vectorgeo_datasets (
    model_version text PRIMARY KEY,
    table_name text NOT NULL UNIQUE,
    dim integer NOT NULL CHECK (dim > 0),
    resolution integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    indexed_at timestamptz,
    index_params jsonb
);
CREATE TABLE IF NOT EXISTS vectorgeo_regions (
    model_version text NOT NULL REFERENCES vectorgeo_datasets ON DELETE CASCADE,
    region bigint NOT NULL,
    rows bigint NOT NULL,
    checksum text NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version, region)
);
CREATE TABLE IF NOT EXISTS vectorgeo_state (key text PRIMARY KEY, value text NOT NULL);
"""

_DATASET_KEYS = (
    "model_version",
    "table",
    "dim",
    "resolution",
    "created_at",
    "indexed_at",
    "index_params",
    "rows",
    "regions",
    "active",
)


@dataclass(frozen=True)
class Dataset:
    """One loaded model version: its table, dimension and H3 resolution, and how its HNSW index stores the
    embeddings (``vector``, or ``halfvec``: an index on ``embedding::halfvec(d)``; see
    :class:`~vectorgeo.store.settings.IndexSettings`)."""

    model_version: str
    table: str
    dim: int
    resolution: int
    hnsw_storage: str = "vector"

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.table)

    def hnsw_key(self) -> sql.Composable:
        """The expression the HNSW index is built on, and that an index scan must order by."""
        if self.hnsw_storage == "halfvec":
            return sql.SQL("(embedding::halfvec({}))").format(sql.Literal(self.dim))
        return sql.SQL("embedding")

    def hnsw_query(self, param: str) -> sql.Composable:
        """The query vector (named parameter ``param``) as the index compares it."""
        if self.hnsw_storage == "halfvec":
            return sql.SQL("{}::halfvec({})").format(sql.Placeholder(param), sql.Literal(self.dim))
        return sql.Placeholder(param)


def fetch_one(conn: psycopg.Connection[Any], query: str | sql.SQL | sql.Composed, params: Any = None) -> Any:
    """The one row a query returns (an aggregate, a catalog lookup that must succeed)."""
    row = conn.execute(query, params).fetchone()
    if row is None:
        raise DatabaseError(f"query returned no row: {query!r}")
    return row


def ensure_catalog(conn: psycopg.Connection[Any]) -> None:
    """Create the catalog tables (idempotent)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(CATALOG_SQL)


def table_name(model_version: str) -> str:
    """Table of a model version: ``cells_`` + the first 16 hex digits of sha1(model_version)."""
    return "cells_" + hashlib.sha1(model_version.encode()).hexdigest()[:16]


def catalog_exists(conn: psycopg.Connection[Any]) -> bool:
    """True when the catalog tables were created (by a load or :func:`ensure_catalog`)."""
    return bool(fetch_one(conn, "SELECT to_regclass('vectorgeo_datasets') IS NOT NULL")[0])


def datasets(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """The loaded model versions, newest first, with row counts per the catalog."""
    if not catalog_exists(conn):
        return []
    rows = conn.execute(
        """SELECT d.model_version, d.table_name, d.dim, d.resolution, d.created_at, d.indexed_at, d.index_params,
                  coalesce(sum(r.rows), 0), count(r.region), s.value IS NOT NULL
           FROM vectorgeo_datasets d
           LEFT JOIN vectorgeo_regions r USING (model_version)
           LEFT JOIN vectorgeo_state s ON s.key = 'active' AND s.value = d.model_version
           GROUP BY d.model_version, s.value ORDER BY d.created_at DESC"""
    ).fetchall()
    return [dict(zip(_DATASET_KEYS, r, strict=True)) for r in rows]


# the columns of a Dataset, in order (the index storage as recorded by the last index build)
_DATASET_COLUMNS = (
    "d.model_version, d.table_name, d.dim, d.resolution, coalesce(d.index_params->>'hnsw_storage', 'vector')"
)


def _as_dataset(row: Any) -> Dataset:
    return Dataset(str(row[0]), str(row[1]), int(row[2]), int(row[3]), str(row[4]))


def dataset(conn: psycopg.Connection[Any], model_version: str | None = None) -> Dataset:
    """The dataset queries use: ``model_version``, else the active one, else the newest loaded.

    Raises:
        DatabaseError: nothing loaded (or the version is unknown).
    """
    if catalog_exists(conn):
        if model_version is not None:
            row = conn.execute(
                f"SELECT {_DATASET_COLUMNS} FROM vectorgeo_datasets d WHERE d.model_version = %s", (model_version,)
            ).fetchone()
        else:
            row = conn.execute(
                f"""SELECT {_DATASET_COLUMNS} FROM vectorgeo_datasets d
                   LEFT JOIN vectorgeo_state s ON s.key = 'active' AND s.value = d.model_version
                   ORDER BY s.value IS NULL, d.created_at DESC LIMIT 1"""
            ).fetchone()
        if row:
            return _as_dataset(row)
    what = f"model_version {model_version!r}" if model_version is not None else "any embeddings"
    raise DatabaseError(f"the database holds no {what}; load regions first (snakemake, rule load_regions)")


def newest(conn: psycopg.Connection[Any]) -> Dataset:
    """The most recently created dataset, active or not.

    Raises:
        DatabaseError: nothing loaded.
    """
    return _as_dataset(
        fetch_one(conn, f"SELECT {_DATASET_COLUMNS} FROM vectorgeo_datasets d ORDER BY d.created_at DESC LIMIT 1")
    )


def resolution(conn: psycopg.Connection[Any], model_version: str | None = None) -> int:
    """H3 resolution of the loaded cells."""
    return dataset(conn, model_version).resolution


def region_id(region: int | str) -> int:
    """A region cell (int or hex string) as int.

    Raises:
        RequestError: not a valid H3 cell.
    """
    return parse_cell(region, "region")


def region_range(region: int, res: int) -> tuple[int, int]:
    """The smallest and largest H3 index of the resolution-``res`` cells of a region: one key range.

    Raises:
        DataError: the region is finer than ``res``.
    """
    try:
        return h3cells.descendant_range(region, res)
    except ValueError:
        r = h3cells.resolution(region)
        raise DataError(
            h3cells.to_str(region), f"region resolution {r} is finer than the cells' resolution {res}"
        ) from None


def count(conn: psycopg.Connection[Any], region: int | str | None = None, model_version: str | None = None) -> int:
    """Rows in the dataset table (of one region when given)."""
    ds = dataset(conn, model_version)
    if region is None:
        return int(fetch_one(conn, sql.SQL("SELECT count(*) FROM {}").format(ds.ident))[0])
    lo, hi = region_range(region_id(region), ds.resolution)
    q = sql.SQL("SELECT count(*) FROM {} WHERE h3 BETWEEN %s AND %s").format(ds.ident)
    return int(fetch_one(conn, q, (lo, hi))[0])


def create_dataset(conn: psycopg.Connection[Any], model_version: str, dim: int, res: int, path: str) -> Dataset:
    """Get or create the dataset of a model version (inside the caller's transaction, under the lock).

    Raises:
        DataError: the dataset exists with another dimension or resolution.
    """
    row = conn.execute(
        f"SELECT {_DATASET_COLUMNS} FROM vectorgeo_datasets d WHERE d.model_version = %s", (model_version,)
    ).fetchone()
    if row is not None:
        ds = _as_dataset(row)
        if ds.dim != dim:
            raise DataError(
                path,
                f"embedding dimension {dim} does not match the database table {ds.table} of model_version "
                f"{model_version!r}, which holds vector({ds.dim}); nothing was written",
            )
        if ds.resolution != res:
            raise DataError(
                path, f"cells are at H3 resolution {res}, the loaded ones at {ds.resolution}; nothing was written"
            )
        return ds
    ds = Dataset(model_version, table_name(model_version), dim, res)
    conn.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {t} (
                 h3 bigint PRIMARY KEY,
                 geom geometry(Point, 4326) NOT NULL,
                 embedding vector({d}),
                 status text NOT NULL,
                 region bigint NOT NULL)"""
        ).format(t=ds.ident, d=sql.Literal(dim))
    )
    conn.execute(
        "INSERT INTO vectorgeo_datasets (model_version, table_name, dim, resolution) VALUES (%s, %s, %s, %s)",
        (model_version, ds.table, dim, res),
    )
    return ds
