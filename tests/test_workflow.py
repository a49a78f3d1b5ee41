"""The workflow as Snakemake sees it (dry runs, lint, formatting, GPU resources) and one complete run.

The complete run (the session fixture ``workflow_run`` of conftest.py) takes the tiny config through every
stage: stencil, sample, train, embed, rollup, load_regions, build_index (into the session's PostgreSQL) and
evaluate; the tests here check its database rows against the stencil.

Also home of the helpers that the other workflow tests use to run the real workflow in a fresh working
directory (its own config/ folder and .snakemake/, the repository's Snakefile), so that tests never touch
the repository's results/ or its Snakemake lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import WorkflowRun
from psycopg import sql

from vectorgeo import db, regionfiles, store

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = BIN / "snakemake"
TEST_CONFIG = "config/test.yaml"
TEST_BATCH_CELLS = yaml.safe_load((ROOT / TEST_CONFIG).read_text())["embed"]["batch_cells"]
GPU_RULES = ("train_model", "embed_batch")
# every rule of the workflow; per-region rules run once per stencil region
RULES = (
    "all",
    "build_index",
    "build_tiles",
    "cut_windows",
    "embed_batch",
    "evaluate",
    "load_regions",
    "mosaic_layer",
    "prepare_eval_label",
    "prepare_layer",
    "rollup",
    "sample_triplets",
    "stencil",
    "train_model",
)
PER_BATCH_RULES = ("embed_batch",)
# jobs of a complete run of the tiny config, besides the per-batch ones (mosaic_layer: no tiled source)
TINY_JOBS = {
    "prepare_layer": 4,  # landcover, elevation, imagery, land_mask
    "stencil": 1,
    "cut_windows": 1,
    "sample_triplets": 2,  # sample.shards
    "train_model": 1,
    "rollup": 1,
    "build_tiles": 1,
    "load_regions": 1,  # every region in one job
    "build_index": 1,
    "prepare_eval_label": 3,  # the raster tasks koppen, elevation, turbidity (country is a vector task)
    "evaluate": 1,
    "all": 1,
}


def make_workdir(path: Path, overlays: dict[str, dict[str, Any]] | None = None) -> Path:
    """A Snakemake working directory: copies of config/*.yaml plus overlay files config/<name>.yaml."""
    (path / "config").mkdir(parents=True, exist_ok=True)
    for f in (ROOT / "config").glob("*.yaml"):
        shutil.copy(f, path / "config" / f.name)
    for name, content in (overlays or {}).items():
        (path / "config" / f"{name}.yaml").write_text(yaml.safe_dump(content))
    return path


def configfiles(*overlays: str) -> list[str]:
    """`--configfile` arguments: the tiny test config, then the named overlays."""
    return ["--configfile", TEST_CONFIG, *(f"config/{name}.yaml" for name in overlays)]


def run_snakemake(
    workdir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run this repository's workflow in ``workdir``; stdout and stderr together in ``.stdout``."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    cmd = [str(SNAKEMAKE), "-s", str(ROOT / "Snakefile"), *args]
    proc = subprocess.run(
        cmd,
        cwd=workdir,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-8000:]}")
    return proc


def job_stats(output: str) -> Counter[str]:
    """The 'Job stats' table of a (dry) run: rule -> job count (without the total)."""
    counts: Counter[str] = Counter()
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3 :]:
                parts = row.split()
                if len(parts) != 2 or parts[0] == "total":
                    break
                counts[parts[0]] += int(parts[1])
            break
    return counts


def finished_jobs(output: str) -> Counter[str]:
    """Rule -> number of jobs a real run finished (per-region jobs after a checkpoint included)."""
    return Counter(re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", output, flags=re.MULTILINE))


JOB_HEADER = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):$")


def planned_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a (dry) run prints, in order."""
    jobs: list[tuple[str, dict[str, str]]] = []
    for line in output.splitlines():
        m = JOB_HEADER.match(line.strip())
        if m:
            jobs.append((m.group(1), {}))
        elif jobs and line.strip().startswith("wildcards:"):
            for item in line.strip()[len("wildcards:") :].split(","):
                key, _, value = item.strip().partition("=")
                jobs[-1][1][key] = value
        elif jobs and line.strip().startswith("resources:"):
            jobs[-1][1]["__resources__"] = line.strip()[len("resources:") :].strip()
    return jobs


def workflow_rules(workdir: Path) -> list[str]:
    out = run_snakemake(workdir, *configfiles(), "--list-rules").stdout
    return [line.strip() for line in out.splitlines() if re.fullmatch(r"\s*\w+\s*", line)]


def stencil_regions(results: Path) -> dict[str, dict[str, Any]]:
    """The stencil manifest's regions: region -> {digest, cells}."""
    return dict(json.loads((results / "stencil" / "manifest.json").read_text())["regions"])


def embed_batches(results: Path, batch_cells: int | None = None) -> dict[str, regionfiles.Batch]:
    """The embed batches of the stencil manifest (embed.batch_cells of the test config by default)."""
    return regionfiles.partition(stencil_regions(results), batch_cells or TEST_BATCH_CELLS)


def region_path(results: Path, region: str, digest: str) -> Path:
    """The region's embedding file, in its batch folder (exactly one)."""
    found = sorted(results.glob(f"embeddings/batches/*/{region}_{digest}.parquet"))
    assert len(found) == 1, found
    return found[0]


