"""The stencil: every H3 cell at a resolution whose centroid is on land.

Algorithm (vectorised, bounded memory, one res-0 parent at a time):

1. For each of the 122 res-0 cells (or those an ``extent`` touches), take its
   descendants at ``prune_resolution`` and drop those that cannot hold land: a
   descendant is kept when the land-mask pyramid has any land pixel inside its
   bounding box grown by 25 % on each side (descendant centroids stray at most
   about 7 % of a parent's bbox outside it) plus one pyramid pixel. Cells that
   cross the antimeridian or touch the poles are always kept. Pruning is
   therefore conservative: it never loses a land cell.
2. Expand the kept cells to ``resolution``, compute centroids with h3ronpy
   (Rust, vectorised) and look them up in the land mask.
3. Group land cells by their parent at ``region_resolution`` (the *region*)
   and write one parquet per region, sorted by ``h3``.

Outputs (see :func:`write_stencil`):

* ``<dir>/regions/<region>.parquet`` with columns ``h3`` (uint64), ``lat``,
  ``lng`` (float64 degrees), ``region`` (uint64); the folder reads as one
  dataset with ``pyarrow.dataset.dataset(<dir>/regions)``.
* ``<dir>/manifest.json``: ``{"resolution", "region_resolution", "regions":
  {<region hex>: {"digest": <12 hex>, "cells": n}}}``. The digest is a hash of
  the region's sorted cell ids; downstream per-region outputs carry it in
  their file names, so that a region whose cells change gets a new output
  name (and reruns) while unchanged regions keep theirs.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h3
import h3ronpy
import h3ronpy.vector as h3v
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vectorgeo import h3cells
from vectorgeo.atomic import write_json_atomic, write_parquet_atomic
from vectorgeo.errors import DataError
from vectorgeo.layers import Layer

DIGEST_CHARS = 12
PYRAMID_WIDTH = 2160
"""Target width of the any-land pyramid (1/6 degree pixels over the world): its factor follows the mask's width."""
BLOCK_BYTES = 64 << 20
"""Mask bytes read per block while building the pyramid (at least one pyramid row)."""
BBOX_MARGIN = 0.25

STENCIL_SCHEMA = pa.schema([("h3", pa.uint64()), ("lat", pa.float64()), ("lng", pa.float64()), ("region", pa.uint64())])


def res0_cells() -> np.ndarray:
    """The 122 res-0 cells as sorted uint64."""
    return np.sort(np.array([h3.str_to_int(c) for c in h3.get_res0_cells()], dtype=np.uint64))


def change_resolution(cells: np.ndarray, res: int) -> np.ndarray:
    """Children (finer ``res``) or parents (coarser ``res``) of uint64 cells, vectorised."""
    if len(cells) == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.asarray(h3ronpy.change_resolution(np.ascontiguousarray(cells, dtype=np.uint64), res)).astype(
        np.uint64, copy=False
    )


