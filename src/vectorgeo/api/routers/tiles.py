"""``GET /tiles/{z}/{x}/{y}.pbf``: vector tiles of hexagons coloured by embedding (:mod:`vectorgeo.tiles`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import Response

from vectorgeo import tiles
from vectorgeo.api.models import ERRORS
from vectorgeo.api.state import StateDep

router = APIRouter(tags=["tiles"])

MVT_MEDIA_TYPE = "application/vnd.mapbox-vector-tile"


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
    meta = state.tile_meta()
    key = (meta.build_id, z, x, y)
    data = state.tile_cache.get(key)
    if data is None:
        with state.connection() as conn:
            data = tiles.tile(conn, meta, z, x, y)
        state.tile_cache.put(key, data)
    return Response(
        data,
        media_type=MVT_MEDIA_TYPE,
        headers={"Content-Encoding": "gzip", "Cache-Control": "public, max-age=300"},
    )
