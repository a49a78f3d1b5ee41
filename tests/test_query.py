"""Search by example (POST /query, its score tiles and downloads) against a real PostgreSQL.

The synthetic dataset of test_api (every res-5 cell of a box over the Alps, 16-d embeddings varying
smoothly with position, every 97th cell without an embedding) goes through the real loader; expected
answers are computed here with numpy from the same arrays, independently of vectorgeo.scores.
"""

from __future__ import annotations

import gzip
import io
import json

import h3
import mapbox_vector_tile
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from test_api import Synthetic, a_valid_cell, haversine, load_synthetic, serve_with

from vectorgeo import tiles
from vectorgeo.validation import MAX_EXAMPLES, MAX_EXPORT, MAX_K, MAX_POLYGON_VERTICES

pytestmark = pytest.mark.db

BETA = 0.5
CELL = "851f8bcffffffff"
COARSE = h3.cell_to_parent(CELL, 2)


@pytest.fixture(scope="module")
def synthetic(pg_cluster, tmp_path_factory) -> Synthetic:
    return load_synthetic(pg_cluster, tmp_path_factory.mktemp("query-regions"))


@pytest.fixture(scope="module")
def inputs(builtin_layers, default_config):
    from vectorgeo.config import parse
    from vectorgeo.inputs import InputLayers

    sample = parse(default_config).sample
    return InputLayers(builtin_layers, sample.patch_px, sample.patch_km)


@pytest.fixture(scope="module")
def client(synthetic, inputs):
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    with TestClient(create_app(synthetic.url, serve=serve_with(), build_tiles=False, inputs=inputs)) as c:
        yield c


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def expected_similar(s: Synthetic, pos: list[str], neg: list[str], k: int, keep: np.ndarray | None = None):
    """Brute force: cosine to normalise(unit(mean P) - 0.5 unit(mean N)), percentile among all valid cells."""
    ok = np.flatnonzero(s.valid)
    emb = s.embedding[ok].astype(np.float64)
    idx = {f"{int(s.h3[i]):015x}": j for j, i in enumerate(ok)}
    p = [idx[c] for c in pos]
    n = [idx[c] for c in neg]
    q = unit(emb[p].mean(0))
    if n:
        q = unit(q - BETA * unit(emb[n].mean(0)))
    sim = emb @ q
    pct = np.array([(sim < x).sum() for x in sim]) / (len(sim) - 1) * 100.0
    cand = np.ones(len(ok), dtype=bool)
    cand[p + n] = False
    if keep is not None:
        cand &= keep[ok]
    order = np.flatnonzero(cand)[np.argsort(-sim[cand], kind="stable")][:k]
    return [f"{int(s.h3[ok[j]]):015x}" for j in order], pct[order], sim, ok


def post(client, body, **params):
    r = client.post("/query", json=body, params=params)
    assert r.status_code == 200, r.text
    return r


# --- similar ------------------------------------------------------------------------------------------------
def test_similar_matches_brute_force(client, synthetic):
    pos = [a_valid_cell(synthetic, (47.0, 10.0)), a_valid_cell(synthetic, (46.0, 7.0))]
    body = post(client, {"positives": pos, "k": 30}).json()
    want, pct, _, ok = expected_similar(synthetic, pos, [], 30)
    assert [r["h3"] for r in body["results"]] == want
    np.testing.assert_allclose([r["score"] for r in body["results"]], pct, atol=1e-3)
    assert body["score_kind"] == "percentile" and body["mode"] == "similar"
    assert body["cells"] == ok.size and body["resolution"] == 5 and body["area_cells"] is None
    assert all(e["used"] and e["reason"] is None for e in body["examples"])
    assert body["tiles"] == f"/scores/{body['score_id']}/{{z}}/{{x}}/{{y}}.pbf"
    # readable: the best results sit in the top percent, not at a cosine of 0.9999
    assert body["results"][0]["score"] > 99.0 and body["results"][-1]["score"] < body["results"][0]["score"]


