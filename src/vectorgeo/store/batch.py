"""Loading many regions in one job: the workflow's ``load_regions`` worker.

One job loads every region file of a run, over ``threads`` connections, instead of one job (one Python
start-up, one connection) per region. Each region is still its own transaction
(:func:`vectorgeo.store.load_region`), so a crash or a failed region leaves every other region as it
was, and the rows of a region are replaced, never duplicated. The catalog records each loaded region's
file checksum (SHA-256) and row count in the same transaction as its rows, which makes reruns cheap and
exact:

- a region whose file has the checksum and row count the catalog holds is not loaded again;
- a region of the model version that no file names any more (a stencil that lost the region) is removed,
  so that the table holds exactly the cells of the files, each once;
- a run interrupted half-way resumes where it stopped: the regions committed before are unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from vectorgeo import h3cells
from vectorgeo.errors import DatabaseError, DataError
from vectorgeo.store.catalog import catalog_exists, dataset, region_id, region_range
from vectorgeo.store.connection import connect
from vectorgeo.store.load import REGION_FILE, file_sha256, load_region

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionFile:
    """A region embedding file as the catalog sees it: region, model version, rows and checksum."""

    path: str
    region: str
    model_version: str
    rows: int
    checksum: str


def describe(path: str | Path, checksum: bool = True) -> RegionFile:
    """Region, model version and rows of a region file from its metadata, and its SHA-256.

    Args:
        path: A region embedding file.
        checksum: Hash the file; False leaves ``checksum`` empty (the metadata only).

    Raises:
        DataError: unreadable file, or one that does not name its region or model version.
    """
    from vectorgeo import geoparquet

    p = str(path)
    _, meta, rows = geoparquet.read_metadata(path)
    region = meta.get("region")
    if not region:
        m = REGION_FILE.match(Path(p).name)
        if not m:
            raise DataError(p, "cannot tell the region: no 'region' in the file metadata and no {region}_{digest} name")
        region = m.group(1)
    version = meta.get("model_version")
    if not version:
        raise DataError(p, "no 'model_version' in the file metadata")
    return RegionFile(
        p, h3cells.to_str(region_id(region)), str(version), int(rows), file_sha256(path) if checksum else ""
    )


def loaded_regions(conn: psycopg.Connection[Any], model_version: str) -> dict[str, tuple[int, str]]:
    """The catalog's loaded regions of a model version: region (hex) → (rows, checksum)."""
    if not catalog_exists(conn):
        return {}
    rows = conn.execute(
        "SELECT region, rows, checksum FROM vectorgeo_regions WHERE model_version = %s", (model_version,)
    ).fetchall()
    return {h3cells.to_str(int(r)): (int(n), str(c)) for r, n, c in rows}


def remove_region(conn: psycopg.Connection[Any], model_version: str, region: str) -> int:
    """Delete a region's rows and its catalog entry in one transaction (under the region's lock); rows deleted."""
    ds = dataset(conn, model_version)
    rid = region_id(region)
    lo, hi = region_range(rid, ds.resolution)
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"vectorgeo region {model_version} {rid}",)
        )
        cur = conn.execute(sql.SQL("DELETE FROM {} WHERE h3 BETWEEN %s AND %s").format(ds.ident), (lo, hi))
        conn.execute("DELETE FROM vectorgeo_regions WHERE model_version = %s AND region = %s", (model_version, rid))
        return int(cur.rowcount)


class _Loader:
    """Hashes a region file and loads it unless the database holds it already (same rows and checksum);
    each thread loads over a connection of its own (opened at its first region)."""

    def __init__(self, url: str, held: dict[str, tuple[int, str]]) -> None:
        self._url = url
        self._held = held
        self._local = threading.local()
        self._lock = threading.Lock()
        self._opened: list[psycopg.Connection[Any]] = []

    def __call__(self, f: RegionFile) -> tuple[RegionFile, dict[str, Any] | None]:
        f = replace(f, checksum=f.checksum or file_sha256(f.path))
        if self._held.get(f.region) == (f.rows, f.checksum):
            return f, None
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self._url)
            with self._lock:
                self._opened.append(conn)
        return f, load_region(conn, f.path, region=f.region, checksum=f.checksum)

    def close(self) -> None:
        for conn in self._opened:
            conn.close()


