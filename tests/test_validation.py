"""Query parameter checks shared by the API, the CLI and the store."""

from __future__ import annotations

import math
import re

import h3
import numpy as np
import pytest

from vectorgeo import validation as v
from vectorgeo.errors import RequestError

CELL = "851f8bcffffffff"


def refused(param: str):
    return pytest.raises(RequestError, match=re.escape(f"parameter '{param}'"))


def test_k() -> None:
    assert v.check_k(1) == 1 and v.check_k(np.int64(v.MAX_K)) == v.MAX_K
    for bad in (0, v.MAX_K + 1, -3, 2.0, "10", True, None):
        with refused("k"):
            v.check_k(bad)
    with refused("limit"):
        v.check_k(0, "limit")


def test_radius() -> None:
    assert v.check_radius(1) == 1.0 and v.check_radius("2500.5") == 2500.5
    assert v.check_radius(v.MAX_RADIUS_M) == v.MAX_RADIUS_M
    for bad in (0, -1, v.MAX_RADIUS_M + 1, math.nan, math.inf, "1e3 OR 1=1", None):
        with refused("radius_m"):
            v.check_radius(bad)


def test_bbox_from_text_and_numbers() -> None:
    assert v.parse_bbox("5, 44, 15.5, 50") == (5.0, 44.0, 15.5, 50.0)
    assert v.parse_bbox([170, 55, -170, 75]) == (170.0, 55.0, -170.0, 75.0)  # across ±180°
    for bad in ("1,2,3", "1,2,3,4,5", "a,b,c,d", "10,50,12,40", "-200,40,12,50", "5,40,5,50", "0,nan,1,1"):
        with refused("bbox"):
            v.parse_bbox(bad)
    with refused("bbox"):
        v.parse_bbox(("0", "0", "1", "1); DROP TABLE x; --"))
    with refused("bbox"):
        v.parse_bbox(None)  # type: ignore[arg-type]


def test_cell_parsing() -> None:
    want = h3.str_to_int(CELL)
    assert v.parse_cell(CELL) == v.parse_cell(CELL.upper()) == v.parse_cell(f" {CELL} ") == want
    assert v.parse_cell(want) == v.parse_cell(np.uint64(want)) == want
    assert v.parse_cell(CELL, resolution=5) == want
    for bad in ("zzzzzzzzzzzzzzz", "8f1f8bcffffffff", "0x851f8bcffffffff", "", "1" * 17, True, 1.5, None, -1, 0):
        with refused("h3"):
            v.parse_cell(bad)
    with pytest.raises(RequestError, match="has resolution 5; the loaded cells have 4"):
        v.parse_cell(CELL, resolution=4)
    with refused("region"):
        v.parse_cell("nothex", "region")


def test_points_and_centres() -> None:
    assert v.check_lat_lng("46.5", 8) == (46.5, 8.0)
    with refused("lat"):
        v.check_lat_lng(91, 0)
    with refused("lat"):
        v.check_lat_lng("abc", 0)
    with refused("lng"):
        v.check_lat_lng(0, -180.5)
    with refused("lng"):
        v.check_lat_lng(0, math.nan)
    assert v.check_center((1, 2)) == (1.0, 2.0)
    for bad in ((1, 2, 3), None, (100, 0), "ab"):
        with refused("center"):
            v.check_center(bad)


def test_vector_and_method() -> None:
    np.testing.assert_array_equal(v.check_vector([[1, 2, 3]], 3), np.array([1, 2, 3], dtype=np.float32))
    for bad in ([1, 2], [0, 0, 0], [1, math.nan, 2], "abc", None):
        with refused("vector"):
            v.check_vector(bad, 3)
    assert [v.check_method(m) for m in v.METHODS] == list(v.METHODS)
    with refused("method"):
        v.check_method("fast")


def test_api_patterns_agree_with_the_checks() -> None:
    """What the OpenAPI patterns accept, the checks parse."""
    assert re.fullmatch(v.H3_PATTERN, CELL) and v.parse_cell(CELL)
    for text in ("1,2,3,4", " -1.5e1 , .5 , +3. , 4 "):
        assert re.fullmatch(v.BBOX_PATTERN, text)
        assert len(v.parse_bbox(text)) == 4
    assert not re.fullmatch(v.BBOX_PATTERN, "1,2,3")


