"""Stage 3: region embedding, embed_points, rollup, and the embed rules run by real Snakemake."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vectorgeo import embed as vg_embed
from vectorgeo import geoparquet, regionfiles
from vectorgeo import model as vg_model
from vectorgeo import rollup as vg_rollup
from vectorgeo.config import EmbedConfig, section
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.layers import Layer, LayerSpec
from vectorgeo.stencil import STENCIL_SCHEMA, centroids, change_resolution, digest_cells

# a small, cheap encoder: the tests check the data path, not the network
ARCH = {"width": 8, "stages": 2, "blocks_per_stage": 1, "embedding_dim": 8, "head_hidden": 16}
GIBRALTAR = "82391ffffffffff"  # res-2 cell over southern Spain, the strait and northern Morocco: land and sea
MADRID = "82390ffffffffff"  # its neighbour to the north, all land


def make_model(path: Path, specs: dict[str, LayerSpec], seed: int = 0, patch_px: int = 16) -> dict:
    torch.manual_seed(seed)
    module = vg_model.build_model(specs, ARCH)
    return vg_model.save(path, module, vg_model.make_metadata(specs, patch_px, 80.0, ARCH))


def stencil_table(region: str, res: int) -> pa.Table:
    """All res-``res`` children of a region cell (land or not), as a stencil region table."""
    parent = np.array([h3.str_to_int(region)], dtype=np.uint64)
    cells = np.sort(change_resolution(parent, res))
    lat, lng = centroids(cells)
    return pa.table(
        {"h3": cells, "lat": lat, "lng": lng, "region": np.full(len(cells), parent[0])}, schema=STENCIL_SCHEMA
    )


@pytest.fixture(scope="module")
def layers(builtin_layers: dict[str, Layer]) -> dict[str, Layer]:
    return builtin_layers


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, layers: dict[str, Layer]) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    make_model(path, {n: lay.spec for n, lay in layers.items()})
    return path


@pytest.fixture(scope="module")
def region_file(tmp_path_factory: pytest.TempPathFactory, layers: dict[str, Layer], model_file: Path) -> Path:
    """Embeddings of the 343 res-5 cells of GIBRALTAR, batch 64: the last batch is partial (23 cells)."""
    table = stencil_table(GIBRALTAR, 5)
    assert table.num_rows % 64 != 0
    out = tmp_path_factory.mktemp("emb") / f"{GIBRALTAR}_{digest_cells(table.column('h3').to_numpy())}.parquet"
    vg_embed.embed_region(model_file, None, layers, table, out, batch_size=64, device="cpu")
    return out


# --- region files ---------------------------------------------------------------------------------------


def test_every_cell_once_and_equal_to_embed_points(region_file: Path, layers: dict, model_file: Path) -> None:
    table = stencil_table(GIBRALTAR, 5)
    data = geoparquet.read_region(region_file, check_norm=True)
    np.testing.assert_array_equal(data.h3, table.column("h3").to_numpy())  # each cell once, in stencil order
    status = np.array(data.status.to_pylist())
    assert set(status) == {"ok", "nodata"}  # the strait and the Mediterranean coast: both kinds
    assert (status == "ok").sum() > 100 and (status == "nodata").sum() > 5
    np.testing.assert_array_equal(data.valid, status == "ok")
    # another batch size, points given as plain lat/lng: the same vectors
    points = vg_embed.embed_points(
        model_file, layers, table.column("lat").to_numpy(), table.column("lng").to_numpy(), batch_size=50, device="cpu"
    )
    assert points.shape == (table.num_rows, ARCH["embedding_dim"])
    ok = data.valid
    np.testing.assert_allclose(points[ok], data.embedding[ok], atol=2e-5)
    assert np.isnan(points[~ok]).all()
    norms = np.linalg.norm(data.embedding[ok], axis=1)
    assert np.abs(norms - 1).max() < 1e-5
    meta = vg_model.load(model_file)[1]
    assert data.model_version == meta["model_version"]
    assert data.metadata["region"] == GIBRALTAR
    assert data.metadata["status_counts"] == {"ok": int(ok.sum()), "nodata": int((~ok).sum()), "pole": 0}


def test_several_gather_workers_keep_stencil_order(
    tmp_path: Path, region_file: Path, layers: dict, model_file: Path
) -> None:
    out = tmp_path / "w3.parquet"
    vg_embed.embed_region(
        model_file, None, layers, stencil_table(GIBRALTAR, 5), out, batch_size=16, workers=3, device="cpu"
    )
    a, b = geoparquet.read_region(region_file), geoparquet.read_region(out)
    np.testing.assert_array_equal(a.h3, b.h3)
    np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_allclose(a.embedding, b.embedding, atol=2e-5)


def test_nodata_threshold_decides_status(layers: dict, model_file: Path) -> None:
    table = stencil_table(GIBRALTAR, 5)
    lat, lng = table.column("lat").to_numpy(), table.column("lng").to_numpy()
    strict = vg_embed.embed_points(model_file, layers, lat, lng, max_nodata_frac=0.0, device="cpu")
    loose = vg_embed.embed_points(model_file, layers, lat, lng, max_nodata_frac=1.0, device="cpu")
    # threshold 1: only poles are null; threshold 0: any water pixel makes a cell null
    assert not np.isnan(loose).any()
    assert (
        np.isnan(strict[:, 0]).sum()
        > np.isnan(vg_embed.embed_points(model_file, layers, lat, lng, device="cpu")[:, 0]).sum()
    )


def test_all_nodata_region_gives_rows_with_status(tmp_path: Path, layers: dict, model_file: Path) -> None:
    """Mid-Pacific cells (all ocean) and cells at the North Pole: every row written, none embedded."""
    ocean = stencil_table(h3.latlng_to_cell(0.0, -140.0, 2), 4)
    pole_cells = np.sort([h3.str_to_int(c) for c in h3.grid_disk(h3.latlng_to_cell(89.99, 0.0, 6), 1)]).astype(
        np.uint64
    )
    plat, plng = centroids(pole_cells)
    pole = pa.table(
        {"h3": pole_cells, "lat": plat, "lng": plng, "region": np.zeros(len(pole_cells), np.uint64)},
        schema=STENCIL_SCHEMA,
    )
    table = pa.concat_tables([ocean, pole])
    out = tmp_path / "ocean.parquet"
    res = vg_embed.embed_region(model_file, None, layers, table, out, batch_size=16, device="cpu")
    assert res.counts == {"ok": 0, "nodata": ocean.num_rows, "pole": pole.num_rows}
    data = geoparquet.read_region(out)
    assert len(data) == table.num_rows
    assert not data.valid.any()
    assert data.status.to_pylist() == ["nodata"] * ocean.num_rows + ["pole"] * pole.num_rows
    assert pq.read_table(out).column("embedding").null_count == table.num_rows


def test_empty_region(tmp_path: Path, layers: dict, model_file: Path) -> None:
    out = tmp_path / "empty.parquet"
    res = vg_embed.embed_region(model_file, None, layers, STENCIL_SCHEMA.empty_table(), out, device="cpu")
    assert res.cells == 0 and len(geoparquet.read_region(out)) == 0


def test_region_file_round_trips_through_pyarrow_geopandas_duckdb(region_file: Path) -> None:
    import duckdb
    import geopandas

    t = pq.read_table(region_file)
    assert t.schema.field("h3").type == pa.uint64()
    assert t.schema.field("embedding").type == pa.list_(pa.float32(), ARCH["embedding_dim"])
    assert t.schema.field("status").type == pa.string()
    geo = json.loads(t.schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"

    gdf = geopandas.read_parquet(region_file)
    assert gdf.crs.to_epsg() == 4326
    assert len(gdf) == t.num_rows
    np.testing.assert_allclose(gdf.geometry.x.to_numpy(), t.column("lng").to_numpy())
    np.testing.assert_allclose(gdf.geometry.y.to_numpy(), t.column("lat").to_numpy())
    assert list(gdf["h3_str"][:3]) == [h3.int_to_str(int(c)) for c in t.column("h3").to_numpy()[:3]]

    con = duckdb.connect()
    rows = con.execute(
        "SELECT status, count(*), count(embedding), min(len(embedding)) FROM read_parquet(?) GROUP BY status "
        "ORDER BY status",
        [str(region_file)],
    ).fetchall()
    counts = {s: (n, n_emb, d) for s, n, n_emb, d in rows}
    ok = int(pa.compute.sum(pa.compute.equal(t.column("status"), "ok")).as_py())
    assert counts["ok"] == (ok, ok, ARCH["embedding_dim"])
    assert counts["nodata"][1] == 0  # null embeddings stay null
    first = con.execute(
        "SELECT h3, embedding FROM read_parquet(?) WHERE status = 'ok' ORDER BY h3 LIMIT 1", [str(region_file)]
    ).fetchone()
    assert first is not None
    data = geoparquet.read_region(region_file)
    i = int(np.flatnonzero(data.h3 == np.uint64(first[0]))[0])
    np.testing.assert_allclose(np.array(first[1], np.float32), data.embedding[i])


# --- bad input ------------------------------------------------------------------------------------------


def test_corrupt_model_file_is_a_data_error(tmp_path: Path, layers: dict) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00not a model" * 100)
    with pytest.raises(DataError, match=r"model\.pt"):
        vg_embed.embed_points(bad, layers, [40.0], [-3.5], device="cpu")
    with pytest.raises(DataError, match="does not exist"):
        vg_embed.embed_region(tmp_path / "missing.pt", None, layers, stencil_table(MADRID, 4), tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_model_layer_missing_from_config_names_the_layer(tmp_path: Path, layers: dict) -> None:
    slope = LayerSpec.from_config("slope", {"kind": "continuous", "source": "slope.tif"})
    path = tmp_path / "model.pt"
    make_model(path, {**{n: lay.spec for n, lay in layers.items()}, "slope": slope})
    with pytest.raises(ConfigError, match="slope") as e:
        vg_embed.embed_points(path, layers, [40.0], [-3.5], device="cpu")
    assert e.value.key == "layers.slope"
    # what the workflow script checks against the config's layers section
    meta = vg_model.load(path)[1]
    with pytest.raises(ConfigError, match="slope"):
        vg_model.check_layers(meta, {n: lay.spec for n, lay in layers.items()})


def test_stale_digest_is_refused(tmp_path: Path, layers: dict, model_file: Path) -> None:
    with pytest.raises(DataError, match="digest"):
        vg_embed.embed_region(
            model_file, None, layers, stencil_table(MADRID, 4), tmp_path / "x.parquet", digest="0" * 12
        )


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ConfigError) as e:
        section(EmbedConfig, {"batch_size": 0}, "embed")
    assert e.value.key == "embed.batch_size"
    with pytest.raises(ConfigError) as e:
        section(EmbedConfig, {"max_nodata_frac": 1.5}, "embed")
    assert e.value.key == "embed.max_nodata_frac"
    with pytest.raises(ConfigError) as e:
        vg_embed.device_name("tpu")
    assert e.value.key == "embed.device"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device") as e:
            vg_embed.device_name("cuda")
        assert e.value.key == "embed.device"


def test_embed_points_accepts_a_loaded_model(layers: dict, model_file: Path) -> None:
    pair = vg_model.load(model_file)
    a = vg_embed.embed_points(pair, layers, [40.0, 37.0], [-3.5, -4.5], device="cpu")
    b = vg_embed.embed_points(model_file, layers, [40.0, 37.0], [-3.5, -4.5], device="cpu")
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.cuda
def test_cuda_region_embeddings_match_cpu(tmp_path: Path, layers: dict, model_file: Path, region_file: Path) -> None:
    """The same region on the GPU: same cells and statuses, the same directions (TF32 convolutions allowed)."""
    out = tmp_path / region_file.name
    vg_embed.embed_region(model_file, None, layers, stencil_table(GIBRALTAR, 5), out, batch_size=64, device="cuda")
    gpu, cpu = geoparquet.read_region(out), geoparquet.read_region(region_file)
    np.testing.assert_array_equal(gpu.h3, cpu.h3)
    np.testing.assert_array_equal(gpu.valid, cpu.valid)
    assert gpu.model_version == cpu.model_version
    cosine = np.sum(gpu.embedding[gpu.valid] * cpu.embedding[cpu.valid], axis=1)
    assert cosine.min() > 0.999, cosine.min()


# --- rollup ---------------------------------------------------------------------------------------------


def test_embed_batch_writes_each_region_as_embed_region_does(
    tmp_path: Path, layers: dict, model_file: Path, region_file: Path
) -> None:
    """One model load for several regions: each region's file holds what embed_region writes for it."""
    from vectorgeo.stencil import write_stencil  # noqa: F401  (the stencil files below use its schema)
    from vectorgeo.windows import cut_windows

    specs = {n: lay.spec for n, lay in layers.items()}
    regions = [GIBRALTAR, MADRID]
    windows = [tmp_path / "windows" / f"{r}.npz" for r in regions]
    (tmp_path / "windows").mkdir()
    cut_windows(layers, regions, 80.0, windows)
    stencils = []
    (tmp_path / "stencil").mkdir()
    for r in regions:
        stencils.append(tmp_path / "stencil" / f"{r}.parquet")
        pq.write_table(stencil_table(r, 5), stencils[-1])
    pairs = [(r, digest_cells(stencil_table(r, 5).column("h3").to_numpy())) for r in regions]
    name = f"batch-{GIBRALTAR}-{regionfiles.batch_digest(pairs)}"
    out = tmp_path / "batches" / name
    result = vg_embed.embed_batch(model_file, specs, windows, stencils, out, batch=name, batch_size=64, device="cpu")
    assert [r.cells for r in result.regions] == [343, 343] and result.cells == 686
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{r}_{d}.parquet" for r, d in pairs)
    assert regionfiles.region_files([out]) == sorted(str(out / f"{r}_{d}.parquet") for r, d in pairs)
    a, b = geoparquet.read_region(region_file), geoparquet.read_region(out / region_file.name)
    np.testing.assert_array_equal(a.h3, b.h3)
    np.testing.assert_array_equal(a.valid, b.valid)
    np.testing.assert_allclose(a.embedding, b.embedding, atol=2e-5)
    madrid = geoparquet.read_region(out / f"{MADRID}_{pairs[1][1]}.parquet", check_norm=True)
    assert madrid.metadata["region"] == MADRID and madrid.valid.sum() > 300  # all land

    # a stale batch name (another stencil), window and stencil lists of other regions: refused, nothing written
    with pytest.raises(DataError, match="do not hash to batch"):
        vg_embed.embed_batch(
            model_file, specs, windows, stencils, tmp_path / "stale", batch=f"batch-{GIBRALTAR}-{'0' * 12}"
        )
    with pytest.raises(DataError, match="same regions"):
        vg_embed.embed_batch(model_file, specs, windows[::-1], stencils, tmp_path / "swapped")
    assert not (tmp_path / "stale").exists() and not (tmp_path / "swapped").exists()


