"""PostgreSQL binary COPY of cell rows, encoded with numpy (no per-row Python)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

COPY_CHUNK_ROWS = 65536
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
COPY_TRAILER = b"\xff\xff"
COPY_COLUMNS = "h3, geom, embedding, status, region"


def record_dtype(d: int | None, status_len: int) -> np.dtype[Any]:
    """One binary-COPY tuple: h3 bigint, geom (EWKB point), embedding vector | NULL, status text, region bigint.

    Args:
        d: Embedding dimension, or None for a null embedding.
        status_len: Bytes of the status text (UTF-8).
    """
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


def _records(
    sel: np.ndarray,
    h3: np.ndarray,
    lat: np.ndarray,
    lng: np.ndarray,
    embedding: np.ndarray | None,
    status: bytes,
    region: int,
) -> bytes:
    """The tuples of rows ``sel`` (all with or all without embedding, one status)."""
    d = None if embedding is None else embedding.shape[1]
    rec = np.empty(sel.shape[0], dtype=record_dtype(d, len(status)))
    rec["nfields"] = 5
    rec["h3_len"] = 8
    rec["h3"] = h3[sel]
    rec["geom_len"] = 25
    rec["g_order"] = 1
    rec["g_type"] = 0x20000001
    rec["g_srid"] = 4326
    rec["g_x"] = lng[sel]
    rec["g_y"] = lat[sel]
    if embedding is not None:
        rec["emb_len"] = 4 + 4 * embedding.shape[1]
        rec["e_dim"] = embedding.shape[1]
        rec["e_unused"] = 0
        rec["e"] = embedding[sel]
    else:
        rec["emb_len"] = -1
    rec["st_len"] = len(status)
    if status:
        rec["st"] = status
    rec["region_len"] = 8
    rec["region"] = region
    return rec.tobytes()


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

    Args:
        h3: Cells (n,), uint64 or int64.
        lat: Latitudes (n,).
        lng: Longitudes (n,).
        embedding: (n, d) float32; rows where ``valid`` is False are written as null.
        valid: (n,) bool.
        status_code: (n,) index into ``labels``.
        labels: Status texts.
        region: Region cell of every row.
        chunk_rows: Most rows encoded at once.
    """
    h3i = h3.view(np.int64) if h3.dtype == np.uint64 else h3.astype(np.int64)
    yield COPY_HEADER
    for code, label in enumerate(labels):
        raw = label.encode("utf-8")
        for with_emb in (True, False):
            idx = np.flatnonzero((status_code == code) & (valid if with_emb else ~valid))
            for start in range(0, idx.shape[0], chunk_rows):
                sel = idx[start : start + chunk_rows]
                yield _records(sel, h3i, lat, lng, embedding if with_emb else None, raw, region)
    yield COPY_TRAILER
