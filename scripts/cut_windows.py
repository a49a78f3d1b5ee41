"""Snakemake adapter: cut every candidate region's window out of the prepared model layers, once."""

from pathlib import Path

from vectorgeo import windows
from vectorgeo.layers import Layer, LayerSpec
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
specs = {name: LayerSpec.from_dict(d) for name, d in snakemake.params.layers.items()}
layers = {name: Layer.open(spec, snakemake.input[name]) for name, spec in specs.items()}
outputs = list(snakemake.output)
regions = [Path(p).stem for p in outputs]
stats = windows.cut_windows(layers, regions, snakemake.params.patch_km, outputs)
log.info(
    "%d region windows: %.1f MB in all, largest %.1f MB, layers %.1f MB",
    stats["regions"],
    stats["window_bytes"] / 1e6,
    stats["largest_window_bytes"] / 1e6,
    stats["layer_bytes"] / 1e6,
)
