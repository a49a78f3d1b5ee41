"""The tile pyramid as a workflow output: one PMTiles archive of vector tiles per model version.

``build_pyramid`` reads the region embedding files once and writes ``results/tiles/cells.pmtiles``: the
tiles of :mod:`vectorgeo.tiles` (layer ``cells``, properties ``h3``, ``res``, ``children``, ``color``; each
zoom shows the resolution :func:`vectorgeo.tiles.level_for_zoom` picks, at most ``max_features`` per tile),
coloured the same way (the first three principal components of a sample of the embeddings, clipped at
their 1st and 99th percentiles), with rollups below the loaded resolution (the re-normalised mean of the
children). PMTiles is a single file that the API, any static host or S3 serves with HTTP range requests,
and MapLibre reads through the ``pmtiles`` protocol; nothing is built when a server starts.

Everything per cell is vectorised numpy: hexagon vertices (h3ronpy), Web Mercator projection, the
cell-to-tile assignment (a hexagon goes into every tile its box overlaps; vertices outside a tile are
kept, renderers clip them), and the Mapbox Vector Tile encoding itself: a tile is a protobuf message,
and every field tag, length, ASCII byte and geometry integer in it is a varint, so a tile is one token
array encoded by :func:`varints`. Exterior rings are clockwise in tile coordinates (y down), as the MVT
spec requires; a hexagon across the antimeridian is drawn on both sides.

Tiles are gzipped (the archive's ``tile_compression``) and written in tile-id order, so the archive is
clustered; its metadata holds the model version, the loaded resolution, the bounds and the PCA.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vectorgeo import geoparquet, h3cells
from vectorgeo.atomic import atomic_path
from vectorgeo.errors import DataError
from vectorgeo.mvt import varint_sizes as varint_lengths
from vectorgeo.mvt import varints, zigzag
from vectorgeo.tiles import EXTENT, MERCATOR_MAX_LAT, PCA_SAMPLE, level_for_zoom, max_zoom, pca_colour_axes

LAYER = "cells"
KEYS = ("h3", "res", "children", "color")
MAX_VERTICES = 10
"""Most vertices of an H3 cell boundary (a hexagon crossing icosahedron edges)."""
ARCHIVE = "cells.pmtiles"


# --- protobuf helpers (varints and zigzag come from vectorgeo.mvt) ------------------------------------------


def _ascii(text: str) -> list[int]:
    return list(text.encode("ascii"))


def _hex_bytes(values: np.ndarray, width: int) -> np.ndarray:
    """(n, width) ASCII bytes of the lowercase hex digits of uint64 values."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    v = np.asarray(values, dtype=np.uint64)
    shifts = np.uint64(4) * np.arange(width - 1, -1, -1, dtype=np.uint64)
    return digits[((v[:, None] >> shifts[None, :]) & np.uint64(15)).astype(np.int64)]


# --- one tile -------------------------------------------------------------------------------------------


@dataclass
class TileFeatures:
    """The features of one tile.

    Attributes:
        h3: uint64 (F,).
        color: uint32 (F,) 0xRRGGBB.
        children: int64 (F,).
        res: The resolution of the tile's cells.
        geometry: int64 (F, V, 2) ring vertices in tile pixels, clockwise with y down; rings shorter than V
            repeat their last vertex.
        nverts: int64 (F,) vertices per ring.
    """

    h3: np.ndarray
    color: np.ndarray
    children: np.ndarray
    res: int
    geometry: np.ndarray
    nverts: np.ndarray


