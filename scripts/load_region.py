"""Snakemake adapter: replace one region in the database from its GeoParquet file; write the marker."""

from vectorgeo import db, store
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
url = db.ensure_database(snakemake.config)
log.info("loading %s into %s", snakemake.input.embeddings, db.mask_password(url))
with store.connect(url) as conn:
    marker = store.load_region(conn, snakemake.input.embeddings, region=snakemake.wildcards.region)
marker["database"] = db.mask_password(url)
store.write_marker(snakemake.output.marker, marker)
log.info(
    "region %s: %d rows (model_version %s) in %.2f s",
    marker["region"],
    marker["rows"],
    marker["model_version"],
    marker["seconds"],
)
