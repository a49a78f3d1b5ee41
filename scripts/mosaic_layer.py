"""Snakemake adapter: mosaic a layer's tiles into one GeoTIFF."""

from vectorgeo.log import setup_logging
from vectorgeo.rasters import layer_key, mosaic_tiles

log = setup_logging(snakemake.log[0])
grid = mosaic_tiles(list(snakemake.input.tiles), snakemake.output[0], key=layer_key(snakemake.wildcards.layer))
log.info("mosaicked %d tiles into %s: %s", len(snakemake.input.tiles), snakemake.output[0], grid)
