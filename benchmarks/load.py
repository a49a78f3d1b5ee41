"""Database benchmark: bulk load (binary COPY vs multi-row INSERT), HNSW build, filtered kNN latency/recall.

Synthetic data: N points uniform on land (uniform on the sphere, kept where the GLOBE land mask says
land), each the H3 cell (res 12) containing it, sorted by h3 and grouped into res-0 regions like the
workflow's region files, with random unit vectors (d = 16).

- ``copy_rows_per_s``: :func:`vectorgeo.store.load_arrays` per region (DELETE of the region's key
  range + numpy-built binary COPY, one transaction per region) into a table with its primary key.
- ``insert_rows_per_s``: the old way, same data, same run, same table definition: multi-row INSERT
  statements of 10,000 rows with literal values (SQL text building not timed, which favours INSERT;
  ``insert_rows_per_s_incl_sql_building`` counts it), interleaved with the COPY region by region so
  that both see the same load of the shared machine; one transaction per statement.
- ``hnsw_build_s``: :func:`vectorgeo.store.build_indexes` HNSW step (m, ef_construction from config).
- ``query_p50_ms``, ``query_p95_ms``: :func:`vectorgeo.store.similar` (method auto, k = 10) from random
  cells, unfiltered and at every radius, client-side wall time over a socket.
- ``recall_at_10``: radius km → mean |auto ∩ exact| / |exact| over the query cells, where exact is the
  exact scan over the radius-filtered rows (``method="exact"``).

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
DIM = 16
CELL_RES = 12
INSERT_BATCH = 10_000


def land_mask() -> Layer:
    """The default config's land mask, prepared once into .vectorgeo/bench-layers."""
    spec = land_mask_spec(load_config(ROOT / "config" / "config.yaml"))
    npy = ROOT / ".vectorgeo" / "bench-layers" / f"{spec.name}.npy"
    if not npy.exists():
        npy.parent.mkdir(parents=True, exist_ok=True)
        prepare_layer(spec, layer_source_files(spec)[0], npy, npy.with_suffix(".grid.json"))
    return Layer.open(spec, npy)