def test_rollup_is_the_renormalised_mean_of_ok_children(tmp_path: Path, region_file: Path) -> None:
    outs = [tmp_path / "rollup" / "res3.parquet", tmp_path / "rollup" / "res4.parquet"]
    written = vg_rollup.rollup([region_file], [3, 4], outs)
    data = geoparquet.read_region(region_file)
    for p, out in zip((3, 4), outs, strict=True):
        t = pq.read_table(out)
        assert written[p] == t.num_rows
        parents = np.array([h3.str_to_int(h3.cell_to_parent(h3.int_to_str(int(c)), p)) for c in data.h3[data.valid]])
        expect = {}
        for q in np.unique(parents):
            e = data.embedding[data.valid][parents == q].astype(np.float64)
            expect[int(q)] = (e.sum(0) / np.linalg.norm(e.sum(0)), len(e))
        assert sorted(expect) == t.column("h3").to_pylist()
        emb = np.array(t.column("embedding").to_pylist(), np.float32)
        for i, q in enumerate(t.column("h3").to_pylist()):
            np.testing.assert_allclose(emb[i], expect[q][0], atol=1e-6)
            assert t.column("children")[i].as_py() == expect[q][1]
        assert t.schema.field("children").type == pa.int32()
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_prune_superseded_keeps_current_batches_only(tmp_path: Path) -> None:
    batches = tmp_path / "embeddings" / "batches"
    names = [f"batch-{GIBRALTAR}-{'a' * 12}", f"batch-{MADRID}-{'b' * 12}", f"batch-{GIBRALTAR}-{'c' * 12}"]
    for n in names:
        (batches / n).mkdir(parents=True)
        (batches / n / f"{GIBRALTAR}_{'d' * 12}.parquet").write_text("x")
    (batches / "notes").mkdir()
    # a region file of the one-file-per-job layout, a temp file and the rollup folder beside the batches
    flat = f"{MADRID}_{'e' * 12}.parquet"
    for n in [flat, ".tmpfile.parquet.tmp", "notes.txt"]:
        (tmp_path / "embeddings" / n).write_text("x")
    (tmp_path / "embeddings" / "rollup").mkdir()
    removed = vg_rollup.prune_superseded(batches, [batches / names[1], batches / names[2]])
    assert [p.name for p in removed] == [names[0], flat]
    assert sorted(p.name for p in batches.iterdir()) == sorted([names[1], names[2], "notes"])
    assert sorted(p.name for p in (tmp_path / "embeddings").iterdir()) == sorted(
        ["batches", ".tmpfile.parquet.tmp", "notes.txt", "rollup"]
    )