# --- search by example ----------------------------------------------------------------------------------------
def test_examples() -> None:
    cell = h3.str_to_int(CELL)
    lat, lng = h3.cell_to_latlng(CELL)
    assert v.parse_example(CELL, "positives[0]", 5) == cell
    assert v.parse_example({"lat": lat, "lng": lng}, "positives[0]", 5) == cell
    assert v.parse_example(f"{lat}, {lng}", "positives[0]", 5) == cell
    assert v.parse_example(h3.cell_to_center_child(CELL, 9), "p", 5) == cell  # a finer cell: its parent
    for bad, param in (
        ({"lat": 91, "lng": 0}, "positives[0].lat"),
        ({"lat": 0, "lng": 181}, "positives[0].lng"),
        ({"lat": 0}, "positives[0]"),
        ({"lat": 0, "lng": 0, "x": 1}, "positives[0]"),
        ("1,2,3", "positives[0]"),
        ("a,b", "positives[0]"),
        (h3.cell_to_parent(CELL, 3), "positives[0]"),
        (True, "positives[0]"),
    ):
        with refused(param):
            v.parse_example(bad, "positives[0]", 5)
    with refused("p"):
        v.parse_example({"lat": 1, "lng": 2}, "p")  # a point needs the resolution
    assert v.parse_examples(None, "negatives", 5, required=False) == []
    with refused("positives"):
        v.parse_examples([], "positives", 5, required=True)
    with refused("positives"):
        v.parse_examples([CELL] * (v.MAX_EXAMPLES + 1), "positives", 5, required=True)
    with refused("negatives"):
        v.parse_examples(CELL, "negatives", 5, required=False)
    with refused("positives[1]"):
        v.parse_examples([CELL, "x"], "positives", 5, required=True)


def test_result_count_and_format() -> None:
    assert v.check_result_count(v.MAX_K, "json") == v.MAX_K
    assert v.check_result_count(v.MAX_EXPORT, "parquet") == v.MAX_EXPORT
    for k, fmt in ((v.MAX_K + 1, "json"), (v.MAX_EXPORT + 1, "csv"), (0, "csv"), (True, "json"), (1.0, "json")):
        with refused("k"):
            v.check_result_count(k, fmt)
    assert v.check_mode("classify") == "classify" and v.check_format("csv") == "csv"
    with refused("mode"):
        v.check_mode("nearest")
    with refused("format"):
        v.check_format("xlsx")


def test_polygon() -> None:
    square = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]]}
    assert v.parse_polygon(square).area == 1.0
    assert v.parse_polygon({"type": "Feature", "properties": {}, "geometry": square}).area == 1.0
    multi = {"type": "MultiPolygon", "coordinates": [square["coordinates"], [[[5, 5], [6, 5], [6, 6], [5, 5]]]]}
    assert v.parse_polygon(multi).geom_type == "MultiPolygon"
    t = np.linspace(0, 2 * np.pi, v.MAX_POLYGON_VERTICES + 1)
    big = [[float(np.cos(a)), float(np.sin(a))] for a in t]
    for bad in (
        {"type": "Point", "coordinates": [0, 0]},
        {"type": "Polygon", "coordinates": "x"},
        {"type": "Polygon", "coordinates": [[[0, 0], [1, 0]]]},  # too few vertices
        {"type": "Polygon", "coordinates": [[[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]]]},  # self-intersecting
        {"type": "Polygon", "coordinates": [[[0, 0], [200, 0], [200, 1], [0, 0]]]},
        {"type": "Polygon", "coordinates": [[["a", 0], [1, 0], [1, 1], ["a", 0]]]},
        {"type": "Polygon", "coordinates": [[*big, big[0]]]},
        {"type": "MultiPolygon", "coordinates": 5},
        [1, 2],
    ):
        with refused("polygon"):
            v.parse_polygon(bad)
