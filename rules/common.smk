"""Config checks, path helpers, input functions and wildcard constraints."""

import json
import math
import os

from snakemake.logging import logger

from vectorgeo import config as vg_config
from vectorgeo import db as vg_db
from vectorgeo import layers as vg_layers
from vectorgeo import regionfiles as vg_regionfiles
from vectorgeo import resources as vg_resources
from vectorgeo import sources as vg_sources
from vectorgeo import stencil as vg_stencil
from vectorgeo import windows as vg_windows
from vectorgeo.errors import VectorgeoError

# The typed config (vectorgeo.config): cross-field checks, the local files it names, and every default
# written into `config` itself, so that scripts reading snakemake.config see the same values.
try:
    CFG = vg_config.complete(config)
    vg_config.check_files(CFG)
except VectorgeoError as e:
    raise WorkflowError(f"invalid configuration: {e}") from None

# Rule scripts import the library from this checkout, also inside --sdm conda envs (which carry only
# third-party packages): environment variables reach every job, locally and on cluster nodes.
os.environ.update(
    PYTHONPATH=os.pathsep.join(
        p
        for p in (os.path.join(workflow.basedir, "src"), os.environ.get("PYTHONPATH"))
        if p
    )
)

RESULTS = CFG.results
LAYER_SPECS = vg_layers.layer_specs(config)
MASK_SPEC = vg_layers.land_mask_spec(config)
ALL_LAYERS = {**LAYER_SPECS, "land_mask": MASK_SPEC}


wildcard_constraints:
    region="[0-9a-f]{15}",
    digest="[0-9a-f]{12}",
    batch=vg_regionfiles.BATCH_WILDCARD,
    layer="|".join(ALL_LAYERS),
    i=r"\d+",


def input_files_mb(input):
    """Sizes (MB) of a job's input files and of the files in its local input folders (embed batches:
    a folder's own size is a few KB locally, the sum of its objects in storage)."""
    sizes = list(input.size_files_mb)
    for path in input:
        if os.path.isdir(path):
            sizes.extend(
                e.stat().st_size / 1e6 for e in os.scandir(path) if e.is_file()
            )
    return sizes


def mem_mb(base_mb, factor=0.0):
    """A mem_mb resource: base_mb plus factor x the job's input size, doubled at each retry
    (vectorgeo.resources.mem_mb)."""

    def estimate(wildcards, input, attempt):
        return vg_resources.mem_mb(
            base_mb, factor, sum(input_files_mb(input)) if factor else 0.0, attempt
        )

    return estimate


def mem_mb_per_file(base_mb, factor, files_at_once):
    """A mem_mb resource for a job that works through its input files a few at a time: base_mb plus
    factor x the largest input file (files in input folders included) x files_at_once, doubled at each
    retry."""

    def estimate(wildcards, input, attempt):
        largest = max(input_files_mb(input), default=0.0)
        return vg_resources.mem_mb(base_mb, factor, files_at_once * largest, attempt)

    return estimate


def results(*parts):
    """A path under the results folder (a logical path: storage prefixes are added by Snakemake)."""
    return os.path.join(RESULTS, *parts)


def layer_npy(name):
    return results("layers", f"{name}.npy")


def layer_grid(name):
    return results("layers", f"{name}.grid.json")


def model_layer_npys(wildcards=None):
    """Prepared model input layers, keyed by name."""
    return {name: layer_npy(name) for name in LAYER_SPECS}


def layer_source(wildcards):
    """The local file a layer is prepared from: a built-in, a mosaic, a storage object or a path."""
    spec = ALL_LAYERS[wildcards.layer]
    bname = vg_sources.builtin_name(spec.source)
    if bname is not None:
        return local(str(vg_sources.builtin_path(bname, f"{wildcards.layer}.source")))
    if vg_sources.is_tile_set(spec.source):
        return results("layers", f"{wildcards.layer}.mosaic.tif")
    if vg_sources.is_remote(spec.source):
        return storage(spec.source)
    return local(spec.source)


def layer_tiles(wildcards):
    spec = ALL_LAYERS[wildcards.layer]
    tiles = vg_sources.expand_tiles(
        list(spec.source) if isinstance(spec.source, tuple) else spec.source,
        f"layers.{wildcards.layer}.source",
    )
    return [storage(t) if vg_sources.is_remote(t) else local(t) for t in tiles]


