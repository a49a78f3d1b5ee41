"""API tests against a real PostgreSQL (PostGIS + pgvector) holding a small synthetic dataset.

The dataset goes through the real writer and loader (geoparquet.write_region → store.load_region):
every H3 resolution-5 cell of a 10° × 6° box over the Alps, with 16-d unit embeddings that vary smoothly
with position, and every 97th cell unusable (status 'nodata', null embedding). Expected answers are
computed here with numpy from the same arrays.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import h3
import numpy as np
import psycopg
import pytest

from vectorgeo.api import ServeSettings, serve_settings

pytestmark = pytest.mark.db

RES = 5
BBOX = (5.0, 44.0, 15.0, 50.0)
DIM = 16
VERSION = "synthetic-api-v1"
EARTH_RADIUS_M = 6_371_008.8


@dataclass
class Synthetic:
    """The loaded arrays (sorted by h3)."""

    url: str
    h3: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    embedding: np.ndarray
    valid: np.ndarray

    def index(self, cell: str) -> int:
        return int(np.searchsorted(self.h3, np.uint64(int(cell, 16))))

    def brute_similar(
        self, cell: str, k: int, radius_m: float | None = None, center: tuple[float, float] | None = None
    ) -> list[tuple[str, float]]:
        """Exact answer: cosine similarity over valid cells (not the query) within the radius."""
        i = self.index(cell)
        sim = self.embedding @ self.embedding[i]
        keep = self.valid.copy()
        keep[i] = False
        if radius_m is not None:
            clat, clng = center if center is not None else (self.lat[i], self.lng[i])
            keep &= haversine(clat, clng, self.lat, self.lng) <= radius_m
        idx = np.flatnonzero(keep)
        order = idx[np.argsort(-sim[idx], kind="stable")][:k]
        return [(f"{int(self.h3[j]):015x}", float(sim[j])) for j in order]


def haversine(lat1: float, lng1: float, lat2: np.ndarray, lng2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(lng2 - lng1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(a))


def make_synthetic(
    folder: Path, bbox: tuple[float, float, float, float] = BBOX, res: int = RES, dim: int = DIM, seed: int = 7
) -> tuple[list[Path], dict[str, np.ndarray]]:
    """Write the synthetic region files (one per resolution-0 region) with the real GeoParquet writer."""
    from vectorgeo import geoparquet

    w, s, e, n = bbox
    poly = h3.LatLngPoly([(s, w), (s, e), (n, e), (n, w)])
    cells = np.array(sorted(h3.str_to_int(c) for c in h3.polygon_to_cells(poly, res)), dtype=np.uint64)
    ll = np.array([h3.cell_to_latlng(f"{int(c):015x}") for c in cells])
    lat, lng = ll[:, 0], ll[:, 1]
    rng = np.random.default_rng(seed)
    freq = rng.normal(size=(dim, 2)) * 0.5
    phase = rng.uniform(0, 2 * np.pi, dim)
    emb = np.sin(lat[:, None] * freq[:, 0] + lng[:, None] * freq[:, 1] + phase).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    valid = np.arange(cells.size) % 97 != 5
    status = np.where(valid, "ok", "nodata")
    regions = np.array([h3.str_to_int(h3.cell_to_parent(f"{int(c):015x}", 0)) for c in cells], dtype=np.uint64)
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for r in np.unique(regions):
        m = regions == r
        p = folder / f"{int(r):015x}_{'0' * 12}.parquet"
        geoparquet.write_region(
            p, cells[m], lat[m], lng[m], emb[m], status[m], VERSION, valid=valid[m], region=f"{int(r):015x}"
        )
        paths.append(p)
    arrays = {"h3": cells, "lat": lat, "lng": lng, "embedding": emb, "valid": valid}
    return paths, arrays


def load_synthetic(pg_cluster, folder: Path, **kw) -> Synthetic:
    """A new database in the session cluster with the synthetic dataset loaded and indexed."""
    from vectorgeo import db, store

    name = f"api_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = db.Cluster(home=pg_cluster.home, port=pg_cluster.port, dbname=name).url()
    paths, arrays = make_synthetic(folder, **kw)
    with store.connect(url) as conn:
        for p in paths:
            store.load_region(conn, p)
        store.build_indexes(conn, store.IndexSettings.from_config(db.settings()))
    return Synthetic(url=url, **arrays)


def serve_with(**changes) -> ServeSettings:
    """The default config's ``serve`` settings with some changed."""
    return ServeSettings.from_config({**serve_settings(), **changes})


