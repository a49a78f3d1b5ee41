"""Region windows (vectorgeo.windows): a region's patches read from its window equal those read from the
whole layer, for ordinary, antimeridian and polar regions; a window too small fails loudly."""

from __future__ import annotations

from pathlib import Path

import h3
import numpy as np
import pytest

from vectorgeo.errors import DataError
from vectorgeo.layers import Layer
from vectorgeo.sampling import gather_patches
from vectorgeo.stencil import centroids, change_resolution
from vectorgeo.windows import candidate_regions, cut_windows, open_window, window_nbytes

PATCH_PX, PATCH_KM = 16, 80.0
REGIONS = {
    "iberia": h3.latlng_to_cell(40.0, -4.0, 1),
    "antimeridian": h3.latlng_to_cell(66.0, 179.9, 1),  # Chukotka, across ±180°
    "north_pole": h3.latlng_to_cell(89.9, 0.0, 1),
    "antarctica": h3.latlng_to_cell(-85.0, 60.0, 1),
}


def _cells(region: str, res: int = 5) -> tuple[np.ndarray, np.ndarray]:
    cells = change_resolution(np.array([h3.str_to_int(region)], dtype=np.uint64), res)
    return centroids(cells)


@pytest.mark.parametrize("name", sorted(REGIONS))
def test_window_patches_equal_whole_layer_patches(name: str, builtin_layers: dict[str, Layer], tmp_path: Path) -> None:
    region = REGIONS[name]
    path = tmp_path / f"{region}.npz"
    stats = cut_windows(builtin_layers, [region], PATCH_KM, [path])
    assert stats["window_bytes"] == window_nbytes(path) > 0
    windows = open_window(path, {n: layer.spec for n, layer in builtin_layers.items()})
    lat, lng = _cells(region)
    whole = gather_patches(builtin_layers, lat, lng, PATCH_PX, PATCH_KM)
    cut = gather_patches(windows, lat, lng, PATCH_PX, PATCH_KM)
    for n in builtin_layers:
        assert np.array_equal(whole[0][n], cut[0][n], equal_nan=True), n
        assert np.array_equal(whole[1][n], cut[1][n]), n
    assert np.array_equal(whole[2], cut[2])
    for n, layer in builtin_layers.items():
        whole_v, cut_v = layer.values_at(lat, lng), windows[n].values_at(lat, lng)
        assert np.array_equal(whole_v, cut_v, equal_nan=whole_v.dtype.kind == "f")
    if name == "iberia":  # an ordinary region reads a small part of the world
        assert stats["window_bytes"] < stats["layer_bytes"] / 50


def test_window_too_small_for_the_patches_fails(builtin_layers: dict[str, Layer], tmp_path: Path) -> None:
    region = REGIONS["iberia"]
    path = tmp_path / "w.npz"
    cut_windows(builtin_layers, [region], 10.0, [path])
    windows = open_window(path, {n: layer.spec for n, layer in builtin_layers.items()})
    lat, lng = _cells(region)
    with pytest.raises(DataError, match="outside the region's window"):
        gather_patches(windows, lat, lng, PATCH_PX, 1000.0)
    # another region's cells are outside this window too
    other_lat, other_lng = _cells(REGIONS["antimeridian"])
    with pytest.raises(DataError, match="outside the region's window"):
        windows["landcover"].values_at(other_lat, other_lng)


def test_candidate_regions_cover_the_extent() -> None:
    assert len(candidate_regions(0, None)) == 122
    assert len(candidate_regions(1, None)) == 842
    bbox = {"bbox": [-7.0, 35.0, -3.0, 38.0]}
    cands = set(candidate_regions(1, bbox))
    # every res-1 parent of a res-5 cell centred in the bbox is a candidate, and the candidates are few
    lat = np.linspace(35.0, 38.0, 40)
    lng = np.linspace(-7.0, -3.0, 40)
    parents = {h3.cell_to_parent(h3.latlng_to_cell(a, b, 5), 1) for a in lat for b in lng}
    assert parents <= cands and len(cands) < 15
    assert candidate_regions(1, {"regions": ["81397ffffffffff"]}) == ["81397ffffffffff"]
    # across the antimeridian
    fiji = set(candidate_regions(1, {"bbox": [177.0, -19.0, -178.0, -15.0]}))
    assert h3.cell_to_parent(h3.latlng_to_cell(-17.0, 179.9, 5), 1) in fiji
    assert h3.cell_to_parent(h3.latlng_to_cell(-17.0, -179.9, 5), 1) in fiji