def test_negatives_push_results_away(client, synthetic):
    pos = [a_valid_cell(synthetic, (47.0, 10.0))]
    neg = [a_valid_cell(synthetic, (47.0, 11.0))]
    body = post(client, {"positives": pos, "negatives": neg, "k": 25}).json()
    want, pct, _, _ = expected_similar(synthetic, pos, neg, 25)
    assert [r["h3"] for r in body["results"]] == want
    np.testing.assert_allclose([r["score"] for r in body["results"]], pct, atol=1e-3)
    plain = post(client, {"positives": pos, "k": 25}).json()
    assert plain["score_id"] != body["score_id"] and [r["h3"] for r in plain["results"]] != want


def test_points_and_cells_are_the_same_examples(client, synthetic):
    cell = a_valid_cell(synthetic, (45.5, 12.0))
    lat, lng = h3.cell_to_latlng(cell)
    a = post(client, {"positives": [cell], "k": 10}).json()
    b = post(client, {"positives": [{"lat": lat, "lng": lng}], "k": 10}).json()
    c = post(client, {"positives": [f"{lat},{lng}"], "k": 10}).json()
    assert a["results"] == b["results"] == c["results"] and a["score_id"] == b["score_id"] == c["score_id"]
    finer = h3.cell_to_center_child(cell, 7)  # a finer cell stands for its parent
    assert post(client, {"positives": [finer], "k": 10}).json()["results"] == a["results"]


# --- classify ------------------------------------------------------------------------------------------------
def test_classify_probabilities(client, synthetic):
    pos = [a_valid_cell(synthetic, (47.0, 10.0)), a_valid_cell(synthetic, (47.1, 10.3))]
    neg = [a_valid_cell(synthetic, (45.0, 6.0)), a_valid_cell(synthetic, (49.5, 14.5))]
    body = post(client, {"positives": pos, "negatives": neg, "mode": "classify", "k": 40}).json()
    assert body["score_kind"] == "probability"
    probs = [r["score"] for r in body["results"]]
    assert all(0.5 < p <= 1.0 for p in probs) and probs == sorted(probs, reverse=True)
    assert not {r["h3"] for r in body["results"]} & set(pos + neg)  # examples are never results
    # the top results lie near the positives (the embeddings vary smoothly with position)
    d = haversine(
        47.05, 10.15, np.array([r["lat"] for r in body["results"]]), np.array([r["lng"] for r in body["results"]])
    )
    assert np.median(d) < 150_000
    # deterministic: the same examples give the same map and results
    again = post(client, {"positives": pos[::-1], "negatives": neg, "mode": "classify", "k": 40}).json()
    assert again["score_id"] == body["score_id"] and again["results"] == body["results"]


def test_classify_without_negatives_uses_background(client, synthetic):
    pos = [a_valid_cell(synthetic, (46.5, 8.0))]
    body = post(client, {"positives": pos, "mode": "classify", "k": 5}).json()
    assert body["results"][0]["score"] > 0.5


# --- areas ---------------------------------------------------------------------------------------------------
def test_radius_around_first_positive_or_centre(client, synthetic):
    pos = [a_valid_cell(synthetic, (47.0, 10.0)), a_valid_cell(synthetic, (45.0, 6.0))]
    lat0, lng0 = (float(v) for v in h3.cell_to_latlng(pos[0]))
    keep = haversine(lat0, lng0, synthetic.lat, synthetic.lng) <= 120_000
    body = post(client, {"positives": pos, "k": 20, "radius_m": 120_000}).json()
    want, _, _, _ = expected_similar(synthetic, pos, [], 20, keep)
    assert [r["h3"] for r in body["results"]] == want
    assert body["area_cells"] == int((keep & synthetic.valid).sum())
    centre = {"lat": 48.0, "lng": 13.0}
    keep2 = haversine(48.0, 13.0, synthetic.lat, synthetic.lng) <= 80_000
    body2 = post(client, {"positives": pos, "k": 20, "radius_m": 80_000, "center": centre}).json()
    assert [r["h3"] for r in body2["results"]] == expected_similar(synthetic, pos, [], 20, keep2)[0]


