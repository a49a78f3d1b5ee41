"""PostgreSQL + PostGIS + pgvector store of cell embeddings.

Public API (used by the API/viewer, the CLI and the load scripts):

- ``database_url(config=None) -> str``: the URL to use: ``VECTORGEO_DATABASE_URL``, else
  ``database.url`` in config, else the project-local cluster of :mod:`vectorgeo.db`.
- ``connect(url=None, config=None) -> psycopg.Connection``: the one way to connect (autocommit);
  registers the pgvector type. Unreachable database → :class:`~vectorgeo.errors.DatabaseError` naming
  the URL with its password masked.
- ``similar(conn, *, h3=None, vector=None, k=10, radius_m=None, bbox=None, exclude_self=True, ...)
  -> list[dict]``: k most similar cells (keys ``h3`` int, ``lat``, ``lng``, ``similarity``) to a cell
  or a vector, optionally within ``radius_m`` metres (geodesic) of the query point or inside ``bbox``
  ``(west, south, east, north)`` degrees.
- ``similar_to_point(conn, lat, lng, *, k=10, ...)``: the same for the cell containing a point.
- ``get_cell(conn, h3) -> dict | None``: keys h3, lat, lng, embedding, status, region, model_version.
- ``resolution(conn) -> int``: H3 resolution of the loaded cells.
- ``load_region(conn, path, region=None) -> dict``: replace one region from its GeoParquet file; the
  returned dict is the marker (``write_marker`` writes it atomically).
- ``build_indexes(conn, hnsw_m=16, hnsw_ef_construction=64, ...) -> dict``: GIST + HNSW, then ANALYZE.
- ``count(conn, region=None) -> int``; ``datasets(conn) -> list[dict]``.

Schema: one table per model version. Each ``model_version`` gets its own table
``cells_<sha1(model_version)[:16]>`` (``h3 bigint primary key``, ``geom geometry(Point,4326)``,
``embedding vector(d)`` (null when the cell is unusable), ``status text``, ``region bigint``), listed in
the catalog table ``vectorgeo_datasets`` (model_version, table, dim, resolution, index parameters),
with the loaded regions in ``vectorgeo_regions``. Why not one table with a ``model_version`` column:

- versions can differ in dimension, and a ``vector(d)`` column has one d;
- an HNSW index over several versions would mix unrelated vector spaces, and every query would need
  a ``model_version`` filter, turning each kNN into a filtered ANN search with worse recall;
- a new version is loaded and indexed next to the one being served, and becomes the one that
  queries use (``vectorgeo_state.active``) only when its index is built: an atomic switch, and the
  old version can be dropped with one ``DROP TABLE`` instead of a huge ``DELETE``.

Loading one region is one transaction: ``DELETE`` of the region's rows (one primary-key range, see
:func:`region_range`), binary ``COPY`` of the new rows (the stream built with numpy, no per-row
Python), catalog update, commit. A rerun replaces the region instead of duplicating it; a crash (of
the loader or of the server) at any point rolls the whole region back, because nothing is committed
before the end. The rows are COPYed straight into the table rather than into a staging table followed
by ``INSERT ... SELECT``: inside one transaction both are equally atomic and invisible to readers
until commit, but COPY inserts in batches (heap multi-insert) while ``INSERT ... SELECT`` inserts row
by row, so staging made the load about 2x slower (measured: ~1M rows/s COPY into a temp table, then
~0.2M rows/s INSERT ... SELECT, against ~0.4M rows/s COPY into the indexed table).

Filtered kNN: with a radius or bbox, the planner's row estimate R for the filter's bounding boxes
(geometry statistics) decides. R at most :func:`exact_scan_limit` (sqrt(16 N k) by default) → exact:
the rows in the boxes are fetched through the GIST index, kept when within the radius (geodesic on
WGS84; a great-circle test first decides all but a thin ring) and all ranked by cosine distance. Larger →
pgvector's HNSW index with an iterative scan (``hnsw.iterative_scan = relaxed_order``, then an exact
re-sort of the k found), which keeps fetching candidates in order of distance until k of them pass
the filter (a cheap lat/lng box test, then the geodesic distance); a filter that keeps at least that
share of the rows makes this near-exact (recall measured by benchmarks/load.py). Queries run with
parallel workers and JIT off: both cost more than they save at a few milliseconds per query.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from vectorgeo import db
from vectorgeo.atomic import write_text_atomic
from vectorgeo.errors import DatabaseError, DataError, RequestError

# defaults, the same as in config/schema.yaml (database section)
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
EF_SEARCH = 100
MAX_SCAN_TUPLES = 50000
# exact vs HNSW for a filter estimated to keep R of N rows: the exact scan costs ~R row visits, the
# iterative HNSW scan ~N k / R candidates at ~16 times the cost each (measured, benchmarks/load.py):
# exact when R <= sqrt(16 N k), about 13,000 rows for N = 1M and k = 10
EXACT_SCAN_COST_RATIO = 16.0
MAINTENANCE_WORK_MEM = "1GB"
MAX_K = 1000
EARTH_HALF_CIRCUMFERENCE_M = 20_037_509.0
COPY_CHUNK_ROWS = 65536
_LOCK_KEY = 0x7665_6374_6F72  # advisory lock serialising catalog changes ("vector")

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


@dataclass(frozen=True)
class Dataset:
    """One loaded model version: its table, dimension and H3 resolution."""

    model_version: str
    table: str
    dim: int
    resolution: int

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.table)


# --- connection -------------------------------------------------------------------------------------------
def database_url(config: Mapping[str, Any] | None = None) -> str:
    """The database URL: VECTORGEO_DATABASE_URL, database.url, else the project-local cluster."""
    return db.database_url(config)


def _mask_message(msg: str, url: str) -> str:
    try:
        from urllib.parse import unquote, urlsplit

        pw = urlsplit(url).password
    except ValueError:
        pw = None
    if pw:
        msg = msg.replace(pw, "***").replace(unquote(pw), "***")
    return re.sub(r"(password=)\S+", r"\1***", msg)


def connect(url: str | None = None, config: Mapping[str, Any] | None = None, connect_timeout: int = 10) -> Any:
    """Connect (autocommit) and register the pgvector type; the one way vectorgeo connects.

    Args:
        url: Database URL; default :func:`database_url` of ``config``.
        config: Config whose ``database`` section gives the URL when ``url`` is None.
        connect_timeout: Seconds to wait for the server.

    Returns:
        A ``psycopg.Connection`` in autocommit mode (use ``with conn.transaction():`` for several
        statements).

    Raises:
        DatabaseError: unreachable server, bad credentials or missing pgvector extension; the message
            names the URL with its password masked.
    """
    from pgvector.psycopg import register_vector

    url = url or database_url(config)
    shown = db.mask_password(url)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout)
    except (psycopg.Error, ValueError) as e:
        hint = ""
        if db.external_url(config) is None and "host=/" in url:
            hint = " (is the project-local cluster running? `vectorgeo db start`)"
        raise DatabaseError(f"cannot connect to database {shown}: {_mask_message(str(e).strip(), url)}{hint}") from None
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:
        try:
            for ext in db.EXTENSIONS:
                conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))
            register_vector(conn)
        except psycopg.Error as e:
            conn.close()
            raise DatabaseError(
                f"database {shown} lacks the extensions postgis and vector and cannot create them: {e}"
            ) from None
    return conn


def ensure_catalog(conn: Any) -> None:
    """Create the catalog tables (idempotent)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute(CATALOG_SQL)


