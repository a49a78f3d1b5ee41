"""The tiny workflow with every input and output in S3 (profiles/s3), against moto's S3 server.

One module-scoped run builds every stage of the workflow (stencil to evaluate, the load rules into a
database of the session's PostgreSQL) shaped like the production run: the elevation layer is a list of
s3:// GeoTIFF tiles that the mosaic_layer rule merges, every output goes to S3 (default storage), and
region jobs read only their region's window. The tests then check the objects in the bucket and the
loaded rows by content, change a tile and check that a dry run lists exactly the jobs downstream of it
and that a second run re-uploads exactly their outputs, count the bytes a region job downloads, and
rerun the stencil checkpoint with unchanged cells to check that no per-region job reruns. Another test
dry-runs config/production.yaml as it is, against stand-in objects at its keys.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import create_database
from test_workflow import (
    BIN,
    PER_BATCH_RULES,
    TEST_BATCH_CELLS,
    TINY_JOBS,
    configfiles,
    finished_jobs,
    job_stats,
    make_workdir,
    planned_jobs,
    run_snakemake,
)

from vectorgeo import probes, regionfiles, store
from vectorgeo.stencil import digest_cells
from vectorgeo.windows import window_nbytes

pytestmark = pytest.mark.s3

BUCKET = "vectorgeo-test"
PREFIX = "run"
# two tiles that together cover the test extent plus the sampling margin that prepared layers are cropped to
ELEVATION_TILES = {
    "inputs/elevation/west.tif": (-12.0, 31.0, -5.0, 42.0),
    "inputs/elevation/east.tif": (-5.0, 31.0, 2.0, 42.0),
}
ELEVATION_STEP = 0.05
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def elevation_tif(version: int, bounds: tuple[float, float, float, float]) -> bytes:
    """A synthetic elevation GeoTIFF tile (int16 metres): a mountain range, plus a hill that grows with version."""
    import rasterio
    from rasterio.transform import from_origin

    w, s, e, n = bounds
    lng = w + ELEVATION_STEP * (np.arange(round((e - w) / ELEVATION_STEP)) + 0.5)
    lat = n - ELEVATION_STEP * (np.arange(round((n - s) / ELEVATION_STEP)) + 0.5)
    la, lo = np.meshgrid(lat, lng, indexing="ij")
    z = 100 + 2500 * np.exp(-((lo + 3.3) ** 2 / 2.0 + (la - 37.1) ** 2 / 0.1))
    z += 800 * np.sin(lo * 3.0) * np.cos(la * 2.0) + 300 * version * np.exp(-((lo + 5.5) ** 2 + (la - 36.0) ** 2))
    buf = io.BytesIO()
    with rasterio.open(
        buf,
        "w",
        driver="GTiff",
        width=len(lng),
        height=len(lat),
        count=1,
        dtype="int16",
        crs="EPSG:4326",
        transform=from_origin(w, n, ELEVATION_STEP, ELEVATION_STEP),
        nodata=-32768,
    ) as ds:
        ds.write(z.astype(np.int16), 1)
    return buf.getvalue()


@dataclass
class S3Run:
    """The moto server, the working directory and how to run the workflow against them."""

    client: Any
    workdir: Path
    env: dict[str, str]
    url: str
    moto_log: Path
    all_jobs: Counter[str] = field(default_factory=Counter)
    elevation_version: int = 0

    def snakemake(self, *args: str, overlays: tuple[str, ...] = (), targets: list[str] | None = None) -> str:
        return run_snakemake(
            self.workdir,
            "--profile",
            str(Path(__file__).resolve().parents[1] / "profiles" / "s3"),
            *(targets or []),  # before the options that take several values (default: every final output)
            *configfiles("s3", *overlays),
            "--cores",
            "2",
            *args,
            env=self.env,
        ).stdout

    def objects(self) -> dict[str, tuple[str, Any]]:
        """key (below the run prefix) -> (ETag, LastModified) of every object the workflow wrote."""
        return list_objects(self.client)

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")["Body"].read())

    def put_elevation(self, version: int) -> None:
        # S3 modification times have a resolution of one second: make the new input strictly newer
        time.sleep(1.1)
        for key, bounds in ELEVATION_TILES.items():
            self.client.put_object(Bucket=BUCKET, Key=key, Body=elevation_tif(version, bounds))
        self.elevation_version = version

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads(self.get("results/stencil/manifest.json")))


@contextmanager
def moto_s3(log_dir: Path, bucket: str = BUCKET, prefix: str = PREFIX) -> Iterator[tuple[Any, dict[str, str]]]:
    """A moto S3 server on a free 127.0.0.1 port with an empty bucket.

    Yields a boto3 client and the environment that points Snakemake (and profiles/s3) at
    ``s3://<bucket>/<prefix>``.
    """
    import boto3

    port = _free_port()
    with open(log_dir / "moto.log", "w") as log:
        server = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            endpoint = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        pytest.fail(f"moto_server did not start on {endpoint}")
                    time.sleep(0.2)
            keys = {"access": "testing", "secret": "testing"}
            client = boto3.client(
                "s3",
                endpoint_url=endpoint,
                aws_access_key_id=keys["access"],
                aws_secret_access_key=keys["secret"],
                region_name="us-east-1",
            )
            client.create_bucket(Bucket=bucket)
            yield (
                client,
                {
                    "SNAKEMAKE_STORAGE_S3_ENDPOINT_URL": endpoint,
                    "SNAKEMAKE_STORAGE_S3_ACCESS_KEY": keys["access"],
                    "SNAKEMAKE_STORAGE_S3_SECRET_KEY": keys["secret"],
                    "VECTORGEO_S3_PREFIX": f"s3://{bucket}/{prefix}",
                },
            )
        finally:
            server.terminate()
            server.wait(timeout=30)


def list_objects(client: Any, bucket: str = BUCKET, prefix: str = PREFIX) -> dict[str, tuple[str, Any]]:
    """key (below the prefix) -> (ETag, LastModified) of every object under ``prefix``."""
    out: dict[str, tuple[str, Any]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1 :]] = (o["ETag"], o["LastModified"])
    return out


def gets(moto_log: Path, offset: int, prefix: str = PREFIX) -> list[str]:
    """Keys (below ``prefix``) of the objects downloaded (GET, whole or in ranges) since ``offset`` of moto's
    request log, each once."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", moto_log.read_bytes()[offset:].decode(errors="replace"))  # colours
    paths = re.findall(r'"GET /([^ ?"]+)[^"]* HTTP/[0-9.]+" 20[06]', text)
    keys = []
    for path in paths:
        for head in (f"{BUCKET}/{prefix}/", f"{prefix}/"):  # path-style or virtual-host-style requests
            if path.startswith(head) and path[len(head) :] not in keys:
                keys.append(path[len(head) :])
                break
    return keys


