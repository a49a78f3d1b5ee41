"""Tests of vectorgeo.evaluate and vectorgeo.report on synthetic data with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import h3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
import yaml
from conftest import WorkflowRun, require_system
from rasterio import Affine

from vectorgeo import config as C
from vectorgeo import evaluate as ev
from vectorgeo import features, h3cells, probes
from vectorgeo import labels as vg_labels
from vectorgeo.config import TrainConfig
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.layers import NODATA_INDEX, LayerSpec
from vectorgeo.rasters import prepare_layer

LANDCOVER = LayerSpec.from_config(
    "landcover",
    {
        "kind": "categorical",
        "source": "unused.tif",
        "nodata": 255,
        "water": [0],
        "classes": {0: "water", 1: "forest", 2: "grass", 3: "crop"},
    },
)
ELEVATION = LayerSpec.from_config(
    "elevation", {"kind": "continuous", "source": "unused.tif", "nodata": -9999, "normalize": "patch_minmax"}
)
SPECS = {"landcover": LANDCOVER, "elevation": ELEVATION}

BBOX = (0.0, 40.0, 10.0, 50.0)  # west, south, east, north
CHROMIUM = "/usr/bin/chromium"


# --------------------------------------------------------------------------- helpers


def cells_in_bbox(res: int, bbox: tuple[float, float, float, float] = BBOX) -> np.ndarray:
    w, s, e, n = bbox
    poly = h3.LatLngPoly([(s, w), (s, e), (n, e), (n, w)])
    return np.array(sorted(h3.str_to_int(c) for c in h3.h3shape_to_cells(poly, res)), dtype=np.uint64)


def centroids(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ll = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in cells])
    return ll[:, 0], ll[:, 1]


def synthetic_patches(n: int, p: int, seed: int) -> dict[str, np.ndarray]:
    """Blocky categorical patches (class fractions vary) and smooth elevation ramps with some nodata."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 4, size=(n, 4, 4)).astype(np.uint8)
    cat = np.repeat(np.repeat(blocks, p // 4, axis=1), p // 4, axis=2)
    cat[rng.random((n, p, p)) < 0.05] = NODATA_INDEX
    base = rng.uniform(0, 3000, size=(n, 1, 1))
    slope = rng.uniform(-20, 20, size=(n, 1, 1))
    elev = (base + slope * np.arange(p)[None, None, :] + rng.normal(0, 5, size=(n, p, p))).astype(np.float32)
    elev[rng.random((n, p, p)) < 0.05] = np.nan
    return {"landcover": cat, "elevation": elev}


def write_tif(path: Path, data: np.ndarray, bbox: tuple[float, float, float, float], nodata: float | None) -> Path:
    w, s, e, n = bbox
    h, wd = data.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=wd,
        height=h,
        count=1,
        dtype=data.dtype,
        crs="EPSG:4326",
        transform=Affine((e - w) / wd, 0, w, 0, -(n - s) / h, n),
        nodata=nodata,
    ) as ds:
        ds.write(data, 1)
    return path


def smooth_field(shape: tuple[int, int], seed: int, scale: int = 20) -> np.ndarray:
    """Smooth random field in [0, 1] (bilinear upsampling of coarse noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((shape[0] // scale + 2, shape[1] // scale + 2))
    yi = np.arange(shape[0]) / scale
    xi = np.arange(shape[1]) / scale
    y0, x0 = yi.astype(int), xi.astype(int)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    c = coarse
    f = (
        c[y0][:, x0] * (1 - fy) * (1 - fx)
        + c[y0 + 1][:, x0] * fy * (1 - fx)
        + c[y0][:, x0 + 1] * (1 - fy) * fx
        + c[y0 + 1][:, x0 + 1] * fy * fx
    )
    return (f - f.min()) / (f.max() - f.min())


def write_embeddings(path: Path, cells: np.ndarray, emb: np.ndarray, status: list[str], version: str) -> Path:
    """A region file written by the project's GeoParquet writer."""
    from vectorgeo.geoparquet import write_region

    lat, lng = centroids(cells)
    return write_region(path, cells, lat, lng, emb, status, version)


# --------------------------------------------------------------------------- config


def test_default_tasks_parse(default_config: dict) -> None:
    tasks = vg_labels.task_specs(default_config)
    assert set(tasks) == {"koppen", "elevation", "turbidity", "country"}
    tl = tasks["turbidity"].layer_spec()
    assert (tl.kind, tl.scale, tasks["turbidity"].location, tasks["country"].location) == (
        "continuous",
        0.05,
        False,
        True,
    )
    assert tasks["koppen"].layer_spec().class_names == ["tropical", "arid", "temperate", "cold", "polar"]
    el = tasks["elevation"].layer_spec()
    assert (el.kind, el.scale, el.offset, el.nodata) == ("continuous", 28.0, -450.0, 255.0)
    assert tasks["country"].type == "vector" and tasks["country"].field == "ADMIN"
    assert vg_labels.vector_source_path(tasks["country"]).exists()
    C.check(default_config)
    assert tuple(C.section(C.EvaluateConfig, default_config["evaluate"], "evaluate").methods) == C.METHODS


@pytest.mark.parametrize(
    ("task", "key"),
    [
        ({"kind": "clustering", "source": "a.tif"}, "evaluate.tasks.t.kind"),
        ({"kind": "regression", "type": "vector", "source": "a.shp", "field": "x"}, "evaluate.tasks.t.kind"),
        ({"kind": "classification", "type": "vector", "source": "a.shp"}, "evaluate.tasks.t.field"),
        ({"kind": "classification", "source": "a.tif"}, "evaluate.tasks.t.classes"),
        ({"kind": "regression", "source": "builtin:nope"}, "evaluate.tasks.t.source"),
        (
            {"kind": "classification", "type": "vector", "source": "builtin:nope", "field": "x"},
            "evaluate.tasks.t.source",
        ),
    ],
)
def test_bad_task_names_key(task: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        vg_labels.task_specs({"evaluate": {"tasks": {"t": task}}})
    assert e.value.key == key


def test_bad_params_name_key(default_config: dict) -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.methods"):
        C.section(C.EvaluateConfig, {"methods": ["embedding", "magic"]}, "evaluate")
    with pytest.raises(ConfigError, match=r"evaluate\.methods"):
        C.section(C.EvaluateConfig, {"methods": ["latlng"]}, "evaluate")
    cfg = {**default_config, "evaluate": {**default_config["evaluate"], "fold_resolution": 9}}
    with pytest.raises(ConfigError, match=r"evaluate\.fold_resolution"):
        C.check(cfg)


# --------------------------------------------------------------------------- folds


def test_spatial_folds_never_split_a_block() -> None:
    rng = np.random.default_rng(1)
    cells = np.concatenate([cells_in_bbox(5), cells_in_bbox(5, (100.0, -10.0, 115.0, 5.0))])
    cells = cells[rng.permutation(len(cells))]
    k = 4
    folds = probes.spatial_folds(cells, 2, k, seed=3)
    parents = h3cells.parents(cells, 2)
    assert set(np.unique(folds)) == set(range(k))
    for f in range(k):
        test_blocks = set(parents[folds == f].tolist())
        train_blocks = set(parents[folds != f].tolist())
        assert not test_blocks & train_blocks
        # a test cell's own parent block is never in training
        assert not np.isin(parents[folds == f], parents[folds != f]).any()
    with pytest.raises(ConfigError, match=r"only \d blocks"):
        probes.spatial_folds(cells_in_bbox(5, (2.0, 45.0, 3.0, 46.0)), 1, 5, seed=0)
    sizes = np.bincount(folds, minlength=k)
    assert sizes.min() > 0.5 * len(cells) / k
    np.testing.assert_array_equal(folds, probes.spatial_folds(cells, 2, k, seed=3))
    assert not np.array_equal(folds, probes.spatial_folds(cells, 2, k, seed=4))


# --------------------------------------------------------------------------- features


def test_class_histogram_exact() -> None:
    cat = np.array([[[0, 1], [1, NODATA_INDEX]], [[3, 3], [3, 3]]], dtype=np.uint8)
    elev = np.array([[[1.0, 3.0], [np.nan, 5.0]], [[np.nan] * 2] * 2], dtype=np.float32)
    f = features.class_histogram_features({"landcover": cat, "elevation": elev}, SPECS)
    np.testing.assert_allclose(f[0], [0.25, 0.5, 0.0, 0.0, 3.0, np.std([1, 3, 5])], rtol=1e-6)
    np.testing.assert_allclose(f[1], [0, 0, 0, 1.0, 0.0, 0.0])


def test_latlng_unit_vectors() -> None:
    f = features.latlng_features(np.array([0.0, 90.0, 0.0]), np.array([0.0, 0.0, 90.0]))
    np.testing.assert_allclose(f, [[1, 0, 0], [0, 0, 1], [0, 1, 0]], atol=1e-7)


def test_probe_recovers_known_function_of_patch() -> None:
    """Label = a linear function of class fractions and mean elevation: the probes recover it."""
    n, p = 1500, 16
    patches = synthetic_patches(n, p, seed=0)
    x = features.class_histogram_features(patches, SPECS)
    frac = x[:, :4]
    mean_elev = np.nanmean(patches["elevation"].reshape(n, -1), axis=1)
    y = 2.0 * frac[:, 1] - 1.5 * frac[:, 3] + mean_elev / 1000.0
    folds = np.arange(n) % 5
    sc = probes.summarise(probes.probe_scores(x, y, "regression", folds), probes.REGRESSION_METRICS)
    assert sc["linear_r2"]["mean"] > 0.9
    assert sc["knn_r2"]["mean"] > 0.5
    # classification: the dominant class of the patch
    yc = np.argmax(frac, axis=1)
    sc = probes.summarise(probes.probe_scores(x, yc, "classification", folds), probes.CLASSIFICATION_METRICS)
    assert sc["linear_accuracy"]["mean"] > 0.9
    assert sc["linear_macro_f1"]["mean"] > 0.85
    # a label that is noise is not "recovered"
    noise = np.random.default_rng(5).normal(size=n)
    sc = probes.summarise(probes.probe_scores(x, noise, "regression", folds), probes.REGRESSION_METRICS)
    assert sc["linear_r2"]["mean"] < 0.1


def test_patch_features_pca_raw_and_random_init() -> None:
    """pca_raw (fitted on a prefix, streamed over batches) keeps a label that lives in the encoded patch."""
    from vectorgeo import model as vg_model

    n, p = 900, 16
    patches = synthetic_patches(n, p, seed=1)
    std = LayerSpec.from_config(
        "elevation", {"kind": "continuous", "source": "x.tif", "normalize": "standardize", "mean": 1500, "std": 900}
    )
    specs = {"landcover": LANDCOVER, "elevation": std}
    meta = vg_model.make_metadata(specs, p, 80.0, {"width": 8, "stages": 2, "blocks_per_stage": 1})
    embed = features.random_init_embed_fn(meta, seed=0)

    def patch_fn(lat: np.ndarray, lng: np.ndarray) -> dict[str, np.ndarray]:
        idx = lat.astype(int)
        return {k: v[idx] for k, v in patches.items()}

    def encode(b: dict[str, np.ndarray]) -> np.ndarray:
        return vg_model.encode(b, specs).numpy()

    lat = np.arange(n, dtype=np.float64)
    feats = features.patch_features(
        lat,
        lat,
        patch_fn,
        specs,
        ["class_histogram", "pca_raw", "random_init"],
        encode_fn=encode,
        embed_fn=embed,
        pca_dim=16,
        pca_fit_cells=300,
        batch_size=128,
        seed=0,
    )
    assert feats["pca_raw"].shape == (n, 16)
    assert feats["random_init"].shape == (n, 16)
    assert feats["class_histogram"].shape == (n, 6)
    np.testing.assert_allclose(np.linalg.norm(feats["random_init"], axis=1), 1.0, atol=1e-5)
    y = np.nanmean(patches["elevation"].reshape(n, -1), axis=1)
    folds = np.arange(n) % 3
    sc = probes.summarise(probes.probe_scores(feats["pca_raw"], y, "regression", folds), probes.REGRESSION_METRICS)
    assert sc["linear_r2"]["mean"] > 0.9
    # the same seed gives the same untrained model
    torch.manual_seed(123)
    again = features.random_init_embed_fn(meta, seed=0)(encode({k: v[:10] for k, v in patches.items()}))
    np.testing.assert_allclose(again, feats["random_init"][:10], atol=1e-6)  # other batch size: float order


# --------------------------------------------------------------------------- labels


def test_polygon_labels_vectorised() -> None:
    import shapely

    geoms = np.array([shapely.box(0, 0, 10, 10), shapely.box(10, 0, 20, 10), shapely.box(30, 0, 31, 1)], dtype=object)
    names = np.array(["Alpha", "Beta", "Alpha"])
    lat = np.array([5.0, 5.0, 0.5, 50.0])
    lng = np.array([5.0, 15.0, 30.5, 5.0])
    y, valid, classes = vg_labels.polygon_labels(geoms, names, lat, lng)
    assert classes == ["Alpha", "Beta"]
    np.testing.assert_array_equal(valid, [True, True, True, False])
    np.testing.assert_array_equal(y[:3], [0, 1, 0])


def test_country_labels_from_natural_earth(default_config: dict) -> None:
    task = vg_labels.task_specs(default_config)["country"]
    lat = np.array([48.85, 52.52, -33.87, 0.0, 35.68])
    lng = np.array([2.35, 13.40, 151.21, -30.0, 139.69])
    lab = vg_labels.task_labels(task, vg_labels.vector_source_path(task), lat, lng)
    names = [lab.class_names[i] if v else None for i, v in zip(lab.y, lab.valid, strict=True)]
    assert names == ["France", "Germany", "Australia", None, "Japan"]


def test_summarise_is_mean_and_population_std_over_folds() -> None:
    scores = {"linear_r2": [0.2, 0.5, 0.9], "knn_r2": [0.4, 0.4]}
    out = probes.summarise(scores, ["linear_r2", "knn_r2"])
    assert out["linear_r2"]["mean"] == pytest.approx(np.mean([0.2, 0.5, 0.9]))
    assert out["linear_r2"]["std"] == pytest.approx(np.std([0.2, 0.5, 0.9]))  # ddof=0
    assert out["linear_r2"]["std"] != pytest.approx(np.std([0.2, 0.5, 0.9], ddof=1))
    assert out["knn_r2"] == {"mean": pytest.approx(0.4), "std": 0.0, "folds": [0.4, 0.4]}
    assert out["linear_r2"]["folds"] == [0.2, 0.5, 0.9]


def test_unscored_folds_give_null_not_nan() -> None:
    x = np.random.default_rng(0).normal(size=(20, 3))
    y = np.zeros(20, np.int64)  # a single class: no fold can be scored
    sc = probes.summarise(probes.probe_scores(x, y, "classification", np.arange(20) % 2), probes.CLASSIFICATION_METRICS)
    assert sc["linear_macro_f1"] == {"mean": None, "std": None, "folds": []}


def test_drop_rare_classes() -> None:
    lab = probes.Labels(np.array([0, 0, 0, 1, 2, 2, 2]), np.array([True] * 6 + [False]), ["a", "b", "c"])
    out = probes.drop_rare_classes(lab, 2)
    np.testing.assert_array_equal(out.valid, [True, True, True, False, True, True, False])


# --------------------------------------------------------------------------- reading cells


def test_read_cells_draws_only_ok_cells(tmp_path: Path) -> None:
    cells = cells_in_bbox(4)
    half = len(cells) // 2
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(cells), 8)).astype(np.float32)
    status = ["ok" if i % 5 else "nodata" for i in range(len(cells))]
    write_embeddings(tmp_path / "a.parquet", cells[:half], emb[:half], status[:half], "v1")
    write_embeddings(tmp_path / "b.parquet", cells[half:], emb[half:], status[half:], "v1")
    paths = [tmp_path / "b.parquet", tmp_path / "a.parquet"]
    got = ev.read_cells(paths, 50, seed=2)
    n_ok = sum(s == "ok" for s in status)
    assert len(got) == 50 and got.n_ok == n_ok and got.model_version == "v1"
    pos = np.searchsorted(cells, got.h3)
    np.testing.assert_array_equal(cells[pos], got.h3)
    assert all(status[i] == "ok" for i in pos)
    np.testing.assert_array_equal(got.embedding, emb[pos])
    lat, lng = centroids(got.h3)
    np.testing.assert_allclose(got.lng, lng)
    np.testing.assert_allclose(got.lat, lat)
    # reproducible and prefix-stable; order of the file list does not matter
    again = ev.read_cells(list(reversed(paths)), 80, seed=2)
    np.testing.assert_array_equal(again.h3[:50], got.h3)
    everything = ev.read_cells(paths, 10**6, seed=0)
    assert len(everything) == n_ok and len(set(everything.h3.tolist())) == n_ok


