"""A workflow run's cost per stage, from Snakemake's benchmark files, and a projection to the res-7 world.

Reads ``benchmarks/<rule>/*.tsv`` of a finished run (its working directory), the stencil manifest and the
loaded index summary, and reports per rule: jobs, job-seconds (the sum of the jobs' wall clock), the
longest job, peak RSS (the largest job's ``max_rss``) and, for per-cell rules, cells per job-second. The
projection scales each per-cell rule's job-seconds to 28,067,759 res-7 land cells at the measured
throughput and spreads them over ``--cores`` parallel job slots per node (one node here, and 16); the
rules that do not grow with the cells (sampling, training, evaluation) keep their measured time, and the
HNSW build grows as N log N. GPU throughput is not measured (no GPU here): the figures are CPU-only.

Usage: .venv/bin/python benchmarks/world.py RUN_DIR [--cores 2]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

RES7_LAND_CELLS = 28_067_759
# embed_region / load_region: one job per region (runs before embed batches and the batched load_regions worker)
PER_CELL = (
    "stencil",
    "cut_windows",
    "embed_region",
    "embed_batch",
    "rollup",
    "build_tiles",
    "load_region",
    "load_regions",
)
STAGES = {
    "data": ("prepare_layer", "mosaic_layer", "prepare_eval_label"),
    "stencil": ("stencil",),
    "sample": ("sample_triplets",),
    "train": ("train_model",),
    "embed": ("cut_windows", "embed_region", "embed_batch", "rollup"),
    "load": ("load_region", "load_regions"),
    "index": ("build_index",),
    "tiles": ("build_tiles",),
    "evaluate": ("evaluate",),
}


def rule_costs(run: Path) -> dict[str, dict[str, float]]:
    """rule -> jobs, job_s, max_job_s, peak_rss_mb from the run's benchmark files."""
    out: dict[str, dict[str, float]] = {}
    for folder in sorted((run / "benchmarks").iterdir()):
        rows = []
        for f in folder.glob("*.tsv"):
            with open(f) as fh:
                rows += list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            secs = [float(r["s"]) for r in rows]
            rss = [float(r["max_rss"]) for r in rows if r["max_rss"] not in ("", "NA", "-")]
            out[folder.name] = {
                "jobs": len(rows),
                "job_s": round(sum(secs), 1),
                "max_job_s": round(max(secs), 1),
                "peak_rss_mb": round(max(rss), 1) if rss else float("nan"),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="the run's working directory")
    ap.add_argument("--cores", type=int, default=2, help="parallel job slots per node")
    args = ap.parse_args()
    run: Path = args.run
    manifest = json.loads((run / "results" / "stencil" / "manifest.json").read_text())
    cells = sum(v["cells"] for v in manifest["regions"].values())
    costs = rule_costs(run)
    for rule in PER_CELL:
        if rule in costs:
            costs[rule]["cells_per_job_s"] = round(cells / max(costs[rule]["job_s"], 1e-9), 1)
    scale = RES7_LAND_CELLS / cells
    stages: dict[str, Any] = {}
    for stage, rules in STAGES.items():
        present = [costs[r] for r in rules if r in costs]
        if not present:
            continue
        job_s = sum(c["job_s"] for c in present)
        if stage == "index":
            res7 = job_s * scale * math.log(RES7_LAND_CELLS) / math.log(cells)
            parallel = False
        elif any(r in PER_CELL for r in rules):
            res7 = job_s * scale
            parallel = True
        else:
            res7 = job_s
            parallel = stage in ("data", "sample")
        stages[stage] = {
            "job_s": round(job_s, 1),
            "peak_rss_mb": max(c["peak_rss_mb"] for c in present),
            "res7_job_h": round(res7 / 3600, 2),
            "res7_one_node_h": round(res7 / (args.cores if parallel else 1) / 3600, 2),
            "res7_16_nodes_h": round(res7 / ((16 * args.cores) if parallel else 1) / 3600, 2),
        }
    done = run / "done.txt"
    wall = None
    if done.exists():
        wall = int(done.read_text().split("wall_s=")[1].split()[0])
    result = {
        "cells": cells,
        "regions": len(manifest["regions"]),
        "resolution": manifest["resolution"],
        "wall_s": wall,
        "rules": costs,
        "stages": stages,
        "res7_one_node_h": round(sum(s["res7_one_node_h"] for s in stages.values()), 2),
        "res7_16_nodes_h": round(sum(s["res7_16_nodes_h"] for s in stages.values()), 2),
        "cores": args.cores,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