def centroids(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lng) in degrees of uint64 cells, vectorised."""
    if len(cells) == 0:
        return np.zeros(0), np.zeros(0)
    rb = h3v.cells_to_coordinates(np.ascontiguousarray(cells, dtype=np.uint64))
    return np.asarray(rb["lat"]), np.asarray(rb["lng"])


def digest_cells(cells: np.ndarray) -> str:
    """Content digest of a region: sha256 of its sorted little-endian uint64 ids."""
    return hashlib.sha256(np.ascontiguousarray(cells, dtype="<u8").tobytes()).hexdigest()[:DIGEST_CHARS]


class LandPyramid:
    """A coarse any-land grid with a summed-area table, for conservative pruning.

    A pyramid pixel is land when any of the ``factor`` × ``factor`` mask pixels
    under it is land. ``any_land(bbox)`` is O(1) per box:

    .. math:: S(r_1, c_1) - S(r_0, c_1) - S(r_1, c_0) + S(r_0, c_0) > 0
    """

    def __init__(self, mask: Layer, factor: int | None = None) -> None:
        g = mask.grid
        # pyramid pixels of about 1/6 degree whatever the mask's resolution (20 GLOBE pixels, 187 of
        # LC100's 100 m), read in blocks of whole pyramid rows of about BLOCK_BYTES: memory follows the
        # mask's width (a few hundred MB at LC100's 403,200 columns), not its size
        factor = factor or max(1, math.ceil(g.width / PYRAMID_WIDTH))
        h, w = g.height // factor * factor, g.width // factor * factor
        arr = mask.array
        land_lut = ~mask._invalid_lut if mask._invalid_lut is not None else None
        coarse = np.zeros((h // factor + (g.height > h), w // factor + (g.width > w)), dtype=bool)
        step = max(1, BLOCK_BYTES // max(1, g.width * arr.dtype.itemsize) // factor) * factor
        for r0 in range(0, g.height, step):
            block = np.asarray(arr[r0 : r0 + step])
            land = land_lut[block] if land_lut is not None else mask._slow_lut(block).astype(bool)
            rows = land.shape[0]
            pr, pc = -(-rows // factor), -(-land.shape[1] // factor)
            padded = np.zeros((pr * factor, pc * factor), dtype=bool)
            padded[:rows, : land.shape[1]] = land
            coarse[r0 // factor : r0 // factor + pr, :pc] = padded.reshape(pr, factor, pc, factor).any(axis=(1, 3))
        self.sat = np.zeros((coarse.shape[0] + 1, coarse.shape[1] + 1), dtype=np.int32)
        self.sat[1:, 1:] = coarse.cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
        self.x0, self.y0 = g.x0, g.y0
        self.dx, self.dy = g.dx * factor, g.dy * factor
        self.shape = coarse.shape

    def any_land(self, minx: np.ndarray, miny: np.ndarray, maxx: np.ndarray, maxy: np.ndarray) -> np.ndarray:
        """True where a lng/lat box may contain land (boxes must not cross the antimeridian)."""
        h, w = self.shape
        c0 = np.clip(np.floor((minx - self.x0) / self.dx).astype(np.int64) - 1, 0, w)
        c1 = np.clip(np.floor((maxx - self.x0) / self.dx).astype(np.int64) + 2, 0, w)
        r0 = np.clip(np.floor((maxy - self.y0) / self.dy).astype(np.int64) - 1, 0, h)
        r1 = np.clip(np.floor((miny - self.y0) / self.dy).astype(np.int64) + 2, 0, h)
        s = self.sat
        total = s[r1, c1] - s[r0, c1] - s[r1, c0] + s[r0, c0]
        return total > 0


@dataclass(frozen=True)
class Extent:
    """An optional restriction of the stencil: a bbox and/or a set of regions."""

    bbox: tuple[float, float, float, float] | None = None
    regions: frozenset[int] | None = None

    @classmethod
    def from_config(cls, extent: Mapping[str, Any] | None) -> Extent:
        """From a validated ``stencil.extent`` (null, {bbox: [w, s, e, n]} or {regions: [...]})."""
        if extent is None:
            return cls()
        if extent.get("bbox") is not None:
            w, s, e, n = (float(v) for v in extent["bbox"])
            return cls(bbox=(w, s, e, n))
        return cls(regions=frozenset(h3.str_to_int(r) for r in extent["regions"]))

    def contains(self, lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
        """Points inside the bbox (all True without one); handles w > e (antimeridian)."""
        if self.bbox is None:
            return np.ones(len(lat), dtype=bool)
        w, s, e, n = self.bbox
        inlat = (lat >= s) & (lat <= n)
        inlng = (lng >= w) & (lng <= e) if w <= e else (lng >= w) | (lng <= e)
        return inlat & inlng


def _prune(cands: np.ndarray, pyramid: LandPyramid | None, extent: Extent) -> np.ndarray:
    if len(cands) == 0:
        return cands
    b = h3v.cells_bounds_arrays(np.ascontiguousarray(cands, dtype=np.uint64))
    minx, miny = np.asarray(b["minx"]), np.asarray(b["miny"])
    maxx, maxy = np.asarray(b["maxx"]), np.asarray(b["maxy"])
    w, hgt = maxx - minx, maxy - miny
    always = (w > 180) | (maxy > 89) | (miny < -89)
    gx0, gx1 = minx - BBOX_MARGIN * w, maxx + BBOX_MARGIN * w
    gy0, gy1 = miny - BBOX_MARGIN * hgt, maxy + BBOX_MARGIN * hgt
    keep = np.ones(len(cands), dtype=bool)
    if pyramid is not None:
        keep = pyramid.any_land(gx0, gy0, gx1, gy1)
    if extent.bbox is not None:
        ew, es, ee, en = extent.bbox
        overlap_lat = (gy1 >= es) & (gy0 <= en)
        if ew <= ee:
            overlap_lng = (gx1 >= ew) & (gx0 <= ee)
        else:
            overlap_lng = (gx1 >= ew) | (gx0 <= ee)
        keep &= overlap_lat & overlap_lng
    out: np.ndarray = cands[keep | always]
    return out


def iter_land_cells(
    mask: Layer,
    resolution: int,
    region_resolution: int,
    prune_resolution: int = 3,
    extent: Extent | None = None,
    prune: bool = True,
    stats: dict[str, int] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield land cells one res-0 parent at a time.

    Args:
        mask: The land mask layer (kind ``mask``).
        resolution: Stencil resolution.
        region_resolution: Region resolution (<= resolution).
        prune_resolution: Resolution at which ocean-only parents are skipped.
        extent: Optional restriction.
        prune: Set False to scan every cell (used to verify pruning).
        stats: If given, ``cells_scanned`` and ``land_cells`` are accumulated into it.

    Yields:
        (h3, lat, lng, region) arrays for one res-0 parent, sorted by h3.
    """
    extent = extent or Extent()
    pyramid = LandPyramid(mask) if prune else None
    parents = res0_cells()
    if extent.regions is not None:
        wanted = change_resolution(np.array(sorted(extent.regions), dtype=np.uint64), 0)
        parents = np.unique(wanted)
    prune_res = min(prune_resolution, resolution)
    for p in parents:
        cands = change_resolution(np.array([p], dtype=np.uint64), prune_res)
        if prune or extent.bbox is not None:
            cands = _prune(cands, pyramid, extent)
        cells = change_resolution(cands, resolution)
        if stats is not None:
            stats["cells_scanned"] = stats.get("cells_scanned", 0) + len(cells)
        if len(cells) == 0:
            continue
        lat, lng = centroids(cells)
        keep = mask.values_at(lat, lng)
        if extent.bbox is not None:
            keep &= extent.contains(lat, lng)
        cells, lat, lng = cells[keep], lat[keep], lng[keep]
        region = change_resolution(cells, region_resolution) if region_resolution < resolution else cells.copy()
        if extent.regions is not None:
            sel = np.isin(region, np.array(sorted(extent.regions), dtype=np.uint64))
            cells, lat, lng, region = cells[sel], lat[sel], lng[sel], region[sel]
        order = np.argsort(cells, kind="stable")
        if stats is not None:
            stats["land_cells"] = stats.get("land_cells", 0) + len(cells)
        yield cells[order], lat[order], lng[order], region[order]


