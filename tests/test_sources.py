"""The built-in data sets added for imagery and turbidity, and multi-band layers from GeoTIFFs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vectorgeo import config as C
from vectorgeo.errors import ConfigError, RasterError
from vectorgeo.layers import Layer, LayerSpec
from vectorgeo.rasters import prepare_layer
from vectorgeo.sources import BUILTINS, builtin_path

BLUE_MARBLE = {"kind": "continuous", "source": "builtin:blue_marble", "bands": ["red", "green", "blue"]}


@pytest.fixture(scope="module")
def blue_marble(tmp_path_factory: pytest.TempPathFactory) -> Layer:
    d = tmp_path_factory.mktemp("bmng")
    spec = LayerSpec.from_config("imagery", BLUE_MARBLE)
    prepare_layer(spec, builtin_path("blue_marble"), d / "imagery.npy", d / "imagery.grid.json")
    return Layer.open(spec, d / "imagery.npy")


def rgb(layer: Layer, lat: float, lng: float) -> np.ndarray:
    out: np.ndarray = layer.values_at(np.array([lat]), np.array([lng]))[0]
    return out


def test_blue_marble_known_places(blue_marble: Layer) -> None:
    assert blue_marble.array.shape == (2700, 5400, 3) and blue_marble.array.dtype == np.uint8
    sahara = np.mean([rgb(blue_marble, lat, lng) for lat, lng in ((23.0, 12.0), (25.0, 5.0), (27.0, 25.0))], axis=0)
    amazon = np.mean([rgb(blue_marble, lat, lng) for lat, lng in ((-4.0, -62.0), (-8.0, -70.0))], axis=0)
    ocean = np.mean([rgb(blue_marble, lat, lng) for lat, lng in ((0.0, -150.0), (-30.0, -120.0), (10.0, 65.0))], axis=0)
    r, _, b = sahara
    assert r > b + 40 and r > 120  # sand: red well above blue
    green_share = lambda c: c[1] / c.sum()  # noqa: E731
    assert green_share(amazon) > green_share(sahara) and amazon[1] > amazon[0]
    assert ocean.sum() < 120 and ocean[2] >= ocean[0]  # open ocean: dark and bluish
    assert rgb(blue_marble, 75.0, -40.0).min() > 200  # the Greenland ice sheet is white


def test_blue_marble_georeferencing_round_trips() -> None:
    """Plate carree, west edge -180, north edge +90, 1/15 deg pixels: lat/lng -> pixel -> pixel centre."""
    layer_spec = LayerSpec.from_config("imagery", BLUE_MARBLE)
    arr = np.zeros((2700, 5400, 3), np.uint8)
    from vectorgeo.rasters import Grid

    g = Grid(-180.0, 90.0, 1 / 15, -1 / 15, 5400, 2700)
    layer = Layer(layer_spec, g, arr)
    rng = np.random.default_rng(0)
    lat, lng = rng.uniform(-89.9, 89.9, 1000), rng.uniform(-180, 179.99, 1000)
    row, col, inside = g.index(lat, lng)
    assert inside.all()
    np.testing.assert_array_equal(row, np.floor((90 - lat) * 15).astype(int))
    np.testing.assert_array_equal(col, np.floor((lng + 180) * 15).astype(int))
    centre_lat, centre_lng = 90 - (row + 0.5) / 15, -180 + (col + 0.5) / 15
    assert np.abs(centre_lat - lat).max() <= 0.5 / 15 + 1e-9 and np.abs(centre_lng - lng).max() <= 0.5 / 15 + 1e-9
    r2, c2, _ = g.index(centre_lat, centre_lng)
    np.testing.assert_array_equal(r2, row)
    np.testing.assert_array_equal(c2, col)
    # the prepared built-in has exactly this grid, and a marked pixel is found at its place
    arr[row[0], col[0]] = (1, 2, 3)
    assert list(layer.values_at(lat[:1], lng[:1])[0]) == [1.0, 2.0, 3.0]


def test_blue_marble_prepared_grid(blue_marble: Layer) -> None:
    g = blue_marble.grid
    assert (g.x0, g.y0, g.width, g.height) == (-180.0, 90.0, 5400, 2700)
    assert g.dx == pytest.approx(1 / 15) and g.dy == pytest.approx(-1 / 15) and g.wraps


def test_linke_turbidity_is_the_annual_mean(tmp_path: Path) -> None:
    import h5py

    spec = LayerSpec.from_config("tl", {"kind": "continuous", "source": "builtin:linke_turbidity", "scale": 0.05})
    prepare_layer(spec, builtin_path("linke_turbidity"), tmp_path / "tl.npy", tmp_path / "tl.grid.json")
    layer = Layer.open(spec, tmp_path / "tl.npy")
    with h5py.File(builtin_path("linke_turbidity")) as h:
        monthly = h["LinkeTurbidity"][1000, 2000]  # row 1000 = lat 90 - 1000.5/12, col 2000 = lng -180 + 2000.5/12
    v = layer.values_at(np.array([90 - 1000.5 / 12]), np.array([-180 + 2000.5 / 12]))[0]
    assert v == pytest.approx(monthly.mean() / 20, rel=1e-5)
    assert 1.0 < v < 8.0
    assert BUILTINS["linke_turbidity"].bands == 1


def write_multiband(path: Path, data: np.ndarray, nodata: float | None = None) -> Path:
    import rasterio

    bands, h, w = data.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": bands, "dtype": str(data.dtype),
               "crs": "EPSG:4326", "transform": rasterio.Affine(0.1, 0, 10, 0, -0.1, 50), "nodata": nodata}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def test_multiband_geotiff_prepares_with_bands_last(tmp_path: Path) -> None:
    data = np.stack([np.full((20, 30), v, np.uint16) for v in (10, 20, 30, 40)])
    src = write_multiband(tmp_path / "s2.tif", data, nodata=0)
    spec = LayerSpec.from_config("s2", {"kind": "continuous", "source": str(src), "nodata": 0,
                                        "bands": ["b2", "b3", "b4", "b8"], "scale": 0.5})  # fmt: skip
    prepare_layer(spec, src, tmp_path / "s2.npy", tmp_path / "s2.grid.json")
    layer = Layer.open(spec, tmp_path / "s2.npy")
    assert layer.array.shape == (20, 30, 4)
    assert list(layer.values_at(np.array([49.0]), np.array([11.0]))[0]) == [5.0, 10.0, 15.0, 20.0]


@pytest.mark.parametrize("bands", [["r", "g"], ["r", "g", "b", "nir", "swir"]])
def test_wrong_band_count_names_the_bands_key(tmp_path: Path, bands: list[str]) -> None:
    src = write_multiband(tmp_path / "img.tif", np.ones((3, 10, 10), np.uint8))
    spec = LayerSpec.from_config("img", {"kind": "continuous", "source": str(src), "bands": bands})
    with pytest.raises(ConfigError, match=r"layers\.img\.bands.*3 band"):
        prepare_layer(spec, src, tmp_path / "img.npy", tmp_path / "img.grid.json")
    assert not (tmp_path / "img.npy").exists()
    # a single-band layer (no bands list) given a 3-band raster: the source is refused
    single = LayerSpec.from_config("img", {"kind": "continuous", "source": str(src)})
    with pytest.raises(RasterError, match="has 3 bands; layer 'img' declares 1 band"):
        prepare_layer(single, src, tmp_path / "img.npy", tmp_path / "img.grid.json")
    # a built-in's band count is known without reading it: refused at config validation
    with pytest.raises(ConfigError, match=r"layers\.imagery\.bands"):
        C.section(C.LayerConfig, {**BLUE_MARBLE, "bands": bands}, "layers.imagery")


def test_band_without_valid_pixels_names_the_bands_key(tmp_path: Path) -> None:
    data = np.stack([np.full((10, 10), 7, np.int16), np.full((10, 10), -9999, np.int16)])
    src = write_multiband(tmp_path / "img.tif", data, nodata=-9999)
    spec = LayerSpec.from_config(
        "img", {"kind": "continuous", "source": str(src), "nodata": -9999, "bands": ["ok", "empty"]}
    )
    with pytest.raises(ConfigError, match=r"layers\.img\.bands.*empty.*no valid pixel"):
        prepare_layer(spec, src, tmp_path / "img.npy", tmp_path / "img.grid.json")
    assert not (tmp_path / "img.npy").exists()


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"kind": "categorical", "classes": {1: "a"}, "bands": ["x"]}, "layers.l.bands"),
        ({"kind": "continuous", "bands": ["x", "x"]}, "layers.l.bands"),
        ({"kind": "continuous", "bands": ["x", "y"], "mean": [1.0]}, "layers.l.mean"),
        ({"kind": "continuous", "bands": ["x", "y"], "std": [1.0, 0.0]}, "layers.l.std"),
    ],
)
def test_bad_band_settings_name_the_key(cfg: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        LayerSpec.from_config("l", {"source": "x.tif", **cfg})
    assert e.value.key.startswith(key)
