"""PostgreSQL + PostGIS + pgvector store of cell embeddings.

Modules, by concern:

- :mod:`~vectorgeo.store.connection`: ``connect(url=None, config=None)``, the one way vectorgeo
  connects (autocommit, pgvector type registered), and ``configure(conn)`` for connection pools;
- :mod:`~vectorgeo.store.catalog`: one table per model version, the catalog tables, ``datasets``,
  ``dataset``, ``resolution``, ``count``;
- :mod:`~vectorgeo.store.binary_copy`: the binary COPY stream, built with numpy;
- :mod:`~vectorgeo.store.load`: ``load_region(conn, path)`` (one transaction per region) and
  ``write_marker``;
- :mod:`~vectorgeo.store.batch`: ``load_regions(url, paths, threads=...)``, the workflow's worker (every
  region file of a run in one job, unchanged regions skipped, regions no file names removed);
- :mod:`~vectorgeo.store.indexes`: ``build_indexes(conn, settings)``: GIST + HNSW, then ANALYZE;
- :mod:`~vectorgeo.store.plan`: spatial filters and the choice between an exact scan and HNSW;
- :mod:`~vectorgeo.store.query`: ``similar(conn, settings, h3=..., k=..., radius_m=..., bbox=...)``,
  ``similar_to_point`` and ``get_cell``;
- :mod:`~vectorgeo.store.settings`: :class:`QuerySettings` and :class:`IndexSettings`, read from the
  ``database`` config section.

Every name below is importable from ``vectorgeo.store`` itself.
"""

from vectorgeo.store.batch import check_loaded, load_regions, remove_region
from vectorgeo.store.binary_copy import COPY_CHUNK_ROWS, COPY_COLUMNS, binary_copy_chunks
from vectorgeo.store.catalog import (
    Dataset,
    count,
    dataset,
    datasets,
    ensure_catalog,
    region_range,
    resolution,
    table_name,
)
from vectorgeo.store.connection import configure, connect, database_error, database_url
from vectorgeo.store.indexes import build_indexes
from vectorgeo.store.load import file_sha256, load_arrays, load_region, write_marker
from vectorgeo.store.plan import (
    EXACT_SCAN_COST_RATIO,
    circle_envelopes,
    estimate_envelope_rows,
    estimate_rows,
    exact_scan_limit,
)
from vectorgeo.store.query import get_cell, similar, similar_to_point
from vectorgeo.store.settings import IndexSettings, QuerySettings

__all__ = [
    "COPY_CHUNK_ROWS",
    "COPY_COLUMNS",
    "EXACT_SCAN_COST_RATIO",
    "Dataset",
    "IndexSettings",
    "QuerySettings",
    "binary_copy_chunks",
    "build_indexes",
    "check_loaded",
    "circle_envelopes",
    "configure",
    "connect",
    "count",
    "database_error",
    "database_url",
    "dataset",
    "datasets",
    "ensure_catalog",
    "estimate_envelope_rows",
    "estimate_rows",
    "exact_scan_limit",
    "file_sha256",
    "get_cell",
    "load_arrays",
    "load_region",
    "load_regions",
    "region_range",
    "remove_region",
    "resolution",
    "similar",
    "similar_to_point",
    "table_name",
    "write_marker",
]
