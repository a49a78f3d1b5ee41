"""Result downloads (vectorgeo.export): GeoJSON, CSV and GeoParquet, read back by independent readers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import geopandas
import h3
import numpy as np
import pyarrow.parquet as pq
import pytest

from vectorgeo import export
from vectorgeo.errors import RequestError


@pytest.fixture
def results() -> export.Results:
    cells = [h3.latlng_to_cell(lat, lng, 5) for lat, lng in ((47.0, 10.0), (-16.9, 179.98), (64.0, -21.0))]
    ll = np.array([h3.cell_to_latlng(c) for c in cells])
    return export.Results(
        np.array([h3.str_to_int(c) for c in cells], dtype=np.uint64), ll[:, 0], ll[:, 1],
        np.array([99.5, 97.25, 50.0]), "percentile", "f" * 20,
    )  # fmt: skip


def test_formats_by_suffix() -> None:
    assert [export.format_of(p) for p in ("a.parquet", "b.CSV", "c.geojson", "d.json")] == [
        "parquet", "csv", "geojson", "geojson",
    ]  # fmt: skip
    with pytest.raises(RequestError, match="'--out'"):
        export.format_of("x.xlsx")
    with pytest.raises(RequestError, match="'format'"):
        export.encode(export.Results(*(np.zeros(0),) * 4, "percentile", "x"), "xlsx")


def test_geoparquet_read_by_geopandas(tmp_path: Path, results) -> None:
    path = tmp_path / "r.parquet"
    assert export.write(path, results) == "parquet"
    assert [p.name for p in tmp_path.iterdir()] == ["r.parquet"]  # no temp file left
    gdf = geopandas.read_parquet(path)
    assert gdf["h3"].tolist() == [f"{int(c):015x}" for c in results.h3]
    assert gdf["rank"].tolist() == [1, 2, 3] and gdf["score"].tolist() == [99.5, 97.25, 50.0]
    assert gdf.crs.to_epsg() == 4326
    assert gdf.geometry.contains(geopandas.GeoSeries.from_xy(gdf["lng"], gdf["lat"], crs=4326)).all()
    # the cell across the antimeridian keeps continuous longitudes
    assert gdf.geometry.iloc[1].bounds[2] - gdf.geometry.iloc[1].bounds[0] < 1
    meta = json.loads(pq.read_schema(path).metadata[b"vectorgeo"])
    assert meta == {"score_kind": "percentile", "score_id": "f" * 20}


def test_geojson_and_csv(results) -> None:
    fc = json.loads(export.encode(results, "geojson"))
    assert fc["type"] == "FeatureCollection" and fc["score_kind"] == "percentile"
    props = [f["properties"] for f in fc["features"]]
    assert [p["h3"] for p in props] == [f"{int(c):015x}" for c in results.h3] and props[0]["rank"] == 1
    assert all(f["geometry"]["type"] == "Polygon" and len(f["geometry"]["coordinates"][0]) == 7 for f in fc["features"])
    rows = list(csv.DictReader(io.StringIO(export.encode(results, "csv").decode())))
    assert [r["h3"] for r in rows] == [p["h3"] for p in props]
    assert [float(r["score"]) for r in rows] == [99.5, 97.25, 50.0]
    empty = export.Results(np.zeros(0, np.uint64), np.zeros(0), np.zeros(0), np.zeros(0), "probability", "e")
    assert json.loads(export.encode(empty, "geojson"))["features"] == []
    assert pq.read_table(io.BytesIO(export.encode(empty, "parquet"))).num_rows == 0
