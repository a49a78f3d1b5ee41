"""Loading: replace one region's rows in one transaction, and the markers the workflow keeps.

Loading one region is one transaction: ``DELETE`` of the region's rows (one primary-key range, see
:func:`vectorgeo.h3cells.descendant_range`), binary ``COPY`` of the new rows (the stream built with
numpy, :mod:`vectorgeo.store.binary_copy`), catalog update, commit. A rerun replaces the region
instead of duplicating it; a crash (of the loader or of the server) at any point rolls the whole
region back, because nothing is committed before the end. The rows are COPYed straight into the
table rather than into a staging table followed by ``INSERT ... SELECT``: inside one transaction both
are equally atomic and invisible to readers until commit, but COPY inserts in batches (heap
multi-insert) while ``INSERT ... SELECT`` inserts row by row, so staging made the load about 2x
slower (measured: ~1M rows/s COPY into a temp table, then ~0.2M rows/s INSERT ... SELECT, against
~0.4M rows/s COPY into the indexed table).

Loaders of the same region are serialised by a transaction-level advisory lock on (model version,
region), taken first in the region's transaction: two loaders racing on one region both succeed, one
after the other, and the table holds the rows of the one that committed last, each cell once. Catalog
changes (the catalog tables, a new model version's table) are serialised by the catalog lock
(:data:`~vectorgeo.store.catalog.LOCK_KEY`) in a short transaction of their own before the region's,
so that no global lock is held during a COPY: loads of different regions run in parallel.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from vectorgeo import h3cells
from vectorgeo.atomic import write_text_atomic
from vectorgeo.errors import DatabaseError, DataError
from vectorgeo.store.binary_copy import COPY_COLUMNS, binary_copy_chunks
from vectorgeo.store.catalog import (
    CATALOG_SQL,
    LOCK_KEY,
    Dataset,
    catalog_exists,
    count,
    create_dataset,
    region_id,
    region_range,
)

REGION_FILE = re.compile(r"^([0-9a-f]{15})_[0-9a-f]{12}\.parquet$")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_marker(path: str | Path, marker: Mapping[str, Any]) -> None:
    """Write a JSON marker atomically."""
    write_text_atomic(path, json.dumps(dict(marker), indent=2, sort_keys=True, default=str) + "\n")


@dataclass(frozen=True)
class _Rows:
    """One region's rows, checked and encoded for the COPY."""

    region: int
    resolution: int
    lo: int
    hi: int
    h3: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    embedding: np.ndarray
    valid: np.ndarray
    codes: np.ndarray
    labels: list[str]


def _encode_status(status: Any) -> tuple[list[str], np.ndarray]:
    """Status texts as (labels, int32 codes), dictionary-encoded by Arrow."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = status if isinstance(status, pa.Array | pa.ChunkedArray) else pa.array(status, pa.string())
    enc = pc.dictionary_encode(arr)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    labels = [str(x) for x in enc.dictionary.to_pylist()]
    return labels, np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int32)


def _check_rows(
    path: str,
    region: int | str,
    h3: np.ndarray,
    lat: np.ndarray,
    lng: np.ndarray,
    embedding: np.ndarray,
    valid: np.ndarray,
    status: Any,
) -> _Rows:
    """The rows of one region, checked: one resolution, every cell inside the region.

    Raises:
        DataError: cells of several resolutions, or outside the region.
    """
    rid = region_id(region)
    cells = np.asarray(h3, dtype=np.uint64)
    n = cells.shape[0]
    res = int(h3cells.resolutions(cells[:1])[0]) if n else h3cells.resolution(rid)
    if n and (h3cells.resolutions(cells) != res).any():
        raise DataError(path, "cells of several H3 resolutions in one file")
    lo, hi = region_range(rid, res)
    outside = np.flatnonzero((cells < np.uint64(lo)) | (cells > np.uint64(hi)))
    if outside.size:
        raise DataError(
            path,
            f"{outside.size} cell(s) outside region {h3cells.to_str(rid)}, e.g. {h3cells.to_str(cells[outside[0]])}",
        )
    labels, codes = _encode_status(status)
    return _Rows(
        rid,
        res,
        lo,
        hi,
        cells,
        np.asarray(lat),
        np.asarray(lng),
        np.asarray(embedding, dtype=np.float32),
        np.asarray(valid, bool),
        codes,
        labels,
    )


def _replace_region(
    conn: psycopg.Connection[Any], rows: _Rows, model_version: str, checksum: str, path: str
) -> Dataset:
    """Create the dataset when missing (a short transaction under the catalog lock), then DELETE the region's
    key range, COPY the rows and record the region in one transaction that holds only the region's lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        if not catalog_exists(conn):
            conn.execute(CATALOG_SQL)
        ds = create_dataset(conn, model_version, int(rows.embedding.shape[1]), rows.resolution, path)
    with conn.transaction():
        # loaders of the same region follow each other; loaders of other regions do not wait
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
            (f"vectorgeo region {model_version} {rows.region}",),
        )
        # the region's rows are one primary-key range: no region index needed
        conn.execute(sql.SQL("DELETE FROM {} WHERE h3 BETWEEN %s AND %s").format(ds.ident), (rows.lo, rows.hi))
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(ds.ident, sql.SQL(COPY_COLUMNS))
        with conn.cursor() as cur, cur.copy(copy_sql) as cp:
            chunks = binary_copy_chunks(
                rows.h3, rows.lat, rows.lng, rows.embedding, rows.valid, rows.codes, rows.labels, rows.region
            )
            for chunk in chunks:
                cp.write(chunk)
        conn.execute(
            """INSERT INTO vectorgeo_regions (model_version, region, rows, checksum) VALUES (%s, %s, %s, %s)
               ON CONFLICT (model_version, region)
               DO UPDATE SET rows = excluded.rows, checksum = excluded.checksum, loaded_at = now()""",
            (model_version, rows.region, rows.h3.shape[0], checksum),
        )
    return ds


