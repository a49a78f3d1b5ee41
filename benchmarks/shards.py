"""Training memory: peak RSS of the training data path with n shards and with 4n shards.

Writes synthetic shards (the layers and patch size of ``--config``) of ``--per-shard`` triplets each,
then, in a fresh process per case, reads them as training does (:class:`vectorgeo.batches.TrainingData`:
the validation shard in memory, the training shards validated from their headers and streamed) and runs
one epoch of batches through the data path (shuffle, role stacking; no model, whose memory does not
depend on the shards). Peak RSS comes from ``getrusage`` of the child.

* ``peak_rss_mb``: shards -> peak RSS in MB; ``ratio_4x`` = RSS at 4n / RSS at n (1.0: independent of
  the number of shards).
* ``data_mb``: shards -> bytes of all their triplets in memory (what reading them whole would hold).

Usage: .venv/bin/python benchmarks/shards.py [--shards 4] [--per-shard 20000] [--shards-in-memory 2]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CHILD = """
import json, sys, time
import numpy as np
from vectorgeo.config import TrainConfig
from vectorgeo.batches import TrainingData
from synthetic_shards import fixture_specs
paths, px, group = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = TrainConfig(shards_in_memory=group, val_shards=1)
t0 = time.perf_counter()
data = TrainingData.read(paths, fixture_specs(), px, 10.0, cfg)
n = 0
for batch in data.batches(np.random.default_rng(0), 256):
    n += len(next(iter(batch.values()))) // 3
print(json.dumps({"triplets": n, "streamed": data.cache is None, "seconds": time.perf_counter() - t0}))
"""


def run_case(paths: list[str], px: int, group: int) -> dict[str, float]:
    """Peak RSS (MB) and the child's report for one set of shards."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(paths), str(px), str(group)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"},
    )
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # ru_maxrss of children is the largest child so far: run the small case first
    return {"peak_rss_mb": max(peak, before) / 1024, **report}


def main() -> None:
    from synthetic_shards import fixture_specs, make_shard

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=20000)
    ap.add_argument("--patch-px", type=int, default=16)
    ap.add_argument("--shards-in-memory", type=int, default=2)
    args = ap.parse_args()
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="vectorgeo-shards-") as tmp:
        t0 = time.perf_counter()
        specs = fixture_specs()
        arrays = make_shard(specs, args.per_shard, args.patch_px, seed=0)
        data_bytes = sum(a.nbytes for k, a in arrays.items() if k != "meta")
        paths = []
        for i in range(4 * args.shards):
            arrays["meta"] = np.array(json.dumps({**json.loads(str(arrays["meta"][()])), "shard": i}))
            p = Path(tmp) / f"shard-{i}.npz"
            np.savez_compressed(p, **arrays)
            paths.append(str(p))
        write_s = time.perf_counter() - t0
        for n in (args.shards, 4 * args.shards):
            out[str(n)] = run_case(paths[:n], args.patch_px, args.shards_in_memory)
    small, large = out[str(args.shards)], out[str(4 * args.shards)]
    result = {
        "per_shard": args.per_shard,
        "patch_px": args.patch_px,
        "shards_in_memory": args.shards_in_memory,
        "peak_rss_mb": {k: round(v["peak_rss_mb"], 1) for k, v in out.items()},
        "data_mb": {k: round(int(k) * data_bytes / 1e6, 1) for k in out},
        "streamed": {k: v["streamed"] for k, v in out.items()},
        "triplets_per_epoch": {k: v["triplets"] for k, v in out.items()},
        "ratio_4x": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "write_s": round(write_s, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
