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
from collections.abc import Iterator, Mapping, Sequence
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


def _check_footprint(
    p: str, meta: Mapping[str, Any], patch_km: float | None, scales: Sequence[float] | None
) -> list[float]:
    """The shard's patch scales; refuses a footprint or scales that differ from the config's (when both known).

    Raises:
        DataError: naming the shard, its value and the config key.
    """
    if patch_km is not None and meta.get("patch_km") is not None:
        if abs(float(meta["patch_km"]) - float(patch_km)) > 1e-9:
            raise DataError(p, f"patches are {meta['patch_km']} km across; config sample.patch_km is {patch_km}")
    own = [float(x) for x in meta.get("scales") or [1.0]]
    if scales is not None and [float(x) for x in scales] != own:
        raise DataError(p, f"patches were sampled at scales {own}; config sample scales are {list(scales)}")
    return own


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
    own = _check_footprint(p, meta, patch_km, scales)
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


# --- streaming ------------------------------------------------------------------------------------------

CHUNK_BYTES = 32 << 20
"""Bytes of triplets read from one shard at a time when streaming (all roles and layers together)."""


@dataclass(frozen=True)
class ShardInfo:
    """A shard validated from its members' headers and its meta, without reading the patches.

    Attributes:
        path: The file.
        n: Number of triplets.
        keys: Member keys in reading order (``{role}_{layer}``, then ``{role}_latlng`` when present).
        dtypes: Key -> dtype.
        shapes: Key -> shape of one triplet's row (``(P, P)`` or ``(2,)``).
        meta: The shard's ``meta`` JSON.
    """

    path: str
    n: int
    keys: tuple[str, ...]
    dtypes: dict[str, np.dtype[Any]]
    shapes: dict[str, tuple[int, ...]]
    meta: dict[str, Any]

    @property
    def triplet_bytes(self) -> int:
        """Bytes of one triplet, every key."""
        return int(sum(self.dtypes[k].itemsize * int(np.prod(self.shapes[k])) for k in self.keys))

    @property
    def nbytes(self) -> int:
        """Bytes of the shard's arrays in memory."""
        return self.n * self.triplet_bytes


def _read_header(f: Any, p: str, key: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from an npy member's header (the stream is left at the data)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as e:
        raise DataError(p, f"'{key}' is not an npy array ({e})") from None
    if fortran or dtype.hasobject:
        raise DataError(p, f"'{key}' is not a C-ordered numeric array")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def shard_info(
    path: str | Path,
    specs: Mapping[str, LayerSpec],
    patch_px: int | None = None,
    patch_km: float | None = None,
    scales: Sequence[float] | None = None,
) -> ShardInfo:
    """Validate a shard from its members' headers and meta (the checks of :func:`read_shard` that need no
    patch data; class indices are checked chunk by chunk by :func:`iter_chunks`).

    Raises:
        DataError: naming the shard and what is wrong.
    """
    p = str(path)
    if not os.path.isfile(p):
        raise DataError(p, "shard file does not exist")
    if os.path.getsize(p) == 0:
        raise DataError(p, "shard file is empty (0 bytes)")
    try:
        with zipfile.ZipFile(p) as zf:
            names = {i.filename.removesuffix(".npy") for i in zf.infolist()}
            meta: dict[str, Any] = {}
            if "meta" in names:
                with zf.open("meta.npy") as f:
                    meta = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)[()]))
            headers = {}
            for k in sorted(names - {"meta"}):
                with zf.open(f"{k}.npy") as f:
                    headers[k] = _read_header(f, p, k)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(p, f"not a readable npz shard ({type(e).__name__}: {e})") from None
    _check_layers(p, dict.fromkeys(headers, np.empty(0)), meta, specs)
    own = _check_footprint(p, meta, patch_km, scales)
    keys: list[str] = []
    n: int | None = None
    for role in ROLES:
        for scale, name, spec in [(i, n_, s) for i in range(len(own)) for n_, s in specs.items()]:
            key = f"{role}_{name}" if scale == 0 else f"{role}_{name}@{scale}"
            if key not in headers:
                raise DataError(p, f"key '{key}' is missing; keys are {sorted(headers)}")
            shape, dtype = headers[key]
            bands = (len(spec.bands),) if spec.bands else ()
            if len(shape) != 3 + len(bands) or shape[1] != shape[2] or tuple(shape[3:]) != bands:
                want_shape = "(N, P, P" + (f", {bands[0]})" if bands else ")")
                raise DataError(p, f"'{key}' has shape {shape}; expected {want_shape}")
            want = "uint8 class indices" if spec.kind == "categorical" else "float32 physical values"
            if (spec.kind == "categorical") != (dtype == np.uint8) or (
                spec.kind != "categorical" and dtype.kind != "f"
            ):
                raise DataError(p, f"'{key}' is {dtype}; expected {want}")
            if patch_px is not None and shape[1] != patch_px:
                raise DataError(p, f"patch size is {shape[1]} px ('{key}'), config sample.patch_px is {patch_px}")
            if n is None:
                n, patch_px = shape[0], shape[1]
            elif shape[0] != n:
                raise DataError(p, f"'{key}' has {shape[0]} patches, other keys {n}")
            keys.append(key)
    for role in ROLES:
        key = f"{role}_latlng"
        if key in headers:
            if headers[key][0] != (n, 2):
                raise DataError(p, f"'{key}' has shape {headers[key][0]}; expected ({n}, 2)")
            keys.append(key)
    if not n:
        raise DataError(p, "shard is empty (0 triplets)")
    return ShardInfo(
        p,
        int(n),
        tuple(keys),
        {k: headers[k][1] for k in keys},
        {k: headers[k][0][1:] for k in keys},
        meta,
    )


