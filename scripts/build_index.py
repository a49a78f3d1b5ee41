"""Snakemake adapter: after every region is loaded, build the GIST and HNSW indexes and ANALYZE."""

import json
from pathlib import Path

from vectorgeo import db, store
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
markers = [json.loads(Path(p).read_text()) for p in snakemake.input.markers]
versions = sorted({m["model_version"] for m in markers})
if len(versions) != 1:
    raise SystemExit(f"expected one model_version in the loaded regions, found {versions}")
url = db.ensure_database(snakemake.config)
with store.connect(url) as conn:
    settings = store.IndexSettings.from_config(snakemake.params.database)
    summary = store.build_indexes(conn, settings, model_version=versions[0])
expected = sum(m["rows"] for m in markers)
if summary["rows"] != expected:
    raise SystemExit(f"{summary['rows']} rows in table {summary['table']}, but the markers count {expected}")
summary.update(regions=len(markers), database=db.mask_password(url))
store.write_marker(snakemake.output.summary, summary)
log.info("indexes built: %s", summary)
