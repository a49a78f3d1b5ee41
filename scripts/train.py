"""Snakemake adapter: train the encoder on the sample shards."""

import os

# idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads
# starve each other and a 2-thread step can run 5-10x slower than a 1-thread one
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from vectorgeo.config import ModelConfig, TrainConfig, section
from vectorgeo.layers import LayerSpec
from vectorgeo.log import setup_logging
from vectorgeo.training import train

log = setup_logging(snakemake.log[0])
specs = {name: LayerSpec.from_dict(spec) for name, spec in snakemake.params.layers.items()}
metrics = train(
    list(snakemake.input.shards),
    specs,
    patch_px=snakemake.params.sample["patch_px"],
    patch_km=snakemake.params.sample["patch_km"],
    model_cfg=section(ModelConfig, snakemake.params.model, "model"),
    train_cfg=section(TrainConfig, snakemake.params.train, "train"),
    model_path=snakemake.output.model,
    metrics_path=snakemake.output.metrics,
    plot_path=snakemake.output.plot,
    threads=snakemake.threads,
    scales=snakemake.params.sample["scales"],
)
log.info(
    "model %s: best val triplet accuracy %.4f (epoch %d of %d run), %.1f s on %s",
    metrics["model_version"],
    metrics["best_val_triplet_accuracy"],
    metrics["best_epoch"],
    len(metrics["epochs"]),
    metrics["seconds"],
    metrics["device"],
)
