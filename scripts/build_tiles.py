"""Snakemake adapter: the tile pyramid of the region embeddings as one PMTiles archive."""

from vectorgeo import pyramid, regionfiles
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
regions = regionfiles.region_files(snakemake.input.batches)
summary = pyramid.build_pyramid(regions, snakemake.output.archive, snakemake.params.max_features)
log.info(
    "tiles of %s: %d cells at resolution %d, zooms 0-%d, %d tiles, %.1f MB in %.1f s (%.0f cells/s)",
    summary["model_version"],
    summary["cells"],
    summary["resolution"],
    summary["max_zoom"],
    summary["tiles"],
    summary["bytes"] / 1e6,
    summary["seconds"],
    summary["cells"] / max(summary["seconds"], 1e-9),
)
