"""``POST /search`` (the old Lambda's shape) and ``GET /similar``: the cells most similar to a cell."""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from vectorgeo import h3cells, store
from vectorgeo import search as vg_search
from vectorgeo.api.errors import NotFound
from vectorgeo.api.models import ERRORS, NOT_FOUND, SearchRequest, SearchResponse, SimilarResponse
from vectorgeo.api.state import AppState, StateDep
from vectorgeo.errors import RequestError
from vectorgeo.validation import BBOX_PATTERN, H3_PATTERN, MAX_K, MAX_RADIUS_M, parse_bbox, parse_cell

router = APIRouter(tags=["search"])


def results(rows: list[dict[str, Any]], with_boundary: bool) -> list[dict[str, Any]]:
    """Store rows as response items (h3 as hex, optionally each hexagon)."""
    out = []
    for r in rows:
        if not math.isfinite(r["similarity"]):
            continue
        d = {"h3": h3cells.to_str(r["h3"]), "lat": r["lat"], "lng": r["lng"], "similarity": r["similarity"]}
        if with_boundary:
            d["boundary"] = h3cells.boundary(r["h3"])
        out.append(d)
    return out


def _missing(row: dict[str, Any] | None) -> str | None:
    """Why a cell cannot be a query cell, or None when it can."""
    if row is None:
        return "is not loaded"
    return "has no embedding" if row["embedding"] is None else None


def _in_memory(
    state: AppState, cell_param: str | None, lat: float, lng: float, radius_m: float, k: int, block: bool = True
) -> list[dict[str, Any]] | None:
    """The k cells most similar to the query cell within the radius, found in the in-memory embeddings,
    or None when the database has to answer: embeddings not in memory (yet) or of another model version,
    a query cell without an embedding (the database's path says why), or a radius too large to cover
    with a few coarse cells.

    The same exact scan as the database's exact path (the radius on the WGS84 ellipsoid, ties by h3),
    without a database round trip: the cells within the radius are a few key ranges of the arrays
    sorted by h3 (:func:`vectorgeo.search.cover_rows`).
    """
    vectors = state.vectors_in_memory(block)
    if vectors is None:
        return None
    if cell_param is not None:
        cell = parse_cell(cell_param, "h3", resolution=vectors.resolution)
    else:
        cell = h3cells.cell_at(lat, lng, vectors.resolution)
    row = int(vectors.index_of(np.array([cell], dtype=np.uint64))[0])
    if row < 0 or vg_search.cover_level(vectors.resolution, radius_m) is None:
        return None
    found = vg_search.nearest(vectors, row, k, vg_search.Area(radius_m=radius_m, center=(lat, lng)))
    sim = vectors.embedding[found] @ vectors.embedding[row]
    return [
        {"h3": int(vectors.h3[i]), "lat": float(vectors.lat[i]), "lng": float(vectors.lng[i]), "similarity": float(s)}
        for i, s in zip(found, sim, strict=True)
    ]


@router.post("/search", response_model=SearchResponse, responses={**ERRORS, **NOT_FOUND})
async def search(body: SearchRequest, state: StateDep) -> Any:
    """Old Lambda shape: cells most similar to ``h3`` (or the cell at lat/lon) within the circle.

    Answered on the event loop from the in-memory embeddings (about a millisecond of numpy, no thread
    hand-off) when they are current; else in the thread pool, from memory after the periodic checks or
    from the database.
    """
    rows = _in_memory(state, body.h3, body.lat, body.lon, body.circleRadiusMeters, body.limit, block=False)
    if rows is None:
        rows = await run_in_threadpool(_answer, state, body)
    found = results(rows, False)
    return {
        "locations": [{"lat": r["lat"], "lon": r["lng"], "h3": r["h3"]} for r in found],
        "scores": [r["similarity"] for r in found],
    }


def _answer(state: AppState, body: SearchRequest) -> list[dict[str, Any]]:
    """POST /search's rows, in a worker thread: from memory (making the checks that are due), else the database."""
    rows = _in_memory(state, body.h3, body.lat, body.lon, body.circleRadiusMeters, body.limit)
    return rows if rows is not None else _from_database(state, body)


def _from_database(state: AppState, body: SearchRequest) -> list[dict[str, Any]]:
    """POST /search answered by the database (:func:`vectorgeo.store.similar`)."""
    with state.connection() as conn:
        ds = state.dataset(conn)
        if body.h3 is not None:
            cell = parse_cell(body.h3, "h3", resolution=ds.resolution)
        else:
            cell = h3cells.cell_at(body.lat, body.lon, ds.resolution)
        why = _missing(store.get_cell(conn, cell, ds=ds))
        if why is not None:
            raise NotFound("h3" if body.h3 else "lat", f"query cell {h3cells.to_str(cell)} {why}")
        rows = store.similar(
            conn,
            state.query,
            h3=cell,
            k=body.limit,
            radius_m=body.circleRadiusMeters,
            center=(body.lat, body.lon),
            ds=ds,
        )
    return rows


@router.get("/similar", response_model=SimilarResponse, responses=ERRORS)
def similar(
    state: StateDep,
    h3: Annotated[str, Query(pattern=H3_PATTERN, description="Query cell, 15 hex digits.")],
    k: Annotated[int, Query(ge=1, le=MAX_K, description="Number of results.")] = 10,
    radius_m: Annotated[
        float | None,
        Query(gt=0, le=MAX_RADIUS_M, allow_inf_nan=False, description="Keep cells within this distance (m)."),
    ] = None,
    bbox: Annotated[
        str | None,
        Query(pattern=BBOX_PATTERN, description="Keep cells inside west,south,east,north (degrees)."),
    ] = None,
    boundary_: Annotated[bool, Query(alias="boundary", description="Add each cell's hexagon.")] = False,
) -> Any:
    """The k cells most similar (cosine) to a cell, within a radius of it and/or inside a bbox."""
    box = parse_bbox(bbox) if bbox is not None else None
    with state.connection() as conn:
        ds = state.dataset(conn)
        cell = parse_cell(h3, "h3", resolution=ds.resolution)
        row = store.get_cell(conn, cell, ds=ds)
        why = _missing(row)
        if row is None or why is not None:
            raise RequestError("h3", f"cell {h3cells.to_str(cell)} {why}")
        rows = store.similar(conn, state.query, h3=cell, k=k, radius_m=radius_m, bbox=box, ds=ds)
    return {
        "query": {"h3": h3cells.to_str(cell), "lat": row["lat"], "lng": row["lng"]},
        "k": k,
        "radius_m": radius_m,
        "bbox": list(box) if box else None,
        "results": results(rows, boundary_),
    }
