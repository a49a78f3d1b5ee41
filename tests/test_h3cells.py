"""H3 bit helpers against the h3 library itself."""

from __future__ import annotations

import h3
import numpy as np
import pytest

from vectorgeo import h3cells


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    """Cells at resolutions 0..15 all over the globe, including pentagons and polar cells."""
    rng = np.random.default_rng(0)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 200)))
    lng = rng.uniform(-180, 180, 200)
    out = [h3.str_to_int(h3.latlng_to_cell(y, x, r)) for y, x in zip(lat, lng, strict=True) for r in range(16)]
    out += [h3.str_to_int(p) for r in (0, 5, 15) for p in h3.get_pentagons(r)]
    out += [h3.str_to_int(h3.latlng_to_cell(lat_, 0.0, 9)) for lat_ in (89.99, -89.99)]
    return np.array(out, dtype=np.uint64)


def test_strings_round_trip(cells: np.ndarray) -> None:
    for c in cells[:300]:
        s = h3cells.to_str(c)
        assert s == h3.int_to_str(int(c)) and len(s) == 15 and int(s, 16) == int(c)


def test_resolution(cells: np.ndarray) -> None:
    want = np.array([h3.get_resolution(h3.int_to_str(int(c))) for c in cells])
    np.testing.assert_array_equal(h3cells.resolutions(cells), want)
    assert [h3cells.resolution(c) for c in cells[:50]] == want[:50].tolist()


@pytest.mark.parametrize("res", [0, 1, 4, 9, 14, 15])
def test_parents_equal_h3(cells: np.ndarray, res: int) -> None:
    fine = cells[h3cells.resolutions(cells) >= res]
    want = np.array([h3.str_to_int(h3.cell_to_parent(h3.int_to_str(int(c)), res)) for c in fine], dtype=np.uint64)
    np.testing.assert_array_equal(h3cells.parents(fine, res), want)
    assert [h3cells.parent(c, res) for c in fine[:20]] == want[:20].tolist()


def test_parent_of_coarser_cell_is_an_error(cells: np.ndarray) -> None:
    coarse = cells[h3cells.resolutions(cells) == 3]
    with pytest.raises(ValueError, match="resolution 3 has no parent at resolution 5"):
        h3cells.parent(coarse[0], 5)
    with pytest.raises(ValueError, match="no parent at resolution 5"):
        h3cells.parents(cells, 5)
    assert h3cells.parents(np.zeros(0, dtype=np.uint64), 5).size == 0


@pytest.mark.parametrize(("cell", "res"), [("8027fffffffffff", 3), ("8009fffffffffff", 4), ("831f8bfffffffff", 6)])
def test_descendant_range_is_exactly_the_children(cell: str, res: int) -> None:
    """Every child (hexagon or pentagon) lies in [lo, hi], and the range holds no other cell of that resolution."""
    children = sorted(h3.str_to_int(c) for c in h3.cell_to_children(cell, res))
    lo, hi = h3cells.descendant_range(int(cell, 16), res)
    assert lo <= children[0] and children[-1] <= hi
    # neighbours' children fall outside
    for n in h3.grid_ring(cell, 1):
        for c in list(h3.cell_to_children(n, res))[:50]:
            assert not lo <= h3.str_to_int(c) <= hi
    assert h3cells.descendant_range(int(cell, 16), h3.get_resolution(cell)) == (int(cell, 16), int(cell, 16))
    with pytest.raises(ValueError, match="finer than resolution"):
        h3cells.descendant_range(int(cell, 16), h3.get_resolution(cell) - 1)


def test_cell_at_and_validity() -> None:
    assert h3cells.cell_at(47.0, 10.0, 5) == h3.str_to_int(h3.latlng_to_cell(47.0, 10.0, 5))
    assert h3cells.is_valid(int("851f8bcffffffff", 16))
    assert not h3cells.is_valid(int("8f1f8bcffffffff", 16))
    assert not h3cells.is_valid(0) and not h3cells.is_valid(2**64 - 1)


def test_boundary_continuous_across_the_antimeridian() -> None:
    plain = h3cells.boundary(h3.str_to_int(h3.latlng_to_cell(47.0, 10.0, 3)))
    assert len(plain) == 6 and all(-180 <= x <= 180 for x, _ in plain)
    across = np.array(h3cells.boundary(h3.str_to_int(h3.latlng_to_cell(0.0, 179.99, 3))))
    assert across[:, 0].max() > 180 and across[:, 0].max() - across[:, 0].min() < 2
