"""``vectorgeo serve``: the app under uvicorn, configured from the ``serve`` and ``database`` sections."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from vectorgeo import db, pyramid
from vectorgeo.api.app import create_app
from vectorgeo.api.settings import ServeSettings, serve_settings
from vectorgeo.inputs import InputLayers
from vectorgeo.store import QuerySettings


def _inputs(config: Mapping[str, Any] | None) -> InputLayers | None:
    """The prepared input layers of a full config (None without ``layers`` or when they are not prepared)."""
    from vectorgeo.config import parse
    from vectorgeo.inputs import InputLayers

    if config is None or "layers" not in config:
        return None
    cfg = parse(config)
    results = Path(cfg.results)
    folder = results if results.is_absolute() else db.project_dir() / results
    return InputLayers.from_config(cfg.model_dump(mode="json"), folder)


def app_for_config(config: Mapping[str, Any] | None, url: str) -> FastAPI:
    """The app with the ``serve`` settings and the ``database`` query settings of a config, serving the tiles
    of the workflow's archive (``<results>/tiles/cells.pmtiles``, relative to the working directory).

    The cell inspector reads the prepared input layers of the workflow (``<results>/layers``, relative
    to the project folder, of a config with ``layers``); without them it answers that they are missing.

    Args:
        config: Full config, or None for the defaults.
        url: Database URL.
    """
    from vectorgeo.config import Config

    results = (config or {}).get("results") or Config.model_fields["results"].default
    return create_app(
        url,
        serve=ServeSettings.from_config(serve_settings(config)),
        query=QuerySettings.from_config(db.settings(config)),
        inputs=_inputs(config),
        tile_archive=Path(results) / "tiles" / pyramid.ARCHIVE,
    )


WORKER_CONFIG_ENV = "VECTORGEO_SERVE_CONFIG"
"""Environment variable naming the JSON file of the config that :func:`worker_app` builds its app from."""


def _one_blas_thread() -> None:
    """One BLAS thread in this process: the API's matrix products are small (thousands of rows), and
    OpenBLAS's helper threads spin while they wait, which doubled the server's CPU per POST /search."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def worker_app() -> FastAPI:
    """The app of one uvicorn worker process (``uvicorn.run(..., factory=True)``): the config from the
    JSON file named by :data:`WORKER_CONFIG_ENV`, the database of ``VECTORGEO_DATABASE_URL`` (both set by
    :func:`serve`)."""
    import json
    import os

    _one_blas_thread()
    with open(os.environ[WORKER_CONFIG_ENV]) as f:
        config = json.load(f)
    return app_for_config(config, os.environ[db.ENV_URL])


def serve(
    config: Mapping[str, Any] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
) -> int:
    """Run the API and viewer with uvicorn until interrupted (``vectorgeo serve``).

    The database is the one of the ``database`` section (whose query settings the API uses); the
    project-local cluster is started when no external database is configured.

    Args:
        config: Full config (its ``serve`` and ``database`` sections are read), or None for the defaults.
        host: Address to listen on; default ``serve.host``.
        port: Port; default ``serve.port``.
        workers: Worker processes; default ``serve.workers``.

    Returns:
        Exit status 0.

    Raises:
        DatabaseError: the database cannot be reached or started.
    """
    import json
    import os
    import tempfile

    import uvicorn

    settings = ServeSettings.from_config(serve_settings(config))
    url = db.ensure_database(config)
    host = host or settings.host
    port = port or settings.port
    workers = workers or settings.workers
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    print(f"vectorgeo viewer: http://{shown}:{port}/  (API docs: http://{shown}:{port}/docs)", flush=True)
    if workers == 1:
        _one_blas_thread()
        uvicorn.run(app_for_config(config, url), host=host, port=port, log_level="info")
        return 0
    # worker processes import the app by name: hand them the config and the database's URL
    with tempfile.TemporaryDirectory(prefix="vectorgeo-serve-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(dict(config) if config is not None else {}, default=str))
        os.environ[WORKER_CONFIG_ENV] = str(path)
        os.environ[db.ENV_URL] = url
        uvicorn.run(
            "vectorgeo.api.server:worker_app", factory=True, workers=workers, host=host, port=port, log_level="info"
        )
    return 0
