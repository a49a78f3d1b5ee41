"""Config validation: schema, semantic checks, and the workflow refusing bad config before any job runs."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vectorgeo.config import check, validate_schema
from vectorgeo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


@pytest.fixture()
def cfg() -> dict:
    with open(ROOT / "config" / "config.yaml") as f:
        return yaml.safe_load(f)


def test_default_config_is_valid_and_gets_defaults(cfg) -> None:  # type: ignore[no-untyped-def]
    validate_schema(cfg)
    check(cfg)
    assert cfg["results"] == "results"
    assert cfg["stencil"]["prune_resolution"] == 3
    assert cfg["layers"]["elevation"]["normalize"] == "patch_minmax"


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("stencil", "resolution"), "five", "stencil.resolution"),
        (("sample", "patch_px"), 2, "sample.patch_px"),
        (("sample", "neighbor_km_min"), 10000, "sample.neighbor_km_min"),  # above neighbor_km_max
        (("layers", "landcover", "source"), "builtin:nope", "layers.landcover.source"),
        (("layers", "elevation", "source"), "/nonexistent/dem.tif", "layers.elevation.source"),
        (("stencil", "region_resolution"), 6, "stencil.region_resolution"),
    ],
)
def test_bad_values_name_the_key(cfg, path, value, key) -> None:  # type: ignore[no-untyped-def]
    bad = copy.deepcopy(cfg)
    node = bad
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        validate_schema(bad)
        check(bad)
    assert key in str(e.value)


def test_projected_raster_refused(cfg, raster_fixtures) -> None:  # type: ignore[no-untyped-def]
    cfg["layers"]["elevation"]["source"] = str(raster_fixtures / "utm.tif")
    validate_schema(cfg)
    with pytest.raises(ConfigError, match=r"layers\.elevation\.source.*projected CRS"):
        check(cfg)


def _dry_run(tmp_path: Path, cfg: dict) -> subprocess.CompletedProcess[str]:
    cf = tmp_path / "bad.yaml"
    cf.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        [SNAKEMAKE, "-n", "--configfile", str(cf), "--directory", str(tmp_path), "-s", str(ROOT / "Snakefile")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c["stencil"].__setitem__("resolution", "five"), "resolution"),
        (lambda c: c["layers"]["elevation"].__setitem__("source", "/nonexistent/dem.tif"), "/nonexistent/dem.tif"),
        (lambda c: c["layers"]["landcover"].__setitem__("source", "builtin:nope"), "unknown built-in dataset 'nope'"),
    ],
)
def test_workflow_refuses_bad_config_before_any_job(tmp_path, cfg, mutate, needle) -> None:  # type: ignore[no-untyped-def]
    mutate(cfg)
    r = _dry_run(tmp_path, cfg)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert needle in out
    assert "Job stats" not in out
    assert not (tmp_path / "results").exists()
