"""The FastAPI application: routers, error handlers and one :class:`~vectorgeo.api.state.AppState`."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from vectorgeo import db, store
from vectorgeo.api.errors import install_error_handlers
from vectorgeo.api.limits import install_limits
from vectorgeo.api.routers import basemap, cells, health, search, tiles, viewer
from vectorgeo.api.routers import inputs as inputs_router
from vectorgeo.api.routers import query as query_router
from vectorgeo.api.settings import ServeSettings, serve_settings
from vectorgeo.api.state import META_TTL_S, POOL_TIMEOUT_S, AppState
from vectorgeo.errors import VectorgeoError
from vectorgeo.inputs import InputLayers
from vectorgeo.store import QuerySettings

log = logging.getLogger(__name__)

LINKS: tuple[tuple[str, str, str, str, str, dict[str, str]], ...] = (
    ("/point", "get", "CellAtPoint", "/cells/{h3}", "get", {"h3": "$response.body#/h3"}),
    ("/cells/{h3}", "get", "SimilarToCell", "/similar", "get", {"h3": "$response.body#/h3"}),
    ("/similar", "get", "MostSimilarCell", "/cells/{h3}", "get", {"h3": "$response.body#/results/0/h3"}),
    ("/similar", "get", "SimilarToQueryCell", "/similar", "get", {"h3": "$response.body#/query/h3"}),
    ("/search", "post", "FirstLocation", "/cells/{h3}", "get", {"h3": "$response.body#/locations/0/h3"}),
)
"""OpenAPI links (from path, method, link name, to path, method, parameters): how the answer of one operation
feeds the next; clients and stateful API tests (schemathesis) follow them."""


def _add_links(app: FastAPI) -> None:
    """Add :data:`LINKS` to the app's OpenAPI schema (those whose two operations exist)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        paths = schema.get("paths", {})
        for src, method, name, dst, dst_method, parameters in LINKS:
            target = paths.get(dst, {}).get(dst_method)
            ok = paths.get(src, {}).get(method, {}).get("responses", {}).get("200")
            if target is None or ok is None:
                continue
            ok.setdefault("links", {})[name] = {"operationId": target["operationId"], "parameters": parameters}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _warm_up(state: AppState) -> None:
    """Find the tile archive, else build (or find) the database's tiles before the first request; a
    database that is down is only logged."""
    try:
        archive = state.tile_archive()
        if archive is not None:
            log.info("tiles of %s from %s", archive.metadata.get("model_version"), archive.path)
            return
        with state.connection() as conn:
            meta = state.tiles.check(conn)
        log.info("tiles of %s ready: %d cells at resolution %d", meta.model_version, meta.cells, meta.resolution)
    except VectorgeoError as e:
        log.warning("tiles not ready: %s", e)
    state.scores.warm_up()


@asynccontextmanager
async def _lifespan(app: FastAPI, build_tiles: bool) -> AsyncIterator[None]:
    """Open the pool (and build the tiles) at start-up, close the pool at shutdown."""
    state: AppState = app.state.vectorgeo
    state.open()
    if build_tiles:
        _warm_up(state)
    try:
        yield
    finally:
        state.close()


def create_app(
    database_url: str | None = None,
    *,
    serve: ServeSettings | None = None,
    query: QuerySettings | None = None,
    build_tiles: bool = True,
    pool_timeout_s: float = POOL_TIMEOUT_S,
    meta_ttl_s: float = META_TTL_S,
    inputs: InputLayers | None = None,
    tile_archive: str | Path | None = None,
) -> FastAPI:
    """The API and viewer app.

    Args:
        database_url: Database URL; default :func:`vectorgeo.store.database_url`.
        serve: API settings; default those of the default config (``serve`` section).
        query: Similarity query settings; default those of the default config (``database`` section).
        build_tiles: Build the tiles at start-up when missing or stale (else at the first tile).
        pool_timeout_s: Seconds a request waits for a database connection before a 503.
        meta_ttl_s: Seconds between checks of the loaded resolution and tiles (reloaded regions show
            up after at most this long).
        inputs: The model's prepared input layers, for the cell inspector (``/cells/{h3}/inputs``).
        tile_archive: The workflow's tile archive (``<results>/tiles/cells.pmtiles``); tiles come from it
            when it holds the active model version, else from the database.

    Returns:
        The FastAPI application; the database is first contacted at start-up (lifespan).
    """
    state = AppState(
        database_url or store.database_url(),
        serve or ServeSettings.from_config(serve_settings()),
        query or QuerySettings.from_config(db.settings()),
        pool_timeout_s=pool_timeout_s,
        meta_ttl_s=meta_ttl_s,
        inputs=inputs,
        tile_archive=tile_archive,
    )

    app = FastAPI(
        title="vectorgeo",
        version="1.0",
        summary="Similarity search over embeddings of H3 land cells, and a map viewer.",
        lifespan=functools.partial(_lifespan, build_tiles=build_tiles),
        docs_url=None,
        redoc_url=None,
    )
    app.state.vectorgeo = state
    install_error_handlers(app)
    install_limits(app, state.serve)
    for module in (search, query_router, cells, inputs_router, tiles, basemap, viewer, health):
        app.include_router(module.router)
    viewer.mount_assets(app)
    _add_links(app)
    return app
