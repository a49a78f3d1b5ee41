"""Training throughput: the full data path against bare optimisation steps.

* ``samples_per_s``: triplets per second along the path training takes:
  read + validate a shard (npz -> uint8/float32 arrays), shuffle into batches,
  encode (one-hot, scaling, validity) on the device, forward/backward/step
  (on CUDA: through the pinned-memory background loader).
* ``bare_samples_per_s``: the same model and the same batches, already
  encoded as tensors on the device: only forward/backward/step.
* ``ratio`` = samples_per_s / bare_samples_per_s (1.0: the data path is free).

Each path runs ``--repeats`` times, alternating, and the fastest run counts
(the machine is shared). Uses the real shards (results/samples) when present,
else synthetic shards of the same layers and patch size.

Usage: .venv/bin/python benchmarks/train.py [--config config/config.yaml] [--threads 2] [--steps 60]
Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as scripts/train.py does

import numpy as np
import torch

from vectorgeo import model as M
from vectorgeo import training as T
from vectorgeo.config import load_config, parse
from vectorgeo.layers import layer_specs
from vectorgeo.shards import concat_shards, read_shard

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--shards", default=str(ROOT / "results" / "samples" / "shard-*.npz"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60, help="optimisation steps per timed run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None, help="override train.device")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    specs = layer_specs(config)
    typed = parse(config)
    tcfg = typed.train
    scales = typed.sample.scales
    device = M.resolve_device(args.device or tcfg.device, "train.device")
    cuda = device.type == "cuda"
    bs = tcfg.batch_size
    px = config["sample"]["patch_px"]
    shard_paths = sorted(glob.glob(args.shards))
    tmp = None
    if not shard_paths:
        sys.path.insert(0, str(ROOT / "tests"))
        from synthetic_shards import write_shards

        tmp = tempfile.TemporaryDirectory()
        shard_paths = [str(p) for p in write_shards(tmp.name, 1, bs * args.steps, px, specs, scales=scales)]
    shard_path = shard_paths[0]

    torch.manual_seed(0)
    model = M.build_model(specs, typed.model, len(scales)).to(device)
    amp_dtype = None
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        amp_dtype = torch.bfloat16 if tcfg.amp and torch.cuda.is_bf16_supported() else None
    ctx = T.StepContext(
        specs, device, tcfg.margin, tcfg.grad_clip, amp_dtype, cuda, n_scales=len(scales), objective=tcfg.objective
    )
    opt = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)

    def full() -> tuple[float, int, float]:
        t0 = time.perf_counter()
        arrays = concat_shards([read_shard(shard_path, specs, px, config["sample"]["patch_km"], scales)])
        t_read = time.perf_counter() - t0
        batches = (T.stack_roles(b, ctx.keys) for b in T.iterate_batches(arrays, bs, np.random.default_rng(0)))
        pre = T._Prefetcher(batches, 6, T._pin) if cuda else None
        it = iter(pre) if pre is not None else batches
        n = 0
        for step, batch in enumerate(it):
            if step == args.steps:
                break
            x = T.encode_stacked(batch, ctx)
            T.train_step(model, opt, x, ctx)
            n += x.shape[0] // 3
        _sync(device)
        if pre is not None:
            pre.close()
        return time.perf_counter() - t0, n, t_read

    # the same batches, encoded once, resident on the device
    arrays = read_shard(shard_path, specs, px).arrays
    encoded = []
    for step, batch in enumerate(T.iterate_batches(arrays, bs, np.random.default_rng(0))):
        if step == args.steps:
            break
        encoded.append(T.encode_triplets(batch, ctx))
    _sync(device)

    def bare() -> tuple[float, int]:
        t0 = time.perf_counter()
        n = 0
        for x in encoded:
            T.train_step(model, opt, x, ctx)
            n += x.shape[0] // 3
        _sync(device)
        return time.perf_counter() - t0, n

    model.train()
    for x in encoded[:3]:  # warm-up (allocator, cuDNN autotuning)
        T.train_step(model, opt, x, ctx)
    _sync(device)
    full_runs, bare_runs = [], []
    for _ in range(args.repeats):
        full_runs.append(full())
        bare_runs.append(bare())
    t_full, n_full, t_read = min(full_runs)
    t_bare, n_bare = min(bare_runs)
    sps, bare_sps = n_full / t_full, n_bare / t_bare
    print(
        json.dumps(
            {
                "samples_per_s": round(sps, 1),
                "bare_samples_per_s": round(bare_sps, 1),
                "ratio": round(sps / bare_sps, 3),
                "shard_read_s": round(t_read, 3),
                "steps": args.steps,
                "batch_size": bs,
                "patch_px": px,
                "in_channels": M.input_channels(specs),
                "architecture": typed.model.model_dump(),
                "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                "threads": args.threads,
                "amp": str(amp_dtype) if amp_dtype else None,
                "shard": shard_path if tmp is None else "synthetic",
            }
        )
    )


if __name__ == "__main__":
    main()