def land_points(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n distinct res-12 cells at points uniform on land, sorted by h3: (h3, lat, lng)."""
    import h3ronpy.vector as h3v

    mask = land_mask()
    cells: list[np.ndarray] = []
    lats: list[np.ndarray] = []
    lngs: list[np.ndarray] = []
    have = 0
    while have < n:
        m = 4 * (n - have) + 1000
        lat = np.degrees(np.arcsin(rng.uniform(-1, 1, m)))
        lng = rng.uniform(-180, 180, m)
        keep = np.asarray(mask.values_at(lat, lng), dtype=bool)
        lat, lng = lat[keep], lng[keep]
        c = np.asarray(h3v.coordinates_to_cells(lat, lng, CELL_RES)).astype(np.uint64)
        cells.append(c)
        lats.append(lat)
        lngs.append(lng)
        all_cells = np.concatenate(cells)
        have = np.unique(all_cells).shape[0]
    h3 = np.concatenate(cells)
    lat, lng = np.concatenate(lats), np.concatenate(lngs)
    _, first = np.unique(h3, return_index=True)
    first = np.sort(first)[:n]
    order = np.argsort(h3[first])
    idx = first[order]
    return h3[idx], lat[idx], lng[idx]


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
            embedding vector({DIM}), status text NOT NULL, region bigint NOT NULL)"""
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=50, help="query cells per radius")
    ap.add_argument("--url", help="use this database instead of a temporary cluster (tables are added)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-insert", action="store_true", help="skip the INSERT baseline")
    ap.add_argument(
        "--queries-only",
        metavar="MODEL_VERSION",
        help="with --url: only the query measurements, on a dataset an earlier run with the same --rows and "
        "--seed left there (e.g. to repeat them when the shared machine is quieter)",
    )
    args = ap.parse_args(argv)
    database = db.settings(load_config(ROOT / "config" / "config.yaml"))
    query = store.QuerySettings.from_config(database)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    h3, lat, lng = land_points(args.rows, rng)
    emb = rng.normal(size=(h3.shape[0], DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    region = regions_of(h3)
    print(f"generated {h3.shape[0]} land cells in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    cluster = None
    url = args.url
    if url is None:
        cluster = db.Cluster(home=Path(tempfile.mkdtemp(prefix="vectorgeo-bench-")), port=free_port())
        url = cluster.start()
    out: dict[str, Any] = {"rows": int(h3.shape[0]), "dim": DIM}
    try:
        with store.connect(url) as conn:
            mv = args.queries_only or f"bench-{args.rows}-{args.seed}-{time.time_ns()}"
            if args.queries_only:
                if args.url is None:
                    ap.error("--queries-only needs --url")
                out["queries_only"] = True
                out["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
            else:
                out.update(load_both(conn, mv, h3, lat, lng, emb, region, insert=not args.skip_insert))
                print(f"load: {out}", file=sys.stderr)
                summary = store.build_indexes(conn, store.IndexSettings.from_config(database), model_version=mv)
                out["hnsw_build_s"] = summary["hnsw_s"]
                out["gist_build_s"] = summary["gist_s"]
                out["hnsw_m"], out["hnsw_ef_construction"] = summary["hnsw_m"], summary["hnsw_ef_construction"]
                print(f"indexes: {summary}", file=sys.stderr)

            qkw = {"model_version": mv}
            cells = rng.choice(h3, size=args.queries, replace=False)
            for c in cells[:5]:  # warm-up
                store.similar(conn, query, h3=int(c), k=10, **qkw)
            times: list[float] = []
            per_radius: dict[str, Any] = {}
            recall: dict[str, float] = {}
            t_unf: list[float] = []
            for c in cells:
                t = time.perf_counter()
                store.similar(conn, query, h3=int(c), k=10, **qkw)
                t_unf.append(time.perf_counter() - t)
            times += t_unf
            per_radius["none"] = {"p95_ms": round(1000 * float(np.percentile(t_unf, 95)), 2)}
            for r_km in RADII_KM:
                ts, recalls, sizes = [], [], []
                for c in cells:
                    t = time.perf_counter()
                    got = store.similar(conn, query, h3=int(c), k=10, radius_m=r_km * 1000.0, **qkw)
                    ts.append(time.perf_counter() - t)
                    truth = store.similar(conn, query, h3=int(c), k=10, radius_m=r_km * 1000.0, method="exact", **qkw)
                    sizes.append(len(truth))
                    if truth:
                        recalls.append(len({g["h3"] for g in got} & {x["h3"] for x in truth}) / len(truth))
                times += ts
                recall[str(r_km)] = round(float(np.mean(recalls)), 4) if recalls else float("nan")
                per_radius[str(r_km)] = {
                    "p50_ms": round(1000 * float(np.median(ts)), 2),
                    "p95_ms": round(1000 * float(np.percentile(ts, 95)), 2),
                    "mean_results": round(float(np.mean(sizes)), 1),
                }
                print(f"radius {r_km} km: {per_radius[str(r_km)]}, recall {recall[str(r_km)]}", file=sys.stderr)
            # evidence that the index path uses HNSW: the plan of a large-radius query
            ds = store.dataset(conn, mv)
            q = store.get_cell(conn, int(cells[0]), model_version=mv)
            assert q is not None
            with conn.transaction():
                conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
                plan = conn.execute(
                    sql.SQL(
                        "EXPLAIN SELECT h3 FROM {} WHERE embedding IS NOT NULL AND ST_Distance(geom::geography, "
                        "ST_SetSRID(ST_MakePoint(%s, %s), 4326)::geography) <= %s ORDER BY embedding <=> %s LIMIT 10"
                    ).format(ds.ident),
                    (q["lng"], q["lat"], 2_000_000.0, q["embedding"]),
                ).fetchall()
            out["index_path_plan_uses_hnsw"] = any("hnsw" in str(r[0]) for r in plan)
            out["query_p50_ms"] = round(1000 * float(np.median(times)), 2)
            out["query_p95_ms"] = round(1000 * float(np.percentile(times, 95)), 2)
            out["recall_at_10"] = recall
            out["per_radius"] = per_radius
            out["queries_per_radius"] = int(args.queries)
            out["settings"] = asdict(query)
            out["exact_scan_limit_rows"] = round(store.exact_scan_limit(conn, ds, 10, query.exact_scan_max_rows))
            out["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
            out["cpus"] = os.cpu_count()
    finally:
        if cluster is not None:
            cluster.stop(mode="immediate")
            shutil.rmtree(cluster.home, ignore_errors=True)
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