def encode_tile(f: TileFeatures) -> bytes:
    """The Mapbox Vector Tile (v2) of one tile's features, uncompressed (see the module docstring)."""
    n = f.h3.shape[0]
    colors, color_idx = np.unique(f.color, return_inverse=True)
    kids, kid_idx = np.unique(f.children, return_inverse=True)
    nv = len(colors)
    # values: one h3 string per feature, then the distinct colours, the distinct child counts, the resolution
    v_h3 = np.arange(n)
    v_color = n + color_idx
    v_children = n + nv + kid_idx
    v_res = n + nv + len(kids)
    tags = np.column_stack(
        [np.zeros(n), v_h3, np.ones(n), np.full(n, v_res), np.full(n, 2), v_children, np.full(n, 3), v_color]
    ).astype(np.uint64)
    tag_len = varint_lengths(tags).sum(axis=1)
    # geometry: MoveTo(1) x y, LineTo(k - 1) dx dy ..., ClosePath; deltas zigzagged
    geom = f.geometry
    deltas = np.diff(geom, axis=1, prepend=np.zeros((n, 1, 2), dtype=geom.dtype))
    params = zigzag(deltas.reshape(n, -1))  # (F, 2V)
    V = geom.shape[1]
    line_cmd = (2 | ((f.nverts - 1) << 3)).astype(np.uint64)
    cmds = np.column_stack(
        [np.full(n, 9, np.uint64), params[:, :2], line_cmd, params[:, 2:], np.full(n, 15, np.uint64)]
    )
    # rings shorter than V (pentagons; V > 6 where a hexagon crosses an icosahedron edge): the padding
    # vertices (repeats of the last one) are not written
    keep = np.ones(cmds.shape, dtype=bool)
    keep[:, 4 : 4 + 2 * (V - 1)] = np.repeat(np.arange(1, V)[None, :] < f.nverts[:, None], 2, axis=1)
    geom_len = np.where(keep, varint_lengths(cmds), 0).sum(axis=1)
    body_len = 1 + varint_lengths(tag_len) + tag_len + 2 + 1 + varint_lengths(geom_len) + geom_len
    head = np.column_stack([np.full(n, 18), body_len, np.full(n, 18), tag_len]).astype(np.uint64)
    mid = np.column_stack([np.full(n, 24), np.full(n, 3), np.full(n, 34), geom_len]).astype(np.uint64)
    rows = np.concatenate([head, tags, mid, cmds], axis=1)
    row_keep = np.concatenate([np.ones((n, head.shape[1] + tags.shape[1] + mid.shape[1]), bool), keep], axis=1)
    features = rows[row_keep]
    # values: Value{string_value = 1} / Value{uint_value = 5}
    h3_vals = np.column_stack(
        [np.full((n, 1), 34), np.full((n, 1), 17), np.full((n, 1), 10), np.full((n, 1), 15), _hex_bytes(f.h3, 15)]
    )
    col_vals = np.column_stack(
        [
            np.full((nv, 1), 34),
            np.full((nv, 1), 9),
            np.full((nv, 1), 10),
            np.full((nv, 1), 7),
            np.full((nv, 1), ord("#")),
            _hex_bytes(colors, 6),
        ]
    )
    kid_tokens = [np.array([34, 1 + varint_lengths(np.array([k]))[0], 40, k], dtype=np.uint64) for k in kids]
    res_tokens = np.array([34, 2, 40, f.res], dtype=np.uint64)
    keys = [t for k in KEYS for t in (26, len(k), *_ascii(k))]
    layer_tokens = np.concatenate(
        [
            np.array([120, 2, 10, len(LAYER), *_ascii(LAYER)], dtype=np.uint64),
            features,
            np.array(keys, dtype=np.uint64),
            h3_vals.ravel().astype(np.uint64),
            col_vals.ravel().astype(np.uint64),
            *kid_tokens,
            res_tokens,
            np.array([40, EXTENT], dtype=np.uint64),
        ]
    )
    layer = varints(layer_tokens)
    return varints(np.array([26, len(layer)], dtype=np.uint64)) + layer


# --- PMTiles tile ids -------------------------------------------------------------------------------------


