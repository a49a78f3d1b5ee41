"""``GET /cells/{h3}`` and ``GET /point``: one loaded cell with its embedding and hexagon."""

from __future__ import annotations

from typing import Annotated, Any

import psycopg
from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from vectorgeo import h3cells, store
from vectorgeo.api.errors import NotFound
from vectorgeo.api.models import ERRORS, NOT_FOUND, Cell, PointCell
from vectorgeo.api.state import StateDep
from vectorgeo.validation import H3_PATTERN, parse_cell

router = APIRouter(tags=["cells"])


def cell_body(conn: psycopg.Connection[Any], cell: int, resolution: int) -> dict[str, Any] | None:
    """A loaded cell as a :class:`~vectorgeo.api.models.Cell`, or None when it is not loaded."""
    row = store.get_cell(conn, cell)
    if row is None:
        return None
    emb = row["embedding"]
    return {
        "h3": h3cells.to_str(row["h3"]),
        "lat": row["lat"],
        "lng": row["lng"],
        "status": row["status"],
        "region": row["region"],
        "model_version": row["model_version"],
        "resolution": resolution,
        "embedding": None if emb is None else [float(v) for v in emb],
        "boundary": h3cells.boundary(cell),
    }


@router.get("/cells/{h3}", response_model=Cell, responses={**ERRORS, **NOT_FOUND})
def get_cell(
    state: StateDep, h3: Annotated[str, PathParam(pattern=H3_PATTERN, description="H3 cell, 15 hex digits.")]
) -> Any:
    """One cell: embedding (null when unusable), centre, status, region and hexagon."""
    with state.connection() as conn:
        res = state.resolution(conn)
        cell = parse_cell(h3, "h3", resolution=res)
        body = cell_body(conn, cell, res)
    if body is None:
        raise NotFound("h3", f"parameter 'h3': cell {h3cells.to_str(cell)} is not loaded")
    return body


@router.get("/point", response_model=PointCell, responses={**ERRORS, **NOT_FOUND})
def point(
    state: StateDep,
    lat: Annotated[float, Query(ge=-90, le=90, allow_inf_nan=False, description="Latitude, degrees.")],
    lng: Annotated[float, Query(ge=-180, le=180, allow_inf_nan=False, description="Longitude, degrees.")],
) -> Any:
    """The loaded cell containing a point, with its embedding."""
    with state.connection() as conn:
        res = state.resolution(conn)
        cell = h3cells.cell_at(lat, lng, res)
        body = cell_body(conn, cell, res)
    if body is None:
        raise NotFound("lat", f"no loaded cell at lat {lat}, lng {lng} (cell {h3cells.to_str(cell)})")
    return {**body, "query_lat": lat, "query_lng": lng}
