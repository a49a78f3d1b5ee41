"""Similarity-search API and map viewer (FastAPI): ``create_app(database_url)``, served by ``vectorgeo serve``.

Endpoints (OpenAPI at ``/docs`` and ``/openapi.json``), one router per concern in :mod:`.routers`:

- ``POST /search``: the old AWS Lambda's shape, ``{lat, lon, h3?, circleRadiusMeters, limit}`` →
  ``{locations: [{lat, lon, h3}], scores: [...]}``; the query cell is ``h3`` when given, else the cell at
  (lat, lon); results lie within ``circleRadiusMeters`` of (lat, lon), the circle's centre.
- ``GET /similar?h3=&k=&radius_m=`` (and/or ``bbox=west,south,east,north``): the k most similar cells.
- ``POST /query`` (``?format=geojson|csv|parquet`` for a download): search by example, positive and
  negative cells or points, ``similar`` or ``classify``, over every loaded cell held in memory
  (:mod:`vectorgeo.search`); ``GET /scores/{score_id}/{z}/{x}/{y}.pbf``: its score map as vector tiles.
- ``GET /cells/{h3}``: embedding, centre, status and hexagon of one cell; ``GET /cells/{h3}/inputs`` and
  ``/cells/{h3}/imagery.png``: the input patches the model saw there (the cell inspector).
- ``GET /point?lat=&lng=``: the same for the cell containing a point.
- ``GET /tiles/{z}/{x}/{y}.pbf``: gzipped Mapbox Vector Tiles of hexagons coloured by embedding
  (:mod:`vectorgeo.tiles`).
- ``GET /basemap/{z}/{x}/{y}.jpg``: NASA's Blue Marble as Web Mercator tiles (:mod:`vectorgeo.basemap`).
- ``GET /countries.geojson``: Natural Earth country outlines (generalised), ``GET /meta``, ``GET /healthz``.
- ``/``: the viewer (``static/``), with MapLibre GL JS served from ``node_modules`` (``setup/npm.sh``), and
  ``/docs`` with Swagger UI from there too: both work offline.

Limits (:mod:`vectorgeo.validation`): k ≤ 1000 (100,000 for downloads), radius ≤ 5,000 km, bbox within
[-180, 180] × [-90, 90] with south < north, ≤ 100 positives and ≤ 100 negatives, polygons of ≤ 10,000
vertices. Errors are JSON ``{error, message, param}`` (:mod:`.errors`): bad input → 422 naming the
parameter, unknown cell → 404, a body over ``serve.max_body_bytes`` → 413 (:mod:`.limits`), database
down, busy or too slow (``serve.statement_timeout_s``), or nothing loaded → 503 with ``Retry-After``.
CORS only for the origins of ``serve.cors_allow_origins`` (none by default).

The routes share one :class:`~vectorgeo.api.state.AppState` (connection pool, query settings, tile
metadata, the embeddings in memory and score maps of :mod:`.scoring`), created by :func:`create_app` and
kept on ``app.state``.
"""

from vectorgeo.api.app import create_app
from vectorgeo.api.server import serve
from vectorgeo.api.settings import ServeSettings, serve_settings

__all__ = ["ServeSettings", "create_app", "serve", "serve_settings"]