# every region a stencil of this config can hold (known before the stencil runs, see vectorgeo.windows)
WINDOW_REGIONS = vg_windows.candidate_regions(
    CFG.stencil.region_resolution, config["stencil"]["extent"]
)


def crop_bbox():
    """Bbox [w, s, e, n] that prepared layers are cropped to (extent plus a margin), or None."""
    return vg_stencil.crop_bbox(
        config["stencil"]["extent"], CFG.stencil.extent_margin_km
    )


def sample_bbox():
    """Bbox [w, s, e, n] that anchors and distant points are drawn from (None: the whole world)."""
    return vg_stencil.extent_bbox(config["stencil"]["extent"])


def sample_shards():
    return expand(results("samples", "shard-{i}.npz"), i=range(CFG.sample.shards))


def stencil_manifest():
    """The stencil manifest (read through storage when a default storage provider is set)."""
    manifest = checkpoints.stencil.get().output.manifest
    with manifest.open() as f:
        content = json.load(f)
    if manifest.is_storage and os.path.exists(manifest):
        # Snakemake retrieves it again when needed; a leftover local copy would block the next
        # rerun of the stencil checkpoint (ProtectedOutputException)
        os.remove(manifest)
    return content


def embed_batches():
    """The current embed batches (vectorgeo.regionfiles.partition of the stencil manifest), by name."""
    return vg_regionfiles.partition(
        stencil_manifest()["regions"], CFG.embed.batch_cells
    )


def embed_batch_targets(wildcards=None):
    """Every current embed batch folder (each holds its regions' {region}_{digest}.parquet files)."""
    return [
        results("embeddings", vg_regionfiles.BATCHES_FOLDER, name)
        for name in embed_batches()
    ]


def embed_batch_inputs(wildcards):
    """The regions' windows and stencil files of one embed batch, in region order.

    ancient(): cut_windows and the stencil checkpoint rewrite every file when they rerun; the batch
    name (the digest of its regions' cell digests) is what says whether a batch's cells changed.
    """
    batch = embed_batches().get(wildcards.batch)
    if batch is None:
        raise WorkflowError(
            f"embed batch {wildcards.batch} is not one of the current stencil's batches "
            "(a stale target? the current ones are in results/embeddings/batches after a run)"
        )
    return {
        "windows": [ancient(results("windows", f"{r}.npz")) for r, _ in batch.regions],
        "stencil": [
            ancient(results("stencil", "regions", f"{r}.parquet"))
            for r, _ in batch.regions
        ],
    }


def after_stencil(path):
    """``path``, as an input function's answer once the stencil checkpoint has run (the job is then
    planned with the jobs that read the regions, not before)."""
    checkpoints.stencil.get()
    return path


def stencil_region_file(wildcards):
    """A region's stencil file, once the stencil checkpoint has run.

    ancient(): the checkpoint rewrites every region file when it reruns; the digest in the
    downstream output name is what says whether a region's cells changed.
    """
    checkpoints.stencil.get()
    return ancient(results("stencil", "regions", f"{wildcards.region}.parquet"))


def cuda_requested(device):
    """Whether a device setting (auto, cpu, cuda) means a GPU job, decided without importing torch.

    auto means CUDA when an NVIDIA driver on the machine running Snakemake lists a GPU (and
    CUDA_VISIBLE_DEVICES does not hide it); set cuda explicitly when submitting from a host without one.
    """
    if device != "auto":
        return device.startswith("cuda")
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    # a driver probe, not a workflow path
    gpus = os.path.join(os.sep, "proc", "driver", "nvidia", "gpus")
    return os.path.isdir(gpus) and len(os.listdir(gpus)) > 0


def share_database():
    """One database for a run whose jobs run on other machines (SLURM), never one per node: the external
    one, or the project-local server started here, once, by the main process; its URL goes to every job
    through the environment (vectorgeo.db.share_database)."""
    if workflow.local_exec or vg_db.external_url(config):
        return
    if not any(
        job.rule.name in ("load_regions", "build_index")
        for job in workflow.dag.needrun_jobs()
    ):
        return
    url = vg_db.share_database(config)
    os.environ[vg_db.ENV_URL] = url
    logger.info(f"database of every job of this run: {vg_db.mask_password(url)}")


onstart:
    share_database()


def final_targets():
    """The default target: each stage appends its final outputs to FINAL_TARGETS."""
    return FINAL_TARGETS


FINAL_TARGETS = [results("stencil", "manifest.json"), *sample_shards()]
