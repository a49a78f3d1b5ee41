"""Feature methods of the evaluation: what a cell looks like to each baseline.

* ``latlng`` -- the centroid as a 3-D unit vector
  :math:`(\\cos\\phi\\cos\\lambda, \\cos\\phi\\sin\\lambda, \\sin\\phi)`;
* ``class_histogram`` -- per-class pixel fractions of each categorical layer's patch, plus the mean and
  standard deviation of each continuous layer;
* ``pca_raw`` -- PCA of the flattened encoded patch, with as many components as the embedding has dimensions;
* ``random_init`` -- the model's architecture, freshly initialised with the training seed, on the same patches.

Every patch-based method is computed in one batched pass over the cells (:func:`patch_features`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from vectorgeo.config import NODATA_INDEX, EvaluateConfig
from vectorgeo.layers import LayerSpec

DEFAULTS = EvaluateConfig()
"""The ``evaluate`` section's defaults (from the config models), the library's defaults too."""


def latlng_features(lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
    """The centroid as a 3-D unit vector (x, y, z), float32 (N, 3)."""
    phi, lam = np.radians(lat), np.radians(lng)
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=1).astype(np.float32)


def class_histogram_features(patches: Mapping[str, np.ndarray], specs: Mapping[str, LayerSpec]) -> np.ndarray:
    """Per-class pixel fractions of categorical patches, mean and std of continuous ones.

    For a categorical layer with :math:`K` classes the features are
    :math:`f_k = |\\{p : c_p = k\\}| / P^2` (nodata pixels count for no class);
    for a continuous layer the NaN-aware mean and standard deviation of the
    patch (0 when the patch has no valid pixel).

    Args:
        patches: name -> (B, P, P) array (uint8 class index, or float32 physical).
        specs: The layers' specs.

    Returns:
        float32 (B, F).
    """
    cols: list[np.ndarray] = []
    for name, spec in specs.items():
        a = patches[name]
        b = a.shape[0]
        npx = int(np.prod(a.shape[1:]))
        if spec.kind == "categorical":
            k = spec.n_classes
            codes = np.where(a == NODATA_INDEX, k, np.minimum(a, k)).reshape(b, -1).astype(np.int64)
            codes += (np.arange(b, dtype=np.int64) * (k + 1))[:, None]
            counts = np.bincount(codes.ravel(), minlength=b * (k + 1)).reshape(b, k + 1)
            cols.append(counts[:, :k].astype(np.float32) / npx)
        else:
            v = a.reshape(b, -1).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                m = np.nanmean(v, axis=1)
                s = np.nanstd(v, axis=1)
            cols.append(np.nan_to_num(np.stack([m, s], axis=1), nan=0.0))
    return np.concatenate(cols, axis=1).astype(np.float32)


PatchFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
EncodeFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]
EmbedFn = Callable[[np.ndarray], np.ndarray]


def patch_features(
    lat: np.ndarray,
    lng: np.ndarray,
    patch_fn: PatchFn,
    specs: Mapping[str, LayerSpec],
    methods: Iterable[str],
    *,
    encode_fn: EncodeFn | None = None,
    embed_fn: EmbedFn | None = None,
    pca_dim: int,
    pca_fit_cells: int = DEFAULTS.pca_fit_cells,
    batch_size: int = DEFAULTS.batch_size,
    seed: int = DEFAULTS.seed,
) -> dict[str, np.ndarray]:
    """Features of the patch-based methods, in one batched pass over the cells.

    ``pca_raw`` is fitted on the first ``pca_fit_cells`` cells (the caller's
    cells are in random order, so these are a uniform sample) and applied to
    all: memory stays bounded by the fit sample plus one batch.

    Args:
        lat: Centroid latitudes.
        lng: Centroid longitudes.
        patch_fn: (lat, lng) -> name -> (B, P, P) patches.
        specs: Layer specs of the patches.
        methods: Which of ``class_histogram``, ``pca_raw``, ``random_init`` to compute.
        encode_fn: Patches -> encoded float32 (B, C, P, P) (needed by pca_raw, random_init).
        embed_fn: Encoded batch -> (B, d) (the untrained model, for random_init).
        pca_dim: Components of pca_raw.
        pca_fit_cells: Cells the PCA is fitted on.
        batch_size: Cells per batch.
        seed: Seed of the randomised PCA solver.

    Returns:
        method -> float32 (N, F).
    """
    from sklearn.decomposition import PCA

    want = set(methods) & {"class_histogram", "pca_raw", "random_init"}
    if want & {"pca_raw", "random_init"} and encode_fn is None:
        raise ValueError("pca_raw and random_init need encode_fn")
    if "random_init" in want and embed_fn is None:
        raise ValueError("random_init needs embed_fn")
    n = len(lat)
    out: dict[str, list[np.ndarray]] = {m: [] for m in want}
    pca: PCA | None = None
    fit_buf: list[np.ndarray] = []
    n_fit = min(pca_fit_cells, n)

    def fit_pca() -> None:
        nonlocal pca
        x = np.concatenate(fit_buf)
        dim = min(pca_dim, x.shape[0], x.shape[1])
        pca = PCA(n_components=dim, svd_solver="randomized", random_state=seed).fit(x)
        for chunk in fit_buf:
            out["pca_raw"].append(pca.transform(chunk).astype(np.float32))
        fit_buf.clear()

    for s in range(0, n, batch_size):
        sl = slice(s, min(s + batch_size, n))
        patches = patch_fn(np.asarray(lat[sl]), np.asarray(lng[sl]))
        if "class_histogram" in want:
            out["class_histogram"].append(class_histogram_features(patches, specs))
        if encode_fn is None:
            continue
        x = np.asarray(encode_fn(patches), dtype=np.float32)
        if "random_init" in want:
            assert embed_fn is not None
            out["random_init"].append(np.asarray(embed_fn(x), dtype=np.float32))
        if "pca_raw" in want:
            flat = x.reshape(x.shape[0], -1)
            if pca is None:
                fit_buf.append(flat)
                if sum(len(c) for c in fit_buf) >= n_fit:
                    fit_pca()
            else:
                out["pca_raw"].append(pca.transform(flat).astype(np.float32))
    if "pca_raw" in want and pca is None and fit_buf:
        fit_pca()
    if "pca_raw" in want and pca is not None:
        # pad to the embedding's dimension if there were fewer components than asked for
        parts = out["pca_raw"]
        if parts and parts[0].shape[1] < pca_dim:
            out["pca_raw"] = [np.pad(p, ((0, 0), (0, pca_dim - p.shape[1]))) for p in parts]
    return {m: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for m, v in out.items()}


def random_init_embed_fn(metadata: Mapping[str, Any], seed: int) -> EmbedFn:
    """The untrained model of the same architecture, as an encoded-batch -> embedding function.

    The module is rebuilt from the model metadata after seeding torch with
    ``seed`` (the training seed), exactly as training initialises it.
    """
    import torch

    from vectorgeo import model as vg_model

    torch.manual_seed(seed)
    module = vg_model.build_model(metadata, metadata.get("architecture"))
    module.eval()

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            out: np.ndarray = module(t).float().numpy()
            return out

    return fn


def pca_rgb(embedding: np.ndarray, seed: int) -> np.ndarray:
    """First three principal components of the embeddings as colours in [0, 1] (N, 3).

    Each component is clipped to its 1st-99th percentile range and scaled.
    """
    from sklearn.decomposition import PCA

    k = min(3, embedding.shape[1], embedding.shape[0])
    z = PCA(n_components=k, random_state=seed).fit_transform(embedding.astype(np.float64))
    if k < 3:
        z = np.pad(z, ((0, 0), (0, 3 - k)))
    lo, hi = np.percentile(z, 1, axis=0), np.percentile(z, 99, axis=0)
    rgb: np.ndarray = np.clip((z - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0).astype(np.float32)
    return rgb
