"""Arrow arrays from numpy buffers and back, without going through ``pa.array`` / ``to_numpy``.

pyarrow's ``pa.array``, ``pa.scalar`` and ``Array.to_numpy`` check their input and output against
pandas types, which imports pandas (~0.2 s) the first time. An ``embed_batch`` job needs none of
pandas: it reads three numeric stencil columns and writes a region file of numeric, boolean and string
columns, all of which are plain buffers. These helpers build and read those buffers directly (zero
copy where Arrow's layout is numpy's), so that a job's start-up does not pay for pandas.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from vectorgeo import h3cells


def column_numpy(col: pa.Array | pa.ChunkedArray, dtype: np.dtype | type) -> np.ndarray:
    """A fixed-width numeric column without nulls as a numpy array of ``dtype`` (its Arrow type's width).

    Falls back to ``to_numpy`` for a column with nulls or of another layout.
    """
    dt = np.dtype(dtype)
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts: list[np.ndarray] = []
    for c in chunks:
        if c.null_count or not pa.types.is_primitive(c.type) or c.type.bit_width != 8 * dt.itemsize:
            parts.append(np.asarray(c.to_numpy(zero_copy_only=False), dtype=dt))
            continue
        parts.append(np.frombuffer(c.buffers()[1], dtype=dt, count=len(c), offset=c.offset * dt.itemsize))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.zeros(0, dt)


def primitive(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """A numeric Arrow array over a numpy array's buffer (no nulls); ``values`` must match the type's width."""
    arr = np.ascontiguousarray(values)
    if arr.ndim != 1 or 8 * arr.dtype.itemsize != type_.bit_width:
        raise ValueError(f"expected a 1-d array of {type_.bit_width}-bit values, got {arr.dtype} {arr.shape}")
    return pa.Array.from_buffers(type_, arr.shape[0], [None, pa.py_buffer(arr)])


def bools(mask: np.ndarray) -> pa.BooleanArray:
    """A boolean Arrow array (bit-packed) from a numpy bool array."""
    m = np.asarray(mask, dtype=bool)
    return pa.Array.from_buffers(pa.bool_(), m.shape[0], [None, pa.py_buffer(np.packbits(m, bitorder="little"))])


def _string_array(data: bytes | np.ndarray, offsets: np.ndarray, n: int) -> pa.StringArray:
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def strings(values: Sequence[str]) -> pa.StringArray:
    """A string Arrow array from a few Python strings (e.g. a dictionary)."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return _string_array(b"".join(encoded), offsets, len(encoded))


def repeated_string(value: str, n: int) -> pa.StringArray:
    """``value`` n times as a string Arrow array."""
    raw = value.encode("utf-8")
    if len(raw) * n >= 2**31:  # beyond 32-bit offsets
        return pa.array([value] * n, pa.string())
    offsets = np.arange(n + 1, dtype=np.int64) * len(raw)
    return _string_array(raw * n, offsets.astype(np.int32), n)


def fixed_width_strings(values: np.ndarray) -> pa.StringArray:
    """A numpy fixed-width bytes array (``S<w>``, every value w bytes long) as a string Arrow array."""
    w = values.dtype.itemsize
    n = values.shape[0]
    offsets = np.arange(0, w * (n + 1), w, dtype=np.int32)
    return _string_array(np.ascontiguousarray(values).tobytes(), offsets, n)


def hex_cells(cells: np.ndarray) -> pa.StringArray | None:
    """15-digit lowercase hex strings of H3 cell indexes (:func:`vectorgeo.h3cells.to_strs`), or None
    when some index has a non-zero top digit (not a cell: let a general formatter handle it)."""
    h = np.ascontiguousarray(cells, dtype=np.uint64)
    if h.shape[0] and (h >> np.uint64(60)).any():
        return None
    return fixed_width_strings(h3cells.to_strs(h))
