"""Benchmark stage 3: end-to-end embedding throughput against the bare model.

* ``cells_per_s``: stencil rows read from the region parquet files → patches → model →
  GeoParquet region file written (:func:`vectorgeo.embed.embed_region`), wall clock.
* ``model_only_cells_per_s``: the same model, batch size and device on the same cells'
  encoded inputs already in memory (on the device), forward pass only.
* ``ratio`` = cells_per_s / model_only_cells_per_s (goal ≥ 0.7); ``cpu_time_ratio``, the same
  from process CPU time, is the figure to trust when other processes load the machine.
* ``--processes N`` runs N copies side by side (as the workflow runs N one-thread
  ``embed_batch`` jobs on N cores) and reports each one's figures and their mean
  ``cells_per_s``: the steady state of one job at that concurrency.
* ``--pin`` runs the process on ``--threads`` CPUs only (its gather thread included), the
  CPU share of a ``threads: N`` job when the workflow keeps every core busy; with
  ``--processes`` each copy gets CPUs of its own.
* glibc malloc keeps freed memory (:func:`vectorgeo.jobprocess.keep_freed_memory`), as in the
  workflow's ``embed_batch`` jobs; ``--malloc-defaults`` measures glibc's defaults.
* ``projected_res7_world_hours``: 28,067,759 land cells at H3 res 7 (measured by
  benchmarks/stencil.py) / cells_per_s / 3600.

Uses results/model/model.pt when it exists, else a randomly initialised model of the
config's architecture (same cost). Layers and stencil come from results/ (run the
workflow up to the stencil first).

    .venv/bin/python benchmarks/embed.py [--cells 40000] [--batch-size N] [--device auto|cpu|cuda]
        [--threads 1] [--pin] [--processes 2] [--malloc-defaults]

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vectorgeo import embed as vg_embed
from vectorgeo import jobprocess
from vectorgeo import model as vg_model
from vectorgeo.config import load_config, parse
from vectorgeo.layers import layer_specs, open_layers

RES7_LAND_CELLS = 28_067_759


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--cells", type=int, default=40000, help="cells to embed (whole regions, largest first)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: embed.batch_size of the config")
    ap.add_argument("--device", default=None, help="default: embed.device of the config")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timed runs of each")
    ap.add_argument("--processes", type=int, default=1, help="copies of this benchmark run side by side")
    ap.add_argument("--pin", action="store_true", help="run on --threads CPUs only (CPU affinity)")
    ap.add_argument("--first-cpu", type=int, default=0, help="with --pin: index of the first CPU to use")
    ap.add_argument("--malloc-defaults", action="store_true", help="leave glibc malloc at its defaults")
    args = ap.parse_args()
    if args.processes > 1:
        side_by_side(args.processes, args.threads if args.pin else 0)
        return
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin:
        if args.first_cpu + args.threads > len(cpus):
            raise SystemExit(f"--pin: CPUs {args.first_cpu}..{args.first_cpu + args.threads - 1} of {len(cpus)}")
        cpus = cpus[args.first_cpu : args.first_cpu + args.threads]
        os.sched_setaffinity(0, cpus)
    malloc_tuned = False if args.malloc_defaults else jobprocess.keep_freed_memory()

    cfg = load_config(args.config)
    typed = parse(cfg)
    params = typed.embed
    batch_size = args.batch_size or params.batch_size
    device = vg_embed.device_name(args.device or params.device)
    torch.set_num_threads(args.threads)
    results = Path(cfg["results"])
    specs = layer_specs(cfg)
    layers = open_layers(specs, {n: results / "layers" / f"{n}.npy" for n in specs})

    model_path = results / "model" / "model.pt"
    if model_path.exists():
        module, meta = vg_model.load(model_path, device)
        model_src = str(model_path)
    else:
        torch.manual_seed(0)
        module = vg_model.build_model(specs, typed.model)
        meta = vg_model.make_metadata(specs, typed.sample.patch_px, typed.sample.patch_km, typed.model)
        meta["model_version"] = vg_model.model_version(module.state_dict(), meta)
        model_src = "random init (no results/model/model.pt)"
    embedder = vg_embed.Embedder(module, meta, layers, torch.device(device), batch_size, params.max_nodata_frac)

    files = sorted(
        (results / "stencil" / "regions").glob("*.parquet"), key=lambda p: -pq.ParquetFile(p).metadata.num_rows
    )
    chosen: list[Path] = []
    n = 0
    for f in files:  # the largest regions first, as many as fit --cells (at least one)
        rows = pq.ParquetFile(f).metadata.num_rows
        if chosen and n + rows > args.cells:
            continue
        chosen.append(f)
        n += rows

    def end_to_end(out_dir: str) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of embedding the chosen regions."""
        t0, c0 = time.perf_counter(), time.process_time()
        for f in chosen:
            table = pq.read_table(f)
            vg_embed.embed_region(embedder, None, layers, table, Path(out_dir) / f"{f.stem}_000000000000.parquet")
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0

    # encoded inputs of the same cells (ok ones, which are all the model sees), resident on the device
    lat = np.concatenate([pq.read_table(f, columns=["lat"]).column("lat").to_numpy() for f in chosen])
    lng = np.concatenate([pq.read_table(f, columns=["lng"]).column("lng").to_numpy() for f in chosen])
    from vectorgeo.sampling import gather_patches

    values, frac, pole = gather_patches(
        embedder.model_layers, lat, lng, embedder.patch_px, embedder.patch_km, embedder.scales
    )
    ok = vg_embed.cell_status(frac, pole, embedder.max_nodata_frac) == 0
    n_ok = int(ok.sum())
    limit = min(n_ok, 8 * batch_size)  # enough batches for a steady rate without holding every cell's tensor
    idx = np.flatnonzero(ok)[:limit]
    x_all = vg_model.encode({k: v[idx] for k, v in values.items()}, embedder.specs, device)
    del values
    if embedder.cuda:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    chunks = list(torch.split(x_all, batch_size))

    def model_only() -> tuple[float, float]:
        """(wall, CPU) seconds per ok cell of the bare forward pass (Embedder.forward, as end to end)."""
        with torch.inference_mode():
            embedder.forward(chunks[0])  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            for c in chunks:
                embedder.forward(c).cpu()
            if device == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - t0) / limit, (time.process_time() - c0) / limit

    with tempfile.TemporaryDirectory() as tmp:
        # interleave so that load from other processes hits both measurements alike
        e2e_s, per_cell = [], []
        for _ in range(args.repeats):
            per_cell.append(model_only())
            e2e_s.append(end_to_end(tmp))
        out_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.parquet"))
        written = pa.concat_tables(
            [pq.read_table(p, columns=["status"]) for p in sorted(Path(tmp).glob("*.parquet"))]
        ).num_rows

    cells_per_s = n / min(w for w, _ in e2e_s)
    # model-only time of this same set of cells: the model runs on the ok cells only
    model_only_cells_per_s = n / (min(w for w, _ in per_cell) * n_ok) if n_ok else float("nan")
    # the same in CPU seconds (all threads of this process): far less sensitive to other processes'
    # load than wall time, and on an otherwise idle machine ratio ≈ cpu_time_ratio when CPU-bound
    cpu_ratio = (min(c for _, c in per_cell) * n_ok) / min(c for _, c in e2e_s) if n_ok else float("nan")
    result = {
        "benchmark": "embed",
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": model_src,
        "model_version": embedder.model_version,
        "embedding_dim": embedder.dim,
        "in_channels": vg_model.input_channels(embedder.specs),
        "patch_px": embedder.patch_px,
        "batch_size": batch_size,
        "regions": len(chosen),
        "cells": n,
        "ok_cells": n_ok,
        "rows_written": written,
        "output_mb": round(out_bytes / 2**20, 2),
        "end_to_end_s": [round(w, 3) for w, _ in e2e_s],
        "end_to_end_cpu_s": [round(c, 3) for _, c in e2e_s],
        "cells_per_s": round(cells_per_s, 1),
        "model_only_cells_per_s": round(model_only_cells_per_s, 1),
        "model_only_ok_cells_per_s": round(1 / min(w for w, _ in per_cell), 1),
        "ratio": round(cells_per_s / model_only_cells_per_s, 3),
        "cpu_time_ratio": round(cpu_ratio, 3),
        "cpus": cpus if args.pin else f"any of {len(cpus)}",
        "malloc_keeps_freed_memory": malloc_tuned,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "res7_land_cells": RES7_LAND_CELLS,
        "projected_res7_world_hours": round(RES7_LAND_CELLS / cells_per_s / 3600, 2),
    }
    print(json.dumps(result))


def side_by_side(processes: int, pin_threads: int) -> None:
    """Run ``processes`` copies of this benchmark at once (same arguments) and print their figures.

    With ``pin_threads`` > 0 copy i runs on CPUs ``i * pin_threads`` onwards.
    """
    argv = list(sys.argv[1:])
    for i, a in enumerate(argv):  # drop --processes N / --processes=N
        if a == "--processes":
            del argv[i : i + 2]
            break
        if a.startswith("--processes="):
            del argv[i]
            break
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, *argv, *(["--first-cpu", str(i * pin_threads)] if pin_threads else [])],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outs = [p.communicate()[0] for p in procs]
    for p in procs:
        if p.returncode != 0:
            raise SystemExit(f"a benchmark process exited with status {p.returncode}")
    each = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    rates = [r["cells_per_s"] for r in each]
    print(
        json.dumps(
            {
                "benchmark": "embed",
                "processes": processes,
                "cells_per_s": round(sum(rates) / len(rates), 1),
                "cells_per_s_each": rates,
                "total_cells_per_s": round(sum(rates), 1),
                "each": each,
            }
        )
    )


if __name__ == "__main__":
    main()
