"""Snakemake adapter: evaluate the embeddings against baselines; write metrics.json and report.html."""

import torch

from vectorgeo.evaluate import EvalParams, TaskSpec, run_evaluation
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
torch.set_num_threads(max(1, snakemake.threads))
p = snakemake.params
params = EvalParams(
    max_cells=p.max_cells,
    map_cells=p.map_cells,
    seed=p.seed,
    folds=p.folds,
    fold_resolution=p.fold_resolution,
    knn_k=p.knn_k,
    logistic_c=p.logistic_c,
    logistic_max_iter=p.logistic_max_iter,
    ridge_alpha=p.ridge_alpha,
    pca_fit_cells=p.pca_fit_cells,
    batch_size=p.batch_size,
    methods=tuple(p.methods),
)
tasks = {name: TaskSpec.from_dict(d) for name, d in p.tasks.items()}
metrics = run_evaluation(
    embedding_paths=list(snakemake.input.embeddings),
    model_path=snakemake.input.model,
    layer_paths=dict(zip(p.layer_names, snakemake.input.layers, strict=True)),
    tasks=tasks,
    label_paths=dict(zip(tasks, snakemake.input.labels, strict=True)),
    params=params,
    out_metrics=snakemake.output.metrics,
    out_report=snakemake.output.report,
    model_metrics_path=snakemake.input.model_metrics,
)
main = {"classification": "linear_macro_f1", "regression": "linear_r2"}
for name, t in metrics["tasks"].items():
    metric = main[t["kind"]]
    log.info("%s %s: %s", name, metric, {m: r[metric]["mean"] for m, r in t["methods"].items()})
