"""Request and response bodies of search by example (``POST /query``) and the cell inspector."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vectorgeo.validation import MAX_EXAMPLES, MAX_EXPORT, MAX_K, MAX_RADIUS_M


class LatLng(BaseModel):
    """A point in degrees."""

    model_config = ConfigDict(extra="forbid")

    lat: float = Field(ge=-90, le=90, allow_inf_nan=False, description="Latitude, degrees.")
    lng: float = Field(ge=-180, le=180, allow_inf_nan=False, description="Longitude, degrees.")


EXAMPLE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "description": "An H3 cell (15 hex digits) or 'lat,lng'."},
        {
            "type": "object",
            "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lng": {"type": "number", "minimum": -180, "maximum": 180},
            },
            "required": ["lat", "lng"],
            "additionalProperties": False,
        },
    ]
}


class QueryRequest(BaseModel):
    """A search by example."""

    model_config = ConfigDict(extra="forbid")

    positives: list[Any] = Field(
        min_length=1,
        max_length=MAX_EXAMPLES,
        description="Examples of what to find: H3 cells (15 hex digits) or {lat, lng} points.",
        json_schema_extra={"items": EXAMPLE_SCHEMA},
    )
    negatives: list[Any] = Field(
        default_factory=list,
        max_length=MAX_EXAMPLES,
        description="Examples of what not to find (optional).",
        json_schema_extra={"items": EXAMPLE_SCHEMA},
    )
    mode: Literal["similar", "classify"] = Field(
        "similar",
        description=(
            "similar: cosine similarity to the mean of the positives, pushed away from the negatives, scored as "
            "a percentile among all cells; classify: a regularised logistic model fitted on the examples (and a "
            "background sample), scored as a probability."
        ),
    )
    k: int = Field(
        10,
        ge=1,
        le=MAX_EXPORT,
        description=f"Number of results: at most {MAX_K} as JSON, {MAX_EXPORT} as a download (?format=).",
    )
    radius_m: float | None = Field(
        default=None,
        gt=0,
        le=MAX_RADIUS_M,
        allow_inf_nan=False,
        description="Keep results within this distance (m) of `center` (default the first usable positive).",
    )
    center: LatLng | None = Field(default=None, description="Centre of `radius_m`.")
    bbox: list[float] | None = Field(
        default=None,
        min_length=4,
        max_length=4,
        description="Keep results inside [west, south, east, north] (degrees; west > east crosses 180°).",
    )
    polygon: dict[str, Any] | None = Field(
        default=None,
        description="Keep results inside this GeoJSON Polygon or MultiPolygon (or a Feature holding one).",
    )


class QueryExample(BaseModel):
    role: Literal["positive", "negative"]
    param: str = Field(description="Where the example was given, e.g. positives[0].")
    h3: str
    lat: float
    lng: float
    used: bool = Field(description="False when the cell has no embedding (then `reason` says why).")
    reason: str | None = None


class QueryResult(BaseModel):
    h3: str
    lat: float
    lng: float
    score: float = Field(description="Percentile among all cells (0–100, similar) or probability (0–1, classify).")
    boundary: list[list[float]] | None = Field(default=None, description="Hexagon [lng, lat] (?boundary=true).")


class QueryResponse(BaseModel):
    score_id: str = Field(description="Id of the score map of every loaded cell.")
    tiles: str = Field(description="URL template of the score map's vector tiles (layer `scores`).")
    tile_maxzoom: int = Field(description="Deepest zoom with tiles of their own (deeper zooms reuse them).")
    mode: str
    score_kind: Literal["percentile", "probability"]
    model_version: str
    resolution: int
    cells: int = Field(description="Cells scored (every loaded cell with an embedding).")
    area_cells: int | None = Field(description="Cells inside the area (null: no area given).")
    k: int
    examples: list[QueryExample]
    results: list[QueryResult]


class LayerPatch(BaseModel):
    name: str
    kind: Literal["categorical", "continuous"]
    bands: list[str] | None = Field(default=None, description="A multi-band layer's band names; null for one band.")
    values: list[list[float | list[float | None] | None]] = Field(
        description="The patch, north row first: class indexes (categorical) or physical values, for a "
        "multi-band layer a list of band values per pixel; null = nodata."
    )
    legend: list[dict[str, Any]] | None = Field(default=None, description="Categorical: index, name, colour.")
    unit: str | None = None
    min: float | None = None
    max: float | None = None


class CellInputs(BaseModel):
    h3: str
    lat: float
    lng: float
    patch_px: int
    patch_km: float
    layers: list[LayerPatch]
    imagery: str | None = Field(description="URL of a Blue Marble image of the patch (not a model input).")