def table_name(model_version: str) -> str:
    """Table of a model version: ``cells_`` + the first 16 hex digits of sha1(model_version)."""
    return "cells_" + hashlib.sha1(model_version.encode()).hexdigest()[:16]


def _catalog_exists(conn: Any) -> bool:
    row = conn.execute("SELECT to_regclass('vectorgeo_datasets') IS NOT NULL").fetchone()
    return bool(row[0])


def datasets(conn: Any) -> list[dict[str, Any]]:
    """The loaded model versions, newest first, with row counts per the catalog."""
    if not _catalog_exists(conn):
        return []
    rows = conn.execute(
        """SELECT d.model_version, d.table_name, d.dim, d.resolution, d.created_at, d.indexed_at, d.index_params,
                  coalesce(sum(r.rows), 0), count(r.region), s.value IS NOT NULL
           FROM vectorgeo_datasets d
           LEFT JOIN vectorgeo_regions r USING (model_version)
           LEFT JOIN vectorgeo_state s ON s.key = 'active' AND s.value = d.model_version
           GROUP BY d.model_version, s.value ORDER BY d.created_at DESC"""
    ).fetchall()
    keys = (
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
    return [dict(zip(keys, r, strict=True)) for r in rows]


def dataset(conn: Any, model_version: str | None = None) -> Dataset:
    """The dataset queries use: ``model_version``, else the active one, else the newest loaded.

    Raises:
        DatabaseError: nothing loaded (or the version is unknown).
    """
    if _catalog_exists(conn):
        if model_version is not None:
            row = conn.execute(
                "SELECT model_version, table_name, dim, resolution FROM vectorgeo_datasets WHERE model_version = %s",
                (model_version,),
            ).fetchone()
        else:
            row = conn.execute(
                """SELECT d.model_version, d.table_name, d.dim, d.resolution FROM vectorgeo_datasets d
                   LEFT JOIN vectorgeo_state s ON s.key = 'active' AND s.value = d.model_version
                   ORDER BY s.value IS NULL, d.created_at DESC LIMIT 1"""
            ).fetchone()
        if row:
            return Dataset(str(row[0]), str(row[1]), int(row[2]), int(row[3]))
    what = f"model_version {model_version!r}" if model_version is not None else "any embeddings"
    raise DatabaseError(f"the database holds no {what}; load regions first (snakemake, rule load_region)")


def resolution(conn: Any, model_version: str | None = None) -> int:
    """H3 resolution of the loaded cells."""
    return dataset(conn, model_version).resolution


def count(conn: Any, region: int | str | None = None, model_version: str | None = None) -> int:
    """Rows in the dataset table (of one region when given)."""
    ds = dataset(conn, model_version)
    if region is None:
        q = sql.SQL("SELECT count(*) FROM {}").format(ds.ident)
        return int(conn.execute(q).fetchone()[0])
    lo, hi = region_range(_region_int(region), ds.resolution)
    q = sql.SQL("SELECT count(*) FROM {} WHERE h3 BETWEEN %s AND %s").format(ds.ident)
    return int(conn.execute(q, (lo, hi)).fetchone()[0])


# --- loading ----------------------------------------------------------------------------------------------
_REGION_FILE = re.compile(r"^([0-9a-f]{15})_[0-9a-f]{12}\.parquet$")


def _region_int(region: int | str) -> int:
    if isinstance(region, int | np.integer):
        return int(region)
    if not re.fullmatch(r"[0-9a-fA-F]{15}", region):
        raise RequestError("region", f"expected a 15-digit hex H3 cell, got {region!r}")
    return int(region, 16)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def h3_resolutions(h3: np.ndarray) -> np.ndarray:
    """Resolution field (bits 52-55) of H3 indexes."""
    return ((np.asarray(h3, dtype=np.uint64) >> np.uint64(52)) & np.uint64(0xF)).astype(np.int64)


def region_range(region: int, res: int) -> tuple[int, int]:
    """The smallest and largest H3 index of the descendants at resolution ``res`` of a region cell.

    An H3 index holds, from the high bits down: mode, resolution, base cell, then 15 3-bit digits
    (7 = unused). The descendants at ``res`` of a cell at resolution r share every bit above digit
    r + 1 and have digits r+1..res in 0..6 and 7 after: they are exactly the resolution-``res`` cells
    in [lo, hi], lo with those digits 0 and hi with them 6. So a region's rows are one primary-key range.
    """
    r = (region >> 52) & 0xF
    if res < r:
        raise DataError(f"{region:015x}", f"region resolution {r} is finer than the cells' resolution {res}")
    base = (region & ~(0xF << 52)) | (res << 52)
    lo = hi = base
    for i in range(r + 1, res + 1):
        shift = (15 - i) * 3
        lo &= ~(7 << shift)
        hi = (hi & ~(7 << shift)) | (6 << shift)
    return lo, hi


def _record_dtype(d: int | None, status_len: int) -> np.dtype[Any]:
    """One binary-COPY tuple: h3 bigint, geom (EWKB point), embedding vector | NULL, status text, region bigint."""
    fields: list[tuple[Any, ...]] = [
        ("nfields", ">i2"),
        ("h3_len", ">i4"),
        ("h3", ">i8"),
        ("geom_len", ">i4"),
        ("g_order", "u1"),
        ("g_type", "<u4"),
        ("g_srid", "<u4"),
        ("g_x", "<f8"),
        ("g_y", "<f8"),
        ("emb_len", ">i4"),
    ]
    if d is not None:
        fields += [("e_dim", ">i2"), ("e_unused", ">i2"), ("e", ">f4", (d,))]
    fields += [("st_len", ">i4")]
    if status_len:
        fields += [("st", f"S{status_len}")]
    fields += [("region_len", ">i4"), ("region", ">i8")]
    return np.dtype(fields)


COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"
COPY_COLUMNS = "h3, geom, embedding, status, region"


def binary_copy_chunks(
    h3: np.ndarray,
    lat: np.ndarray,
    lng: np.ndarray,
    embedding: np.ndarray,
    valid: np.ndarray,
    status_code: np.ndarray,
    labels: Sequence[str],
    region: int,
    chunk_rows: int = COPY_CHUNK_ROWS,
) -> Iterator[bytes]:
    """PostgreSQL binary COPY stream of the columns :data:`COPY_COLUMNS`, built with numpy in bounded chunks.

    Field formats: bigint big endian; geometry as little-endian EWKB (type 0x20000001 = Point with
    SRID, SRID 4326, x = lng, y = lat); vector as int16 dim, int16 0, dim big-endian float4 (pgvector's
    ``vector_recv``); a null embedding as field length -1; text as its UTF-8 bytes. Rows are grouped by
    (embedding null or not, status) so that each group has fixed-size records (one numpy structured
    array); within a group the input order is kept.
    """
    d = embedding.shape[1]
    h3i = h3.view(np.int64) if h3.dtype == np.uint64 else h3.astype(np.int64)
    yield COPY_HEADER
    for code, label in enumerate(labels):
        raw = label.encode("utf-8")
        for with_emb in (True, False):
            idx = np.flatnonzero((status_code == code) & (valid if with_emb else ~valid))
            dt = _record_dtype(d if with_emb else None, len(raw))
            for start in range(0, idx.shape[0], chunk_rows):
                sel = idx[start : start + chunk_rows]
                rec = np.empty(sel.shape[0], dtype=dt)
                rec["nfields"] = 5
                rec["h3_len"] = 8
                rec["h3"] = h3i[sel]
                rec["geom_len"] = 25
                rec["g_order"] = 1
                rec["g_type"] = 0x20000001
                rec["g_srid"] = 4326
                rec["g_x"] = lng[sel]
                rec["g_y"] = lat[sel]
                if with_emb:
                    rec["emb_len"] = 4 + 4 * d
                    rec["e_dim"] = d
                    rec["e_unused"] = 0
                    rec["e"] = embedding[sel]
                else:
                    rec["emb_len"] = -1
                rec["st_len"] = len(raw)
                if raw:
                    rec["st"] = raw
                rec["region_len"] = 8
                rec["region"] = region
                yield rec.tobytes()
    yield COPY_TRAILER


def _create_dataset(conn: Any, model_version: str, dim: int, res: int, path: str) -> Dataset:
    """Get or create the dataset of a model version (inside the caller's transaction, under the lock)."""
    row = conn.execute(
        "SELECT table_name, dim, resolution FROM vectorgeo_datasets WHERE model_version = %s", (model_version,)
    ).fetchone()
    if row is not None:
        ds = Dataset(model_version, str(row[0]), int(row[1]), int(row[2]))
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


def load_arrays(
    conn: Any,
    *,
    h3: np.ndarray,
    lat: np.ndarray,
    lng: np.ndarray,
    embedding: np.ndarray,
    valid: np.ndarray,
    status: Any,
    model_version: str,
    region: int | str,
    checksum: str = "",
    path: str = "<arrays>",
) -> Dataset:
    """Replace one region's rows with the given arrays in one transaction (see the module docstring).

    Raises:
        DataError: cells outside the region, of several resolutions, or a dimension or resolution that
            differs from the loaded dataset (nothing written).
        DatabaseError: the database refused the load (nothing written).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    region_id = _region_int(region)
    h3 = np.asarray(h3, dtype=np.uint64)
    n = h3.shape[0]
    res = int(h3_resolutions(h3[:1])[0]) if n else (region_id >> 52) & 0xF
    if n and (h3_resolutions(h3) != res).any():
        raise DataError(path, "cells of several H3 resolutions in one file")
    lo, hi = region_range(region_id, res)
    outside = np.flatnonzero((h3 < np.uint64(lo)) | (h3 > np.uint64(hi)))
    if outside.size:
        raise DataError(
            path, f"{outside.size} cell(s) outside region {region_id:015x}, e.g. {int(h3[outside[0]]):015x}"
        )
    status_arr = pa.array(status, pa.string()) if not isinstance(status, pa.Array | pa.ChunkedArray) else status
    enc = pc.dictionary_encode(status_arr)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    labels = [str(x) for x in enc.dictionary.to_pylist()]
    codes = np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int32)
    emb = np.asarray(embedding, dtype=np.float32)
    dim = int(emb.shape[1])
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            if not _catalog_exists(conn):
                conn.execute(CATALOG_SQL)
            ds = _create_dataset(conn, model_version, dim, res, path)
            # the region's rows are one primary-key range: no region index needed
            conn.execute(sql.SQL("DELETE FROM {} WHERE h3 BETWEEN %s AND %s").format(ds.ident), (lo, hi))
            with conn.cursor() as cur:
                copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(ds.ident, sql.SQL(COPY_COLUMNS))
                with cur.copy(copy_sql) as cp:
                    chunks = binary_copy_chunks(
                        h3, np.asarray(lat), np.asarray(lng), emb, np.asarray(valid, bool), codes, labels, region_id
                    )
                    for chunk in chunks:
                        cp.write(chunk)
            conn.execute(
                """INSERT INTO vectorgeo_regions (model_version, region, rows, checksum) VALUES (%s, %s, %s, %s)
                   ON CONFLICT (model_version, region)
                   DO UPDATE SET rows = excluded.rows, checksum = excluded.checksum, loaded_at = now()""",
                (model_version, region_id, n, checksum),
            )
    except psycopg.errors.UniqueViolation as e:
        raise DataError(path, f"cells already loaded under another region: {e}; nothing was written") from None
    except psycopg.Error as e:
        raise DatabaseError(f"loading {path} failed, nothing was written: {e}") from None
    return ds


def load_region(conn: Any, path: str | Path, region: int | str | None = None) -> dict[str, Any]:
    """Replace one region in the database with the content of its GeoParquet file.

    Args:
        conn: From :func:`connect`.
        path: ``{region}_{digest}.parquet`` written by :func:`vectorgeo.geoparquet.write_region`.
        region: Region cell (hex or int); default from the file metadata or the file name.

    Returns:
        The marker: region, rows, checksum (SHA-256 of the file), model_version, table, dim,
        resolution, seconds.

    Raises:
        DataError: invalid file, or a dimension that differs from the loaded table (nothing written).
        DatabaseError: the database refused the load (nothing written).
    """
    from vectorgeo import geoparquet

    t0 = time.perf_counter()
    p = str(path)
    data = geoparquet.read_region(path)
    if region is None:
        region = data.region
    if region is None:
        m = _REGION_FILE.match(Path(p).name)
        if not m:
            raise DataError(p, "cannot tell the region: no 'region' in the file metadata and no {region}_{digest} name")
        region = m.group(1)
    checksum = file_sha256(path)
    ds = load_arrays(
        conn,
        h3=data.h3,
        lat=data.lat,
        lng=data.lng,
        embedding=data.embedding,
        valid=data.valid,
        status=data.status,
        model_version=data.model_version,
        region=region,
        checksum=checksum,
        path=p,
    )
    region_id = _region_int(region)
    rows_db = count(conn, region_id, data.model_version)
    if rows_db != len(data):
        raise DatabaseError(f"{p}: {len(data)} rows in the file but {rows_db} in the database after the load")
    return {
        "region": f"{region_id:015x}",
        "rows": len(data),
        "checksum": f"sha256:{checksum}",
        "model_version": data.model_version,
        "table": ds.table,
        "dim": ds.dim,
        "resolution": ds.resolution,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def write_marker(path: str | Path, marker: Mapping[str, Any]) -> None:
    """Write a JSON marker atomically."""
    write_text_atomic(path, json.dumps(dict(marker), indent=2, sort_keys=True, default=str) + "\n")


def build_indexes(
    conn: Any,
    hnsw_m: int = HNSW_M,
    hnsw_ef_construction: int = HNSW_EF_CONSTRUCTION,
    maintenance_work_mem: str = MAINTENANCE_WORK_MEM,
    model_version: str | None = None,
    activate: bool = True,
) -> dict[str, Any]:
    """Build the GIST (geometry) and HNSW indexes, ANALYZE, and make the dataset the active one.

    An HNSW index with other parameters is dropped and rebuilt; existing indexes with the same
    parameters are kept (so a rerun after reloading one region costs only the ANALYZE).

    Returns:
        A summary: model_version, table, rows, hnsw_m, hnsw_ef_construction, seconds per step.
    """
    ds = dataset(conn, model_version)
    if model_version is None:
        # the newest load, not the currently active one: the index step is what activates it
        ds = Dataset(**{**ds.__dict__, **_newest(conn).__dict__})
    t = ds.ident
    hnsw_name = f"{ds.table}_hnsw_m{int(hnsw_m)}_ef{int(hnsw_ef_construction)}"
    timings: dict[str, float] = {}
    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,))
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
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = {}, ef_construction = {})"
        ).format(sql.Identifier(hnsw_name), t, sql.Literal(int(hnsw_m)), sql.Literal(int(hnsw_ef_construction)))
    )
    timings["hnsw_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    conn.execute(sql.SQL("ANALYZE {}").format(t))
    timings["analyze_s"] = time.perf_counter() - t0
    params = {"hnsw_m": int(hnsw_m), "hnsw_ef_construction": int(hnsw_ef_construction)}
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
    rows = int(conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone()[0])
    return {
        "model_version": ds.model_version,
        "table": ds.table,
        "rows": rows,
        **params,
        **{k: round(v, 3) for k, v in timings.items()},
    }


def _newest(conn: Any) -> Dataset:
    row = conn.execute(
        "SELECT model_version, table_name, dim, resolution FROM vectorgeo_datasets ORDER BY created_at DESC LIMIT 1"
    ).fetchone()
    return Dataset(str(row[0]), str(row[1]), int(row[2]), int(row[3]))


# --- queries ----------------------------------------------------------------------------------------------
def parse_h3(value: Any, param: str = "h3") -> int:
    """An H3 cell as int from an int or a hex string.

    Raises:
        RequestError: not a valid H3 cell.
    """
    import h3.api.basic_int as h3lib

    if isinstance(value, bool):
        raise RequestError(param, f"expected an H3 cell (int or 15-digit hex string), got {value!r}")
    if isinstance(value, int | np.integer):
        cell = int(value)
    elif isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{1,16}", value.strip()):
        cell = int(value.strip(), 16)
    else:
        raise RequestError(param, f"expected an H3 cell (int or 15-digit hex string), got {str(value)[:80]!r}")
    if not (0 < cell < 2**63) or not h3lib.is_valid_cell(cell):
        raise RequestError(param, f"{str(value)[:80]!r} is not a valid H3 cell")
    return cell


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= MAX_K:
        raise RequestError("k", f"expected an integer from 1 to {MAX_K}, got {k!r}")
    return int(k)


def _check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        w, s, e, n = (float(x) for x in bbox)
    except (TypeError, ValueError):
        raise RequestError("bbox", f"expected four numbers west, south, east, north; got {bbox!r}") from None
    if not all(math.isfinite(x) for x in (w, s, e, n)):
        raise RequestError("bbox", "expected finite numbers")
    if not (-90 <= s < n <= 90):
        raise RequestError("bbox", f"expected -90 <= south < north <= 90, got south {s}, north {n}")
    if not (-180 <= w <= 180 and -180 <= e <= 180) or w == e:
        raise RequestError("bbox", f"expected west != east within [-180, 180], got {w}, {e}")
    return w, s, e, n


def _check_radius(radius_m: Any) -> float:
    try:
        r = float(radius_m)
    except (TypeError, ValueError):
        raise RequestError("radius_m", f"expected a number of metres, got {radius_m!r}") from None
    if not (math.isfinite(r) and 0 < r <= EARTH_HALF_CIRCUMFERENCE_M):
        raise RequestError("radius_m", f"expected 0 < radius_m <= {EARTH_HALF_CIRCUMFERENCE_M:.0f}, got {radius_m!r}")
    return r


def _check_vector(vector: Any, dim: int) -> np.ndarray:
    try:
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise RequestError("vector", f"expected {dim} numbers, got {str(vector)[:80]!r}") from None
    if v.shape[0] != dim:
        raise RequestError("vector", f"expected {dim} numbers (the embedding dimension), got {v.shape[0]}")
    if not np.isfinite(v).all() or not np.any(v):
        raise RequestError("vector", "expected finite numbers, not all zero")
    return v


def _to_numpy(value: Any) -> np.ndarray:
    """A loaded vector (pgvector ``Vector`` or array) as float32 numpy."""
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.float32)


def get_cell(conn: Any, h3: Any, model_version: str | None = None) -> dict[str, Any] | None:
    """One cell's row, or None when the cell is not in the database.

    Returns:
        Keys h3 (int), lat, lng, embedding (float32 array or None), status, region (hex), model_version.

    Raises:
        RequestError: ``h3`` is not a valid cell.
    """
    cell = parse_h3(h3)
    ds = dataset(conn, model_version)
    row = conn.execute(
        sql.SQL("SELECT h3, ST_Y(geom), ST_X(geom), embedding, status, region FROM {} WHERE h3 = %s").format(ds.ident),
        (cell,),
    ).fetchone()
    if row is None:
        return None
    emb = None if row[3] is None else _to_numpy(row[3])
    return {
        "h3": int(row[0]),
        "lat": float(row[1]),
        "lng": float(row[2]),
        "embedding": emb,
        "status": row[4],
        "region": f"{int(row[5]):015x}",
        "model_version": ds.model_version,
    }


def similar_to_point(conn: Any, lat: float, lng: float, **kwargs: Any) -> list[dict[str, Any]]:
    """k most similar cells to the cell containing (lat, lng); a radius is measured from the point.

    Keyword arguments are those of :func:`similar`.
    """
    import h3.api.basic_int as h3lib

    try:
        lat, lng = float(lat), float(lng)
    except (TypeError, ValueError):
        raise RequestError("lat", f"expected numbers, got lat {lat!r}, lng {lng!r}") from None
    if not (math.isfinite(lat) and -90 <= lat <= 90):
        raise RequestError("lat", f"expected -90 <= lat <= 90, got {lat}")
    if not (math.isfinite(lng) and -180 <= lng <= 180):
        raise RequestError("lng", f"expected -180 <= lng <= 180, got {lng}")
    res = resolution(conn, kwargs.get("model_version"))
    cell = int(h3lib.latlng_to_cell(lat, lng, res))
    kwargs.setdefault("center", (lat, lng))
    return similar(conn, h3=cell, **kwargs)


def circle_envelopes(lat: float, lng: float, radius_m: float) -> list[tuple[float, float, float, float]]:
    """Lat/lng boxes (west, south, east, north) covering a spherical cap; two when it crosses ±180°.

    With angular radius δ = r / R: latitudes lat ± δ (clipped; a cap that reaches a pole spans all
    longitudes), longitudes lng ± asin(sin δ / cos lat) (all when sin δ ≥ cos lat).
    """
    delta = radius_m / 6_371_008.8
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


def estimate_envelope_rows(conn: Any, ds: Dataset, boxes: Sequence[tuple[float, float, float, float]]) -> float:
    """Planner estimate of the rows whose point lies in any of the boxes (geometry statistics)."""
    query = sql.SQL("SELECT 1 FROM {} WHERE ").format(ds.ident) + sql.SQL(" OR ").join(
        sql.SQL("geom && ST_MakeEnvelope(%s, %s, %s, %s, 4326)") for _ in boxes
    )
    return estimate_rows(conn, query, [x for b in boxes for x in b])


def exact_scan_limit(conn: Any, ds: Dataset, k: int, exact_scan_max_rows: int | None = None) -> float:
    """Largest estimated filtered row count answered by an exact scan: the given limit, else
    sqrt(EXACT_SCAN_COST_RATIO * N * k) with N the table's row estimate (pg_class.reltuples)."""
    if exact_scan_max_rows is not None:
        return float(exact_scan_max_rows)
    row = conn.execute("SELECT reltuples FROM pg_class WHERE oid = %s::regclass", (ds.table,)).fetchone()
    n = max(float(row[0]) if row else 0.0, 1.0)
    return math.sqrt(EXACT_SCAN_COST_RATIO * n * k)


def estimate_rows(conn: Any, query: sql.Composable, params: Any) -> float:
    """The planner's row estimate for a query (EXPLAIN, not executed)."""
    plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) ") + query, params).fetchone()[0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    return float(plan[0]["Plan"]["Plan Rows"])