def test_bbox_and_polygon(client, synthetic):
    pos = [a_valid_cell(synthetic, (47.0, 10.0))]
    box = [11.0, 45.0, 13.0, 46.5]
    keep = (synthetic.lng >= 11) & (synthetic.lng <= 13) & (synthetic.lat >= 45) & (synthetic.lat <= 46.5)
    body = post(client, {"positives": pos, "k": 15, "bbox": box}).json()
    assert [r["h3"] for r in body["results"]] == expected_similar(synthetic, pos, [], 15, keep)[0]
    # a triangle, as a Feature
    tri = [[6.0, 44.5], [9.0, 44.5], [7.5, 47.0], [6.0, 44.5]]
    poly = shapely.Polygon(tri)
    keep = shapely.contains_xy(poly, synthetic.lng, synthetic.lat)
    feature = {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [tri]}}
    body = post(client, {"positives": pos, "k": 15, "polygon": feature}).json()
    assert [r["h3"] for r in body["results"]] == expected_similar(synthetic, pos, [], 15, keep)[0]
    assert body["area_cells"] == int((keep & synthetic.valid).sum())


# --- downloads -----------------------------------------------------------------------------------------------
def test_downloads_hold_the_same_cells(client, synthetic):
    body = {
        "positives": [a_valid_cell(synthetic, (46.0, 9.0))],
        "negatives": [a_valid_cell(synthetic, (48, 6))],
        "k": 40,
    }
    js = post(client, body).json()
    cells = [r["h3"] for r in js["results"]]
    scores = [r["score"] for r in js["results"]]

    gj = post(client, body, format="geojson")
    assert gj.headers["content-type"].startswith("application/geo+json")
    assert "attachment" in gj.headers["content-disposition"]
    fc = json.loads(gj.content)
    assert fc["type"] == "FeatureCollection" and fc["score_kind"] == "percentile"
    assert [f["properties"]["h3"] for f in fc["features"]] == cells
    np.testing.assert_allclose([f["properties"]["score"] for f in fc["features"]], scores)
    for f in fc["features"][:5]:  # a hexagon holding its centre
        g = shapely.geometry.shape(f["geometry"])
        assert g.geom_type == "Polygon" and g.contains(shapely.Point(f["properties"]["lng"], f["properties"]["lat"]))
        hexagon = shapely.Polygon([p[::-1] for p in h3.cell_to_boundary(f["properties"]["h3"])])
        assert g.symmetric_difference(hexagon).area < 1e-5 * hexagon.area

    csv = post(client, body, format="csv")
    lines = csv.content.decode().splitlines()
    assert lines[0] == '"rank","h3","lat","lng","score"' or lines[0] == "rank,h3,lat,lng,score"
    assert [ln.split(",")[1].strip('"') for ln in lines[1:]] == cells

    pq_bytes = post(client, body, format="parquet").content
    t = pq.read_table(io.BytesIO(pq_bytes))
    assert t.column("h3").to_pylist() == cells
    np.testing.assert_allclose(t.column("score").to_numpy(), scores)
    geo = json.loads(t.schema.metadata[b"geo"])
    assert geo["primary_column"] == "geometry" and geo["columns"]["geometry"]["encoding"] == "WKB"
    geoms = shapely.from_wkb(t.column("geometry").to_numpy(zero_copy_only=False))
    assert shapely.contains_xy(geoms, t.column("lng").to_numpy(), t.column("lat").to_numpy()).all()


def test_export_allows_more_than_json(client, synthetic):
    body = {"positives": [a_valid_cell(synthetic)], "k": MAX_K + 500}
    r = client.post("/query", json=body)
    assert r.status_code == 422 and r.json()["param"] == "k" and str(MAX_K) in r.json()["message"]
    t = pq.read_table(io.BytesIO(post(client, body, format="parquet").content))
    assert t.num_rows == MAX_K + 500
    r = client.post("/query", json={**body, "k": MAX_EXPORT + 1}, params={"format": "csv"})
    assert r.status_code == 422 and r.json()["param"] == "k"


# --- score map tiles ---------------------------------------------------------------------------------------------
def decode(data: bytes) -> list[dict]:
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data  # httpx undoes Content-Encoding
    return mapbox_vector_tile.decode(raw, default_options={"y_coord_down": True}).get("scores", {}).get("features", [])


