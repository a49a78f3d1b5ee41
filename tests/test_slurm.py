"""The tiny workflow through profiles/slurm on a real single-node SLURM cluster (setup/slurm.sh).

Every stage runs (stencil to evaluate, the load rules included), each job as a SLURM job. No database
URL is given: the main Snakemake process starts the project-local server once for the run and every load
job, on whatever node, uses that one server (never one per node). The cluster has this machine's CPUs and
memory, one fake GPU (gres on /dev/null) and no accounting database, so the run adds the flags such a
cluster needs (`--slurm-no-account`, squeue for job status) and fast status polling. GPU rules are given
gpu=1 (as on a CUDA site) so that the run also checks that `gpu=1` jobs are scheduled with a GPU, one at
a time.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import free_port, require_system
from test_workflow import (
    GPU_RULES,
    PER_BATCH_RULES,
    ROOT,
    TINY_JOBS,
    configfiles,
    embed_batches,
    finished_jobs,
    make_workdir,
    region_path,
    run_snakemake,
)

from vectorgeo import db, store
from vectorgeo.stencil import digest_cells

pytestmark = pytest.mark.slurm

SLURM_FLAGS = (
    # a cluster without slurmdbd: no accounts, and squeue (not sacct) for job states
    "--slurm-no-account",
    "--slurm-status-command",
    "squeue",
    # a test cluster answers at once: poll every second instead of waiting 40 s first
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "1",
    "--slurm-keep-successful-logs",
    # the node has the machine's cores; rules may ask for more threads than that
    "--max-threads",
    "2",
)
SUBMITTED = re.compile(r"^Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$", re.MULTILINE)


@dataclass
class Cluster:
    home: Path
    env: dict[str, str]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]
    require_system("SLURM", missing, "slurm.sh install")
    # not below pytest's private (0700) temporary folder: munged wants a socket path others can search
    home = Path(tempfile.mkdtemp(prefix="vectorgeo-slurm-"))
    home.chmod(0o755)
    script = str(ROOT / "setup" / "slurm.sh")
    start = subprocess.run(["bash", script, "start", str(home)], capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        exports = start.stdout.strip().splitlines()[-1]
        words = shlex.split(exports)
        assert words[0] == "export", exports
        env = dict(w.split("=", 1) for w in words[1:])
        assert set(env) == {"SLURM_CONF", "PATH"}
        yield Cluster(home, env)
    finally:
        subprocess.run(["bash", script, "stop", str(home)], timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def _scontrol(cluster: Cluster, jobid: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", jobid], capture_output=True, text=True, env=cluster.env, check=True
    ).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def _jobcomp(cluster: Cluster) -> dict[str, dict[str, str]]:
    """SLURM's job-completion record: jobid -> fields."""
    records = {}
    for line in (cluster.home / "jobcomp.txt").read_text().splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        records[fields["JobId"]] = fields
    return records


def test_workflow_runs_every_job_as_a_slurm_job(cluster: Cluster, tmp_path: Path) -> None:
    workdir = make_workdir(tmp_path / "workdir", {"db": {"database": {"port": free_port()}}})
    # where the run's one PostgreSQL server lives (VECTORGEO_HOME); not below pytest's private (0700)
    # temporary folder, which the server's user cannot enter
    pg_home = Path(tempfile.mkdtemp(prefix="vectorgeo-slurm-pg-"))
    gpu = [f"{rule}:gpu=1" for rule in GPU_RULES]
    env = {**cluster.env, "VECTORGEO_HOME": str(pg_home)}
    env.pop("VECTORGEO_DATABASE_URL", None)
    try:
        out = run_snakemake(
            workdir,
            "--profile",
            str(ROOT / "profiles" / "slurm"),
            *SLURM_FLAGS,
            "--set-resources",
            *gpu,
            *configfiles("db"),
            env=env,
            timeout=540,
        ).stdout
        _check_run(cluster, workdir, pg_home, out)
    finally:
        db.Cluster(home=pg_home, port=yaml_port(workdir)).stop(mode="immediate")
        shutil.rmtree(pg_home, ignore_errors=True)


def yaml_port(workdir: Path) -> int:
    import yaml

    return int(yaml.safe_load((workdir / "config" / "db.yaml").read_text())["database"]["port"])


