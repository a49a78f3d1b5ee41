"""Raster sources on disk: reading headers, preparing layers into memory-mappable arrays, mosaics.

Every layer is *prepared* once into ``<name>.npy`` (the raw array, north-up, memory-mappable) plus
``<name>.grid.json`` (its :class:`Grid` and the layer spec). Lookups then map (lat, lng) to (row, col) with

.. math::

    col = \\lfloor (lng - x_0) / dx \\rfloor \\bmod W \\quad (\\text{global grids}),
    \\qquad row = \\lfloor (lat - y_0) / dy \\rfloor

and gather with numpy fancy indexing: no Python loop per point (:class:`vectorgeo.layers.Layer`).

Sources are read in blocks of rows (:data:`BLOCK_BYTES` of raster each, with GDAL's block cache capped at
:data:`GDAL_CACHE_BYTES`), so memory stays bounded whatever the raster's size. Every output appears
atomically (:mod:`vectorgeo.atomic`). A source that cannot serve as a layer is refused with a
:class:`~vectorgeo.errors.RasterError` naming the file, the config key and what was expected: missing,
truncated or not a raster; no CRS or a projected one; a rotated, sheared or flipped grid; more or fewer
bands than the layer declares; every pixel nodata; tiles of one mosaic that differ in band count, data
type, CRS, pixel size, grid alignment or nodata value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vectorgeo.atomic import atomic_path, write_json_atomic
from vectorgeo.errors import ConfigError, RasterError
from vectorgeo.sources import BUILTINS, builtin_name

if TYPE_CHECKING:
    from vectorgeo.layers import LayerSpec

BLOCK_BYTES = 32 << 20
"""Bytes of raster read (and written) per block of rows when preparing or mosaicking."""
GDAL_CACHE_BYTES = 64 << 20
"""GDAL's raster block cache while reading sources (its default is 5% of the machine's memory)."""


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


def layer_key(name: str) -> str:
    """The config key that names a layer's source: ``land_mask.source`` or ``layers.<name>.source``."""
    return "land_mask.source" if name == "land_mask" else f"layers.{name}.source"


def declared_bands(spec: LayerSpec) -> int:
    """The number of raster bands a layer reads: its ``bands`` list's length, else one."""
    return spec.n_bands


@contextmanager
def _open(path: str, key: str | None) -> Iterator[Any]:
    """rasterio.open with a bounded block cache; unreadable, truncated or damaged files raise RasterError.

    Raises:
        RasterError: the file is missing, not a raster GDAL reads, or a read inside the block fails.
    """
    if not os.path.exists(path):
        raise RasterError(path, "file does not exist", key)
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(path) as ds:
            yield ds
    except RasterioError as e:
        what = "is truncated or damaged" if _opens(path) else "cannot be read as a raster"
        why = e.__cause__ or e  # rasterio's read errors say "see previous exception": GDAL's text
        raise RasterError(
            path, f"{what} ({str(why).strip()}); expected a complete GeoTIFF or another raster GDAL reads", key
        ) from None


