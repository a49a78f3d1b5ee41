"""Shared fixtures: prepared built-in layers and generated raster fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vectorgeo.config import load_config
from vectorgeo.layers import Layer, LayerSpec, land_mask_spec, layer_source_files, layer_specs, prepare_layer

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".vectorgeo" / "test-layers"


def _prepared(spec: LayerSpec) -> Layer:
    """Prepare a built-in layer once per machine (cached under .vectorgeo/, keyed by the spec)."""
    import hashlib
    import json

    key = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
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


# --- PostgreSQL (owner: store/db) -------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_test_cluster(prefix: str = "vectorgeo-pg-"):
    """A fresh project-local cluster in a new folder under /tmp on a free port (caller stops it)."""
    import tempfile

    from vectorgeo import db

    try:
        db.pg_bindir()
    except Exception as e:  # PostgreSQL not installed: `make system` installs it
        pytest.skip(f"PostgreSQL server not installed: {e}")
    home = Path(tempfile.mkdtemp(prefix=prefix))
    cluster = db.Cluster(home=home, port=free_port())
    cluster.start()
    return cluster


@pytest.fixture(scope="session")
def pg_cluster():
    """A project-local PostgreSQL cluster (PostGIS + pgvector) for the whole test session."""
    import shutil

    cluster = start_test_cluster()
    yield cluster
    cluster.stop(mode="immediate")
    shutil.rmtree(cluster.home, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(pg_cluster) -> str:
    """URL of the session cluster's database (postgis and vector extensions created)."""
    return pg_cluster.url()


@pytest.fixture
def pg_database(pg_cluster):
    """Factory: a new empty database (with the extensions) in the session cluster; returns its URL."""
    import uuid

    import psycopg

    from vectorgeo import db

    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        cluster = db.Cluster(home=pg_cluster.home, port=pg_cluster.port, dbname=name)
        with psycopg.connect(pg_cluster.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            for ext in db.EXTENSIONS:
                conn.execute(f"CREATE EXTENSION IF NOT EXISTS {ext}")
        return cluster.url()

    return make