def test_read_cells_bad_input(tmp_path: Path) -> None:
    cells = cells_in_bbox(3)
    emb = np.ones((len(cells), 4), np.float32)
    write_embeddings(tmp_path / "a.parquet", cells, emb, ["ok"] * len(cells), "v1")
    write_embeddings(tmp_path / "b.parquet", cells, emb, ["ok"] * len(cells), "v2")
    with pytest.raises(DataError, match="model_version"):
        ev.read_cells([tmp_path / "a.parquet", tmp_path / "b.parquet"], 10**6, 0)
    pq.write_table(pa.table({"h3": pa.array(cells, pa.uint64())}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet.*missing columns"):
        ev.read_cells([tmp_path / "c.parquet"], 10, 0)
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"d\.parquet"):
        ev.read_cells([tmp_path / "d.parquet"], 10, 0)
    write_embeddings(tmp_path / "e.parquet", cells, emb, ["nodata"] * len(cells), "v1")
    with pytest.raises(DataError, match="no cell with status 'ok'"):
        ev.read_cells([tmp_path / "e.parquet"], 10, 0)


# --------------------------------------------------------------------------- metrics


def fake_metrics(e: list[float], small_margin: float = 0.2) -> dict:
    """Two content tasks (a, b) and a location task (c); the embedding scores ``e`` on each of 5 folds."""

    def s(metric: str, folds: list[float]) -> dict:
        return {metric: {"mean": float(np.mean(folds)), "std": float(np.std(folds)), "folds": folds}}

    def content(metric: str) -> dict:
        base = [0.5] * 5
        methods = {"embedding": s(metric, e), **{b: s(metric, base) for b in C.SAME_INPUT_BASELINES}}
        margins = {"0.01": {"best_baseline": "pca_raw", "margin": small_margin},
                   "1.0": {"best_baseline": "pca_raw", "margin": float(np.mean(e)) - 0.5}}  # fmt: skip
        return {"methods": methods, "label_efficiency": {"margins": margins}}

    loc = {"latlng": s("linear_macro_f1", [0.3] * 5), "embedding+latlng": s("linear_macro_f1", [0.4] * 5)}
    loc.update({f"{b}+latlng": s("linear_macro_f1", [0.35] * 5) for b in C.SAME_INPUT_BASELINES})
    return {
        "tasks": {
            "a": {"kind": "classification", **content("linear_macro_f1")},
            "b": {"kind": "regression", **content("linear_r2")},
            "c": {"kind": "classification", "location": True, "methods": loc},
        },
        "n_cells": 10,
        "folds": 5,
    }


def test_goal_check() -> None:
    g = ev.goal_check(fake_metrics([0.6, 0.6, 0.6, 0.6, 0.4]))  # 4 of 5 folds and the mean
    assert g["passed"] and g["beats"]["context_histogram"] == {"a": True, "b": True}
    assert g["beats"]["latlng"] == {"c": True} and g["label_efficiency"] == {"a": True, "b": True}
    g = ev.goal_check(fake_metrics([0.9, 0.9, 0.4, 0.4, 0.4]))  # a higher mean, but only 2 of 5 folds
    assert not g["passed"] and g["beats"]["random_features"] == {"a": False, "b": False}
    g = ev.goal_check(fake_metrics([0.6] * 5, small_margin=0.05))  # the margin shrinks with fewer labels
    assert not g["passed"] and g["label_efficiency"] == {"a": False, "b": False}
    assert all(all(v.values()) for v in g["beats"].values())


def test_elevation_note_says_whether_held_out() -> None:
    task = vg_labels.TaskSpec.from_config("elev", {"kind": "regression", "source": "builtin:pvlib_altitude"})
    relief = LayerSpec.from_config("elevation", {"kind": "continuous", "source": "builtin:pvlib_altitude"})
    level = LayerSpec.from_config(
        "elevation", {"kind": "continuous", "source": "builtin:pvlib_altitude", "normalize": "standardize"}
    )
    assert "held out" in ev.elevation_note({"elev": task}, {"elevation": relief})[0]
    assert "NOT held out" in ev.elevation_note({"elev": task}, {"elevation": level})[0]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 10°×10° synthetic world: two layers, a trained-looking model, region files and three tasks."""
    from vectorgeo import model as vg_model
    from vectorgeo import sampling

    d = tmp_path_factory.mktemp("evalworld")
    shape = (200, 200)  # 0.05°
    field = smooth_field(shape, seed=0)
    lc = (1 + np.minimum((smooth_field(shape, seed=1) * 3).astype(np.uint8), 2)).astype(np.uint8)
    elev = (field * 3000).astype(np.int16)
    specs = {
        "landcover": LayerSpec.from_dict(
            {**LANDCOVER.to_dict(), "source": str(write_tif(d / "lc.tif", lc, BBOX, 255))}
        ),
        "elevation": LayerSpec.from_dict(
            {**ELEVATION.to_dict(), "source": str(write_tif(d / "elev.tif", elev, BBOX, -9999))},
        ),
    }
    layer_paths = {}
    for name, spec in specs.items():
        npy = d / f"{name}.npy"
        prepare_layer(spec, spec.source, npy, d / f"{name}.grid.json")
        layer_paths[name] = npy
    # labels: elevation again (regression), latitude bands (raster classes), west/east polygons (vector)
    bands = (1 + np.repeat(np.arange(3), [67, 67, 66])[:, None] * np.ones((1, 200))).astype(np.uint8)
    tasks = {
        "height": vg_labels.TaskSpec.from_config(
            "height", {"kind": "regression", "source": specs["elevation"].source, "nodata": -9999}
        ),
        "band": vg_labels.TaskSpec.from_config(
            "band",
            {
                "kind": "classification",
                "source": str(write_tif(d / "b.tif", bands, BBOX, 0)),
                "nodata": 0,
                "classes": {1: "north", 2: "middle", 3: "south"},
            },
        ),
    }
    label_paths: dict[str, Path] = {}
    for name, t in tasks.items():
        label_paths[name] = d / f"label_{name}.npy"
        prepare_layer(t.layer_spec(), t.source, label_paths[name], d / f"label_{name}.grid.json")
    import geopandas as gpd
    import shapely

    gpd.GeoDataFrame(
        {"NAME": ["West", "East"]}, geometry=[shapely.box(-1, 39, 5, 51), shapely.box(5, 39, 11, 51)], crs=4326
    ).to_file(d / "halves.geojson")
    tasks["side"] = vg_labels.TaskSpec.from_config(
        "side", {"kind": "classification", "type": "vector", "source": str(d / "halves.geojson"), "field": "NAME"}
    )
    label_paths["side"] = d / "halves.geojson"
    # model: same architecture as random_init but other weights (seeded differently)
    meta = vg_model.make_metadata(specs, 8, 40.0, {"width": 8, "stages": 2, "blocks_per_stage": 1}, TrainConfig(seed=0))
    torch.manual_seed(99)
    module = vg_model.build_model(meta, meta["architecture"]).eval()
    meta = vg_model.save(d / "model.pt", module, meta)
    layers = {
        n: __import__("vectorgeo.layers", fromlist=["Layer"]).Layer.open(s, layer_paths[n]) for n, s in specs.items()
    }
    cells = cells_in_bbox(5, (1.0, 41.0, 9.0, 49.0))
    lat, lng = centroids(cells)
    with torch.inference_mode():
        emb = module(vg_model.encode(sampling.patches(layers, lat, lng, 8, 40.0), meta)).numpy()
    status = ["ok"] * len(cells)
    status[3] = "nodata"
    half = len(cells) // 2
    paths = [
        write_embeddings(d / "r1.parquet", cells[:half], emb[:half], status[:half], meta["model_version"]),
        write_embeddings(d / "r2.parquet", cells[half:], emb[half:], status[half:], meta["model_version"]),
    ]
    training = {
        "epochs": [
            {"epoch": i, "train_loss": 0.5 / (i + 1), "val_loss": 0.6 / (i + 1), "val_triplet_accuracy": 0.6 + 0.05 * i}
            for i in range(4)
        ],
        "best_val_triplet_accuracy": 0.75,
        "pca_components_99": 9,
    }
    (d / "train_metrics.json").write_text(json.dumps(training))
    return {
        "dir": d,
        "paths": paths,
        "model": d / "model.pt",
        "layer_paths": layer_paths,
        "tasks": tasks,
        "label_paths": label_paths,
        "n_ok": len(cells) - 1,
        "meta": meta,
    }


def run_world(world: dict, out: Path, **kw: object) -> dict:
    params = C.EvaluateConfig(
        **{"max_cells": 2000, "map_cells": 5000, "folds": 3, "fold_resolution": 2, "pca_fit_cells": 500, **kw}
    )
    return ev.run_evaluation(
        world["paths"],
        world["model"],
        world["layer_paths"],
        world["tasks"],
        world["label_paths"],
        params,
        out / "metrics.json",
        out / "report.html",
        world["dir"] / "train_metrics.json",
    )


@pytest.mark.slow
def test_run_evaluation_end_to_end(world: dict, tmp_path: Path) -> None:
    m = run_world(world, tmp_path / "a")
    on_disk = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert on_disk == m
    assert set(m) == {"tasks", "n_cells", "folds", "embedding_dim", "effective_rank", "goal"}
    assert m["embedding_dim"] == 16 and 1.0 <= m["effective_rank"] <= 16
    params = C.EvaluateConfig(max_cells=2000, map_cells=5000, folds=3, fold_resolution=2, pca_fit_cells=500)
    drawn = ev.read_cells(world["paths"], max(params.max_cells, params.map_cells), params.seed)
    cells = ev.evaluation_cells(drawn, params)
    held = probes.selection_blocks(drawn.h3, 2, params.selection_fraction, params.seed)
    assert 0 < held.sum() < len(drawn) and not probes.selection_blocks(cells.h3, 2, 0.2, 0).any()
    assert m["n_cells"] == len(cells) == min(2000, int((~held).sum())) and m["folds"] == 3
    assert set(m["tasks"]) == {"height", "band", "side"}
    for name, t in m["tasks"].items():
        want = probes.CLASSIFICATION_METRICS if name != "height" else probes.REGRESSION_METRICS
        assert t["kind"] == ("regression" if name == "height" else "classification")
        assert list(t["methods"]) == probes.task_methods(False, C.METHODS) == list(C.BASE_METHODS)
        for res in t["methods"].values():
            assert list(res) == list(want)
            for v in res.values():
                assert set(v) == {"mean", "std", "folds"} and np.isfinite(v["mean"]) and np.isfinite(v["std"])
                assert len(v["folds"]) == 3 and v["mean"] == pytest.approx(np.mean(v["folds"]))
        # paired differences against the best baseline, fold by fold
        p = t["paired"]
        main = probes.MAIN_METRIC[t["kind"]]
        best = t["methods"][p["best_baseline"]][main]
        assert p["diffs"] == pytest.approx(np.subtract(t["methods"]["embedding"][main]["folds"], best["folds"]))
        assert best["mean"] == max(t["methods"][b][main]["mean"] for b in C.SAME_INPUT_BASELINES)
        # label efficiency: 1 %, 10 % and all the labels; all the labels give the main table's score
        curve = t["label_efficiency"]["scores"]
        assert list(curve) == ["0.01", "0.1", "1.0"]
        assert curve["1.0"]["embedding"]["mean"] == t["methods"]["embedding"][main]["mean"]
    # mean and std are those of the per-fold scores: recompute one task × method from the same cells and folds
    task = world["tasks"]["side"]
    labels = vg_labels.task_labels(task, world["label_paths"]["side"], cells.lat, cells.lng)
    lab = probes.drop_rare_classes(labels, task.min_class_cells)
    idx = np.flatnonzero(lab.valid)
    folds = probes.spatial_folds(cells.h3, params.fold_resolution, params.folds, params.seed)[idx]
    per_fold = probes.probe_scores(
        features.latlng_features(cells.lat, cells.lng)[idx], lab.y[idx], "classification", folds
    )
    assert len(per_fold["linear_macro_f1"]) == 3
    got = m["tasks"]["side"]["methods"]["latlng"]["knn_macro_f1"]
    assert got["mean"] == pytest.approx(np.mean(per_fold["knn_macro_f1"]))
    assert got["std"] == pytest.approx(np.std(per_fold["knn_macro_f1"]))
    # folds differ: some score varies across them
    assert max(v["std"] for t in m["tasks"].values() for r in t["methods"].values() for v in r.values()) > 0.01
    # labels are aligned with cells: patch statistics predict the centre elevation, position the latitude band
    assert m["tasks"]["height"]["methods"]["class_histogram"]["linear_r2"]["mean"] > 0.9
    assert m["tasks"]["band"]["methods"]["latlng"]["linear_macro_f1"]["mean"] > 0.8
    assert m["tasks"]["side"]["methods"]["latlng"]["linear_accuracy"]["mean"] > 0.9
    # reproducible with a fixed seed
    assert run_world(world, tmp_path / "b") == m
    report = (tmp_path / "a" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4  # scores, label efficiency, map, training
    assert "http://" not in report and "https://" not in report
    assert "normalised per patch" in report and "class_histogram" in report


@pytest.mark.slow
def test_run_evaluation_refuses_other_model(world: dict, tmp_path: Path) -> None:
    from vectorgeo import model as vg_model

    module, meta = vg_model.load(world["model"])
    other = vg_model.save(tmp_path / "other.pt", module, {**meta, "note": "retrained"})
    assert other["model_version"] != meta["model_version"]
    with pytest.raises(DataError, match="model_version"):
        ev.run_evaluation(
            world["paths"],
            tmp_path / "other.pt",
            world["layer_paths"],
            world["tasks"],
            world["label_paths"],
            C.EvaluateConfig(max_cells=100, map_cells=100),
            tmp_path / "m.json",
            tmp_path / "r.html",
        )
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
@pytest.mark.browser
def test_report_opens_offline_in_chromium(world: dict, tmp_path: Path) -> None:
    """The report renders in a real browser with the network cut off, and every figure has pixels."""
    from playwright.sync_api import sync_playwright

    require_system("Chromium", [] if Path(CHROMIUM).exists() else [CHROMIUM], "browser.sh")
    run_world(world, tmp_path, methods=("embedding", "latlng"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.route(
            "**/*",
            lambda route: route.abort() if not route.request.url.startswith(("file:", "data:")) else route.continue_(),
        )
        page.goto((tmp_path / "report.html").as_uri())
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == 4 and min(widths) > 100
        assert page.locator("table").count() >= 2
        assert not [u for u in requests if not u.startswith(("file:", "data:"))]
        browser.close()


# --------------------------------------------------------------------------- workflow


@pytest.mark.slow
def test_workflow_evaluate_rule(workflow_run: WorkflowRun) -> None:
    """The tiny test config through the real workflow up to the report; a hyperparameter reruns only evaluate."""
    from test_workflow import job_stats

    results = workflow_run.results
    metrics = json.loads((results / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"tasks", "n_cells", "folds", "embedding_dim", "effective_rank", "goal"}
    assert metrics["folds"] == 3 and metrics["embedding_dim"] == 64
    assert set(metrics["tasks"]) == {"koppen", "elevation", "turbidity", "country"}
    for name, t in metrics["tasks"].items():
        want = ["embedding", "latlng", *(f"{m}+latlng" for m in C.BASE_METHODS[:-1])] if name == "country" else []
        assert list(t["methods"]) == (want or list(C.BASE_METHODS))
    # every cell with an embedding outside the selection blocks is evaluated (max_cells 2000 is more than the
    # tiny stencil has)
    ok = []
    for p in (results / "embeddings" / "batches").glob("*/*_*.parquet"):
        t = pq.read_table(p)
        ok += [h for h, s in zip(t.column("h3").to_pylist(), t.column("status").to_pylist(), strict=True) if s == "ok"]
    held = probes.selection_blocks(np.array(ok, np.uint64), 3, 0.2, 0)
    n_ok = int((~held).sum())
    assert metrics["n_cells"] == n_ok > 0 and held.any()
    report = (results / "eval" / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 4  # scores, label efficiency, map, training curves
    assert "https://" not in report and "http://" not in report
    assert f"{n_ok} cells evaluated" in report
    assert "evaluating" in (workflow_run.workdir / "logs" / "evaluate" / "evaluate.log").read_text()
    header = (workflow_run.workdir / "benchmarks" / "evaluate" / "evaluate.tsv").read_text().split()[0]
    assert header == "s"  # Snakemake's benchmark table: seconds first
    assert "Nothing to be done" in workflow_run.snakemake("--cores", "2", "evaluate").stdout
    (workflow_run.workdir / "config" / "knn.yaml").write_text(yaml.safe_dump({"evaluate": {"knn_k": 3}}))
    dry = workflow_run.snakemake("-n", "evaluate", overlays=("knn",)).stdout
    assert dict(job_stats(dry)) == {"evaluate": 1}