def test_score_tiles_at_the_loaded_resolution(client, synthetic):
    pos = [a_valid_cell(synthetic, (47.0, 10.0))]
    body = post(client, {"positives": pos, "k": 5}).json()
    _, _, sim, ok = expected_similar(synthetic, pos, [], 5)
    pct = np.array([(sim < x).sum() for x in sim]) / (len(sim) - 1)
    z = tiles.max_zoom(5, serve_with().tile_max_features)
    x, y = tile_xy(47.0, 10.0, z)
    r = client.get(f"/scores/{body['score_id']}/{z}/{x}/{y}.pbf")
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    feats = decode(r.content)
    got = {f["properties"]["h3"]: f["properties"]["score"] for f in feats}
    # every valid cell whose centre lies in the tile is there, with its percentile
    w, s, e, n = tiles.tile_bounds(z, x, y)
    lat, lng = synthetic.lat[ok], synthetic.lng[ok]
    inside = (lng > w) & (lng < e) & (lat > s) & (lat < n)
    want = {f"{int(c):015x}": p for c, p in zip(synthetic.h3[ok][inside], pct[inside], strict=True)}
    assert set(want) <= set(got) and len(want) > 20
    np.testing.assert_allclose([got[c] for c in want], [want[c] for c in want], atol=1e-6)
    # the drawn hexagons are the cells' own: vertices back in degrees, within a tile unit of h3's
    for f in feats[:20]:
        assert f["geometry"]["type"] == "Polygon"
        xy = np.array(f["geometry"]["coordinates"][0][:-1], dtype=float)
        lng = (x + xy[:, 0] / 4096) / 2**z * 360 - 180
        lat = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (y + xy[:, 1] / 4096) / 2**z))))
        want_ll = np.array(h3.cell_to_boundary(f["properties"]["h3"]))
        d = np.abs(want_ll[:, None, :] - np.column_stack([lat, lng])[None]).max(axis=2).min(axis=1)
        assert len(xy) == len(want_ll) and d.max() < 360 / 2**z / 4096 * 2


def test_score_tiles_roll_up_at_low_zoom(client, synthetic):
    pos = [a_valid_cell(synthetic, (46.0, 12.0))]
    body = post(client, {"positives": pos, "k": 5}).json()
    _, _, sim, ok = expected_similar(synthetic, pos, [], 5)
    feats = decode(client.get(f"/scores/{body['score_id']}/2/2/1.pbf").content)
    level = tiles.level_for_zoom(2, 5, serve_with().tile_max_features)
    assert level < 5 and feats
    parents = np.array([h3.str_to_int(h3.cell_to_parent(f"{int(c):015x}", level)) for c in synthetic.h3[ok]])
    n = len(sim)
    for f in feats[:10]:  # a parent: the percentile among the cells of its children's mean similarity
        mean = sim[parents == h3.str_to_int(f["properties"]["h3"])].mean()
        assert h3.get_resolution(f["properties"]["h3"]) == level
        assert f["properties"]["score"] == pytest.approx((sim < mean).sum() / (n - 1), abs=2.5 / (n - 1))


def test_unknown_score_map_is_404(client):
    r = client.get("/scores/0123456789abcdef0123/0/0/0.pbf")
    assert r.status_code == 404 and r.json()["param"] == "score_id"


def tile_xy(lat: float, lng: float, z: int) -> tuple[int, int]:
    n = 2**z
    x = int((lng + 180) / 360 * n)
    y = int((1 - np.log(np.tan(np.radians(lat)) + 1 / np.cos(np.radians(lat))) / np.pi) / 2 * n)
    return x, y


# --- limits and errors ---------------------------------------------------------------------------------------
def ring(nv: int) -> list[list[float]]:
    t = np.linspace(0, 2 * np.pi, nv, endpoint=False)
    pts = np.column_stack([10 + np.cos(t), 47 + np.sin(t)]).tolist()
    return [*pts, pts[0]]