MAX_FEATURES = serve_with().tile_max_features


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def synthetic(pg_cluster, tmp_path_factory) -> Synthetic:
    return load_synthetic(pg_cluster, tmp_path_factory.mktemp("api-regions"))


@pytest.fixture(scope="module")
def client(synthetic):
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    with TestClient(create_app(synthetic.url, serve=serve_with(default_k=25, default_radius_km=300))) as c:
        yield c


def a_valid_cell(s: Synthetic, near: tuple[float, float] = (47.0, 10.0)) -> str:
    d = haversine(near[0], near[1], s.lat, s.lng)
    d[~s.valid] = np.inf
    return f"{int(s.h3[int(np.argmin(d))]):015x}"


# --- health, meta -----------------------------------------------------------------------------------------
def test_healthz(client, synthetic):
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["model_version"] == VERSION
    assert body["cells"] == synthetic.h3.size


def test_meta(client, synthetic):
    body = client.get("/meta").json()
    assert body["resolution"] == RES
    assert body["cells"] == int(synthetic.valid.sum())
    w, s, e, n = body["bounds"]
    assert BBOX[0] - 0.5 < w < e < BBOX[2] + 0.5 and BBOX[1] - 0.5 < s < n < BBOX[3] + 0.5
    assert body["default_k"] == 25 and body["default_radius_km"] == 300
    assert body["max_k"] == 1000 and body["max_radius_m"] == 5_000_000


# --- cells, point ----------------------------------------------------------------------------------------
def test_cell(client, synthetic):
    cell = a_valid_cell(synthetic)
    i = synthetic.index(cell)
    r = client.get(f"/cells/{cell}")
    assert r.status_code == 200
    body = r.json()
    assert body["h3"] == cell and body["status"] == "ok" and body["resolution"] == RES
    assert body["model_version"] == VERSION
    np.testing.assert_allclose(body["embedding"], synthetic.embedding[i], rtol=1e-6, atol=1e-7)
    assert body["lat"] == pytest.approx(synthetic.lat[i]) and body["lng"] == pytest.approx(synthetic.lng[i])
    ring = np.array(body["boundary"])
    assert ring.shape == (6, 2)
    # the centre lies inside the hexagon's lng/lat extent
    assert ring[:, 0].min() < body["lng"] < ring[:, 0].max() and ring[:, 1].min() < body["lat"] < ring[:, 1].max()
    # upper-case hex is the same cell
    assert client.get(f"/cells/{cell.upper()}").json()["h3"] == cell


def test_cell_without_embedding(client, synthetic):
    j = int(np.flatnonzero(~synthetic.valid)[0])
    body = client.get(f"/cells/{int(synthetic.h3[j]):015x}").json()
    assert body["status"] == "nodata" and body["embedding"] is None


def test_cell_not_loaded(client):
    outside = h3.latlng_to_cell(0.0, 0.0, RES)
    r = client.get(f"/cells/{outside}")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found" and "h3" in r.json()["message"]


def test_point(client, synthetic):
    lat, lng = 46.5, 8.25
    r = client.get("/point", params={"lat": lat, "lng": lng})
    assert r.status_code == 200
    body = r.json()
    assert body["h3"] == h3.latlng_to_cell(lat, lng, RES)
    assert body["query_lat"] == lat and body["query_lng"] == lng
    assert len(body["embedding"]) == DIM
    assert client.get("/point", params={"lat": 0, "lng": 0}).status_code == 404


# --- similar, search ------------------------------------------------------------------------------------
def test_similar_matches_brute_force(client, synthetic):
    cell = a_valid_cell(synthetic, (46.0, 9.0))
    r = client.get("/similar", params={"h3": cell, "k": 20, "radius_m": 150_000})
    assert r.status_code == 200
    body = r.json()
    assert body["query"]["h3"] == cell and body["k"] == 20 and body["radius_m"] == 150_000
    got = [(x["h3"], x["similarity"]) for x in body["results"]]
    want = synthetic.brute_similar(cell, 20, 150_000)
    assert [g[0] for g in got] == [w[0] for w in want]
    np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-5)
    assert all("boundary" not in x or x["boundary"] is None for x in body["results"])