# --- the workflow ---------------------------------------------------------------------------------------

RULES = ["--allowed-rules", "stencil", "cut_windows", "embed_batch", "rollup"]


def _link_layers(dst: Path, layers: dict[str, Layer], land_mask: Layer) -> None:
    """Put the prepared built-in layers where the workflow expects them (hard links: no copy)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name, layer in {**layers, "land_mask": land_mask}.items():
        src = Path(layer.array.filename)  # type: ignore[attr-defined]  # a memmap
        for a, b in ((src, dst / f"{name}.npy"), (src.with_suffix(".grid.json"), dst / f"{name}.grid.json")):
            try:
                os.link(a, b)
            except OSError:
                shutil.copy(a, b)


def _embedding_files(workdir: Path) -> dict[str, tuple[int, int]]:
    """Region file name -> (inode, mtime): a rewrite (atomic rename) changes the inode."""
    return {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted((workdir / "results" / "embeddings" / "batches").glob("*/*.parquet"))
    }


def _embedded_regions(output: str, workdir: Path) -> list[str]:
    """The regions of the embed_batch jobs a run planned (batches of the current stencil manifest)."""
    from test_workflow import planned_jobs

    manifest = json.loads((workdir / "results" / "stencil" / "manifest.json").read_text())
    batches = regionfiles.partition(manifest["regions"], 1)
    return sorted(
        r for rule, w in planned_jobs(output) if rule == "embed_batch" for r, _ in batches[w["batch"]].regions
    )


@pytest.mark.slow
def test_workflow_reruns_exactly_what_changed(
    tmp_path: Path, layers: dict[str, Layer], land_mask: Layer, default_config: dict
) -> None:
    """Run Snakemake for real (a dry run cannot see past the stencil checkpoint)."""
    from test_workflow import make_workdir, run_snakemake

    def overlay(regions: list[str]) -> dict:
        return {
            "stencil": {"resolution": 5, "region_resolution": 2, "prune_resolution": 2, "extent": {"regions": regions}},
            # one region per embed job: what reruns is exactly the regions that changed
            "embed": {"batch_size": 100, "rollup_resolutions": [3, 4], "device": "cpu", "batch_cells": 1},
        }

    workdir = make_workdir(tmp_path / "wd", {"one": overlay([GIBRALTAR]), "two": overlay([GIBRALTAR, MADRID])})
    _link_layers(workdir / "results" / "layers", layers, land_mask)
    model = workdir / "results" / "model" / "model.pt"
    specs = {n: lay.spec for n, lay in layers.items()}
    make_model(model, specs, seed=0)

    def run(overlay_name: str) -> str:
        args = ["--configfile", f"config/{overlay_name}.yaml", "--cores", "2", *RULES, "--", "rollup"]
        return run_snakemake(workdir, *args).stdout

    out = run("one")
    assert _embedded_regions(out, workdir) == [GIBRALTAR]
    first = _embedding_files(workdir)
    assert len(first) == 1
    manifest = json.loads((workdir / "results" / "stencil" / "manifest.json").read_text())
    assert list(first) == [f"{r}_{v['digest']}.parquet" for r, v in manifest["regions"].items()]

    # nothing changed: nothing runs
    assert "Nothing to be done" in run("one")

    # a region added to the stencil: the checkpoint reruns (rewriting every region's stencil file),
    # but only the new region is embedded
    out = run("two")
    assert _embedded_regions(out, workdir) == [MADRID]
    second = _embedding_files(workdir)
    assert len(second) == 2
    assert {k: v for k, v in second.items() if k.startswith(GIBRALTAR)} == first

    # a new model: every region reruns, and its files carry the new model_version
    version = make_model(model, specs, seed=1)["model_version"]
    out = run("two")
    assert _embedded_regions(out, workdir) == sorted([GIBRALTAR, MADRID])
    third = _embedding_files(workdir)
    assert third.keys() == second.keys() and all(third[k][0] != second[k][0] for k in third)
    stencil = {
        r: pq.read_table(workdir / "results" / "stencil" / "regions" / f"{r}.parquet") for r in (GIBRALTAR, MADRID)
    }
    for name in third:
        data = geoparquet.read_region(
            next((workdir / "results" / "embeddings" / "batches").glob(f"*/{name}")), check_norm=True
        )
        assert data.model_version == version
        np.testing.assert_array_equal(data.h3, stencil[name[:15]].column("h3").to_numpy())
    summary = json.loads((workdir / "results" / "embeddings" / "rollup" / "summary.json").read_text())
    assert summary["regions"] == 2 and set(summary["rollups"]) == {"3", "4"}

    # a region dropped from the stencil: its file is removed; one file per current region remains
    out = run("one")
    assert _embedded_regions(out, workdir) == []
    assert list(_embedding_files(workdir)) == list(first)
    log = (workdir / "logs" / "rollup" / "rollup.log").read_text()
    assert "removed superseded" in log and MADRID in log

    # the audit of a finished stage 3 passes, and notices a stray file
    audit = vg_rollup.audit(workdir / "results")
    assert audit["ok"], audit
    assert audit["rows"] == audit["stencil_cells"] > 0 and audit["model_version"] == version
    emb_dir = workdir / "results" / "embeddings"
    (current,) = (emb_dir / "batches").glob(f"*/{next(iter(first))}")
    shutil.copy(current, current.parent / f"{GIBRALTAR}_{'0' * 12}.parquet")
    audit = vg_rollup.audit(workdir / "results")
    assert not audit["ok"] and audit["extra_files"] == [f"{GIBRALTAR}_{'0' * 12}.parquet"]

    # a corrupt model file: the job fails with a message naming the file, and leaves no output behind
    model.write_bytes(b"PK\x03\x04 truncated")
    args = ["--configfile", "config/one.yaml", "--cores", "1", *RULES, "--", "rollup"]
    proc = run_snakemake(workdir, *args, check=False)
    assert proc.returncode != 0
    log_text = next((workdir / "logs" / "embed_batch").glob("*.log")).read_text()
    assert "model.pt" in log_text and "not a readable model file" in log_text, log_text[-2000:]
    assert not any(p.name.startswith(".") for p in emb_dir.iterdir())  # no temp files left
    assert not list((emb_dir / "batches").glob("*"))  # the failed batch's folder is removed
