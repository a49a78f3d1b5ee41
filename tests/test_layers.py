"""Layer lookups on the real built-in datasets and on generated fixtures."""

from __future__ import annotations

import numpy as np
import pytest

from vectorgeo.config import NODATA_INDEX
from vectorgeo.errors import ConfigError, RasterError
from vectorgeo.layers import Layer, LayerSpec, take_pixels
from vectorgeo.rasters import Grid, inspect_source, mosaic_tiles, prepare_layer
from vectorgeo.sources import builtin_path


def at(layer: Layer, lat: float, lng: float):  # type: ignore[no-untyped-def]
    return layer.values_at(np.array([lat]), np.array([lng]))[0]


def test_known_places(builtin_layers, land_mask):  # type: ignore[no-untyped-def]
    lc, elev = builtin_layers["landcover"], builtin_layers["elevation"]
    names = lc.spec.class_names
    assert names[at(lc, -5.0, -65.0)] == "evergreen_broadleaf_forest"  # Amazon, IGBP 2
    assert names[at(lc, -8.0, -70.0)] == "evergreen_broadleaf_forest"
    assert names[at(lc, 23.5, 10.0)] == "barren"  # Sahara, IGBP 16
    assert at(elev, 27.988, 86.925) > 5000  # Mount Everest
    assert 0 < at(elev, 23.5, 10.0) < 1500
    # the open Pacific is ocean in every layer
    assert not at(land_mask, 0.0, -140.0)
    assert names[at(lc, 0.0, -140.0)] == "water"
    assert np.isnan(at(elev, 0.0, -140.0))
    assert lc.invalid_at(np.array([0.0]), np.array([-140.0]))[0]
    assert at(land_mask, -5.0, -65.0) and at(land_mask, 46.5, 8.0)


def test_everest_cell_is_high(builtin_layers):  # type: ignore[no-untyped-def]
    import h3

    cell = h3.latlng_to_cell(27.988, 86.925, 5)
    lat, lng = h3.cell_to_latlng(cell)
    assert at(builtin_layers["elevation"], lat, lng) > 5000


def test_antimeridian_wraps(builtin_layers):  # type: ignore[no-untyped-def]
    elev = builtin_layers["elevation"]
    a = elev.values_at(np.array([-17.8, -17.8]), np.array([178.0, 178.0 - 360.0]))
    assert a[0] == a[1] and np.isfinite(a[0])
    assert elev.grid.wraps


def test_categorical_range_and_nodata(builtin_layers):  # type: ignore[no-untyped-def]
    lc = builtin_layers["landcover"]
    rng = np.random.default_rng(0)
    v = lc.values_at(rng.uniform(-90, 90, 100000), rng.uniform(-180, 180, 100000))
    assert v.dtype == np.uint8
    assert set(np.unique(v)) <= set(range(lc.spec.n_classes)) | {NODATA_INDEX}
    # points off a non-global grid are nodata
    g = Grid(10, 50, 0.1, -0.1, 10, 10)
    spec = LayerSpec.from_config("x", {"kind": "categorical", "source": "x.tif", "classes": {1: "a", 2: "b"}})
    layer = Layer(spec, g, np.full((10, 10), 2, dtype=np.uint8))
    assert list(layer.values_at(np.array([49.5, 40.0]), np.array([10.5, 10.5]))) == [1, NODATA_INDEX]


def test_grid_index_edges() -> None:
    g = Grid(-180, 90, 1.0, -1.0, 360, 180)
    row, col, inside = g.index(np.array([90.0, -90.0, 0.5, 95.0]), np.array([-180.0, 179.999, 180.0, 0.0]))
    assert list(row[:3]) == [0, 179, 89] and list(col[:3]) == [0, 359, 0]
    assert list(inside) == [True, True, True, False]


def test_prepare_layer_crop_and_grid(tmp_path, raster_fixtures):  # type: ignore[no-untyped-def]
    spec = LayerSpec.from_config(
        "stripes",
        {
            "kind": "categorical",
            "source": str(raster_fixtures / "stripes.tif"),
            "nodata": 255,
            "classes": {0: "a", 1: "b"},
        },
    )
    g = prepare_layer(
        spec, raster_fixtures / "stripes.tif", tmp_path / "s.npy", tmp_path / "s.grid.json", crop=[-1, 59, 1, 60]
    )
    assert g.width == 200 and g.height == 100
    layer = Layer.open(spec, tmp_path / "s.npy")
    full = Layer.open(spec, prepare_and_open(spec, raster_fixtures, tmp_path))
    lat, lng = np.array([59.5, 59.3]), np.array([0.37, -0.61])
    assert np.array_equal(layer.values_at(lat, lng), full.values_at(lat, lng))


