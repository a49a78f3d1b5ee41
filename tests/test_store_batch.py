"""The load worker (vectorgeo.store.batch) against a real PostgreSQL: unchanged regions skipped, changed ones
replaced, regions no file names removed, every cell once."""

from __future__ import annotations

from pathlib import Path

import h3
import pytest
from test_store import MV, N_R3, R_CHUKOTKA, R_US, distinct_count, write

from vectorgeo import store
from vectorgeo.errors import DatabaseError, DataError

pytestmark = pytest.mark.db

R_AFRICA = h3.latlng_to_cell(5.0, 20.0, 0)  # a hexagon, like the other two


def region_file(folder: Path, region: str, **kw) -> Path:
    folder.mkdir(exist_ok=True)
    return write(folder, region, **kw)


def test_worker_skips_unchanged_reloads_changed_removes_stale(pg_database, tmp_path: Path) -> None:
    url = pg_database("batch")
    a, b, c = (region_file(tmp_path / name, r) for name, r in (("a", R_US), ("b", R_CHUKOTKA), ("c", R_AFRICA)))
    first = store.load_regions(url, [a, b, c], threads=2)
    assert (first["loaded"], first["unchanged"], first["removed"]) == (3, 0, [])
    assert first["rows"] == 3 * N_R3 and first["model_version"] == MV
    assert {r: v["loaded"] for r, v in first["regions"].items()} == dict.fromkeys((R_US, R_CHUKOTKA, R_AFRICA), True)
    with store.connect(url) as conn:
        assert distinct_count(conn) == (3 * N_R3, 3 * N_R3)
        store.check_loaded(conn, first)

    # nothing changed: nothing loaded
    again = store.load_regions(url, [a, b, c], threads=2)
    assert (again["loaded"], again["unchanged"]) == (0, 3)

    # one region's file has other content; another region is gone from the run
    b2 = region_file(tmp_path / "b2", R_CHUKOTKA, seed=5)
    third = store.load_regions(url, [a, b2], threads=1)
    assert [r for r, v in third["regions"].items() if v["loaded"]] == [R_CHUKOTKA]
    assert third["removed"] == [R_AFRICA] and third["rows"] == 2 * N_R3
    with store.connect(url) as conn:
        assert distinct_count(conn) == (2 * N_R3, 2 * N_R3)
        assert store.count(conn, R_AFRICA) == 0
        store.check_loaded(conn, third)
        # another loader replaced a region since: the record no longer matches the database
        store.load_region(conn, b)
        with pytest.raises(DatabaseError, match=R_CHUKOTKA):
            store.check_loaded(conn, third)


def test_worker_refuses_ambiguous_inputs(pg_database, tmp_path: Path) -> None:
    url = pg_database("batch_bad")
    a = region_file(tmp_path / "a", R_US)
    with pytest.raises(DataError, match=f"region {R_US} is also in"):
        store.load_regions(url, [a, region_file(tmp_path / "a2", R_US, seed=1)])
    with pytest.raises(DataError, match="several model versions"):
        store.load_regions(url, [a, region_file(tmp_path / "b", R_CHUKOTKA, mv="model-b")])
    with pytest.raises(DataError, match="no region files"):
        store.load_regions(url, [])
    with store.connect(url) as conn:
        assert store.datasets(conn) == []  # nothing was written
