"""Evaluation experiments: sample, train and score one config variant without the whole workflow.

For a variant of the default config (overrides given as dotted ``key=value`` pairs, values as YAML)
this script samples triplet shards, trains the model, embeds only the cells that the evaluate stage
would draw, and scores them with the evaluate stage's own features, folds and probes
(:mod:`vectorgeo.evaluate`, unchanged). It prints one JSON line: the main metric per task and method,
training time, val triplet accuracy and whether the goal of issue 9 is met.

The evaluated cells are drawn exactly as ``evaluate.read_cells`` draws them from the region files:
stencil cells in region order whose patch is usable (status 'ok' as the embed stage decides it),
a permutation with ``evaluate.seed``, its first ``evaluate.max_cells``.

Usage::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
    .venv/bin/python benchmarks/eval_experiments.py --name std32 \\
        layers.elevation.normalize=standardize model.embedding_dim=32

Caches (prepared layers, label rasters, shards keyed by sampling parameters) live under
``.vectorgeo/experiments/``. ``--stencil`` points at a stencil folder (default results/stencil).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".vectorgeo" / "experiments"


def set_key(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict."""
    keys = dotted.split(".")
    d = cfg
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def prepared_npy(spec: Any, src: str | None = None) -> Path:
    """Prepare a layer once (cached by the part of its spec that the prepared file depends on)."""
    from vectorgeo.layers import layer_source_files
    from vectorgeo.rasters import prepare_layer

    d = spec.to_dict()
    for k in ("normalize", "mean", "std"):  # encoding only; the prepared raster is the same
        d.pop(k, None)
    npy = CACHE / "layers" / f"{spec.name}-{digest(d)}.npy"
    if not npy.exists():
        npy.parent.mkdir(parents=True, exist_ok=True)
        prepare_layer(spec, src or layer_source_files(spec)[0], npy, npy.with_suffix(".grid.json"))
    return npy


def prepared(spec: Any) -> Any:
    from vectorgeo.layers import Layer

    return Layer.open(spec, prepared_npy(spec))


def land_stats(layer: Any, mask: Any) -> tuple[float, float]:
    """Mean and std of a continuous layer over land (2 million points uniform on the sphere, seed 0)."""
    from vectorgeo.sampling import uniform_points

    lat, lng = uniform_points(np.random.default_rng(0), 2_000_000, None)
    land = mask.values_at(lat, lng)
    v = layer.values_at(lat[land], lng[land])
    v = v[np.isfinite(v)]
    return float(v.mean()), float(v.std())


def eval_cells(config: dict[str, Any], layers: dict[str, Any], stencil: Path) -> dict[str, np.ndarray]:
    """The cells evaluate.read_cells would draw (cached per patch geometry)."""
    import pyarrow.parquet as pq

    from vectorgeo.embed import cell_status
    from vectorgeo.sampling import gather_patches

    s, e, ev = config["sample"], config["embed"], config["evaluate"]
    key = digest(
        [
            s["patch_px"],
            s["patch_km"],
            e["max_nodata_frac"],
            ev["seed"],
            ev["max_cells"],
            str(stencil),
            {n: lay.spec.to_dict() for n, lay in layers.items()},
        ]
    )
    path = CACHE / f"cells-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    files = sorted(glob.glob(str(stencil / "regions" / "*.parquet")))
    h3s, lats, lngs = [], [], []
    for p in files:
        t = pq.read_table(p, columns=["h3", "lat", "lng"])
        h3, lat, lng = (t.column(c).to_numpy() for c in ("h3", "lat", "lng"))
        ok = np.zeros(len(h3), bool)
        for a in range(0, len(h3), 20000):
            _, frac, pole = gather_patches(layers, lat[a : a + 20000], lng[a : a + 20000], s["patch_px"], s["patch_km"])
            ok[a : a + 20000] = cell_status(frac, pole, e["max_nodata_frac"]) == 0
        h3s.append(h3[ok].astype(np.uint64))
        lats.append(lat[ok])
        lngs.append(lng[ok])
    h3 = np.concatenate(h3s)
    lat = np.concatenate(lats)
    lng = np.concatenate(lngs)
    rng = np.random.default_rng(ev["seed"])
    pick = rng.permutation(len(h3))[: ev["max_cells"]]
    out = {"h3": h3[pick], "lat": lat[pick], "lng": lng[pick]}
    np.savez(path, h3=out["h3"], lat=out["lat"], lng=out["lng"])
    return out


