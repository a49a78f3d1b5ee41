"""Loader faults (vectorgeo.store.load) against a real PostgreSQL: two loaders racing on one region, and a
loader killed at random points (and once during its COPY). After each, the region holds exactly the stencil's
cells, each once, all from one file (never a mix), and a rerun converges.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h3
import numpy as np
import psycopg
import pytest

from vectorgeo import geoparquet, store

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parents[1]
REGION = "82391ffffffffff"  # res 2: southern Spain, the Strait of Gibraltar, northern Morocco
VERSION = "faults-1"


def region_versions(folder: Path, res: int, dim: int, n: int = 2) -> tuple[np.ndarray, list[Path], list[np.ndarray]]:
    """``n`` files of every res-``res`` cell of :data:`REGION` (the stencil), each with its own embeddings."""
    cells = np.array(sorted(h3.str_to_int(c) for c in h3.cell_to_children(REGION, res)), dtype=np.uint64)
    latlng = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in cells])
    paths, embs = [], []
    for v in range(n):
        emb = np.random.default_rng(v).normal(size=(cells.size, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        path = folder / f"v{v}" / f"{REGION}_{v:012x}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        geoparquet.write_region(path, cells, latlng[:, 0], latlng[:, 1], emb, "ok", VERSION, region=REGION)
        paths.append(path)
        embs.append(emb)
    return cells, paths, embs


def loaded_version(url: str, cells: np.ndarray, paths: list[Path], embs: list[np.ndarray]) -> int:
    """Which file the region's rows come from, after checking they are the stencil, each once, from one file,
    and recorded in the catalog with that file's checksum."""
    with store.connect(url) as conn:
        ds = store.dataset(conn, VERSION)
        rows = conn.execute(f'SELECT h3, embedding FROM "{ds.table}" ORDER BY h3').fetchall()
        regions = conn.execute(
            "SELECT rows, checksum FROM vectorgeo_regions WHERE model_version = %s", (VERSION,)
        ).fetchall()
    h3s = np.array([r[0] for r in rows], dtype=np.uint64)
    assert h3s.size == cells.size and np.array_equal(h3s, cells), f"{h3s.size} rows for {cells.size} stencil cells"
    emb = np.stack([np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows])
    matches = [v for v, e in enumerate(embs) if np.allclose(emb, e, atol=1e-6)]
    assert len(matches) == 1, "the rows are a mix of files"
    v = matches[0]
    sha = hashlib.sha256(paths[v].read_bytes()).hexdigest()
    assert regions == [(cells.size, sha)], f"catalog {regions} does not record file {v}"
    return v


def test_two_loaders_race_on_one_region(pg_database, tmp_path: Path) -> None:
    """Two loaders start together on one region (the first time on an empty database, so both also create the
    catalog and the table): both succeed, one after the other; the rows are the stencil's, each once, all from
    one of the two files."""
    url = pg_database("race")
    cells, paths, embs = region_versions(tmp_path, res=6, dim=16)
    winners = []
    for _ in range(4):
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def load(v: int, barrier: threading.Barrier = barrier, errors: list = errors) -> None:
            try:
                with store.connect(url) as conn:
                    barrier.wait(timeout=60)
                    store.load_region(conn, paths[v])
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=load, args=(v,)) for v in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        winners.append(loaded_version(url, cells, paths, embs))
    assert set(winners) <= {0, 1}


LOADER = """
import sys
from vectorgeo import store
url, path, marker = sys.argv[1:4]
with store.connect(url) as conn:
    print("go", flush=True)
    m = store.load_region(conn, path)
store.write_marker(marker, m)
print("done", flush=True)
"""


def start_loader(url: str, path: Path, marker: Path) -> subprocess.Popen[str]:
    """A loader process, once it is connected (it has printed "go")."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", LOADER, url, str(path), str(marker)], env=env, text=True, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
    return proc


def killed(proc: subprocess.Popen[str]) -> bool:
    """SIGKILL the loader; True when it had not finished (it was killed, not already done)."""
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode == -signal.SIGKILL and "done" not in out


def check_marker(marker: Path, path: Path) -> None:
    """A marker is absent, or complete and of ``path`` (never half-written)."""
    if marker.exists():
        assert json.loads(marker.read_text())["checksum"] == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_loader_killed_at_random_points_converges(pg_database, tmp_path: Path) -> None:
    """A loader is SIGKILLed at 10 random points of its run (and once while its COPY streams): the region then
    holds the previous file or the new one, complete; a rerun loads the new one, complete."""
    url = pg_database("kill")
    cells, paths, embs = region_versions(tmp_path, res=7, dim=32)
    markers = tmp_path / "loaded"
    markers.mkdir()
    with store.connect(url) as conn:
        store.load_region(conn, paths[0])
    # how long a whole load takes, from connected to exit
    t0 = time.monotonic()
    proc = start_loader(url, paths[1], markers / "full.json")
    assert proc.wait(timeout=120) == 0
    span = time.monotonic() - t0
    current = loaded_version(url, cells, paths, embs)
    assert current == 1
    rng = np.random.default_rng(16)
    outcomes: list[tuple[str, str]] = []
    # random points in the first 80 % of a load's span; a loader that finished before its kill point is
    # recorded too, and attempts go on until 10 loaders were really killed (at most 40 attempts)
    for i in range(40):
        if sum(k == "killed" for k, _ in outcomes) == 10:
            break
        target = 1 - current
        marker = markers / f"kill{i}.json"
        proc = start_loader(url, paths[target], marker)
        time.sleep(float(rng.uniform(0, 0.8 * span)))
        was_killed = killed(proc)
        after = loaded_version(url, cells, paths, embs)  # complete, one file: the old or the new
        outcomes.append(("killed" if was_killed else "finished", "new" if after == target else "old"))
        if was_killed and marker.exists():
            pytest.fail("a killed loader wrote its marker")
        check_marker(marker, paths[target])
        with store.connect(url) as conn:  # the rerun
            store.load_region(conn, paths[target])
        assert loaded_version(url, cells, paths, embs) == target, outcomes
        current = target
    assert sum(k == "killed" for k, _ in outcomes) == 10, outcomes
    # once more, killed for certain while the COPY streams rows in
    target = 1 - current
    for _attempt in range(5):
        proc = start_loader(url, paths[target], markers / "copy.json")
        if wait_for_copy(url, proc):
            assert killed(proc)
            assert loaded_version(url, cells, paths, embs) == current  # rolled back whole
            break
        proc.communicate(timeout=60)
        current, target = target, current
    else:
        pytest.fail("the loader's COPY was never seen running")
    with store.connect(url) as conn:
        store.load_region(conn, paths[target])
    assert loaded_version(url, cells, paths, embs) == target


def wait_for_copy(url: str, proc: subprocess.Popen[str]) -> bool:
    """Until a backend runs a COPY into the dataset table (True), or the loader ends first (False)."""
    with psycopg.connect(url, autocommit=True) as conn:
        while proc.poll() is None:
            n = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'COPY %%'"
            ).fetchone()[0]
            if n:
                return True
    return False
