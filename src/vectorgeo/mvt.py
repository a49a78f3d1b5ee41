"""A vectorised Mapbox Vector Tile (v2.1) encoder for one layer of polygons with one ring each.

Every feature is a simple polygon (an H3 hexagon or pentagon) given by its vertices in tile
coordinates (integers, y down; the ring is not closed). The tile is built with numpy from whole
arrays, without a loop over features:

- geometry of a feature with :math:`v` vertices: ``MoveTo(1) dx dy LineTo(v-1) (dx dy)*(v-1) ClosePath``,
  deltas zigzag-encoded (``(n << 1) ^ (n >> 31)``), the cursor starting at (0, 0) for each feature;
- rings with a negative surveyor's area are reversed (an exterior ring has a positive area in tile
  coordinates), rings of zero area (collapsed by rounding) are dropped;
- properties: each feature has its own value of each property (``float`` or fixed-width ``str``
  columns), so value ``j`` of property ``i`` is ``values[i * n + j]`` and the tags are ``[i, i n + j]``;
- every field of a feature is a varint (field keys below 128 are one byte, the same as their varint),
  so the features are one stream of integers, varint-encoded in one pass (:func:`varints`).

Protobuf field numbers (vector_tile.proto): Tile.layers 3; Layer.version 15, name 1, features 2,
keys 3, values 4, extent 5; Feature.id 1, tags 2, type 3 (3 = POLYGON), geometry 4;
Value.string_value 1, float_value 2.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

EXTENT = 4096
_MOVE_TO_1 = (1 << 3) | 1
_CLOSE_PATH = (1 << 3) | 7
_POLYGON = 3


def varint_sizes(v: np.ndarray) -> np.ndarray:
    """Bytes of the varint of each value (uint64 array)."""
    v = np.asarray(v, dtype=np.uint64)
    size = np.ones(v.shape, dtype=np.int64)
    for b in range(1, 10):
        size += v >= np.uint64(1 << (7 * b))
    return size


def varints(v: np.ndarray) -> bytes:
    """The protobuf varints of a uint64 array, concatenated."""
    v = np.asarray(v, dtype=np.uint64).ravel()
    size = varint_sizes(v)
    start = np.cumsum(size) - size
    out = np.zeros(int(size.sum()), dtype=np.uint8)
    for b in range(int(size.max()) if v.size else 0):
        m = size > b
        byte = (v[m] >> np.uint64(7 * b)) & np.uint64(0x7F)
        more = (size[m] - 1 > b).astype(np.uint64) << np.uint64(7)
        out[start[m] + b] = (byte | more).astype(np.uint8)
    return out.tobytes()


def _varint(n: int) -> bytes:
    return varints(np.array([n], dtype=np.uint64))


def zigzag(n: np.ndarray) -> np.ndarray:
    """Zigzag encoding of int32 values (uint64)."""
    n = np.asarray(n, dtype=np.int64)
    return ((n << 1) ^ (n >> 63)).astype(np.uint64)


def _segment_sums(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Sums of ``values`` over the segments ``offsets[i]:offsets[i + 1]`` (non-empty segments)."""
    c = np.concatenate([[0], np.cumsum(values)])
    out: np.ndarray = c[offsets[1:]] - c[offsets[:-1]]
    return out


