"""Atomic file output: write a temp file in the destination's folder, then rename it into place.

A crash never leaves a half-written file under its final name, and a failed write removes its temp file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, on error it is removed.

    Args:
        path: The final file name (its folder is created).
        suffix: Suffix of the temp file (some writers choose the format by it, e.g. ``.tif``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