def iter_chunks(
    info: ShardInfo, specs: Mapping[str, LayerSpec], rows: int, keys: Sequence[str] | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """A shard's triplets in file order, ``rows`` at a time, read from its members as streams.

    Memory is one chunk (``rows`` triplets), whatever the shard's size.

    Args:
        info: From :func:`shard_info`.
        specs: The layers (class indices are checked against them).
        rows: Triplets per chunk.
        keys: The keys to read (default all of ``info.keys``).

    Raises:
        DataError: a member ends early, or holds class indices out of range.
    """
    keys = list(keys or info.keys)
    with zipfile.ZipFile(info.path) as zf:
        streams = {k: zf.open(f"{k}.npy") for k in keys}
        try:
            for k, f in streams.items():
                _read_header(f, info.path, k)
            for start in range(0, info.n, rows):
                m = min(rows, info.n - start)
                chunk: dict[str, np.ndarray] = {}
                for k, f in streams.items():
                    dtype, shape = info.dtypes[k], info.shapes[k]
                    want = m * dtype.itemsize * int(np.prod(shape))
                    data = f.read(want)
                    if len(data) != want:
                        raise DataError(info.path, f"'{k}' ends after {start} + {len(data)} bytes; shard is truncated")
                    a = np.frombuffer(data, dtype=dtype).reshape((m, *shape))
                    name = k.split("_", 1)[1].split("@")[0]
                    chunk[k] = _check_patches(info.path, k, a, specs[name]) if name in specs else a
                yield chunk
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(info.path, f"not a readable npz shard ({type(e).__name__}: {e})") from None
        finally:
            for f in streams.values():
                f.close()


def stream_groups(
    infos: Sequence[ShardInfo],
    specs: Mapping[str, LayerSpec],
    rng: np.random.Generator,
    shards_at_once: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[dict[str, np.ndarray]]:
    """An epoch's triplets as groups to shuffle: shards in random order, ``shards_at_once`` of them read side
    by side, each group one chunk of each (about ``chunk_bytes`` per shard).

    Memory stays at ``shards_at_once`` chunks, independent of the number and size of the shards; triplets
    within a shard are independent draws, so reading each in file order loses no randomness.
    """
    if not infos:
        return
    keys = [k for k in infos[0].keys if all(k in i.keys for i in infos)]
    order = rng.permutation(len(infos))
    for g in range(0, len(order), shards_at_once):
        iters = [
            iter_chunks(infos[j], specs, max(1, chunk_bytes // infos[j].triplet_bytes), keys)
            for j in order[g : g + shards_at_once]
        ]
        while iters:
            parts = []
            for it in list(iters):
                chunk = next(it, None)
                if chunk is None:
                    iters.remove(it)
                else:
                    parts.append(chunk)
            if parts:
                yield parts[0] if len(parts) == 1 else {k: np.concatenate([c[k] for c in parts]) for k in keys}
