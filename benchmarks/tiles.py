"""Tile archive build: cells per second and peak memory of :func:`vectorgeo.pyramid.build_pyramid`.

Builds ``cells.pmtiles`` from region embedding files (``--regions``, a glob, e.g. a run's
``results/embeddings/*.parquet``), or from synthetic files: every H3 cell at ``--resolution`` of the
res-0 regions ``--synthetic-regions`` (unit embeddings, one file per region) written first into a temporary
folder. Reports wall and CPU seconds, cells per second of each, and the process's peak RSS (the build runs
in this process, nothing else is held).

    .venv/bin/python benchmarks/tiles.py --regions '/path/to/results/embeddings/*.parquet'
    .venv/bin/python benchmarks/tiles.py --resolution 6 --synthetic-regions 20 --block-cells 50000

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def synthetic_files(folder: Path, res: int, regions: int, dim: int) -> list[str]:
    """One region file per res-0 cell (the first ``regions`` hexagons), every cell at ``res``, random unit vectors."""
    import h3

    from vectorgeo import geoparquet, h3cells

    rng = np.random.default_rng(0)
    out = []
    bases = [c for c in sorted(h3.get_res0_cells()) if not h3.is_pentagon(c)][:regions]
    for r in bases:
        cells = np.sort(np.array([h3.str_to_int(c) for c in h3.cell_to_children(r, res)], dtype=np.uint64))
        ll = np.array([h3.cell_to_latlng(h3cells.to_str(c)) for c in cells])
        emb = rng.normal(size=(cells.size, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        path = folder / f"{r}_{'0' * 12}.parquet"
        geoparquet.write_region(path, cells, ll[:, 0], ll[:, 1], emb, "ok", "benchmark-tiles", region=r)
        out.append(str(path))
    return out


def main() -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regions", help="glob of region embedding files (default: synthetic files)")
    ap.add_argument("--resolution", type=int, default=5, help="H3 resolution of the synthetic cells")
    ap.add_argument("--synthetic-regions", type=int, default=10, help="res-0 regions of synthetic cells")
    ap.add_argument("--dim", type=int, default=16, help="embedding dimension of the synthetic cells")
    ap.add_argument("--max-features", type=int, default=4000, help="serve.tile_max_features")
    ap.add_argument("--block-cells", type=int, help="pyramid.BLOCK_CELLS (cells whose hexagons are held at once)")
    args = ap.parse_args()

    from vectorgeo import pyramid

    tmp = Path(tempfile.mkdtemp(prefix="vectorgeo-bench-tiles-"))
    try:
        if args.regions:
            files = sorted(glob.glob(args.regions))
            if not files:
                raise SystemExit(f"no files match {args.regions!r}")
        else:
            files = synthetic_files(tmp, args.resolution, args.synthetic_regions, args.dim)
        rss_before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        kw = {} if args.block_cells is None else {"block_cells": args.block_cells}
        t0, c0 = time.perf_counter(), time.process_time()
        summary = pyramid.build_pyramid(files, tmp / "cells.pmtiles", args.max_features, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {
            "benchmark": "tiles",
            "files": len(files),
            "cells": summary["cells"],
            "resolution": summary["resolution"],
            "max_zoom": summary["max_zoom"],
            "tiles": summary["tiles"],
            "archive_mb": round(summary["bytes"] / 1e6, 1),
            "block_cells": args.block_cells or getattr(pyramid, "BLOCK_CELLS", None),
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "cells_per_s": round(summary["cells"] / wall),
            "cells_per_cpu_s": round(summary["cells"] / cpu),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_build_mb": round(rss_before_mb),
            "load_average_1min": round(os.getloadavg()[0], 2),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(main()))
