"""Region GeoParquet files: round trip, readers outside vectorgeo, validation, atomic writes."""

from __future__ import annotations

from pathlib import Path

import h3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vectorgeo import geoparquet as gp
from vectorgeo.errors import DataError

REGION = "8027fffffffffff"


def region_arrays(region: str = REGION, res: int = 3, dim: int = 16, seed: int = 0) -> dict:
    """Cells of a region (sorted), centroids, unit embeddings and a status with some nodata rows."""
    cells = np.array(sorted(h3.str_to_int(c) for c in h3.cell_to_children(region, res)), dtype=np.uint64)
    ll = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in cells])
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(len(cells), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    status = np.where(np.arange(len(cells)) % 9 == 4, "nodata", "ok")
    return {"h3": cells, "lat": ll[:, 0], "lng": ll[:, 1], "embedding": emb, "status": status}


@pytest.fixture
def region_file(tmp_path: Path) -> tuple[Path, dict]:
    a = region_arrays()
    path = tmp_path / f"{REGION}_0123456789ab.parquet"
    gp.write_region(path, a["h3"], a["lat"], a["lng"], a["embedding"], a["status"], "m-1", region=REGION)
    return path, a


def test_round_trip(region_file: tuple[Path, dict]) -> None:
    path, a = region_file
    r = gp.read_region(path, expected_dim=16, check_norm=True)
    ok = a["status"] == "ok"
    assert len(r) == len(a["h3"]) == 343 and r.dim == 16
    np.testing.assert_array_equal(r.h3, a["h3"])
    np.testing.assert_array_equal(r.lat, a["lat"])
    np.testing.assert_array_equal(r.valid, ok)
    np.testing.assert_array_equal(r.embedding[ok], a["embedding"][ok])
    assert not r.embedding[~ok].any()
    assert r.status.to_pylist() == list(a["status"])
    assert r.model_version == "m-1" and r.region == REGION and r.metadata["embedding_dim"] == 16


def test_schema_types(region_file: tuple[Path, dict]) -> None:
    path, a = region_file
    schema = pq.read_schema(path)
    assert schema.field("h3").type == pa.uint64()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 16)
    assert schema.field("geometry").type == pa.binary()
    t = pq.read_table(path)
    assert t.column("h3_str").to_pylist()[:3] == [h3.int_to_str(int(c)) for c in a["h3"][:3]]
    assert t.column("embedding").null_count == int((a["status"] != "ok").sum())


def test_geopandas_reads_it(region_file: tuple[Path, dict]) -> None:
    import geopandas

    path, a = region_file
    g = geopandas.read_parquet(path)
    assert g.crs.to_epsg() == 4326
    np.testing.assert_allclose(g.geometry.x.to_numpy(), a["lng"])
    np.testing.assert_allclose(g.geometry.y.to_numpy(), a["lat"])
    assert g.h3.dtype == np.uint64 and len(g) == 343


def test_duckdb_reads_it(region_file: tuple[Path, dict]) -> None:
    import duckdb

    path, a = region_file
    con = duckdb.connect()
    n, nulls, dim = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE embedding IS NULL), max(len(embedding)) FROM '{path}'"
    ).fetchall()[0]
    assert (n, nulls, dim) == (343, int((a["status"] != "ok").sum()), 16)


def test_write_is_atomic(tmp_path: Path, region_file: tuple[Path, dict]) -> None:
    path, a = region_file
    before = path.read_bytes()
    bad = a["embedding"].copy()
    bad[0] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        gp.write_region(path, a["h3"], a["lat"], a["lng"], bad, "ok", "m-2")
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def _rewrite(path: Path, out: Path, fn) -> Path:
    t = pq.read_table(path)
    pq.write_table(fn(t), out)
    return out


def test_read_errors_name_file_and_problem(tmp_path: Path, region_file: tuple[Path, dict]) -> None:
    path, _ = region_file
    with pytest.raises(DataError, match="does not exist"):
        gp.read_region(tmp_path / "missing.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: not a readable Parquet file"):
        gp.read_region(junk)
    with pytest.raises(DataError, match=r"embedding dimension is 16, expected 8"):
        gp.read_region(path, expected_dim=8)
    no_status = _rewrite(path, tmp_path / "a.parquet", lambda t: t.drop_columns(["status"]))
    with pytest.raises(DataError, match=r"a\.parquet: missing column\(s\) status"):
        gp.read_region(no_status)

    def to_double(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("embedding")
        return t.set_column(i, "embedding", t.column("embedding").cast(pa.list_(pa.float64())))

    with pytest.raises(DataError, match="must be fixed_size_list<float32>"):
        gp.read_region(_rewrite(path, tmp_path / "b.parquet", to_double))

    def duplicate(t: pa.Table) -> pa.Table:
        return pa.concat_tables([t, t.slice(0, 2)])

    with pytest.raises(DataError, match="2 duplicate h3"):
        gp.read_region(_rewrite(path, tmp_path / "c.parquet", duplicate))

    def two_versions(t: pa.Table) -> pa.Table:
        mv = np.array(["m-1"] * t.num_rows, dtype=object)
        mv[5] = "m-2"
        return t.set_column(t.schema.get_field_index("model_version"), "model_version", pa.array(mv, pa.string()))

    with pytest.raises(DataError, match="expected one model_version"):
        gp.read_region(_rewrite(path, tmp_path / "d.parquet", two_versions))
    no_geo = _rewrite(path, tmp_path / "e.parquet", lambda t: t.replace_schema_metadata({}))
    with pytest.raises(DataError, match="'geo' metadata"):
        gp.read_region(no_geo)


def test_write_rejects_bad_shapes(tmp_path: Path) -> None:
    a = region_arrays()
    with pytest.raises(DataError, match="expected h3, lat, lng"):
        gp.write_region(tmp_path / "x.parquet", a["h3"], a["lat"][:-1], a["lng"], a["embedding"], "ok", "m")
    assert not (tmp_path / "x.parquet").exists()
