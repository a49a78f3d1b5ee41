"""Settings of the API read from the ``serve`` config section, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vectorgeo import db


def serve_settings(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``serve`` config section with the schema defaults filled in (config None = the defaults)."""
    return db.config_section(config, "serve")


@dataclass(frozen=True)
class ServeSettings:
    """How the API runs.

    Attributes:
        host: Address to listen on.
        port: TCP port.
        pool_size: Most database connections open at once.
        default_k: k the viewer starts with.
        default_radius_km: Radius the viewer starts with.
        tile_max_features: Feature cap per vector tile.
    """

    host: str
    port: int
    pool_size: int
    default_k: int
    default_radius_km: float
    tile_max_features: int

    @classmethod
    def from_config(cls, serve: Mapping[str, Any]) -> ServeSettings:
        """From the validated ``serve`` config section (every key present, see :func:`serve_settings`)."""
        return cls(
            host=str(serve["host"]),
            port=int(serve["port"]),
            pool_size=int(serve["pool_size"]),
            default_k=int(serve["default_k"]),
            default_radius_km=float(serve["default_radius_km"]),
            tile_max_features=int(serve["tile_max_features"]),
        )