@pytest.mark.parametrize(
    ("body", "params", "param"),
    [
        ({"positives": []}, {}, "positives"),
        ({"positives": ["851f8bcffffffff"] * (MAX_EXAMPLES + 1)}, {}, "positives"),
        ({"positives": ["851f8bcffffffff"], "negatives": ["851f8bcffffffff"] * (MAX_EXAMPLES + 1)}, {}, "negatives"),
        ({"positives": ["zzz"]}, {}, "positives[0]"),
        ({"positives": ["851f8bcffffffff", 5]}, {}, "positives[1]"),
        ({"positives": [{"lat": 95, "lng": 0}]}, {}, "positives[0].lat"),
        ({"positives": [{"lat": 5}]}, {}, "positives[0]"),
        ({"positives": [COARSE]}, {}, "positives[0]"),  # coarser than the loaded cells
        ({"positives": ["851f8bcffffffff"], "mode": "nearest"}, {}, "mode"),
        ({"positives": ["851f8bcffffffff"], "k": 0}, {}, "k"),
        ({"positives": ["851f8bcffffffff"], "radius_m": -1}, {}, "radius_m"),
        ({"positives": ["851f8bcffffffff"], "bbox": [1, 2, 3]}, {}, "bbox"),
        ({"positives": ["851f8bcffffffff"], "bbox": [10, 50, 12, 40]}, {}, "bbox"),
        ({"positives": ["851f8bcffffffff"], "polygon": {"type": "Point", "coordinates": [1, 2]}}, {}, "polygon"),
        (
            {
                "positives": ["851f8bcffffffff"],
                "polygon": {"type": "Polygon", "coordinates": [ring(MAX_POLYGON_VERTICES + 5)]},
            },
            {},
            "polygon",
        ),
        (
            {
                "positives": ["851f8bcffffffff"],
                "polygon": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]},
            },
            {},
            "polygon",
        ),
        ({"positives": ["851f8bcffffffff"], "extra": 1}, {}, "extra"),
        ({"positives": ["851f8bcffffffff"]}, {"format": "xlsx"}, "format"),
    ],
)
def test_bad_queries_are_4xx_naming_the_parameter(client, body, params, param):
    r = client.post("/query", json=body, params=params)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["param"] == param, r.text
    assert param.split("[")[0].split(".")[-1] in r.json()["message"]


def test_examples_without_embedding_are_404_saying_why(client, synthetic):
    nodata = f"{int(synthetic.h3[~synthetic.valid][0]):015x}"
    outside = h3.latlng_to_cell(-10.0, -60.0, 5)  # South America: no region loaded there
    r = client.post("/query", json={"positives": [nodata, outside]})
    assert r.status_code == 404 and r.json()["param"] == "positives"
    msg = r.json()["message"]
    assert "positives[0]" in msg and "no embedding (status nodata)" in msg
    assert "positives[1]" in msg and "not loaded" in msg
    # one usable positive: the query runs and reports the others
    good = a_valid_cell(synthetic)
    body = post(client, {"positives": [good, outside], "negatives": [nodata], "k": 3}).json()
    ex = {e["param"]: e for e in body["examples"]}
    assert ex["positives[0]"]["used"] and not ex["positives[1]"]["used"]
    assert "not loaded" in ex["positives[1]"]["reason"] and "nodata" in ex["negatives[0]"]["reason"]


def test_ocean_inside_a_loaded_region_is_named(pg_cluster, tmp_path):
    """A sea cell inside a loaded region: 'ocean or not land'."""
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    # a box over Corsica, its sea cells removed as the stencil would
    s = load_synthetic(pg_cluster, tmp_path, bbox=(8.0, 41.0, 10.0, 43.5))
    sea = h3.latlng_to_cell(43.2, 9.9, 5)  # Ligurian Sea, inside the box: drop it from the database
    import psycopg

    with psycopg.connect(s.url, autocommit=True) as conn:
        table = conn.execute("SELECT table_name FROM vectorgeo_datasets").fetchone()[0]
        conn.execute(f'DELETE FROM "{table}" WHERE h3 = %s', (h3.str_to_int(sea),))
    with TestClient(create_app(s.url, build_tiles=False)) as c:
        r = c.post("/query", json={"positives": [sea]})
    assert r.status_code == 404 and "ocean" in r.json()["message"]


def test_old_search_unchanged(client, synthetic):
    """POST /search keeps the old Lambda's shape next to /query."""
    cell = a_valid_cell(synthetic)
    lat, lng = h3.cell_to_latlng(cell)
    r = client.post("/search", json={"lat": lat, "lon": lng, "circleRadiusMeters": 100_000, "limit": 5})
    assert r.status_code == 200 and set(r.json()) == {"locations", "scores"} and len(r.json()["scores"]) == 5


