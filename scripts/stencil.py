"""Snakemake adapter: compute the land-cell stencil, one parquet per region plus a manifest."""

from pathlib import Path

from vectorgeo.config import StencilConfig, section
from vectorgeo.layers import Layer, LayerSpec
from vectorgeo.log import setup_logging
from vectorgeo.stencil import write_stencil

log = setup_logging(snakemake.log[0])
params = section(StencilConfig, snakemake.params.stencil, "stencil")
mask = Layer.open(LayerSpec.from_dict(snakemake.params.spec), snakemake.input.mask)
Path(snakemake.output.regions).mkdir(parents=True, exist_ok=True)
result = write_stencil(
    mask,
    snakemake.output.regions,
    resolution=params.resolution,
    region_resolution=params.region_resolution,
    prune_resolution=params.prune_resolution,
    extent=snakemake.params.stencil["extent"],
    manifest_path=snakemake.output.manifest,
    progress=True,
)
log.info(
    "stencil res %d: %d land cells of %d scanned in %d regions, %.1f s",
    result["resolution"],
    result.get("land_cells", 0),
    result.get("cells_scanned", 0),
    len(result["regions"]),
    result["seconds"],
)
