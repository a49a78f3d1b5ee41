"""Database benchmark: bulk load (binary COPY vs multi-row INSERT), HNSW build, filtered kNN latency/recall.

Synthetic data: N of the land cells of one H3 resolution (``--resolution``, default 6: the 4,009,863 cells
of the res-6 world; drawn at random when N is smaller), sorted by h3 and grouped into res-0 regions like
the workflow's region files, with unit vectors of dimension ``--dim`` (default 64):

- ``--vectors smooth`` (default): like trained embeddings, of low intrinsic dimension and varying
  smoothly with position: random Fourier features of the position (wavelengths ~100 to ~3,000 km)
  mapped to a 24-dimensional latent with a little per-cell noise, then to ``dim`` dimensions with
  decaying scales, plus isotropic noise. At 64 dimensions: 95 % of the variance in 9 dimensions, 99 %
  in 14 (``vector_stats``), against 9 and 15 for a trained 64-dimensional model's embeddings of the
  default res-5 world; their nearest neighbours are less tight (mean cosine of the 10th neighbour in a
  20,000-cell sample 0.92 against 0.98), so kNN is, if anything, harder here;
- ``--vectors random``: independent normal vectors, the worst case (in 64 dimensions every vector is
  almost equally far from every other, so an approximate index finds few of the exact neighbours).

Figures:

- ``copy_rows_per_s``: :func:`vectorgeo.store.load_arrays` per region (DELETE of the region's key
  range + numpy-built binary COPY, one transaction per region) into a table with its primary key.
- ``insert_rows_per_s`` (without ``--skip-insert``): the old way, same data, same run, same table
  definition: multi-row INSERT statements of 10,000 rows with literal values (SQL text building not
  timed, which favours INSERT; ``insert_rows_per_s_incl_sql_building`` counts it), interleaved with the
  COPY region by region so that both see the same load of the shared machine.
- ``hnsw_build_s``: :func:`vectorgeo.store.build_indexes` HNSW step (settings from the default config's
  ``database`` section, or the ``--hnsw-*`` / ``--build-workers`` options).
- ``per_radius``: :func:`vectorgeo.store.similar` (method auto, k = 10) from random cells, unfiltered
  (``none``) and at every radius, client-side wall time over a socket: p50, p95, the path the planner
  took (share of exact scans) and ``recall_at_10``: mean |auto ∩ exact| / |exact| over the query cells,
  where exact is the exact scan over the radius-filtered rows (``method="exact"``), and for ``none`` the
  exact top 10 of all rows computed with numpy.
- ``load_average``: the 1-minute load average sampled every 2 s during each phase (mean, max).

Runs its own temporary cluster (removed afterwards) unless ``--url`` names a database.
Usage: ``.venv/bin/python benchmarks/load.py --rows 1000000``. Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from psycopg import sql

from vectorgeo import db, h3cells, store
from vectorgeo.config import load_config
from vectorgeo.layers import Layer, land_mask_spec, layer_source_files
from vectorgeo.rasters import prepare_layer

ROOT = Path(__file__).resolve().parents[1]
RADII_KM = (20, 50, 100, 200, 500, 1000, 2000)
VECTOR_CHUNK = 500_000
INSERT_BATCH = 10_000


def land_mask() -> Layer:
    """The default config's land mask, prepared once into .vectorgeo/bench-layers."""
    spec = land_mask_spec(load_config(ROOT / "config" / "config.yaml"))
    npy = ROOT / ".vectorgeo" / "bench-layers" / f"{spec.name}.npy"
    if not npy.exists():
        npy.parent.mkdir(parents=True, exist_ok=True)
        prepare_layer(spec, layer_source_files(spec)[0], npy, npy.with_suffix(".grid.json"))
    layer = Layer.open(spec, npy)
    if layer.array.dtype == np.bool_:
        # a mask prepared as bool: look it up as 0/1 bytes (Layer's lookup table indexes by raw value)
        layer = Layer(spec, layer.grid, layer.array.view(np.uint8))
    return layer


