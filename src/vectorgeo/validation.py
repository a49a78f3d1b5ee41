"""Checks of query parameters, shared by the API, the CLI and the store.

Every check returns the value in its canonical type or raises
:class:`~vectorgeo.errors.RequestError` naming the parameter at fault and what was expected. The API
also states the limits in its OpenAPI schema (:data:`MAX_K`, :data:`MAX_RADIUS_M`, :data:`H3_PATTERN`,
:data:`BBOX_PATTERN`), so that clients see them before they ask.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from vectorgeo import h3cells
from vectorgeo.errors import RequestError

MAX_K = 1000
MAX_RADIUS_M = 5_000_000.0
METHODS = ("auto", "exact", "index")
H3_PATTERN = r"^[0-9a-fA-F]{15}$"
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
BBOX_PATTERN = rf"^\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*$"
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")

BBox = tuple[float, float, float, float]


def _short(value: Any) -> str:
    return repr(str(value)[:80])


def check_k(k: Any, param: str = "k") -> int:
    """Number of results: an integer from 1 to :data:`MAX_K`."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= MAX_K:
        raise RequestError(param, f"expected an integer from 1 to {MAX_K}, got {_short(k)}")
    return int(k)


def check_radius(radius_m: Any, param: str = "radius_m") -> float:
    """Search radius in metres: a number in (0, :data:`MAX_RADIUS_M`]."""
    try:
        r = float(radius_m)
    except (TypeError, ValueError):
        raise RequestError(param, f"expected a number of metres, got {_short(radius_m)}") from None
    if not (math.isfinite(r) and 0 < r <= MAX_RADIUS_M):
        raise RequestError(param, f"expected 0 < {param} <= {MAX_RADIUS_M:.0f} metres, got {_short(radius_m)}")
    return r


def parse_bbox(value: str | Sequence[Any], param: str = "bbox") -> BBox:
    """A box ``(west, south, east, north)`` in degrees from four numbers or ``"west,south,east,north"``.

    West > east is a box across the antimeridian; west == east is refused (empty or the whole circle).
    """
    parts = value.split(",") if isinstance(value, str) else value
    try:
        w, s, e, n = (float(x) for x in parts)
    except (TypeError, ValueError):
        raise RequestError(param, f"expected four numbers west,south,east,north; got {_short(value)}") from None
    if not all(math.isfinite(x) for x in (w, s, e, n)):
        raise RequestError(param, "expected finite numbers")
    if not (-180 <= w <= 180 and -180 <= e <= 180):
        raise RequestError(param, f"west and east must lie in [-180, 180], got {w}, {e}")
    if not (-90 <= s < n <= 90):
        raise RequestError(param, f"expected -90 <= south < north <= 90, got south {s}, north {n}")
    if w == e:
        raise RequestError(param, "west and east must differ")
    return w, s, e, n


def parse_cell(value: Any, param: str = "h3", *, resolution: int | None = None) -> int:
    """An H3 cell from an int or a hex string (up to 16 digits, either case).

    Args:
        value: The cell.
        param: Parameter name for the error message.
        resolution: When given, the cell must have this resolution (e.g. the loaded cells').

    Raises:
        RequestError: not a valid H3 cell, or of another resolution.
    """
    if isinstance(value, bool):
        raise RequestError(param, f"expected an H3 cell (int or 15-digit hex string), got {value!r}")
    if isinstance(value, int | np.integer):
        cell = int(value)
    elif isinstance(value, str) and _HEX.fullmatch(value.strip()):
        cell = int(value.strip(), 16)
    else:
        raise RequestError(param, f"expected an H3 cell (int or 15-digit hex string), got {_short(value)}")
    if not h3cells.is_valid(cell):
        raise RequestError(param, f"{_short(value)} is not a valid H3 cell")
    res = h3cells.resolution(cell)
    if resolution is not None and res != resolution:
        raise RequestError(
            param, f"cell {h3cells.to_str(cell)} has resolution {res}; the loaded cells have {resolution}"
        )
    return cell