def test_similar_unfiltered_and_boundary(client, synthetic):
    cell = a_valid_cell(synthetic)
    body = client.get("/similar", params={"h3": cell, "k": 5, "boundary": "true"}).json()
    assert [x["h3"] for x in body["results"]] == [w[0] for w in synthetic.brute_similar(cell, 5)]
    assert all(len(x["boundary"]) == 6 for x in body["results"])


def test_similar_bbox(client, synthetic):
    cell = a_valid_cell(synthetic)
    box = (9.0, 46.0, 11.0, 48.0)
    body = client.get("/similar", params={"h3": cell, "k": 50, "bbox": ",".join(map(str, box))}).json()
    assert body["bbox"] == list(box)
    assert len(body["results"]) == 50
    for x in body["results"]:
        assert box[0] <= x["lng"] <= box[2] and box[1] <= x["lat"] <= box[3]
    sims = [x["similarity"] for x in body["results"]]
    assert sims == sorted(sims, reverse=True)


def test_search_lambda_shape(client, synthetic):
    lat, lon = 47.3, 8.5
    req = {"lat": lat, "lon": lon, "circleRadiusMeters": 200_000, "limit": 15}
    r = client.post("/search", json=req)
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"locations", "scores"}
    assert len(body["locations"]) == len(body["scores"]) == 15
    assert all(set(loc) == {"lat", "lon", "h3"} for loc in body["locations"])
    query = h3.latlng_to_cell(lat, lon, RES)
    want = synthetic.brute_similar(query, 15, 200_000, center=(lat, lon))
    assert [loc["h3"] for loc in body["locations"]] == [w[0] for w in want]
    np.testing.assert_allclose(body["scores"], [w[1] for w in want], atol=1e-5)
    for loc in body["locations"]:
        assert haversine(lat, lon, np.array(loc["lat"]), np.array(loc["lon"])) <= 200_000


def test_search_with_h3(client, synthetic):
    cell = a_valid_cell(synthetic, (45.0, 12.0))
    lat, lon = 46.0, 11.0  # the circle need not be centred on the query cell
    body = client.post(
        "/search", json={"lat": lat, "lon": lon, "h3": cell, "circleRadiusMeters": 120_000, "limit": 8}
    ).json()
    want = synthetic.brute_similar(cell, 8, 120_000, center=(lat, lon))
    assert [loc["h3"] for loc in body["locations"]] == [w[0] for w in want]


def test_search_from_memory_and_from_the_database_agree(client, synthetic, monkeypatch):
    """With the embeddings in memory, POST /search is answered from them without a database connection;
    without, by the database: the same cells, in the same order, as the exact numpy answer."""
    state = client.app.state.vectorgeo
    cases = [((47.3, 8.5, None), 200_000, 15), ((45.2, 6.1, None), 60_000, 5), ((46.0, 11.0, "q"), 150_000, 30)]
    bodies = []
    for (lat, lon, with_cell), radius, k in cases:
        body = {"lat": lat, "lon": lon, "circleRadiusMeters": radius, "limit": k}
        if with_cell:
            body["h3"] = a_valid_cell(synthetic, (45.0, 12.0))
        bodies.append(body)

    def answers() -> list[list[str]]:
        out = []
        for body in bodies:
            r = client.post("/search", json=body)
            assert r.status_code == 200, r.text
            out.append([loc["h3"] for loc in r.json()["locations"]])
        return out

    monkeypatch.setattr(state.scores, "_snapshot", None)  # not in memory: the database answers
    from_database = answers()
    assert client.get("/healthz").json()["embeddings_in_memory"] == 0
    assert state.scores.vectors().model_version == VERSION  # read them (as the start-up warm-up does)
    assert client.get("/healthz").json()["embeddings_in_memory"] == int(synthetic.valid.sum())
    assert state.vectors_in_memory() is not None  # of the active dataset, whose metadata is now fresh

    def no_database():
        raise AssertionError("the database was asked")

    monkeypatch.setattr(state, "connection", no_database)
    from_memory = answers()
    for body, db_cells, mem_cells in zip(bodies, from_database, from_memory, strict=True):
        query = body.get("h3") or h3.latlng_to_cell(body["lat"], body["lon"], RES)
        want = synthetic.brute_similar(query, body["limit"], body["circleRadiusMeters"], (body["lat"], body["lon"]))
        assert db_cells == mem_cells == [w[0] for w in want]


