"""Snakemake adapter: evaluate the embeddings against baselines; write metrics.json and report.html."""

import torch

from vectorgeo.config import EvaluateConfig, section
from vectorgeo.evaluate import run_evaluation
from vectorgeo.labels import TaskSpec
from vectorgeo.log import setup_logging
from vectorgeo.probes import MAIN_METRIC
from vectorgeo.regionfiles import region_files

log = setup_logging(snakemake.log[0])
torch.set_num_threads(max(1, snakemake.threads))
p = snakemake.params
params = section(EvaluateConfig, p.evaluate, "evaluate")
tasks = {name: TaskSpec.from_task(name, task) for name, task in params.tasks.items()}
metrics = run_evaluation(
    embedding_paths=region_files(snakemake.input.embeddings),
    model_path=snakemake.input.model,
    layer_paths=dict(zip(p.layer_names, snakemake.input.layers, strict=True)),
    tasks=tasks,
    label_paths=dict(zip(tasks, snakemake.input.labels, strict=True)),
    params=params,
    out_metrics=snakemake.output.metrics,
    out_report=snakemake.output.report,
    model_metrics_path=snakemake.input.model_metrics,
    n_jobs=snakemake.threads,
)
for name, t in metrics["tasks"].items():
    metric = MAIN_METRIC[t["kind"]]
    log.info("%s %s: %s", name, metric, {m: r[metric]["mean"] for m, r in t["methods"].items()})
