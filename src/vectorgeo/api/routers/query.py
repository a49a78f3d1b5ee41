"""``POST /query`` (search by example, as JSON or a download) and ``GET /scores/{id}/{z}/{x}/{y}.pbf`` (its map).

The scoring runs over the embeddings held in memory (:mod:`vectorgeo.api.scoring`,
:mod:`vectorgeo.search`), not through SQL; the database is asked only why an example has no
embedding.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import Response

from vectorgeo import export, search, tiles
from vectorgeo.api.errors import NotFound
from vectorgeo.api.models import ERRORS, ErrorBody
from vectorgeo.api.query_models import QueryRequest, QueryResponse
from vectorgeo.api.routers.tiles import MVT_MEDIA_TYPE
from vectorgeo.api.state import StateDep
from vectorgeo.errors import RequestError
from vectorgeo.store import vectors as store_vectors
from vectorgeo.validation import check_result_count, parse_bbox, parse_examples, parse_polygon

router = APIRouter(tags=["query"])

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No positive example has an embedding (the message says why)."}
}
DOWNLOADS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The results: JSON, or a download when `format` is geojson, csv or parquet.",
        "content": {media: {} for media in export.MEDIA_TYPES.values()},
    }
}


def _examples(values: list[Any], param: str, resolution: int, required: bool) -> list[int]:
    for i, v in enumerate(values):
        if not isinstance(v, str | dict):
            raise RequestError(f"{param}[{i}]", "expected an H3 cell (15 hex digits), 'lat,lng' or {lat, lng}")
    return parse_examples(values, param, resolution, required=required)


def _area(body: QueryRequest) -> search.Area:
    return search.Area(
        radius_m=body.radius_m,
        center=None if body.center is None else (body.center.lat, body.center.lng),
        bbox=None if body.bbox is None else parse_bbox(body.bbox),
        polygon=None if body.polygon is None else parse_polygon(body.polygon),
    )


@router.post("/query", response_model=QueryResponse, responses={**ERRORS, **NOT_FOUND, **DOWNLOADS})
def query(
    body: QueryRequest,
    state: StateDep,
    format: Annotated[
        Literal["json", "geojson", "csv", "parquet"],
        Query(description="json (default), or a download: geojson (hexagons), csv, parquet (GeoParquet)."),
    ] = "json",
    boundary_: Annotated[bool, Query(alias="boundary", description="Add each result's hexagon (JSON).")] = False,
) -> Any:
    """Search by example: score every loaded cell against the examples and return the best k (in an area).

    The answer's ``score_id`` names the score map of every loaded cell, drawn by the vector tiles at
    ``tiles``. Examples without an embedding are left out (``examples[].reason``); a 404 when no
    positive is left.
    """
    k = check_result_count(body.k, format)
    area = _area(body)
    snap = state.scores.snapshot()
    vectors = snap.vectors
    positives = _examples(body.positives, "positives", vectors.resolution, True)
    negatives = _examples(body.negatives, "negatives", vectors.resolution, False)

    def missing(cells: np.ndarray) -> list[str]:
        with state.connection() as conn:
            return store_vectors.describe_missing(conn, vectors, cells)

    try:
        q = search.Query(positives, negatives, body.mode, k, area)
        answer = search.run(vectors, q, missing=missing, cached=state.scores.maps.get)
    except search.NoExamples as e:
        raise NotFound("positives", str(e)) from None
    smap = answer.score_map
    state.scores.remember(smap, answer.pos, answer.neg)
    if format != "json":
        data = export.encode(answer.export(), format)
        name = f"vectorgeo-{smap.mode}-{smap.id}{export.SUFFIXES[format]}"
        disposition = f'attachment; filename="{name}"'
        return Response(data, media_type=export.MEDIA_TYPES[format], headers={"Content-Disposition": disposition})
    return {
        "score_id": smap.id,
        "tiles": f"/scores/{smap.id}/{{z}}/{{x}}/{{y}}.pbf",
        "tile_maxzoom": tiles.max_zoom(vectors.resolution, state.scores.max_features),
        "mode": smap.mode,
        "score_kind": smap.kind,
        "model_version": vectors.model_version,
        "resolution": vectors.resolution,
        "cells": vectors.n,
        "area_cells": answer.area_cells,
        "k": k,
        "examples": [e.to_dict(vectors) for e in answer.examples],
        "results": answer.results(boundary=boundary_),
    }


@router.get(
    "/scores/{score_id}/{z}/{x}/{y}.pbf",
    response_class=Response,
    responses={
        200: {"content": {MVT_MEDIA_TYPE: {}}, "description": "Gzipped Mapbox Vector Tile (layer `scores`)."},
        404: {"model": ErrorBody, "description": "Unknown score map (run the query again)."},
        **ERRORS,
    },
)
def score_tile(
    state: StateDep,
    score_id: Annotated[str, PathParam(pattern=r"^[0-9a-f]{20}$", description="`score_id` of a query.")],
    z: Annotated[int, PathParam(ge=0, le=tiles.MAX_ZOOM)],
    x: Annotated[int, PathParam(ge=0, lt=2**tiles.MAX_ZOOM)],
    y: Annotated[int, PathParam(ge=0, lt=2**tiles.MAX_ZOOM)],
) -> Response:
    """Hexagons of a score map (layer ``scores``: h3, score in [0, 1]); parents with mean scores at low zooms."""
    tiles.check_tile(z, x, y)
    smap = state.scores.score_map(score_id)
    if smap is None:
        raise NotFound("score_id", f"score map {score_id} is unknown or of data loaded since; run the query again")
    return Response(
        state.scores.tile(smap, z, x, y),
        media_type=MVT_MEDIA_TYPE,
        headers={"Content-Encoding": "gzip", "Cache-Control": "private, max-age=3600"},
    )
