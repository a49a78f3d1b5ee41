"""Snakemake adapter: prepare one layer (or evaluation label raster) into a memory-mappable .npy + grid JSON."""

from vectorgeo.layers import LayerSpec
from vectorgeo.log import setup_logging
from vectorgeo.rasters import layer_key, prepare_layer

log = setup_logging(snakemake.log[0])
spec = LayerSpec.from_dict(snakemake.params.spec)
if snakemake.rule == "prepare_eval_label":
    key = f"evaluate.tasks.{snakemake.wildcards.task}.source"
else:
    key = layer_key(spec.name)
grid = prepare_layer(
    spec,
    snakemake.input.source,
    snakemake.output.npy,
    snakemake.output.grid,
    crop=snakemake.params.crop,
    key=key,
)
log.info("prepared layer %s from %s: %s", spec.name, snakemake.input.source, grid)