def sample_shards(config: dict[str, Any], layers: dict[str, Any], mask: Any) -> list[str]:
    from vectorgeo.config import SampleConfig, section
    from vectorgeo.sampling import TripletSampler

    s = config["sample"]
    key = digest([s, {n: lay.spec.to_dict() for n, lay in layers.items()}, mask.spec.to_dict()])
    folder = CACHE / f"shards-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    params = section(SampleConfig, s, "sample")
    sampler = TripletSampler(layers, mask, params)
    paths = []
    for i in range(int(s["shards"])):
        p = folder / f"shard-{i}.npz"
        if not p.exists():
            sampler.write_shard(p, int(s["per_shard"]), int(s["seed"]), i)
        paths.append(str(p))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="dotted key=value (YAML value), e.g. model.embedding_dim=32")
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--name", default="variant")
    ap.add_argument("--stencil", default=str(ROOT / "results" / "stencil"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="embedding,random_init,pca_raw,class_histogram,latlng")
    ap.add_argument(
        "--standardize-stats",
        action="store_true",
        help="fill layers.<continuous>.mean/std with land statistics when normalize=standardize",
    )
    a = ap.parse_args()

    from vectorgeo import evaluate as vg_eval
    from vectorgeo import features as vg_features
    from vectorgeo import model as vg_model
    from vectorgeo import probes as vg_probes
    from vectorgeo import sampling
    from vectorgeo.config import EvaluateConfig, load_config, section
    from vectorgeo.embed import embed_points
    from vectorgeo.layers import land_mask_spec, layer_specs
    from vectorgeo.training import train_from_config

    torch.set_num_threads(a.threads)
    raw = yaml.safe_load(Path(a.config).read_text())
    for o in a.overrides:
        k, v = o.split("=", 1)
        set_key(raw, k, yaml.safe_load(v))
    tmpcfg = CACHE / f"config-{a.name}.yaml"
    CACHE.mkdir(parents=True, exist_ok=True)
    tmpcfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(tmpcfg)
    mask = prepared(land_mask_spec(config))
    specs = layer_specs(config)
    if a.standardize_stats:
        for n, sp in specs.items():
            if sp.kind == "continuous" and sp.normalize == "standardize":
                mean, std = land_stats(prepared(sp), mask)
                raw["layers"][n]["mean"] = round(mean, 1)
                raw["layers"][n]["std"] = round(std, 1)
        tmpcfg.write_text(yaml.safe_dump(raw, sort_keys=False))
        config = load_config(tmpcfg)
        specs = layer_specs(config)
    layers = {n: prepared(sp) for n, sp in specs.items()}

    t0 = time.perf_counter()
    shards = sample_shards(config, layers, mask)
    t_sample = time.perf_counter() - t0

    out_dir = CACHE / f"model-{a.name}"
    t0 = time.perf_counter()
    tm = train_from_config(config, shards, out_dir, threads=a.threads, progress=False)
    t_train = time.perf_counter() - t0

    cells = eval_cells(config, layers, Path(a.stencil))
    t0 = time.perf_counter()
    module, meta = vg_model.load(out_dir / "model.pt")
    emb = embed_points(
        (module, meta),
        layers,
        cells["lat"],
        cells["lng"],
        device="cpu",
        max_nodata_frac=config["embed"]["max_nodata_frac"],
    )
    assert np.isfinite(emb).all(), "an evaluated cell got no embedding"
    t_embed = time.perf_counter() - t0

    methods = tuple(m for m in a.methods.split(",") if m)
    params = section(EvaluateConfig, {**config["evaluate"], "methods": list(methods)}, "evaluate")
    mspecs = vg_model.specs_of(meta)
    features: dict[str, np.ndarray] = {"embedding": emb}
    if "latlng" in methods:
        features["latlng"] = vg_features.latlng_features(cells["lat"], cells["lng"])
    seed = vg_eval.training_seed(meta, params.seed)
    features.update(
        vg_features.patch_features(
            cells["lat"],
            cells["lng"],
            lambda la, ln: sampling.patches(layers, la, ln, int(meta["patch_px"]), float(meta["patch_km"])),
            mspecs,
            methods,
            encode_fn=lambda b: vg_model.encode(b, meta).numpy(),
            embed_fn=vg_features.random_init_embed_fn(meta, seed) if "random_init" in methods else None,
            pca_dim=int(meta["embedding_dim"]),
            pca_fit_cells=params.pca_fit_cells,
            batch_size=params.batch_size,
            seed=params.seed,
        )
    )
    tasks = vg_eval.task_specs(config)
    label_paths: dict[str, str] = {}
    for n, t in tasks.items():
        if t.type == "raster":
            label_paths[n] = str(prepared_npy(t.layer_spec(), vg_eval.raster_source(t)))
        else:
            label_paths[n] = str(vg_eval.vector_source_path(t))
    labels = {n: vg_eval.task_labels(t, label_paths[n], cells["lat"], cells["lng"]) for n, t in tasks.items()}
    t0 = time.perf_counter()
    metrics, _ = vg_probes.evaluate_features(features, cells["h3"], tasks, labels, params)
    t_eval = time.perf_counter() - t0
    main_metric = {
        n: {m: round(r[vg_probes.MAIN_METRIC[t["kind"]]]["mean"], 4) for m, r in t["methods"].items()}
        for n, t in metrics["tasks"].items()
    }
    result = {
        "name": a.name,
        "overrides": a.overrides,
        "layers": {
            n: {k: raw["layers"][n].get(k) for k in ("normalize", "mean", "std")}
            for n, sp in specs.items()
            if sp.kind == "continuous"
        },
        "main": main_metric,
        "goal": vg_eval.goal_check(metrics),
        "val_triplet_accuracy": tm.get("best_val_triplet_accuracy"),
        "epochs": len(tm.get("epochs", [])),
        "sample_s": round(t_sample, 1),
        "train_s": round(t_train, 1),
        "embed_s": round(t_embed, 1),
        "eval_s": round(t_eval, 1),
        "n_cells": metrics["n_cells"],
    }
    (CACHE / f"result-{a.name}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
