"""The store against a real PostgreSQL + PostGIS + pgvector: idempotent loads, crashes, exact queries."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import h3
import numpy as np
import psycopg
import pytest
from conftest import start_test_cluster
from test_geoparquet import region_arrays

from vectorgeo import cli, db, h3cells, store
from vectorgeo import geoparquet as gp
from vectorgeo.errors import DatabaseError, DataError, RequestError

pytestmark = pytest.mark.db

MV = "model-a"
R_US = "8027fffffffffff"  # North America, res 0
R_CHUKOTKA = h3.latlng_to_cell(66.0, 179.0, 0)  # crosses the antimeridian
N_R3 = 343  # res-3 children of a res-0 cell (hexagon)
QUERY = store.QuerySettings.from_config(db.settings())  # the default config's


def index_settings(m: int, ef_construction: int, storage: str = "vector") -> store.IndexSettings:
    return store.IndexSettings(
        hnsw_m=m,
        hnsw_ef_construction=ef_construction,
        maintenance_work_mem="64MB",
        hnsw_storage=storage,
        build_workers=0,
    )


def write(tmp_path: Path, region: str = R_US, res: int = 3, dim: int = 16, mv: str = MV, seed: int = 0, **kw) -> Path:
    a = region_arrays(region, res=res, dim=dim, seed=seed)
    status = kw.pop("status", a["status"])
    path = tmp_path / f"{region}_{seed:012x}.parquet"
    gp.write_region(path, a["h3"], a["lat"], a["lng"], a["embedding"], status, mv, region=region, **kw)
    return path


@pytest.fixture
def conn(pg_database):
    with store.connect(pg_database("store")) as c:
        yield c


def distinct_count(conn, mv: str = MV) -> tuple[int, int]:
    t = store.dataset(conn, mv).ident
    return tuple(conn.execute(psycopg.sql.SQL("SELECT count(*), count(DISTINCT h3) FROM {}").format(t)).fetchone())


def test_load_then_reload_same_region(conn, tmp_path: Path) -> None:
    path = write(tmp_path)
    m1 = store.load_region(conn, path)
    assert m1["rows"] == N_R3 and m1["region"] == R_US and m1["model_version"] == MV and m1["dim"] == 16
    assert m1["checksum"] == "sha256:" + store.file_sha256(path) and m1["resolution"] == 3
    m2 = store.load_region(conn, path)
    assert m2["rows"] == m1["rows"]
    assert distinct_count(conn) == (N_R3, N_R3)
    # null embeddings are kept, with their status
    t = store.dataset(conn).ident
    nulls = conn.execute(
        psycopg.sql.SQL("SELECT count(*) FROM {} WHERE embedding IS NULL AND status = 'nodata'").format(t)
    ).fetchone()[0]
    assert nulls == int((region_arrays()["status"] != "ok").sum()) > 0


def test_reload_replaces_only_that_region(conn, tmp_path: Path) -> None:
    store.load_region(conn, write(tmp_path, R_US))
    store.load_region(conn, write(tmp_path, R_CHUKOTKA))
    a = region_arrays(R_US, res=3, seed=1)
    keep = slice(0, 100)
    smaller = tmp_path / f"{R_US}_smaller.parquet"
    gp.write_region(smaller, a["h3"][keep], a["lat"][keep], a["lng"][keep], a["embedding"][keep], "ok", MV, region=R_US)
    store.load_region(conn, smaller)
    assert store.count(conn, R_US) == 100
    assert store.count(conn, R_CHUKOTKA) == N_R3
    cell = store.get_cell(conn, int(a["h3"][0]))
    assert cell is not None
    np.testing.assert_allclose(cell["embedding"], a["embedding"][0], rtol=1e-6)
    assert cell["region"] == R_US and cell["model_version"] == MV and cell["status"] == "ok"
    assert store.get_cell(conn, int(a["h3"][200])) is None  # dropped by the reload
    regions = dict(conn.execute("SELECT region, rows FROM vectorgeo_regions").fetchall())
    assert regions == {int(R_US, 16): 100, int(R_CHUKOTKA, 16): N_R3}


LOADER = "import sys; from vectorgeo import store; store.load_region(store.connect(sys.argv[1]), sys.argv[2])"


def _pause_mid_copy(url: str, path: Path, table: str) -> subprocess.Popen:
    """Start a loader that stops in the middle of its COPY, and return once it is there.

    A row trigger (test only) sleeps on the middle row of the file, after the DELETE of the old rows and
    half of the new rows went in; pg_stat_progress_copy confirms that rows were copied.
    """
    cells = gp.read_region(path).h3
    ok = np.flatnonzero(gp.read_region(path).valid)
    middle = int(cells[ok[ok.size // 2]])
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(
            "CREATE OR REPLACE FUNCTION vg_test_pause() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.h3 = {middle} THEN PERFORM pg_sleep(3); END IF; RETURN NEW; END $$"
        )
        c.execute(
            psycopg.sql.SQL(
                "CREATE TRIGGER vg_test_pause BEFORE INSERT ON {} FOR EACH ROW EXECUTE FUNCTION vg_test_pause()"
            ).format(psycopg.sql.Identifier(table))
        )
    proc = subprocess.Popen([sys.executable, "-c", LOADER, url, str(path)])
    deadline = time.monotonic() + 60
    with psycopg.connect(url, autocommit=True) as watcher:
        while time.monotonic() < deadline:
            copied = watcher.execute(
                "SELECT p.tuples_processed FROM pg_stat_activity a JOIN pg_stat_progress_copy p USING (pid) "
                "WHERE a.wait_event = 'PgSleep' AND a.query LIKE 'COPY%%'"
            ).fetchone()
            if copied:
                assert copied[0] > 0
                return proc
            assert proc.poll() is None, "the loader ended before pausing in its COPY"
            time.sleep(0.05)
    raise AssertionError("the loader never paused in its COPY")


def _drop_pause(url: str, table: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(psycopg.sql.SQL("DROP TRIGGER vg_test_pause ON {}").format(psycopg.sql.Identifier(table)))


def test_killed_loader_leaves_no_half_region(pg_database, tmp_path: Path) -> None:
    url = pg_database("kill")
    first = write(tmp_path, seed=0)
    with store.connect(url) as c:
        store.load_region(c, first)
        table = store.dataset(c).table
    second = write(tmp_path, seed=2)  # the same cells with other embeddings
    proc = _pause_mid_copy(url, second, table)
    proc.kill()
    proc.wait()
    # after the pause the server reads the rest of the COPY from a closed socket and rolls back
    with psycopg.connect(url, autocommit=True) as c:
        deadline = time.monotonic() + 30
        while c.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%%'").fetchone()[0]:
            assert time.monotonic() < deadline, "the loader's backend never ended"
            time.sleep(0.1)
    _drop_pause(url, table)
    with store.connect(url) as c:
        # the killed load's transaction is rolled back: the old rows, all of them, only them
        assert distinct_count(c) == (N_R3, N_R3)
        q = store.get_cell(c, int(region_arrays()["h3"][1]))
        np.testing.assert_allclose(q["embedding"], region_arrays(seed=0)["embedding"][1], rtol=1e-6)
        store.load_region(c, second)
        assert distinct_count(c) == (N_R3, N_R3)
        q = store.get_cell(c, int(region_arrays()["h3"][1]))
        np.testing.assert_allclose(q["embedding"], region_arrays(seed=2)["embedding"][1], rtol=1e-6)


def test_killed_server_mid_load_then_rerun(tmp_path: Path) -> None:
    cluster = start_test_cluster("vectorgeo-crash-")
    try:
        url = cluster.url()
        us, chukotka = write(tmp_path, R_US), write(tmp_path, R_CHUKOTKA)
        with store.connect(url) as c:
            store.load_region(c, us)
            table = store.dataset(c).table
        proc = _pause_mid_copy(url, chukotka, table)
        cluster.kill()
        assert proc.wait(timeout=60) != 0
        cluster.start()
        _drop_pause(url, table)
        with store.connect(url) as c:
            assert store.count(c, R_CHUKOTKA) == 0
            assert distinct_count(c) == (N_R3, N_R3)
            store.load_region(c, chukotka)
            assert store.count(c, R_CHUKOTKA) == N_R3
            assert distinct_count(c) == (2 * N_R3, 2 * N_R3)
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(cluster.home, ignore_errors=True)


def geodesic_m(lat0: float, lng0: float, lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
    from pyproj import Geod

    _, _, d = Geod(ellps="WGS84").inv(np.full_like(lng, lng0), np.full_like(lat, lat0), lng, lat)
    return np.asarray(d)


def brute_force(a: dict, valid: np.ndarray, q: np.ndarray, mask: np.ndarray, k: int) -> list[int]:
    emb = a["embedding"] / np.linalg.norm(a["embedding"], axis=1, keepdims=True)
    sim = emb @ (q / np.linalg.norm(q))
    sim[~(mask & valid)] = -np.inf
    order = np.argsort(-sim, kind="stable")[:k]
    return [int(a["h3"][i]) for i in order if np.isfinite(sim[i])]


@pytest.fixture(params=["vector", "halfvec"])
def small_table(conn, tmp_path: Path, request: pytest.FixtureRequest):
    """Two regions at res 4 (2 × 2401 cells), indexed, the HNSW index on float32 or on float16 embeddings."""
    arrays = {}
    for i, region in enumerate((R_US, R_CHUKOTKA)):
        path = write(tmp_path, region, res=4, seed=10 + i)
        store.load_region(conn, path)
        arrays[region] = region_arrays(region, res=4, seed=10 + i)
    store.build_indexes(conn, index_settings(8, 32, request.param))
    assert store.dataset(conn).hnsw_storage == request.param
    merged = {k: np.concatenate([arrays[r][k] for r in arrays]) for k in arrays[R_US]}
    return conn, merged


@pytest.mark.parametrize("method", ["auto", "exact", "index"])
def test_radius_query_equals_brute_force(small_table, method: str) -> None:
    conn, a = small_table
    valid = a["status"] == "ok"
    rng = np.random.default_rng(3)
    checked = 0
    for i in rng.choice(np.flatnonzero(valid), 6, replace=False):
        dist = geodesic_m(a["lat"][i], a["lng"][i], a["lat"], a["lng"])
        for radius in (150e3, 400e3, 1200e3):
            if np.min(np.abs(dist - radius)) < 1.0:  # too close to call between two geodesic solvers
                radius += 5.0
            mask = (dist <= radius) & (np.arange(len(dist)) != i)
            expected = brute_force(a, valid, a["embedding"][i], mask, 10)
            got = store.similar(conn, QUERY, h3=int(a["h3"][i]), k=10, radius_m=radius, method=method)
            got_h3 = [r["h3"] for r in got]
            if method == "index":  # approximate by design: near-exact
                assert len(set(got_h3) & set(expected)) >= 0.9 * len(expected)
            else:
                assert got_h3 == expected
                sims = [r["similarity"] for r in got]
                assert sims == sorted(sims, reverse=True)
            got_dist = geodesic_m(
                a["lat"][i], a["lng"][i], np.array([r["lat"] for r in got]), np.array([r["lng"] for r in got])
            )
            assert (got_dist <= radius + 1.0).all()
            checked += 1
    assert checked == 18


def test_bbox_and_vector_queries_equal_brute_force(small_table) -> None:
    conn, a = small_table
    valid = a["status"] == "ok"
    q = np.random.default_rng(5).normal(size=16).astype(np.float32)
    for bbox in ((-110.0, 35.0, -90.0, 50.0), (170.0, 55.0, -170.0, 75.0)):
        w, s, e, n = bbox
        in_lng = (a["lng"] >= w) & (a["lng"] <= e) if w < e else (a["lng"] >= w) | (a["lng"] <= e)
        mask = in_lng & (a["lat"] >= s) & (a["lat"] <= n)
        assert mask.sum() > 20
        got = store.similar(conn, QUERY, vector=q, k=15, bbox=bbox)
        assert [r["h3"] for r in got] == brute_force(a, valid, q, mask, 15)
    # no filter: the HNSW index, near-exact on 4802 rows
    got = store.similar(conn, QUERY, vector=q, k=10)
    assert len(set(r["h3"] for r in got) & set(brute_force(a, valid, q, np.ones_like(valid), 10))) >= 9
    # the query cell itself: excluded by default, first with similarity 1 when included
    i = int(np.flatnonzero(valid)[0])
    assert int(a["h3"][i]) not in [r["h3"] for r in store.similar(conn, QUERY, h3=int(a["h3"][i]), k=5)]
    top = store.similar(conn, QUERY, h3=h3.int_to_str(int(a["h3"][i])), k=5, exclude_self=False, method="exact")[0]
    assert top["h3"] == int(a["h3"][i]) and top["similarity"] == pytest.approx(1.0, abs=1e-6)
    # a point query uses the cell containing the point
    by_point = store.similar_to_point(conn, QUERY, a["lat"][i], a["lng"][i], k=5, method="exact")
    assert by_point == store.similar(conn, QUERY, h3=int(a["h3"][i]), k=5, method="exact")
    assert store.resolution(conn) == 4


def test_index_path_ranks_the_query_cells_neighbourhood_exactly(small_table) -> None:
    """On the HNSW path of a query by cell, the cells around the query cell (database.local_exact_rings)
    are ranked exactly beside the index's candidates, under the same filter: with an index scan cut
    short (10 tuples), the answer is still the exact one within a radius the rings cover."""
    from dataclasses import replace

    conn, a = small_table
    valid = a["status"] == "ok"
    short_scan = replace(QUERY, ef_search=10, max_scan_tuples=10)
    rng = np.random.default_rng(11)
    for i in rng.choice(np.flatnonzero(valid), 5, replace=False):
        dist = geodesic_m(a["lat"][i], a["lng"][i], a["lat"], a["lng"])
        mask = (dist <= 100e3) & (np.arange(len(dist)) != i)
        expected = brute_force(a, valid, a["embedding"][i], mask, 10)
        got = store.similar(
            conn, replace(short_scan, local_rings=5), h3=int(a["h3"][i]), k=10, radius_m=100e3, method="index"
        )
        assert [r["h3"] for r in got] == expected
        # the rings reach beyond the radius: nothing outside it comes back, nor the query cell
        ring = set(h3cells.disk(int(a["h3"][i]), 5))
        assert len(ring) > mask.sum() and int(a["h3"][i]) not in [r["h3"] for r in got]
        # a bbox cutting through the rings filters them too
        lat, lng = a["lat"][i], a["lng"][i]
        box = (lng - 2.0, lat - 2.0, lng + 2.0, lat)
        boxed = store.similar(
            conn, replace(short_scan, local_rings=5), h3=int(a["h3"][i]), k=10, bbox=box, method="index"
        )
        assert all(r["lat"] <= lat + 1e-9 and abs(r["lng"] - lng) <= 2.0 for r in boxed)


def test_build_indexes_is_idempotent_and_follows_params(small_table) -> None:
    conn, _ = small_table
    table = store.dataset(conn).table

    def hnsw() -> list[str]:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s AND indexdef LIKE '%%hnsw%%'", (table,)
        )
        return [r[0] for r in rows]

    storage = store.dataset(conn).hnsw_storage
    half = "_half" if storage == "halfvec" else ""
    assert hnsw() == [f"{table}_hnsw{half}_m8_ef32"]
    store.build_indexes(conn, index_settings(8, 32, storage))
    assert hnsw() == [f"{table}_hnsw{half}_m8_ef32"]
    s = store.build_indexes(conn, index_settings(12, 40, storage))
    assert hnsw() == [f"{table}_hnsw{half}_m12_ef40"] and s["rows"] == 2 * 2401
    assert s["hnsw_storage"] == storage and s["hnsw_bytes"] > 0
    # the other storage replaces the index, and the catalog records which one queries must order by
    other = "vector" if storage == "halfvec" else "halfvec"
    store.build_indexes(conn, index_settings(12, 40, other))
    assert hnsw() == [f"{table}_hnsw{'_half' if other == 'halfvec' else ''}_m12_ef40"]
    assert store.dataset(conn).hnsw_storage == other


def test_index_path_scans_the_hnsw_index(small_table) -> None:
    """The index path orders by the expression the HNSW index is built on (float32 or float16), so the
    planner uses the index; the candidates are re-ranked with the float32 embeddings."""
    from psycopg import sql

    from vectorgeo.store.indexes import hnsw_index_name
    from vectorgeo.store.query import _index_sql

    conn, a = small_table
    ds = store.dataset(conn)
    q = a["embedding"][0] / np.linalg.norm(a["embedding"][0])
    with conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = conn.execute(
            sql.SQL("EXPLAIN ") + _index_sql(ds, sql.SQL("embedding IS NOT NULL")), {"q": q, "k": 10, "candidates": 100}
        ).fetchall()
    text = "\n".join(r[0] for r in plan)
    assert hnsw_index_name(ds, index_settings(8, 32, ds.hnsw_storage)) in text, text
    got = store.similar(conn, QUERY, vector=q, k=10, method="index")
    sims = [r["similarity"] for r in got]
    assert sims == sorted(sims, reverse=True) and len(got) == 10
    row = {int(c): i for i, c in enumerate(a["h3"])}
    emb = a["embedding"] / np.linalg.norm(a["embedding"], axis=1, keepdims=True)
    for r in got:  # float32 similarities (float16 ones are off by ~1e-3)
        assert r["similarity"] == pytest.approx(float(emb[row[r["h3"]]] @ q), abs=2e-6)


HOSTILE = [
    "'; DROP TABLE vectorgeo_datasets; --",
    'x" OR "1"="1',
    "\\N",
    "tab\there\nnewline",
    "Robert'); DROP TABLE students;--",
    "%s %(k)s {}",
    "ünï©ødé ✓",
]


def test_hostile_strings_are_data(conn, tmp_path: Path) -> None:
    mv = HOSTILE[0]
    n = N_R3
    status = np.array([HOSTILE[i % len(HOSTILE)] if i % 5 else "ok" for i in range(n)], dtype=object)
    path = write(tmp_path, mv=mv, status=status, valid=np.ones(n, bool))
    store.load_region(conn, path)
    assert store.dataset(conn).model_version == mv
    t = store.dataset(conn).ident
    got = sorted(conn.execute(psycopg.sql.SQL("SELECT DISTINCT status FROM {}").format(t)).fetchall())
    assert got == sorted((s,) for s in {*HOSTILE, "ok"})
    cell = int(region_arrays()["h3"][0])
    for bad in [*HOSTILE, "8027fffffffffff' OR 1=1 --", "0x8027fffffffffff"]:
        with pytest.raises(RequestError, match="h3"):
            store.similar(conn, QUERY, h3=bad)
        with pytest.raises(RequestError, match="h3"):
            store.get_cell(conn, bad)
    with pytest.raises(RequestError, match="'k'"):
        store.similar(conn, QUERY, h3=cell, k="10; DROP TABLE x")  # type: ignore[arg-type]
    with pytest.raises(RequestError, match="'bbox'"):
        store.similar(conn, QUERY, h3=cell, bbox=("0", "0", "1", "1); DROP TABLE x; --"))
    with pytest.raises(RequestError, match="radius_m"):
        store.similar(conn, QUERY, h3=cell, radius_m="1e3 OR 1=1")
    with pytest.raises(DatabaseError, match="holds no model_version"):
        store.similar(conn, QUERY, h3=cell, model_version="x' OR '1'='1")
    assert store.similar(conn, QUERY, h3=cell, k=3, model_version=mv)
    assert conn.execute("SELECT count(*) FROM vectorgeo_datasets").fetchone()[0] == 1


def test_unreachable_url_masks_password() -> None:
    url = "postgresql://vg:s3cr3t-pw@127.0.0.1:1/vectorgeo"
    with pytest.raises(DatabaseError) as e:
        store.connect(url, connect_timeout=3)
    msg = str(e.value)
    assert "postgresql://vg:***@127.0.0.1:1/vectorgeo" in msg and "s3cr3t-pw" not in msg


def test_wrong_dimension_writes_nothing(conn, tmp_path: Path) -> None:
    store.load_region(conn, write(tmp_path, R_US, dim=16))
    before = conn.execute("SELECT region, rows, checksum FROM vectorgeo_regions ORDER BY region").fetchall()
    for region in (R_US, R_CHUKOTKA):  # replacing a loaded region, or adding one
        path = write(tmp_path, region, dim=8, seed=7)
        with pytest.raises(DataError, match=r"embedding dimension 8 does not match .* vector\(16\)"):
            store.load_region(conn, path)
    assert distinct_count(conn) == (N_R3, N_R3)
    assert store.count(conn, R_CHUKOTKA) == 0
    assert conn.execute("SELECT region, rows, checksum FROM vectorgeo_regions ORDER BY region").fetchall() == before


def test_query_errors_are_clear(small_table) -> None:
    conn, a = small_table
    null_cell = int(a["h3"][np.flatnonzero(a["status"] != "ok")[0]])
    with pytest.raises(RequestError, match="has no embedding"):
        store.similar(conn, QUERY, h3=null_cell)
    absent = h3.str_to_int(h3.latlng_to_cell(-30.0, 20.0, 4))
    with pytest.raises(RequestError, match="not in the database"):
        store.similar(conn, QUERY, h3=absent)
    with pytest.raises(RequestError, match="16 numbers"):
        store.similar(conn, QUERY, vector=[1.0, 2.0])
    with pytest.raises(RequestError, match="center"):
        store.similar(conn, QUERY, vector=np.ones(16), radius_m=1000)
    with pytest.raises(RequestError, match="exactly one"):
        store.similar(conn, QUERY)


def test_cli_query(small_table, pg_cluster, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    conn, a = small_table
    monkeypatch.setenv(db.ENV_URL, conn.info.dsn + f" host={pg_cluster.home}")
    i = int(np.flatnonzero(a["status"] == "ok")[3])
    cell = h3.int_to_str(int(a["h3"][i]))
    assert cli.main(["query", "--h3", cell, "-k", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 11 and lines[0].split()[:2] == ["rank", "h3"]
    assert (
        cli.main(
            ["query", "--lat", str(a["lat"][i]), "--lng", str(a["lng"][i]), "-k", "3", "--radius-km", "500", "--json"]
        )
        == 0
    )
    import json

    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and all(isinstance(r["h3"], str) for r in rows)
    assert cli.main(["query", "--h3", "nonsense"]) == 2
    assert "parameter 'h3'" in capsys.readouterr().err


def test_regions_load_concurrently(pg_database, tmp_path: Path) -> None:
    """No global lock during a region's COPY: a region loads while another region's transaction is open,
    loads from several threads at once give every row once, and a reload of a region waits for its
    previous load instead of duplicating it."""
    import threading

    url = pg_database("parallel")
    regions = [c for c in h3.get_res0_cells() if not h3.is_pentagon(c)][:6]
    paths = [write(tmp_path, region=r, seed=i) for i, r in enumerate(regions)]
    with store.connect(url) as c:
        store.load_region(c, paths[0])  # creates the dataset
        table = store.dataset(c).table
    proc = _pause_mid_copy(url, paths[1], table)
    try:
        with store.connect(url) as c:
            c.execute("SET lock_timeout = '2s'")  # behind a global lock, this load would time out
            store.load_region(c, paths[2])
            assert proc.poll() is None  # the other region's COPY is still under way
            assert store.count(c) == 2 * N_R3  # its rows are not visible before its commit
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        _drop_pause(url, table)
    with store.connect(url) as c:
        assert store.count(c) == 3 * N_R3

    errors: list[BaseException] = []

    def load(path: Path) -> None:
        try:
            with store.connect(url) as conn:
                store.load_region(conn, path)
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    # every region at once, each twice (a rerun while the first load may still be running)
    threads = [threading.Thread(target=load, args=(p,)) for p in [*paths, *paths]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    with store.connect(url) as conn:
        assert distinct_count(conn) == (len(regions) * N_R3, len(regions) * N_R3)
        for r in regions:
            assert store.count(conn, r) == N_R3