@pytest.fixture(scope="module")
def s3run(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Run]:
    moto_dir = tmp_path_factory.mktemp("moto")
    with moto_s3(moto_dir) as (client, env):
        overlays = {
            "s3": {
                "layers": {
                    "elevation": {
                        "source": [f"s3://{BUCKET}/{key}" for key in ELEVATION_TILES],
                        "nodata": -32768,
                        "scale": 1.0,
                        "offset": 0.0,
                    }
                }
            },
            "prune2": {"stencil": {"prune_resolution": 2}},
        }
        workdir = make_workdir(tmp_path_factory.mktemp("s3-workdir"), overlays)
        url = create_database(pg_cluster, "s3")
        run = S3Run(client, workdir, {**env, "VECTORGEO_DATABASE_URL": url}, url, moto_dir / "moto.log")
        run.put_elevation(0)
        run.all_jobs = finished_jobs(run.snakemake())
        yield run


def test_outputs_are_objects_in_the_bucket(s3run: S3Run) -> None:
    objects = s3run.objects()
    for layer in ("landcover", "elevation", "land_mask"):
        assert f"results/layers/{layer}.npy" in objects
        assert f"results/layers/{layer}.grid.json" in objects
        assert f"logs/prepare_layer/{layer}.log" in objects
    grid = json.loads(s3run.get("results/layers/elevation.grid.json"))
    assert grid["layer"]["source"] == [f"s3://{BUCKET}/{key}" for key in ELEVATION_TILES]
    assert "results/layers/elevation.mosaic.tif" in objects
    elevation = np.load(io.BytesIO(s3run.get("results/layers/elevation.npy")))
    assert elevation.dtype == np.int16 and elevation.max() > 1500  # the synthetic mountains, cropped

    manifest = s3run.manifest()
    assert manifest["resolution"] == 5 and len(manifest["regions"]) >= 2
    stencil_cells = {}
    for region, entry in manifest["regions"].items():
        table = pq.read_table(io.BytesIO(s3run.get(f"results/stencil/regions/{region}.parquet")))
        h3 = table.column("h3").to_numpy()
        assert len(h3) == entry["cells"] and np.all(np.diff(h3.astype(np.int64)) > 0)
        assert digest_cells(h3) == entry["digest"]
        stencil_cells[region] = h3
    lat = np.concatenate(
        [
            pq.read_table(io.BytesIO(s3run.get(f"results/stencil/regions/{r}.parquet"))).column("lat").to_numpy()
            for r in manifest["regions"]
        ]
    )
    assert lat.min() >= 35.0 - 0.1 and lat.max() <= 38.0 + 0.1

    batches = regionfiles.partition(manifest["regions"], TEST_BATCH_CELLS)
    per_batch = dict.fromkeys(PER_BATCH_RULES, len(batches))
    assert s3run.all_jobs == Counter({**TINY_JOBS, "mosaic_layer": 1, **per_batch})
    batch_of = {r: name for name, b in batches.items() for r, _ in b.regions}

    shards = sorted(k for k in objects if k.startswith("results/samples/") and k.endswith(".npz"))
    assert shards == ["results/samples/shard-0.npz", "results/samples/shard-1.npz"]
    with np.load(io.BytesIO(s3run.get(shards[0]))) as z:
        assert z["anchor_elevation"].shape[0] == 512 and z["anchor_latlng"].shape == (512, 2)
        assert np.nanmax(z["anchor_elevation"]) > 1000

    assert {"results/model/model.pt", "results/model/metrics.json", "results/model/training.png"} <= set(objects)
    model_version = json.loads(s3run.get("results/model/metrics.json"))["model_version"]

    n_ok = 0
    ok_cells: list[np.ndarray] = []
    for region, entry in manifest["regions"].items():
        key = f"results/embeddings/batches/{batch_of[region]}/{region}_{entry['digest']}.parquet"
        assert key in objects, sorted(objects)
        table = pq.read_table(io.BytesIO(s3run.get(key)))
        assert b"geo" in (table.schema.metadata or {})
        assert np.array_equal(np.sort(table.column("h3").to_numpy()), stencil_cells[region])
        ok = np.array([s == "ok" for s in table.column("status").to_pylist()])
        assert ok.any()
        n_ok += int(ok.sum())
        ok_cells.append(table.column("h3").to_numpy()[ok])
        emb = np.array([v for v, good in zip(table.column("embedding").to_pylist(), ok, strict=True) if good])
        assert np.all(np.isfinite(emb))
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    loaded = json.loads(s3run.get("results/loaded/regions.json"))
    assert loaded["model_version"] == model_version
    assert {r: v["rows"] for r, v in loaded["regions"].items()} == {
        r: entry["cells"] for r, entry in manifest["regions"].items()
    }
    rollup = json.loads(s3run.get("results/embeddings/rollup/summary.json"))
    assert rollup["regions"] == len(manifest["regions"])

    # the load rules read the embeddings from S3 and wrote every stencil cell once
    total = sum(len(c) for c in stencil_cells.values())
    index = json.loads(s3run.get("results/loaded/index.json"))
    assert index["rows"] == total and index["model_version"] == model_version
    with store.connect(s3run.url) as conn:
        assert store.count(conn) == total
        for region, cells in stencil_cells.items():
            assert store.count(conn, region) == len(cells)

    metrics = json.loads(s3run.get("results/eval/metrics.json"))
    # every ok cell outside the selection blocks (fold_resolution 3 in the test config) is evaluated
    held = probes.selection_blocks(np.concatenate(ok_cells).astype(np.uint64), 3, 0.2, 0)
    assert metrics["n_cells"] == n_ok - int(held.sum()) and held.any()
    assert set(metrics["tasks"]) == {"koppen", "elevation", "turbidity", "country"}
    assert s3run.get("results/eval/report.html").count(b"data:image/png;base64,") == 4

    # nothing but Snakemake's own bookkeeping stays in the working directory
    assert not (s3run.workdir / "results").exists()
    assert not (s3run.workdir / "logs").exists()


