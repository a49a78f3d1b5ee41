"""``GET /cells/{h3}/inputs`` and ``/cells/{h3}/imagery.png``: the cell inspector (:mod:`vectorgeo.inputs`)."""

from __future__ import annotations

from typing import Annotated, Any

import h3.api.basic_int as h3int
from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import Response

from vectorgeo import basemap, h3cells
from vectorgeo.api.errors import error_response
from vectorgeo.api.models import ERRORS
from vectorgeo.api.query_models import CellInputs
from vectorgeo.api.state import AppState, StateDep
from vectorgeo.inputs import InputLayers
from vectorgeo.validation import H3_PATTERN, parse_cell

router = APIRouter(tags=["cells"])

CellParam = Annotated[str, PathParam(pattern=H3_PATTERN, description="H3 cell, 15 hex digits.")]
IMAGERY_PX = 64


NO_LAYERS = "the model's prepared input layers are not there (results/layers); run the workflow (rule prepare_layer)"


def _centre(state: AppState, h3: str) -> tuple[int, float, float]:
    cell = parse_cell(h3, "h3", resolution=state.scores.vectors().resolution)
    lat, lng = h3int.cell_to_latlng(cell)
    return cell, float(lat), float(lng)


@router.get("/cells/{h3}/inputs", response_model=CellInputs, responses=ERRORS)
def cell_inputs(state: StateDep, h3: CellParam) -> Any:
    """The patches the model saw at a cell: each input layer (classes with a legend, or values), north up.

    503 when the server has no prepared input layers.
    """
    cell, lat, lng = _centre(state, h3)
    inputs = state.inputs
    if inputs is None:
        return error_response(503, "unavailable", NO_LAYERS)
    return {
        "h3": h3cells.to_str(cell),
        "lat": lat,
        "lng": lng,
        "patch_px": inputs.patch_px,
        "patch_km": inputs.patch_km,
        "layers": inputs.patches(lat, lng),
        "imagery": f"/cells/{h3cells.to_str(cell)}/imagery.png",
    }


@router.get(
    "/cells/{h3}/imagery.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "Blue Marble over the patch."}, **ERRORS},
)
def cell_imagery(state: StateDep, h3: CellParam) -> Response:
    """Blue Marble imagery over the cell's patch footprint (context for a person; not a model input)."""
    _, lat, lng = _centre(state, h3)
    inputs = state.inputs
    if inputs is None:
        return error_response(503, "unavailable", NO_LAYERS)
    zoomed = InputLayers(inputs.layers, IMAGERY_PX, inputs.patch_km)
    rows, cols = zoomed.axes(lat, lng)
    return Response(basemap.patch_image(rows, cols), media_type="image/png")
