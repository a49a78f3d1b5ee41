"""Region windows: the pixels of each prepared layer that one region's cells can reach, cut once.

Embedding a region (an ``embed_batch`` job does it for each of its regions) needs, of each model layer,
only the pixels that patches centred on the region's cells cover. The ``cut_windows`` rule reads every
prepared layer once and writes, for every candidate region, ``results/windows/{region}.npz``: each
layer's window (raw values, as prepared) and where it sits in the layer. Under S3 default storage a batch
job then downloads its regions' windows, not the world.

Candidate regions do not depend on the stencil (so that a stencil rerun does not rewrite windows): they
are every cell at ``stencil.region_resolution``, or those that ``stencil.extent`` can touch. Every
stencil region is one of them.

Window of a region (degrees): the bounding box of its boundary, grown by :data:`BBOX_MARGIN` of its size
on each side (descendant centroids stray at most ~7 % outside a parent's box), then by half a patch,

.. math::

    \\Delta\\varphi = \\frac{p/2}{k}, \\qquad
    \\Delta\\lambda = \\frac{p/2}{k \\cos \\varphi_{\\max}}

(:math:`p` = ``patch_km``, :math:`k` km per degree, :math:`\\varphi_{\\max}` the most poleward latitude of
the grown box plus :math:`\\Delta\\varphi`), plus one pixel. A window that reaches within a degree of a
pole spans every longitude; one that crosses the antimeridian of a global layer wraps (its columns are
those of the layer modulo its width). A :class:`WindowLayer` answers lookups like the whole layer and
raises :class:`~vectorgeo.errors.DataError` when a pixel inside the layer falls outside the window
(a window too small for the model's patches): it can never silently read nodata instead of data.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h3
import h3ronpy.vector as h3v
import numpy as np

from vectorgeo.atomic import atomic_path
from vectorgeo.errors import DataError
from vectorgeo.layers import Layer, LayerSpec, take_pixels
from vectorgeo.rasters import Grid
from vectorgeo.sampling import KM_PER_DEG
from vectorgeo.stencil import BBOX_MARGIN, Extent, change_resolution, res0_cells

POLAR_LAT = 89.0
"""A window reaching this close to a pole (degrees) spans every longitude."""

META_KEY = "meta"


def candidate_regions(region_resolution: int, extent: Mapping[str, Any] | None) -> list[str]:
    """Every region cell a stencil with this extent can hold, sorted (hex strings).

    Without an extent: every cell at ``region_resolution``. With ``{regions: [...]}``: those. With
    ``{bbox: ...}``: the cells whose boundary box, grown by :data:`BBOX_MARGIN`, overlaps the bbox.
    """
    ext = Extent.from_config(extent)
    if ext.regions is not None:
        return sorted(f"{r:015x}" for r in ext.regions)
    cells = change_resolution(res0_cells(), region_resolution)
    if ext.bbox is not None:
        w, s, e, n = ext.bbox
        lo, hi, minx, maxx, crosses = _lat_lng_boxes(cells)
        inlat = (hi >= s) & (lo <= n)
        if w <= e:
            inlng = (maxx >= w) & (minx <= e)
        else:
            inlng = (maxx >= w) | (minx <= e)
        # a box crossing the antimeridian is kept (a handful of cells): its lng range is not an interval
        cells = cells[inlat & (inlng | crosses)]
    return [f"{int(c):015x}" for c in np.sort(cells)]


def _lat_lng_boxes(cells: np.ndarray) -> tuple[np.ndarray, ...]:
    """Grown boxes of cells: (south, north, west, east, wide); west/east may pass ±180.

    ``wide`` marks cells whose longitudes are not one interval below 180° wide (across the antimeridian,
    or around a pole: such a cell's box is extended to the pole).
    """
    b = h3v.cells_bounds_arrays(np.ascontiguousarray(cells, dtype=np.uint64))
    minx, miny = np.asarray(b["minx"], dtype=np.float64), np.asarray(b["miny"], dtype=np.float64)
    maxx, maxy = np.asarray(b["maxx"], dtype=np.float64), np.asarray(b["maxy"], dtype=np.float64)
    wide = maxx - minx > 180.0
    for i in np.flatnonzero(wide):
        lng = np.array([p[1] for p in h3.cell_to_boundary(f"{int(cells[i]):015x}")])
        lng = np.where(lng < 0, lng + 360.0, lng)
        minx[i], maxx[i] = lng.min(), lng.max()
        if maxx[i] - minx[i] > 180.0:  # around a pole
            minx[i], maxx[i] = -180.0, 180.0
            if miny[i] > 0:
                maxy[i] = 90.0
            else:
                miny[i] = -90.0
    w, hgt = maxx - minx, maxy - miny
    return (
        np.maximum(miny - BBOX_MARGIN * hgt, -90.0),
        np.minimum(maxy + BBOX_MARGIN * hgt, 90.0),
        minx - BBOX_MARGIN * w,
        maxx + BBOX_MARGIN * w,
        wide,
    )


def window_box(region: str, patch_km: float) -> tuple[float, float, float, float] | tuple[float, float, None, None]:
    """(south, north, west, east) degrees a region's patches can reach; west/east None = every longitude.

    West and east may lie beyond ±180 (a window across the antimeridian).
    """
    lo, hi, minx, maxx, _ = (float(v[0]) for v in _lat_lng_boxes(np.array([h3.str_to_int(region)], np.uint64)))
    dlat = 0.5 * patch_km / KM_PER_DEG
    south, north = lo - dlat, hi + dlat
    poleward = max(abs(south), abs(north))
    if poleward >= POLAR_LAT:
        return max(south, -90.0), min(north, 90.0), None, None
    dlng = dlat / math.cos(math.radians(poleward))
    west, east = minx - dlng, maxx + dlng
    if east - west >= 360.0:
        return south, north, None, None
    return south, north, west, east


def window_slices(grid: Grid, box: tuple[float, float, float | None, float | None]) -> tuple[int, int, int, int]:
    """Pixel window (row0, row1, col0, width) of a box on a layer grid, one pixel of margin.

    ``col0`` is a column of the layer; on a global layer the window's columns are ``col0 .. col0 + width``
    modulo the layer's width (a window may wrap at the antimeridian). An empty window has 0 rows or width.
    """
    south, north, west, east = box
    r0 = max(0, math.floor((north - grid.y0) / grid.dy) - 1)
    r1 = min(grid.height, math.ceil((south - grid.y0) / grid.dy) + 1)
    if west is None or east is None:
        return r0, max(r0, r1), 0, grid.width
    c_lo = math.floor((west - grid.x0) / grid.dx) - 1
    c_hi = math.ceil((east - grid.x0) / grid.dx) + 1
    if grid.wraps:
        if c_hi - c_lo >= grid.width:
            return r0, max(r0, r1), 0, grid.width
        return r0, max(r0, r1), c_lo % grid.width, c_hi - c_lo
    c0, c1 = max(0, c_lo), min(grid.width, c_hi)
    return r0, max(r0, r1), c0, max(0, c1 - c0)


def _extract(array: np.ndarray, r0: int, r1: int, c0: int, width: int) -> np.ndarray:
    """The window's raw values (a copy; a wrapping window is two column ranges joined)."""
    total = array.shape[1]
    if c0 + width <= total:
        return np.array(array[r0:r1, c0 : c0 + width])
    return np.concatenate([array[r0:r1, c0:total], array[r0:r1, 0 : c0 + width - total]], axis=1)


def _member(name: str) -> zipfile.ZipInfo:
    """A stored (uncompressed) zip member with a fixed timestamp: same content, same bytes.

    Uncompressed, so that a window file's size is what the region job holds in memory (its ``mem_mb``
    follows from it) and cutting the world costs no compression time.
    """
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def cut_windows(
    layers: Mapping[str, Layer], regions: Sequence[str], patch_km: float, out_paths: Sequence[str | Path]
) -> dict[str, Any]:
    """Write one window file per region (every layer's window), each atomically.

    Args:
        layers: Prepared layers by name (memory-mapped: memory stays at one window).
        regions: Region cells (hex), one per output path.
        patch_km: Ground width of the model's patches (``sample.patch_km``).
        out_paths: ``{region}.npz`` per region.

    Returns:
        Counts: regions, raw window bytes in all, largest window's bytes, layer bytes.

    Raises:
        DataError: regions and paths differ in number.
    """
    if len(regions) != len(out_paths):
        raise DataError("windows", f"{len(regions)} regions but {len(out_paths)} output paths")
    total, largest = 0, 0
    for region, path in zip(regions, out_paths, strict=True):
        box = window_box(region, patch_km)
        meta: dict[str, Any] = {"region": region, "patch_km": patch_km, "layers": {}}
        with (
            atomic_path(path, suffix=".npz") as tmp,
            zipfile.ZipFile(tmp, "w") as zf,
        ):
            size = 0
            for name, layer in layers.items():
                r0, r1, c0, width = window_slices(layer.grid, box)
                values = _extract(layer.array, r0, r1, c0, width)
                g = layer.grid
                meta["layers"][name] = {"row0": r0, "col0": c0, "layer_grid": g.to_dict(), "nbytes": values.nbytes}
                with zf.open(_member(f"{name}.npy"), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, values, allow_pickle=False)
                size += values.nbytes
            zf.writestr(_member(f"{META_KEY}.json"), json.dumps(meta, sort_keys=True))
        total += size
        largest = max(largest, size)
    return {
        "regions": len(regions),
        "window_bytes": total,
        "largest_window_bytes": largest,
        "layer_bytes": int(sum(layer.array.nbytes for layer in layers.values())),
    }


class WindowLayer(Layer):
    """A layer of which only a window is in memory; lookups are those of the whole layer.

    Args:
        spec: The layer spec.
        layer_grid: The whole prepared layer's grid.
        row0: The window's first row in the layer.
        col0: The window's first column in the layer (modulo its width on a global layer).
        array: The window's raw values.
    """

    def __init__(self, spec: LayerSpec, layer_grid: Grid, row0: int, col0: int, array: np.ndarray) -> None:
        g = layer_grid
        grid = Grid(g.x0 + col0 * g.dx, g.y0 + row0 * g.dy, g.dx, g.dy, array.shape[1], array.shape[0], g.crs)
        super().__init__(spec, grid, array)
        self.layer_grid = layer_grid
        self.row0, self.col0 = row0, col0

    def _index(self, lat: np.ndarray, lng: np.ndarray) -> tuple[np.ndarray, ...]:
        """Window rows and cols (clipped), inside-the-window masks, inside-the-layer masks (per axis)."""
        lg = self.layer_grid
        lrow, lr_in = lg.rows(lat)
        lcol, lc_in = lg.cols(lng)
        row = lrow - self.row0
        col = lcol - self.col0
        if lg.wraps:
            col %= lg.width
        r_in = lr_in & (row >= 0) & (row < self.grid.height)
        c_in = lc_in & (col >= 0) & (col < self.grid.width)
        np.clip(row, 0, max(self.grid.height - 1, 0), out=row)
        np.clip(col, 0, max(self.grid.width - 1, 0), out=col)
        return row, col, r_in, c_in, lr_in, lc_in

    def _fail(self) -> None:
        raise DataError(
            f"window of layer '{self.spec.name}'",
            "a patch reaches pixels of the layer outside the region's window (the window was cut for a smaller "
            "patch_km than the model's, or for another region); rerun the cut_windows rule",
        )

    def _values(self, row: np.ndarray, col: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.array.size == 0:
            return self.decode(np.zeros((*inside.shape, *self.array.shape[2:]), dtype=self.array.dtype), inside)
        return self.decode(take_pixels(self.array, row, col), inside)

    def gather_grid(self, lat_rows: np.ndarray, lng_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decoded values on separable point grids (see :meth:`Layer.gather_grid`).

        Raises:
            DataError: a pixel inside the layer lies outside the window.
        """
        row, col, r_in, c_in, lr_in, lc_in = self._index(lat_rows, lng_cols)
        inside = r_in[:, :, None] & c_in[:, None, :]
        if ((lr_in[:, :, None] & lc_in[:, None, :]) & ~inside).any():
            self._fail()
        return self._values(row[:, :, None], col[:, None, :], inside)

    def raw_at(self, lat: np.ndarray, lng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw values at points and a mask of points inside the layer.

        Raises:
            DataError: a point inside the layer lies outside the window.
        """
        row, col, r_in, c_in, lr_in, lc_in = self._index(lat, lng)
        inside = r_in & c_in
        if (lr_in & lc_in & ~inside).any():
            self._fail()
        if self.array.size == 0:
            return np.zeros((*inside.shape, *self.array.shape[2:]), dtype=self.array.dtype), inside
        return self.array[row, col], inside


def open_window(path: str | Path, specs: Mapping[str, LayerSpec]) -> dict[str, WindowLayer]:
    """The layers of a region's window file, keyed by name (only those in ``specs``).

    Raises:
        DataError: the file is unreadable, or lacks one of the layers.
    """
    p = str(path)
    try:
        with zipfile.ZipFile(p) as zf:
            meta = json.loads(zf.read(f"{META_KEY}.json"))
            out: dict[str, WindowLayer] = {}
            for name, spec in specs.items():
                if name not in meta["layers"]:
                    raise DataError(p, f"window file has no layer '{name}' (has {sorted(meta['layers'])})")
                m = meta["layers"][name]
                with zf.open(f"{name}.npy") as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
                out[name] = WindowLayer(spec, Grid.from_dict(m["layer_grid"]), int(m["row0"]), int(m["col0"]), array)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(p, f"not a readable window file ({type(e).__name__}: {e})") from None
    return out


def window_nbytes(path: str | Path) -> int:
    """Raw bytes of the layer windows in a window file (the arrays, uncompressed)."""
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read(f"{META_KEY}.json"))
    return int(sum(m["nbytes"] for m in meta["layers"].values()))
