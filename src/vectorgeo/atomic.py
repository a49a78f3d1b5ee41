"""Atomic file output: write a temp file in the destination's folder, then rename it into place.

A crash never leaves a half-written file under its final name, and a failed write removes its temp file.

A process killed outright (SIGKILL, out of memory, a node lost) cannot remove its temp file. Temp names
therefore carry the writer's host and process id (``.<name>.<host>-<pid>.<random><suffix>``), and every
new write of ``<name>`` first removes the temp files of ``<name>`` whose writer on this host is no longer
running (:func:`clean_stale`): the rerun that replaces a killed job's output also removes what it left.
A temp file of a writer on another host (a cluster node sharing the folder) is removed only once it has
not changed for :data:`OTHER_HOST_STALE_S` seconds: its process id means nothing here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OTHER_HOST_STALE_S = 2 * 24 * 3600.0
"""Age (seconds since the last change) after which a temp file of a writer on another host counts as left."""


def _host() -> str:
    """This host's name with every character other than ``[A-Za-z0-9_]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _prefix(path: Path) -> str:
    """The start of every temp name of ``path`` written by this process."""
    return f".{path.name}.{_host()}-{os.getpid()}."


def _alive(pid: int) -> bool:
    """True when a process with this id runs on this host (or may: one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_files(path: str | Path) -> list[Path]:
    """Temp files and folders of ``path`` (see the module docstring) whose writer on this host has exited."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{path.name}.") + r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)\.")
    host, me = _host(), os.getpid()
    stale = []
    for entry in os.scandir(path.parent):
        m = pattern.match(entry.name)
        if m is None:
            continue
        if m["host"] != host:
            try:
                if time.time() - entry.stat(follow_symlinks=False).st_mtime > OTHER_HOST_STALE_S:
                    stale.append(Path(entry.path))
            except FileNotFoundError:
                pass
            continue
        pid = int(m["pid"])
        if pid != me and not _alive(pid):
            stale.append(Path(entry.path))
    return stale


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the temp files and folders that killed writers of ``path`` on this host left; return them."""
    removed = []
    for p in stale_temp_files(path):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:  # another rerun removed it first
            continue
        removed.append(p)
    return removed


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, on error it is removed.

    Temp files of ``path`` left by killed writers are removed first (:func:`clean_stale`).

    Args:
        path: The final file name (its folder is created).
        suffix: Suffix of the temp file (some writers choose the format by it, e.g. ``.tif``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temp_dir(path: str | Path) -> Path:
    """A new temp folder beside ``path`` (its folder created, stale temp files of ``path`` removed first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".d"))


@contextmanager
def scratch_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path`` for the pieces of its output; it is removed on exit.

    Like :func:`atomic_path`'s temp files, a folder left by a killed writer is removed by the next write.
    Put the finished output in place with :func:`atomic_path`, not by hand.
    """
    tmp = _temp_dir(path)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it is renamed to ``path``, on error it is removed.

    A folder already at ``path`` (an empty one made by the workflow engine, or a previous output) is
    moved aside and removed once the new one is in place: a reader never sees a half-written folder under
    the final name. Folders left by killed writers are removed first (:func:`clean_stale`).
    """
    path = Path(path)
    tmp = _temp_dir(path)
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".old"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any, **dump_kwargs: Any) -> None:
    """Write JSON atomically (keyword arguments go to :func:`json.dump`, default ``indent=2``)."""
    dump_kwargs.setdefault("indent", 2)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, **dump_kwargs)


def write_parquet_atomic(path: str | Path, table: Any, **write_kwargs: Any) -> None:
    """Write a pyarrow table as Parquet atomically (zstd unless ``compression`` is given).

    Keyword arguments go to :func:`pyarrow.parquet.write_table`.
    """
    import pyarrow.parquet as pq

    write_kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **write_kwargs)
