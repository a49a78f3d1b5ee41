"""Tiny synthetic sample shards with a known answer, in the exact shard format of stage 1.

Each triplet belongs to one of ``n_patterns`` synthetic "places": a place has a
dominant land-cover class and an elevation ramp in its own direction. Anchor and
neighbor come from the same place, the distant patch from another one, so a
model that learns the patterns separates them. Run as a script to write a
fixture set: ``python tests/synthetic_shards.py OUT_DIR [n_shards] [per_shard]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vectorgeo.layers import LayerSpec

ROLES = ("anchor", "neighbor", "distant")


def fixture_specs(normalize: str = "patch_minmax") -> dict[str, LayerSpec]:
    """A 5-class categorical layer and a continuous layer, like the default config but smaller."""
    landcover = LayerSpec.from_config(
        "landcover",
        {
            "kind": "categorical",
            "source": "builtin:modis_igbp_2019",
            "nodata": 255,
            "water": [0],
            "classes": {0: "water", 1: "forest", 2: "grassland", 3: "cropland", 4: "urban"},
        },
    )
    elevation = LayerSpec.from_config(
        "elevation",
        {
            "kind": "continuous",
            "source": "builtin:pvlib_altitude",
            "nodata": 255,
            "scale": 28.0,
            "offset": -450.0,
            "normalize": normalize,
            "mean": 500.0,
            "std": 800.0,
        },
    )
    return {"landcover": landcover, "elevation": elevation}


def _patches(place: np.ndarray, specs: dict[str, LayerSpec], p: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(place)
    out: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        if spec.kind == "categorical":
            k = spec.n_classes
            dominant = (place % (k - 1) + 1)[:, None, None]
            other = rng.integers(0, k, size=(n, p, p))
            v = np.where(rng.random((n, p, p)) < 0.6, dominant, other).astype(np.uint8)
            v[rng.random((n, p, p)) < 0.05] = 255
        else:
            theta = (place * np.pi / 2 + 0.3)[:, None, None]
            yy, xx = np.mgrid[0:p, 0:p] / (p - 1) - 0.5
            ramp = np.cos(theta) * xx[None] + np.sin(theta) * yy[None]
            level = rng.uniform(0, 2000, size=(n, 1, 1))
            v = (level + 400 * ramp + rng.normal(0, 20, size=(n, p, p))).astype(np.float32)
            v[rng.random((n, p, p)) < 0.05] = np.nan
        out[name] = v
    return out


def make_shard(
    specs: dict[str, LayerSpec],
    n: int = 64,
    patch_px: int = 8,
    seed: int = 0,
    n_patterns: int = 4,
    shard: int = 0,
    scales: tuple[float, ...] = (1.0,),
) -> dict[str, np.ndarray]:
    """The arrays of one shard (keys as in ``np.savez``); context scales get patches of the same place."""
    rng = np.random.default_rng(seed)
    place = rng.integers(0, n_patterns, size=n)
    distant_place = (place + rng.integers(1, n_patterns, size=n)) % n_patterns
    arrays: dict[str, Any] = {}
    for role, pl in (("anchor", place), ("neighbor", place), ("distant", distant_place)):
        for k in range(len(scales)):
            for name, v in _patches(pl, specs, patch_px, rng).items():
                arrays[f"{role}_{name}" + (f"@{k}" if k else "")] = v
        arrays[f"{role}_latlng"] = np.column_stack([rng.uniform(-60, 70, n), rng.uniform(-180, 180, n)])
    meta = {
        "layers": {name: s.to_dict() for name, s in specs.items()},
        "patch_px": patch_px,
        "patch_km": 10.0,
        "scales": list(scales),
        "seed": seed,
        "shard": shard,
    }
    arrays["meta"] = np.array(json.dumps(meta))
    return arrays


def write_shards(
    out_dir: str | Path,
    n_shards: int = 3,
    per_shard: int = 64,
    patch_px: int = 8,
    specs: dict[str, LayerSpec] | None = None,
    seed: int = 0,
    scales: tuple[float, ...] = (1.0,),
) -> list[Path]:
    """Write ``shard-{i}.npz`` files and return their paths."""
    specs = specs or fixture_specs()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_shards):
        path = out / f"shard-{i}.npz"
        np.savez(path, **make_shard(specs, per_shard, patch_px, seed * 1000 + i, shard=i, scales=scales))
        paths.append(path)
    return paths


if __name__ == "__main__":
    args = sys.argv[1:]
    write_shards(args[0], *(int(a) for a in args[1:3]))