def orient(xy: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rings reoriented to a positive surveyor's area; rings of zero area dropped.

    Args:
        xy: Vertices (V, 2) int64, ring after ring.
        offsets: Ring boundaries (m + 1,).

    Returns:
        ``(xy, offsets, kept)``: the kept rings and the indexes of the kept rings among the m.
    """
    m = offsets.size - 1
    ring = np.repeat(np.arange(m), np.diff(offsets))
    nxt = np.arange(xy.shape[0]) + 1
    last = offsets[1:] - 1
    nxt[last] = offsets[:-1]
    cross = xy[:, 0] * xy[nxt, 1] - xy[nxt, 0] * xy[:, 1]
    area2 = _segment_sums(cross, offsets)
    kept = np.flatnonzero(area2 != 0)
    flip = area2 < 0
    # reverse the vertex order of flipped rings: position p of ring r maps to offsets[r] + offsets[r + 1] - 1 - p
    pos = np.arange(xy.shape[0])
    src = np.where(flip[ring], offsets[ring] + offsets[ring + 1] - 1 - pos, pos)
    xy = xy[src]
    keep_v = np.isin(ring, kept)
    counts = np.diff(offsets)[kept]
    return xy[keep_v], np.concatenate([[0], np.cumsum(counts)]), kept


def _geometry_ints(xy: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Command integers of every polygon and their offsets (each polygon ``2 v + 3`` integers)."""
    m = offsets.size - 1
    nv = np.diff(offsets)
    ring = np.repeat(np.arange(m), nv)
    prev = np.zeros_like(xy)
    prev[1:] = xy[:-1]
    prev[offsets[:-1]] = 0  # the cursor restarts at (0, 0) for each feature
    d = zigzag(xy - prev)
    glen = 2 * nv + 3
    gstart = np.concatenate([[0], np.cumsum(glen)])
    out = np.zeros(int(gstart[-1]), dtype=np.uint64)
    j = np.arange(xy.shape[0]) - offsets[ring]
    pos = gstart[ring] + 1 + 2 * j + (j >= 1)
    out[pos] = d[:, 0]
    out[pos + 1] = d[:, 1]
    out[gstart[:-1]] = _MOVE_TO_1
    out[gstart[:-1] + 3] = ((nv - 1) << 3) | 2
    out[gstart[1:] - 1] = _CLOSE_PATH
    return out, gstart


def _values(properties: Mapping[str, np.ndarray]) -> bytes:
    """Layer field 4 (Value) of every property of every feature, property after property."""
    parts = []
    for name, col in properties.items():
        col = np.asarray(col)
        if col.dtype.kind == "f":
            rec = np.zeros((col.size, 7), dtype=np.uint8)
            rec[:, 0] = (4 << 3) | 2
            rec[:, 1] = 5
            rec[:, 2] = (2 << 3) | 5
            rec[:, 3:] = col.astype("<f4").view(np.uint8).reshape(-1, 4)
        elif col.dtype.kind in "SU":
            width = col.dtype.itemsize // (4 if col.dtype.kind == "U" else 1)
            raw = np.char.encode(col, "ascii") if col.dtype.kind == "U" else col
            raw = raw.astype(f"S{width}")
            if width > 125 or (np.char.str_len(raw) != width).any():
                raise ValueError(f"property {name!r}: strings must all have the same length (at most 125)")
            rec = np.zeros((col.size, width + 4), dtype=np.uint8)
            rec[:, 0] = (4 << 3) | 2
            rec[:, 1] = width + 2
            rec[:, 2] = (1 << 3) | 2
            rec[:, 3] = width
            rec[:, 4:] = np.frombuffer(raw.tobytes(), dtype=np.uint8).reshape(-1, width)
        else:
            raise ValueError(f"property {name!r}: expected floats or fixed-width strings, got {col.dtype}")
        parts.append(rec.tobytes())
    return b"".join(parts)


def encode_polygons(
    name: str,
    xy: np.ndarray,
    offsets: np.ndarray,
    properties: Mapping[str, np.ndarray],
    extent: int = EXTENT,
) -> bytes:
    """One tile with one layer of single-ring polygons (uncompressed MVT bytes; empty bytes when no feature).

    Args:
        name: Layer name.
        xy: Vertices in tile coordinates (V, 2), rounded to integers; each ring unclosed.
        offsets: Ring boundaries (m + 1,), each ring at least 3 vertices.
        properties: Per-feature columns (m,): floats, or strings of one fixed width.
        extent: Tile extent.

    Returns:
        The tile; features in ring order, with rings of zero area dropped.
    """
    xy = np.rint(np.asarray(xy, dtype=np.float64)).astype(np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size < 2:
        return b""
    xy, offsets, kept = orient(xy, offsets)
    m = kept.size
    if m == 0:
        return b""
    props = {k: np.asarray(v)[kept] for k, v in properties.items()}
    geom, gstart = _geometry_ints(xy, offsets)
    p = len(props)
    tags = np.empty((m, 2 * p), dtype=np.uint64)
    for i in range(p):
        tags[:, 2 * i] = i
        tags[:, 2 * i + 1] = i * m + np.arange(m)
    tag_bytes = varint_sizes(tags).sum(axis=1) if p else np.zeros(m, dtype=np.int64)
    geom_bytes = _segment_sums(varint_sizes(geom), gstart)
    head_tags = 1 + varint_sizes(tag_bytes) + tag_bytes if p else np.zeros(m, dtype=np.int64)
    feature_bytes = head_tags + 2 + 1 + varint_sizes(geom_bytes) + geom_bytes
    # per feature: 0x12 len | 0x12 taglen tags | 0x18 3 | 0x22 geomlen geom
    head = np.stack([np.full(m, 0x12), feature_bytes], axis=1).astype(np.uint64)
    rows = [head]
    if p:
        rows += [np.stack([np.full(m, 0x12), tag_bytes], axis=1).astype(np.uint64), tags]
    rows += [np.stack([np.full(m, 0x18), np.full(m, _POLYGON), np.full(m, 0x22), geom_bytes], axis=1).astype(np.uint64)]
    fixed = np.concatenate(rows, axis=1)  # (m, 2 + [2 + 2p] + 4)
    nfix = fixed.shape[1]
    glen = np.diff(gstart)
    total = nfix + glen
    start = np.concatenate([[0], np.cumsum(total)])
    stream = np.zeros(int(start[-1]), dtype=np.uint64)
    stream[(start[:-1, None] + np.arange(nfix)).ravel()] = fixed.ravel()
    ring = np.repeat(np.arange(m), glen)
    stream[start[ring] + nfix + (np.arange(geom.size) - gstart[ring])] = geom
    features = varints(stream)
    keys = b"".join(b"\x1a" + _varint(len(k.encode())) + k.encode() for k in props)
    layer = (
        b"\x78\x02"
        + b"\x0a"
        + _varint(len(name.encode()))
        + name.encode()
        + features
        + keys
        + _values(props)
        + b"\x28"
        + _varint(extent)
    )
    return b"\x1a" + _varint(len(layer)) + layer
