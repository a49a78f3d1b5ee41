"""Snakemake adapter: after every region is loaded, build the GIST and HNSW indexes and ANALYZE."""

import json
from pathlib import Path

from vectorgeo import db, store
from vectorgeo.log import setup_logging

log = setup_logging(snakemake.log[0])
loaded = json.loads(Path(snakemake.input.loaded).read_text())
url = db.ensure_database(snakemake.config)
with store.connect(url) as conn:
    # the regions are in the database as loaded (not replaced by another loader since)
    store.check_loaded(conn, loaded)
    settings = store.IndexSettings.from_config(snakemake.params.database)
    summary = store.build_indexes(conn, settings, model_version=loaded["model_version"])
if summary["rows"] != loaded["rows"]:
    raise SystemExit(f"{summary['rows']} rows in table {summary['table']}, but the region files hold {loaded['rows']}")
summary.update(regions=len(loaded["regions"]), database=db.mask_password(url))
store.write_marker(snakemake.output.summary, summary)
log.info("indexes built: %s", summary)
