"""Settings of the API: the typed ``serve`` config section, read in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vectorgeo import db
from vectorgeo.config import ServeConfig

ServeSettings = ServeConfig
"""How the API runs: the ``serve`` section of the config (host, port, pool size, viewer defaults)."""


def serve_settings(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``serve`` config section with every default filled in (config None = the defaults)."""
    return db.config_section(config, "serve")