def test_changed_input_reruns_and_reuploads_only_its_downstream(s3run: S3Run) -> None:
    before = s3run.objects()
    assert not job_stats(s3run.snakemake("-n"))

    s3run.put_elevation(s3run.elevation_version + 1)
    dry = s3run.snakemake("-n")
    planned = planned_jobs(dry)
    counts = job_stats(dry)
    assert [w["layer"] for rule, w in planned if rule == "prepare_layer"] == ["elevation"], dry[-4000:]
    assert "stencil" not in counts  # the land mask did not change: the stencil and its regions stay
    # everything else in the tiny workflow reads elevation, directly or through samples and model, except
    # the evaluation labels (their own sources)
    unchanged = Counter({"prepare_layer": 3, "stencil": 1, "prepare_eval_label": s3run.all_jobs["prepare_eval_label"]})
    assert counts == s3run.all_jobs - unchanged, dry[-4000:]
    regions = s3run.manifest()["regions"]
    batches = regionfiles.partition(regions, TEST_BATCH_CELLS)
    assert counts["embed_batch"] == len(batches) and counts["load_regions"] == 1

    s3run.snakemake()
    after = s3run.objects()
    changed = {k for k in after if before.get(k) is None or before[k][1] != after[k][1]}
    kept = ("results/stencil/", "results/layers/landcover.", "results/layers/imagery.", "results/layers/land_mask.")
    kept += ("results/eval/labels/",)
    results = {k for k in after if k.startswith("results/")}
    assert {k for k in changed if k.startswith("results/")} == {k for k in results if not k.startswith(kept)}
    assert "results/layers/elevation.npy" in changed
    keys = {f"results/embeddings/batches/{n}/{r}_{d}.parquet" for n, b in batches.items() for r, d in b.regions}
    assert keys <= changed
    assert "results/loaded/regions.json" in changed
    # every region has new embeddings, so each was loaded again
    assert json.loads(s3run.get("results/loaded/regions.json"))["loaded"] == len(regions)
    # the regions were replaced, not added again
    with store.connect(s3run.url) as conn:
        assert store.count(conn) == sum(v["cells"] for v in regions.values())
    # logs follow their jobs: re-uploaded for the rerun ones only
    assert "logs/prepare_layer/elevation.log" in changed
    assert (
        not {"logs/prepare_layer/landcover.log", "logs/prepare_layer/land_mask.log", "logs/stencil/stencil.log"}
        & changed
    )
    elevation = np.load(io.BytesIO(s3run.get("results/layers/elevation.npy")))
    assert elevation.max() > 1500
    assert not job_stats(s3run.snakemake("-n"))


