"""Tests of vectorgeo.features: the baselines' features, and what a multi-scale model sees that they do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vectorgeo import features as F
from vectorgeo import model as M
from vectorgeo.config import NODATA_INDEX
from vectorgeo.layers import LayerSpec
from vectorgeo.probes import probe_scores

LC = LayerSpec.from_config(
    "lc", {"kind": "categorical", "source": "x.tif", "nodata": 255, "classes": {0: "water", 1: "forest", 2: "crop"}}
)
RGB = LayerSpec.from_config(
    "rgb",
    {"kind": "continuous", "source": "x.tif", "bands": ["r", "g", "b"], "normalize": "standardize",
     "mean": [100.0, 100.0, 100.0], "std": [50.0, 50.0, 50.0]},
)  # fmt: skip
SPECS = {"lc": LC, "rgb": RGB}


def test_context_histogram_equals_hand_computed_fractions() -> None:
    # one cell, two scales of 2 x 2 pixels
    local = np.array([[[0, 1], [1, NODATA_INDEX]]], np.uint8)  # water 1/4, forest 2/4, crop 0, nodata 1/4
    wide = np.array([[[2, 2], [2, 1]]], np.uint8)  # forest 1/4, crop 3/4
    rgb_local = np.array([[[[10, 20, 30], [30, 40, 50]], [[np.nan, np.nan, np.nan], [50, 60, 70]]]], np.float32)
    rgb_wide = np.full((1, 2, 2, 3), 5.0, np.float32)
    patches = {"lc": local, "rgb": rgb_local, "lc@1": wide, "rgb@1": rgb_wide}
    got = F.context_histogram_features(patches, SPECS, 2)
    # local: 3 class fractions, then per band mean (r, g, b) and std (r, g, b) over the 3 valid pixels
    mean_l = [30.0, 40.0, 50.0]
    std_l = [float(np.std([10, 30, 50]))] * 3
    want = [0.25, 0.5, 0.0, *mean_l, *std_l, 0.0, 0.25, 0.75, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0]
    np.testing.assert_allclose(got, [want], rtol=1e-6)
    # the local scale alone is class_histogram
    np.testing.assert_allclose(F.class_histogram_features({"lc": local, "rgb": rgb_local}, SPECS), [want[:9]])


def test_random_features_are_deterministic_for_a_seed_and_have_the_requested_width() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5, 8, 8)).astype(np.float32)
    a = F.RandomConvFeatures(1024, seed=3).fit(x).transform(x)
    b = F.RandomConvFeatures(1024, seed=3).fit(x).transform(x)
    c = F.RandomConvFeatures(1024, seed=4).fit(x).transform(x)
    assert a.shape == (40, 1024) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert (a >= 0).all() and (a.std(axis=0) > 0).mean() > 0.5  # ReLU features that vary across cells
    assert F.RandomConvFeatures(64, seed=0).fit(x).transform(x[:3]).shape == (3, 64)
    with pytest.raises(ValueError, match="even"):
        F.RandomConvFeatures(1023)


def test_patch_features_widths() -> None:
    rng = np.random.default_rng(1)
    n, p = 30, 8

    def patch_fn(lat: np.ndarray, lng: np.ndarray) -> dict[str, np.ndarray]:
        k = len(lat)
        lc = rng.integers(0, 3, (k, p, p)).astype(np.uint8)
        return {"lc": lc, "lc@1": lc[:, ::-1].copy(), "rgb": rng.normal(100, 50, (k, p, p, 3)).astype(np.float32),
                "rgb@1": rng.normal(100, 50, (k, p, p, 3)).astype(np.float32)}  # fmt: skip

    out = F.patch_features(
        np.zeros(n), np.zeros(n), patch_fn, SPECS, F.PATCH_METHODS,
        encode_fn=lambda b: M.encode(b, SPECS).numpy(), embed_fn=lambda x: x.mean(axis=(2, 3)),
        context_fn=patch_fn, context_scales=2, pca_dim=6, pca_fit_cells=20, random_features=128, batch_size=7,
    )  # fmt: skip
    assert {m: v.shape for m, v in out.items()} == {
        "class_histogram": (n, 9),
        "context_histogram": (n, 18),
        "pca_raw": (n, 6),
        "random_init": (n, 2 * M.input_channels(SPECS)),
        "random_features": (n, 128),
    }
    ll = F.with_latlng({"latlng": F.latlng_features(np.zeros(n), np.zeros(n)), **out}, np.zeros(n), np.zeros(n))
    assert set(ll) == {f"{m}+latlng" for m in out} and ll["pca_raw+latlng"].shape == (n, 9)


def test_multi_scale_model_sees_wide_context_a_local_histogram_cannot() -> None:
    """The label is the dominant class of the wide context; every local patch has the same composition."""
    rng = np.random.default_rng(0)
    n, p = 600, 12
    label = rng.integers(0, 2, n)
    # local patches: forest with 20 % crop at random places, whatever the label
    local = np.where(rng.random((n, p, p)) < 0.2, 2, 1).astype(np.uint8)
    # wide patches: mostly forest (label 0) or mostly crop (label 1), never pure
    crop_frac = np.where(label == 1, 0.75, 0.25)[:, None, None]
    wide = np.where(rng.random((n, p, p)) < crop_frac, 2, 1).astype(np.uint8)
    specs = {"lc": LC}
    folds = np.arange(n) % 3
    hist = F.class_histogram_features({"lc": local}, specs)
    single = probe_scores(hist, label, "classification", folds)["linear_accuracy"]
    torch.manual_seed(0)
    model = M.build_model(specs, {"width": 8, "stages": 2, "blocks_per_stage": 1, "embedding_dim": 16}, n_scales=2)
    model.eval()
    with torch.inference_mode():
        emb = model(M.encode({"lc": local, "lc@1": wide}, specs)).numpy()
    multi = probe_scores(emb, label, "classification", folds)["linear_accuracy"]
    assert np.mean(single) < 0.6  # chance: the local histogram carries nothing about the label
    assert np.mean(multi) > 0.9
