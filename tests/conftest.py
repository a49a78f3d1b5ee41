"""Shared fixtures: prepared built-in layers, generated raster fixtures, the test PostgreSQL cluster and one
complete run of the tiny workflow.

Nothing here skips: a missing system component (PostgreSQL, Chromium, SLURM) fails the tests that need it,
with what is missing and how to install it (`make system`). The only tests that may skip are those marked
``cuda``, when torch sees no CUDA device; `make test` deselects them (``-m "not cuda"``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vectorgeo.config import load_config
from vectorgeo.layers import Layer, LayerSpec, land_mask_spec, layer_source_files, layer_specs
from vectorgeo.rasters import prepare_layer

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".vectorgeo" / "test-layers"


def _prepared(spec: LayerSpec) -> Layer:
    """Prepare a built-in layer once per machine (cached under .vectorgeo/, keyed by the spec)."""
    import hashlib
    import json

    # keyed by the spec and by the code that prepares it, so a change to either prepares the layer again
    code = b"".join((ROOT / "src" / "vectorgeo" / f).read_bytes() for f in ("rasters.py", "sources.py"))
    key = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode() + code).hexdigest()[:10]
    npy = CACHE / f"{spec.name}-{key}.npy"
    if not npy.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        prepare_layer(spec, layer_source_files(spec)[0], npy, npy.with_suffix(".grid.json"))
    return Layer.open(spec, npy)


@pytest.fixture(scope="session")
def default_config() -> dict:
    return load_config(ROOT / "config" / "config.yaml")


@pytest.fixture(scope="session")
def builtin_layers(default_config: dict) -> dict[str, Layer]:
    """The default config's model layers (landcover, elevation), prepared."""
    return {n: _prepared(s) for n, s in layer_specs(default_config).items()}


@pytest.fixture(scope="session")
def land_mask(default_config: dict) -> Layer:
    """The GLOBE land mask, prepared."""
    return _prepared(land_mask_spec(default_config))


@pytest.fixture(scope="session")
def koppen() -> Layer:
    spec = LayerSpec.from_config(
        "koppen",
        {
            "kind": "categorical",
            "source": "builtin:koppen_geiger",
            "nodata": 0,
            "classes": {1: "A", 2: "B", 3: "C", 4: "D", 5: "E"},
        },
    )
    return _prepared(spec)