def load_regions(
    url: str,
    paths: Sequence[str | Path],
    *,
    threads: int = 1,
    remove_stale: bool = True,
) -> dict[str, Any]:
    """Load the regions of ``paths`` that the database does not hold yet as they are (see the module docstring).

    Args:
        url: Database URL.
        paths: Region embedding files (``{region}_{digest}.parquet``), all of one model version.
        threads: Regions loaded at once, each over its own connection.
        remove_stale: Remove regions of the model version that no file names.

    Returns:
        A summary: model_version, table, dim, resolution, rows (of the files), loaded / unchanged / removed
        region counts, seconds, and per region (hex) its rows, checksum, file and whether it was loaded.

    Raises:
        DataError: no files, files of several model versions or two files of one region.
        DatabaseError: a region failed to load (the regions committed before stay loaded).
    """
    t0 = time.perf_counter()
    if not paths:
        raise DataError("embeddings", "no region files to load")
    # metadata first (cheap); the files are hashed by the loading threads, beside the other threads' COPYs
    files = [describe(p, checksum=False) for p in paths]
    versions = sorted({f.model_version for f in files})
    if len(versions) != 1:
        raise DataError("embeddings", f"region files of several model versions: {versions}")
    seen: dict[str, str] = {}
    for f in files:
        if f.region in seen:
            raise DataError(f.path, f"region {f.region} is also in {seen[f.region]}")
        seen[f.region] = f.path
    version = versions[0]
    with connect(url) as conn:
        held = loaded_regions(conn, version)
    log.info("%d region files of %s, %d regions in the database", len(files), version, len(held))
    loaded: dict[str, dict[str, Any]] = {}
    load = _Loader(url, held)
    index = {f.path: i for i, f in enumerate(files)}
    try:
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="vectorgeo-load") as pool:
            # largest first, so that no large region is left to load alone at the end
            for f, marker in pool.map(load, sorted(files, key=lambda f: -f.rows)):
                files[index[f.path]] = f  # now with its checksum
                if marker is not None:
                    loaded[marker["region"]] = marker
                    log.info("region %s: %d rows in %.2f s", marker["region"], marker["rows"], marker["seconds"])
    finally:
        load.close()
    log.info("%d loaded, %d unchanged", len(loaded), len(files) - len(loaded))
    removed: list[str] = []
    with connect(url) as conn:
        ds = dataset(conn, version)
        if remove_stale:
            for region in sorted(set(held) - set(seen)):
                n = remove_region(conn, version, region)
                removed.append(region)
                log.info("region %s: no file names it any more, %d rows removed", region, n)
    regions = {
        f.region: {
            "rows": f.rows,
            "checksum": f"sha256:{f.checksum}",
            "file": Path(f.path).name,
            "loaded": f.region in loaded,
        }
        for f in files
    }
    return {
        "model_version": version,
        "table": ds.table,
        "dim": ds.dim,
        "resolution": ds.resolution,
        "rows": sum(f.rows for f in files),
        "loaded": len(loaded),
        "unchanged": len(files) - len(loaded),
        "removed": removed,
        "seconds": round(time.perf_counter() - t0, 3),
        "regions": regions,
    }


def check_loaded(conn: psycopg.Connection[Any], summary: dict[str, Any]) -> None:
    """Check that the catalog holds each region of a :func:`load_regions` summary with its rows and checksum.

    Raises:
        DatabaseError: a region is missing or differs (another loader replaced it meanwhile?).
    """
    held = loaded_regions(conn, summary["model_version"])
    want = {r: (v["rows"], v["checksum"].removeprefix("sha256:")) for r, v in summary["regions"].items()}
    bad = sorted(r for r, v in want.items() if held.get(r) != v)
    extra = sorted(set(held) - set(want))
    if bad or extra:
        r = (bad or extra)[0]
        raise DatabaseError(
            f"the database does not hold the loaded regions of {summary['model_version']}: {len(bad)} differ, "
            f"{len(extra)} more; e.g. region {r}: (rows, checksum) {held.get(r)} instead of {want.get(r)}"
        )