def write_stencil(
    mask: Layer,
    out_dir: str | Path,
    resolution: int,
    region_resolution: int,
    prune_resolution: int = 3,
    extent: Mapping[str, Any] | None = None,
    manifest_path: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compute the stencil and write one parquet per region plus the manifest.

    Args:
        mask: The land mask layer.
        out_dir: Folder for ``<region>.parquet`` files.
        resolution: Stencil resolution.
        region_resolution: Region resolution.
        prune_resolution: See :func:`iter_land_cells`.
        extent: ``stencil.extent`` from config.
        manifest_path: Where to write the manifest (default ``<out_dir>/../manifest.json``).
        progress: Show a progress bar over res-0 parents.

    Returns:
        The manifest, plus ``cells_scanned``, ``land_cells`` and ``seconds``.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = Extent.from_config(extent)
    stats: dict[str, int] = {}
    regions: dict[str, dict[str, Any]] = {}
    it = iter_land_cells(mask, resolution, region_resolution, prune_resolution, ext, stats=stats)
    if progress:
        from tqdm import tqdm

        n = len(res0_cells()) if ext.regions is None else len({h3cells.parent(r, 0) for r in ext.regions})
        it = tqdm(it, total=n, desc="stencil (res-0 parents)", unit="parent")
    for cells, lat, lng, region in it:
        if len(cells) == 0:
            continue
        # cells are sorted by h3, and h3 ids sort by parent, so each region is a contiguous run
        bounds = np.flatnonzero(np.diff(region)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(cells)]])
        for s, e in zip(starts, ends, strict=True):
            rc = cells[s:e]
            name = h3cells.to_str(region[s])
            table = pa.table({"h3": rc, "lat": lat[s:e], "lng": lng[s:e], "region": region[s:e]}, schema=STENCIL_SCHEMA)
            write_parquet_atomic(out / f"{name}.parquet", table)
            regions[name] = {"digest": digest_cells(rc), "cells": int(e - s)}
    manifest = {
        "resolution": resolution,
        "region_resolution": region_resolution,
        "regions": dict(sorted(regions.items())),
    }
    mpath = Path(manifest_path) if manifest_path else out.parent / "manifest.json"
    write_json_atomic(mpath, manifest, indent=1)
    return {**manifest, **stats, "seconds": time.perf_counter() - t0}