def land_cells(n: int, res: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n of the stencil's land cells at H3 resolution ``res`` (drawn at random when there are more),
    sorted by h3: (h3, lat, lng) of their centres."""
    from vectorgeo.stencil import iter_land_cells

    parts = list(iter_land_cells(land_mask(), res, 0))
    h3 = np.concatenate([p[0] for p in parts])
    lat = np.concatenate([p[1] for p in parts])
    lng = np.concatenate([p[2] for p in parts])
    if n > h3.shape[0]:
        raise SystemExit(f"--rows {n}: resolution {res} has only {h3.shape[0]} land cells (use a finer --resolution)")
    keep = np.sort(rng.choice(h3.shape[0], size=n, replace=False)) if n < h3.shape[0] else np.arange(n)
    order = np.argsort(h3[keep])
    idx = keep[order]
    return h3[idx], lat[idx], lng[idx]


def smooth_vectors(lat: np.ndarray, lng: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors of low intrinsic dimension that vary smoothly with position (see the module docstring)."""
    latent, features = 24, 64
    w = rng.normal(size=(3, features)) * np.geomspace(2.0, 60.0, features)  # radians^-1 on the unit sphere
    b = rng.uniform(0, 2 * np.pi, features)
    to_latent = rng.normal(size=(features, latent)) / np.sqrt(features)
    to_dim = rng.normal(size=(latent, dim)) * np.exp(-np.arange(latent) / 6.0)[:, None]
    out = np.empty((lat.shape[0], dim), dtype=np.float32)
    for s in range(0, lat.shape[0], VECTOR_CHUNK):
        phi, lam = np.radians(lat[s : s + VECTOR_CHUNK]), np.radians(lng[s : s + VECTOR_CHUNK])
        xyz = np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=1)
        z = np.cos(xyz @ w + b) @ to_latent
        z += 0.03 * rng.normal(size=z.shape)
        x = z @ to_dim + 0.08 * rng.normal(size=(z.shape[0], dim))
        out[s : s + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def random_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Independent normal unit vectors."""
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, VECTOR_CHUNK):
        x = rng.normal(size=(min(VECTOR_CHUNK, n - s), dim))
        out[s : s + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def vector_stats(emb: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """Dimensions holding 90/95/99 % of the variance; mean cosine of the 1st and 10th neighbour of 2,000 cells
    within a sample of 20,000 (how tight neighbourhoods are)."""
    sample = emb[rng.choice(emb.shape[0], size=min(20_000, emb.shape[0]), replace=False)].astype(np.float64)
    centred = sample - sample.mean(axis=0)
    var = np.sort(np.linalg.eigvalsh(centred.T @ centred))[::-1]
    cum = np.cumsum(var) / var.sum()
    sim = sample[:2000] @ sample.T
    sim[np.arange(min(2000, sample.shape[0])), np.arange(min(2000, sample.shape[0]))] = -2.0
    sim.sort(axis=1)
    return {
        "dims_for_variance_90_95_99": [int(np.searchsorted(cum, q)) + 1 for q in (0.90, 0.95, 0.99)],
        "neighbour_cosine_1st": round(float(sim[:, -1].mean()), 3),
        "neighbour_cosine_10th": round(float(sim[:, -10].mean()), 3),
    }


class LoadSampler:
    """The 1-minute load average every ``every_s`` seconds, in a background thread, by phase."""

    def __init__(self, every_s: float = 2.0) -> None:
        import threading

        self.phase = "setup"
        self.samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._every_s = every_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.setdefault(self.phase, []).append(os.getloadavg()[0])
            self._stop.wait(self._every_s)

    def summary(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        return {
            k: {"mean": round(float(np.mean(v)), 2), "max": round(float(np.max(v)), 2)} for k, v in self.samples.items()
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def regions_of(h3: np.ndarray) -> np.ndarray:
    """Res-0 parent of each cell."""
    return h3cells.parents(h3, 0)


def insert_statements(
    h3: np.ndarray, lat: np.ndarray, lng: np.ndarray, emb: np.ndarray, region: np.ndarray, table: str
) -> list[str]:
    """The old way: multi-row INSERT statements of (up to) 10,000 rows with literal values."""
    out = []
    h3i = h3.view(np.int64)
    regi = region.view(np.int64)
    for start in range(0, h3.shape[0], INSERT_BATCH):
        sl = slice(start, start + INSERT_BATCH)
        values = ",".join(
            f"({a},'SRID=4326;POINT({x!r} {y!r})','[{','.join(map(repr, e.tolist()))}]','ok',{r})"
            for a, x, y, e, r in zip(
                h3i[sl].tolist(), lng[sl].tolist(), lat[sl].tolist(), emb[sl], regi[sl].tolist(), strict=True
            )
        )
        out.append(f"INSERT INTO {table} (h3, geom, embedding, status, region) VALUES " + values)
    return out


def load_both(
    conn: Any,
    mv: str,
    h3: np.ndarray,
    lat: np.ndarray,
    lng: np.ndarray,
    emb: np.ndarray,
    region: np.ndarray,
    insert: bool,
) -> dict[str, Any]:
    """Load every region with binary COPY and, interleaved, the same rows with 10k-row INSERTs.

    Interleaving (region i by COPY, then the INSERT statements that end within region i) exposes both
    methods to the same load of the shared machine at the same time.
    """
    conn.execute("DROP TABLE IF EXISTS bench_insert")
    conn.execute(
        f"""CREATE TABLE bench_insert (h3 bigint PRIMARY KEY, geom geometry(Point, 4326) NOT NULL,
            embedding vector({emb.shape[1]}), status text NOT NULL, region bigint NOT NULL)"""
    )
    bounds = np.flatnonzero(np.diff(region)) + 1
    starts, ends = np.r_[0, bounds], np.r_[bounds, h3.shape[0]]
    valid = np.ones(h3.shape[0], dtype=bool)
    copy_s = insert_s = build_s = 0.0
    done = 0  # rows inserted the old way
    for s, e in zip(starts, ends, strict=True):
        t0 = time.perf_counter()
        store.load_arrays(
            conn,
            h3=h3[s:e],
            lat=lat[s:e],
            lng=lng[s:e],
            embedding=emb[s:e],
            valid=valid[s:e],
            status=["ok"] * int(e - s),
            model_version=mv,
            region=int(region[s]),
        )
        copy_s += time.perf_counter() - t0
        if not insert:
            continue
        upto = e if e == h3.shape[0] else done + (e - done) // INSERT_BATCH * INSERT_BATCH
        if upto > done:
            t0 = time.perf_counter()
            sl = slice(done, upto)
            statements = insert_statements(h3[sl], lat[sl], lng[sl], emb[sl], region[sl], "bench_insert")
            build_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            for st in statements:
                conn.execute(st)
            insert_s += time.perf_counter() - t0
            done = upto
    n = h3.shape[0]
    out: dict[str, Any] = {
        "regions": int(starts.shape[0]),
        "copy_s": round(copy_s, 2),
        "copy_rows_per_s": round(n / copy_s),
    }
    if insert:
        assert conn.execute("SELECT count(*) FROM bench_insert").fetchone()[0] == n
        out.update(
            insert_s=round(insert_s, 2),
            insert_rows_per_s=round(n / insert_s),
            insert_rows_per_s_incl_sql_building=round(n / (insert_s + build_s)),
            copy_over_insert=round(insert_s / copy_s, 2),
        )
    conn.execute("DROP TABLE bench_insert")
    return out


def exact_top10(emb: np.ndarray, i: int) -> set[int]:
    """Rows of the 10 most similar vectors to row ``i`` (itself left out), by numpy over every row."""
    sim = emb @ emb[i]
    sim[i] = -np.inf
    return set(np.argpartition(-sim, 10)[:10].tolist())


def measure_queries(
    conn: Any, query: store.QuerySettings, mv: str, h3: np.ndarray, emb: np.ndarray, queries: np.ndarray
) -> dict[str, Any]:
    """Latency, path and recall per radius (``none`` = unfiltered) from the query rows ``queries``."""
    from vectorgeo.store.plan import spatial_filter, use_exact

    kw = {"model_version": mv}
    ds = store.dataset(conn, mv)
    for i in queries[:5]:  # warm-up
        store.similar(conn, query, h3=int(h3[i]), k=10, **kw)
    out: dict[str, Any] = {}
    for r_km in (None, *RADII_KM):
        radius = None if r_km is None else r_km * 1000.0
        ts, recalls, sizes, exact_path = [], [], [], []
        for i in queries:
            t = time.perf_counter()
            got = store.similar(conn, query, h3=int(h3[i]), k=10, radius_m=radius, **kw)
            ts.append(time.perf_counter() - t)
            if radius is None:
                truth = {int(h3[j]) for j in exact_top10(emb, int(i))}
                exact_path.append(False)
            else:
                rows = store.similar(conn, query, h3=int(h3[i]), k=10, radius_m=radius, method="exact", **kw)
                truth = {x["h3"] for x in rows}
                cell = store.get_cell(conn, int(h3[i]), model_version=mv)
                spatial = spatial_filter(radius, (cell["lat"], cell["lng"]), None)
                exact_path.append(use_exact(conn, ds, spatial, 10, "auto", query.exact_scan_max_rows))
            sizes.append(len(truth))
            if truth:
                recalls.append(len({g["h3"] for g in got} & truth) / len(truth))
        key = "none" if r_km is None else str(r_km)
        t_ms = 1000 * np.array(ts)
        on_exact = np.array(exact_path, dtype=bool)
        out[key] = {
            "p50_ms": round(float(np.median(t_ms)), 2),
            "p95_ms": round(float(np.percentile(t_ms, 95)), 2),
            "recall_at_10": round(float(np.mean(recalls)), 4) if recalls else None,
            "exact_path_share": round(float(on_exact.mean()), 2),
            # p95 of each path where it was taken (which of the two sets the overall p95)
            "p95_ms_exact_path": round(float(np.percentile(t_ms[on_exact], 95)), 2) if on_exact.any() else None,
            "p95_ms_index_path": round(float(np.percentile(t_ms[~on_exact], 95)), 2) if (~on_exact).any() else None,
            "mean_results": round(float(np.mean(sizes)), 1),
        }
        print(f"radius {key} km: {out[key]}", file=sys.stderr)
    return out


def hnsw_plan_used(conn: Any, query: store.QuerySettings, mv: str, cell: int) -> bool:
    """Whether the index path of a 2,000 km query scans the HNSW index: its plan, under the settings the
    query runs with (parallel workers and JIT off, the HNSW scan settings)."""
    from vectorgeo.store.plan import spatial_filter
    from vectorgeo.store.query import _index_gucs, _index_sql, _run

    ds = store.dataset(conn, mv)
    q = store.get_cell(conn, cell, model_version=mv)
    assert q is not None
    spatial = spatial_filter(2_000_000.0, (q["lat"], q["lng"]), None)
    cond = sql.SQL(" AND ").join([sql.SQL("embedding IS NOT NULL"), *spatial.index])
    params = {"q": q["embedding"], "k": 10, "candidates": max(query.ef_search, 10), **spatial.params}
    plan = _run(conn, sql.SQL("EXPLAIN ") + _index_sql(ds, cond), params, _index_gucs(query, 10, iterative=True))
    return any("hnsw" in str(r[0]) for r in plan)


def settings_from(args: argparse.Namespace) -> tuple[store.QuerySettings, store.IndexSettings]:
    """The default config's query and index settings, with the command line's overrides."""
    database = db.settings(load_config(ROOT / "config" / "config.yaml"))
    overrides = {
        "hnsw_m": args.hnsw_m,
        "hnsw_ef_construction": args.ef_construction,
        "hnsw_storage": args.storage,
        "index_build_workers": args.build_workers,
        "ef_search": args.ef_search,
        "maintenance_work_mem": args.maintenance_work_mem,
        "max_scan_tuples": args.max_scan_tuples,
        "exact_scan_max_rows": args.exact_max_rows,
        "local_exact_rings": args.local_rings,
    }
    database.update({k: v for k, v in overrides.items() if v is not None})
    return store.QuerySettings.from_config(database), store.IndexSettings.from_config(database)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension")
    ap.add_argument(
        "--resolution",
        type=int,
        default=6,
        help="H3 resolution of the cells: --rows of its land cells (res 6 has 4,009,863), as the workflow stores them",
    )
    ap.add_argument("--vectors", choices=["smooth", "random"], default="smooth")
    ap.add_argument("--queries", type=int, default=50, help="query cells per radius")
    ap.add_argument("--url", help="use this database instead of a temporary cluster (tables are added)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-insert", action="store_true", help="skip the INSERT baseline")
    ap.add_argument(
        "--load-only",
        action="store_true",
        help="only the load (COPY, and INSERT unless --skip-insert): no index, no queries",
    )
    ap.add_argument("--hnsw-m", type=int, help="database.hnsw_m (default: the config's)")
    ap.add_argument("--ef-construction", type=int, help="database.hnsw_ef_construction")
    ap.add_argument("--storage", choices=["vector", "halfvec"], help="database.hnsw_storage")
    ap.add_argument("--build-workers", type=int, help="database.index_build_workers")
    ap.add_argument("--ef-search", type=int, help="database.ef_search")
    ap.add_argument("--maintenance-work-mem", help="database.maintenance_work_mem, e.g. 4GB")
    ap.add_argument("--max-scan-tuples", type=int, help="database.max_scan_tuples")
    ap.add_argument("--local-rings", type=int, help="database.local_exact_rings")
    ap.add_argument("--exact-max-rows", type=int, help="database.exact_scan_max_rows (default: the cost model's limit)")
    ap.add_argument(
        "--reindex",
        action="store_true",
        help="with --queries-only: rebuild the indexes with the given --hnsw-*/--storage settings first "
        "(an HNSW index with other parameters is dropped) and time the build",
    )
    ap.add_argument(
        "--queries-only",
        metavar="MODEL_VERSION",
        help="with --url: only the query measurements, on a dataset an earlier run with the same --rows, --dim, "
        "--vectors and --seed left there (e.g. to repeat them when the shared machine is quieter)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.queries_only and args.url is None:
        raise SystemExit("--queries-only needs --url")
    if args.load_only and args.queries_only:
        raise SystemExit("--load-only and --queries-only exclude each other")
    if args.reindex and not args.queries_only:
        raise SystemExit("--reindex needs --queries-only (a fresh load builds its indexes anyway)")
    query, index = settings_from(args)
    sampler = LoadSampler()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    h3, lat, lng = land_cells(args.rows, args.resolution, rng)
    if args.vectors == "smooth":
        emb = smooth_vectors(lat, lng, args.dim, rng)
    else:
        emb = random_vectors(h3.shape[0], args.dim, rng)
    region = regions_of(h3)
    print(f"generated {h3.shape[0]} land cells in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out: dict[str, Any] = {
        "rows": int(h3.shape[0]),
        "dim": args.dim,
        "vectors": args.vectors,
        "vector_stats": vector_stats(emb, np.random.default_rng(1)),
    }
    cluster = None
    url = args.url
    if url is None:
        cluster = db.Cluster(home=Path(tempfile.mkdtemp(prefix="vectorgeo-bench-")), port=free_port())
        url = cluster.start()
    try:
        with store.connect(url) as conn:
            mv = args.queries_only or f"bench-{args.rows}-{args.dim}-{args.vectors}-{args.seed}-{time.time_ns()}"
            if not args.queries_only:
                sampler.phase = "load"
                out.update(load_both(conn, mv, h3, lat, lng, emb, region, insert=not args.skip_insert))
                print(f"load: {out}", file=sys.stderr)
            if not args.load_only and (not args.queries_only or args.reindex):
                sampler.phase = "index"
                summary = store.build_indexes(conn, index, model_version=mv)
                out["index"] = {k: v for k, v in summary.items() if k not in ("model_version", "table")}
                out["hnsw_build_s"] = summary["hnsw_s"]
                print(f"indexes: {summary}", file=sys.stderr)
            if not args.load_only:
                sampler.phase = "queries"
                queries = np.random.default_rng(args.seed + 1).choice(h3.shape[0], size=args.queries, replace=False)
                out["per_radius"] = measure_queries(conn, query, mv, h3, emb, queries)
                out["index_path_plan_uses_hnsw"] = hnsw_plan_used(conn, query, mv, int(h3[queries[0]]))
                out["query_settings"] = asdict(query)
                ds = store.dataset(conn, mv)
                out["exact_scan_limit_rows"] = round(store.exact_scan_limit(conn, ds, 10, query.exact_scan_max_rows))
    finally:
        if cluster is not None:
            cluster.stop(mode="immediate")
            shutil.rmtree(cluster.home, ignore_errors=True)
    out["load_average"] = sampler.summary()
    out["cpus"] = os.cpu_count()
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
