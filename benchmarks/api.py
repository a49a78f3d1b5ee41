"""Bounded load on the API: N concurrent clients for T seconds per endpoint on loopback, and the time to
score every cell for a search by example.

By default the benchmark is self-contained: it starts a throw-away PostgreSQL cluster under /tmp, loads a
synthetic dataset through the real writer and loader (every H3 cell of a box over Europe, unit
embeddings that vary smoothly with position), indexes it, starts ``vectorgeo serve`` on a free
127.0.0.1 port in its own process, and drives it with asyncio + httpx clients, each sending one request
at a time. With ``--database-url`` it uses an already loaded database instead. Endpoints:

- ``search``: ``POST /search``, the old Lambda's body (a random loaded cell's centre, a radius, a limit);
- ``query``: ``POST /query``, search by example over every loaded cell (two random positives, one
  negative, k, no area: the whole score map is computed each time, nothing cached), ``similar`` and
  ``classify`` alternating;
- ``scores``: ``GET /scores/{id}/{z}/{x}/{y}.pbf``, random tiles of a few score maps at zooms 0..max over
  the loaded bounds.

Scoring time (in process, no HTTP): :func:`vectorgeo.search.run` (matrix–vector product, percentiles or
logistic fit, top k) over the loaded embeddings as read by :func:`vectorgeo.store.vectors.load_vectors`,
and over a synthetic ``--synthetic-cells`` × ``--dim`` matrix (default 4M × 64), median of
``--repeats`` runs per mode.

Prints one JSON object on its last line: per endpoint requests, errors (non-200 answers and transport
errors), p50_ms, p95_ms, rps, the CPU milliseconds per request of the server, the database's processes
(for a unix-socket URL) and the clients, and the cores that a 50 ms mean would need at that CPU cost; the
scoring times; plus the set-up.

    .venv/bin/python benchmarks/api.py                      # 20 clients, 20 s per endpoint
    .venv/bin/python benchmarks/api.py --clients 5 --seconds 5 --synthetic-cells 1000000
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

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


Request = Callable[[httpx.AsyncClient, np.random.Generator], Awaitable[bool]]


def search_request(centres: np.ndarray, args: argparse.Namespace) -> Request:
    """POST /search with a random loaded cell's centre."""

    async def send(http: httpx.AsyncClient, rng: np.random.Generator) -> bool:
        lat, lon = centres[rng.integers(len(centres))]
        body = {
            "lat": float(lat),
            "lon": float(lon),
            "circleRadiusMeters": args.radius_km * 1000.0,
            "limit": args.limit,
        }
        r = await http.post("/search", json=body)
        return r.status_code == 200 and len(r.json()["locations"]) > 0

    return send


def query_request(centres: np.ndarray, args: argparse.Namespace) -> Request:
    """POST /query with two random positives and a negative, similar and classify alternating."""
    n = [0]

    async def send(http: httpx.AsyncClient, rng: np.random.Generator) -> bool:
        pts = centres[rng.integers(len(centres), size=3)]
        n[0] += 1
        body = {
            "positives": [{"lat": float(a), "lng": float(b)} for a, b in pts[:2]],
            "negatives": [{"lat": float(pts[2, 0]), "lng": float(pts[2, 1])}],
            "mode": "similar" if n[0] % 2 else "classify",
            "k": args.limit,
        }
        r = await http.post("/query", json=body)
        return r.status_code == 200 and len(r.json()["results"]) > 0

    return send


def tile_request(maps: list[str], bounds: list[float], maxzoom: int) -> Request:
    """GET a random score tile of one of ``maps`` over the loaded bounds."""
    w, s, e, n = bounds

    async def send(http: httpx.AsyncClient, rng: np.random.Generator) -> bool:
        z = int(rng.integers(0, maxzoom + 1))
        lat, lng = rng.uniform(s, n), rng.uniform(w, e)
        x, y = tile_xy(lat, lng, z)
        r = await http.get(f"/scores/{maps[rng.integers(len(maps))]}/{z}/{x}/{y}.pbf")
        return r.status_code == 200

    return send


