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
