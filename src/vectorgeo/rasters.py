"""Raster sources on disk: reading headers, preparing layers into memory-mappable arrays, mosaics.

Every layer is *prepared* once into ``<name>.npy`` (the raw array, north-up, memory-mappable) plus
``<name>.grid.json`` (its :class:`Grid` and the layer spec). Lookups then map (lat, lng) to (row, col) with

.. math::

    col = \\lfloor (lng - x_0) / dx \\rfloor \\bmod W \\quad (\\text{global grids}),
    \\qquad row = \\lfloor (lat - y_0) / dy \\rfloor

and gather with numpy fancy indexing: no Python loop per point (:class:`vectorgeo.layers.Layer`).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vectorgeo.atomic import write_json_atomic
from vectorgeo.errors import RasterError
from vectorgeo.sources import BUILTINS, builtin_name

if TYPE_CHECKING:
    from vectorgeo.layers import LayerSpec


@dataclass(frozen=True)
class Grid:
    """A north-up regular lat/lng grid.

    Pixel (row, col) covers lng in [x0 + col*dx, x0 + (col+1)*dx) and lat in
    (y0 + (row+1)*dy, y0 + row*dy] (``dy`` < 0).
    """

    x0: float
    y0: float
    dx: float
    dy: float
    width: int
    height: int
    crs: str = "EPSG:4326"

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return (self.height, self.width)

    @property
    def wraps(self) -> bool:
        """True when the grid spans all longitudes (lookups wrap at the antimeridian)."""
        return abs(self.width * self.dx - 360.0) < 1e-6 * 360.0

    @property
    def affine(self) -> tuple[float, float, float, float, float, float]:
        """GDAL/rasterio affine coefficients (a, b, c, d, e, f)."""
        return (self.dx, 0.0, self.x0, 0.0, self.dy, self.y0)

    def index(self, lat: np.ndarray, lng: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map coordinates to pixel indices.

        Returns:
            (row, col, inside): int64 arrays shaped like the input, and a bool
            array that is False where the point falls outside the grid (row and
            col are clipped to valid indices there).
        """
        row, r_in = self.rows(lat)
        col, c_in = self.cols(lng)
        return row, col, r_in & c_in

    def rows(self, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row index of each latitude (clipped) and whether it is inside the grid."""
        lat = np.asarray(lat, dtype=np.float64)
        row = np.floor((lat - self.y0) * (1.0 / self.dy)).astype(np.int64)
        inside = (lat <= self.y0) & (lat >= self.y0 + self.height * self.dy)
        np.clip(row, 0, self.height - 1, out=row)
        return row, inside

    def cols(self, lng: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Column index of each longitude (wrapped on global grids, else clipped) and whether it is inside."""
        lng = np.asarray(lng, dtype=np.float64)
        col = np.floor((lng - self.x0) * (1.0 / self.dx)).astype(np.int64)
        if self.wraps:
            col %= self.width
            return col, np.isfinite(lng)
        inside = (col >= 0) & (col < self.width)
        np.clip(col, 0, self.width - 1, out=col)
        return col, inside

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "x0": self.x0,
            "y0": self.y0,
            "dx": self.dx,
            "dy": self.dy,
            "width": self.width,
            "height": self.height,
            "crs": self.crs,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Grid:
        """Inverse of :meth:`to_dict`."""
        return cls(
            float(d["x0"]),
            float(d["y0"]),
            float(d["dx"]),
            float(d["dy"]),
            int(d["width"]),
            int(d["height"]),
            str(d.get("crs", "EPSG:4326")),
        )


def _grid_from_rasterio(ds: Any, path: str) -> Grid:
    t = ds.transform
    if ds.crs is None:
        raise RasterError(path, "has no CRS; expected a geographic (lat/lng) CRS such as EPSG:4326")
    if not ds.crs.is_geographic:
        raise RasterError(
            path,
            f"is in a projected CRS ({ds.crs.to_string()}); expected a geographic (lat/lng) CRS "
            "such as EPSG:4326 -- reproject it first, e.g. with gdalwarp -t_srs EPSG:4326",
        )
    if t.b != 0 or t.d != 0 or t.e >= 0:
        raise RasterError(path, "is rotated or not north-up; expected a north-up lat/lng grid")
    crs = ds.crs.to_string() if ds.crs.to_epsg() == 4326 else "geographic"
    return Grid(float(t.c), float(t.f), float(t.a), float(t.e), int(ds.width), int(ds.height), crs)


def inspect_source(path: str) -> Grid:
    """Read only the header of a local raster and check it is usable.

    Raises:
        RasterError: missing or unreadable file, projected CRS, rotated grid.
    """
    if not os.path.exists(path):
        raise RasterError(path, "file does not exist")
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        with rasterio.open(path) as ds:
            return _grid_from_rasterio(ds, path)
    except RasterioIOError as e:
        raise RasterError(path, f"cannot be read as a raster: {e}") from None


def _atomic_npy(out: Path, shape: tuple[int, ...], dtype: np.dtype[Any]) -> tuple[np.memmap, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    return arr, Path(tmp)


def crop_window(grid: Grid, crop: Sequence[float] | None) -> tuple[tuple[int, int, int, int], Grid]:
    """Pixel window (row0, row1, col0, col1) covering a bbox, and the cropped grid.

    Raises:
        RasterError: the bbox does not overlap the grid.
    """
    if crop is None:
        return (0, grid.height, 0, grid.width), grid
    w, s, e, n = (float(v) for v in crop)
    r0 = max(0, math.floor((n - grid.y0) / grid.dy))
    r1 = min(grid.height, math.ceil((s - grid.y0) / grid.dy))
    if w <= e:
        c0 = max(0, math.floor((w - grid.x0) / grid.dx))
        c1 = min(grid.width, math.ceil((e - grid.x0) / grid.dx))
    else:
        c0, c1 = 0, grid.width
    if r1 <= r0 or c1 <= c0:
        raise RasterError(grid.crs, f"crop bbox {list(crop)} does not overlap the raster")
    g = Grid(grid.x0 + c0 * grid.dx, grid.y0 + r0 * grid.dy, grid.dx, grid.dy, c1 - c0, r1 - r0, grid.crs)
    return (r0, r1, c0, c1), g


def prepare_layer(
    spec: LayerSpec,
    source_path: str | Path,
    out_npy: str | Path,
    out_grid: str | Path,
    rows_per_block: int = 2048,
    crop: Sequence[float] | None = None,
) -> Grid:
    """Convert a layer source into a memory-mappable ``.npy`` plus a grid JSON.

    Reads in row blocks so memory stays bounded for rasters larger than RAM.
    Both outputs appear atomically (temp file + rename).

    Args:
        spec: The layer spec (decides how a built-in is decoded).
        source_path: The local file (a built-in's file, a GeoTIFF or a mosaic).
        out_npy: Destination ``.npy``.
        out_grid: Destination grid JSON.
        rows_per_block: Rows read per block from GeoTIFFs.
        crop: Optional bbox [west, south, east, north] in degrees to keep (with
            the pixels that touch it); a bbox with west > east keeps all columns.

    Raises:
        RasterError: unreadable source or unsuitable grid.
    """
    source_path = str(source_path)
    out_npy, out_grid = Path(out_npy), Path(out_grid)
    bname = builtin_name(spec.source) if isinstance(spec.source, str) else None
    fmt = BUILTINS[bname].fmt if bname else "geotiff"
    if not os.path.exists(source_path):
        raise RasterError(source_path, "file does not exist")
    if fmt == "globe_npz":
        with np.load(source_path) as z:
            if "mask" not in z.files:
                raise RasterError(source_path, "has no array 'mask'")
            mask = z["mask"]
            lat, lon = z["lat"], z["lon"]
        grid = Grid(
            float(lon[0]),
            float(lat[0]),
            float(lon[1] - lon[0]),
            float(lat[1] - lat[0]),
            int(mask.shape[1]),
            int(mask.shape[0]),
        )
        grid = Grid(-180.0, 90.0, 360.0 / grid.width, -180.0 / grid.height, grid.width, grid.height)
        (r0, r1, c0, c1), grid = crop_window(grid, crop)
        arr, tmp = _atomic_npy(out_npy, grid.shape, np.dtype(np.uint8))
        arr[:] = mask[r0:r1, c0:c1]
        arr.flush()
        del arr, mask
    elif fmt in ("pvlib_h5", "pvlib_linke_h5", "bmng_jpeg"):
        data = _read_global_array(fmt, source_path)
        grid = Grid(-180.0, 90.0, 360.0 / data.shape[1], -180.0 / data.shape[0], data.shape[1], data.shape[0])
        (r0, r1, c0, c1), grid = crop_window(grid, crop)
        arr, tmp = _atomic_npy(out_npy, (*grid.shape, *data.shape[2:]), data.dtype)
        arr[:] = data[r0:r1, c0:c1]
        arr.flush()
        del arr
    else:
        import rasterio
        from rasterio.errors import RasterioIOError
        from rasterio.windows import Window

        try:
            with rasterio.open(source_path) as ds:
                full = _grid_from_rasterio(ds, source_path)
                bands = _check_band_count(spec, ds.count)
                (w0, w1, c0, c1), grid = crop_window(full, crop)
                extra = (len(bands),) if bands else ()
                arr, tmp = _atomic_npy(out_npy, (*grid.shape, *extra), np.dtype(ds.dtypes[0]))
                for r0 in range(w0, w1, rows_per_block):
                    n = min(rows_per_block, w1 - r0)
                    win = Window(c0, r0, c1 - c0, n)
                    if bands:  # (B, n, W) -> (n, W, B): a pixel's bands side by side
                        arr[r0 - w0 : r0 - w0 + n] = np.moveaxis(ds.read(window=win), 0, -1)
                    else:
                        arr[r0 - w0 : r0 - w0 + n] = ds.read(1, window=win)
                arr.flush()
                del arr
        except RasterioIOError as e:
            raise RasterError(source_path, f"cannot be read as a raster: {e}") from None
    try:
        _check_bands_have_data(spec, tmp)
    except Exception:
        os.unlink(tmp)
        raise
    os.replace(tmp, out_npy)
    write_json_atomic(out_grid, {"grid": grid.to_dict(), "layer": spec.to_dict()})
    return grid


def _read_global_array(fmt: str, path: str) -> np.ndarray:
    """A global plate carree built-in (west edge -180, north edge +90) as (H, W) or (H, W, B)."""
    if fmt == "bmng_jpeg":
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    import h5py

    with h5py.File(path, "r") as h:
        if fmt == "pvlib_linke_h5":
            monthly: np.ndarray = h["LinkeTurbidity"][:]  # (2160, 4320, 12) uint8, TL * 20
            annual: np.ndarray = monthly.mean(axis=2, dtype=np.float32)
            return annual
        out: np.ndarray = h["Altitude"][:]
        return out


def _check_band_count(spec: LayerSpec, count: int) -> tuple[str, ...]:
    """The layer's bands, checked against the raster's band count.

    Raises:
        ConfigError: naming ``layers.<name>.bands``.
    """
    from vectorgeo.errors import ConfigError

    bands = tuple(spec.bands)
    if (len(bands) or 1) != count:
        raise ConfigError(
            f"layers.{spec.name}.bands",
            f"the raster has {count} band(s), the layer lists {len(bands) or 1}"
            + (f" ({', '.join(bands)})" if bands else " (no bands list)")
            + f"; expected {count} band names",
        )
    return bands


def _check_bands_have_data(spec: LayerSpec, npy: str | Path) -> None:
    """Every band of a multi-band layer has at least one valid (finite, not nodata) pixel.

    Raises:
        ConfigError: naming ``layers.<name>.bands`` and the empty band.
    """
    from vectorgeo.errors import ConfigError

    if not spec.bands:
        return
    arr = np.load(npy, mmap_mode="r")
    seen = np.zeros(len(spec.bands), dtype=bool)
    for r0 in range(0, arr.shape[0], 512):
        block = np.asarray(arr[r0 : r0 + 512])
        ok = np.isfinite(block) if block.dtype.kind == "f" else np.ones(block.shape, bool)
        if spec.nodata is not None:
            ok &= block != spec.nodata
        seen |= ok.reshape(-1, len(spec.bands)).any(axis=0)
        if seen.all():
            return
    empty = [b for b, s in zip(spec.bands, seen, strict=True) if not s]
    raise ConfigError(
        f"layers.{spec.name}.bands",
        f"band(s) {', '.join(empty)} have no valid pixel (all nodata); expected data in every band",
    )


def mosaic_tiles(tiles: Sequence[str | Path], out_tif: str | Path, rows_per_block: int = 2048) -> Grid:
    """Merge tiles of one layer (same CRS and pixel size) into one GeoTIFF.

    Windowed: memory stays bounded by one block of the output. Later tiles win
    where tiles overlap, except that nodata pixels never overwrite data.

    Raises:
        RasterError: a tile is unreadable, or tiles disagree on CRS/pixel size/dtype.
    """
    import rasterio
    from rasterio.windows import Window, from_bounds

    names = [str(t) for t in tiles]
    grids = [inspect_source(t) for t in names]
    with rasterio.open(names[0]) as ds0:
        dtype, nodata, crs = ds0.dtypes[0], ds0.nodata, ds0.crs
    g0 = grids[0]
    for t, g in zip(names, grids, strict=True):
        if not (math.isclose(g.dx, g0.dx, rel_tol=1e-9) and math.isclose(g.dy, g0.dy, rel_tol=1e-9)):
            raise RasterError(t, f"pixel size ({g.dx}, {g.dy}) differs from {names[0]} ({g0.dx}, {g0.dy})")
    west = min(g.x0 for g in grids)
    north = max(g.y0 for g in grids)
    east = max(g.x0 + g.width * g.dx for g in grids)
    south = min(g.y0 + g.height * g.dy for g in grids)
    width = round((east - west) / g0.dx)
    height = round((south - north) / g0.dy)
    out_tif = Path(out_tif)
    out_tif.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_tif.parent, prefix=f".{out_tif.name}.", suffix=".tif")
    os.close(fd)
    profile = {
        "driver": "GTiff",
        "width": width,
        "height": height,
        "count": 1,
        "dtype": dtype,
        "crs": crs,
        "transform": rasterio.Affine(g0.dx, 0, west, 0, g0.dy, north),
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }
    try:
        with rasterio.open(tmp, "w+", **profile) as dst:
            for t in names:
                with rasterio.open(t) as src:
                    b = src.bounds
                    win = from_bounds(b.left, b.bottom, b.right, b.top, dst.transform).round_offsets().round_lengths()
                    for r0 in range(0, src.height, rows_per_block):
                        n = min(rows_per_block, src.height - r0)
                        data = src.read(1, window=Window(0, r0, src.width, n))
                        w = Window(win.col_off, win.row_off + r0, src.width, n)
                        if nodata is not None:
                            cur = dst.read(1, window=w)
                            data = np.where(data == nodata, cur, data)
                        dst.write(data, 1, window=w)
        os.replace(tmp, out_tif)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Grid(west, north, g0.dx, g0.dy, width, height)
