"""Feature methods of the evaluation: what a cell looks like to each baseline.

* ``latlng`` -- the centroid as a 3-D unit vector
  :math:`(\\cos\\phi\\cos\\lambda, \\cos\\phi\\sin\\lambda, \\sin\\phi)`;
* ``class_histogram`` -- per-class pixel fractions of each categorical layer's local patch, plus the mean and
  standard deviation of each continuous band;
* ``context_histogram`` -- the same at several scales (``evaluate.context_scales`` times the patch footprint:
  the cell's own footprint, the local patch, the wide context), side by side;
* ``pca_raw`` -- PCA of the flattened encoded patches (every scale the model sees), with as many components as
  the embedding has dimensions;
* ``random_init`` -- the model's architecture, freshly initialised with the training seed, on the same patches;
* ``random_features`` -- MOSAIKS-style random convolutional features of the same encoded patches
  (:class:`RandomConvFeatures`);
* ``<method>+latlng`` -- a method's features beside the latlng vector (:func:`with_latlng`).

Every patch-based method is computed in batched passes over the cells (:func:`patch_features`).
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
    """Per-class pixel fractions of categorical patches, mean and std of continuous ones (per band).

    For a categorical layer with :math:`K` classes the features are
    :math:`f_k = |\\{p : c_p = k\\}| / P^2` (nodata pixels count for no class);
    for a continuous layer the NaN-aware mean and standard deviation of each
    band of the patch (0 when the patch has no valid pixel).

    Args:
        patches: name -> (B, P, P) array (uint8 class index, or float32 physical; (B, P, P, Bands) for a
            multi-band layer).
        specs: The layers' specs.

    Returns:
        float32 (B, F).
    """
    cols: list[np.ndarray] = []
    for name, spec in specs.items():
        a = patches[name]
        b = a.shape[0]
        if spec.kind == "categorical":
            npx = int(np.prod(a.shape[1:]))
            k = spec.n_classes
            codes = np.where(a == NODATA_INDEX, k, np.minimum(a, k)).reshape(b, -1).astype(np.int64)
            codes += (np.arange(b, dtype=np.int64) * (k + 1))[:, None]
            counts = np.bincount(codes.ravel(), minlength=b * (k + 1)).reshape(b, k + 1)
            cols.append(counts[:, :k].astype(np.float32) / npx)
        else:
            v = a.reshape(b, -1, spec.n_bands).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                m = np.nanmean(v, axis=1)
                sd = np.nanstd(v, axis=1)
            cols.append(np.nan_to_num(np.concatenate([m, sd], axis=1), nan=0.0))
    return np.concatenate(cols, axis=1).astype(np.float32)


def context_histogram_features(
    patches: Mapping[str, np.ndarray], specs: Mapping[str, LayerSpec], n_scales: int
) -> np.ndarray:
    """:func:`class_histogram_features` at every scale, side by side (B, n_scales · F).

    Args:
        patches: Patch key -> array, keys ``name`` (scale 0) and ``name@k`` (scale k), as from
            :func:`vectorgeo.sampling.patches` with several scales.
        specs: The layers' specs.
        n_scales: Number of scales in ``patches``.
    """
    parts = []
    for k in range(n_scales):
        at_k = {name: patches[name if k == 0 else f"{name}@{k}"] for name in specs}
        parts.append(class_histogram_features(at_k, specs))
    return np.concatenate(parts, axis=1)


class RandomConvFeatures:
    """MOSAIKS-style random convolutional features (Rolf et al. 2021) of encoded patches.

    Filters are ``k`` × ``k`` × C patches drawn at random positions of real encoded patches, ZCA-whitened:
    with :math:`\\Sigma = U S U^\\top` the covariance of k × k patch vectors and
    :math:`W = U (S + \\epsilon)^{-1/2} U^\\top`, a drawn patch :math:`q` gives the filter
    :math:`w = W W (q - \\mu)` (whitening folded into the filter), so the response at a position with patch
    vector :math:`x` is :math:`r = (W q') \\cdot (W (x - \\mu))`. Each filter gives two features,
    :math:`\\overline{\\max(0, r - b)}` and :math:`\\overline{\\max(0, -r - b)}` (average pooling over
    the patch, bias b = 1), so ``n_features`` / 2 filters. Deterministic for a seed.
    """

    def __init__(self, n_features: int, kernel: int = 3, seed: int = 0, bias: float = 1.0) -> None:
        if n_features < 2 or n_features % 2:
            raise ValueError(f"random_features needs an even number of features >= 2, got {n_features}")
        self.n_features, self.kernel, self.seed, self.bias = n_features, kernel, seed, bias
        self.weight: np.ndarray | None = None
        self.offset: np.ndarray | None = None

    def fit(self, x: np.ndarray) -> RandomConvFeatures:
        """Draw and whiten the filters from encoded patches ``x`` (N, C, P, P)."""
        rng = np.random.default_rng(self.seed)
        n, c, p, _ = x.shape
        k = self.kernel
        n_pos = min(20000, n * (p - k + 1) ** 2)
        cells = rng.integers(0, n, n_pos)
        rows = rng.integers(0, p - k + 1, n_pos)
        cols = rng.integers(0, p - k + 1, n_pos)
        di = np.arange(k)
        q = x[cells[:, None, None, None], np.arange(c)[None, :, None, None], (rows[:, None] + di)[:, None, :, None],
              (cols[:, None] + di)[:, None, None, :]].reshape(n_pos, -1).astype(np.float64)  # fmt: skip
        mu = q.mean(axis=0)
        cov = np.cov(q - mu, rowvar=False)
        s, u = np.linalg.eigh(cov)
        eps = 1e-2 * max(float(s.mean()), 1e-12)
        whiten = (u / np.sqrt(np.clip(s, 0, None) + eps)) @ u.T
        pick = rng.choice(n_pos, self.n_features // 2, replace=n_pos < self.n_features // 2)
        w = (q[pick] - mu) @ whiten @ whiten  # (F/2, C k k)
        self.weight = w.reshape(-1, c, k, k).astype(np.float32)
        self.offset = (-(w @ mu)).astype(np.float32)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Features of encoded patches (N, C, P, P) -> float32 (N, n_features)."""
        import torch
        import torch.nn.functional as F

        if self.weight is None or self.offset is None:
            raise ValueError("RandomConvFeatures.transform before fit")
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            r = F.conv2d(t, torch.from_numpy(self.weight), torch.from_numpy(self.offset))
            pos = F.relu(r - self.bias).mean(dim=(2, 3))
            neg = F.relu(-r - self.bias).mean(dim=(2, 3))
            out: np.ndarray = torch.cat([pos, neg], dim=1).numpy()
        return out


PatchFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
EncodeFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]
EmbedFn = Callable[[np.ndarray], np.ndarray]

PATCH_METHODS = ("class_histogram", "context_histogram", "pca_raw", "random_init", "random_features")
"""Baselines computed from the cells' patches (the same input the model sees)."""


def patch_features(
    lat: np.ndarray,
    lng: np.ndarray,
    patch_fn: PatchFn,
    specs: Mapping[str, LayerSpec],
    methods: Iterable[str],
    *,
    encode_fn: EncodeFn | None = None,
    embed_fn: EmbedFn | None = None,
    context_fn: PatchFn | None = None,
    context_scales: int = 1,
    pca_dim: int,
    pca_fit_cells: int = DEFAULTS.pca_fit_cells,
    random_features: int = DEFAULTS.random_features,
    batch_size: int = DEFAULTS.batch_size,
    seed: int = DEFAULTS.seed,
) -> dict[str, np.ndarray]:
    """Features of the patch-based methods, in batched passes over the cells.

    ``pca_raw`` and ``random_features`` are fitted (without labels) on the first ``pca_fit_cells``
    cells (the caller's cells are in random order, so these are a uniform sample) and applied to all:
    memory stays bounded by the fit sample plus one batch.

    Args:
        lat: Centroid latitudes.
        lng: Centroid longitudes.
        patch_fn: (lat, lng) -> patch key -> (B, P, P) patches (every scale the model sees).
        specs: Layer specs of the patches.
        methods: Which of :data:`PATCH_METHODS` to compute (others are ignored).
        encode_fn: Patches -> encoded float32 (B, C, P, P) (needed by pca_raw, random_init, random_features).
        embed_fn: Encoded batch -> (B, d) (the untrained model, for random_init).
        context_fn: (lat, lng) -> patches at ``context_scales`` scales (needed by context_histogram).
        context_scales: Scales returned by ``context_fn``.
        pca_dim: Components of pca_raw.
        pca_fit_cells: Cells pca_raw and random_features are fitted on.
        random_features: Width of random_features.
        batch_size: Cells per batch.
        seed: Seed of the randomised PCA solver and of the random filters.

    Returns:
        method -> float32 (N, F).
    """
    from sklearn.decomposition import PCA

    want = set(methods) & set(PATCH_METHODS)
    if want & {"pca_raw", "random_init", "random_features"} and encode_fn is None:
        raise ValueError("pca_raw, random_init and random_features need encode_fn")
    if "random_init" in want and embed_fn is None:
        raise ValueError("random_init needs embed_fn")
    if "context_histogram" in want and context_fn is None:
        raise ValueError("context_histogram needs context_fn")
    n = len(lat)
    out: dict[str, list[np.ndarray]] = {m: [] for m in want}
    pca: PCA | None = None
    rf: RandomConvFeatures | None = None
    if want & {"pca_raw", "random_features"}:
        assert encode_fn is not None
        n_fit = min(pca_fit_cells, n)
        fit = np.concatenate(
            [
                np.asarray(encode_fn(patch_fn(np.asarray(lat[s : min(s + batch_size, n_fit)]),
                                              np.asarray(lng[s : min(s + batch_size, n_fit)]))), np.float32)
                for s in range(0, n_fit, batch_size)
            ]
        )  # fmt: skip
        if "pca_raw" in want:
            flat = fit.reshape(fit.shape[0], -1)
            pca = PCA(n_components=min(pca_dim, *flat.shape), svd_solver="randomized", random_state=seed).fit(flat)
        if "random_features" in want:
            rf = RandomConvFeatures(random_features, seed=seed).fit(fit)
        del fit
    for s in range(0, n, batch_size):
        sl = slice(s, min(s + batch_size, n))
        la, ln = np.asarray(lat[sl]), np.asarray(lng[sl])
        patches = patch_fn(la, ln)
        if "class_histogram" in want:
            out["class_histogram"].append(class_histogram_features(patches, specs))
        if "context_histogram" in want:
            assert context_fn is not None
            out["context_histogram"].append(context_histogram_features(context_fn(la, ln), specs, context_scales))
        if encode_fn is None:
            continue
        x = np.asarray(encode_fn(patches), dtype=np.float32)
        if "random_init" in want:
            assert embed_fn is not None
            out["random_init"].append(np.asarray(embed_fn(x), dtype=np.float32))
        if pca is not None:
            z = pca.transform(x.reshape(x.shape[0], -1)).astype(np.float32)
            out["pca_raw"].append(np.pad(z, ((0, 0), (0, pca_dim - z.shape[1]))))  # fewer components than asked
        if rf is not None:
            out["random_features"].append(rf.transform(x))
    return {m: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for m, v in out.items()}


def with_latlng(features: Mapping[str, np.ndarray], lat: np.ndarray, lng: np.ndarray) -> dict[str, np.ndarray]:
    """``<method>+latlng`` for every method but latlng: its features beside the centroid's unit vector."""
    ll = latlng_features(lat, lng)
    return {f"{m}+latlng": np.concatenate([f, ll], axis=1) for m, f in features.items() if m != "latlng"}


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