def _opens(path: str) -> bool:
    """True when GDAL can at least open the file (its header is readable)."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path):
            return True
    except RasterioError:
        return False


def _grid_from_rasterio(ds: Any, path: str, key: str | None = None) -> Grid:
    """The :class:`Grid` of an open raster, after checking it is a north-up lat/lng grid.

    Raises:
        RasterError: no CRS, a projected CRS, a rotated, sheared or flipped transform, or a grid that
            reaches beyond the poles.
    """
    t = ds.transform
    if ds.crs is None:
        raise RasterError(path, "has no CRS; expected a geographic (lat/lng) CRS such as EPSG:4326", key)
    if not ds.crs.is_geographic:
        raise RasterError(
            path,
            f"is in a projected CRS ({ds.crs.to_string()}); expected a geographic (lat/lng) CRS "
            "such as EPSG:4326 -- reproject it first, e.g. with gdalwarp -t_srs EPSG:4326",
            key,
        )
    if t.b != 0 or t.d != 0:
        raise RasterError(
            path,
            f"has a rotated or sheared transform (row/column terms {t.b}, {t.d}); expected a north-up lat/lng "
            "grid -- warp it first, e.g. with gdalwarp -t_srs EPSG:4326",
            key,
        )
    if not (t.a > 0 and t.e < 0 and all(math.isfinite(v) for v in (t.a, t.c, t.e, t.f))):
        raise RasterError(
            path,
            f"has pixel size ({t.a}, {t.e}); expected a north-up grid (positive width, negative height), "
            "e.g. from gdalwarp -t_srs EPSG:4326",
            key,
        )
    top, bottom = float(t.f), float(t.f + ds.height * t.e)
    if top > 90.0 - t.e or bottom < -90.0 + t.e:
        raise RasterError(
            path, f"spans latitudes {bottom:g}..{top:g}; expected latitudes within -90..90 (degrees)", key
        )
    crs = ds.crs.to_string() if ds.crs.to_epsg() == 4326 else "geographic"
    return Grid(float(t.c), float(t.f), float(t.a), float(t.e), int(ds.width), int(ds.height), crs)


def inspect_source(path: str, key: str | None = None) -> Grid:
    """Read only the header of a local raster and check it is usable.

    Args:
        path: The raster file.
        key: The config key that names it (shown in errors).

    Raises:
        RasterError: missing or unreadable file, no or a projected CRS, rotated or sheared grid.
    """
    with _open(path, key) as ds:
        return _grid_from_rasterio(ds, path, key)


def crop_window(
    grid: Grid, crop: Sequence[float] | None, path: str | None = None, key: str | None = None
) -> tuple[tuple[int, int, int, int], Grid]:
    """Pixel window (row0, row1, col0, col1) covering a bbox, and the cropped grid.

    Args:
        grid: The full grid.
        crop: [west, south, east, north] in degrees, or None for the whole grid.
        path: The raster (shown in errors).
        key: The config key that names it (shown in errors).

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
        bounds = [grid.x0, grid.y0 + grid.height * grid.dy, grid.x0 + grid.width * grid.dx, grid.y0]
        raise RasterError(
            path or grid.crs,
            f"the run's extent (crop bbox {list(crop)}) does not overlap the raster, which covers {bounds}",
            key,
        )
    g = Grid(grid.x0 + c0 * grid.dx, grid.y0 + r0 * grid.dy, grid.dx, grid.dy, c1 - c0, r1 - r0, grid.crs)
    return (r0, r1, c0, c1), g


