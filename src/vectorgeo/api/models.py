"""Request and response bodies of the API (they make its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from vectorgeo.validation import H3_PATTERN, MAX_K, MAX_RADIUS_M


class ErrorBody(BaseModel):
    """A 4xx/5xx answer."""

    error: str = Field(
        description="Kind: invalid_request, not_found, method_not_allowed, too_large, unavailable, timeout, internal."
    )
    message: str = Field(description="What is wrong, naming the parameter at fault.")
    param: str | None = Field(default=None, description="The parameter at fault, when one is.")


class Location(BaseModel):
    lat: float
    lon: float
    h3: str = Field(description="H3 cell, 15 hex digits.")


class SearchRequest(BaseModel):
    """The old Lambda's request body."""

    model_config = ConfigDict(extra="ignore")

    lat: float = Field(ge=-90, le=90, allow_inf_nan=False, strict=True, description="Circle centre latitude.")
    lon: float = Field(ge=-180, le=180, allow_inf_nan=False, strict=True, description="Circle centre longitude.")
    h3: str | None = Field(default=None, pattern=H3_PATTERN, description="Query cell; default the cell at (lat, lon).")
    circleRadiusMeters: float = Field(
        gt=0, le=MAX_RADIUS_M, allow_inf_nan=False, strict=True, description="Search radius around (lat, lon)."
    )
    limit: int = Field(default=10, ge=1, le=MAX_K, strict=True, description="Number of results.")


class SearchResponse(BaseModel):
    locations: list[Location]
    scores: list[float] = Field(description="Cosine similarity of each location, most similar first.")


class Cell(BaseModel):
    h3: str
    lat: float
    lng: float
    status: str | None = Field(default=None, description="'ok' or why the embedding is null.")
    region: str | None = None
    model_version: str | None = None
    resolution: int
    embedding: list[float] | None = None
    boundary: list[list[float]] = Field(description="Hexagon vertices [lng, lat] (continuous across ±180°).")


class PointCell(Cell):
    query_lat: float
    query_lng: float


class Similar(BaseModel):
    h3: str
    lat: float
    lng: float
    similarity: float
    boundary: list[list[float]] | None = None


class QueryCell(BaseModel):
    h3: str
    lat: float
    lng: float


class SimilarResponse(BaseModel):
    query: QueryCell
    k: int
    radius_m: float | None
    bbox: list[float] | None
    results: list[Similar]


class Meta(BaseModel):
    model_version: str
    resolution: int
    cells: int
    bounds: list[float]
    tile_maxzoom: int
    tile_max_features: int
    default_k: int
    default_radius_km: float
    max_k: int
    max_radius_m: float


class Health(BaseModel):
    status: str
    database: str
    model_version: str | None = None
    cells: int | None = None
    viewer_assets: bool
    embeddings_in_memory: int = Field(
        0,
        description=(
            "Cells of the active dataset whose embeddings the server holds in memory (search by example, and "
            "POST /search answered without a database query); 0 while they are being read at start-up."
        ),
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid parameter (the message names it)."},
    503: {
        "model": ErrorBody,
        "description": "Database unavailable, busy or too slow (query cancelled), or nothing loaded.",
        "headers": {
            "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}
        },
    },
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such cell."}}