def tile_xy(lat: float, lng: float, z: int) -> tuple[int, int]:
    n = 2**z
    x = min(n - 1, int((lng + 180) / 360 * n))
    y = min(n - 1, int((1 - np.log(np.tan(np.radians(lat)) + 1 / np.cos(np.radians(lat))) / np.pi) / 2 * n))
    return x, y


_json_dumps = json.dumps


class RawResponse:
    """What the request functions read of an answer (the part of httpx.Response they use)."""

    def __init__(self, status_code: int, content: bytes) -> None:
        self.status_code = status_code
        self.content = content

    def json(self) -> Any:
        return json.loads(self.content)


class RawHTTP:
    """A keep-alive HTTP/1.1 connection on asyncio streams with httpx's ``get``/``post(json=)`` calls.

    The clients share the cores with the server and the database, so their own cost counts: httpx spends
    about 1.5 ms of CPU per request here, this about a tenth of that (``--client httpx`` to compare). It
    reads exactly what the server sends (status line, headers, a Content-Length body) and raises
    :class:`httpx.TransportError` on a broken connection, so that it is counted as an error.
    """

    def __init__(self, base: str) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(base)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> RawHTTP:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()

    async def _request(self, method: str, path: str, body: bytes | None) -> RawResponse:
        assert self._reader is not None and self._writer is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + (body or b""))
        try:
            raw = await self._reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            raise httpx.TransportError(f"connection closed: {e}") from None
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = next((int(x.split(":", 1)[1]) for x in lines[1:] if x.lower().startswith("content-length:")), None)
        if length is None:
            raise httpx.TransportError(f"answer without Content-Length (status {status})")
        return RawResponse(status, await self._reader.readexactly(length))

    async def get(self, path: str) -> RawResponse:
        return await self._request("GET", path, None)

    async def post(self, path: str, json: Any) -> RawResponse:
        # ``json``: httpx's keyword; the module is _json_dumps here
        return await self._request("POST", path, _json_dumps(json).encode())


async def client(
    base: str, send: Request, seed: int, stop: float, latencies: list[float], errors: list[str], kind: str
) -> None:
    rng = np.random.default_rng(seed)
    connection = RawHTTP(base) if kind == "raw" else httpx.AsyncClient(base_url=base, timeout=60.0)
    async with connection as http:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                if not await send(http, rng):
                    errors.append("bad answer")
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t0)


async def drive(
    base: str, send: Request, clients: int, seconds: float, kind: str = "raw"
) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    stop = t0 + seconds
    await asyncio.gather(*(client(base, send, i, stop, latencies, errors, kind) for i in range(clients)))
    return latencies, errors, time.perf_counter() - t0


class CpuMeter:
    """CPU seconds (user + system) used by the server process, the database server's processes and this
    process (the clients), between :meth:`start` and :meth:`stop`.

    The database's processes are the postmaster named by the lock file of a unix-socket URL
    (``<socket dir>/.s.PGSQL.<port>.lock``) and its children; for other URLs they are not counted.
    """

    def __init__(self, server_pid: int, url: str) -> None:
        self.server_pid = server_pid
        self.postmaster = postmaster_pid(url)
        self._start: dict[str, float] = {}

    def _times(self) -> dict[str, float]:
        import psutil

        def cpu(p: psutil.Process) -> float:
            try:
                t = p.cpu_times()
                return float(t.user + t.system)
            except psutil.Error:
                return 0.0

        out = {"server": 0.0, "database": 0.0, "client": time.process_time()}
        try:
            server = psutil.Process(self.server_pid)
            out["server"] = cpu(server) + sum(cpu(c) for c in server.children(recursive=True))
        except psutil.Error:
            pass
        if self.postmaster is not None:
            try:
                pm = psutil.Process(self.postmaster)
                # per process, so that a backend that exits meanwhile does not count negative
                out.update({f"pg{c.pid}": cpu(c) for c in [pm, *pm.children()]})
            except psutil.Error:
                pass
        return out

    def start(self) -> None:
        self._start = self._times()

    def stop(self, requests: int) -> dict[str, Any]:
        end = self._times()
        used = {k: end[k] - self._start.get(k, 0.0) for k in ("server", "client")}
        used["database"] = sum(v - self._start.get(k, 0.0) for k, v in end.items() if k.startswith("pg"))
        if self.postmaster is None:
            used.pop("database")
        per = {k: round(1000 * v / max(requests, 1), 3) for k, v in used.items()}
        per["total"] = round(sum(per.values()), 3)
        return {"cpu_ms_per_request": per, "cpu_s": {k: round(v, 2) for k, v in used.items()}}