def check_lat_lng(lat: Any, lng: Any, lat_param: str = "lat", lng_param: str = "lng") -> tuple[float, float]:
    """A point: latitude in [-90, 90] and longitude in [-180, 180] degrees."""
    try:
        y = float(lat)
    except (TypeError, ValueError):
        raise RequestError(lat_param, f"expected a number of degrees, got {_short(lat)}") from None
    try:
        x = float(lng)
    except (TypeError, ValueError):
        raise RequestError(lng_param, f"expected a number of degrees, got {_short(lng)}") from None
    if not (math.isfinite(y) and -90 <= y <= 90):
        raise RequestError(lat_param, f"expected -90 <= {lat_param} <= 90, got {y}")
    if not (math.isfinite(x) and -180 <= x <= 180):
        raise RequestError(lng_param, f"expected -180 <= {lng_param} <= 180, got {x}")
    return y, x


def check_center(center: Any, param: str = "center") -> tuple[float, float]:
    """A radius centre ``(lat, lng)`` in degrees."""
    try:
        lat, lng = center
    except (TypeError, ValueError):
        raise RequestError(param, f"expected (lat, lng), got {_short(center)}") from None
    try:
        return check_lat_lng(lat, lng)
    except RequestError as e:
        raise RequestError(param, f"expected (lat, lng) in degrees: {e}") from None


def check_vector(vector: Any, dim: int, param: str = "vector") -> np.ndarray:
    """A query vector: ``dim`` finite numbers, not all zero (float32)."""
    try:
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise RequestError(param, f"expected {dim} numbers, got {_short(vector)}") from None
    if v.shape[0] != dim:
        raise RequestError(param, f"expected {dim} numbers (the embedding dimension), got {v.shape[0]}")
    if not np.isfinite(v).all() or not np.any(v):
        raise RequestError(param, "expected finite numbers, not all zero")
    return v


def check_method(method: Any, param: str = "method") -> str:
    """Search method: one of :data:`METHODS`."""
    if method not in METHODS:
        raise RequestError(param, f"expected one of {', '.join(METHODS)}, got {_short(method)}")
    return str(method)


# --- search by example (POST /query, vectorgeo query --positive) ---------------------------------------------
MAX_EXAMPLES = 100
MAX_POLYGON_VERTICES = 10_000
MAX_EXPORT = 100_000
MODES = ("similar", "classify")
FORMATS = ("json", "geojson", "csv", "parquet")


def check_mode(mode: Any, param: str = "mode") -> str:
    """Query mode: one of :data:`MODES`."""
    if mode not in MODES:
        raise RequestError(param, f"expected one of {', '.join(MODES)}, got {_short(mode)}")
    return str(mode)


def check_format(fmt: Any, param: str = "format") -> str:
    """Answer format of a query: one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise RequestError(param, f"expected one of {', '.join(FORMATS)}, got {_short(fmt)}")
    return str(fmt)


def check_result_count(k: Any, fmt: str, param: str = "k") -> int:
    """Number of results of a query: at most :data:`MAX_K` as JSON, :data:`MAX_EXPORT` as a download."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or int(k) < 1:
        raise RequestError(param, f"expected a positive integer, got {_short(k)}")
    limit = MAX_K if fmt == "json" else MAX_EXPORT
    if int(k) > limit:
        what = "JSON answers" if fmt == "json" else "downloads (the export size limit)"
        raise RequestError(param, f"at most {limit} results for {what}, got {int(k)}")
    return int(k)


def parse_example(value: Any, param: str, resolution: int | None = None) -> int:
    """An example of a query as the H3 cell it names.

    Accepted: an H3 cell (int or hex string; a finer cell stands for its parent at ``resolution``), a
    mapping ``{"lat": .., "lng": ..}``, or the text ``"lat,lng"`` (the cell of that point at
    ``resolution``).

    Args:
        value: The example.
        param: Parameter name for errors, e.g. ``positives[2]``.
        resolution: The loaded cells' resolution (needed for points).

    Raises:
        RequestError: not a cell or a point, a cell coarser than ``resolution``.
    """
    if isinstance(value, dict):
        if set(value) - {"lat", "lng"} or len(value) != 2:
            raise RequestError(param, f"expected an H3 cell or {{lat, lng}}, got {_short(value)}")
        lat, lng = check_lat_lng(value["lat"], value["lng"], f"{param}.lat", f"{param}.lng")
    elif isinstance(value, str) and "," in value:
        parts = value.split(",")
        if len(parts) != 2:
            raise RequestError(param, f"expected 'lat,lng' or an H3 cell, got {_short(value)}")
        lat, lng = check_lat_lng(parts[0], parts[1], param, param)
    else:
        cell = parse_cell(value, param)
        res = h3cells.resolution(cell)
        if resolution is None or res == resolution:
            return cell
        if res < resolution:
            raise RequestError(
                param, f"cell {h3cells.to_str(cell)} has resolution {res}; the loaded cells have {resolution}"
            )
        return h3cells.parent(cell, resolution)
    if resolution is None:
        raise RequestError(param, "a point needs the loaded resolution to find its cell")
    return h3cells.cell_at(lat, lng, resolution)