def block_rows(width: int, dtype: np.dtype[Any], block_bytes: int = BLOCK_BYTES) -> int:
    """Rows per block so that one block of a raster ``width`` pixels wide holds about ``block_bytes``."""
    return max(1, block_bytes // max(1, width * dtype.itemsize))


def _has_data(block: np.ndarray, nodata: Sequence[float]) -> bool:
    """True when some pixel of the block is neither NaN nor one of the nodata values."""
    valid = np.isfinite(block) if block.dtype.kind == "f" else np.ones(block.shape, dtype=bool)
    for v in nodata:
        valid &= block != v
    return bool(valid.any())


def _nodata_values(spec: LayerSpec, file_nodata: float | None) -> tuple[float, ...]:
    """The raw values that are nodata: the layer's, and the file's own nodata tag."""
    return tuple(v for v in {spec.nodata, file_nodata} if v is not None and not math.isnan(v))


def _all_nodata(path: str, spec: LayerSpec, nodata: Sequence[float], crop: Sequence[float] | None, key: str) -> None:
    """Raise the error of a source whose every pixel (inside the crop) is nodata."""
    where = f" inside the run's extent (crop bbox {list(crop)})" if crop is not None else ""
    values = ", ".join(f"{v:g}" for v in nodata) or "none declared"
    raise RasterError(
        path,
        f"every pixel{where} is nodata (NaN or the nodata value: {values}); expected layer '{spec.name}' "
        "to have data there",
        key,
    )


def _prepare_geotiff(
    spec: LayerSpec, path: str, tmp: Path, crop: Sequence[float] | None, rows_per_block: int | None, key: str
) -> Grid:
    """Copy a GeoTIFF's (cropped) first band into a ``.npy`` at ``tmp``, block by block."""
    from rasterio.windows import Window

    with _open(path, key) as ds:
        full = _grid_from_rasterio(ds, path, key)
        want = declared_bands(spec)
        if ds.count != want and spec.bands:
            raise ConfigError(
                f"layers.{spec.name}.bands",
                f"the raster {path} has {ds.count} band(s), the layer lists {want} ({', '.join(spec.bands)}); "
                f"expected {ds.count} band names",
            )
        if ds.count != want:
            raise RasterError(
                path,
                f"has {ds.count} bands; layer '{spec.name}' declares {want} band{'s' if want != 1 else ''} "
                f"(expected a raster with exactly {want})",
                key,
            )
        (w0, w1, c0, c1), grid = crop_window(full, crop, path, key)
        dtype = np.dtype(ds.dtypes[0])
        rows = rows_per_block or block_rows(grid.width, dtype)
        nodata = _nodata_values(spec, ds.nodata)
        has_data = np.zeros(want, dtype=bool)
        shape = (*grid.shape, want) if spec.bands else grid.shape
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        for r0 in range(w0, w1, max(1, rows // want)):
            n = min(max(1, rows // want), w1 - r0)
            win = Window(c0, r0, c1 - c0, n)
            # a multi-band layer keeps a pixel's bands side by side: (n, W, B)
            block = np.moveaxis(ds.read(window=win), 0, -1) if spec.bands else ds.read(1, window=win)[..., None]
            arr[r0 - w0 : r0 - w0 + n] = block if spec.bands else block[..., 0]
            if not has_data.all():
                has_data |= [_has_data(block[..., b], nodata) for b in range(want)]
        arr.flush()
        del arr
    _check_band_data(path, spec, has_data, nodata, crop, key)
    return grid


def _check_band_data(
    path: str, spec: LayerSpec, has_data: np.ndarray, nodata: Sequence[float], crop: Sequence[float] | None, key: str
) -> None:
    """Refuse a source without data, or a multi-band one with a band without a single valid pixel.

    Raises:
        RasterError: every pixel is nodata.
        ConfigError: naming ``layers.<name>.bands``, a band of a multi-band layer has no valid pixel.
    """
    if not has_data.any():
        _all_nodata(path, spec, nodata, crop, key)
    if spec.bands and not has_data.all():
        empty = [b for b, ok in zip(spec.bands, has_data, strict=True) if not ok]
        raise ConfigError(
            f"layers.{spec.name}.bands",
            f"band(s) {', '.join(empty)} of {path} have no valid pixel (all nodata); expected data in every band",
        )


def _prepare_array(
    spec: LayerSpec, path: str, tmp: Path, data: np.ndarray, crop: Sequence[float] | None, key: str
) -> Grid:
    """Copy a global lat/lng array (north row first; (H, W) or (H, W, B)) of a built-in into a ``.npy`` at ``tmp``.

    The array's west edge is -180, its north edge +90, its pixels square in degrees (plate carree).
    """
    h, w = data.shape[:2]
    grid = Grid(-180.0, 90.0, 360.0 / w, -180.0 / h, w, h)
    (w0, w1, c0, c1), grid = crop_window(grid, crop, path, key)
    rows = block_rows(grid.width, data.dtype)
    nodata = _nodata_values(spec, None)
    bands = data.shape[2] if data.ndim == 3 else 1
    has_data = np.zeros(bands, dtype=bool)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=data.dtype, shape=(*grid.shape, *data.shape[2:]))
    for r0 in range(w0, w1, rows):
        block = data[r0 : min(r0 + rows, w1), c0:c1]
        arr[r0 - w0 : r0 - w0 + block.shape[0]] = block
        if not has_data.all():
            per_band = block if data.ndim == 3 else block[..., None]
            has_data |= [_has_data(per_band[..., b], nodata) for b in range(bands)]
    arr.flush()
    del arr
    _check_band_data(path, spec, has_data, nodata, crop, key)
    return grid


def _read_builtin(fmt: str, path: str, key: str) -> np.ndarray:
    """The global array of a built-in data set: npz (GLOBE), HDF5 (pvlib altitude and Linke turbidity), JPEG.

    Linke turbidity is the annual mean of the 12 monthly grids (float32, TL * 20); Blue Marble is the
    JPEG's RGB pixels (H, W, 3).
    """
    if fmt == "globe_npz":
        with np.load(path) as z:
            if "mask" not in z.files:
                raise RasterError(path, "has no array 'mask'; expected the GLOBE land mask npz", key)
            mask = np.asarray(z["mask"])
            # stored as bool; prepared masks are uint8 (1 = ocean), which the decoding tables index
            return mask.view(np.uint8) if mask.dtype == np.bool_ else mask
    if fmt == "bmng_jpeg":
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    import h5py

    with h5py.File(path, "r") as h:
        if fmt == "pvlib_linke_h5":
            monthly = np.asarray(h["LinkeTurbidity"][:])  # (2160, 4320, 12) uint8
            return np.asarray(monthly.mean(axis=2, dtype=np.float32))
        return np.asarray(h["Altitude"][:])


def prepare_layer(
    spec: LayerSpec,
    source_path: str | Path,
    out_npy: str | Path,
    out_grid: str | Path,
    rows_per_block: int | None = None,
    crop: Sequence[float] | None = None,
    key: str | None = None,
) -> Grid:
    """Convert a layer source into a memory-mappable ``.npy`` plus a grid JSON.

    Reads in blocks of rows so memory stays bounded for rasters larger than RAM. Both outputs appear
    atomically and together (temp files renamed at the end); on any error neither appears, and no temp
    file is left.

    Args:
        spec: The layer spec (decides how a built-in is decoded).
        source_path: The local file (a built-in's file, a GeoTIFF or a mosaic).
        out_npy: Destination ``.npy``.
        out_grid: Destination grid JSON.
        rows_per_block: Rows read per block from GeoTIFFs; default :func:`block_rows`.
        crop: Optional bbox [west, south, east, north] in degrees to keep (with
            the pixels that touch it); a bbox with west > east keeps all columns.
        key: The config key that names the source (shown in errors); default :func:`layer_key`.

    Raises:
        RasterError: missing, unreadable or unsuitable source (see the module docstring).
    """
    source_path = str(source_path)
    key = key or layer_key(spec.name)
    bname = builtin_name(spec.source) if isinstance(spec.source, str) else None
    fmt = BUILTINS[bname].fmt if bname else "geotiff"
    if not os.path.exists(source_path):
        raise RasterError(source_path, "file does not exist", key)
    with atomic_path(out_npy) as tmp_npy, atomic_path(out_grid) as tmp_grid:
        if fmt == "geotiff":
            grid = _prepare_geotiff(spec, source_path, tmp_npy, crop, rows_per_block, key)
        else:
            grid = _prepare_array(spec, source_path, tmp_npy, _read_builtin(fmt, source_path, key), crop, key)
        write_json_atomic(tmp_grid, {"grid": grid.to_dict(), "layer": spec.to_dict()})
    return grid


def _check_tile(name: str, ds: Any, g: Grid, first: str, ds0: Any, g0: Grid, key: str | None) -> None:
    """Refuse a tile that cannot be merged with the first one.

    Raises:
        RasterError: band count, data type, CRS, pixel size, grid alignment or nodata differ.
    """

    def differs(what: str, mine: object, theirs: object) -> RasterError:
        return RasterError(
            name, f"{what} {mine} differs from the first tile {first} ({theirs}); expected tiles of one grid", key
        )

    if ds.count != ds0.count:
        raise differs("band count", ds.count, ds0.count)
    if ds.dtypes[0] != ds0.dtypes[0]:
        raise differs("data type", ds.dtypes[0], ds0.dtypes[0])
    if ds.crs != ds0.crs:
        raise differs("CRS", ds.crs.to_string(), ds0.crs.to_string())
    if not (math.isclose(g.dx, g0.dx, rel_tol=1e-9) and math.isclose(g.dy, g0.dy, rel_tol=1e-9)):
        raise differs("pixel size", (g.dx, g.dy), (g0.dx, g0.dy))
    off = ((g.x0 - g0.x0) / g0.dx + 0.0, (g.y0 - g0.y0) / g0.dy + 0.0)  # + 0.0: no "-0" in messages
    if any(abs(o - round(o)) > 1e-6 for o in off):
        raise differs("grid origin", (g.x0, g.y0), f"{(g0.x0, g0.y0)}; offset {off[0]:g}, {off[1]:g} pixels")
    same_nodata = ds.nodata == ds0.nodata or (
        ds.nodata is not None and ds0.nodata is not None and math.isnan(ds.nodata) and math.isnan(ds0.nodata)
    )
    if not same_nodata:
        raise differs("nodata value", ds.nodata, ds0.nodata)


def mosaic_tiles(
    tiles: Sequence[str | Path], out_tif: str | Path, rows_per_block: int | None = None, key: str | None = None
) -> Grid:
    """Merge tiles of one layer (same bands, dtype, CRS, pixel size, grid and nodata) into one GeoTIFF.

    Windowed: memory stays bounded by one block of a tile. Later tiles win where tiles overlap, except
    that nodata pixels never overwrite data. The output appears atomically; on error nothing is left.

    Args:
        tiles: The tile files.
        out_tif: Destination GeoTIFF.
        rows_per_block: Rows copied per block; default :func:`block_rows`.
        key: The config key that lists the tiles (shown in errors).

    Raises:
        RasterError: a tile is missing or unreadable, or tiles disagree (see :func:`_check_tile`).
    """
    import rasterio
    from rasterio.windows import Window, from_bounds

    names = [str(t) for t in tiles]
    if not names:
        raise RasterError(str(out_tif), "no tiles to mosaic; expected at least one", key)
    grids = [inspect_source(t, key) for t in names]
    g0 = grids[0]
    with _open(names[0], key) as ds0:
        dtype, nodata, crs = ds0.dtypes[0], ds0.nodata, ds0.crs
        for t, g in zip(names[1:], grids[1:], strict=True):
            with _open(t, key) as ds:
                _check_tile(t, ds, g, names[0], ds0, g0, key)
    west = min(g.x0 for g in grids)
    north = max(g.y0 for g in grids)
    east = max(g.x0 + g.width * g.dx for g in grids)
    south = min(g.y0 + g.height * g.dy for g in grids)
    width = round((east - west) / g0.dx)
    height = round((south - north) / g0.dy)
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
    with atomic_path(out_tif, suffix=".tif") as tmp, rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        with rasterio.open(tmp, "w+", **profile) as dst:
            for t in names:
                with _open(t, key) as src:
                    b = src.bounds
                    win = from_bounds(b.left, b.bottom, b.right, b.top, dst.transform).round_offsets().round_lengths()
                    rows = rows_per_block or block_rows(src.width, np.dtype(dtype))
                    for r0 in range(0, src.height, rows):
                        n = min(rows, src.height - r0)
                        data = src.read(1, window=Window(0, r0, src.width, n))
                        w = Window(win.col_off, win.row_off + r0, src.width, n)
                        if nodata is not None:
                            cur = dst.read(1, window=w)
                            data = np.where(data == nodata, cur, data)
                        dst.write(data, 1, window=w)
    return Grid(west, north, g0.dx, g0.dy, width, height, g0.crs)
