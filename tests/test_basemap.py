"""The offline Blue Marble basemap (vectorgeo.basemap): tiles against the source image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vectorgeo import basemap
from vectorgeo.errors import RequestError


def test_source_image() -> None:
    img = basemap.image()
    assert img.shape == (2700, 5400, 3) and img.dtype == np.uint8
    assert basemap.image_path().name == "bmng.jpg"


def test_tiles_are_the_image_in_web_mercator() -> None:
    tile = np.asarray(Image.open(io.BytesIO(basemap.tile(2, 1, 1))).convert("RGB")).astype(int)
    assert tile.shape == (256, 256, 3)
    # pixel (row i, column j) of tile 2/1/1 shows the image at its centre's latitude and longitude
    t = (np.arange(256) + 0.5) / 256
    lng = (1 + t) / 4 * 360 - 180
    lat = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (1 + t) / 4))))
    img = basemap.image()
    want = img[((90 - lat) / 180 * 2700).astype(int)[:, None], ((lng + 180) / 360 * 5400).astype(int)[None, :]]
    assert np.abs(tile - want).mean() < 6  # JPEG
    # the Atlantic is blue, the Sahara is not
    atlantic = np.asarray(Image.open(io.BytesIO(basemap.tile(4, 6, 6)))).reshape(-1, 3).mean(0)  # 45-22° W
    sahara = np.asarray(Image.open(io.BytesIO(basemap.tile(5, 16, 13)))).reshape(-1, 3).mean(0)  # Algeria
    assert atlantic[2] > atlantic[0] + 10 and sahara[0] > sahara[2] + 20 and sahara.sum() > 2 * atlantic.sum()


@pytest.mark.parametrize(("z", "x", "y", "param"), [(6, 0, 0, "z"), (2, 4, 0, "x"), (1, 0, 2, "y")])
def test_bad_tiles(z: int, x: int, y: int, param: str) -> None:
    with pytest.raises(RequestError, match=f"'{param}'"):
        basemap.tile(z, x, y)


def test_patch_image() -> None:
    png = basemap.patch_image(np.linspace(10, 9, 32), np.linspace(20, 21, 32))
    assert Image.open(io.BytesIO(png)).size == (32, 32)