def postmaster_pid(url: str) -> int | None:
    """PID of the PostgreSQL server of a unix-socket URL (``?host=/dir&port=N``), from its socket's lock file."""
    from urllib.parse import parse_qs, urlsplit

    query = parse_qs(urlsplit(url).query)
    host, port = query.get("host", [""])[0], query.get("port", ["5432"])[0]
    lock = Path(host) / f".s.PGSQL.{port}.lock"
    if not host.startswith("/") or not lock.is_file():
        return None
    return int(lock.read_text().split()[0])


def load(base: str, send: Request, args: argparse.Namespace, meter: CpuMeter) -> dict[str, Any]:
    """Warm up for a second, then N clients for T seconds: the latency figures, the CPU each request took
    (server, database, clients) and what that CPU means for the p95 goal with this many clients.

    N clients that each wait for their answer get at most X answers per second, so their mean latency is at
    least N / X (Little's law); a mean of 50 ms at N = 20 needs X = 400 requests/s, that is 400 × the CPU
    seconds of one request of cores, clients included (``cores_for_50ms_mean``).
    """
    asyncio.run(drive(base, send, args.clients, 1.0, args.client))
    load0 = os.getloadavg()[0]
    meter.start()
    latencies, errors, wall = asyncio.run(drive(base, send, args.clients, args.seconds, args.client))
    cpu = meter.stop(len(latencies))
    lat_ms = np.array(latencies) * 1000.0
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "p50_ms": round(float(np.percentile(lat_ms, 50)), 2) if len(lat_ms) else None,
        "p95_ms": round(float(np.percentile(lat_ms, 95)), 2) if len(lat_ms) else None,
        "rps": round(len(latencies) / wall, 1),
        **cpu,
        "cores_used": round(sum(cpu["cpu_s"].values()) / wall, 2),
        "cores_for_50ms_mean": round(args.clients / 0.050 * cpu["cpu_ms_per_request"]["total"] / 1000, 2),
        "load_average_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "first_errors": errors[:3],
    }


def scoring_times(vectors: Any, repeats: int) -> dict[str, Any]:
    """Median seconds of a search by example over every cell (similar and classify), no cache."""
    from vectorgeo import search

    rng = np.random.default_rng(1)
    out: dict[str, Any] = {"cells": vectors.n, "dim": vectors.dim}
    for mode in ("similar", "classify"):
        times = []
        for _ in range(repeats):
            rows = rng.integers(vectors.n, size=3)
            q = search.Query([int(vectors.h3[rows[0]]), int(vectors.h3[rows[1]])], [int(vectors.h3[rows[2]])], mode, 50)
            t0 = time.perf_counter()
            search.run(vectors, q)
            times.append(time.perf_counter() - t0)
        out[f"{mode}_s"] = round(float(np.median(times)), 4)
    return out


