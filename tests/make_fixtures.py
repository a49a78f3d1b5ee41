"""Generator of the tiny raster fixtures used by the tests (run by the tests themselves, into a temp dir).

Run as a script to write them into a folder: ``python tests/make_fixtures.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio import Affine


def write_geotiff(
    path: Path,
    data: np.ndarray,
    x0: float,
    y0: float,
    dx: float,
    dy: float,
    crs: str = "EPSG:4326",
    nodata: float | None = None,
) -> Path:
    """Write a single-band north-up GeoTIFF."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype=data.dtype,
        crs=crs,
        transform=Affine(dx, 0, x0, 0, -abs(dy), y0),
        nodata=nodata,
    ) as ds:
        ds.write(data, 1)
    return path


def stripes(out: Path) -> Path:
    """0.01° categorical raster (lng -4..4, lat -1..61) of 10-km-wide north-south stripes measured on the ground.

    Class at a pixel = floor(east-west ground distance from lng 0 in km / 10) mod 2, computed per row with the
    row's cos(lat): a patch of width W km therefore crosses W / 10 stripes at any latitude.
    """
    res = 0.01
    lats = 61 - (np.arange(int(62 / res)) + 0.5) * res
    lngs = -4 + (np.arange(int(8 / res)) + 0.5) * res
    km_per_deg = np.pi * 6371.0088 / 180
    x_km = lngs[None, :] * km_per_deg * np.cos(np.radians(lats))[:, None]
    data = (np.floor(x_km / 10.0) % 2).astype(np.uint8)
    return write_geotiff(out / "stripes.tif", data, -4, 61, res, -res, nodata=255)


def projected(out: Path) -> Path:
    """A raster in a projected CRS (UTM 33N), which vectorgeo refuses."""
    return write_geotiff(
        out / "utm.tif", np.ones((10, 10), dtype=np.uint8), 500000, 4000000, 1000, -1000, crs="EPSG:32633"
    )


def tiles(out: Path) -> list[Path]:
    """Four 1° × 1° continuous tiles of a 2 × 2° area (values = 100 * tile index + row), for mosaic tests."""
    paths = []
    for i, (x0, y0) in enumerate([(10, 46), (11, 46), (10, 45), (11, 45)]):
        data = (100 * i + np.repeat(np.arange(10, dtype=np.int16)[:, None], 10, axis=1)).astype(np.int16)
        paths.append(write_geotiff(out / f"tile_{i}.tif", data, x0, y0, 0.1, -0.1, nodata=-9999))
    return paths


def main(out: str) -> None:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    stripes(d)
    projected(d)
    tiles(d)


if __name__ == "__main__":
    main(sys.argv[1])
