"""Triplet sampling (Tile2Vec): anchor, neighbor and distant patches, written as npz shards.

Geometry
--------
A patch of ``P × P`` pixels covers ``patch_km`` × ``patch_km`` of ground at any
latitude. Around a centre (φ0, λ0) the pixel centres sit on a local metric
grid with offsets ``u_j = ((j + ½)/P − ½)·patch_km`` (east) and
``v_i = (½ − (i + ½)/P)·patch_km`` (north; row 0 is the northern edge):

.. math::

    φ_i = φ_0 + v_i / k, \\qquad λ_j = λ_0 + u_j / (k \\cos φ_0),
    \\qquad k = \\pi R / 180 ≈ 111.195\\ \\mathrm{km/deg}

so each patch is separable (one latitude per row, one longitude per column)
and is gathered with broadcast fancy indexing from each layer's native grid
(nearest neighbour). Longitudes wrap at the antimeridian; a centre whose
footprint would reach a pole (``|φ0| + patch_km / 2k > 90``) is refused.

Sampling
--------
* Anchors are uniform by area: ``z = sin φ ~ U(sin s, sin n)``, ``λ ~ U(w, e)``
  (the whole sphere by default, else the ``stencil.extent`` bbox), kept when
  the land mask says land.
* Neighbor: bearing θ ~ U(0, 2π), great-circle distance d ~ U(d_min, d_max):

  .. math::

      φ_2 = \\arcsin(\\sin φ_1 \\cos δ + \\cos φ_1 \\sin δ \\cos θ), \\quad
      λ_2 = λ_1 + \\operatorname{atan2}(\\sin θ \\sin δ \\cos φ_1, \\cos δ − \\sin φ_1 \\sin φ_2)

  with δ = d / R.
* Distant: an independent uniform land point at least ``distant_km_min`` from
  the anchor (haversine distance).
* A triplet is rejected when, for any role and any layer, the fraction of
  nodata / water / off-grid pixels exceeds ``max_nodata_frac``, or a
  categorical patch's most common class covers more than ``max_same_frac``.

All of this runs on whole batches of candidates with numpy; there is no
Python loop per sample.

Shard format (``shard-{i}.npz``)
--------------------------------
For each role in ``anchor``, ``neighbor``, ``distant`` and each layer ``L``:

* ``{role}_{L}``: (N, P, P); categorical layers as uint8 class indices
  (0..n_classes−1, 255 = nodata), continuous layers as float32 physical
  values (NaN = nodata); a multi-band layer has its bands on a last axis
  (N, P, P, B);
* ``{role}_{L}@{k}``: the same at context scale k ≥ 1 (``sample.context_scales``:
  a patch of the same P × P pixels covering ``patch_km · scales[k]``);
* ``{role}_latlng``: float64 (N, 2), the patch centre (lat, lng);

plus ``meta``: a 0-d unicode array holding JSON with ``layers`` (name → layer
spec dict), ``patch_px``, ``patch_km``, ``scales``, ``seed``, ``shard``, ``acceptance``
and the sampling parameters. Members are written with a fixed timestamp so
that the same seed gives a byte-identical file.
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vectorgeo.atomic import atomic_path, scratch_dir
from vectorgeo.config import NODATA_INDEX, SampleConfig
from vectorgeo.errors import ConfigError
from vectorgeo.layers import Layer
from vectorgeo.shards import ROLES

EARTH_RADIUS_KM = 6371.0088
KM_PER_DEG = math.pi * EARTH_RADIUS_KM / 180.0


def shard_seed(seed: int, shard: int) -> np.random.SeedSequence:
    """Independent, reproducible seed sequence of one shard."""
    return np.random.SeedSequence([int(seed), int(shard)])


def patch_offsets(patch_px: int, patch_km: float) -> np.ndarray:
    """Pixel-centre offsets from the patch centre in km, west→east (= north→south negated)."""
    return ((np.arange(patch_px) + 0.5) / patch_px - 0.5) * patch_km


def patch_axes(
    lat: np.ndarray, lng: np.ndarray, patch_px: int, patch_km: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row latitudes and column longitudes of patches centred at (lat, lng).

    Returns:
        (lat_rows (N, P) north→south, lng_cols (N, P) west→east wrapped to
        [-180, 180), pole (N,) True where the footprint would cross a pole).
    """
    lat = np.asarray(lat, dtype=np.float64)
    lng = np.asarray(lng, dtype=np.float64)
    off = patch_offsets(patch_px, patch_km)
    lat_rows = lat[:, None] - off[None, :] / KM_PER_DEG
    coslat = np.cos(np.radians(lat))
    pole = np.abs(lat) + 0.5 * patch_km / KM_PER_DEG >= 90.0
    safe = np.where(pole, 1.0, coslat)
    lng_cols = lng[:, None] + off[None, :] / (KM_PER_DEG * safe[:, None])
    lng_cols = (lng_cols + 180.0) % 360.0 - 180.0
    return lat_rows, lng_cols, pole