def load_arrays(
    conn: psycopg.Connection[Any],
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

    Args:
        conn: From :func:`vectorgeo.store.connect`.
        h3: Cells (n,), all of one resolution, all inside ``region``.
        lat: Cell centre latitudes (n,).
        lng: Cell centre longitudes (n,).
        embedding: (n, d) float32.
        valid: (n,) bool; False rows get a null embedding.
        status: (n,) texts (a sequence or an Arrow string array).
        model_version: Dataset to load into (created at the first load).
        region: Region cell (int or hex string).
        checksum: Recorded with the region (the file's SHA-256).
        path: Named in error messages.

    Raises:
        DataError: cells outside the region, of several resolutions, or a dimension or resolution that
            differs from the loaded dataset (nothing written).
        DatabaseError: the database refused the load (nothing written).
    """
    rows = _check_rows(path, region, h3, lat, lng, embedding, valid, status)
    try:
        return _replace_region(conn, rows, model_version, checksum, path)
    except psycopg.errors.UniqueViolation as e:
        raise DataError(path, f"cells already loaded under another region: {e}; nothing was written") from None
    except psycopg.Error as e:
        raise DatabaseError(f"loading {path} failed, nothing was written", detail=str(e).strip()) from None


def load_region(
    conn: psycopg.Connection[Any], path: str | Path, region: int | str | None = None, checksum: str | None = None
) -> dict[str, Any]:
    """Replace one region in the database with the content of its GeoParquet file.

    Args:
        conn: From :func:`vectorgeo.store.connect`.
        path: ``{region}_{digest}.parquet`` written by :func:`vectorgeo.geoparquet.write_region`.
        region: Region cell (hex or int); default from the file metadata or the file name.
        checksum: The file's SHA-256 (hex) when the caller has it; default computed here.

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
        m = REGION_FILE.match(Path(p).name)
        if not m:
            raise DataError(p, "cannot tell the region: no 'region' in the file metadata and no {region}_{digest} name")
        region = m.group(1)
    checksum = checksum or file_sha256(path)
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
    rid = region_id(region)
    rows_db = count(conn, rid, data.model_version)
    if rows_db != len(data):
        raise DatabaseError(f"{p}: {len(data)} rows in the file but {rows_db} in the database after the load")
    return {
        "region": h3cells.to_str(rid),
        "rows": len(data),
        "checksum": f"sha256:{checksum}",
        "model_version": data.model_version,
        "table": ds.table,
        "dim": ds.dim,
        "resolution": ds.resolution,
        "seconds": round(time.perf_counter() - t0, 3),
    }