def synthetic_vectors(n: int, dim: int) -> Any:
    """``n`` random unit vectors of dimension ``dim`` on made-up sorted cells (scoring needs no geometry)."""
    from vectorgeo.store.vectors import CellVectors

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    h3_ = np.arange(n, dtype=np.uint64) * np.uint64(1 << 20) + np.uint64(0x8600000000000000)
    lat = rng.uniform(-60, 80, n)
    lng = rng.uniform(-180, 180, n)
    return CellVectors("synthetic", 6, "synthetic", h3_, lat, lng, emb, np.zeros(0, dtype=np.uint64))


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
    ap.add_argument(
        "--endpoints", nargs="+", default=["search", "query", "scores"], choices=["search", "query", "scores"]
    )
    ap.add_argument("--synthetic-cells", type=int, default=4_000_000, help="cells of the synthetic scoring matrix")
    ap.add_argument("--repeats", type=int, default=5, help="scoring runs per mode (the median is reported)")
    ap.add_argument("--server-workers", type=int, default=2, help="vectorgeo serve --workers (serve.workers)")
    ap.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="the clients' HTTP: raw (keep-alive asyncio streams, ~0.15 ms of CPU a request) or httpx (~1.5 ms)",
    )
    args = ap.parse_args()

    from vectorgeo import db, store, tiles
    from vectorgeo.api import ServeSettings, serve_settings
    from vectorgeo.config import load_config
    from vectorgeo.store.vectors import load_vectors

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
            [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.server_workers)],
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
        # the server reads the embeddings into memory in the background after start-up (POST /search and
        # /query use them): measure once they are there
        # (every worker process: 20 answers in a row, each on a new connection, say so)
        t3 = time.perf_counter()
        in_a_row = 0
        while in_a_row < 20:
            ready = httpx.get(f"{base}/healthz", timeout=30).json().get("embeddings_in_memory", 0) > 0
            in_a_row = in_a_row + 1 if ready else 0
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not read the embeddings into memory")
            time.sleep(0.05 if ready else 0.5)
        embeddings_read_s = time.perf_counter() - t3
        endpoints: dict[str, Any] = {}
        meter = CpuMeter(server.pid, url)
        if "search" in args.endpoints:
            endpoints["search"] = load(base, search_request(centres, args), args, meter)
        if "query" in args.endpoints:
            endpoints["query"] = load(base, query_request(centres, args), args, meter)
        if "scores" in args.endpoints:
            maps = []
            for i in range(4):
                pts = centres[np.random.default_rng(i).integers(len(centres), size=2)]
                body = {"positives": [{"lat": float(a), "lng": float(b)} for a, b in pts], "k": 1}
                answer = httpx.post(f"{base}/query", json=body, timeout=120).json()
                maps.append(answer["score_id"])
            meta = httpx.get(f"{base}/meta", timeout=60).json()
            endpoints["scores"] = load(base, tile_request(maps, meta["bounds"], answer["tile_maxzoom"]), args, meter)

        t2 = time.perf_counter()
        with store.connect(url) as conn:
            loaded = load_vectors(conn)
        read_s = time.perf_counter() - t2
        scoring = {"loaded": {**scoring_times(loaded, args.repeats), "read_from_database_s": round(read_s, 2)}}
        del loaded
        if args.synthetic_cells:
            scoring["synthetic"] = scoring_times(synthetic_vectors(args.synthetic_cells, args.dim), args.repeats)
        result = {
            "benchmark": "api",
            "endpoints": endpoints,
            "scoring": scoring,
            "clients": args.clients,
            "seconds": args.seconds,
            "limit": args.limit,
            "radius_km": args.radius_km,
            "cells": n,
            "dim": ds.dim,
            "resolution": ds.resolution,
            "server": f"vectorgeo serve (uvicorn, {args.server_workers} worker processes)",
            "client": args.client,
            "embeddings_in_memory_after_s": round(embeddings_read_s, 1),
            "cpus": os.cpu_count(),
            "setup_s": round(setup_s, 1),
            "tiles_build_s": round(tiles_build_s, 2),
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