def stencil_cells(results: Path) -> dict[str, np.ndarray]:
    """Region -> its cells (uint64), read from the stencil's region files."""
    return {
        r: pq.read_table(results / "stencil" / "regions" / f"{r}.parquet").column("h3").to_numpy()
        for r in stencil_regions(results)
    }


# --- tests ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh working directory: nothing run yet."""
    return make_workdir(tmp_path_factory.mktemp("workflow"))


@pytest.fixture(scope="module")
def stenciled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory where the stencil checkpoint ran, so that dry runs list the per-region jobs."""
    wd = make_workdir(
        tmp_path_factory.mktemp("stenciled"),
        {"cuda": {"train": {"device": "cuda"}, "embed": {"device": "cuda"}}},
    )
    run_snakemake(wd, *configfiles(), "--cores", "2", "stencil")
    return wd


def test_workflow_has_every_stage(workdir: Path) -> None:
    assert sorted(workflow_rules(workdir)) == sorted(RULES)


def test_dry_run_lists_every_stage(workdir: Path) -> None:
    out = run_snakemake(workdir, *configfiles(), "-n").stdout
    layers = {w["layer"] for rule, w in planned_jobs(out) if rule == "prepare_layer"}
    assert layers == {"landcover", "elevation", "imagery", "land_mask"}
    tasks = {w["task"] for rule, w in planned_jobs(out) if rule == "prepare_eval_label"}
    assert tasks == {"koppen", "elevation", "turbidity"}
    # a dry run cannot see past the stencil checkpoint: per-region jobs (and the windows they read)
    # appear once it ran, and so does the load job (build_index waits for the checkpoint to name it)
    assert job_stats(out) == Counter(TINY_JOBS) - Counter({"cut_windows": 1, "load_regions": 1}), out[-4000:]


def test_lint_is_clean(workdir: Path) -> None:
    proc = run_snakemake(workdir, *configfiles(), "--lint", check=False)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout


def test_every_rule_has_a_conda_env_and_a_log(workdir: Path) -> None:
    """What --lint checks per rule, asserted directly (names the rules at fault).

    (Snakemake 9.27 ignores `--lint json` on the command line, so the text output is parsed.)
    """
    out = run_snakemake(workdir, *configfiles(), "--lint", check=False).stdout
    missing: dict[str, list[str]] = {}
    rule = None
    for line in out.splitlines():
        m = re.match(r"^Lints for (?:rule (\w+)|snakefile .*):?", line.strip())
        if m:
            rule = m.group(1)
        elif rule and re.match(r"^\* (No log directive|.*conda environment)", line.strip()):
            missing.setdefault(rule, []).append(line.strip())
    assert not missing, missing


def test_snakefmt_is_clean() -> None:
    snakefmt = BIN / "snakefmt"
    proc = subprocess.run([str(snakefmt), "--check", "--compact-diff", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _gpu_jobs(out: str) -> dict[str, set[bool]]:
    """Rule -> whether its planned jobs ask for gpu=1 (a set: {True}, {False} or both)."""
    asks: dict[str, set[bool]] = {}
    for rule, w in planned_jobs(out):
        asks.setdefault(rule, set()).add(re.search(r"\bgpu=1\b", w.get("__resources__", "")) is not None)
    return asks


def test_gpu_rules_declare_gpu_when_cuda_is_configured(stenciled: Path) -> None:
    """With train.device and embed.device cuda, train/embed jobs ask for gpu=1 (and only they do)."""
    out = run_snakemake(stenciled, *configfiles("cuda"), "-n", "--resources", "gpu=1").stdout
    regions = stencil_regions(stenciled / "results")
    assert len(regions) >= 2
    rules = Counter(rule for rule, _ in planned_jobs(out))
    assert rules["train_model"] == 1, out[-4000:]
    assert rules["embed_batch"] == len(embed_batches(stenciled / "results")) and rules["load_regions"] == 1
    assert _gpu_jobs(out) == {rule: {rule in GPU_RULES} for rule in rules}


def test_without_cuda_no_job_asks_for_a_gpu(stenciled: Path) -> None:
    """device: auto on a machine where no GPU is visible (CUDA_VISIBLE_DEVICES empty): no job asks for one."""
    out = run_snakemake(stenciled, *configfiles(), "-n", env={"CUDA_VISIBLE_DEVICES": ""}).stdout
    rules = Counter(rule for rule, _ in planned_jobs(out))
    assert rules["train_model"] == 1 and rules["embed_batch"] == len(embed_batches(stenciled / "results"))
    assert _gpu_jobs(out) == {rule: {False} for rule in rules}, out[-4000:]


# --- the complete run ----------------------------------------------------------------------------------------
def _db_cells(conn: psycopg.Connection, table: str) -> tuple[np.ndarray, int]:
    """Every h3 of a loaded table (sorted, uint64, duplicates kept) and how many rows have an embedding."""
    ident = sql.Identifier(table)
    h3 = [r[0] for r in conn.execute(sql.SQL("SELECT h3 FROM {} ORDER BY h3").format(ident)).fetchall()]
    with_embedding = conn.execute(sql.SQL("SELECT count(embedding) FROM {}").format(ident)).fetchone()
    assert with_embedding is not None
    return np.array(h3, dtype=np.int64).astype(np.uint64), int(with_embedding[0])


def _ok_rows(results: Path) -> int:
    """Rows with status 'ok' in the region embedding files of the current stencil."""
    n = 0
    for region, entry in stencil_regions(results).items():
        status = pq.read_table(region_path(results, region, entry["digest"])).column("status")
        n += sum(s == "ok" for s in status.to_pylist())
    return n


def test_complete_run_finishes_every_job(workflow_run: WorkflowRun) -> None:
    regions = stencil_regions(workflow_run.results)
    assert len(regions) >= 2
    batches = embed_batches(workflow_run.results)
    # the test regions make batches of one and of several regions (embed.batch_cells)
    assert 1 < len(batches) < len(regions)
    expected = Counter({**TINY_JOBS, **dict.fromkeys(PER_BATCH_RULES, len(batches))})
    assert finished_jobs(workflow_run.output) == expected, workflow_run.output[-4000:]
    loaded = json.loads((workflow_run.results / "loaded" / "regions.json").read_text())
    files = {r: v["file"] for r, v in loaded["regions"].items()}
    assert files == {region: f"{region}_{entry['digest']}.parquet" for region, entry in regions.items()}
    assert not job_stats(workflow_run.snakemake("-n").stdout)


def test_load_regions_loads_every_stencil_cell_once(workflow_run: WorkflowRun) -> None:
    results = workflow_run.results
    regions = stencil_regions(results)
    cells = stencil_cells(results)
    total = sum(len(c) for c in cells.values())
    assert total == sum(entry["cells"] for entry in regions.values()) > 0
    loaded = json.loads((results / "loaded" / "regions.json").read_text())
    summary = json.loads((results / "loaded" / "index.json").read_text())
    model_version = json.loads((results / "model" / "metrics.json").read_text())["model_version"]
    assert loaded["model_version"] == model_version and loaded["table"] == summary["table"]
    assert {r: v["rows"] for r, v in loaded["regions"].items()} == {r: len(c) for r, c in cells.items()}
    assert loaded["rows"] == total and loaded["loaded"] + loaded["unchanged"] == len(regions)
    assert loaded["removed"] == []
    assert summary["rows"] == total and summary["regions"] == len(regions)
    assert summary["model_version"] == model_version
    with store.connect(workflow_run.url) as conn:
        assert store.count(conn) == total
        for region, c in cells.items():
            assert store.count(conn, region) == len(c)
        h3, with_embedding = _db_cells(conn, summary["table"])
        indexes = conn.execute("SELECT indexdef FROM pg_indexes WHERE tablename = %s", (summary["table"],)).fetchall()
    np.testing.assert_array_equal(h3, np.sort(np.concatenate(list(cells.values()))))  # each stencil cell once
    assert with_embedding == _ok_rows(results) > 0
    methods = sorted(re.search(r"USING (\w+)", d).group(1) for (d,) in indexes)  # type: ignore[union-attr]
    assert methods == ["btree", "gist", "hnsw"], indexes  # primary key, geometry, embedding


def test_loaded_embeddings_answer_similarity_queries(workflow_run: WorkflowRun) -> None:
    """store.similar on the loaded rows gives the brute-force cosine neighbours of the region files."""
    results = workflow_run.results
    h3_parts: list[np.ndarray] = []
    emb_parts: list[list[float]] = []
    for region, entry in stencil_regions(results).items():
        t = pq.read_table(region_path(results, region, entry["digest"]))
        ok = np.array([s == "ok" for s in t.column("status").to_pylist()])
        h3_parts.append(t.column("h3").to_numpy()[ok])
        emb_parts += [v for v, good in zip(t.column("embedding").to_pylist(), ok, strict=True) if good]
    h3 = np.concatenate(h3_parts)
    emb = np.array(emb_parts, dtype=np.float64)
    query = len(h3) // 2
    sim = emb @ emb[query]
    sim[query] = -np.inf  # the query cell itself is left out
    want = h3[np.argsort(-sim, kind="stable")[:5]]
    with store.connect(workflow_run.url) as conn:
        got = store.similar(
            conn, store.QuerySettings.from_config(db.settings()), h3=int(h3[query]), k=5, method="exact"
        )
    assert [r["h3"] for r in got] == [int(c) for c in want]
    np.testing.assert_allclose([r["similarity"] for r in got], np.sort(sim)[::-1][:5], atol=1e-5)


def test_rerun_of_the_load_rules_does_not_duplicate_rows(workflow_run: WorkflowRun) -> None:
    results = workflow_run.results
    regions = stencil_regions(results)
    table = json.loads((results / "loaded" / "index.json").read_text())["table"]
    with store.connect(workflow_run.url) as conn:
        before = _db_cells(conn, table)

    # the load job again: every region is in the database as its file says, none is loaded again
    out = workflow_run.snakemake("--cores", "2", "--forcerun", "load_regions").stdout
    assert finished_jobs(out) == Counter({"load_regions": 1, "build_index": 1, "all": 1}), out[-4000:]
    loaded = json.loads((results / "loaded" / "regions.json").read_text())
    assert loaded["loaded"] == 0 and loaded["unchanged"] == len(regions), loaded
    with store.connect(workflow_run.url) as conn:
        after = _db_cells(conn, table)
        assert store.count(conn) == len(before[0])
    np.testing.assert_array_equal(after[0], before[0])
    assert after[1] == before[1]

    # one region file rewritten (same cells, rows in another order, so another checksum): that region alone
    region, entry = sorted(regions.items())[0]
    path = region_path(results, region, entry["digest"])
    # a batch folder's time is that of its .snakemake_timestamp (Snakemake's directory outputs): touched, it
    # says that the folder's files changed
    timestamp = path.parent / ".snakemake_timestamp"
    t, stamp = pq.read_table(path), timestamp.stat()
    pq.write_table(t.take(np.arange(t.num_rows)[::-1]).replace_schema_metadata(t.schema.metadata), path)
    timestamp.touch()
    out = workflow_run.snakemake("--cores", "2", "results/loaded/index.json").stdout
    assert finished_jobs(out) == Counter({"load_regions": 1, "build_index": 1}), out[-4000:]
    # the folder's old time back: the other consumers of the embeddings (rollup, tiles, evaluate) stay done
    os.utime(timestamp, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    loaded = json.loads((results / "loaded" / "regions.json").read_text())
    assert [r for r, v in loaded["regions"].items() if v["loaded"]] == [region], loaded
    with store.connect(workflow_run.url) as conn:
        again = _db_cells(conn, table)
    np.testing.assert_array_equal(again[0], before[0])
    assert again[1] == before[1]
    assert json.loads((results / "loaded" / "index.json").read_text())["rows"] == len(before[0])
    assert not job_stats(workflow_run.snakemake("-n").stdout)


def test_run_summary_counts_what_the_run_produced(workflow_run: WorkflowRun) -> None:
    """`vectorgeo run-summary` (what `make run` prints at the end): the stencil's cells, the region files of the
    embed batches, the loaded rows."""
    from vectorgeo.summary import run_summary

    results = workflow_run.results
    regions = stencil_regions(results)
    cells = sum(v["cells"] for v in regions.values())
    lines = {line.split()[0]: line for line in run_summary(results)}
    assert f"{cells:,} land cells" in lines["stencil"]
    want = f"embeddings {cells:,} cells in {len(regions)} region files of {len(embed_batches(results))} batches"
    assert lines["embeddings"].startswith(want), lines["embeddings"]
    assert f"{cells:,} rows loaded from {len(regions)} regions" in lines["database"]
