"""20 concurrent API clients for 60 s while one region is reloaded over and over (vectorgeo.api + store.load).

Marked ``soak``: it runs for a minute, so `make test` deselects it; run it with ``pytest -m soak -s``. It prints
one JSON line with what it measured. Asserted: no 5xx, and every answer comes entirely from the rows of one of
the two files the region alternates between (a cell's embedding, a similarity ranking and its query cell),
never a mix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import h3
import httpx
import numpy as np
import pytest
from conftest import free_port
from test_faults_load import region_versions

from vectorgeo import db, store

pytestmark = [pytest.mark.db, pytest.mark.soak]

CLIENTS = 20
SECONDS = float(os.environ.get("VECTORGEO_SOAK_SECONDS", "60"))
K = 10
BBOX = "-12,30,2,44"  # the whole region: a spatial filter, so that rankings are exact scans
SERVER = """
import sys
import uvicorn
from vectorgeo.api import ServeSettings, create_app, serve_settings
from vectorgeo.store import QuerySettings
url, port = sys.argv[1], int(sys.argv[2])
query = QuerySettings(ef_search=100, max_scan_tuples=50000, exact_scan_max_rows=10**9, local_rings=10)
app = create_app(url, serve=ServeSettings.from_config(serve_settings()), query=query, meta_ttl_s=2.0)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def top_k(emb: np.ndarray, cells: np.ndarray, i: int) -> tuple[list[str], np.ndarray]:
    sim = emb @ emb[i]
    sim[i] = -np.inf
    order = np.argsort(-sim, kind="stable")[:K]
    return [f"{int(c):015x}" for c in cells[order]], sim[order]


class Tally:
    """What the clients saw, behind a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: Counter[int] = Counter()
        self.kinds: Counter[str] = Counter()
        self.versions: Counter[int] = Counter()
        self.mixed: list[str] = []
        self.errors: list[str] = []
        self.latency: list[float] = []

    def add(self, kind: str, status: int, seconds: float, version: int | None, problem: str | None) -> None:
        with self.lock:
            self.status[status] += 1
            self.kinds[kind] += 1
            self.latency.append(seconds)
            if version is not None:
                self.versions[version] += 1
            if problem is not None:
                self.mixed.append(problem)


def matches(answer: list[str], sims: list[float], expected: list[tuple[list[str], np.ndarray]]) -> int | None:
    """The version whose exact ranking the answer is, or None (a mix, or wrong)."""
    for v, (cells, want) in enumerate(expected):
        if answer == cells and np.allclose(sims, want, atol=1e-4):
            return v
    return None


def test_reload_under_load_serves_old_or_new_never_a_mix(pg_database, tmp_path: Path) -> None:
    url = pg_database("soak")
    cells, paths, embs = region_versions(tmp_path, res=6, dim=16)
    with store.connect(url) as conn:
        store.load_region(conn, paths[0])
        store.build_indexes(conn, store.IndexSettings.from_config(db.settings()))
    rng = np.random.default_rng(20)
    queries = rng.choice(cells.size, 60, replace=False)
    rankings = {int(i): [top_k(e, cells, int(i)) for e in embs] for i in queries}
    centres = {int(i): h3.cell_to_latlng(h3.int_to_str(int(cells[i]))) for i in queries}

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    server = subprocess.Popen([sys.executable, "-c", SERVER, url, str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        tally = Tally()
        stop = threading.Event()
        reloads = Counter()

        def client(seed: int) -> None:
            r = np.random.default_rng(seed)
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    ask(c, r, tally)

        def ask(c: httpx.Client, r: np.random.Generator, tally: Tally) -> None:
            i = int(r.choice(queries))
            cell = f"{int(cells[i]):015x}"
            kind = ["cell", "similar", "search", "tile", "health"][int(r.choice(5, p=[0.3, 0.3, 0.2, 0.1, 0.1]))]
            t0 = time.monotonic()
            try:
                if kind == "cell":
                    resp = c.get(f"/cells/{cell}")
                elif kind == "similar":
                    resp = c.get("/similar", params={"h3": cell, "k": K, "bbox": BBOX})
                elif kind == "search":
                    lat, lng = centres[i]
                    body = {"lat": lat, "lon": lng, "h3": cell, "circleRadiusMeters": 5e6, "limit": K}
                    resp = c.post("/search", json=body)
                elif kind == "tile":
                    resp = c.get("/tiles/5/15/12.pbf")
                else:
                    resp = c.get("/healthz")
            except httpx.HTTPError as e:
                with tally.lock:
                    tally.errors.append(f"{kind} {cell}: {type(e).__name__}: {e}")
                return
            seconds = time.monotonic() - t0
            version, problem = None, None
            if resp.status_code == 200 and kind == "cell":
                emb = np.array(resp.json()["embedding"], dtype=np.float32)
                hit = [v for v, e in enumerate(embs) if np.allclose(emb, e[i], atol=1e-6)]
                version = hit[0] if len(hit) == 1 else None
                problem = None if version is not None else f"cell {cell}: embedding of neither file"
            elif resp.status_code == 200 and kind in ("similar", "search"):
                body = resp.json()
                if kind == "similar":
                    got = [x["h3"] for x in body["results"]], [x["similarity"] for x in body["results"]]
                else:
                    got = [x["h3"] for x in body["locations"]], body["scores"]
                version = matches(got[0], got[1], rankings[i])
                problem = None if version is not None else f"{kind} {cell}: ranking of neither file: {got[0]}"
            elif resp.status_code >= 500:
                problem = f"{kind} {cell}: {resp.status_code} {resp.text[:300]}"
            tally.add(kind, resp.status_code, seconds, version, problem)

        def reloader() -> None:
            v = 1
            with store.connect(url) as conn:
                while not stop.is_set():
                    store.load_region(conn, paths[v])
                    reloads[v] += 1
                    v = 1 - v
                    time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(CLIENTS)]
        threads.append(threading.Thread(target=reloader))
        t0 = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)

    lat = np.array(tally.latency)
    five_xx = sum(n for s, n in tally.status.items() if s >= 500)
    print(
        json.dumps(
            {
                "clients": CLIENTS,
                "seconds": round(elapsed, 1),
                "requests": int(lat.size),
                "requests_per_s": round(lat.size / elapsed, 1),
                "status": {str(k): v for k, v in sorted(tally.status.items())},
                "kinds": dict(tally.kinds),
                "answers_by_file": {f"v{k}": v for k, v in sorted(tally.versions.items())},
                "reloads": sum(reloads.values()),
                "mixed_or_wrong": len(tally.mixed),
                "transport_errors": len(tally.errors),
                "latency_ms": {
                    q: round(float(np.percentile(lat, p)) * 1000, 1)
                    for q, p in (("p50", 50), ("p99", 99), ("max", 100))
                },
            }
        )
    )
    assert not tally.errors, tally.errors[:5]
    assert five_xx == 0 and not tally.mixed, tally.mixed[:5]
    assert set(tally.status) <= {200}, tally.status
    assert sum(reloads.values()) >= 2 and len(tally.versions) == 2, (reloads, tally.versions)  # it did reload
