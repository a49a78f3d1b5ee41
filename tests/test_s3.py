"""The tiny workflow with every input and output in S3 (profiles/s3), against moto's S3 server.

One module-scoped run builds every stage of the workflow (stencil to evaluate, the load rules into a
database of the session's PostgreSQL) with the elevation layer read from an s3:// GeoTIFF. The tests
then check the objects in the bucket and the loaded rows by content, change that GeoTIFF and check that
a dry run lists exactly the jobs downstream of it and that a second run re-uploads exactly their
outputs, and rerun the stencil checkpoint with unchanged cells to check that no per-region job reruns.
"""

from __future__ import annotations

import io
import json
import socket
import subprocess
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
from conftest import create_database
from test_workflow import (
    BIN,
    PER_REGION_RULES,
    TINY_JOBS,
    configfiles,
    finished_jobs,
    job_stats,
    make_workdir,
    planned_jobs,
    run_snakemake,
)

from vectorgeo import probes, store
from vectorgeo.stencil import digest_cells

pytestmark = pytest.mark.s3

BUCKET = "vectorgeo-test"
PREFIX = "run"
ELEVATION_KEY = "inputs/elevation.tif"
# covers the test extent plus the sampling margin that prepared layers are cropped to
ELEVATION_BOUNDS = (-12.0, 31.0, 2.0, 42.0)
ELEVATION_STEP = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def elevation_tif(version: int) -> bytes:
    """A synthetic elevation GeoTIFF (int16 metres): a mountain range, plus a hill that grows with version."""
    import rasterio
    from rasterio.transform import from_origin

    w, s, e, n = ELEVATION_BOUNDS
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
        self.client.put_object(Bucket=BUCKET, Key=ELEVATION_KEY, Body=elevation_tif(version))
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


@pytest.fixture(scope="module")
def s3run(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Run]:
    with moto_s3(tmp_path_factory.mktemp("moto")) as (client, env):
        overlays = {
            "s3": {
                "layers": {
                    "elevation": {
                        "source": f"s3://{BUCKET}/{ELEVATION_KEY}",
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
        run = S3Run(client, workdir, {**env, "VECTORGEO_DATABASE_URL": url}, url)
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
    assert grid["layer"]["source"] == f"s3://{BUCKET}/{ELEVATION_KEY}"
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

    assert s3run.all_jobs == Counter({**TINY_JOBS, **dict.fromkeys(PER_REGION_RULES, len(manifest["regions"]))})

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
        key = f"results/embeddings/{region}_{entry['digest']}.parquet"
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
        marker = json.loads(s3run.get(f"results/loaded/{region}_{entry['digest']}.json"))
        assert marker["rows"] == entry["cells"] and marker["model_version"] == model_version
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
    assert counts["embed_region"] == counts["load_region"] == len(regions)

    s3run.snakemake()
    after = s3run.objects()
    changed = {k for k in after if before.get(k) is None or before[k][1] != after[k][1]}
    kept = ("results/stencil/", "results/layers/landcover.", "results/layers/land_mask.", "results/eval/labels/")
    results = {k for k in after if k.startswith("results/")}
    assert {k for k in changed if k.startswith("results/")} == {k for k in results if not k.startswith(kept)}
    assert "results/layers/elevation.npy" in changed
    assert {f"results/embeddings/{r}_{v['digest']}.parquet" for r, v in regions.items()} <= changed
    assert {f"results/loaded/{r}_{v['digest']}.json" for r, v in regions.items()} <= changed
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


def test_lost_region_output_is_rebuilt_alone(s3run: S3Run) -> None:
    """Deleting one region's embeddings object rebuilds and re-uploads that region alone.

    The region files are the targets here: Snakemake does not rebuild a missing intermediate
    file whose consumers (the rollup) are up to date.
    """
    regions = sorted(s3run.manifest()["regions"].items())
    embeddings = [f"results/embeddings/{r}_{v['digest']}.parquet" for r, v in regions]
    region, entry = regions[len(regions) // 2]
    key = f"results/embeddings/{region}_{entry['digest']}.parquet"
    s3run.client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")
    before = s3run.objects()
    assert key not in before
    dry = s3run.snakemake("-n", targets=embeddings)
    planned = [(w["region"], w["digest"]) for rule, w in planned_jobs(dry) if rule == "embed_region"]
    assert planned == [(region, entry["digest"])], dry[-4000:]
    assert dict(job_stats(dry)) == {"embed_region": 1}
    s3run.snakemake(targets=embeddings)
    after = s3run.objects()
    changed = {k for k in after if before.get(k) is None or before[k][1] != after[k][1]}
    assert {k for k in changed if k.startswith("results/")} == {key}
    # what reads that region's embeddings is now stale (and what reads those outputs), nothing else is
    downstream = {"rollup": 1, "load_region": 1, "build_index": 1, "evaluate": 1, "all": 1}
    dry = s3run.snakemake("-n")
    assert dict(job_stats(dry)) == downstream, dry[-4000:]
    assert [w["region"] for rule, w in planned_jobs(dry) if rule == "load_region"] == [region]
    s3run.snakemake()
    assert not job_stats(s3run.snakemake("-n"))


def test_stencil_rerun_with_same_cells_keeps_every_region_output(s3run: S3Run) -> None:
    """A new stencil run whose regions keep their cells (and digests) reruns no per-region job."""
    before = s3run.objects()
    digests = {r: v["digest"] for r, v in s3run.manifest()["regions"].items()}
    out = s3run.snakemake(overlays=("prune2",))  # the stencil's params change, its cells do not
    assert "stencil" in {rule for rule, _ in planned_jobs(out)}
    assert not {"embed_region", "load_region"} & {rule for rule, _ in planned_jobs(out)}, out[-4000:]
    assert {r: v["digest"] for r, v in s3run.manifest()["regions"].items()} == digests
    after = s3run.objects()
    assert before["results/stencil/manifest.json"][1] != after["results/stencil/manifest.json"][1]
    embeddings = [k for k in before if k.startswith(("results/embeddings/", "results/loaded/"))]
    assert embeddings and all(before[k] == after[k] for k in embeddings)
    # and the leftover local copy of the manifest did not block the checkpoint rerun
    assert "ProtectedOutputException" not in out
    # back to the test config's stencil: again a stencil job and nothing else
    out = s3run.snakemake()
    assert {rule for rule, _ in planned_jobs(out)} == {"stencil"}, out[-4000:]
    assert all(before[k] == s3run.objects()[k] for k in embeddings)
