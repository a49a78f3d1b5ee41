"""Snakemake adapter: prepare one layer into a memory-mappable .npy + grid JSON."""

from vectorgeo.layers import LayerSpec
from vectorgeo.log import setup_logging
from vectorgeo.rasters import prepare_layer

log = setup_logging(snakemake.log[0])
spec = LayerSpec.from_dict(snakemake.params.spec)
grid = prepare_layer(
    spec,
    snakemake.input.source,
    snakemake.output.npy,
    snakemake.output.grid,
    crop=snakemake.params.crop,
)
log.info("prepared layer %s from %s: %s", spec.name, snakemake.input.source, grid)