def tile_ids(z: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PMTiles tile ids (Hilbert order within a zoom) of tiles (z, x, y), vectorised (pmtiles.tile.zxy_to_tileid)."""
    x = np.asarray(x, dtype=np.int64).copy()
    y = np.asarray(y, dtype=np.int64).copy()
    acc = np.full(x.shape, ((1 << (2 * z)) - 1) // 3, dtype=np.int64)
    for a in range(z - 1, -1, -1):
        s = 1 << a
        rx = x & s
        ry = y & s
        acc += ((3 * rx) ^ ry) << a
        # rotate within an s x s square
        flip = (ry == 0) & (rx != 0)
        x = np.where(flip, s - 1 - x, x)
        y = np.where(flip, s - 1 - y, y)
        swap = ry == 0
        x, y = np.where(swap, y, x), np.where(swap, x, y)
    return acc


# --- cells, colours, rollups ------------------------------------------------------------------------------


def fit_pca(x: np.ndarray) -> dict[str, Any]:
    """PCA colours of a sample of embeddings (:func:`vectorgeo.tiles.pca_colour_axes`, which the
    database-built tiles use too)."""
    return pca_colour_axes(x)


def colors(embeddings: np.ndarray, pca: dict[str, Any]) -> np.ndarray:
    """0xRRGGBB (uint32) of unit embeddings under a fitted PCA."""
    if not pca["components"]:
        return np.full(embeddings.shape[0], 0x808080, dtype=np.uint32)
    proj = (np.asarray(embeddings, np.float64) - np.asarray(pca["mean"])) @ np.asarray(pca["components"]).T
    lo, hi = np.asarray(pca["lo"]), np.asarray(pca["hi"])
    rgb = np.clip(np.round(255.0 * (proj - lo) / (hi - lo)), 0, 255).astype(np.uint32)
    out: np.ndarray = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return out


def _group_sums(parents: np.ndarray, emb: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sum embeddings and counts per distinct parent."""
    cells, inv = np.unique(parents, return_inverse=True)
    sums = np.zeros((cells.shape[0], emb.shape[1]), dtype=np.float64)
    np.add.at(sums, inv, emb)
    return cells, sums, np.bincount(inv, weights=counts, minlength=cells.shape[0]).astype(np.int64)


@dataclass
class Level:
    """The cells shown at one resolution: ids, colours (0xRRGGBB) and loaded cells under each."""

    cells: np.ndarray
    color: np.ndarray
    children: np.ndarray


def _sample(files: Sequence[str], n_total: int) -> np.ndarray:
    """Up to PCA_SAMPLE ok embeddings, an even share of each file's rows (every k-th)."""
    parts = []
    for f in files:
        data = geoparquet.read_region(f)
        ok = np.flatnonzero(data.valid)
        want = max(1, round(PCA_SAMPLE * len(data) / max(n_total, 1)))
        parts.append(data.embedding[ok[:: max(1, ok.size // want)][:want]])
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def levels(files: Sequence[str], needed: set[int]) -> tuple[dict[int, Level], dict[str, Any]]:
    """The cells of every needed resolution (the loaded one and rollups), from the region files.

    Each file is read once more after the PCA sample; a rollup level at or finer than the file's region
    resolution is finished per file (its parents lie inside the region), a coarser one is summed across
    files.

    Returns:
        (levels by resolution, info: resolution, cells, model_version, pca, bounds).

    Raises:
        DataError: no files, files of several model versions or resolutions.
    """
    import pyarrow.parquet as pq

    if not files:
        raise DataError("embeddings", "no region files to build tiles from")
    n_total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    pca = fit_pca(_sample(files, n_total))
    out: dict[int, list[Level]] = {p: [] for p in needed}
    partial: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {p: [] for p in needed}
    versions: set[str] = set()
    res: int | None = None
    cells_ok = 0
    bounds = [180.0, 90.0, -180.0, -90.0]
    for f in files:
        data = geoparquet.read_region(f)
        versions.add(data.model_version)
        ok = data.valid
        h3, emb = data.h3[ok], data.embedding[ok].astype(np.float64)
        if h3.size == 0:
            continue
        r = int(h3cells.resolutions(h3[:1])[0])
        if res is not None and r != res:
            raise DataError(f, f"cells at resolution {r}, other files at {res}")
        res = r
        cells_ok += h3.size
        lat, lng = data.lat[ok], data.lng[ok]
        bounds = [
            min(bounds[0], lng.min()),
            min(bounds[1], lat.min()),
            max(bounds[2], lng.max()),
            max(bounds[3], lat.max()),
        ]
        region_res = h3cells.resolution(int(data.region, 16)) if data.region else 0
        if r in needed:
            out[r].append(Level(h3, colors(emb, pca), np.ones(h3.size, np.int64)))
        for p in sorted((q for q in needed if q < r), reverse=True):
            cells, sums, counts = _group_sums(h3cells.parents(h3, p), emb, np.ones(h3.size))
            if p >= region_res:
                out[p].append(Level(cells, colors(sums / np.linalg.norm(sums, axis=1, keepdims=True), pca), counts))
            else:
                partial[p].append((cells, sums, counts))
    if len(versions) > 1:
        raise DataError("embeddings", f"region files of several model versions: {sorted(versions)}")
    for p, parts in partial.items():
        if parts:
            cells = np.concatenate([c for c, _, _ in parts])
            sums = np.concatenate([s for _, s, _ in parts])
            counts = np.concatenate([n for _, _, n in parts])
            cells, sums, counts = _group_sums(cells, sums, counts.astype(np.float64))
            out[p].append(Level(cells, colors(sums / np.linalg.norm(sums, axis=1, keepdims=True), pca), counts))
    merged = {
        p: Level(
            np.concatenate([lv.cells for lv in lvs]),
            np.concatenate([lv.color for lv in lvs]),
            np.concatenate([lv.children for lv in lvs]),
        )
        for p, lvs in out.items()
        if lvs
    }
    info = {
        "resolution": res,
        "cells": cells_ok,
        "model_version": next(iter(versions), ""),
        "pca": pca,
        "bounds": bounds if cells_ok else [-180.0, -60.0, 180.0, 75.0],
    }
    return merged, info


# --- hexagons and tiles ------------------------------------------------------------------------------------


HEXAGON_CHUNK = 200_000
"""Cells whose boundaries are decoded at once (shapely geometries cost ~0.5 kB each)."""


def _rings(cells: np.ndarray, V: int) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries (lng, lat) of cells as (n, V, 2), padded by repeating the last vertex, and vertex counts."""
    import pyarrow as pa
    import shapely
    from h3ronpy import vector

    rings = np.empty((cells.size, V, 2), dtype=np.float64)
    nverts = np.empty(cells.size, dtype=np.int64)
    for s in range(0, cells.size, HEXAGON_CHUNK):
        part = cells[s : s + HEXAGON_CHUNK]
        wkb = pa.array(vector.cells_to_wkb_polygons(pa.array(part))).to_numpy(zero_copy_only=False)
        coords, which = shapely.get_coordinates(shapely.from_wkb(wkb), return_index=True)
        counts = np.bincount(which, minlength=part.size)  # ring length with the closing vertex
        n = counts - 1
        start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        k = np.minimum(np.arange(V)[None, :], n[:, None] - 1)
        rings[s : s + part.size] = coords[start[:, None] + k]
        nverts[s : s + part.size] = n
    return rings, nverts


def hexagons(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Web Mercator rings of cells in world units ([0, 1] across), ready to cut into tiles.

    Returns:
        (index into ``cells`` (m,), vertices (m, V, 2) padded by repeating the last one, vertex counts (m,)).
        Cells beyond the Mercator latitude limit are dropped; a cell across the antimeridian appears twice.
    """
    cells = np.asarray(cells, dtype=np.uint64)
    if cells.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 6, 2)), np.zeros(0, np.int64)
    ring, nverts = _rings(cells, MAX_VERTICES)
    V = int(nverts.max())
    ring = ring[:, :V]
    lng, lat = ring[..., 0], ring[..., 1]
    keep = (lat.min(axis=1) > -MERCATOR_MAX_LAT) & (lat.max(axis=1) < MERCATOR_MAX_LAT)
    wraps = keep & (lng.max(axis=1) - lng.min(axis=1) > 180.0)
    index = [np.flatnonzero(keep & ~wraps)]
    lngs = [lng[index[0]]]
    w = np.flatnonzero(wraps)
    if w.size:
        index += [w, w]
        lngs += [np.where(lng[w] < 0, lng[w] + 360.0, lng[w]), np.where(lng[w] > 0, lng[w] - 360.0, lng[w])]
    idx = np.concatenate(index)
    x = (np.concatenate(lngs) + 180.0) / 360.0
    phi = np.radians(lat[idx])
    y = (1.0 - np.log(np.tan(np.pi / 4 + phi / 2)) / np.pi) / 2.0
    return idx, np.stack([x, y], axis=-1), nverts[idx]


def _clockwise(px: np.ndarray, nverts: np.ndarray) -> np.ndarray:
    """Rings reordered where needed so that their surveyor's area (y down) is positive."""
    x, y = px[..., 0], px[..., 1]
    area = (x * np.roll(y, -1, axis=1) - np.roll(x, -1, axis=1) * y).sum(axis=1)
    V = px.shape[1]
    k = np.arange(V)[None, :]
    rev = np.where(k < nverts[:, None], nverts[:, None] - 1 - k, k)
    order = np.where((area < 0)[:, None], rev, np.broadcast_to(k, rev.shape))
    return np.take_along_axis(px, order[..., None], axis=1)


BLOCK_CELLS = 100_000
"""Most cells whose hexagons are in memory at once while a zoom is cut into tiles (~1 kB each)."""
CIRCUMRADIUS_FACTOR = 1.5
"""Bound of an H3 cell's centre-to-vertex distance in average edge lengths (measured: at most 1.10)."""


def _centres(cells: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Web Mercator world coordinates (x, y in [0, 1]) of cell centres and a bound of each hexagon's
    half-extent around its centre, float32 (computed in chunks: nothing per cell beyond these 12 bytes).

    A cell lies within an angle δ of its centre (δ = CIRCUMRADIUS_FACTOR × the average edge length at ``res``);
    Mercator scales by 1 / cos φ, so its extent is at most δ / (2π cos φ') on either side in x and in y, φ' the
    largest |latitude| within δ (capped just beyond the Mercator limit: cells past it are dropped anyway).
    """
    import h3
    import pyarrow as pa
    from h3ronpy import vector

    delta = CIRCUMRADIUS_FACTOR * h3.average_hexagon_edge_length(res, "km") / 6371.0088
    cap = np.radians(MERCATOR_MAX_LAT + 1.0)
    x = np.empty(cells.size, np.float32)
    y = np.empty(cells.size, np.float32)
    half = np.empty(cells.size, np.float32)
    for s in range(0, cells.size, HEXAGON_CHUNK):
        coords = vector.cells_to_coordinates(pa.array(cells[s : s + HEXAGON_CHUNK]))
        lat = np.radians(coords.column("lat").to_numpy())
        lng = coords.column("lng").to_numpy()
        sl = slice(s, s + lat.size)
        x[sl] = (lng + 180.0) / 360.0
        phi = np.clip(lat, -cap, cap)
        y[sl] = (1.0 - np.log(np.tan(np.pi / 4 + phi / 2)) / np.pi) / 2.0
        half[sl] = delta / (2 * np.pi * np.cos(np.minimum(np.abs(lat) + delta, cap)))
    return x, y, half


def _blocks(
    x: np.ndarray, y: np.ndarray, half: np.ndarray, z: int, limit: int
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Quadtree blocks of tiles (bz, bx, by) in PMTiles order, each with the cells that may reach it.

    A block is split into its four children (visited in Hilbert order, so that the tiles of the blocks come
    out in tile-id order) until at most ``limit`` cells may reach it or it is one tile at zoom ``z``. A cell
    may reach a block when its centre's box (± ``half``) overlaps the block, shifted by ±1 in x for hexagons
    drawn on both sides of the antimeridian; margins of 1e-6 cover float32 rounding.
    """
    stack: list[tuple[int, int, int, np.ndarray]] = [(0, 0, 0, np.arange(x.size, dtype=np.int64))]
    while stack:
        bz, bx, by, idx = stack.pop()
        if idx.size <= limit or bz == z:
            if idx.size:
                yield bz, bx, by, idx
            continue
        size = 1.0 / (1 << (bz + 1))
        children = []
        for cx, cy in ((2 * bx, 2 * by), (2 * bx + 1, 2 * by), (2 * bx, 2 * by + 1), (2 * bx + 1, 2 * by + 1)):
            x0, y0 = cx * size, cy * size
            cxs, cys, ch = x[idx], y[idx], half[idx] + np.float32(1e-6)
            near_y = (cys + ch >= y0) & (cys - ch <= y0 + size)
            near_x = np.zeros(idx.size, dtype=bool)
            for shift in (-1.0, 0.0, 1.0):
                near_x |= (cxs + shift + ch >= x0) & (cxs + shift - ch <= x0 + size)
            children.append((int(tile_ids(bz + 1, np.array([cx]), np.array([cy]))[0]), cx, cy, idx[near_x & near_y]))
        # a stack: push in reverse Hilbert order, so that the first child is processed first
        for _, cx, cy, sub in sorted(children, reverse=True):
            stack.append((bz + 1, cx, cy, sub))


def zoom_tiles(
    level: Level, res: int, z: int, max_features: int, block_cells: int = BLOCK_CELLS
) -> Iterator[tuple[int, bytes]]:
    """(tile id, gzipped tile) of every non-empty tile at zoom ``z`` showing ``level``, in tile-id order.

    Memory is bounded: the tiles are cut block by block (:func:`_blocks`), with the hexagons of at most about
    ``block_cells`` cells at once, plus 12 bytes per cell of the level for the centres.
    """
    if level.cells.size == 0:
        return
    x, y, half = _centres(level.cells, res)
    n = 1 << z
    for bz, bx, by, cand in _blocks(x, y, half, z, block_cells):
        span = 1 << (z - bz)
        lo_x, lo_y = bx * span, by * span
        idx, world, nverts = hexagons(level.cells[cand])
        if idx.size == 0:
            continue
        idx = cand[idx]
        pix = world * (n * EXTENT)
        tmin = np.floor(pix.min(axis=1) / EXTENT).astype(np.int64)
        tmax = np.floor(pix.max(axis=1) / EXTENT).astype(np.int64)
        # only the tiles of this block (its cells may reach into others, cut with those)
        tmin = np.maximum(tmin, [lo_x, lo_y])
        tmax = np.minimum(tmax, [lo_x + span - 1, lo_y + span - 1])
        nx = np.maximum(tmax[:, 0] - tmin[:, 0] + 1, 0)
        ny = np.maximum(tmax[:, 1] - tmin[:, 1] + 1, 0)
        per = nx * ny
        feat = np.repeat(np.arange(idx.size), per)
        off = np.arange(feat.size) - np.repeat(np.cumsum(per) - per, per)
        tx = tmin[feat, 0] + off % np.maximum(nx[feat], 1)
        ty = tmin[feat, 1] + off // np.maximum(nx[feat], 1)
        if feat.size == 0:  # candidates near the block that reach none of its tiles
            continue
        tid = tile_ids(z, tx, ty)
        order = np.lexsort((level.cells[idx[feat]], tid))
        feat, tx, ty, tid = feat[order], tx[order], ty[order], tid[order]
        bounds = np.flatnonzero(np.diff(tid)) + 1
        for s, e in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [tid.size]]), strict=True):
            e = min(e, s + max_features)
            fs = feat[s:e]
            origin = np.array([tx[s], ty[s]], dtype=np.float64) * EXTENT
            ring = np.round(pix[fs] - origin).astype(np.int64)
            ring = _clockwise(ring, nverts[fs])
            cells = idx[fs]
            tile = TileFeatures(level.cells[cells], level.color[cells], level.children[cells], res, ring, nverts[fs])
            yield int(tid[s]), gzip.compress(encode_tile(tile), compresslevel=5, mtime=0)


def build_pyramid(
    files: Sequence[str | Path], out_path: str | Path, max_features: int, block_cells: int = BLOCK_CELLS
) -> dict[str, Any]:
    """Build the tile pyramid of the region files into one PMTiles archive, atomically.

    Memory: the levels (20 bytes per cell and rollup cell) plus one block of hexagons (:func:`zoom_tiles`).

    Args:
        files: The region embedding files (``{region}_{digest}.parquet``).
        out_path: The archive (``results/tiles/cells.pmtiles``).
        max_features: Feature cap per tile (``serve.tile_max_features``).
        block_cells: Most cells whose hexagons are in memory at once.

    Returns:
        A summary: model_version, resolution, cells, zooms, tiles, features, bytes, seconds.

    Raises:
        DataError: no files, or files that disagree.
    """
    from pmtiles.tile import Compression, TileType
    from pmtiles.writer import Writer

    t0 = time.perf_counter()
    names = [str(f) for f in files]
    import pyarrow.parquet as pq

    # the loaded resolution decides the zooms; read it from the first file's first cell
    first = pq.read_table(names[0], columns=["h3"]).column("h3").to_numpy()[:1] if names else np.zeros(0)
    if first.size == 0:
        raise DataError(names[0] if names else "embeddings", "no cells to build tiles from")
    res = int(h3cells.resolutions(first.astype(np.uint64))[0])
    top = max_zoom(res, max_features)
    by_zoom = {z: level_for_zoom(z, res, max_features) for z in range(top + 1)}
    lv, info = levels(names, set(by_zoom.values()))
    n_tiles = n_features = 0
    with atomic_path(out_path, suffix=".pmtiles") as tmp, open(tmp, "wb") as f:
        writer = Writer(f)
        for z, p in by_zoom.items():
            if p not in lv:
                continue
            for tid, data in zoom_tiles(lv[p], p, z, max_features, block_cells):
                writer.write_tile(tid, data)
                n_tiles += 1
        w, s, e, n = info["bounds"]
        header = {
            "tile_type": TileType.MVT,
            "tile_compression": Compression.GZIP,
            "min_zoom": 0,
            "max_zoom": top,
            "min_lon_e7": int(w * 1e7),
            "min_lat_e7": int(s * 1e7),
            "max_lon_e7": int(e * 1e7),
            "max_lat_e7": int(n * 1e7),
            "center_zoom": 2,
            "center_lon_e7": int((w + e) / 2 * 1e7),
            "center_lat_e7": int((s + n) / 2 * 1e7),
        }
        fields = {"h3": "String", "res": "Number", "children": "Number", "color": "String"}
        metadata = {
            "name": "vectorgeo cells",
            "vector_layers": [{"id": LAYER, "fields": fields, "minzoom": 0, "maxzoom": top}],
            "model_version": info["model_version"],
            "resolution": res,
            "cells": info["cells"],
            "bounds": info["bounds"],
            "max_features": max_features,
            "pca": info["pca"],
        }
        if n_tiles == 0:
            raise DataError(str(out_path), "no tile has a cell (every cell beyond the Mercator latitude limit?)")
        writer.finalize(header, metadata)
    n_features = sum(len(level.cells) for level in lv.values())
    return {
        "model_version": info["model_version"],
        "resolution": res,
        "cells": info["cells"],
        "max_zoom": top,
        "tiles": n_tiles,
        "level_cells": n_features,
        "bytes": Path(out_path).stat().st_size,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a tile archive written by :func:`build_pyramid`."""
    from pmtiles.reader import MmapSource, Reader

    with open(path, "rb") as f:
        return dict(Reader(MmapSource(f)).metadata())


class Archive:
    """A tile archive opened for serving: tiles by (z, x, y), memory-mapped.

    Args:
        path: The ``.pmtiles`` file.
    """

    def __init__(self, path: str | Path) -> None:
        import mmap

        from pmtiles.reader import Reader

        self.path = Path(path)
        self._file = open(self.path, "rb")  # kept open while served
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

        def get_bytes(offset: int, length: int) -> bytes:
            return self._map[offset : offset + length]

        self._reader = Reader(get_bytes)
        self.header = self._reader.header()
        self.metadata = dict(self._reader.metadata())

    def tile(self, z: int, x: int, y: int) -> bytes | None:
        """The gzipped tile, or None when the archive has none there."""
        data = self._reader.get(z, x, y)
        return bytes(data) if data is not None else None

    def close(self) -> None:
        self._map.close()
        self._file.close()
