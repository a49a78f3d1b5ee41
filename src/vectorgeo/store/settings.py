"""Settings of the store read from the ``database`` config section, in one place.

The values (and their defaults) are those of the validated config; nothing here repeats a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QuerySettings:
    """How similarity queries run.

    Attributes:
        ef_search: HNSW candidate list size per query (raised to k when k is larger).
        max_scan_tuples: Bound of an iterative HNSW scan.
        exact_scan_max_rows: Largest estimated filtered row count answered by an exact scan; None =
            the cost model of :func:`vectorgeo.store.plan.exact_scan_limit`.
        local_rings: On the index path of a query by cell, the cells up to this many H3 rings around the
            query cell are ranked exactly beside the HNSW candidates (0: none).
    """

    ef_search: int
    max_scan_tuples: int
    exact_scan_max_rows: int | None
    local_rings: int

    @classmethod
    def from_config(cls, database: Mapping[str, Any]) -> QuerySettings:
        """From the validated ``database`` config section (every key present)."""
        rows = database["exact_scan_max_rows"]
        return cls(
            ef_search=int(database["ef_search"]),
            max_scan_tuples=int(database["max_scan_tuples"]),
            exact_scan_max_rows=None if rows is None else int(rows),
            local_rings=int(database["local_exact_rings"]),
        )


@dataclass(frozen=True)
class IndexSettings:
    """How the indexes are built.

    Attributes:
        hnsw_m: HNSW graph links per node.
        hnsw_ef_construction: HNSW candidate list size while building.
        maintenance_work_mem: PostgreSQL ``maintenance_work_mem`` for the build, e.g. ``"1GB"``.
        hnsw_storage: ``vector`` (the index holds the float32 embeddings) or ``halfvec`` (an index on
            ``embedding::halfvec(d)``: half the memory; candidates are re-ranked with the float32 embeddings).
        build_workers: Parallel workers of the build besides the leader (``max_parallel_maintenance_workers``).
    """

    hnsw_m: int
    hnsw_ef_construction: int
    maintenance_work_mem: str
    hnsw_storage: str
    build_workers: int

    @classmethod
    def from_config(cls, database: Mapping[str, Any]) -> IndexSettings:
        """From the validated ``database`` config section (every key present)."""
        return cls(
            hnsw_m=int(database["hnsw_m"]),
            hnsw_ef_construction=int(database["hnsw_ef_construction"]),
            maintenance_work_mem=str(database["maintenance_work_mem"]),
            hnsw_storage=str(database["hnsw_storage"]),
            build_workers=int(database["index_build_workers"]),
        )
