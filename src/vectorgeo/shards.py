"""Sample shards: reading and validating the npz files that :mod:`vectorgeo.sampling` writes.

A shard ``shard-{i}.npz`` holds, for each role in :data:`ROLES` and each layer ``L``, ``{role}_{L}`` of
shape (N, P, P) (uint8 class indices with 255 nodata, or float32 physical values with NaN nodata),
``{role}_latlng`` (N, 2) float64 patch centres, and ``meta``: a 0-d unicode array holding JSON with the
layer specs, ``patch_px``, ``patch_km``, the seed and the sampling parameters.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vectorgeo.config import NODATA_INDEX
from vectorgeo.errors import DataError
from vectorgeo.layers import LayerSpec

ROLES = ("anchor", "neighbor", "distant")
"""The three patches of a triplet."""


@dataclass
class Shard:
    """A validated sample shard in memory.

    Attributes:
        path: The file.
        n: Number of triplets.
        arrays: ``{role}_{layer}`` -> (n, P, P) patches (uint8 or float32), and ``{role}_latlng`` -> (n, 2)
            patch centres where the shard has them.
        meta: The shard's ``meta`` JSON (empty when absent).
    """

    path: str
    n: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def patch_px(self) -> int:
        """Patch size P."""
        return int(next(a.shape[1] for k, a in self.arrays.items() if not k.endswith("_latlng")))


def _load(p: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not os.path.isfile(p):
        raise DataError(p, "shard file does not exist")
    if os.path.getsize(p) == 0:
        raise DataError(p, "shard file is empty (0 bytes)")
    try:
        with np.load(p, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as e:
        raise DataError(p, f"not a readable npz shard ({type(e).__name__}: {e})") from None
    except Exception as e:  # zlib.error and friends from a damaged member
        raise DataError(p, f"not a readable npz shard ({type(e).__name__}: {e})") from None
    meta: dict[str, Any] = {}
    if "meta" in raw:
        try:
            meta = json.loads(str(raw.pop("meta")[()]))
        except (ValueError, TypeError) as e:
            raise DataError(p, f"'meta' is not JSON: {e}") from None
    return raw, meta


def _check_layers(
    p: str, raw: Mapping[str, np.ndarray], meta: Mapping[str, Any], specs: Mapping[str, LayerSpec]
) -> None:
    """The shard's layer set and encodings equal the given specs."""
    shard_layers = sorted(
        {k.split("_", 1)[1].split("@")[0] for k in raw if "_" in k and k.split("_", 1)[0] in ROLES} - {"latlng"}
    )
    meta_layers = meta.get("layers")
    if isinstance(meta_layers, Mapping) and meta_layers:
        shard_layers = sorted(set(shard_layers) | set(meta_layers))
    missing = [n for n in specs if n not in shard_layers]
    extra = [n for n in shard_layers if n not in specs]
    if missing or extra:
        raise DataError(
            p,
            f"layer set differs from the config: shard has {shard_layers}, config has {list(specs)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; not in config {extra}" if extra else ""),
        )
    if not isinstance(meta_layers, Mapping):
        return
    for name, spec in specs.items():
        if name not in meta_layers:
            continue
        try:
            other = LayerSpec.from_dict(meta_layers[name]).encoding_dict()
        except Exception as e:
            raise DataError(p, f"meta spec of layer '{name}' is invalid: {e}") from None
        mine = spec.encoding_dict()
        diff = sorted(k for k in mine if mine[k] != other.get(k))
        if diff:
            raise DataError(
                p, f"layer '{name}' was sampled with other settings than the config (fields {', '.join(diff)})"
            )