def parse_examples(values: Any, param: str, resolution: int | None = None, *, required: bool) -> list[int]:
    """A list of at most :data:`MAX_EXAMPLES` examples (:func:`parse_example`), as cells in the given order."""
    if values is None:
        values = []
    if not isinstance(values, list | tuple):
        raise RequestError(param, f"expected a list of H3 cells or {{lat, lng}} points, got {_short(values)}")
    if required and not values:
        raise RequestError(param, "give at least one example")
    if len(values) > MAX_EXAMPLES:
        raise RequestError(param, f"at most {MAX_EXAMPLES} examples, got {len(values)}")
    return [parse_example(v, f"{param}[{i}]", resolution) for i, v in enumerate(values)]


def _ring_count(rings: Any, param: str) -> int:
    if not isinstance(rings, list) or not all(isinstance(r, list) for r in rings):
        raise RequestError(param, "expected Polygon coordinates: a list of rings, each a list of [lng, lat]")
    return sum(len(r) for r in rings)


def parse_polygon(value: Any, param: str = "polygon") -> Any:
    """A GeoJSON Polygon or MultiPolygon (or a Feature holding one) as a valid shapely geometry.

    Longitudes must lie in [-180, 180] (split a polygon across the antimeridian into a MultiPolygon),
    at most :data:`MAX_POLYGON_VERTICES` vertices in all.

    Raises:
        RequestError: malformed, too many vertices, out of range, or invalid (self-intersecting).
    """
    import shapely
    from shapely.errors import GEOSException
    from shapely.geometry import shape
    from shapely.validation import explain_validity

    geom = value.get("geometry") if isinstance(value, dict) and value.get("type") == "Feature" else value
    if not isinstance(geom, dict) or geom.get("type") not in ("Polygon", "MultiPolygon"):
        raise RequestError(param, "expected a GeoJSON Polygon or MultiPolygon (or a Feature holding one)")
    coords = geom.get("coordinates")
    if geom["type"] == "Polygon":
        n = _ring_count(coords, param)
    elif isinstance(coords, list):
        n = sum(_ring_count(p, param) for p in coords)
    else:
        raise RequestError(param, "expected MultiPolygon coordinates: a list of polygons")
    if n > MAX_POLYGON_VERTICES:
        raise RequestError(param, f"at most {MAX_POLYGON_VERTICES} vertices, got {n}")
    try:
        poly = shape({"type": geom["type"], "coordinates": coords})
        xy = shapely.get_coordinates(poly)
    except (TypeError, ValueError, AttributeError, IndexError, GEOSException) as e:
        raise RequestError(param, f"malformed GeoJSON coordinates: {e}") from None
    if poly.is_empty or xy.shape[0] < 4:
        raise RequestError(param, "the polygon is empty")
    if not np.isfinite(xy).all() or (np.abs(xy[:, 0]) > 180).any() or (np.abs(xy[:, 1]) > 90).any():
        raise RequestError(param, "coordinates must be [lng, lat] with lng in [-180, 180] and lat in [-90, 90]")
    if not poly.is_valid:
        raise RequestError(param, f"invalid polygon: {explain_validity(poly)}")
    return poly


def check_tile(z: int, x: int, y: int, max_zoom: int, what: str = "zoom") -> None:
    """Validate web-mercator tile coordinates.

    Raises:
        RequestError: naming ``z``, ``x`` or ``y`` when out of range (``what`` names the zoom in the message).
    """
    if not 0 <= z <= max_zoom:
        raise RequestError("z", f"{what} must be in 0..{max_zoom}, got {z}")
    n = 1 << z
    if not 0 <= x < n:
        raise RequestError("x", f"tile column must be in 0..{n - 1} at zoom {z}, got {x}")
    if not 0 <= y < n:
        raise RequestError("y", f"tile row must be in 0..{n - 1} at zoom {z}, got {y}")
