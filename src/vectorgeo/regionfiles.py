"""Region embedding files and the embed batches that hold them.

Stage 3 writes one GeoParquet file per region, ``{region}_{digest}.parquet`` (the digest is the
stencil digest of the region's cells, :func:`vectorgeo.stencil.digest_cells`). One embed job handles a
*batch* of regions, so that Python and torch start once per batch and not once per region: regions are
taken in id order and a batch is closed once it holds at least ``batch_cells`` cells
(:func:`partition`). A batch's files live in its own folder,

    <results>/embeddings/batches/batch-{first region}-{digest}/{region}_{digest}.parquet

where the batch digest covers the (region, digest) pairs of its members: a batch whose regions' cells
change gets a new name (and reruns); one whose regions stay as they were keeps its name (and its files),
also when other batches come or go.
This module is light on purpose (standard library only): the jobs that read region files (load, tiles,
rollup, evaluate) do not import torch through it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vectorgeo.errors import DataError

REGION_FILE = re.compile(r"^(?P<region>[0-9a-f]{15})_(?P<digest>[0-9a-f]{12})\.parquet$")
"""Name of a region embedding file: ``{region}_{digest}.parquet``."""

BATCH_DIR = re.compile(r"^batch-(?P<region>[0-9a-f]{15})-(?P<digest>[0-9a-f]{12})$")
"""Name of an embed batch folder: ``batch-{first region}-{digest}``."""

BATCH_WILDCARD = r"batch-[0-9a-f]{15}-[0-9a-f]{12}"
"""The batch folder name as a regular expression without groups (a Snakemake wildcard constraint)."""

BATCHES_FOLDER = "batches"
"""The folder under ``<results>/embeddings`` that holds the batch folders."""


@dataclass(frozen=True)
class Batch:
    """One embed job's regions, in id order."""

    name: str
    regions: tuple[tuple[str, str], ...]  # (region hex, stencil digest)
    cells: int

    def files(self) -> list[str]:
        """The batch's region file names (without folder)."""
        return [f"{r}_{d}.parquet" for r, d in self.regions]


def batch_digest(regions: Sequence[tuple[str, str]]) -> str:
    """12 hex digits of sha256 over the batch's ``region_digest`` pairs, in region order (whatever the order
    given)."""
    text = "\n".join(sorted(f"{r}_{d}" for r, d in regions))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def names_batch(name: str, regions: Sequence[tuple[str, str]]) -> bool:
    """Whether ``name`` is a batch folder name whose digest covers exactly these (region, digest) pairs."""
    m = BATCH_DIR.match(name)
    return m is not None and bool(regions) and batch_digest(regions) == m.group("digest")


def partition(regions: Mapping[str, Mapping[str, Any]], batch_cells: int) -> dict[str, Batch]:
    """Split a stencil manifest's regions into embed batches of at least ``batch_cells`` cells.

    Regions are taken in id order; a batch is closed as soon as it holds ``batch_cells`` cells or more
    (the last batch may hold fewer). ``batch_cells: 1`` gives one region per batch.

    Args:
        regions: ``manifest["regions"]``: region hex → ``{"digest": ..., "cells": ...}``.
        batch_cells: Cells per batch, at least 1.

    Returns:
        Batch name → :class:`Batch`, in order.

    Raises:
        DataError: a region entry lacks ``digest`` or ``cells``.
    """
    if batch_cells < 1:
        raise DataError("embed.batch_cells", f"expected at least 1 cell per batch, got {batch_cells!r}")
    out: dict[str, Batch] = {}
    members: list[tuple[str, str]] = []
    cells = 0

    def close() -> None:
        nonlocal members, cells
        name = f"batch-{members[0][0]}-{batch_digest(members)}"
        out[name] = Batch(name, tuple(members), cells)
        members, cells = [], 0

    for region in sorted(regions):
        entry = regions[region]
        try:
            digest, n = str(entry["digest"]), int(entry["cells"])
        except (KeyError, TypeError, ValueError):
            raise DataError(
                "stencil manifest", f"region {region}: expected 'digest' and 'cells', got {entry!r}"
            ) from None
        members.append((region, digest))
        cells += n
        if cells >= batch_cells:
            close()
    if members:
        close()
    return out


def region_files(paths: Iterable[str | Path]) -> list[str]:
    """Region files named by ``paths``: batch folders are expanded to the region files they hold.

    Args:
        paths: Region files and/or batch folders.

    Returns:
        The region files, sorted by name (region id), as strings.

    Raises:
        DataError: a path is neither a region file nor a batch folder; a batch folder does not hold exactly
            the region files its name's digest covers (a file deleted or added by hand); two files name the
            same region.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            if BATCH_DIR.match(p.name) is None:
                raise DataError(str(p), "expected an embed batch folder named batch-{region}-{digest}")
            matches = [(f, REGION_FILE.match(f.name)) for f in sorted(p.iterdir()) if f.is_file()]
            found = [(f, m) for f, m in matches if m is not None]
            if not names_batch(p.name, [(m["region"], m["digest"]) for _, m in found]):
                raise DataError(
                    str(p),
                    f"the embed batch folder holds {len(found)} region files that are not the ones its name's "
                    "digest covers (a file deleted or added by hand?); delete the folder and rerun to rebuild it",
                )
            files.extend(f for f, _ in found)
        elif REGION_FILE.match(p.name):
            files.append(p)
        else:
            raise DataError(str(p), "expected a {region}_{digest}.parquet region file or an embed batch folder")
    seen: dict[str, Path] = {}
    for f in files:
        m = REGION_FILE.match(f.name)
        assert m is not None
        region = m.group("region")
        if region in seen:
            raise DataError(str(f), f"region {region} is also in {seen[region]}: one file per region expected")
        seen[region] = f
    return [str(f) for f in sorted(files, key=lambda f: f.name)]
