"""vectorgeo.atomic: a file appears under its final name only complete, and a failed write leaves nothing."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vectorgeo.atomic import (
    OTHER_HOST_STALE_S,
    _host,
    atomic_dir,
    atomic_path,
    clean_stale,
    scratch_dir,
    stale_temp_files,
    write_json_atomic,
    write_text_atomic,
)


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


# --- writers killed outright -----------------------------------------------------------------------------------
def _writer(final: Path, then: str) -> subprocess.Popen[str]:
    """A process that opens a temp file for ``final``, writes half of it, prints "ready" and then ``then``s."""
    code = f"""
import os, signal, sys, time
from vectorgeo.atomic import atomic_path
with atomic_path({str(final)!r}) as tmp:
    tmp.write_bytes(b"half of it")
    print("ready", flush=True)
    if {then!r} == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, text=True, stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    final = tmp_path / "out.parquet"
    proc = _writer(final, "die")
    assert proc.wait(timeout=30) == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.parquet.") and not final.exists()  # nothing under the name
    assert [p.name for p in stale_temp_files(final)] == left
    write_text_atomic(final, "complete\n")  # the rerun
    assert os.listdir(tmp_path) == ["out.parquet"] and final.read_text() == "complete\n"


def test_a_running_writers_temp_file_is_left_alone(tmp_path: Path) -> None:
    final = tmp_path / "out.json"
    proc = _writer(final, "sleep")
    try:
        assert stale_temp_files(final) == []
        write_json_atomic(final, {"v": 1})
        assert len(os.listdir(tmp_path)) == 2  # ours in place, theirs still being written
        assert clean_stale(final) == []
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert len(clean_stale(final)) == 1 and os.listdir(tmp_path) == ["out.json"]


def test_other_hosts_temp_files_are_removed_only_when_old(tmp_path: Path) -> None:
    final = tmp_path / "m.npy"
    theirs = tmp_path / ".m.npy.node17-4242.abcd1234.tmp"
    theirs.write_bytes(b"...")
    unrelated = tmp_path / ".m.npy.x.node17-4242.abcd1234.tmp"  # a temp file of "m.npy.x", not of "m.npy"
    unrelated.write_bytes(b"...")
    assert stale_temp_files(final) == []
    old = time.time() - OTHER_HOST_STALE_S - 60
    os.utime(theirs, (old, old))
    os.utime(unrelated, (old, old))
    assert stale_temp_files(final) == [theirs]
    write_text_atomic(final, "x")
    assert sorted(os.listdir(tmp_path)) == [unrelated.name, "m.npy"]


def test_scratch_dir_is_removed_and_a_killed_writers_is_cleaned(tmp_path: Path) -> None:
    final = tmp_path / "shard.npz"
    with scratch_dir(final) as d:
        assert d.is_dir() and d.parent == tmp_path
        (d / "piece.npy").write_bytes(b"x")
    assert os.listdir(tmp_path) == []
    dead = tmp_path / f".shard.npz.{_host()}-{_dead_pid()}.zz99.d"
    dead.mkdir()
    (dead / "piece.npy").write_bytes(b"x")
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"zip")
    assert os.listdir(tmp_path) == ["shard.npz"]


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "out" / "batch"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.parquet").write_bytes(b"a")
        raise RuntimeError("half-way")
    assert not final.exists() and not list(final.parent.iterdir())  # no final folder, no temp folder

    final.mkdir()  # an empty folder made by the workflow engine before the job
    with atomic_dir(final) as tmp:
        (tmp / "a.parquet").write_bytes(b"a")
        assert not (final / "a.parquet").exists()  # not visible under the final name yet
        (tmp / "b.parquet").write_bytes(b"b")
    assert sorted(p.name for p in final.iterdir()) == ["a.parquet", "b.parquet"]
    assert [p.name for p in final.parent.iterdir()] == ["batch"]

    with atomic_dir(final) as tmp:  # a previous output is replaced as a whole
        (tmp / "c.parquet").write_bytes(b"c")
    assert [p.name for p in final.iterdir()] == ["c.parquet"]
    assert [p.name for p in final.parent.iterdir()] == ["batch"]
