"""Every embedding of a dataset in memory: one binary COPY, parsed by numpy into arrays sorted by h3.

Search by example scores every loaded cell at once (:mod:`vectorgeo.scores`): a matrix–vector product
over an in-memory ``(n, d)`` float32 matrix takes milliseconds per million cells, where the same scan
through SQL takes seconds. :func:`load_vectors` streams

    COPY (SELECT h3, ST_Y(geom), ST_X(geom), embedding FROM cells_<hash> WHERE embedding IS NOT NULL)
    TO STDOUT (FORMAT BINARY)

and parses fixed-size records (``46 + 4 d`` bytes: field count, then each field's length and big-endian
value; a pgvector value is ``dim int16, unused int16, d float4``) a block at a time into preallocated
arrays, so memory stays at the arrays plus one block. The count and the COPY run in one
REPEATABLE READ transaction, so a load running at the same time cannot change the row count in
between. Memory: ``n (4 d + 24)`` bytes (1.1 GB for 4M cells of 64 dimensions, 7.8 GB for 28M).

:func:`signature` fingerprints the loaded regions of a dataset (rows, checksums, load times): when it
changes, the arrays are stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from vectorgeo import h3cells
from vectorgeo.errors import DatabaseError
from vectorgeo.store.catalog import Dataset, dataset, fetch_one

COPY_HEADER = 19  # PGCOPY signature (11), flags (4), header extension length (4)
BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class CellVectors:
    """The embeddings of one dataset, sorted by h3.

    Attributes:
        model_version: Model version of the dataset.
        resolution: H3 resolution of the cells.
        signature: :func:`signature` of the dataset when it was read.
        h3: Cells with an embedding (n,), uint64, sorted.
        lat: Cell centre latitudes (n,), float64.
        lng: Cell centre longitudes (n,), float64.
        embedding: Unit vectors (n, d), float32, C order.
        regions: The loaded region cells (uint64, sorted), whatever their resolution.
    """

    model_version: str
    resolution: int
    signature: str
    h3: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    embedding: np.ndarray
    regions: np.ndarray

    @property
    def n(self) -> int:
        return int(self.h3.shape[0])

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    def index_of(self, cells: np.ndarray) -> np.ndarray:
        """Row of each cell (int64), -1 where the cell has no embedding here."""
        c = np.asarray(cells, dtype=np.uint64)
        i = np.searchsorted(self.h3, c)
        found = i < self.n
        found[found] = self.h3[i[found]] == c[found]
        return np.where(found, i, -1).astype(np.int64)

    def in_loaded_region(self, cells: np.ndarray) -> np.ndarray:
        """True where a cell lies inside one of the loaded regions."""
        c = np.asarray(cells, dtype=np.uint64)
        out = np.zeros(c.shape, dtype=bool)
        for res in np.unique(h3cells.resolutions(self.regions)):
            out |= np.isin(h3cells.parents(c, int(res)), self.regions)
        return out


def signature(conn: psycopg.Connection[Any], ds: Dataset) -> str:
    """Fingerprint of a dataset's loaded regions (model version, rows, checksums, load times)."""
    row = fetch_one(
        conn,
        "SELECT coalesce(sum(rows), 0), md5(coalesce(string_agg(region::text || ':' || checksum || ':' || "
        "loaded_at::text, ',' ORDER BY region), '')) FROM vectorgeo_regions WHERE model_version = %s",
        (ds.model_version,),
    )
    return f"{ds.model_version}:{int(row[0])}:{row[1]}"


def _record_dtype(dim: int) -> np.dtype[Any]:
    return np.dtype(
        [
            ("nf", ">i2"),
            ("l0", ">i4"),
            ("h3", ">i8"),
            ("l1", ">i4"),
            ("lat", ">f8"),
            ("l2", ">i4"),
            ("lng", ">f8"),
            ("l3", ">i4"),
            ("dim", ">i2"),
            ("unused", ">i2"),
            ("e", ">f4", (dim,)),
        ]
    )


