"""PostgreSQL + PostGIS + pgvector store of cell embeddings.

Public API (used by the API/viewer, the CLI and the load scripts):

- ``database_url(config=None) -> str``: the URL to use: ``VECTORGEO_DATABASE_URL``, else
  ``database.url`` in config, else the project-local cluster of :mod:`vectorgeo.db`.
- ``connect(url=None) -> psycopg.Connection``: the one way to connect; registers the pgvector type.
- ``similar(conn, *, h3=None, vector=None, k=10, radius_m=None, bbox=None, exclude_self=True)
  -> list[dict]``: k most similar cells (keys ``h3`` int, ``lat``, ``lng``, ``similarity``) to a cell or a
  vector, optionally within ``radius_m`` metres of the query point or inside ``bbox``
  ``(west, south, east, north)``.
- ``similar_to_point(conn, lat, lng, *, k=10, ...)``: the same for the cell containing a point.
- ``get_cell(conn, h3) -> dict | None``: keys h3, lat, lng, embedding, status, region, model_version.
- ``resolution(conn) -> int``: H3 resolution of the loaded cells.
- ``load_region(conn, path, marker_path=None) -> dict``: replace one region from its GeoParquet file.
- ``build_indexes(conn, hnsw_m=16, hnsw_ef_construction=64) -> dict``: GIST + HNSW, then ANALYZE.
"""

from __future__ import annotations
