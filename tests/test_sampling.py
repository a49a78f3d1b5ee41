"""Triplet sampling: geometry on the sphere, rejection rules, shard format and reproducibility."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest
import yaml
from conftest import WorkflowRun
from scipy.stats import chisquare

from vectorgeo.config import SampleConfig, section
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.layers import Layer, LayerSpec
from vectorgeo.rasters import Grid, prepare_layer
from vectorgeo.sampling import (
    SampleStats,
    TripletSampler,
    destination,
    gather_patches,
    haversine_km,
    max_class_fraction,
)
from vectorgeo.shards import read_shard

PARAMS = SampleConfig(patch_px=16, patch_km=80, neighbor_km_min=10, neighbor_km_max=40, distant_km_min=250, batch=4096)


@pytest.fixture(scope="module")
def shard(tmp_path_factory, builtin_layers, land_mask):  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("shards") / "shard-0.npz"
    stats = TripletSampler(builtin_layers, land_mask, PARAMS).write_shard(path, 3000, seed=7, shard=0)
    read = read_shard(path)
    return path, read.arrays, read.meta, stats


def test_shard_format(shard, builtin_layers) -> None:  # type: ignore[no-untyped-def]
    _, a, meta, stats = shard
    for role in ("anchor", "neighbor", "distant"):
        assert a[f"{role}_landcover"].shape == (3000, 16, 16) and a[f"{role}_landcover"].dtype == np.uint8
        assert a[f"{role}_elevation"].shape == (3000, 16, 16) and a[f"{role}_elevation"].dtype == np.float32
        assert a[f"{role}_latlng"].shape == (3000, 2) and a[f"{role}_latlng"].dtype == np.float64
        assert a[f"{role}_imagery"].shape == (3000, 16, 16, 3) and a[f"{role}_imagery"].dtype == np.float32
        # the wide context patch (8 x 80 km) of every layer, beside the local one
        assert a[f"{role}_landcover@1"].shape == (3000, 16, 16) and a[f"{role}_imagery@1"].shape == (3000, 16, 16, 3)
        lc = a[f"{role}_landcover"]
        assert ((lc < builtin_layers["landcover"].spec.n_classes) | (lc == 255)).all()
    assert meta["patch_px"] == 16 and meta["patch_km"] == 80 and meta["scales"] == [1.0, 8.0]
    assert set(meta["layers"]) == {"landcover", "elevation", "imagery"}
    # a wide patch covers 8x the ground: its pixels around the centre repeat the local patch at 1/8 scale
    lat, lng = a["anchor_latlng"][:50, 0], a["anchor_latlng"][:50, 1]
    wide = gather_patches(builtin_layers, lat, lng, 16, 640)[0]["landcover"]
    np.testing.assert_array_equal(wide, a["anchor_landcover@1"][:50])
    assert 0 < stats.acceptance <= 1 and stats.accepted == 3000


def test_distances(shard) -> None:  # type: ignore[no-untyped-def]
    _, a, _, _ = shard
    an, nb, ds = a["anchor_latlng"], a["neighbor_latlng"], a["distant_latlng"]
    d_n = haversine_km(an[:, 0], an[:, 1], nb[:, 0], nb[:, 1])
    d_d = haversine_km(an[:, 0], an[:, 1], ds[:, 0], ds[:, 1])
    assert d_n.min() >= 10 - 1e-6 and d_n.max() <= 40 + 1e-6
    assert d_d.min() >= 250
    # distances spread over the band (uniform), not piled at one end
    assert 20 < np.median(d_n) < 30


def test_rejection_thresholds_hold(shard, builtin_layers) -> None:  # type: ignore[no-untyped-def]
    _, a, _, _ = shard
    n_classes = builtin_layers["landcover"].spec.n_classes
    for role in ("anchor", "neighbor", "distant"):
        lc = a[f"{role}_landcover"]
        invalid = (lc == 255) | (lc == 0)  # nodata or water
        assert invalid.reshape(len(lc), -1).mean(1).max() <= PARAMS.max_nodata_frac
        assert np.isnan(a[f"{role}_elevation"]).reshape(len(lc), -1).mean(1).max() <= PARAMS.max_nodata_frac
        assert max_class_fraction(lc, n_classes).max() <= PARAMS.max_same_frac


def test_same_seed_same_bytes(tmp_path, builtin_layers, land_mask) -> None:  # type: ignore[no-untyped-def]
    s = TripletSampler(builtin_layers, land_mask, PARAMS)
    digests = []
    for name in ("a.npz", "b.npz"):
        s.write_shard(tmp_path / name, 500, seed=3, shard=2)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    s.write_shard(tmp_path / "c.npz", 500, seed=3, shard=3)
    assert digests[0] == digests[1]
    assert hashlib.sha256((tmp_path / "c.npz").read_bytes()).hexdigest() != digests[0]


def test_anchor_density_follows_land_area(builtin_layers, land_mask) -> None:  # type: ignore[no-untyped-def]
    """With rejection switched off, anchors per 15° latitude band ∝ the land area of the band (chi-square)."""
    params = SampleConfig(patch_px=4, patch_km=10, max_nodata_frac=1.0, max_same_frac=1.0, batch=20000)
    sampler = TripletSampler(builtin_layers, land_mask, params)
    rng = np.random.default_rng(11)
    stats = SampleStats()
    lats = np.concatenate([sampler.sample_batch(rng, stats)[1]["anchor"][:, 0] for _ in range(10)])
    edges = np.arange(-90, 91, 15)
    observed, _ = np.histogram(lats, edges)
    # expected: land pixels of each mask row weighted by the row's pixel area (∝ cos φ)
    g = land_mask.grid
    row_lat = g.y0 + (np.arange(g.height) + 0.5) * g.dy
    land_rows = np.zeros(g.height)
    for r0 in range(0, g.height, 2000):
        block = np.asarray(land_mask.array[r0 : r0 + 2000])
        land_rows[r0 : r0 + len(block)] = (block == 0).sum(1)
    area = land_rows * np.cos(np.radians(row_lat))
    expected_w, _ = np.histogram(row_lat, edges, weights=area)
    keep = expected_w > 0
    expected = expected_w[keep] / expected_w.sum() * observed.sum()
    _, p = chisquare(observed[keep], expected)
    assert p > 0.001, (observed, expected.round())
    # and not what Web Mercator or uniform-in-latitude sampling would give
    naive, _ = np.histogram(np.linspace(-90, 90, 1000), edges)
    assert chisquare(observed[keep], naive[keep] / naive[keep].sum() * observed.sum())[1] < 1e-6


def test_patch_ground_width_same_at_60n(tmp_path, raster_fixtures) -> None:  # type: ignore[no-untyped-def]
    """Stripes 10 km wide on the ground: a 50-km patch crosses the same stripes at the equator and at 60°N."""
    spec = LayerSpec.from_config(
        "stripes", {"kind": "categorical", "source": "s.tif", "nodata": 255, "classes": {0: "even", 1: "odd"}}
    )
    prepare_layer(spec, raster_fixtures / "stripes.tif", tmp_path / "s.npy", tmp_path / "s.grid.json")
    layer = Layer.open(spec, tmp_path / "s.npy")
    px = 50
    vals, bad, _ = gather_patches({"s": layer}, np.array([0.0, 60.0]), np.array([0.0, 0.0]), px, 50.0)
    assert bad["s"].max() == 0
    x_km = ((np.arange(px) + 0.5) / px - 0.5) * 50.0
    expected = (np.floor(x_km / 10.0) % 2).astype(np.uint8)
    for i in range(2):
        row = vals["s"][i, px // 2]
        assert (row == expected).mean() >= 0.94, (i, row, expected)
        assert (np.diff(row.astype(int)) != 0).sum() in (4, 5)


def test_antimeridian_patch_wraps(builtin_layers) -> None:  # type: ignore[no-untyped-def]
    # Chukotka spans the antimeridian: a patch centred on it takes pixels from both sides
    vals, bad, pole = gather_patches(builtin_layers, np.array([66.0, 66.0]), np.array([179.95, -180.05]), 16, 80.0)
    assert not pole.any() and bad["landcover"][0] < 0.5
    assert np.array_equal(vals["landcover"][0], vals["landcover"][1])
    lc = vals["landcover"][0]
    assert (lc[:, :8] != 255).any() and (lc[:, 8:] != 255).any()
    _lat2, lng2 = destination(np.array([0.0]), np.array([179.95]), np.array([np.pi / 2]), np.array([20.0]))
    assert -180 <= lng2[0] < -179.7


def test_pole_refused(builtin_layers) -> None:  # type: ignore[no-untyped-def]
    _, bad, pole = gather_patches(builtin_layers, np.array([89.9, -89.9, 80.0]), np.array([0.0, 0.0, 0.0]), 16, 80.0)
    assert list(pole) == [True, True, False]
    assert bad["landcover"][0] == 1.0


def test_bad_params() -> None:
    with pytest.raises(ConfigError, match=r"sample\.neighbor_km_min"):
        section(SampleConfig, {"neighbor_km_min": 50, "neighbor_km_max": 40}, "sample")
    with pytest.raises(ConfigError, match=r"sample\.patch_px"):
        section(SampleConfig, {"patch_px": 3}, "sample")


def test_layer_without_land_in_range(land_mask) -> None:  # type: ignore[no-untyped-def]
    """A layer whose grid covers only the open Pacific: no usable patch anywhere → error naming the layer."""
    spec = LayerSpec.from_config("pacific", {"kind": "continuous", "source": "p.tif"})
    layer = Layer(spec, Grid(-150.0, 10.0, 0.1, -0.1, 100, 100), np.ones((100, 100), dtype=np.float32))
    sampler = TripletSampler({"pacific": layer}, land_mask, SampleConfig(batch=512))
    sampler.MAX_EMPTY_BATCHES = 5
    with pytest.raises(ConfigError, match=r"layers\.pacific"):
        sampler.write_shard("/tmp/never-written.npz", 10, seed=0, shard=0)


def test_corrupt_shard(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "bad.npz"
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"bad\.npz"):
        read_shard(p)


def test_changing_patch_km_makes_only_sampling_and_downstream_stale(workflow_run: WorkflowRun) -> None:
    """After the complete tiny run, change sample.patch_km: the dry run lists the sample rules and what
    depends on them, nothing upstream (layers, stencil) and nothing that does not read the samples."""
    from test_workflow import embed_batches, job_stats

    assert not job_stats(workflow_run.snakemake("-n").stdout)
    (workflow_run.workdir / "config" / "patch.yaml").write_text(yaml.safe_dump({"sample": {"patch_km": 60}}))
    stale = job_stats(workflow_run.snakemake("-n", overlays=("patch",)).stdout)
    # the model is trained on the samples; embeddings, loads, rollups, tiles and the evaluation follow from
    # it; the region windows are cut for the patch size
    assert stale == Counter(
        {
            "sample_triplets": 2,
            "train_model": 1,
            "cut_windows": 1,
            "embed_batch": len(embed_batches(workflow_run.results)),
            "rollup": 1,
            "build_tiles": 1,
            "load_regions": 1,
            "build_index": 1,
            "evaluate": 1,
            "all": 1,
        }
    ), stale
