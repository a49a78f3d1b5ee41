"""Configuration: schema validation with defaults, plus the checks a schema cannot express.

The workflow validates with ``snakemake.utils.validate`` against
``config/schema.yaml`` and then calls :func:`check`; library users call
:func:`load_config`, which does both. Either way a bad value raises
:class:`~vectorgeo.errors.ConfigError` naming the dotted key.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import yaml

from vectorgeo.errors import ConfigError, RasterError
from vectorgeo.layers import (
    builtin_name,
    builtin_path,
    expand_tiles,
    inspect_source,
    is_remote,
    is_tile_set,
    land_mask_spec,
    layer_specs,
)

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


def schema_path() -> Path:
    """Path of the JSON Schema (``config/schema.yaml``), shipped with the package."""
    packaged = Path(__file__).with_name("schema.yaml")
    return packaged if packaged.exists() else SCHEMA_PATH


def _set_defaults(schema: Mapping[str, Any], inst: MutableMapping[str, Any], root: Mapping[str, Any]) -> None:
    props = schema.get("properties", {})
    for k, sub in props.items():
        if "$ref" in sub:
            sub = _resolve(root, sub["$ref"])
        if k not in inst and "default" in sub:
            inst[k] = copy.deepcopy(sub["default"])
        if isinstance(inst.get(k), MutableMapping) and sub.get("type") == "object":
            _set_defaults(sub, inst[k], root)
    addl = schema.get("additionalProperties")
    if isinstance(addl, Mapping):
        sub = _resolve(root, addl["$ref"]) if "$ref" in addl else addl
        for k, v in inst.items():
            if k not in props and isinstance(v, MutableMapping):
                _set_defaults(sub, v, root)


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    node: Any = root
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def validate_schema(config: MutableMapping[str, Any]) -> None:
    """Validate against the JSON Schema and fill in defaults, in place.

    Raises:
        ConfigError: naming the first key that violates the schema.
    """
    import jsonschema

    with open(schema_path()) as f:
        schema = yaml.safe_load(f)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        key = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(key, e.message)
    _set_defaults(schema, config, schema)


def _check_source(source: Any, key: str) -> None:
    bname = builtin_name(source)
    if bname is not None:
        builtin_path(bname, key)
        return
    if is_tile_set(source):
        for t in expand_tiles(source, key):
            if not is_remote(t):
                _check_local(t, key)
        return
    if isinstance(source, str) and not is_remote(source):
        _check_local(source, key)


def _check_local(path: str, key: str) -> None:
    if not os.path.exists(path):
        raise ConfigError(key, f"raster file '{path}' does not exist")
    try:
        inspect_source(path)
    except RasterError as e:
        raise ConfigError(key, str(e)) from None


def check(config: Mapping[str, Any], check_files: bool = True) -> None:
    """Checks beyond the schema: layer semantics, resolutions, extent, files.

    Args:
        config: A schema-valid config (defaults filled in).
        check_files: Also check that local rasters exist and are lat/lng grids.

    Raises:
        ConfigError: naming the key at fault.
    """
    specs = layer_specs(config)
    mask = land_mask_spec(config)
    st = config.get("stencil", {})
    res, rres = st.get("resolution", 5), st.get("region_resolution", 0)
    if rres > res:
        raise ConfigError("stencil.region_resolution", f"must be <= stencil.resolution ({res}), got {rres}")
    prune = st.get("prune_resolution", 3)
    if prune > res:
        raise ConfigError("stencil.prune_resolution", f"must be <= stencil.resolution ({res}), got {prune}")
    extent = st.get("extent")
    if isinstance(extent, Mapping) and "bbox" in extent:
        w, s, e, n = extent["bbox"]
        if not (-90 <= s < n <= 90):
            raise ConfigError("stencil.extent.bbox", f"expected south < north within [-90, 90], got {s}, {n}")
        if not (-180 <= w <= 180 and -180 <= e <= 180 and w != e):
            raise ConfigError("stencil.extent.bbox", f"expected west != east within [-180, 180], got {w}, {e}")
    if isinstance(extent, Mapping) and "regions" in extent:
        import h3

        for r in extent["regions"]:
            if not h3.is_valid_cell(r) or h3.get_resolution(r) != rres:
                raise ConfigError(
                    "stencil.extent.regions",
                    f"'{r}' is not a valid H3 cell at region_resolution {rres}",
                )
    if check_files:
        for name, spec in specs.items():
            _check_source(spec.source if isinstance(spec.source, str) else list(spec.source), f"layers.{name}.source")
        _check_source(mask.source if isinstance(mask.source, str) else list(mask.source), "land_mask.source")
    if "land_mask" in specs:
        raise ConfigError("layers.land_mask", "the name 'land_mask' is reserved for the land mask; rename the layer")
    if "sample" in config:
        from vectorgeo.sampling import SampleParams

        sp = SampleParams.from_config(config["sample"])
        need = sp.neighbor_km_max + 0.71 * sp.patch_km
        margin = st.get("extent_margin_km", 300)
        if extent and margin < need:
            raise ConfigError(
                "stencil.extent_margin_km",
                f"must be >= sample.neighbor_km_max + 0.71 * sample.patch_km = {need:.0f} km "
                f"so that patches near the extent's edge stay inside the cropped layers, got {margin}",
            )
    if "evaluate" in config:
        from vectorgeo.evaluate import check_config as check_evaluate

        check_evaluate(config)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file as it is (no validation, no defaults).

    Raises:
        ConfigError: unreadable file, or not a mapping at the top level.
    """
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(str(path), f"cannot read config file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(str(path), "expected a mapping at the top level")
    return cfg


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load, validate and complete a config file.

    Args:
        path: YAML file; default ``config/config.yaml`` of the project.
        overrides: Top-level keys that replace those from the file.

    Raises:
        ConfigError: unreadable file or invalid content.
    """
    cfg = read_config_file(Path(path) if path else SCHEMA_PATH.with_name("config.yaml"))
    if overrides:
        cfg.update(overrides)
    validate_schema(cfg)
    check(cfg)
    return cfg