def test_lost_batch_output_is_rebuilt_alone(s3run: S3Run) -> None:
    """Deleting one embed batch's objects rebuilds and re-uploads that batch alone, and its job downloads its
    regions' windows, never a whole layer.

    The batch folders are the targets here: Snakemake does not rebuild a missing intermediate
    output whose consumers (the rollup) are up to date.
    """
    batches = regionfiles.partition(s3run.manifest()["regions"], TEST_BATCH_CELLS)
    targets = [f"results/embeddings/batches/{name}" for name in batches]
    # a batch of several regions
    name, batch = next((n, b) for n, b in batches.items() if len(b.regions) > 1)
    keys = [f"results/embeddings/batches/{name}/{f}" for f in batch.files()]
    before = s3run.objects()
    assert set(keys) <= set(before)
    for key in [k for k in before if k.startswith(f"results/embeddings/batches/{name}/")]:
        s3run.client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")
    before = s3run.objects()
    dry = s3run.snakemake("-n", targets=targets)
    planned = [w["batch"] for rule, w in planned_jobs(dry) if rule == "embed_batch"]
    assert planned == [name], dry[-4000:]
    assert dict(job_stats(dry)) == {"embed_batch": 1}
    # as on a fresh node: no local copies of objects, so every input the job reads is downloaded
    shutil.rmtree(s3run.workdir / ".snakemake" / "storage", ignore_errors=True)
    offset = s3run.moto_log.stat().st_size
    s3run.snakemake(targets=targets)

    # the batch job downloaded its regions' windows (and small files), never a whole layer
    downloaded = [k for k in gets(s3run.moto_log, offset) if k != "results/stencil/manifest.json"]
    window_keys = [f"results/windows/{r}.npz" for r, _ in batch.regions]
    assert set(window_keys) <= set(downloaded) and not [k for k in downloaded if k.endswith(".npy")], downloaded
    window = sum(pq_free_window_bytes(s3run.get(k)) for k in window_keys)
    transferred = sum(s3run.client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{k}")["ContentLength"] for k in downloaded)
    assert transferred <= 2 * window, (transferred, window, downloaded)
    after = s3run.objects()
    changed = {k for k in after if before.get(k) is None or before[k][1] != after[k][1]}
    assert {k for k in changed if k.startswith("results/") and not k.endswith(".snakemake_timestamp")} == set(keys)
    # what reads that batch's embeddings is now stale (and what reads those outputs), nothing else is
    downstream = {"rollup": 1, "build_tiles": 1, "load_regions": 1, "build_index": 1, "evaluate": 1, "all": 1}
    dry = s3run.snakemake("-n")
    assert dict(job_stats(dry)) == downstream, dry[-4000:]
    s3run.snakemake()
    # the load job loaded those regions again at most (the rebuilt files may equal the loaded ones byte for byte)
    loaded = json.loads(s3run.get("results/loaded/regions.json"))
    again = [r for r, v in loaded["regions"].items() if v["loaded"]]
    assert set(again) <= {r for r, _ in batch.regions}, loaded
    assert not job_stats(s3run.snakemake("-n"))


def pq_free_window_bytes(content: bytes) -> int:
    """Raw bytes of the layer windows in a window file's content."""
    with tempfile.NamedTemporaryFile(suffix=".npz") as f:
        f.write(content)
        f.flush()
        return window_nbytes(f.name)


def test_stencil_rerun_with_same_cells_keeps_every_region_output(s3run: S3Run) -> None:
    """A new stencil run whose regions keep their cells (and digests) reruns no per-region job."""
    before = s3run.objects()
    digests = {r: v["digest"] for r, v in s3run.manifest()["regions"].items()}
    out = s3run.snakemake(overlays=("prune2",))  # the stencil's params change, its cells do not
    assert "stencil" in {rule for rule, _ in planned_jobs(out)}
    assert not {"embed_batch", "load_regions"} & {rule for rule, _ in planned_jobs(out)}, out[-4000:]
    assert {r: v["digest"] for r, v in s3run.manifest()["regions"].items()} == digests
    after = s3run.objects()
    assert before["results/stencil/manifest.json"][1] != after["results/stencil/manifest.json"][1]
    embeddings = [k for k in before if k.startswith(("results/embeddings/", "results/loaded/"))]
    changed = [k for k in embeddings if before[k] != after[k]]
    assert embeddings and not changed, (changed, out[-4000:])
    # and the leftover local copy of the manifest did not block the checkpoint rerun
    assert "ProtectedOutputException" not in out
    # back to the test config's stencil: again a stencil job and nothing else
    out = s3run.snakemake()
    assert {rule for rule, _ in planned_jobs(out)} == {"stencil"}, out[-4000:]
    assert all(before[k] == s3run.objects()[k] for k in embeddings)


def tiny_tif(dtype: str = "uint8") -> bytes:
    """A 2 x 2 GeoTIFF: a stand-in object where only the key matters (a dry run reads no data)."""
    import rasterio
    from rasterio.transform import from_origin

    buf = io.BytesIO()
    with rasterio.open(
        buf,
        "w",
        driver="GTiff",
        width=2,
        height=2,
        count=1,
        dtype=dtype,
        crs="EPSG:4326",
        transform=from_origin(0.0, 1.0, 0.5, 0.5),
    ) as ds:
        ds.write(np.zeros((2, 2), dtype=dtype), 1)
    return buf.getvalue()


def test_production_config_builds_its_dag(tmp_path: Path) -> None:
    """config/production.yaml, unchanged, through profiles/s3: the DAG up to the stencil checkpoint.

    Its inputs are stand-ins at the production keys (the LC100 map, 84 GMTED tiles) in a moto bucket.
    """
    production = yaml.safe_load((ROOT / "config" / "production.yaml").read_text())
    sources = [production["layers"]["landcover"]["source"], production["land_mask"]["source"]]
    tiles = production["layers"]["elevation"]["source"]
    assert isinstance(tiles, list) and len(tiles) == 84
    workdir = make_workdir(tmp_path / "workdir")
    with moto_s3(tmp_path) as (client, env):
        for url in {*sources, *tiles}:
            bucket, _, key = url.removeprefix("s3://").partition("/")
            if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key=key, Body=tiny_tif())
        out = run_snakemake(
            workdir,
            "-n",
            "--profile",
            str(ROOT / "profiles" / "s3"),
            "--configfile",
            "config/production.yaml",
            env=env,
        ).stdout
    expected = {
        "mosaic_layer": 1,  # the GMTED tiles, merged once
        "prepare_layer": 4,  # landcover, elevation, imagery (the default's Blue Marble), land_mask
        "stencil": 1,
        "sample_triplets": production["sample"]["shards"],
        "train_model": 1,
        "prepare_eval_label": 3,  # koppen, elevation, turbidity
        # the jobs that gather every region, waiting for the stencil checkpoint (load_regions appears
        # once it ran: build_index names it then)
        "rollup": 1,
        "build_tiles": 1,
        "build_index": 1,
        "evaluate": 1,
        "all": 1,
    }
    assert job_stats(out) == Counter(expected), out[-4000:]
    planned = planned_jobs(out)
    assert {w["layer"] for rule, w in planned if rule == "mosaic_layer"} == {"elevation"}
    for url in tiles:
        assert url.removeprefix("s3://") in out, url
