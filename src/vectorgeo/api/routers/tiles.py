"""``GET /tiles/{z}/{x}/{y}.pbf``: vector tiles of hexagons coloured by embedding, and ``GET /tiles.pmtiles``.

Tiles come from the PMTiles archive the workflow builds (:mod:`vectorgeo.pyramid`) when it holds the
active model version, else from tile tables in the database (:mod:`vectorgeo.tiles`). The archive itself
is served with HTTP range requests, for MapLibre's ``pmtiles`` protocol (any static host or S3 can serve
the same file).
"""

from __future__ import annotations

import gzip
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response

from vectorgeo import tiles
from vectorgeo.api.errors import NotFound
from vectorgeo.api.models import ERRORS, ErrorBody
from vectorgeo.api.state import StateDep

router = APIRouter(tags=["tiles"])

MVT_MEDIA_TYPE = "application/vnd.mapbox-vector-tile"
EMPTY_TILE = gzip.compress(b"", compresslevel=5, mtime=0)
CACHE = {"Cache-Control": "public, max-age=300"}


@router.get(
    "/tiles.pmtiles",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/vnd.pmtiles": {}}, "description": "The PMTiles archive."},
        206: {"content": {"application/vnd.pmtiles": {}}, "description": "The requested byte range."},
        **ERRORS,
        404: {"model": ErrorBody, "description": "No tile archive of the active model version."},
    },
)
def archive(state: StateDep) -> FileResponse:
    """The tile archive of the active model version (HTTP range requests), for MapLibre's pmtiles protocol."""
    current = state.tile_archive()
    if current is None:
        raise NotFound(None, "no tile archive of the active model version; build it (rule build_tiles)")
    return FileResponse(current.path, media_type="application/vnd.pmtiles", headers=CACHE)


@router.get(
    "/tiles/{z}/{x}/{y}.pbf",
    response_class=Response,
    responses={200: {"content": {MVT_MEDIA_TYPE: {}}, "description": "Gzipped Mapbox Vector Tile."}, **ERRORS},
)
def tile(
    state: StateDep,
    z: Annotated[int, PathParam(ge=0, le=tiles.MAX_ZOOM)],
    x: Annotated[int, PathParam(ge=0, lt=2**tiles.MAX_ZOOM)],
    y: Annotated[int, PathParam(ge=0, lt=2**tiles.MAX_ZOOM)],
) -> Response:
    """Hexagons (layer ``cells``: h3, res, children, color) coloured by the embeddings' first 3 PCs."""
    tiles.check_tile(z, x, y)
    archive = state.tile_archive()
    if archive is not None:
        # zooms above the archive's are over-zoomed by clients (/meta says up to which zoom)
        stored = archive.tile(z, x, y)
        return Response(stored or EMPTY_TILE, media_type=MVT_MEDIA_TYPE, headers={"Content-Encoding": "gzip", **CACHE})
    meta = state.tile_meta()
    key = (meta.build_id, z, x, y)
    data = state.tile_cache.get(key)
    if data is None:
        with state.connection() as conn:
            data = tiles.tile(conn, meta, z, x, y)
        state.tile_cache.put(key, data)
    return Response(data, media_type=MVT_MEDIA_TYPE, headers={"Content-Encoding": "gzip", **CACHE})