@pytest.fixture(scope="session")
def raster_fixtures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny rasters written by tests/make_fixtures.py."""
    import make_fixtures

    d = tmp_path_factory.mktemp("rasters")
    make_fixtures.main(str(d))
    return d


os.environ.setdefault("PYTHONHASHSEED", "0")


# --- markers ----------------------------------------------------------------------------------------------
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``cuda`` need a CUDA device: without one they skip (`make test` deselects them)."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device (torch.cuda.is_available() is False); run `pytest -m cuda` on a GPU")


# --- system components -------------------------------------------------------------------------------------
SYSTEM_HINT = "install it with `make system` (or `bash setup/{script}`)"


def require_system(what: str, missing: list[str], script: str) -> None:
    """Fail (never skip) when a system component a test needs is not installed.

    Args:
        what: The component, e.g. "SLURM".
        missing: What was looked for and not found (commands, files); empty when all is there.
        script: The setup script that installs it (``setup/<script>``).
    """
    if missing:
        pytest.fail(f"{what} is not installed ({', '.join(missing)} missing): {SYSTEM_HINT.format(script=script)}")


# --- PostgreSQL -------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_test_cluster(prefix: str = "vectorgeo-pg-") -> Any:
    """A fresh project-local cluster in a new folder under /tmp on a free port (caller stops it).

    A missing PostgreSQL server, PostGIS or pgvector fails the calling test with how to install them.
    """
    import tempfile

    from vectorgeo import db
    from vectorgeo.errors import DatabaseError

    try:
        db.pg_bindir()
    except DatabaseError as e:
        pytest.fail(
            f"PostgreSQL {db.PG_MAJOR} server is not installed ({e}): {SYSTEM_HINT.format(script='postgres.sh')}"
        )
    home = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = db.Cluster(home=home, port=free_port())
    try:
        cluster.start()
    except DatabaseError as e:  # e.g. PostGIS or pgvector missing: CREATE EXTENSION fails
        cluster.stop(mode="immediate")
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(
            f"could not start a PostgreSQL {db.PG_MAJOR} cluster with {' and '.join(db.EXTENSIONS)}: {e}\n"
            + SYSTEM_HINT.format(script="postgres.sh")
        )
    return cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A project-local PostgreSQL cluster (PostGIS + pgvector) for the whole test session."""
    cluster = start_test_cluster()
    yield cluster
    cluster.stop(mode="immediate")
    shutil.rmtree(cluster.home, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(pg_cluster: Any) -> str:
    """URL of the session cluster's database (postgis and vector extensions created)."""
    return str(pg_cluster.url())


def create_database(cluster: Any, prefix: str = "t") -> str:
    """A new empty database (with the extensions) in ``cluster``; returns its URL."""
    import uuid

    import psycopg

    from vectorgeo import db

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    target = db.Cluster(home=cluster.home, port=cluster.port, dbname=name)
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(target.url(), autocommit=True) as conn:
        for ext in db.EXTENSIONS:
            conn.execute(f"CREATE EXTENSION IF NOT EXISTS {ext}")
    return target.url()


@pytest.fixture
def pg_database(pg_cluster: Any) -> Any:
    """Factory: a new empty database (with the extensions) in the session cluster; returns its URL."""

    def make(prefix: str = "t") -> str:
        return create_database(pg_cluster, prefix)

    return make


# --- one complete run of the tiny workflow ------------------------------------------------------------------
@dataclass
class WorkflowRun:
    """The tiny workflow (config/test.yaml) run to its default target in its own working directory.

    Attributes:
        workdir: The working directory (results/, logs/, benchmarks/, config/ copies).
        url: The database the load rules wrote to (VECTORGEO_DATABASE_URL of the run).
        env: Environment of the run (pass it to later Snakemake calls).
        output: Snakemake's output of the run.
    """

    workdir: Path
    url: str
    env: dict[str, str]
    output: str

    @property
    def results(self) -> Path:
        return self.workdir / "results"

    def snakemake(
        self, *args: str, overlays: tuple[str, ...] = (), check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Snakemake in this working directory with the run's database.

        Args:
            args: Targets and options (targets first: ``--configfile`` takes several values).
            overlays: Names of config files ``config/<name>.yaml`` layered on the test config.
            check: Fail the test when Snakemake fails.
        """
        from test_workflow import configfiles, run_snakemake

        return run_snakemake(self.workdir, *args, *configfiles(*overlays), env=self.env, check=check)


@pytest.fixture(scope="session")
def workflow_run(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> WorkflowRun:
    """Every stage of the tiny workflow, run once per session against its own database in the session cluster.

    Tests that read this run's outputs must not change them; tests that rerun part of it leave it complete
    (a later ``snakemake -n`` has nothing to do).
    """
    from test_workflow import configfiles, make_workdir, run_snakemake

    workdir = make_workdir(tmp_path_factory.mktemp("workflow-run"))
    url = create_database(pg_cluster, "workflow")
    env = {"VECTORGEO_DATABASE_URL": url}
    out = run_snakemake(workdir, *configfiles(), "--cores", "2", env=env, timeout=900).stdout
    return WorkflowRun(workdir, url, env, out)


# --- a small loaded database ----------------------------------------------------------------------------------
@dataclass
class LoadedRegion:
    """One region loaded into its own database through the public store API (load_region, build_indexes).

    Attributes:
        url: The database.
        region: The region cell (hex).
        model_version: Model version of the rows.
        h3: Every loaded cell (uint64, sorted).
        lat: Cell centre latitudes.
        lng: Cell centre longitudes.
        embedding: Unit vectors (float32, (n, d)); rows of zeros where ``valid`` is False.
        valid: Cells with an embedding (status 'ok').
    """

    url: str
    region: str
    model_version: str
    h3: Any
    lat: Any
    lng: Any
    embedding: Any
    valid: Any


# res-2 cell over southern Spain, the Strait of Gibraltar and northern Morocco
SMALL_REGION = "82391ffffffffff"


@pytest.fixture(scope="session")
def loaded_region(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> LoadedRegion:
    """The 343 res-5 cells of :data:`SMALL_REGION` with random 8-d embeddings, every 7th cell without one."""
    import h3
    import numpy as np

    from vectorgeo import db, geoparquet, store

    cells = np.array(sorted(h3.str_to_int(c) for c in h3.cell_to_children(SMALL_REGION, 5)), dtype=np.uint64)
    latlng = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in cells])
    rng = np.random.default_rng(42)
    emb = rng.normal(size=(len(cells), 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    valid = np.arange(len(cells)) % 7 != 3
    emb[~valid] = 0.0
    status = np.where(valid, "ok", "nodata")
    path = tmp_path_factory.mktemp("small-region") / f"{SMALL_REGION}_000000000000.parquet"
    geoparquet.write_region(path, cells, latlng[:, 0], latlng[:, 1], emb, status, "small-1", region=SMALL_REGION)
    url = create_database(pg_cluster, "small")
    with store.connect(url) as conn:
        marker = store.load_region(conn, path)
        store.build_indexes(conn, store.IndexSettings.from_config(db.settings()))
    assert marker["rows"] == len(cells)
    return LoadedRegion(url, SMALL_REGION, "small-1", cells, latlng[:, 0], latlng[:, 1], emb, valid)
