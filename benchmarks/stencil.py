"""Benchmark: the global land-cell stencil at a resolution (GLOBE land mask).

Prints one JSON object on its last line: resolution, cells_scanned,
land_cells, land_fraction (of all cells at the resolution), seconds
(stencil computation including writing every region parquet), peak_rss_mb,
and sphere_land_fraction: an independent estimate from random points uniform
on the sphere looked up in the same mask.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile

import h3
import numpy as np

from vectorgeo.config import load_config
from vectorgeo.layers import Layer, land_mask_spec, layer_source_files
from vectorgeo.rasters import prepare_layer
from vectorgeo.sampling import uniform_points
from vectorgeo.stencil import write_stencil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--resolution", type=int, default=7)
    ap.add_argument("--region-resolution", type=int, default=1)
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--cache", default=".vectorgeo/bench-layers")
    ap.add_argument("--points", type=int, default=2_000_000, help="random points for the independent estimate")
    args = ap.parse_args()
    cfg = load_config(args.config)
    spec = land_mask_spec(cfg)
    os.makedirs(args.cache, exist_ok=True)
    npy = os.path.join(args.cache, "land_mask.npy")
    if not os.path.exists(npy):
        prepare_layer(spec, layer_source_files(spec)[0], npy, os.path.join(args.cache, "land_mask.grid.json"))
    mask = Layer.open(spec, npy)
    with tempfile.TemporaryDirectory() as d:
        r = write_stencil(mask, os.path.join(d, "regions"), args.resolution, args.region_resolution)
    total = h3.get_num_cells(args.resolution)
    lat, lng = uniform_points(np.random.default_rng(0), args.points)
    sphere = float(mask.values_at(lat, lng).mean())
    print(
        json.dumps(
            {
                "resolution": args.resolution,
                "cells_scanned": r["cells_scanned"],
                "land_cells": r["land_cells"],
                "regions": len(r["regions"]),
                "land_fraction": round(r["land_cells"] / total, 5),
                "sphere_land_fraction": round(sphere, 5),
                "seconds": round(r["seconds"], 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
