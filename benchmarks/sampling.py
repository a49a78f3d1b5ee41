"""Benchmark: triplet sampling throughput on the default config's layers, single process.

Prints one JSON object on its last line: triplets_per_s (whole shard written,
npz included), core_triplets_per_s (sampling into memory only), acceptance,
patch_px, layers, and bare_gather_triplets_per_s (a bare numpy gather of the
same three patches from each layer, for scale).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from vectorgeo.config import load_config, parse
from vectorgeo.layers import Layer, land_mask_spec, layer_source_files, layer_specs
from vectorgeo.rasters import prepare_layer
from vectorgeo.sampling import SampleStats, TripletSampler


def prepared(spec, cache: str) -> Layer:  # type: ignore[no-untyped-def]
    npy = os.path.join(cache, f"{spec.name}.npy")
    if not os.path.exists(npy):
        prepare_layer(spec, layer_source_files(spec)[0], npy, os.path.join(cache, f"{spec.name}.grid.json"))
    return Layer.open(spec, npy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--triplets", type=int, default=50000)
    ap.add_argument("--cache", default=".vectorgeo/bench-layers", help="where prepared layers are cached")
    args = ap.parse_args()
    cfg = load_config(args.config)
    os.makedirs(args.cache, exist_ok=True)
    layers = {n: prepared(s, args.cache) for n, s in layer_specs(cfg).items()}
    mask = prepared(land_mask_spec(cfg), args.cache)
    params = parse(cfg).sample
    sampler = TripletSampler(layers, mask, params)
    # warm the page cache / memory maps
    sampler.sample_batch(np.random.default_rng(1), SampleStats())

    rng = np.random.default_rng(0)
    stats = SampleStats()
    t0 = time.perf_counter()
    got = 0
    while got < args.triplets:
        _, latlng = sampler.sample_batch(rng, stats)
        got += len(latlng["anchor"])
    core = got / (time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as d:
        st = sampler.write_shard(os.path.join(d, "shard.npz"), args.triplets, seed=0, shard=0)
        full = args.triplets / st.seconds

    # bare gather: the same number of 3 patches per layer at random pixel offsets
    P = params.patch_px
    n = 20000
    r = np.random.default_rng(2)
    t0 = time.perf_counter()
    for layer in layers.values():
        h, w = layer.array.shape
        for _ in range(3):
            r0 = r.integers(0, h - P, n)[:, None] + np.arange(P)[None, :]
            c0 = r.integers(0, w - P, n)[:, None] + np.arange(P)[None, :]
            layer.array[r0[:, :, None], c0[:, None, :]]
    bare = n / (time.perf_counter() - t0)

    print(
        json.dumps(
            {
                "triplets_per_s": round(full, 1),
                "core_triplets_per_s": round(core, 1),
                "bare_gather_triplets_per_s": round(bare, 1),
                "acceptance": round(st.acceptance, 4),
                "patch_px": P,
                "layers": list(layers),
                "triplets": args.triplets,
            }
        )
    )


if __name__ == "__main__":
    main()