def _copy_into(conn: psycopg.Connection[Any], ds: Dataset, n: int, out: dict[str, np.ndarray]) -> int:
    """Stream the COPY into the arrays of ``out``; returns the rows read."""
    rec = _record_dtype(ds.dim)
    q = sql.SQL(
        "COPY (SELECT h3, ST_Y(geom)::float8, ST_X(geom)::float8, embedding FROM {} WHERE embedding IS NOT NULL) "
        "TO STDOUT (FORMAT BINARY)"
    ).format(ds.ident)
    buf = bytearray()
    skip = COPY_HEADER
    done = 0

    def parse(data: memoryview) -> None:
        nonlocal done
        r = np.frombuffer(data, dtype=rec)
        if r.size and (r["nf"] != 4).any():
            raise DatabaseError(f"unexpected COPY record layout reading {ds.table}")
        if done + r.size > n:
            raise DatabaseError(f"{ds.table} returned more rows than counted")
        sl = slice(done, done + r.size)
        out["h3"][sl] = r["h3"]
        out["lat"][sl] = r["lat"]
        out["lng"][sl] = r["lng"]
        out["embedding"][sl] = r["e"]
        done += r.size

    with conn.cursor() as cur, cur.copy(q) as cp:
        for block in cp:
            buf += block
            if len(buf) - skip >= BLOCK_BYTES:
                whole = (len(buf) - skip) // rec.itemsize * rec.itemsize
                parse(memoryview(buf)[skip : skip + whole])
                del buf[: skip + whole]
                skip = 0
    rest = memoryview(buf)[skip:]
    whole = len(rest) // rec.itemsize * rec.itemsize
    if len(rest) - whole != 2:  # the trailer: int16 -1
        raise DatabaseError(f"truncated COPY stream reading {ds.table}")
    parse(rest[:whole])
    return done


def load_vectors(conn: psycopg.Connection[Any], model_version: str | None = None) -> CellVectors:
    """Every embedding of a dataset (default the active one), unit-normalised, sorted by h3.

    Raises:
        DatabaseError: nothing loaded, or the read failed.
    """
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            ds = dataset(conn, model_version)
            sig = signature(conn, ds)
            n = int(fetch_one(conn, sql.SQL("SELECT count(embedding) FROM {}").format(ds.ident))[0])
            regions = conn.execute(
                "SELECT region FROM vectorgeo_regions WHERE model_version = %s", (ds.model_version,)
            ).fetchall()
            out: dict[str, np.ndarray] = {
                "h3": np.empty(n, dtype=np.int64),
                "lat": np.empty(n, dtype=np.float64),
                "lng": np.empty(n, dtype=np.float64),
                "embedding": np.empty((n, ds.dim), dtype=np.float32),
            }
            got = _copy_into(conn, ds, n, out)
    except psycopg.Error as e:
        raise DatabaseError(f"reading the embeddings failed: {e}") from None
    if got != n:
        raise DatabaseError(f"{ds.table}: counted {n} embeddings, read {got}")
    h3 = out["h3"].view(np.uint64)
    order = None if n < 2 or bool((h3[1:] > h3[:-1]).all()) else np.argsort(h3, kind="stable")
    arrays = {k: (v if order is None else v[order]) for k, v in out.items()}
    emb = arrays["embedding"]
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    emb /= np.where(norm > 0, norm, 1.0)
    return CellVectors(
        model_version=ds.model_version,
        resolution=ds.resolution,
        signature=sig,
        h3=arrays["h3"].view(np.uint64),
        lat=arrays["lat"],
        lng=arrays["lng"],
        embedding=np.ascontiguousarray(emb),
        regions=np.sort(np.array([r[0] for r in regions], dtype=np.int64).view(np.uint64)),
    )


def describe_missing(conn: psycopg.Connection[Any], vectors: CellVectors, cells: np.ndarray) -> list[str]:
    """Why each cell has no embedding in ``vectors``: ``"no embedding (status nodata)"``, ``"ocean or not land
    (not a cell of loaded region …)"`` or ``"not loaded (outside the loaded regions)"``."""
    c = np.asarray(cells, dtype=np.uint64)
    ds = dataset(conn, vectors.model_version)
    rows = conn.execute(
        sql.SQL("SELECT h3, status FROM {} WHERE h3 = ANY(%s)").format(ds.ident), (c.astype(np.int64).tolist(),)
    ).fetchall()
    status = {int(h): str(s) for h, s in rows}
    inside = vectors.in_loaded_region(c)
    out = []
    for cell, ins in zip(c.tolist(), inside.tolist(), strict=True):
        if cell in status:
            out.append(f"no embedding (status {status[cell]})")
        elif ins:
            out.append("ocean or not land (no cell of the loaded regions)")
        else:
            out.append("not loaded (outside the loaded regions)")
    return out
