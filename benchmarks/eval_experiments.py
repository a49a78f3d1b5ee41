"""Evaluation experiments: sample, train and score config variants without the whole workflow.

For a variant of the default config (overrides given as dotted ``key=value`` pairs, values as YAML)
this script samples triplet shards, trains the model, embeds only the cells to score, and scores them
with the evaluate stage's own features, folds and probes (:mod:`vectorgeo.evaluate` and
:mod:`vectorgeo.probes`, unchanged). It prints one JSON line per variant (and appends it to ``--out``):
the main metric per task and method (mean, std, folds), training time, validation triplet accuracy,
effective rank and the goal check.

Honest selection. ``--split selection`` (the default) scores on the cells of the *selection blocks*
(``evaluate.selection_fraction`` of the fold blocks, chosen by a hash of the block id), which the
evaluate stage never evaluates; variants and hyperparameters are chosen there. ``--split test`` scores
on exactly the cells the evaluate stage scores (outside the selection blocks): use it once, for the
chosen default, never to choose.

``--grid`` runs the objective ablation: triplet, InfoNCE and VICReg, each without and with the
reconstruction head, on the same shards, one after the other (plus the overrides given, e.g. smaller
shards for a cheap run).

Usage::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
    .venv/bin/python benchmarks/eval_experiments.py --grid --out benchmarks/results/ablation.jsonl \\
        sample.shards=4 sample.per_shard=10000 evaluate.max_cells=8000

Caches (prepared layers, label rasters, cells, shards keyed by sampling parameters, baseline features
and scores keyed by everything they depend on) live under ``.vectorgeo/experiments/``. ``--stencil``
points at a stencil folder (default results/stencil; ``snakemake results/stencil/manifest.json`` makes it).
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".vectorgeo" / "experiments"

GRID: list[tuple[str, dict[str, Any]]] = [
    (f"{obj}{'+recon' if rec else ''}", {"train.objective": obj, "train.reconstruction": rec})
    for obj in ("triplet", "infonce", "vicreg")
    for rec in (0.0, 1.0)
]
"""The objective ablation: every objective without and with the reconstruction head."""


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


def usable_cells(config: dict[str, Any], layers: dict[str, Any], stencil: Path) -> dict[str, np.ndarray]:
    """Every stencil cell with a usable patch, permuted with ``evaluate.seed`` as evaluate.read_cells draws them."""
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
            str(stencil),
            {n: lay.spec.to_dict() for n, lay in layers.items()},
        ]
    )
    path = CACHE / f"cells-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    files = sorted(glob.glob(str(stencil / "regions" / "*.parquet")))
    if not files:
        raise SystemExit(f"no stencil under {stencil}; run: snakemake --cores 2 results/stencil/manifest.json")
    h3s, lats, lngs = [], [], []
    for p in files:
        t = pq.read_table(p, columns=["h3", "lat", "lng"])
        h3, lat, lng = (t.column(c).to_numpy() for c in ("h3", "lat", "lng"))
        ok = np.zeros(len(h3), bool)
        for a in range(0, len(h3), 20000):
            b = slice(a, a + 20000)
            _, frac, pole = gather_patches(layers, lat[b], lng[b], s["patch_px"], s["patch_km"])
            ok[b] = cell_status(frac, pole, e["max_nodata_frac"]) == 0
        h3s.append(h3[ok].astype(np.uint64))
        lats.append(lat[ok])
        lngs.append(lng[ok])
    h3, lat, lng = np.concatenate(h3s), np.concatenate(lats), np.concatenate(lngs)
    pick = np.random.default_rng(ev["seed"]).permutation(len(h3))
    out = {"h3": h3[pick], "lat": lat[pick], "lng": lng[pick]}
    np.savez(path, **out)
    return out


def split_cells(cells: dict[str, np.ndarray], params: Any, split: str) -> dict[str, np.ndarray]:
    """The first ``max_cells`` cells inside (selection) or outside (test) the selection blocks."""
    from vectorgeo.probes import selection_blocks

    sel = selection_blocks(cells["h3"], params.fold_resolution, params.selection_fraction, params.seed)
    keep = sel if split == "selection" else ~sel
    idx = np.flatnonzero(keep)[: params.max_cells]
    return {k: v[idx] for k, v in cells.items()}


def sample_shards(config: dict[str, Any], layers: dict[str, Any], mask: Any) -> list[str]:
    from vectorgeo.config import SampleConfig, section
    from vectorgeo.sampling import TripletSampler

    s = config["sample"]
    # shard i depends on (seed, i) and the sampling parameters, not on how many shards there are
    key = digest(
        [
            {k: v for k, v in s.items() if k != "shards"},
            {n: lay.spec.to_dict() for n, lay in layers.items()},
            mask.spec.to_dict(),
        ]
    )
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


def load_variant(base: dict[str, Any], overrides: dict[str, Any], name: str) -> dict[str, Any]:
    """The validated config of a variant (base YAML plus dotted overrides)."""
    from vectorgeo.config import load_config

    raw = copy.deepcopy(base)
    for k, v in overrides.items():
        set_key(raw, k, v)
    tmpcfg = CACHE / f"config-{name}.yaml"
    tmpcfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(tmpcfg)


def baseline_scores(
    config: dict[str, Any], cells: dict[str, np.ndarray], layers: dict[str, Any], meta: dict[str, Any], params: Any
) -> dict[str, Any]:
    """Scores of every baseline on the cells (cached: they do not depend on the trained weights)."""
    from vectorgeo import evaluate as vg_eval
    from vectorgeo import probes as vg_probes

    arch_key = {k: meta[k] for k in ("architecture", "patch_px", "patch_km", "scales", "layers")}
    key = digest([arch_key, meta["train"]["seed"], params.model_dump(mode="json"), cells["h3"][:50].tolist()])
    path = CACHE / f"baselines-{key}.json"
    if path.exists():
        out: dict[str, Any] = json.loads(path.read_text())
        return out
    methods = [m for m in params.methods if not m.startswith("embedding")]
    p2 = params.model_copy(update={"methods": methods})
    feats = vg_eval.baseline_features(cells["lat"], cells["lng"], layers, meta, p2)
    feats = vg_eval.all_features(
        np.zeros((len(cells["h3"]), 1), np.float32), feats, cells["lat"], cells["lng"], methods
    )
    tasks, labels = task_labels(config, cells)
    out, _ = vg_probes.evaluate_features(feats, cells["h3"], tasks, labels, p2, n_jobs=2)
    path.write_text(json.dumps(out))
    return out


def task_labels(config: dict[str, Any], cells: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any]]:
    from vectorgeo import labels as vg_labels

    tasks = vg_labels.task_specs(config)
    label_paths: dict[str, str] = {}
    for n, t in tasks.items():
        if t.type == "raster":
            label_paths[n] = str(prepared_npy(t.layer_spec(), vg_labels.raster_source(t)))
        else:
            label_paths[n] = str(vg_labels.vector_source_path(t))
    labels = {n: vg_labels.task_labels(t, label_paths[n], cells["lat"], cells["lng"]) for n, t in tasks.items()}
    return tasks, labels


def run_variant(
    base: dict[str, Any], overrides: dict[str, Any], name: str, split: str, stencil: Path, threads: int
) -> dict[str, Any]:
    """Sample (cached), train, embed and score one variant; return its JSON result."""
    from vectorgeo import evaluate as vg_eval
    from vectorgeo import model as vg_model
    from vectorgeo import probes as vg_probes
    from vectorgeo.config import EvaluateConfig, section
    from vectorgeo.embed import embed_points
    from vectorgeo.layers import land_mask_spec, layer_specs
    from vectorgeo.objectives import effective_rank
    from vectorgeo.training import train_from_config

    config = load_variant(base, overrides, name)
    mask = prepared(land_mask_spec(config))
    specs = layer_specs(config)
    layers = {n: prepared(sp) for n, sp in specs.items()}
    t0 = time.perf_counter()
    shards = sample_shards(config, layers, mask)
    t_sample = time.perf_counter() - t0
    # a model is cached by everything training depends on (a rerun, or --split test, reuses it)
    out_dir = CACHE / f"model-{digest([config[k] for k in ('layers', 'sample', 'model', 'train')])}"
    t0 = time.perf_counter()
    if (out_dir / "metrics.json").exists() and (out_dir / "model.pt").exists():
        tm = json.loads((out_dir / "metrics.json").read_text())
    else:
        tm = train_from_config(config, shards, out_dir, threads=threads, progress=False)
    t_train = time.perf_counter() - t0

    params = section(EvaluateConfig, config["evaluate"], "evaluate")
    cells = split_cells(usable_cells(config, layers, stencil), params, split)
    t0 = time.perf_counter()
    module, meta = vg_model.load(out_dir / "model.pt")
    emb = embed_points(
        (module, meta), layers, cells["lat"], cells["lng"], device="cpu",
        max_nodata_frac=config["embed"]["max_nodata_frac"],
    )  # fmt: skip
    assert np.isfinite(emb).all(), "a scored cell got no embedding"
    t_embed = time.perf_counter() - t0

    t0 = time.perf_counter()
    base_scores = baseline_scores(config, cells, layers, meta, params)
    ours = [m for m in params.methods if m.startswith("embedding")]
    p_ours = params.model_copy(update={"methods": ours})
    feats = vg_eval.all_features(emb, {}, cells["lat"], cells["lng"], ours)
    tasks, labels = task_labels(config, cells)
    mine, _ = vg_probes.evaluate_features(feats, cells["h3"], tasks, labels, p_ours, n_jobs=2)
    metrics = merge_scores(base_scores, mine, tasks, params)
    metrics["embedding_dim"] = int(meta["embedding_dim"])
    t_eval = time.perf_counter() - t0
    main = {
        n: {
            m: {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in r[t["main"]].items()}
            for m, r in t["methods"].items()
        }
        for n, t in metrics["tasks"].items()
    }
    return {
        "name": name,
        "split": split,
        "overrides": overrides,
        "main": main,
        "paired": {n: t["paired"] for n, t in metrics["tasks"].items()},
        "label_efficiency": {n: t["label_efficiency"]["margins"] for n, t in metrics["tasks"].items()},
        "goal": vg_eval.goal_check(metrics),
        "val_triplet_accuracy": tm.get("best_val_triplet_accuracy"),
        "train_effective_rank": tm.get("effective_rank"),
        "effective_rank": round(effective_rank(torch.from_numpy(emb)), 2),
        "epochs": len(tm.get("epochs", [])),
        "train_triplets": tm.get("train_triplets"),
        "train_seconds": tm.get("train_seconds"),
        "sample_s": round(t_sample, 1),
        "train_s": round(t_train, 1),
        "embed_s": round(t_embed, 1),
        "eval_s": round(t_eval, 1),
        "n_cells": len(cells["h3"]),
    }


def merge_scores(base: dict[str, Any], mine: dict[str, Any], tasks: dict[str, Any], params: Any) -> dict[str, Any]:
    """Baseline and embedding scores of the same cells and folds, with paired differences recomputed."""
    from vectorgeo.probes import MAIN_METRIC, comparison_set, paired_differences

    out: dict[str, Any] = {"tasks": {}}
    for n, t in tasks.items():
        b, m = base["tasks"][n], mine["tasks"][n]
        main = MAIN_METRIC[t.kind]
        methods = {**m["methods"], **b["methods"]}
        ours, rivals = comparison_set("embedding", t.location, list(methods))
        curve = {f: {**m["label_efficiency"]["scores"][f], **b["label_efficiency"]["scores"][f]}
                 for f in m["label_efficiency"]["scores"]}  # fmt: skip
        margins = {}
        for f, per in curve.items():
            scored = [r for r in rivals if per.get(r, {}).get("mean") is not None]
            if scored and per.get(ours, {}).get("mean") is not None:
                best = max(scored, key=lambda r: per[r]["mean"])
                margins[f] = {"best_baseline": best, "margin": per[ours]["mean"] - per[best]["mean"]}
        out["tasks"][n] = {
            "kind": t.kind,
            "location": t.location,
            "main": main,
            "methods": methods,
            "paired": paired_differences(methods, main, ours, rivals),
            "label_efficiency": {"method": ours, "scores": curve, "margins": margins},
        }
    return out


def table(path: str) -> str:
    """A markdown table (variant × task, main metric mean ± std; then the baselines) of a results file.

    The method under test is ``embedding`` on content tasks and ``embedding+latlng`` on location tasks
    (as the goal compares them); baselines are those scored on the task (:func:`vectorgeo.probes.task_methods`).
    """
    from vectorgeo.probes import task_methods

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        return ""
    tasks = list(rows[0]["main"])
    ours = {t: rows[0]["paired"][t]["method"] for t in tasks}
    head = " | ".join(f"{t} ({ours[t]})" for t in tasks)
    out = [f"| variant ({rows[0]['split']} blocks) | {head} | effective rank |", "|---|" + "---|" * (len(tasks) + 1)]
    for r in rows:
        cells = [f"{r['main'][t][ours[t]]['mean']:.3f} ± {r['main'][t][ours[t]]['std']:.3f}" for t in tasks]
        out.append(f"| {r['name']} | " + " | ".join(cells) + f" | {r['effective_rank']} |")
    for t in tasks:
        location = ours[t] != "embedding"
        base = rows[-1]["main"][t]
        names = [m for m in task_methods(location, list(base)) if not m.startswith("embedding")]
        out.append(f"\n| {t} baselines | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        out.append("| | " + " | ".join(f"{base[m]['mean']:.3f} ± {base[m]['std']:.3f}" for m in names) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="dotted key=value (YAML value), e.g. model.embedding_dim=32")
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--name", default="variant")
    ap.add_argument("--grid", action="store_true", help="run the objective ablation grid (see GRID)")
    ap.add_argument("--only", default="", help="with --grid: comma-separated grid names to run (default all)")
    ap.add_argument("--split", choices=("selection", "test"), default="selection")
    ap.add_argument("--stencil", default=str(ROOT / "results" / "stencil"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="append each JSON line to this file (e.g. benchmarks/results/...)")
    ap.add_argument("--table", default=None, help="print the markdown table of a results file and exit")
    a = ap.parse_args()
    if a.table:
        print(table(a.table))
        return

    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    CACHE.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(a.config).read_text())
    given = {}
    for o in a.overrides:
        k, v = o.split("=", 1)
        given[k] = yaml.safe_load(v)
    only = [x for x in a.only.split(",") if x]
    grid = [(n, o) for n, o in GRID if not only or n in only]
    variants = [(f"{a.name}-{n}", {**given, **o}) for n, o in grid] if a.grid else [(a.name, given)]
    for name, overrides in variants:
        result = run_variant(base, overrides, name, a.split, Path(a.stencil), a.threads)
        line = json.dumps(result)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(line + "\n")
        sys.stdout.flush()
        print(line, flush=True)


if __name__ == "__main__":
    main()
