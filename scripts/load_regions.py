"""Snakemake adapter: load every region file of the run (those the database lacks) in one job."""

from vectorgeo import db, regionfiles, store
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
url = db.ensure_database(snakemake.config)
files = regionfiles.region_files(snakemake.input.embeddings)
log.info(
    "loading %d region files of %d embed batches into %s",
    len(files),
    len(snakemake.input.embeddings),
    db.mask_password(url),
)
summary = store.load_regions(url, files, threads=snakemake.threads)
summary["database"] = db.mask_password(url)
store.write_marker(snakemake.output.summary, summary)
log.info(
    "%s: %d rows in %d regions (%d loaded, %d unchanged, %d removed) in %.1f s",
    summary["model_version"],
    summary["rows"],
    len(summary["regions"]),
    summary["loaded"],
    summary["unchanged"],
    len(summary["removed"]),
    summary["seconds"],
)