def similar(
    conn: Any,
    *,
    h3: Any = None,
    vector: Any = None,
    k: int = 10,
    radius_m: float | None = None,
    bbox: Sequence[float] | None = None,
    exclude_self: bool = True,
    center: tuple[float, float] | None = None,
    model_version: str | None = None,
    method: str = "auto",
    ef_search: int | None = None,
    max_scan_tuples: int | None = None,
    exact_scan_max_rows: int | None = None,
) -> list[dict[str, Any]]:
    """The k cells most similar (cosine) to a cell or a vector, optionally spatially filtered.

    Args:
        conn: From :func:`connect`.
        h3: Query cell (int or hex string); its embedding is the query vector.
        vector: Query vector of the embedding dimension (instead of ``h3``).
        k: Number of results, 1..1000.
        radius_m: Keep cells within this geodesic distance (metres) of ``center``, default the
            query cell's centroid.
        bbox: Keep cells inside (west, south, east, north) degrees; west > east crosses the antimeridian.
        exclude_self: Leave the query cell out of the results.
        center: (lat, lng) of the radius centre; needed with ``vector`` and ``radius_m``.
        model_version: Dataset to query; default the active one.
        method: ``auto`` (exact when the filter is estimated to keep at most ``exact_scan_max_rows``
            rows, else HNSW with an iterative scan), ``exact`` or ``index``.
        ef_search: HNSW candidate list size (raised to k).
        max_scan_tuples: Bound of an iterative HNSW scan.
        exact_scan_max_rows: Threshold of ``auto``; None = :func:`exact_scan_limit`'s cost model.

    Returns:
        Dicts with keys h3 (int), lat, lng, similarity (1 - cosine distance), most similar first.

    Raises:
        RequestError: invalid parameter, unknown query cell, or a cell without embedding.
        DatabaseError: nothing loaded, or the query failed.
    """
    k = _check_k(k)
    if (h3 is None) == (vector is None):
        raise RequestError("h3", "give exactly one of h3 and vector")
    if method not in ("auto", "exact", "index"):
        raise RequestError("method", f"expected auto, exact or index, got {method!r}")
    ds = dataset(conn, model_version)
    params: dict[str, Any] = {"k": k}
    where: list[sql.Composable] = [sql.SQL("embedding IS NOT NULL")]
    if h3 is not None:
        cell = parse_h3(h3)
        row = conn.execute(
            sql.SQL("SELECT embedding, ST_Y(geom), ST_X(geom), status FROM {} WHERE h3 = %s").format(ds.ident),
            (cell,),
        ).fetchone()
        if row is None:
            raise RequestError("h3", f"cell {cell:015x} is not in the database (model_version {ds.model_version!r})")
        if row[0] is None:
            raise RequestError("h3", f"cell {cell:015x} has no embedding (status {row[3]!r})")
        q = _to_numpy(row[0])
        if center is None:
            center = (float(row[1]), float(row[2]))
        if exclude_self:
            where.append(sql.SQL("h3 <> %(self)s"))
            params["self"] = cell
    else:
        q = _check_vector(vector, ds.dim)
    params["q"] = q
    # each spatial filter in two forms: indexable (GIST, for the exact path) and not indexable (checked
    # on HNSW candidates only, so that the planner cannot trade the HNSW scan for a GIST scan)
    exact_f: list[sql.Composable] = []
    index_f: list[sql.Composable] = []
    envelopes: list[list[tuple[float, float, float, float]]] = []
    if radius_m is not None:
        params["radius"] = _check_radius(radius_m)
        if center is None:
            raise RequestError("center", "a radius around a query vector needs center=(lat, lng)")
        try:
            clat, clng = float(center[0]), float(center[1])
        except (TypeError, ValueError, IndexError):
            raise RequestError("center", f"expected (lat, lng), got {center!r}") from None
        if not (-90 <= clat <= 90 and -180 <= clng <= 180):
            raise RequestError("center", f"expected lat in [-90, 90] and lng in [-180, 180], got {center!r}")
        params["clat"], params["clng"] = clat, clng
        point = "ST_SetSRID(ST_MakePoint(%(clng)s, %(clat)s), 4326)::geography"
        # Boxes around the circle, computed on the sphere for 1.01 r. Geodesic (WGS84) and great-circle
        # (sphere of the mean radius) distances differ by less than 0.6%, so: within the boxes (GIST on
        # geom, or two float comparisons on an HNSW candidate), great-circle distance <= 0.99 r means
        # inside, > 1.01 r means outside, and only the ring between needs the slower geodesic distance.
        boxes = circle_envelopes(clat, clng, params["radius"] * 1.01)
        in_box: list[sql.Composable] = []
        on_box: list[sql.Composable] = []
        for j, (bw, bs, be, bn) in enumerate(boxes):
            params.update({f"bw{j}": bw, f"bs{j}": bs, f"be{j}": be, f"bn{j}": bn})
            in_box.append(
                sql.SQL(f"(ST_X(geom) BETWEEN %(bw{j})s AND %(be{j})s AND ST_Y(geom) BETWEEN %(bs{j})s AND %(bn{j})s)")
            )
            on_box.append(sql.SQL(f"geom && ST_MakeEnvelope(%(bw{j})s, %(bs{j})s, %(be{j})s, %(bn{j})s, 4326)"))
        # ST_Distance rather than ST_DWithin: not indexable, so that the planner keeps the HNSW scan
        distance = sql.SQL(
            f"(ST_Distance(geom::geography, {point}, false) <= %(radius)s * 0.99 "
            f"OR (ST_Distance(geom::geography, {point}, false) <= %(radius)s * 1.01 "
            f"AND ST_Distance(geom::geography, {point}) <= %(radius)s))"
        )
        exact_f.append(sql.SQL("(") + sql.SQL(" OR ").join(on_box) + sql.SQL(")"))
        exact_f.append(distance)
        index_f.append(sql.SQL("(") + sql.SQL(" OR ").join(in_box) + sql.SQL(")"))
        index_f.append(distance)
        envelopes.append(boxes)
    if bbox is not None:
        w, s, e, n = _check_bbox(bbox)
        params.update(w=w, s=s, e=e, n=n)
        if w < e:
            exact_f.append(sql.SQL("geom && ST_MakeEnvelope(%(w)s, %(s)s, %(e)s, %(n)s, 4326)"))
            index_f.append(sql.SQL("ST_X(geom) BETWEEN %(w)s AND %(e)s AND ST_Y(geom) BETWEEN %(s)s AND %(n)s"))
            envelopes.append([(w, s, e, n)])
        else:
            exact_f.append(
                sql.SQL(
                    "(geom && ST_MakeEnvelope(%(w)s, %(s)s, 180, %(n)s, 4326) "
                    "OR geom && ST_MakeEnvelope(-180, %(s)s, %(e)s, %(n)s, 4326))"
                )
            )
            index_f.append(
                sql.SQL("(ST_X(geom) >= %(w)s OR ST_X(geom) <= %(e)s) AND ST_Y(geom) BETWEEN %(s)s AND %(n)s")
            )
            envelopes.append([(w, s, 180.0, n), (-180.0, s, e, n)])
    spatial = bool(exact_f)
    try:
        use_exact = method == "exact"
        if method == "auto" and spatial:
            est = min(estimate_envelope_rows(conn, ds, env) for env in envelopes)
            use_exact = est <= exact_scan_limit(conn, ds, k, exact_scan_max_rows)
        cond = sql.SQL(" AND ").join(where + (exact_f if use_exact else index_f))
        if use_exact:
            # "+ 0": an ORDER BY expression the HNSW index cannot serve, so every filtered row is ranked
            query = sql.SQL(
                "SELECT h3, ST_Y(geom), ST_X(geom), 1 - (embedding <=> %(q)s) FROM {t} WHERE {cond} "
                "ORDER BY (embedding <=> %(q)s) + 0, h3 LIMIT %(k)s"
            ).format(t=ds.ident, cond=cond)
            gucs: tuple[str, ...] = ()
        else:
            ef = max(int(ef_search or EF_SEARCH), k)
            mst = int(max_scan_tuples or MAX_SCAN_TUPLES)
            # relaxed order + re-sort: candidates may come slightly out of order from an iterative scan
            query = sql.SQL(
                "WITH c AS MATERIALIZED (SELECT h3, geom, embedding <=> %(q)s AS dist FROM {t} WHERE {cond} "
                "ORDER BY embedding <=> %(q)s LIMIT %(k)s) "
                "SELECT h3, ST_Y(geom), ST_X(geom), 1 - dist FROM c ORDER BY dist, h3"
            ).format(t=ds.ident, cond=cond)
            gucs = (
                "hnsw.ef_search",
                str(ef),
                "hnsw.iterative_scan",
                "relaxed_order" if spatial or exclude_self else "off",
                "hnsw.max_scan_tuples",
                str(mst),
            )
        with conn.transaction():
            # parallel workers and JIT compilation (triggered by the HNSW scan's huge cost estimate) cost
            # more than they save on queries of a few milliseconds
            conn.execute(
                "SELECT set_config('max_parallel_workers_per_gather', '0', true), set_config('jit', 'off', true)"
                + ", set_config(%s, %s, true)" * (len(gucs) // 2),
                gucs,
            )
            rows = conn.execute(query, params).fetchall()
    except psycopg.Error as e:
        raise DatabaseError(f"similarity query failed: {e}") from None
    return [{"h3": int(r[0]), "lat": float(r[1]), "lng": float(r[2]), "similarity": float(r[3])} for r in rows]