def _check_run(cluster: Cluster, workdir: Path, pg_home: Path, out: str) -> None:

    # every job Snakemake finished was submitted to SLURM; only the target rule `all` (no command) ran locally
    submitted = SUBMITTED.findall(out)
    rule_of = {}
    for _, slurm_id, log in submitted:
        m = re.search(r"/slurm_logs/rule_(\w+)/", log)
        assert m, log
        rule_of[slurm_id] = m.group(1)
        assert Path(log).is_file(), log  # kept job log
        assert "(100%) done" in Path(log).read_text(), Path(log).read_text()[-3000:]
    finished = finished_jobs(out)
    results = workdir / "results"
    manifest = json.loads((results / "stencil" / "manifest.json").read_text())
    assert len(manifest["regions"]) >= 2
    batches = embed_batches(results)
    assert finished == Counter({**TINY_JOBS, **dict.fromkeys(PER_BATCH_RULES, len(batches))})
    assert Counter(rule_of.values()) == finished - Counter({"all": 1}), (finished, rule_of)
    assert re.findall(r"^local(?:rule|checkpoint) (\w+):", out, flags=re.MULTILINE) == ["all"]

    # SLURM's own record: each of those jobs completed, in this working directory
    record = _jobcomp(cluster)
    for slurm_id in rule_of:
        assert record[slurm_id]["JobState"] == "COMPLETED", record[slurm_id]
        assert Path(record[slurm_id]["WorkDir"]).resolve() == workdir.resolve()

    # gpu=1 jobs got the cluster's one GPU, and so never ran two at once
    gpu_jobs = [i for i, rule in rule_of.items() if rule in GPU_RULES]
    for slurm_id, rule in rule_of.items():
        tres = _scontrol(cluster, slurm_id).get("TresPerJob", "")
        assert ("gres:gpu:1" in tres) == (rule in GPU_RULES), (rule, tres)
    spans = sorted(
        (datetime.fromisoformat(record[i]["StartTime"]), datetime.fromisoformat(record[i]["EndTime"])) for i in gpu_jobs
    )
    assert len(spans) == 1 + len(batches)  # train_model, embed_batch per batch
    for (_, end), (start, _) in pairwise(spans):
        assert start >= end, spans

    # the outputs are right
    cells = {}
    for region, entry in manifest["regions"].items():
        h3 = pq.read_table(results / "stencil" / "regions" / f"{region}.parquet").column("h3").to_numpy()
        assert len(h3) == entry["cells"] and digest_cells(h3) == entry["digest"]
        cells[region] = h3
    with np.load(results / "samples" / "shard-0.npz") as z:
        assert z["anchor_landcover"].shape[0] == 512
    metrics = json.loads((results / "model" / "metrics.json").read_text())
    assert len(metrics["epochs"]) >= 1 and np.isfinite(metrics["epochs"][0]["train_loss"])
    for region, entry in manifest["regions"].items():
        table = pq.read_table(io.BytesIO(region_path(results, region, entry["digest"]).read_bytes()))
        assert np.array_equal(np.sort(table.column("h3").to_numpy()), cells[region])
        ok = [s == "ok" for s in table.column("status").to_pylist()]
        emb = np.array([v for v, good in zip(table.column("embedding").to_pylist(), ok, strict=True) if good])
        assert len(emb) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-3)
    # one server for the whole run, started once by the main process before the first job: every load
    # job used it through the URL the main process passed on
    server = db.Cluster(home=pg_home, port=yaml_port(workdir))
    assert server.status()
    assert (pg_home / "postgres.log").read_text().count("database system is ready to accept connections") == 1
    assert not (workdir / ".vectorgeo").exists()
    loaded = json.loads((results / "loaded" / "regions.json").read_text())
    assert len(loaded["regions"]) == len(cells)
    shared = db.mask_password(server.url(tcp=True, host=socket.gethostname()))
    assert loaded["database"] == shared
    with store.connect(server.url()) as conn:
        started = conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0]
        # the load jobs reached the database from the SLURM nodes: every stencil cell once
        assert store.count(conn) == sum(len(c) for c in cells.values())
    first_job = min(datetime.fromisoformat(record[i]["StartTime"]) for i in rule_of)
    assert started.astimezone().replace(tzinfo=None) <= first_job
    assert json.loads((results / "loaded" / "index.json").read_text())["regions"] == len(cells)
    assert (results / "eval" / "report.html").stat().st_size > 0


@pytest.mark.s3
def test_slurm_jobs_read_and_write_s3(cluster: Cluster, tmp_path: Path) -> None:
    """Both profiles at once: SLURM jobs find S3 through the environment they inherit.

    Up to the stencil only (two jobs: the land mask and the stencil): the point is the storage
    settings in the jobs, which get none of the main process's --storage-s3-* flags.
    """
    from test_s3 import BUCKET, PREFIX, list_objects, moto_s3

    workdir = make_workdir(tmp_path / "workdir")
    with moto_s3(tmp_path) as (client, s3_env):
        out = run_snakemake(
            workdir,
            "stencil",
            "--profile",
            str(ROOT / "profiles" / "slurm"),
            "--profile",
            str(ROOT / "profiles" / "s3"),
            *SLURM_FLAGS,
            *configfiles(),
            env={**cluster.env, **s3_env},
            timeout=300,
        ).stdout
        objects = list_objects(client)
        body = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/results/stencil/manifest.json")["Body"]
        manifest = json.loads(body.read())
    submitted = SUBMITTED.findall(out)
    assert len(submitted) == 2 and finished_jobs(out) == {"prepare_layer": 1, "stencil": 1}, out[-4000:]
    record = _jobcomp(cluster)
    assert all(record[slurm_id]["JobState"] == "COMPLETED" for _, slurm_id, _ in submitted)
    assert {"results/layers/land_mask.npy", "results/layers/land_mask.grid.json"} <= set(objects)
    assert {f"results/stencil/regions/{r}.parquet" for r in manifest["regions"]} <= set(objects)
    assert "logs/stencil/stencil.log" in objects
    assert not (workdir / "results").exists()