def read_region(path: str | Path) -> pa.Table:
    """Read one region's stencil parquet (the columns of :data:`STENCIL_SCHEMA`, in its types).

    Read with :class:`pyarrow.parquet.ParquetFile` rather than ``read_table(schema=...)``, which
    imports pyarrow's dataset layer (0.2 s of every embed job's start-up).

    Raises:
        DataError: the file is unreadable, lacks one of the columns or holds one in another type.
    """
    try:
        table = pq.ParquetFile(path).read(columns=STENCIL_SCHEMA.names)
    except (OSError, pa.ArrowException) as e:
        raise DataError(str(path), f"cannot read a stencil region file with columns {STENCIL_SCHEMA.names}: {e}") from e
    missing = [name for name in STENCIL_SCHEMA.names if name not in table.column_names]
    if missing:
        raise DataError(str(path), f"stencil region file lacks column(s) {missing}; has {table.column_names}")
    if table.schema.remove_metadata() != STENCIL_SCHEMA:
        try:
            return table.select(STENCIL_SCHEMA.names).cast(STENCIL_SCHEMA)
        except (pa.ArrowException, ValueError) as e:
            want = ", ".join(f"{f.name}: {f.type}" for f in STENCIL_SCHEMA)
            got = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
            raise DataError(str(path), f"expected stencil columns ({want}), got ({got}): {e}") from e
    return table


def extent_bbox(extent: Mapping[str, Any] | None) -> list[float] | None:
    """A [w, s, e, n] bbox covering ``stencil.extent`` (None for the whole world).

    For a list of regions this is the bbox of their boundaries (the whole
    longitude range when one of them crosses the antimeridian).
    """
    if not extent:
        return None
    if extent.get("bbox") is not None:
        return [float(v) for v in extent["bbox"]]
    lats: list[float] = []
    lngs: list[float] = []
    for r in extent["regions"]:
        for la, ln in h3.cell_to_boundary(r):
            lats.append(la)
            lngs.append(ln)
    w, e = min(lngs), max(lngs)
    if e - w > 180:
        w, e = -180.0, 180.0
    return [w, max(-90.0, min(lats)), e, min(90.0, max(lats))]


def crop_bbox(extent: Mapping[str, Any] | None, margin_km: float) -> list[float] | None:
    """The bbox [w, s, e, n] prepared layers are cropped to: the extent's bbox grown by ``margin_km``.

    None without an extent (the whole world is kept). The east-west margin uses
    the cosine of the extent's most poleward latitude, so the margin is at
    least ``margin_km`` everywhere; a bbox with w > e (across the antimeridian)
    keeps every column.
    """
    box = extent_bbox(extent)
    if box is None:
        return None
    w, s, e, n = box
    dlat = margin_km / (math.pi * 6371.0088 / 180.0)
    coslat = max(math.cos(math.radians(min(89.0, max(abs(s), abs(n)) + dlat))), 0.01)
    dlng = dlat / coslat
    if w <= e and (e - w) + 2 * dlng >= 360.0:
        w, e = -180.0, 180.0
    elif w <= e:
        w, e = max(-180.0, w - dlng), min(180.0, e + dlng)
    return [w, max(-90.0, s - dlat), e, min(90.0, n + dlat)]
