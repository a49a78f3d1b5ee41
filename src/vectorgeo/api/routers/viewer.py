"""The viewer: ``/`` and its assets, ``/docs`` (Swagger UI, offline), ``/countries.geojson`` and ``/meta``."""

from __future__ import annotations

import gzip
import logging
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from vectorgeo import tiles
from vectorgeo.api.assets import STATIC_DIR, countries_gzip, maplibre_dir, swagger_dir
from vectorgeo.api.models import ERRORS, Meta
from vectorgeo.api.state import StateDep
from vectorgeo.validation import MAX_K, MAX_RADIUS_M

log = logging.getLogger(__name__)

router = APIRouter(tags=["viewer"])


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


@router.get("/docs", include_in_schema=False)
def docs() -> HTMLResponse:
    """Swagger UI, from node_modules when installed (offline), else from its CDN."""
    if swagger_dir() is None:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="vectorgeo API")
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="vectorgeo API",
        swagger_js_url="/vendor/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url="/vendor/swagger-ui/swagger-ui.css",
        swagger_favicon_url="data:,",
    )


@router.get(
    "/countries.geojson",
    response_class=Response,
    responses={200: {"content": {"application/geo+json": {}}, "description": "Natural Earth countries."}},
)
def countries(request: Request) -> Response:
    """Natural Earth admin-0 country outlines (generalised), for the viewer's land layer."""
    data = countries_gzip()
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(data, media_type="application/geo+json", headers={"Content-Encoding": "gzip"})
    return Response(gzip.decompress(data), media_type="application/geo+json")


@router.get("/meta", response_model=Meta, responses=ERRORS)
def meta(state: StateDep) -> Any:
    """What the viewer needs: loaded resolution, bounds, tile zooms, defaults and limits."""
    m = state.tile_meta()
    return {
        "model_version": m.model_version,
        "resolution": m.resolution,
        "cells": m.cells,
        "bounds": m.bounds,
        "tile_maxzoom": tiles.max_zoom(m.resolution, m.max_features),
        "tile_max_features": m.max_features,
        "default_k": state.serve.default_k,
        "default_radius_km": state.serve.default_radius_km,
        "max_k": MAX_K,
        "max_radius_m": MAX_RADIUS_M,
    }


def mount_assets(app: FastAPI) -> None:
    """Serve ``static/`` and, when installed, Swagger UI and MapLibre GL JS from node_modules."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    swagger = swagger_dir()
    if swagger is not None:
        app.mount("/vendor/swagger-ui", StaticFiles(directory=swagger), name="swagger-ui")
    dist = maplibre_dir()
    if dist is not None:
        app.mount("/vendor/maplibre-gl", StaticFiles(directory=dist), name="maplibre")
    else:
        log.warning("MapLibre GL JS not found (run `bash setup/npm.sh`); the viewer at / will not load")
