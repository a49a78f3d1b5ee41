"""The workflow under hostile inputs and interruptions: a layer whose source is a list of local tiles (its DAG
builds and it runs, a missing tile is named before any job runs), and a run interrupted with SIGINT (Ctrl-C)
while regions are embedded, then rerun: it completes, and every GeoParquet under results/ reads in full.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import rasterio
import yaml
from conftest import WorkflowRun
from rasterio import Affine
from test_workflow import (
    BIN,
    ROOT,
    SNAKEMAKE,
    TEST_CONFIG,
    configfiles,
    embed_batches,
    finished_jobs,
    job_stats,
    make_workdir,
    planned_jobs,
    run_snakemake,
    stencil_regions,
)

from vectorgeo import geoparquet
from vectorgeo.config import load_config
from vectorgeo.layers import Layer, LayerSpec

TILE_RES = 0.05


def write_tiles(folder: Path) -> list[str]:
    """Four 7° × 7° uint8 tiles around the tiny config's box (lng -12..2, lat 30..44): value = 10 * tile + row // 20."""
    folder.mkdir(parents=True, exist_ok=True)
    n = round(7 / TILE_RES)
    names = []
    for i, (x0, y0) in enumerate([(-12.0, 44.0), (-5.0, 44.0), (-12.0, 37.0), (-5.0, 37.0)]):
        data = (10 * i + np.repeat(np.arange(n)[:, None] // 20, n, axis=1)).astype(np.uint8)
        path = folder / f"elev_{i}.tif"
        with rasterio.open(
            path, "w", driver="GTiff", width=n, height=n, count=1, dtype="uint8", crs="EPSG:4326",
            transform=Affine(TILE_RES, 0, x0, 0, -TILE_RES, y0), nodata=255,
        ) as ds:  # fmt: skip
            ds.write(data, 1)
        names.append(f"tiles/{path.name}")  # relative to the working directory, as a user writes them
    return names


def test_a_layer_from_a_list_of_local_tiles_builds_its_dag_and_runs(tmp_path: Path) -> None:
    wd = make_workdir(tmp_path / "wd")
    tiles = write_tiles(wd / "tiles")
    (wd / "config" / "tiles.yaml").write_text(yaml.safe_dump({"layers": {"elevation": {"source": tiles}}}))
    dry = run_snakemake(wd, *configfiles("tiles"), "-n").stdout
    jobs = planned_jobs(dry)
    assert ("mosaic_layer", {"layer": "elevation"}) in [(r, {"layer": w.get("layer")}) for r, w in jobs], dry[-4000:]
    layers = set(load_config([wd / "config" / "config.yaml", wd / TEST_CONFIG])["layers"])  # the overlay adds none
    assert {"landcover", "elevation"} <= layers
    assert {w["layer"] for r, w in jobs if r == "prepare_layer"} == layers | {"land_mask"}

    out = run_snakemake(wd, *configfiles("tiles"), "--cores", "2", "results/layers/elevation.npy").stdout
    assert finished_jobs(out) == Counter({"mosaic_layer": 1, "prepare_layer": 1}), out[-4000:]
    spec = LayerSpec.from_config("elevation", {"kind": "continuous", "source": tiles, "nodata": 255})
    layer = Layer.open(spec, wd / "results" / "layers" / "elevation.npy")
    # (36.475 N, 6.5 W): tile 2 (south-west), row 10.5 -> raw 20 + 10 // 20; (38.925 N, 3.1 W): tile 1, row 101.5
    raw = layer.raw_at(np.array([36.475, 38.925]), np.array([-6.5, -3.1]))[0]
    assert list(raw) == [20, 10 + 101 // 20]
    # a glob of the same tiles is a tile set too
    (wd / "config" / "glob.yaml").write_text(yaml.safe_dump({"layers": {"elevation": {"source": "tiles/*.tif"}}}))
    assert run_snakemake(wd, *configfiles("glob"), "-n").returncode == 0


def test_a_missing_tile_is_named_before_any_job_runs(tmp_path: Path) -> None:
    wd = make_workdir(tmp_path / "wd")
    tiles = [*write_tiles(wd / "tiles"), "tiles/elev_9.tif"]
    (wd / "config" / "tiles.yaml").write_text(yaml.safe_dump({"layers": {"elevation": {"source": tiles}}}))
    proc = run_snakemake(wd, *configfiles("tiles"), "-n", check=False)
    assert proc.returncode != 0
    assert "config key 'layers.elevation.source'" in proc.stdout and "tiles/elev_9.tif" in proc.stdout, proc.stdout
    assert "does not exist" in proc.stdout and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert not (wd / "results").exists()


# --- interrupted -------------------------------------------------------------------------------------------------
def read_every_parquet(results: Path) -> dict[str, int]:
    """Every Parquet file under results/, read in full (rows per file); region files also validated."""
    rows = {}
    for path in sorted(results.rglob("*.parquet")):
        rows[str(path.relative_to(results))] = pq.read_table(path).num_rows
        if path.parent.parent.name == "batches":
            geoparquet.read_region(path)
    return rows


def temp_files(results: Path) -> list[str]:
    return sorted(str(p.relative_to(results)) for p in results.rglob(".*") if p.name not in (".", ".."))


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_embed_batch_then_rerun(workflow_run: WorkflowRun, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to Snakemake's process group) while the first batch is embedded: no region file is left
    half-written, no batch folder is left incomplete; the rerun (plain, no flags) completes, and every GeoParquet
    under results/ reads in full."""
    wd = tmp_path / "wd"
    shutil.copytree(workflow_run.workdir, wd, symlinks=True)  # the finished run, with its Snakemake metadata
    results = wd / "results"
    regions = stencil_regions(results)
    batches = embed_batches(results)
    assert len(batches) >= 2
    folders = results / "embeddings" / "batches"
    shutil.rmtree(folders)
    shutil.rmtree(results / "embeddings" / "rollup")
    shutil.rmtree(wd / "logs" / "embed_batch")
    target = "results/embeddings/rollup/summary.json"

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **workflow_run.env}
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), *configfiles(), "--cores", "1", target]
    # SIGINT as a terminal's Ctrl-C delivers it; a test run started in the background of a non-interactive
    # shell inherits SIGINT ignored, and so would Snakemake (Python keeps an inherited SIG_IGN)
    proc = subprocess.Popen(cmd, cwd=wd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
    logs = wd / "logs" / "embed_batch"
    deadline = time.monotonic() + 300
    while not (logs.is_dir() and any(logs.iterdir())):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "no embed_batch job started"
        time.sleep(0.05)
    time.sleep(0.3)  # inside the job (the log opens after torch is imported): a tiny batch takes ~0.2 s more
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-4000:]
    done = [n for n in batches if (folders / n).exists()]
    assert len(done) < len(batches), f"the interrupt came after every batch was embedded:\n{out[-3000:]}"
    for n in done:  # a folder that remains holds every region of its batch
        assert sorted(p.name for p in (folders / n).glob("*.parquet")) == sorted(batches[n].files())
    read_every_parquet(results)  # what exists is complete; a killed job's temp file may remain until the rerun

    again = run_snakemake(wd, *configfiles(), "--cores", "2", target, env=workflow_run.env).stdout
    assert finished_jobs(again)["embed_batch"] == len(batches) - len(done), again[-4000:]
    rows = read_every_parquet(results)
    batch_of = {r: n for n, b in batches.items() for r, _ in b.regions}
    for region, entry in regions.items():
        assert rows[f"embeddings/batches/{batch_of[region]}/{region}_{entry['digest']}.parquet"] == entry["cells"]
    assert any(name.startswith("embeddings/rollup/") for name in rows)
    assert not [t for t in temp_files(results) if ".parquet" in t], temp_files(results)
    assert not job_stats(run_snakemake(wd, *configfiles(), "-n", target, env=workflow_run.env).stdout)