def test_serve_with_worker_processes(synthetic, tmp_path):
    """``vectorgeo serve --workers 2``: two uvicorn worker processes on one port, each with the config's
    settings and the embeddings in memory, answer POST /search as one server does."""
    import os
    import signal
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "serve.yaml"
    root = Path(__file__).resolve().parents[1]
    config.write_text((root / "config" / "config.yaml").read_text() + "\nserve:\n  default_k: 4\n")
    exe = Path(sys.executable).with_name("vectorgeo")
    env = {**os.environ, "VECTORGEO_DATABASE_URL": synthetic.url}
    cmd = [str(exe), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = 0
        while ready < 10:  # ten answers in a row, on new connections: both workers have read the embeddings
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read() if server.stderr else ""
            try:
                health = httpx.get(f"{base}/healthz", timeout=5).json()
                ready = ready + 1 if health.get("embeddings_in_memory", 0) == int(synthetic.valid.sum()) else 0
            except httpx.HTTPError:
                ready = 0
            time.sleep(0.1)
        import psutil

        assert len(psutil.Process(server.pid).children(recursive=True)) >= 2
        body = {"lat": 47.3, "lon": 8.5, "circleRadiusMeters": 200_000, "limit": 15}
        want = synthetic.brute_similar(h3.latlng_to_cell(47.3, 8.5, RES), 15, 200_000, (47.3, 8.5))
        for _ in range(6):
            got = httpx.post(f"{base}/search", json=body, timeout=30).json()
            assert [loc["h3"] for loc in got["locations"]] == [w[0] for w in want]
        assert httpx.get(f"{base}/meta", timeout=30).json()["default_k"] == 4
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_search_ocean_point_is_404(client):
    r = client.post("/search", json={"lat": 0.0, "lon": -30.0, "circleRadiusMeters": 1000, "limit": 3})
    assert r.status_code == 404 and "not loaded" in r.json()["message"]


# --- bad input -------------------------------------------------------------------------------------------
CELL = "851f8bcffffffff"


@pytest.mark.parametrize(
    ("method", "url", "payload", "param"),
    [
        ("GET", "/cells/zzzzzzzzzzzzzzz", None, "h3"),
        ("GET", "/cells/8f1f8bcffffffff", None, "h3"),  # hex but not a cell
        ("GET", "/cells/831f8bfffffffff", None, "h3"),  # a cell of another resolution
        ("GET", "/similar?h3=123", None, "h3"),
        ("GET", f"/similar?h3={CELL}&k=1001", None, "k"),
        ("GET", f"/similar?h3={CELL}&k=0", None, "k"),
        ("GET", f"/similar?h3={CELL}&k=ten", None, "k"),
        ("GET", f"/similar?h3={CELL}&radius_m=-5", None, "radius_m"),
        ("GET", f"/similar?h3={CELL}&radius_m=5000001", None, "radius_m"),
        ("GET", f"/similar?h3={CELL}&radius_m=nan", None, "radius_m"),
        ("GET", f"/similar?h3={CELL}&bbox=1,2,3", None, "bbox"),
        ("GET", f"/similar?h3={CELL}&bbox=10,50,12,40", None, "bbox"),
        ("GET", f"/similar?h3={CELL}&bbox=-200,40,12,50", None, "bbox"),
        ("GET", "/similar", None, "h3"),
        ("GET", "/point?lat=91&lng=0", None, "lat"),
        ("GET", "/point?lat=0&lng=-181", None, "lng"),
        ("GET", "/point?lat=abc&lng=0", None, "lat"),
        ("GET", "/tiles/23/0/0.pbf", None, "z"),
        ("GET", "/tiles/2/4/0.pbf", None, "x"),
        ("GET", "/tiles/2/0/-1.pbf", None, "y"),
        ("POST", "/search", {"lat": 91, "lon": 0, "circleRadiusMeters": 1000}, "lat"),
        ("POST", "/search", {"lat": 0, "lon": 190, "circleRadiusMeters": 1000}, "lon"),
        ("POST", "/search", {"lat": 0, "lon": 0, "circleRadiusMeters": -1}, "circleRadiusMeters"),
        ("POST", "/search", {"lat": 0, "lon": 0, "circleRadiusMeters": 6e6}, "circleRadiusMeters"),
        ("POST", "/search", {"lat": 0, "lon": 0, "circleRadiusMeters": 1000, "limit": 5000}, "limit"),
        ("POST", "/search", {"lat": 0, "lon": 0, "h3": "nothex", "circleRadiusMeters": 1000}, "h3"),
        ("POST", "/search", {"lat": 0, "lon": 0, "h3": "8f1f8bcffffffff", "circleRadiusMeters": 1000}, "h3"),
        ("POST", "/search", {"lon": 0, "circleRadiusMeters": 1000}, "lat"),
        ("POST", "/search", b"{not json", "body"),
        ("POST", "/search", b"\xff\xfe", "body"),
        ("POST", "/search", [1, 2], "body"),
    ],
)
def test_bad_input_is_4xx_naming_the_parameter(client, method, url, payload, param):
    if isinstance(payload, bytes):
        r = client.request(method, url, content=payload, headers={"content-type": "application/json"})
    else:
        r = client.request(method, url, json=payload)
    assert 400 <= r.status_code < 500, r.text
    body = r.json()
    assert body["error"] == "invalid_request"
    assert body["param"] == param
    assert param in body["message"]


def test_unknown_route_and_method(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = client.delete("/search")
    assert r.status_code == 405 and "POST" in r.headers["allow"]


# --- tiles -----------------------------------------------------------------------------------------------
def tile_xy(lat: float, lng: float, z: int) -> tuple[int, int]:
    n = 2**z
    x = int((lng + 180) / 360 * n)
    y = int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)
    return x, y


def decode(data: bytes) -> list[dict]:
    import mapbox_vector_tile

    return mapbox_vector_tile.decode(data).get("cells", {}).get("features", [])


def test_tile_at_max_zoom_has_loaded_cells(client, synthetic):
    from vectorgeo import tiles

    z = tiles.max_zoom(RES, MAX_FEATURES)
    x, y = tile_xy(47.0, 10.0, z)
    r = client.get(f"/tiles/{z}/{x}/{y}.pbf", headers={"accept-encoding": "gzip"})
    assert r.status_code == 200
    assert r.headers["content-encoding"] == "gzip"
    assert r.headers["content-type"] == "application/vnd.mapbox-vector-tile"
    feats = decode(r.content)  # httpx has already gunzipped it
    assert 0 < len(feats) <= MAX_FEATURES
    loaded = {f"{int(c):015x}" for c in synthetic.h3[synthetic.valid]}
    names = {f["properties"]["h3"] for f in feats}
    assert {f["properties"]["res"] for f in feats} == {RES}
    assert names <= loaded
    assert all(len(f["properties"]["color"]) == 7 and f["properties"]["color"].startswith("#") for f in feats)
    assert len({f["properties"]["color"] for f in feats}) > 20  # coloured by embedding, not one flat colour
    # a cell whose centre is well inside the tile is in it
    w, s, e, n = tiles.tile_bounds(z, x, y)
    inside = (
        (synthetic.lng > w + 0.5)
        & (synthetic.lng < e - 0.5)
        & (synthetic.lat > s + 0.5)
        & (synthetic.lat < n - 0.5)
        & synthetic.valid
    )
    assert {f"{int(c):015x}" for c in synthetic.h3[inside]} <= names


def test_low_zoom_tiles_are_rollups(client, synthetic):
    """A rollup cell's count and colour follow from its children's mean embedding (re-normalised)."""
    from vectorgeo import store, tiles

    with store.connect(synthetic.url) as conn:
        meta = tiles.ensure(conn, max_features=MAX_FEATURES)
    z = 4
    level = tiles.level_for_zoom(z, RES, MAX_FEATURES)
    assert 0 < level < RES
    x, y = tile_xy(47.0, 10.0, z)
    feats = decode(client.get(f"/tiles/{z}/{x}/{y}.pbf").content)
    assert feats and {f["properties"]["res"] for f in feats} == {level}
    parents = np.array([h3.str_to_int(h3.cell_to_parent(f"{int(c):015x}", level)) for c in synthetic.h3])
    pca = meta.pca
    comps, lo, hi, mdot = (np.array(pca[k]) for k in ("components", "lo", "hi", "mean_dot"))
    for f in feats[:10]:
        m = (parents == int(f["properties"]["h3"], 16)) & synthetic.valid
        assert f["properties"]["children"] == int(m.sum())
        mean = synthetic.embedding[m].astype(np.float64).sum(axis=0)
        mean /= np.linalg.norm(mean)
        chan = np.clip(np.round((comps @ mean - mdot - lo) * 255 / (hi - lo)), 0, 255).astype(int)
        got = [int(f["properties"]["color"][i : i + 2], 16) for i in (1, 3, 5)]
        assert np.abs(np.array(got) - chan).max() <= 1, (got, chan)


def test_tile_feature_cap(synthetic):
    """With a small cap, every tile respects it and low zooms switch to coarser cells."""
    from vectorgeo import store, tiles

    with store.connect(synthetic.url) as conn:
        meta = replace(tiles.ensure(conn, max_features=MAX_FEATURES), max_features=150)
        for z in range(0, 9):
            x, y = tile_xy(47.0, 10.0, z)
            feats = decode(gzip.decompress(tiles.tile(conn, meta, z, x, y)))
            assert len(feats) <= 150
        assert tiles.level_for_zoom(6, RES, 150) < tiles.level_for_zoom(6, RES, MAX_FEATURES)


def test_hexagons_across_the_antimeridian_and_poles():
    """Cells crossing ±180° are drawn on both sides; cells beyond the Mercator limit are left out."""
    import shapely

    from vectorgeo import tiles
    from vectorgeo.h3cells import boundary

    east = h3.str_to_int(h3.latlng_to_cell(0.0, 179.99, 3))
    plain = h3.str_to_int(h3.latlng_to_cell(47.0, 10.0, 3))
    polar = h3.str_to_int(h3.latlng_to_cell(-89.9, 0.0, 3))
    index, geoms = tiles.hexagons_3857(np.array([east, plain, polar], dtype=np.uint64))
    assert sorted(index.tolist()) == [0, 0, 1]
    half = math.pi * tiles.EARTH_RADIUS_M  # x of ±180°
    b = shapely.bounds(geoms[index == 0])
    assert (b[:, 2] - b[:, 0] < 2e5).all()  # compact hexagons, not a band around the world
    assert sorted(np.sign(b[:, 0] + b[:, 2]).tolist()) == [-1, 1]  # one copy each side
    assert b[:, 0].min() < -half < b[:, 2].min() and b[:, 0].max() < half < b[:, 2].max()
    ring = np.array(boundary(east))
    assert ring[:, 0].max() - ring[:, 0].min() < 2  # continuous longitudes for the viewer


def test_empty_tile(client):
    r = client.get("/tiles/3/0/0.pbf")  # the far north-west Pacific: nothing loaded
    assert r.status_code == 200 and decode(r.content) == []


def test_tiles_rebuilt_when_regions_reloaded(pg_cluster, tmp_path):
    """The colours are computed once per model version, and rebuilt when its regions change."""
    from vectorgeo import store, tiles

    s = load_synthetic(pg_cluster, tmp_path / "a", bbox=(20.0, 10.0, 22.0, 12.0))
    with store.connect(s.url) as conn:
        first = tiles.ensure(conn, max_features=MAX_FEATURES)
        assert tiles.ensure(conn, max_features=MAX_FEATURES).build_id == first.build_id  # up to date: not rebuilt
        paths, _ = make_synthetic(tmp_path / "b", bbox=(20.0, 10.0, 23.0, 12.0))
        for p in paths:
            store.load_region(conn, p)
        second = tiles.ensure(conn, max_features=MAX_FEATURES)
        assert second.build_id != first.build_id and second.cells > first.cells


def test_app_follows_reloaded_regions(pg_cluster, tmp_path):
    """A running server re-checks the loaded regions and serves the rebuilt tiles."""
    from fastapi.testclient import TestClient

    from vectorgeo import store
    from vectorgeo.api import create_app

    s = load_synthetic(pg_cluster, tmp_path / "a", bbox=(30.0, 10.0, 31.0, 11.0))
    with TestClient(create_app(s.url, meta_ttl_s=0.0)) as c:
        before = c.get("/meta").json()
        paths, arrays = make_synthetic(tmp_path / "b", bbox=(30.0, 10.0, 32.0, 11.0))
        with store.connect(s.url) as conn:
            for p in paths:
                store.load_region(conn, p)
        deadline = time.monotonic() + 60
        while (after := c.get("/meta").json())["cells"] == before["cells"] and time.monotonic() < deadline:
            time.sleep(0.2)  # rebuilt in the background, the old tiles are served meanwhile
        assert c.get("/tiles/0/0/0.pbf").status_code == 200
    assert before["cells"] == int(s.valid.sum())
    assert after["cells"] == int(arrays["valid"].sum()) > before["cells"]


def test_config_query_settings_reach_the_app(synthetic):
    """``vectorgeo serve`` builds its app with the config's ``database`` query settings."""
    from vectorgeo import store
    from vectorgeo.api.server import app_for_config

    database = {"ef_search": 7, "max_scan_tuples": 1234, "exact_scan_max_rows": 0, "local_exact_rings": 4}
    app = app_for_config({"database": database, "serve": {"default_k": 3}}, synthetic.url)
    assert app.state.vectorgeo.query == store.QuerySettings(
        ef_search=7, max_scan_tuples=1234, exact_scan_max_rows=0, local_rings=4
    )
    assert app.state.vectorgeo.serve.default_k == 3


@pytest.mark.parametrize(("exact_scan_max_rows", "exact"), [(0, False), (10**9, True)])
def test_query_settings_decide_the_plan(synthetic, exact_scan_max_rows, exact):
    """exact_scan_max_rows decides whether a bbox query is an exact scan through the GIST index."""
    from fastapi.testclient import TestClient

    from vectorgeo import store
    from vectorgeo.api import create_app

    query = store.QuerySettings(
        ef_search=40, max_scan_tuples=20000, exact_scan_max_rows=exact_scan_max_rows, local_rings=10
    )
    app = create_app(synthetic.url, serve=serve_with(pool_size=1), query=query, build_tiles=False)
    cell = a_valid_cell(synthetic, (46.0, 9.0))

    def gist_scans() -> int:
        # the one pooled backend, which served the request; a request's transaction reads one stats snapshot:
        # flush in one, read in the next
        with app.state.vectorgeo.connection() as conn:
            conn.execute("SELECT pg_stat_force_next_flush()")
        with app.state.vectorgeo.connection() as conn:
            row = conn.execute(
                "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = %s",
                (store.dataset(conn).table + "_geom",),
            ).fetchone()
        return int(row[0])

    with TestClient(app) as c:
        before = gist_scans()
        r = c.get("/similar", params={"h3": cell, "k": 30, "bbox": "12.0,44.5,14.5,46.0"})
        assert r.status_code == 200 and len(r.json()["results"]) == 30
        assert (gist_scans() > before) == exact


# --- countries, viewer assets ----------------------------------------------------------------------------
def test_countries(client):
    r = client.get("/countries.geojson", headers={"accept-encoding": "gzip"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/geo+json")
    assert r.headers["content-encoding"] == "gzip"
    body = r.json()
    assert body["type"] == "FeatureCollection" and len(body["features"]) > 200
    by_iso = {f["properties"]["iso_a3"]: f for f in body["features"]}
    assert by_iso["CHE"]["geometry"]["type"] in ("Polygon", "MultiPolygon")
    assert len(r.content) < 3_000_000  # generalised, not the 1:10m file as it is


def test_viewer_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and '<script type="module" src="/static/app.js">' in r.text
    assert "/vendor/maplibre-gl/maplibre-gl.css" in r.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/vendor/maplibre-gl/maplibre-gl.mjs" in js.text
    lib = client.get("/vendor/maplibre-gl/maplibre-gl.mjs")
    assert lib.status_code == 200, "MapLibre GL JS missing: run `bash setup/npm.sh`"
    assert "javascript" in lib.headers["content-type"]
    assert client.get("/vendor/maplibre-gl/maplibre-gl-worker.mjs").status_code == 200
    assert client.get("/vendor/maplibre-gl/maplibre-gl.css").status_code == 200


def test_openapi_documents_every_endpoint(client):
    spec = client.get("/openapi.json").json()
    assert {
        "/search",
        "/cells/{h3}",
        "/point",
        "/similar",
        "/tiles/{z}/{x}/{y}.pbf",
        "/healthz",
        "/countries.geojson",
        "/meta",
    } <= set(spec["paths"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text  # no CDN
    assert "cdn." not in docs.text
    assert client.get("/vendor/swagger-ui/swagger-ui-bundle.js").status_code == 200


# --- schemathesis ----------------------------------------------------------------------------------------
SCHEMATHESIS_CONFIG = """
# JSON Schema cannot say that 15 hex digits must be an H3 cell at the loaded resolution, that a tile column
# must be below 2^z, or that a bbox's south must lie below its north: schema-valid values of these
# operations may rightly be refused with 422 (naming the parameter).
[[operations]]
include-path-regex = "^/(cells/|similar|search|tiles/|scores/|basemap/|query)"
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "422"]

# loaded cells and points over them, drawn half of the time, so that operations succeed and the stateful
# phase can follow the links from their answers
[dictionaries.cells]
values = {cells}
[dictionaries.lats]
values = {lats}
[dictionaries.lngs]
values = {lngs}

[parameters]
"path.h3" = {{ dictionary = "cells", probability = 0.5 }}
"query.h3" = {{ dictionary = "cells", probability = 0.5 }}
"body.h3" = {{ dictionary = "cells", probability = 0.5 }}
"query.lat" = {{ dictionary = "lats", probability = 0.5 }}
"query.lng" = {{ dictionary = "lngs", probability = 0.5 }}
"body.lat" = {{ dictionary = "lats", probability = 0.5 }}
"body.lon" = {{ dictionary = "lngs", probability = 0.5 }}
"""


@pytest.mark.slow
def test_schemathesis_no_server_errors_no_schema_violations(synthetic, builtin_layers, default_config, tmp_path):
    """Fuzz every operation from /openapi.json against a live server with every check, in every phase
    (examples, coverage, fuzzing, and stateful: sequences that follow the schema's OpenAPI links): zero 5xx,
    zero schema violations. positive_data_acceptance accepts 422 only where JSON Schema cannot express
    validity (:data:`SCHEMATHESIS_CONFIG`).
    """
    from vectorgeo.api import create_app
    from vectorgeo.config import parse
    from vectorgeo.inputs import InputLayers

    sample = parse(default_config).sample
    inputs = InputLayers(builtin_layers, sample.patch_px, sample.patch_km)  # the cell inspector's layers
    idx = np.flatnonzero(synthetic.valid)[:: max(1, int(synthetic.valid.sum()) // 20)][:20]
    cells = [f"{int(c):015x}" for c in synthetic.h3[idx]]
    lats = [round(float(v), 4) for v in synthetic.lat[idx]]
    lngs = [round(float(v), 4) for v in synthetic.lng[idx]]
    config = SCHEMATHESIS_CONFIG.format(cells=json.dumps(cells), lats=json.dumps(lats), lngs=json.dumps(lngs))
    (tmp_path / "schemathesis.toml").write_text(config)
    st = Path(sys.executable).with_name("schemathesis")
    with live_server(create_app(synthetic.url, inputs=inputs)) as base:
        proc = subprocess.run(
            [
                str(st),
                "run",
                f"{base}/openapi.json",
                "--checks",
                "all",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--max-examples",
                "60",
                "--seed",
                "7",
                "--workers",
                "1",
                "--no-color",
                "--report",
                "junit",
                "--report-dir",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            timeout=550,
            cwd=tmp_path,  # schemathesis reads schemathesis.toml and keeps a cache folder in its working directory
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out.split("SUMMARY")[-1]
    assert "passed" in out and "failures" not in summary.lower(), out[-3000:]
    # the stateful phase followed every link the schema declares (links schemathesis infers on its own
    # from response fields may stay uncovered within the example budget)
    links = re.search(r"API Links:\s+(\d+) covered / (\d+) selected(?: / \d+ total)?(?: \((\d+) inferred\))?", out)
    assert links is not None, out[-3000:]
    covered, selected, inferred = int(links[1]), int(links[2]), int(links[3] or 0)
    assert selected - inferred >= 5 and covered >= selected - inferred, out[-3000:]