def scale_key(name: str, k: int) -> str:
    """Key of layer ``name``'s patch at scale ``k``: ``name`` for the local patch (k = 0), else ``name@k``."""
    return name if k == 0 else f"{name}@{k}"


def patch_keys(names: Iterable[str], n_scales: int) -> list[str]:
    """Patch keys of these layers at every scale, scale by scale (the model's channel order)."""
    names = list(names)
    return [scale_key(n, k) for k in range(n_scales) for n in names]


def gather_patches(
    layers: Mapping[str, Layer],
    lat: np.ndarray,
    lng: np.ndarray,
    patch_px: int,
    patch_km: float,
    scales: Sequence[float] = (1.0,),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Gather patches of every layer at the given centres, at one or more scales.

    Scale ``k`` is a ``patch_px`` × ``patch_px`` patch covering ``patch_km · scales[k]`` (``scales[0]``
    is 1: the local patch; a wide context patch, e.g. 8, is sampled more coarsely).

    Returns:
        (values, invalid_frac, pole): values[key] is (N, P, P) (uint8 class
        indices or float32 physical values; (N, P, P, B) for a multi-band
        layer) for every key of :func:`patch_keys`, invalid_frac[name] the (N,)
        fraction of nodata / water / off-grid pixels of the local patch, pole
        (N,) True where the local footprint would cross a pole (those patches
        are all invalid). Context patches that reach a pole or leave the grid
        hold nodata there.
    """
    values: dict[str, np.ndarray] = {}
    invalid_frac: dict[str, np.ndarray] = {}
    pole0 = np.zeros(len(lat), bool)
    for k, s in enumerate(scales):
        lat_rows, lng_cols, pole = patch_axes(lat, lng, patch_px, patch_km * float(s))
        if k == 0:
            pole0 = pole
        for name, layer in layers.items():
            v, bad = layer.gather_grid(lat_rows, lng_cols)
            if pole.any():
                bad[pole] = True
                v[pole] = NODATA_INDEX if v.dtype == np.uint8 else np.nan
            values[scale_key(name, k)] = v
            if k == 0:
                invalid_frac[name] = bad.reshape(len(lat), -1).mean(axis=1)
    return values, invalid_frac, pole0


def patches(
    layers: Mapping[str, Layer],
    lat: np.ndarray,
    lng: np.ndarray,
    patch_px: int,
    patch_km: float,
    scales: Sequence[float] = (1.0,),
) -> dict[str, np.ndarray]:
    """Patches of every layer at the given centres: key → (N, P, P) (see :func:`gather_patches`)."""
    return gather_patches(layers, lat, lng, patch_px, patch_km, scales)[0]


def max_class_fraction(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Fraction of pixels taken by the most common class of each patch (nodata never counts).

    Vectorised with one ``bincount`` over ``row * (n_classes + 1) + class``.
    """
    n = classes.shape[0]
    flat = classes.reshape(n, -1)
    k = n_classes + 1
    c = np.minimum(flat, n_classes).astype(np.int64)  # nodata → bin n_classes
    counts = np.bincount((np.arange(n, dtype=np.int64)[:, None] * k + c).ravel(), minlength=n * k).reshape(n, k)
    out: np.ndarray = counts[:, :n_classes].max(axis=1) / flat.shape[1]
    return out


def uniform_points(
    rng: np.random.Generator, n: int, bbox: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """n points uniform by area on the sphere, or within a bbox [w, s, e, n] (w > e wraps)."""
    if bbox is None:
        w, s, e, north = -180.0, -90.0, 180.0, 90.0
    else:
        w, s, e, north = (float(v) for v in bbox)
    z = rng.uniform(math.sin(math.radians(s)), math.sin(math.radians(north)), n)
    lat = np.degrees(np.arcsin(z))
    span = (e - w) % 360.0 or 360.0
    lng = (w + rng.uniform(0.0, span, n) + 180.0) % 360.0 - 180.0
    return lat, lng


def destination(
    lat: np.ndarray, lng: np.ndarray, bearing: np.ndarray, dist_km: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Great-circle destination from (lat, lng) along a bearing (radians from north)."""
    p1, l1 = np.radians(lat), np.radians(lng)
    d = dist_km / EARTH_RADIUS_KM
    sp2 = np.sin(p1) * np.cos(d) + np.cos(p1) * np.sin(d) * np.cos(bearing)
    p2 = np.arcsin(np.clip(sp2, -1.0, 1.0))
    l2 = l1 + np.arctan2(np.sin(bearing) * np.sin(d) * np.cos(p1), np.cos(d) - np.sin(p1) * sp2)
    return np.degrees(p2), (np.degrees(l2) + 180.0) % 360.0 - 180.0


def haversine_km(lat1: np.ndarray, lng1: np.ndarray, lat2: np.ndarray, lng2: np.ndarray) -> np.ndarray:
    """Great-circle distance in km."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(lng2 - lng1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    out: np.ndarray = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    return out


@dataclass
class SampleStats:
    """Counts of one sampling run."""

    points_drawn: int = 0
    candidates: int = 0
    accepted: int = 0
    distant_too_close: int = 0
    pole: int = 0
    nodata: int = 0
    same_class: int = 0
    seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        """Accepted triplets per candidate (a land anchor paired with a land distant point)."""
        return self.accepted / self.candidates if self.candidates else 0.0


class TripletSampler:
    """Vectorised triplet sampler over prepared layers.

    Args:
        layers: Model input layers by name (config order).
        land_mask: The land mask layer.
        params: Sampling parameters.
        bbox: Optional [w, s, e, n] that anchors and distant points are drawn from.
    """

    MAX_EMPTY_BATCHES = 50

    def __init__(
        self,
        layers: Mapping[str, Layer],
        land_mask: Layer,
        params: SampleConfig,
        bbox: Sequence[float] | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.mask = land_mask
        self.p = params
        self.bbox = list(bbox) if bbox is not None else None
        self.nodata_by_layer = dict.fromkeys(self.layers, 0)

    def _land_points(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lat, lng = uniform_points(rng, n, self.bbox)
        return lat, lng, self.mask.values_at(lat, lng)

    def sample_batch(
        self, rng: np.random.Generator, stats: SampleStats
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
        """Draw one batch of candidates and return the accepted triplets.

        Returns:
            (patches[role][layer] (M, P, P), latlng[role] (M, 2)).
        """
        p = self.p
        n = p.batch
        # anchors and distant points: two independent streams of uniform land points
        a_lat, a_lng, a_land = self._land_points(rng, n)
        d_lat, d_lng, d_land = self._land_points(rng, n)
        stats.points_drawn += 2 * n
        a_lat, a_lng = a_lat[a_land], a_lng[a_land]
        d_lat, d_lng = d_lat[d_land], d_lng[d_land]
        m = min(len(a_lat), len(d_lat))
        a_lat, a_lng, d_lat, d_lng = a_lat[:m], a_lng[:m], d_lat[:m], d_lng[:m]
        bearing = rng.uniform(0.0, 2.0 * math.pi, m)
        dist = rng.uniform(p.neighbor_km_min, p.neighbor_km_max, m)
        n_lat, n_lng = destination(a_lat, a_lng, bearing, dist)
        stats.candidates += m
        far = haversine_km(a_lat, a_lng, d_lat, d_lng) >= p.distant_km_min
        stats.distant_too_close += int((~far).sum())
        idx = np.flatnonzero(far)
        centres = {
            "anchor": (a_lat[idx], a_lng[idx]),
            "neighbor": (n_lat[idx], n_lng[idx]),
            "distant": (d_lat[idx], d_lng[idx]),
        }
        keep = np.ones(len(idx), dtype=bool)
        out: dict[str, dict[str, np.ndarray]] = {}
        for role, (lat, lng) in centres.items():
            vals, bad, pole = gather_patches(self.layers, lat, lng, p.patch_px, p.patch_km, p.scales)
            stats.pole += int((pole & keep).sum())
            keep &= ~pole
            for name, frac in bad.items():
                rej = (frac > p.max_nodata_frac) & keep
                self.nodata_by_layer[name] += int(rej.sum())
                stats.nodata += int(rej.sum())
                keep &= ~rej
                spec = self.layers[name].spec
                if spec.kind == "categorical" and p.max_same_frac < 1.0:
                    same = (max_class_fraction(vals[name], spec.n_classes) > p.max_same_frac) & keep
                    stats.same_class += int(same.sum())
                    keep &= ~same
            out[role] = vals
        sel = np.flatnonzero(keep)
        patches_out = {role: {name: v[sel] for name, v in vals.items()} for role, vals in out.items()}
        latlng = {role: np.stack([lat[sel], lng[sel]], axis=1) for role, (lat, lng) in centres.items()}
        stats.accepted += len(sel)
        return patches_out, latlng

    def write_shard(
        self,
        path: str | Path,
        n: int,
        seed: int,
        shard: int,
        progress: bool = False,
    ) -> SampleStats:
        """Sample exactly ``n`` accepted triplets into an npz shard, with bounded memory.

        Accepted triplets stream into per-key ``.npy`` files on disk (memory
        stays at one batch whatever ``n`` is), which are then zipped with
        fixed timestamps into the shard, atomically.

        Raises:
            ConfigError: nothing usable is found after many batches (names the
                layer that rejected most candidates).
        """
        t0 = time.perf_counter()
        rng = np.random.Generator(np.random.PCG64(shard_seed(seed, shard)))
        stats = SampleStats()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        P = self.p.patch_px
        keys: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
        for role in ROLES:
            for scale in range(len(self.p.scales)):
                for name, layer in self.layers.items():
                    dt = np.dtype(np.uint8) if layer.spec.kind == "categorical" else np.dtype(np.float32)
                    bands = (len(layer.spec.bands),) if layer.spec.bands else ()
                    keys[f"{role}_{scale_key(name, scale)}"] = ((n, P, P, *bands), dt)
            keys[f"{role}_latlng"] = ((n, 2), np.dtype(np.float64))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, desc=f"shard {shard}", unit="triplet")
        with scratch_dir(path) as tmpdir, atomic_path(path, suffix=".npz") as tmp_zip:
            arrays = {
                k: np.lib.format.open_memmap(os.path.join(tmpdir, f"{k}.npy"), mode="w+", dtype=dt, shape=shape)
                for k, (shape, dt) in keys.items()
            }
            filled, empty = 0, 0
            while filled < n:
                batch, latlng = self.sample_batch(rng, stats)
                m = min(len(latlng["anchor"]), n - filled)
                if m == 0:
                    empty += 1
                    if empty >= self.MAX_EMPTY_BATCHES and filled == 0:
                        self._raise_no_land(stats)
                    continue
                for role in ROLES:
                    for name, v in batch[role].items():
                        arrays[f"{role}_{name}"][filled : filled + m] = v[:m]
                    arrays[f"{role}_latlng"][filled : filled + m] = latlng[role][:m]
                filled += m
                if bar is not None:
                    bar.update(m)
            if bar is not None:
                bar.close()
            # the last batch may hold more accepted triplets than needed: count only those used
            stats.accepted = n
            for a in arrays.values():
                a.flush()
            del arrays
            stats.seconds = time.perf_counter() - t0
            meta = {
                "layers": {name: layer.spec.to_dict() for name, layer in self.layers.items()},
                "patch_px": self.p.patch_px,
                "patch_km": self.p.patch_km,
                "scales": list(self.p.scales),
                "seed": int(seed),
                "shard": int(shard),
                "n": int(n),
                "params": self.p.model_dump(mode="json", exclude={"shards", "per_shard", "seed"}),
                "bbox": self.bbox,
                "acceptance": stats.acceptance,
            }
            np.save(os.path.join(tmpdir, "meta.npy"), np.array(json.dumps(meta, sort_keys=True)))
            with zipfile.ZipFile(tmp_zip, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
                for k in [*keys, "meta"]:
                    info = zipfile.ZipInfo(f"{k}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with (
                        open(os.path.join(tmpdir, f"{k}.npy"), "rb") as src,
                        zf.open(info, "w", force_zip64=True) as dst,
                    ):
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
        return stats

    def _raise_no_land(self, stats: SampleStats) -> None:
        if stats.candidates == 0:
            raise ConfigError(
                "land_mask",
                f"no land found for anchors after {stats.points_drawn} random points"
                + (f" inside extent bbox {self.bbox}" if self.bbox else "")
                + "; expected the land mask to have land in the sampled area",
            )
        worst = max(self.nodata_by_layer, key=lambda k: self.nodata_by_layer[k])
        if self.nodata_by_layer[worst] > 0:
            raise ConfigError(
                f"layers.{worst}",
                f"no usable patches after {stats.candidates} candidates: {self.nodata_by_layer[worst]} "
                f"had more than sample.max_nodata_frac={self.p.max_nodata_frac} nodata/water pixels; "
                "expected the layer to have land data where the land mask has land",
            )
        raise ConfigError(
            "sample",
            f"no usable triplets after {stats.candidates} candidates (stats: {asdict(stats)}); "
            "check sample.max_same_frac, patch_km and neighbor distances",
        )
