"""Embed batches: the partition of a stencil manifest, and batch folders expanded to region files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vectorgeo import regionfiles
from vectorgeo.errors import DataError

REGIONS = {
    "8001fffffffffff": {"digest": "a" * 12, "cells": 40},
    "8003fffffffffff": {"digest": "b" * 12, "cells": 70},
    "8005fffffffffff": {"digest": "c" * 12, "cells": 5},
    "8007fffffffffff": {"digest": "d" * 12, "cells": 200},
    "8009fffffffffff": {"digest": "e" * 12, "cells": 1},
}


def test_partition_closes_a_batch_at_batch_cells() -> None:
    batches = regionfiles.partition(REGIONS, 100)
    assert [[r for r, _ in b.regions] for b in batches.values()] == [
        ["8001fffffffffff", "8003fffffffffff"],  # 110 cells
        ["8005fffffffffff", "8007fffffffffff"],  # 205 cells
        ["8009fffffffffff"],  # the rest
    ]
    assert [b.cells for b in batches.values()] == [110, 205, 1]
    assert list(batches) == [b.name for b in batches.values()]
    for name, b in batches.items():
        m = regionfiles.BATCH_DIR.match(name)
        assert m is not None and m.group("region") == b.regions[0][0]
        assert m.group("digest") == regionfiles.batch_digest(b.regions)
    # one region per batch, and every region in one batch
    assert [len(b.regions) for b in regionfiles.partition(REGIONS, 1).values()] == [1] * 5
    assert [len(b.regions) for b in regionfiles.partition(REGIONS, 10**9).values()] == [5]
    assert regionfiles.partition({}, 100) == {}


def test_batch_name_changes_with_its_regions_cells_only() -> None:
    before = regionfiles.partition(REGIONS, 100)
    changed = {**REGIONS, "8005fffffffffff": {"digest": "f" * 12, "cells": 5}}
    after = regionfiles.partition(changed, 100)
    assert [n for n in after if n not in before] == [list(after)[1]]  # the batch of the changed region alone
    names_after, names_before = list(after), list(before)
    assert names_after[0] == names_before[0] and names_after[2] == names_before[2]
    # one region per batch: a region added or dropped adds or drops its batch, the others keep their names
    single = regionfiles.partition(REGIONS, 1)
    fewer = regionfiles.partition({r: v for r, v in REGIONS.items() if r != "8001fffffffffff"}, 1)
    assert set(single) - set(fewer) == {
        f"batch-8001fffffffffff-{regionfiles.batch_digest([('8001fffffffffff', 'a' * 12)])}"
    }
    assert set(fewer) < set(single)


def test_partition_refuses_bad_input() -> None:
    with pytest.raises(DataError, match=r"embed\.batch_cells"):
        regionfiles.partition(REGIONS, 0)
    with pytest.raises(DataError, match=r"8001fffffffffff.*'digest' and 'cells'"):
        regionfiles.partition({"8001fffffffffff": {"cells": 3}}, 10)


def _write_batch(root: Path, batch: regionfiles.Batch) -> Path:
    folder = root / batch.name
    folder.mkdir(parents=True)
    for f in batch.files():
        (folder / f).write_bytes(b"x")
    (folder / ".snakemake_timestamp").touch()
    return folder


def test_region_files_expands_batch_folders(tmp_path: Path) -> None:
    batches = regionfiles.partition(REGIONS, 100)
    folders = [_write_batch(tmp_path, b) for b in reversed(batches.values())]
    loose = tmp_path / f"800bfffffffffff_{'0' * 12}.parquet"
    loose.write_bytes(b"x")
    files = regionfiles.region_files([*folders, loose])
    assert [Path(f).name for f in files] == sorted(
        [f"{r}_{v['digest']}.parquet" for r, v in REGIONS.items()] + [loose.name]
    )
    assert all(Path(f).is_file() for f in files)


def test_region_files_refuses_a_folder_that_is_not_its_batch(tmp_path: Path) -> None:
    batch = next(iter(regionfiles.partition(REGIONS, 100).values()))
    folder = _write_batch(tmp_path, batch)
    (folder / batch.files()[0]).unlink()  # a region file deleted by hand
    with pytest.raises(DataError, match=f"{batch.name}.*not the ones its name's digest covers"):
        regionfiles.region_files([folder])
    (folder / batch.files()[0]).write_bytes(b"x")
    (folder / f"800bfffffffffff_{'0' * 12}.parquet").write_bytes(b"x")  # one added
    with pytest.raises(DataError, match="delete the folder and rerun"):
        regionfiles.region_files([folder])
    with pytest.raises(DataError, match=re.escape("batch-{region}-{digest}")):
        regionfiles.region_files([tmp_path])
    with pytest.raises(DataError, match="region file or an embed batch folder"):
        regionfiles.region_files([tmp_path / "notes.txt"])


def test_region_files_refuses_a_region_twice(tmp_path: Path) -> None:
    batch = next(iter(regionfiles.partition(REGIONS, 100).values()))
    folder = _write_batch(tmp_path, batch)
    other = tmp_path / batch.files()[0]
    other.write_bytes(b"x")
    with pytest.raises(DataError, match="one file per region"):
        regionfiles.region_files([folder, other])
