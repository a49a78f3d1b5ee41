"""Snakemake adapter: embed every stencil cell of one region into its GeoParquet file."""

import torch

from vectorgeo import embed as vg_embed
from vectorgeo import jobprocess
from vectorgeo import model as vg_model
from vectorgeo import windows as vg_windows
from vectorgeo.config import EmbedConfig, section
from vectorgeo.errors import VectorgeoError
from vectorgeo.layers import LayerSpec
from vectorgeo.log import setup_logging
from vectorgeo.stencil import read_region

log = setup_logging(snakemake.log[0])
region, digest = snakemake.wildcards.region, snakemake.wildcards.digest
try:
    # batch_size and device are execution settings, read from the config rather than params so
    # that changing them does not rerun every region (the embeddings do not depend on them)
    settings = section(EmbedConfig, snakemake.config["embed"], "embed")
    max_nodata_frac = snakemake.params.embed["max_nodata_frac"]
    device = vg_embed.device_name(settings.device)
    # batches of tens of MB are allocated and freed per batch: keep them for reuse (vectorgeo.jobprocess)
    jobprocess.keep_freed_memory()
    torch.set_num_threads(max(1, snakemake.threads))
    # on CPU one gather thread keeps the model busy; a GPU gets the job's other cores for gathering
    workers = max(1, snakemake.threads - 1) if device == "cuda" else 1
    module, meta = vg_model.load(snakemake.input.model, map_location=device)
    # the model's layers must be the config's, encoded the same way: names the layer at fault
    specs = {name: LayerSpec.from_dict(d) for name, d in snakemake.params.layers.items()}
    vg_model.check_layers(meta, specs)
    # the region's window of each layer (lookups outside it fail loudly)
    layers = vg_windows.open_window(snakemake.input.windows, {name: specs[name] for name in vg_model.specs_of(meta)})
    table = read_region(snakemake.input.stencil)
    log.info(
        "region %s (%d cells) with model %s on %s, batch %d, max_nodata_frac %.2f",
        region,
        table.num_rows,
        meta["model_version"],
        device,
        settings.batch_size,
        max_nodata_frac,
    )
    result = vg_embed.embed_region(
        (module, meta),
        None,
        layers,
        table,
        snakemake.output[0],
        batch_size=settings.batch_size,
        device=device,
        max_nodata_frac=max_nodata_frac,
        region=region,
        digest=digest,
        progress=vg_embed.log_progress(name=region),
        workers=workers,
    )
except VectorgeoError as e:
    log.error("%s", e)
    raise SystemExit(f"embed_region {region}_{digest}: {e}") from None
log.info(
    "region %s: %d cells %s in %.1f s (%.0f cells/s), model %s",
    region,
    result.cells,
    result.counts,
    result.seconds,
    result.cells_per_s,
    result.model_version,
)
# the outputs are closed: skip the interpreter's teardown (0.3-0.4 s with torch loaded)
jobprocess.exit_now(0)
