"""Snakemake adapter: embed every stencil cell of a batch of regions, one GeoParquet file per region."""

import torch

from vectorgeo import embed as vg_embed
from vectorgeo import jobprocess
from vectorgeo.config import EmbedConfig, section
from vectorgeo.errors import VectorgeoError
from vectorgeo.layers import LayerSpec
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
batch = snakemake.wildcards.batch
try:
    # batch_size and device are execution settings, read from the config rather than params so
    # that changing them does not rerun every batch (the embeddings do not depend on them)
    settings = section(EmbedConfig, snakemake.config["embed"], "embed")
    max_nodata_frac = snakemake.params.embed["max_nodata_frac"]
    device = vg_embed.device_name(settings.device)
    # batches of tens of MB are allocated and freed per batch: keep them for reuse (vectorgeo.jobprocess)
    jobprocess.keep_freed_memory()
    torch.set_num_threads(max(1, snakemake.threads))
    # on CPU one gather thread keeps the model busy; a GPU gets the job's other cores for gathering
    workers = max(1, snakemake.threads - 1) if device == "cuda" else 1
    # the model's layers must be the config's, encoded the same way: names the layer at fault
    specs = {name: LayerSpec.from_dict(d) for name, d in snakemake.params.layers.items()}
    windows, stencils = list(snakemake.input.windows), list(snakemake.input.stencil)
    log.info(
        "batch %s: %d regions on %s, batch %d, max_nodata_frac %.2f",
        batch,
        len(windows),
        device,
        settings.batch_size,
        max_nodata_frac,
    )
    result = vg_embed.embed_batch(
        snakemake.input.model,
        specs,
        windows,
        stencils,
        snakemake.output.batch,
        batch=batch,
        batch_size=settings.batch_size,
        device=device,
        max_nodata_frac=max_nodata_frac,
        workers=workers,
    )
except VectorgeoError as e:
    log.error("%s", e)
    raise SystemExit(f"embed_batch {batch}: {e}") from None
log.info(
    "batch %s: %d regions, %d cells %s in %.1f s (%.0f cells/s), model %s",
    batch,
    len(result.regions),
    result.cells,
    result.counts,
    result.seconds,
    result.cells_per_s,
    result.regions[0].model_version,
)
# the outputs are closed: skip the interpreter's teardown (0.3-0.4 s with torch loaded)
jobprocess.exit_now(0)
