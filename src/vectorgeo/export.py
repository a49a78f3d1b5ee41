"""Results of a search by example as files: GeoJSON, CSV or GeoParquet, written atomically or served as bytes.

Every format has one row per result, best first, with ``rank`` (1 = best), ``h3`` (15 hex digits),
``lat``, ``lng`` (the cell centre) and ``score`` (the readable score: a percentile in [0, 1] for
``similar``, a probability for ``classify``):

- ``geojson``: a FeatureCollection of the cells' hexagons (EPSG:4326; a hexagon across the
  antimeridian keeps continuous longitudes, beyond ±180°);
- ``csv``: ``rank,h3,lat,lng,score`` with a header;
- ``parquet``: GeoParquet 1.1, the hexagons as WKB in ``geometry`` (primary column), zstd.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from vectorgeo import h3cells
from vectorgeo.atomic import atomic_path
from vectorgeo.errors import RequestError
from vectorgeo.geoparquet import EPSG_4326_PROJJSON

MEDIA_TYPES = {
    "geojson": "application/geo+json",
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}
SUFFIXES = {"geojson": ".geojson", "csv": ".csv", "parquet": ".parquet"}


@dataclass(frozen=True)
class Results:
    """Result columns, best first.

    Attributes:
        h3: Cells (m,), uint64.
        lat: Centre latitudes (m,).
        lng: Centre longitudes (m,).
        score: Readable scores (m,).
        score_kind: ``percentile`` or ``probability``.
        score_id: Id of the score map the results come from.
    """

    h3: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    score: np.ndarray
    score_kind: str
    score_id: str

    @property
    def rank(self) -> np.ndarray:
        return np.arange(1, self.h3.size + 1, dtype=np.int32)


def hexagons(cells: np.ndarray, lng: np.ndarray) -> np.ndarray:
    """Shapely polygons (lng/lat) of cells, longitudes continuous around each centre ``lng``."""
    import shapely

    from vectorgeo.scoretiles import hexagon_rings

    if cells.size == 0:
        return np.zeros(0, dtype=object)
    xy, offsets = hexagon_rings(cells, lng)
    ring = np.repeat(np.arange(cells.size), np.diff(offsets))
    out: np.ndarray = shapely.polygons(shapely.linearrings(xy, indices=ring))
    return out


def to_geojson(r: Results) -> bytes:
    """A GeoJSON FeatureCollection of the results' hexagons."""
    import shapely

    geoms = shapely.to_geojson(shapely.set_precision(hexagons(r.h3, r.lng), 1e-7)) if r.h3.size else []
    names = h3cells.to_strs(r.h3).astype(str)
    features = [
        '{"type":"Feature","properties":'
        + json.dumps({"rank": int(k), "h3": h, "lat": float(a), "lng": float(b), "score": float(s)})
        + ',"geometry":'
        + g
        + "}"
        for k, h, a, b, s, g in zip(r.rank, names, r.lat, r.lng, r.score, geoms, strict=True)
    ]
    head = json.dumps({"score_kind": r.score_kind, "score_id": r.score_id})[1:-1]
    return ('{"type":"FeatureCollection",' + head + ',"features":[' + ",".join(features) + "]}").encode()


def _table(r: Results, with_geometry: bool) -> pa.Table:
    cols: dict[str, Any] = {
        "rank": pa.array(r.rank),
        "h3": pa.array(h3cells.to_strs(r.h3).astype(str)),
        "lat": pa.array(np.asarray(r.lat, dtype=np.float64)),
        "lng": pa.array(np.asarray(r.lng, dtype=np.float64)),
        "score": pa.array(np.asarray(r.score, dtype=np.float64)),
    }
    if with_geometry:
        import shapely

        cols["geometry"] = pa.array(shapely.to_wkb(hexagons(r.h3, r.lng)) if r.h3.size else [], type=pa.binary())
    return pa.table(cols)


def to_csv(r: Results) -> bytes:
    """``rank,h3,lat,lng,score`` with a header."""
    import pyarrow.csv as pcsv

    sink = io.BytesIO()
    pcsv.write_csv(_table(r, False), sink, pcsv.WriteOptions(quoting_style="none"))
    return sink.getvalue()


def _geoparquet(r: Results) -> pa.Table:
    t = _table(r, True)
    if r.h3.size:
        import shapely

        b = shapely.total_bounds(hexagons(r.h3, r.lng)).tolist()
    else:
        b = [0.0, 0.0, 0.0, 0.0]
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": ["Polygon"],
                "crs": EPSG_4326_PROJJSON,
                "bbox": b,
            }
        },
    }
    meta = {"score_kind": r.score_kind, "score_id": r.score_id}
    return t.replace_schema_metadata({b"geo": json.dumps(geo).encode(), b"vectorgeo": json.dumps(meta).encode()})


def to_parquet(r: Results) -> bytes:
    """GeoParquet bytes (hexagons in ``geometry``)."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(_geoparquet(r), sink, compression="zstd")
    return sink.getvalue()


ENCODERS = {"geojson": to_geojson, "csv": to_csv, "parquet": to_parquet}


def encode(r: Results, fmt: str) -> bytes:
    """The results in a download format.

    Raises:
        RequestError: unknown format (``format``).
    """
    if fmt not in ENCODERS:
        raise RequestError("format", f"expected one of {', '.join(ENCODERS)}, got {fmt!r}")
    return ENCODERS[fmt](r)


def format_of(path: str | Path) -> str:
    """The format a file name asks for, by suffix.

    Raises:
        RequestError: an unknown suffix (``--out``).
    """
    suffix = Path(path).suffix.lower()
    for fmt, s in SUFFIXES.items():
        if suffix == s or (fmt == "geojson" and suffix == ".json"):
            return fmt
    raise RequestError("--out", f"expected a file name ending in {', '.join(SUFFIXES.values())}, got {str(path)!r}")


def write(path: str | Path, r: Results, fmt: str | None = None) -> str:
    """Write the results atomically; the format comes from the suffix unless given. Returns the format."""
    fmt = fmt or format_of(path)
    data = encode(r, fmt)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return fmt