def prepare_and_open(spec: LayerSpec, d, tmp_path):  # type: ignore[no-untyped-def]
    prepare_layer(spec, d / "stripes.tif", tmp_path / "full.npy", tmp_path / "full.grid.json")
    return tmp_path / "full.npy"


def test_mosaic(tmp_path, raster_fixtures):  # type: ignore[no-untyped-def]
    tiles = sorted(raster_fixtures.glob("tile_*.tif"))
    g = mosaic_tiles(tiles, tmp_path / "m.tif")
    assert (g.width, g.height) == (20, 20)
    spec = LayerSpec.from_config("m", {"kind": "continuous", "source": str(tmp_path / "m.tif"), "nodata": -9999})
    prepare_layer(spec, tmp_path / "m.tif", tmp_path / "m.npy", tmp_path / "m.grid.json")
    layer = Layer.open(spec, tmp_path / "m.npy")
    # tile i has value 100*i + row; tiles: 0 = NW, 1 = NE, 2 = SW, 3 = SE
    v = layer.values_at(np.array([45.95, 45.95, 45.05, 44.05, 44.05]), np.array([10.05, 11.05, 10.05, 10.05, 11.95]))
    assert list(v) == [0, 100, 9, 209, 309]
    assert (g.x0, g.y0) == (10.0, 46.0)


def test_projected_crs_refused(raster_fixtures):  # type: ignore[no-untyped-def]
    with pytest.raises(RasterError, match="projected CRS"):
        inspect_source(str(raster_fixtures / "utm.tif"))


def test_missing_file_and_unknown_builtin(tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(RasterError, match="does not exist"):
        inspect_source(str(tmp_path / "nope.tif"))
    with pytest.raises(ConfigError, match="unknown built-in dataset 'nope'"):
        builtin_path("nope")
    with pytest.raises(ConfigError, match=r"layers\.lc\.source"):
        LayerSpec.from_config("lc", {"kind": "categorical", "source": "builtin:nope", "classes": {1: "a"}})


def test_spec_validation() -> None:
    with pytest.raises(ConfigError, match=r"layers\.x\.water"):
        LayerSpec.from_config("x", {"kind": "categorical", "source": "a.tif", "classes": {1: "a"}, "water": [7]})
    with pytest.raises(ConfigError, match=r"layers\.x\.kind"):
        LayerSpec.from_config("x", {"kind": "ordinal", "source": "a.tif"})
    s = LayerSpec.from_config(
        "x", {"kind": "categorical", "source": "a.tif", "classes": {3: "a", 1: "b"}, "water": [1]}
    )
    assert s.water_indices == [1] and LayerSpec.from_dict(s.to_dict()) == s


def test_take_pixels_matches_fancy_indexing() -> None:
    rng = np.random.default_rng(0)
    row = rng.integers(0, 30, (6, 4))[:, :, None]
    col = rng.integers(0, 40, (6, 5))[:, None, :]
    for arr in (
        rng.integers(0, 255, (30, 40)).astype(np.uint8),
        rng.normal(size=(30, 40, 3)).astype(np.float32),
        np.asfortranarray(rng.normal(size=(30, 40))),  # not C-contiguous: plain indexing
    ):
        got = take_pixels(arr, row, col)
        assert got.shape == (6, 4, 5, *arr.shape[2:])
        assert np.array_equal(got, arr[row, col])


def test_multiband_decode_marks_a_pixel_invalid_when_one_band_lacks_data() -> None:
    spec = LayerSpec.from_config(
        "img", {"kind": "continuous", "source": "x.tif", "bands": ["r", "g", "b"], "nodata": 0, "scale": 2.0}
    )
    g = Grid(0.0, 3.0, 1.0, -1.0, 3, 3)
    arr = np.full((3, 3, 3), 10, dtype=np.uint8)
    arr[1, 1, 2] = 0  # one band of one pixel is nodata
    layer = Layer(spec, g, arr)
    inside = np.ones((1, 3, 3), bool)
    inside[0, 0, 0] = False  # off the grid: every band
    values, invalid = layer.decode(arr[None], inside)
    assert values.dtype == np.float32 and values[0, 2, 2].tolist() == [20.0, 20.0, 20.0]
    assert np.isnan(values[0, 0, 0]).all()
    assert values[0, 1, 1, :2].tolist() == [20.0, 20.0] and np.isnan(values[0, 1, 1, 2])
    assert invalid[0].tolist() == [[True, False, False], [False, True, False], [False, False, False]]
