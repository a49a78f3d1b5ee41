"""The cell inspector: the input patches the model saw at a cell, so that a person can see why places match.

The patches are gathered exactly as the embedding stage gathers them
(:func:`vectorgeo.sampling.gather_patches`: ``patch_px`` × ``patch_px`` pixels over ``patch_km`` around
the cell centre, north row first) from the prepared layers of the workflow
(``<results>/layers/<name>.npy``). Categorical layers come with a legend (class index, name, colour);
the MODIS IGBP classes of the default config get their usual colours, other classes a fixed palette.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vectorgeo.config import NODATA_INDEX
from vectorgeo.layers import Layer, layer_specs
from vectorgeo.sampling import gather_patches, patch_axes

# the usual colours of the IGBP classes of MODIS MCD12 land cover, by class name
IGBP_COLOURS = {
    "water": "#1c6bb0",
    "evergreen_needleleaf_forest": "#05450a",
    "evergreen_broadleaf_forest": "#086a10",
    "deciduous_needleleaf_forest": "#54a708",
    "deciduous_broadleaf_forest": "#78d203",
    "mixed_forest": "#009900",
    "closed_shrubland": "#c6b044",
    "open_shrubland": "#dcd159",
    "woody_savanna": "#dade48",
    "savanna": "#fbff13",
    "grassland": "#b6ff05",
    "permanent_wetland": "#27ff87",
    "cropland": "#c24f44",
    "urban": "#a5a5a5",
    "cropland_natural_mosaic": "#ff6d4c",
    "snow_ice": "#f9ffa4",
    "barren": "#1c0d0c",
}
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
]  # fmt: skip
UNITS = {"elevation": "m"}


def legend(layer: Layer) -> list[dict[str, Any]]:
    """Index, name and colour of each class of a categorical layer."""
    return [
        {"index": i, "name": name, "colour": IGBP_COLOURS.get(name, PALETTE[i % len(PALETTE)])}
        for i, name in enumerate(layer.spec.class_names)
    ]


@dataclass(frozen=True)
class InputLayers:
    """The model's input layers, prepared, and the patch the model sees.

    Attributes:
        layers: Prepared layers by name (config order).
        patch_px: Pixels per patch side.
        patch_km: Patch side on the ground.
    """

    layers: Mapping[str, Layer]
    patch_px: int
    patch_km: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any], results: str | Path) -> InputLayers | None:
        """The prepared layers under ``<results>/layers`` of a config, or None when one is missing."""
        from vectorgeo.config import parse

        cfg = parse(config)
        folder = Path(results) / "layers"
        layers = {}
        for name, spec in layer_specs(config).items():
            npy = folder / f"{name}.npy"
            if not npy.exists() or not npy.with_suffix(".grid.json").exists():
                return None
            layers[name] = Layer.open(spec, npy)
        return cls(layers, cfg.sample.patch_px, cfg.sample.patch_km)

    def axes(self, lat: float, lng: float) -> tuple[np.ndarray, np.ndarray]:
        """Row latitudes and column longitudes of the patch at a point."""
        rows, cols, _ = patch_axes(np.array([lat]), np.array([lng]), self.patch_px, self.patch_km)
        return rows[0], cols[0]

    def patches(self, lat: float, lng: float) -> list[dict[str, Any]]:
        """Each layer's patch at a point: ``{name, kind, bands, values, legend|unit, min, max}``.

        ``values`` is rows × columns (north row first), nodata → None; for a multi-band layer each pixel
        is a list of its band values (``bands`` names them; None for a single-band layer).
        """
        values, _, _ = gather_patches(self.layers, np.array([lat]), np.array([lng]), self.patch_px, self.patch_km)
        out = []
        for name, layer in self.layers.items():
            v = values[name][0]
            if layer.spec.kind == "categorical":
                grid = np.where(v == NODATA_INDEX, np.nan, v.astype(np.float64))
                extra: dict[str, Any] = {"legend": legend(layer), "unit": None}
            else:
                grid = v.astype(np.float64)
                extra = {"legend": None, "unit": UNITS.get(name)}
            finite = grid[np.isfinite(grid)]
            cells = grid.astype(object)
            cells[~np.isfinite(grid)] = None  # nodata → null; a multi-band pixel stays a list of its bands
            out.append(
                {
                    "name": name,
                    "kind": layer.spec.kind,
                    "bands": list(layer.spec.bands) or None,
                    "values": cells.tolist(),
                    "min": float(finite.min()) if finite.size else None,
                    "max": float(finite.max()) if finite.size else None,
                    **extra,
                }
            )
        return out
