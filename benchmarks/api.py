"""Bounded load on the search API: N concurrent clients for T seconds against POST /search on loopback.

By default the benchmark is self-contained: it starts a throw-away PostgreSQL cluster under /tmp, loads a
synthetic dataset through the real writer and loader (every H3 cell of a box over Europe, unit
embeddings that vary smoothly with position), indexes it, starts ``vectorgeo serve`` on a free
127.0.0.1 port in its own process, and drives it with asyncio + httpx clients, each sending one request
at a time (the old Lambda's body: a random loaded cell's centre, a radius, a limit). With
``--database-url`` it uses an already loaded database instead.

Prints one JSON object on its last line: requests, errors (non-200 answers and transport errors), p50_ms,
p95_ms, rps, plus the set-up.

    .venv/bin/python benchmarks/api.py                      # 20 clients, 20 s
    .venv/bin/python benchmarks/api.py --clients 5 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h3
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def synthetic_regions(folder: Path, bbox: tuple[float, float, float, float], res: int, dim: int) -> list[Path]:
    """Region files (one per resolution-0 cell) of every cell in ``bbox``, via the GeoParquet writer."""
    from vectorgeo import geoparquet, h3cells

    w, s, e, n = bbox
    cells = np.array(
        sorted(h3.str_to_int(c) for c in h3.polygon_to_cells(h3.LatLngPoly([(s, w), (s, e), (n, e), (n, w)]), res)),
        dtype=np.uint64,
    )
    ll = np.array([h3.cell_to_latlng(h3cells.to_str(c)) for c in cells])
    rng = np.random.default_rng(0)
    freq = rng.normal(size=(dim, 2)) * 0.3
    phase = rng.uniform(0, 2 * np.pi, dim)
    emb = np.sin(ll[:, :1] * freq[:, 0] + ll[:, 1:] * freq[:, 1] + phase) + 0.2 * rng.normal(size=(cells.size, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    regions = h3cells.parents(cells, 0)
    paths = []
    for r in np.unique(regions):
        m = regions == r
        p = folder / f"{h3cells.to_str(r)}_{'0' * 12}.parquet"
        geoparquet.write_region(p, cells[m], ll[m, 0], ll[m, 1], emb[m], "ok", "benchmark-v1", region=h3cells.to_str(r))
        paths.append(p)
    return paths


async def client(
    base: str,
    centres: np.ndarray,
    args: argparse.Namespace,
    seed: int,
    stop: float,
    latencies: list[float],
    errors: list[str],
) -> None:
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(base_url=base, timeout=30.0) as http:
        while time.perf_counter() < stop:
            lat, lon = centres[rng.integers(len(centres))]
            body = {
                "lat": float(lat),
                "lon": float(lon),
                "circleRadiusMeters": args.radius_km * 1000.0,
                "limit": args.limit,
            }
            t0 = time.perf_counter()
            try:
                r = await http.post("/search", json=body)
                ok = r.status_code == 200 and len(r.json()["locations"]) > 0
                if not ok:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t0)


async def drive(base: str, centres: np.ndarray, args: argparse.Namespace) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    stop = t0 + args.seconds
    await asyncio.gather(*(client(base, centres, args, i, stop, latencies, errors) for i in range(args.clients)))
    return latencies, errors, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--limit", type=int, default=50, help="results per request (the old Lambda's 'limit')")
    ap.add_argument("--radius-km", type=float, default=300.0)
    ap.add_argument("--resolution", type=int, default=5, help="H3 resolution of the synthetic cells")
    ap.add_argument("--dim", type=int, default=64, help="embedding dimension of the synthetic cells")
    ap.add_argument("--bbox", type=float, nargs=4, default=[-10.0, 36.0, 30.0, 60.0], metavar=("W", "S", "E", "N"))
    ap.add_argument("--database-url", help="use this loaded database instead of a synthetic one")
    args = ap.parse_args()

    from vectorgeo import db, store, tiles
    from vectorgeo.api import ServeSettings, serve_settings
    from vectorgeo.config import load_config

    config = load_config(ROOT / "config" / "config.yaml")

    tmp = Path(tempfile.mkdtemp(prefix="vectorgeo-bench-api-"))
    cluster = None
    server = None
    try:
        t0 = time.perf_counter()
        if args.database_url:
            url = args.database_url
        else:
            cluster = db.Cluster(home=tmp / "pg", port=free_port())
            url = cluster.start()
            (tmp / "regions").mkdir()
            with store.connect(url) as conn:
                for p in synthetic_regions(tmp / "regions", tuple(args.bbox), args.resolution, args.dim):
                    store.load_region(conn, p)
                store.build_indexes(conn, store.IndexSettings.from_config(db.settings(config)))
        with store.connect(url) as conn:
            ds = store.dataset(conn)
            n = store.count(conn)
            rows = conn.execute(
                f'SELECT ST_Y(geom), ST_X(geom) FROM "{ds.table}" WHERE embedding IS NOT NULL '
                "ORDER BY random() LIMIT 5000"
            ).fetchall()
        centres = np.array(rows, dtype=np.float64)
        setup_s = time.perf_counter() - t0
        # the tiles (PCA colours, rollups, hexagons) are built once per model version; time that here
        t1 = time.perf_counter()
        with store.connect(url) as conn:
            tiles.ensure(conn, max_features=ServeSettings.from_config(serve_settings(config)).tile_max_features)
        tiles_build_s = time.perf_counter() - t1

        port = free_port()
        env = {**os.environ, "VECTORGEO_DATABASE_URL": url}
        exe = Path(sys.executable).with_name("vectorgeo")
        server = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start: {server.stderr.read() if server.stderr else ''}")
            time.sleep(0.2)
        # warm-up: the first requests open the pool's connections
        asyncio.run(drive(base, centres, argparse.Namespace(**{**vars(args), "seconds": 1.0})))

        latencies, errors, wall = asyncio.run(drive(base, centres, args))
        lat_ms = np.array(latencies) * 1000.0
        result = {
            "benchmark": "api_search",
            "requests": len(latencies),
            "errors": len(errors),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 2) if len(lat_ms) else None,
            "p95_ms": round(float(np.percentile(lat_ms, 95)), 2) if len(lat_ms) else None,
            "rps": round(len(latencies) / wall, 1),
            "clients": args.clients,
            "seconds": round(wall, 2),
            "limit": args.limit,
            "radius_km": args.radius_km,
            "cells": n,
            "dim": ds.dim,
            "resolution": ds.resolution,
            "server": "vectorgeo serve (uvicorn, 1 process)",
            "cpus": os.cpu_count(),
            "setup_s": round(setup_s, 1),
            "tiles_build_s": round(tiles_build_s, 2),
            "first_errors": errors[:3],
        }
        print(json.dumps(result))
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        if cluster is not None:
            cluster.stop(mode="immediate")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
