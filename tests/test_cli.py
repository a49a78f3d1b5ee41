"""The `vectorgeo` command as users type it: help, `db status`, `query`, and bad arguments."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import ROOT, LoadedRegion, free_port

from vectorgeo import db, store

QUERY = store.QuerySettings.from_config(db.settings())  # the default config's

VECTORGEO = Path(sys.executable).parent / "vectorgeo"


def vectorgeo(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the console script from ``cwd`` with no database settings but those in ``env``."""
    base = {k: v for k, v in os.environ.items() if k not in ("VECTORGEO_DATABASE_URL", "VECTORGEO_HOME")}
    return subprocess.run(
        [str(VECTORGEO), *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


def config_for(tmp_path: Path, **database: Any) -> Path:
    """A copy of the default config with the given ``database`` keys."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["database"] = {**(cfg.get("database") or {}), **database}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_help_lists_the_commands(tmp_path: Path) -> None:
    proc = vectorgeo("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("db", "query", "serve", "run-summary"):
        assert re.search(rf"^\s+{command}\s", proc.stdout, re.MULTILINE), proc.stdout
    sub = vectorgeo("query", "--help", cwd=tmp_path)
    assert sub.returncode == 0 and "--h3" in sub.stdout and "--radius-km" in sub.stdout


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    proc = vectorgeo(cwd=tmp_path)
    assert proc.returncode == 2 and "usage: vectorgeo" in proc.stderr
    no_traceback(proc)


# --- db status ---------------------------------------------------------------------------------------------
def test_db_status_of_a_cluster_never_started(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = vectorgeo("db", "status", cwd=tmp_path, env={"VECTORGEO_HOME": str(home)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("not initialised: ") and str(home / "pgdata") in proc.stdout
    no_traceback(proc)
    assert not home.exists()  # asking does not create anything


def test_db_status_of_a_running_cluster_lists_its_datasets(
    tmp_path: Path, pg_cluster: Any, loaded_region: LoadedRegion
) -> None:
    """The session cluster, named by VECTORGEO_HOME and a config file's port and database name."""
    dbname = urlsplit(loaded_region.url).path.lstrip("/")
    config = config_for(tmp_path, port=pg_cluster.port, dbname=dbname)
    proc = vectorgeo(
        "db", "status", "--config", str(config), cwd=tmp_path, env={"VECTORGEO_HOME": str(pg_cluster.home)}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("running: postgresql://") and f"/{dbname}?" in lines[0]
    n = len(loaded_region.h3)
    assert f"model_version 'small-1': {n} rows, 1 regions, dim 8, res 5, indexed True" in proc.stdout
    no_traceback(proc)


def test_db_status_of_an_external_database(tmp_path: Path, loaded_region: LoadedRegion) -> None:
    proc = vectorgeo("db", "status", cwd=tmp_path, env={"VECTORGEO_DATABASE_URL": loaded_region.url})
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": reachable"), proc.stdout + proc.stderr
    down = f"postgresql://postgres:secret@127.0.0.1:{free_port()}/nothing"
    proc = vectorgeo("db", "status", cwd=tmp_path, env={"VECTORGEO_DATABASE_URL": down})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("vectorgeo db: error: ") and "cannot connect" in proc.stderr
    assert "secret" not in proc.stderr  # the password is masked
    no_traceback(proc)


# --- query -------------------------------------------------------------------------------------------------
def test_query_json_is_store_similar(tmp_path: Path, loaded_region: LoadedRegion) -> None:
    s = loaded_region
    cell = int(s.h3[s.valid][40])
    env = {"VECTORGEO_DATABASE_URL": s.url}
    proc = vectorgeo("query", "--h3", f"{cell:015x}", "-k", "7", "--method", "exact", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    with store.connect(s.url) as conn:
        want = store.similar(conn, QUERY, h3=cell, k=7, method="exact")
    assert [r["h3"] for r in got] == [f"{r['h3']:015x}" for r in want]
    assert [r["similarity"] for r in got] == pytest.approx([r["similarity"] for r in want], abs=1e-9)
    assert [v for r in got for v in (r["lat"], r["lng"])] == pytest.approx(
        [v for r in want for v in (r["lat"], r["lng"])]
    )
    assert len(got) == 7 and f"{cell:015x}" not in {r["h3"] for r in got}


def test_query_point_table(tmp_path: Path, loaded_region: LoadedRegion) -> None:
    s = loaded_region
    i = int(s.valid.nonzero()[0][10])
    args = ("query", "--lat", str(s.lat[i]), "--lng", str(s.lng[i]), "-k", "3", "--radius-km", "40")
    proc = vectorgeo(*args, cwd=tmp_path, env={"VECTORGEO_DATABASE_URL": s.url})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["rank", "h3", "lat", "lng", "similarity"]
    with store.connect(s.url) as conn:
        want = store.similar_to_point(conn, QUERY, float(s.lat[i]), float(s.lng[i]), k=3, radius_m=40_000.0)
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [r[1] for r in rows] == [f"{w['h3']:015x}" for w in want]
    assert [float(r[4]) for r in rows] == pytest.approx([w["similarity"] for w in want], abs=1e-4)


def test_query_by_example_writes_geoparquet(tmp_path: Path, loaded_region: LoadedRegion) -> None:
    """``--positive``/``--negative`` score every embedding; ``--out`` writes the results (GeoParquet, CSV)."""
    import geopandas
    import numpy as np
    import pyarrow.parquet as pq

    s = loaded_region
    ok = np.flatnonzero(s.valid)
    pos, neg = [int(s.h3[ok[5]]), int(s.h3[ok[60]])], [int(s.h3[ok[200]])]
    emb = s.embedding[ok].astype(np.float64)
    row = {int(s.h3[i]): j for j, i in enumerate(ok)}
    q = emb[[row[c] for c in pos]].mean(0)
    q /= np.linalg.norm(q)
    m = emb[row[neg[0]]] / np.linalg.norm(emb[row[neg[0]]])
    q = q - 0.5 * m
    sim = emb @ (q / np.linalg.norm(q))
    sim[[row[c] for c in pos + neg]] = -np.inf
    want = [f"{int(s.h3[ok[j]]):015x}" for j in np.argsort(-sim, kind="stable")[:15]]

    env = {"VECTORGEO_DATABASE_URL": s.url}
    lat, lng = s.lat[ok[60]], s.lng[ok[60]]  # the second positive as a point
    args = ["query", "--positive", f"{pos[0]:015x}", "--positive", f"{lat},{lng}", "--negative", f"{neg[0]:015x}"]
    out = tmp_path / "results.parquet"
    proc = vectorgeo(*args, "-k", "15", "--out", str(out), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "15 results (percentile) written to" in proc.stdout
    t = pq.read_table(out)
    assert t.column("h3").to_pylist() == want and t.column("rank").to_pylist() == list(range(1, 16))
    assert (np.diff(t.column("score").to_numpy()) <= 0).all() and t.column("score").to_numpy()[0] > 99
    gdf = geopandas.read_parquet(out)  # a GeoParquet file that GeoPandas reads as it is
    assert gdf.crs.to_epsg() == 4326 and (gdf.geometry.geom_type == "Polygon").all()
    assert gdf.geometry.contains(geopandas.GeoSeries.from_xy(gdf["lng"], gdf["lat"], crs=4326)).all()

    csv = tmp_path / "results.csv"
    proc = vectorgeo(*args, "-k", "15", "--out", str(csv), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert [ln.split(",")[1].strip('"') for ln in csv.read_text().splitlines()[1:]] == want
    table = vectorgeo(*args, "-k", "3", "--mode", "classify", cwd=tmp_path, env=env)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split() == ["rank", "h3", "lat", "lng", "probability"]
    assert len(table.stdout.splitlines()) == 4


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("query", "--positive", "85390ca3fffffff", "--h3", "85390ca3fffffff"), "--positive"),
        (("query", "--positive", "85390ca3fffffff", "--out", "x.xlsx"), "--out"),
        (("query", "--positive", "0,-30"), "--positive"),  # Atlantic: not loaded
        (("query", "--positive", "91,0"), "--positive"),
        (("query", "--negative", "85390ca3fffffff"), "--positive"),  # no positive
        (("query", "--positive", "85390ca3fffffff", "--mode", "nearest"), "--mode"),
        (("query", "-k", "many", "--h3", "85390ca3fffffff"), "-k"),  # argparse: not an int
        (("query", "--h3", "85390ca3fffffff", "--method", "magic"), "--method"),  # argparse: not a choice
        (("query", "--h3", "not-a-cell"), "h3"),
        (("query", "--h3", "85390ca3fffffff", "-k", "0"), "k"),
        (("query", "--lat", "36.1"), "--lat"),  # --lng missing
        (("query",), "--h3"),  # neither a cell nor a point
        (("db", "frobnicate"), "action"),
    ],
)
def test_bad_argument_is_an_error_naming_it(
    tmp_path: Path, loaded_region: LoadedRegion, args: tuple[str, ...], named: str
) -> None:
    proc = vectorgeo(*args, cwd=tmp_path, env={"VECTORGEO_DATABASE_URL": loaded_region.url})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert named in proc.stderr and "error" in proc.stderr, proc.stderr
    no_traceback(proc)


def test_console_script_is_installed() -> None:
    assert VECTORGEO.is_file() and os.access(VECTORGEO, os.X_OK), f"{VECTORGEO}: run `make setup`"
    assert shutil.which("vectorgeo", path=str(VECTORGEO.parent)) == str(VECTORGEO)
