"""vectorgeo.atomic: a file appears under its final name only complete, and a failed write leaves nothing."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from vectorgeo.atomic import atomic_path, write_json_atomic, write_text_atomic


class Boom(Exception):
    pass


def test_success_renames_the_temp_file_into_place(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "dir" / "out.bin"  # missing folders are created
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        tmp.write_bytes(b"half")
        assert not final.exists()  # nothing under the final name while the writer runs
        with open(tmp, "ab") as f:
            f.write(b" and the rest")
        assert not final.exists()
    assert final.read_bytes() == b"half and the rest"
    assert os.listdir(final.parent) == ["out.bin"]  # the temp file was renamed, not copied


def test_suffix_is_kept_for_writers_that_choose_the_format_by_it(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "a.tif", suffix=".tif") as tmp:
        assert tmp.name.endswith(".tif")
        tmp.write_bytes(b"x")
    assert (tmp_path / "a.tif").read_bytes() == b"x"


def test_writer_error_leaves_no_temp_file_and_no_final_file(tmp_path: Path) -> None:
    final = tmp_path / "out.json"
    with pytest.raises(Boom), atomic_path(final) as tmp:
        tmp.write_text('{"partial": ')
        raise Boom
    assert not final.exists()
    assert os.listdir(tmp_path) == []


def test_writer_error_keeps_the_previous_complete_file(tmp_path: Path) -> None:
    final = tmp_path / "out.txt"
    write_text_atomic(final, "version 1\n")
    with pytest.raises(Boom), atomic_path(final) as tmp:
        tmp.write_text("version 2, cut sh")
        raise Boom
    assert final.read_text() == "version 1\n"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_interrupt_is_cleaned_up_and_propagates(tmp_path: Path) -> None:
    """BaseException too (Ctrl-C, SystemExit): the temp file goes, the exception is not swallowed."""
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "x") as tmp:
        tmp.write_bytes(b"...")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_write_json_atomic_round_trip(tmp_path: Path) -> None:
    obj = {"rows": 254, "regions": ["81383ffffffffff", "8139bffffffffff"], "ratio": 0.25, "none": None, "ü": "ö"}
    path = tmp_path / "marker.json"
    write_json_atomic(path, obj)
    assert json.loads(path.read_text()) == obj
    assert path.read_text().startswith('{\n  "rows"')  # default indent=2
    write_json_atomic(path, obj, indent=None, sort_keys=True)
    assert path.read_text() == json.dumps(obj, sort_keys=True)
    assert os.listdir(tmp_path) == ["marker.json"]


def test_write_json_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"bad": math.nan}, allow_nan=False)  # fails half way through json.dump
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["m.json"]


def test_write_text_atomic_is_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    write_text_atomic(path, "Köppen–Geiger ±\n")
    assert path.read_bytes() == "Köppen–Geiger ±\n".encode()
