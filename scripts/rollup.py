"""Snakemake adapter: roll region embeddings up to coarser resolutions; remove superseded region files."""

import json
from pathlib import Path

from vectorgeo import regionfiles
from vectorgeo import rollup as vg_rollup
from vectorgeo.atomic import write_json_atomic
from vectorgeo.errors import VectorgeoError
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
batches = list(snakemake.input.batches)
resolutions = list(snakemake.params.resolutions)
try:
    regions = regionfiles.region_files(batches)
    written = vg_rollup.rollup(regions, resolutions, list(snakemake.output.rollups))
except VectorgeoError as e:
    log.error("%s", e)
    raise SystemExit(f"rollup: {e}") from None
for p, n in written.items():
    log.info("rollup res %d: %d parent cells from %d region files", p, n, len(regions))
# The embeddings folder keeps exactly the current batch folders: batches of older digests (and
# region files of the one-file-per-job layout) are deleted here, after every current batch exists.
# Under S3 default storage these are the local storage-cache copies; superseded objects in the
# bucket are left alone (nothing reads them: every consumer goes through the manifest's digests).
removed = vg_rollup.prune_superseded(Path(batches[0]).parent, batches) if batches else []
for f in removed:
    log.info("removed superseded %s", f)
write_json_atomic(
    snakemake.output.summary,
    {
        "regions": len(regions),
        "rollups": {str(p): n for p, n in written.items()},
        "removed": [f.name for f in removed],
    },
)
log.info("summary %s", json.dumps({"regions": len(regions), "removed": len(removed)}))