# --- the embeddings in memory ----------------------------------------------------------------------------------
def test_embeddings_in_memory_are_the_loaded_ones(client, synthetic):
    v = client.app.state.vectorgeo.scores.vectors()
    ok = synthetic.valid
    np.testing.assert_array_equal(v.h3, synthetic.h3[ok])
    np.testing.assert_allclose(v.lat, synthetic.lat[ok])
    np.testing.assert_allclose(v.lng, synthetic.lng[ok])
    np.testing.assert_allclose(v.embedding, synthetic.embedding[ok], atol=1e-6)
    assert v.embedding.flags.c_contiguous and v.dim == 16 and v.model_version == "synthetic-api-v1"


def test_reloaded_regions_are_read_again(pg_cluster, tmp_path):
    """A region loaded while the app runs reaches the scores after the check interval (read in the background)."""
    import time

    from fastapi.testclient import TestClient
    from test_api import make_synthetic

    from vectorgeo import store
    from vectorgeo.api import create_app

    s = load_synthetic(pg_cluster, tmp_path / "a", bbox=(8.0, 45.0, 9.0, 46.0))
    with TestClient(create_app(s.url, build_tiles=False, meta_ttl_s=0.0)) as c:
        n0 = c.app.state.vectorgeo.scores.vectors().n
        far = h3.latlng_to_cell(46.8, 14.8, 5)
        assert c.post("/query", json={"positives": [far]}).status_code == 404
        paths, _ = make_synthetic(tmp_path / "b", bbox=(14.0, 46.0, 15.5, 47.5))
        with store.connect(s.url) as conn:
            for p in paths:
                store.load_region(conn, p)
        deadline = time.monotonic() + 60
        while c.app.state.vectorgeo.scores.vectors().n == n0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert c.app.state.vectorgeo.scores.vectors().n > n0
        assert c.post("/query", json={"positives": [far]}).status_code == 200


# --- the cell inspector and the basemap ---------------------------------------------------------------------
def test_inspector_shows_the_patches_the_model_saw(client, synthetic, inputs):
    from vectorgeo.sampling import gather_patches

    cell = a_valid_cell(synthetic, (46.5, 9.5))
    r = client.get(f"/cells/{cell}/inputs")
    assert r.status_code == 200, r.text
    body = r.json()
    lat, lng = h3.cell_to_latlng(cell)
    assert body["h3"] == cell and body["lat"] == pytest.approx(lat) and body["patch_px"] == inputs.patch_px
    values, _, _ = gather_patches(inputs.layers, np.array([lat]), np.array([lng]), inputs.patch_px, inputs.patch_km)
    layers = {layer["name"]: layer for layer in body["layers"]}
    assert list(layers) == list(inputs.layers)
    lc = np.array(layers["landcover"]["values"], dtype=float)
    np.testing.assert_array_equal(lc, values["landcover"][0].astype(float))  # the Alps: no nodata
    names = [c["name"] for c in layers["landcover"]["legend"]]
    assert names == inputs.layers["landcover"].spec.class_names and layers["landcover"]["legend"][2][
        "colour"
    ].startswith("#")
    elev = np.array(layers["elevation"]["values"], dtype=float)
    np.testing.assert_allclose(elev, values["elevation"][0], rtol=1e-6)
    assert layers["elevation"]["unit"] == "m" and layers["elevation"]["max"] > 1500  # Alpine peaks
    assert layers["elevation"]["bands"] is None
    rgb = np.array(layers["imagery"]["values"], dtype=float)  # a multi-band layer: a band list per pixel
    assert layers["imagery"]["bands"] == ["red", "green", "blue"]
    np.testing.assert_allclose(rgb, values["imagery"][0], rtol=1e-6)
    png = client.get(body["imagery"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    from PIL import Image

    assert Image.open(io.BytesIO(png.content)).size == (64, 64)


def test_inspector_without_layers_says_so(synthetic):
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    with TestClient(create_app(synthetic.url, build_tiles=False)) as c:
        for path in ("inputs", "imagery.png"):
            r = c.get(f"/cells/{a_valid_cell(synthetic)}/{path}")
            assert (
                r.status_code == 503 and r.json()["error"] == "unavailable" and "prepare_layer" in r.json()["message"]
            )
        assert c.get("/cells/000000000000000/inputs").json()["param"] == "h3"  # bad input first


def test_basemap_tiles(client):
    from PIL import Image

    r = client.get("/basemap/1/1/0.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (256, 256)
    assert client.get("/basemap/6/0/0.jpg").json()["param"] == "z"
    assert client.get("/basemap/1/2/0.jpg").json()["param"] == "x"
