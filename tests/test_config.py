"""Config: the typed models, the schema generated from them, and the workflow refusing bad config."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from vectorgeo import config as C
from vectorgeo.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


@pytest.fixture()
def cfg() -> dict:
    with open(ROOT / "config" / "config.yaml") as f:
        return yaml.safe_load(f)


def test_committed_schema_is_the_models_schema() -> None:
    assert (ROOT / "config" / "schema.yaml").read_text() == C.schema_yaml(), (
        "config/schema.yaml is stale: run python -m vectorgeo.config schema > config/schema.yaml"
    )


def _properties(node: Any, path: str = "") -> list[tuple[str, dict]]:
    out = []
    if isinstance(node, dict):
        for k, v in (node.get("properties") or {}).items():
            out.append((f"{path}.{k}".lstrip("."), v))
        for k, v in node.items():
            if k != "properties":
                out.extend(_properties(v, f"{path}.{k}".lstrip(".") if k in ("$defs",) else path))
            else:
                for pk, pv in v.items():
                    out.extend(_properties(pv, f"{path}.{pk}".lstrip(".")))
    elif isinstance(node, list):
        for v in node:
            out.extend(_properties(v, path))
    return out


def test_every_key_has_a_description() -> None:
    schema = C.schema()

    def described(sub: dict) -> bool:
        ref = sub.get("$ref")  # a section's description is its model's
        return bool(sub.get("description") or (ref and schema["$defs"][ref.split("/")[-1]].get("description")))

    props = _properties(schema)
    assert len(props) > 80
    missing = [p for p, sub in props if not described(sub)]
    assert missing == []


def test_snakemake_defaults_equal_the_models_defaults() -> None:
    """The defaults Snakemake's validate() fills in from the schema are the models' defaults.

    (Compared with keys as strings and numbers as floats: JSON has no integer keys, YAML no float type tag.)
    """
    from snakemake.utils import validate

    minimal = {
        "layers": {"lc": {"kind": "categorical", "source": "builtin:modis_igbp_2019", "classes": {1: "a"}}},
        "land_mask": {"source": "builtin:globe_landmask"},
    }
    filled = copy.deepcopy(minimal)
    validate(filled, str(ROOT / "config" / "schema.yaml"))
    expected = C.parse(minimal).model_dump(mode="json")
    assert _same_modulo_keys(filled, expected), (filled, expected)
    filled["sample"]["neighbor_km_max"] = 1.0
    assert not _same_modulo_keys(filled, expected)


def _same_modulo_keys(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        ka, kb = {str(k): v for k, v in a.items()}, {str(k): v for k, v in b.items()}
        return ka.keys() == kb.keys() and all(_same_modulo_keys(ka[k], kb[k]) for k in ka)
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return float(a) == float(b)
    return bool(a == b)


def test_default_config_is_valid_and_gets_defaults(cfg) -> None:  # type: ignore[no-untyped-def]
    typed = C.check(cfg)
    assert typed.results == "results"
    assert typed.stencil.prune_resolution == 3
    assert typed.layers["elevation"].normalize == "both"
    assert typed.layers["imagery"].bands == ["red", "green", "blue"] and typed.model.embedding_dim == 64
    assert typed.sample.scales == (1.0, 8.0)
    assert typed.layers["landcover"].classes is not None and typed.layers["landcover"].classes[2] == (
        "evergreen_broadleaf_forest"
    )
    assert typed.evaluate.tasks["country"].label_field == "ADMIN" and typed.evaluate.tasks["country"].location
    assert typed.evaluate.tasks["turbidity"].source == "builtin:linke_turbidity"
    completed = C.load_config(ROOT / "config" / "config.yaml")
    assert completed["database"]["port"] == 55432
    assert completed["sample"]["neighbor_km_max"] == 160


def test_config_files_merge_like_snakemake() -> None:
    merged = C.load_config([ROOT / "config" / "config.yaml", ROOT / "config" / "test.yaml"])
    assert merged["stencil"]["extent"]["bbox"] == [-7.0, 35.0, -3.0, 38.0]
    assert merged["layers"]["landcover"]["kind"] == "categorical"  # kept from the first file
    assert merged["sample"]["per_shard"] == 512


@pytest.mark.parametrize(
    ("path", "value", "key", "needle"),
    [
        (("stencil", "resolution"), "five", "stencil.resolution", "integer"),
        (("sample", "patch_px"), 2, "sample.patch_px", "greater than or equal to 4"),
        (("sample", "neighbor_km_min"), 10000, "sample.neighbor_km_min", "must be < sample.neighbor_km_max"),
        (("layers", "landcover", "source"), "builtin:nope", "layers.landcover.source", "unknown built-in"),
        (("layers", "landcover", "water"), [99], "layers.landcover.water", "not in classes"),
        (("layers", "elevation", "classes"), {1: "x"}, "layers.elevation.classes", "only categorical"),
        (("layers", "elevation", "source"), "/nonexistent/dem.tif", "layers.elevation.source", "does not exist"),
        (("stencil", "region_resolution"), 6, "stencil.region_resolution", "must be <= stencil.resolution"),
        (("stencil", "extent"), {"bbox": [0, 10, 5, 5]}, "stencil.extent.bbox", "south < north"),
        (("stencil", "extent"), {"regions": ["81757ffffffffff"]}, "stencil.extent.regions", "region_resolution"),
        (("stencil", "extent"), {"bbox": [0, 0, 1, 1], "regions": ["8001fffffffffff"]}, "stencil.extent", "one of"),
        (("embed", "rollup_resolutions"), [6], "embed.rollup_resolutions", "finer than stencil.resolution"),
        (("evaluate", "fold_resolution"), 7, "evaluate.fold_resolution", "stencil.resolution"),
        (("evaluate", "methods"), ["pca_raw"], "evaluate.methods", "must include 'embedding'"),
        (
            ("evaluate", "tasks"),
            {"t": {"kind": "regression", "type": "vector", "source": "x.gpkg"}},
            "evaluate.tasks.t.kind",
            "classification",
        ),
        (("train", "val_shards"), 8, "train.val_shards", "must be < sample.shards"),
        (("train", "typo"), 1, "train.typo", "unknown key"),
        (("database", "port"), 80, "database.port", "greater than or equal to 1024"),
    ],
)
def test_bad_values_name_the_key(cfg, path, value, key, needle) -> None:  # type: ignore[no-untyped-def]
    bad = copy.deepcopy(cfg)
    node = bad
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        C.check(bad)
    assert e.value.key == key
    assert needle in str(e.value)


def test_extent_margin_must_cover_the_neighbour_band(cfg) -> None:  # type: ignore[no-untyped-def]
    cfg["stencil"]["extent"] = {"bbox": [0, 0, 10, 10]}
    cfg["stencil"]["extent_margin_km"] = 100
    with pytest.raises(ConfigError, match=r"stencil\.extent_margin_km.*>= sample\.neighbor_km_max") as e:
        C.check(cfg)
    assert e.value.key == "stencil.extent_margin_km"


def test_a_layer_may_not_be_called_land_mask(cfg) -> None:  # type: ignore[no-untyped-def]
    cfg["layers"]["land_mask"] = cfg["layers"]["elevation"]
    with pytest.raises(ConfigError, match="reserved"):
        C.check(cfg)


def test_a_tile_list_is_a_list_of_sources(cfg, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg["layers"]["elevation"]["source"] = ["s3://bucket/a.tif", "s3://bucket/b.tif"]
    typed = C.check(cfg)
    assert typed.layers["elevation"].source == ["s3://bucket/a.tif", "s3://bucket/b.tif"]
    cfg["layers"]["elevation"]["source"] = []
    with pytest.raises(ConfigError, match=r"layers\.elevation\.source.*non-empty list"):
        C.check(cfg)


def test_projected_raster_refused(cfg, raster_fixtures) -> None:  # type: ignore[no-untyped-def]
    cfg["layers"]["elevation"]["source"] = str(raster_fixtures / "utm.tif")
    C.check(cfg, check_files_too=False)
    with pytest.raises(ConfigError, match=r"layers\.elevation\.source.*projected CRS"):
        C.check(cfg)


def test_section_names_its_prefix() -> None:
    with pytest.raises(ConfigError) as e:
        C.section(C.TrainConfig, {"lr": -1}, "train")
    assert e.value.key == "train.lr"
    assert C.section(C.TrainConfig, None, "train") == C.TrainConfig()


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
        (lambda c: c["stencil"].__setitem__("region_resolution", 6), "stencil.region_resolution"),
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