def _check_patches(p: str, key: str, a: np.ndarray, spec: LayerSpec) -> np.ndarray:
    bands = (len(spec.bands),) if spec.bands else ()
    if a.ndim != 3 + len(bands) or a.shape[1] != a.shape[2] or a.shape[3:] != bands:
        want = "(N, P, P" + (f", {bands[0]})" if bands else ")")
        raise DataError(p, f"'{key}' has shape {a.shape}; expected {want}")
    if spec.kind == "categorical":
        if a.dtype != np.uint8:
            raise DataError(p, f"'{key}' is {a.dtype}; expected uint8 class indices")
        bad = (a >= spec.n_classes) & (a != NODATA_INDEX)
        if bad.any():
            raise DataError(
                p, f"'{key}' has class index {int(a[bad].max())}; layer '{spec.name}' has {spec.n_classes} classes"
            )
        return a
    if a.dtype.kind != "f":
        raise DataError(p, f"'{key}' is {a.dtype}; expected float32 physical values")
    return a.astype(np.float32, copy=False)


def read_shard(
    path: str | Path,
    specs: Mapping[str, LayerSpec] | None = None,
    patch_px: int | None = None,
    patch_km: float | None = None,
    scales: Sequence[float] | None = None,
) -> Shard:
    """Read and validate one sample shard.

    Args:
        path: ``shard-{i}.npz``.
        specs: The layers expected (the model input); None: the shard's own (from its ``meta``).
        patch_px: Expected patch size (``sample.patch_px``); None: take the shard's.
        patch_km: Expected footprint (``sample.patch_km``), checked against the shard's ``meta`` when both
            are known.
        scales: Expected patch scales (``sample.scales``); None: the shard's own (``meta``; 1 scale without).

    Raises:
        DataError: naming the shard and what is wrong: unreadable, empty, missing or extra layers, other
            class maps or scaling, other patch size, wrong dtype, class indices out of range.
    """
    p = str(path)
    raw, meta = _load(p)
    if specs is None:
        if not isinstance(meta.get("layers"), Mapping):
            raise DataError(p, "not a vectorgeo shard: missing 'meta' with its layers")
        specs = {n: LayerSpec.from_dict(d) for n, d in meta["layers"].items()}
    _check_layers(p, raw, meta, specs)
    if patch_km is not None and meta.get("patch_km") is not None:
        if abs(float(meta["patch_km"]) - float(patch_km)) > 1e-9:
            raise DataError(p, f"patches are {meta['patch_km']} km across; config sample.patch_km is {patch_km}")
    own = [float(x) for x in meta.get("scales") or [1.0]]
    if scales is not None and [float(x) for x in scales] != own:
        raise DataError(p, f"patches were sampled at scales {own}; config sample scales are {list(scales)}")
    arrays: dict[str, np.ndarray] = {}
    n: int | None = None
    keys = [(spec, name if k == 0 else f"{name}@{k}") for k in range(len(own)) for name, spec in specs.items()]
    for role in ROLES:
        for spec, pkey in keys:
            key = f"{role}_{pkey}"
            if key not in raw:
                raise DataError(p, f"key '{key}' is missing; keys are {sorted(raw)}")
            a = _check_patches(p, key, raw[key], spec)
            if patch_px is not None and a.shape[1] != patch_px:
                raise DataError(p, f"patch size is {a.shape[1]} px ('{key}'), config sample.patch_px is {patch_px}")
            if n is None:
                n, patch_px = a.shape[0], a.shape[1]
            elif a.shape[0] != n:
                raise DataError(p, f"'{key}' has {a.shape[0]} patches, other keys {n}")
            arrays[key] = a
        latlng = raw.get(f"{role}_latlng")
        if latlng is not None:
            if latlng.shape != (n, 2):
                raise DataError(p, f"'{role}_latlng' has shape {latlng.shape}; expected ({n}, 2)")
            arrays[f"{role}_latlng"] = latlng
    if not n:
        raise DataError(p, "shard is empty (0 triplets)")
    return Shard(p, int(n), arrays, meta)


def concat_shards(shards: Sequence[Shard]) -> dict[str, np.ndarray]:
    """Concatenate the arrays of several shards (one array per key present in all of them)."""
    if len(shards) == 1:
        return shards[0].arrays
    keys = [k for k in shards[0].arrays if all(k in s.arrays for s in shards)]
    return {k: np.concatenate([s.arrays[k] for s in shards]) for k in keys}
