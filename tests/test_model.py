"""Tests of vectorgeo.model: input encoding, the ResNet, the model file."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_shards import fixture_specs

import vectorgeo
from vectorgeo import model as M
from vectorgeo.config import ModelConfig, TrainConfig
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.layers import LayerSpec

NAN = float("nan")


def test_channels_are_one_hot_then_value_and_validity() -> None:
    specs = fixture_specs()
    assert M.input_channels(specs) == 5 + 2
    assert M.channel_names(specs) == [
        "landcover:water",
        "landcover:forest",
        "landcover:grassland",
        "landcover:cropland",
        "landcover:urban",
        "elevation:value",
        "elevation:valid",
    ]


def test_encode_hand_made_patch_patch_minmax() -> None:
    specs = fixture_specs("patch_minmax")
    lc = np.array([[[0, 3], [255, 4]], [[1, 1], [7, 2]]], dtype=np.uint8)  # 7: out of range -> nodata
    el = np.array([[[10.0, 20.0], [NAN, 30.0]], [[5.0, 5.0], [5.0, NAN]]], dtype=np.float32)
    x = M.encode({"landcover": lc, "elevation": el}, specs)
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 7, 2, 2)
    expected = torch.zeros(2, 7, 2, 2)
    # patch 0: class 0 at (0,0), class 3 at (0,1), nodata at (1,0), class 4 at (1,1)
    expected[0, 0, 0, 0] = 1
    expected[0, 3, 0, 1] = 1
    expected[0, 4, 1, 1] = 1
    # min 10, max 30 over valid pixels: (v - 10) / 20; NaN -> 0 with validity 0
    expected[0, 5] = torch.tensor([[0.0, 0.5], [0.0, 1.0]])
    expected[0, 6] = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # patch 1: classes 1, 1, (7 -> none), 2; flat elevation -> 0
    expected[1, 1, 0, 0] = 1
    expected[1, 1, 0, 1] = 1
    expected[1, 2, 1, 1] = 1
    expected[1, 6] = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert torch.equal(x, expected)


def test_encode_standardize_and_all_nodata_patch() -> None:
    specs = fixture_specs("standardize")  # mean 500, std 800
    lc = np.full((2, 2, 2), 255, dtype=np.uint8)
    el = np.array([[[500.0, 1300.0], [-300.0, NAN]], [[NAN, NAN], [NAN, NAN]]], dtype=np.float32)
    x = M.encode({"landcover": torch.from_numpy(lc), "elevation": torch.from_numpy(el)}, specs)
    assert torch.equal(x[:, :5], torch.zeros(2, 5, 2, 2))
    assert torch.equal(x[0, 5], torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    assert torch.equal(x[0, 6], torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(x[1, 5:], torch.zeros(2, 2, 2))
    assert torch.isfinite(x).all()


def test_encode_accepts_model_metadata_and_reports_missing_layer() -> None:
    specs = fixture_specs()
    meta = M.make_metadata(specs, 2, 10.0, None)
    lc = np.zeros((1, 2, 2), dtype=np.uint8)
    el = np.zeros((1, 2, 2), dtype=np.float32)
    assert torch.equal(
        M.encode({"landcover": lc, "elevation": el}, meta), M.encode({"landcover": lc, "elevation": el}, specs)
    )
    with pytest.raises(DataError, match="elevation"):
        M.encode({"landcover": lc}, specs)


def _model(**arch: int) -> M.Encoder:
    torch.manual_seed(0)
    return M.build_model(fixture_specs(), {"width": 8, "stages": 3, "blocks_per_stage": 2, **arch})


def test_outputs_are_unit_vectors() -> None:
    m = _model(embedding_dim=12)
    x = torch.randn(10, 7, 16, 16) * 3
    for mode in (m.train, m.eval):
        mode()
        z = m(x)
        assert tuple(z.shape) == (10, 12)
        assert torch.allclose(torch.linalg.vector_norm(z, dim=1), torch.ones(10), atol=1e-5)


def test_every_stage_has_its_residual_blocks_and_all_get_gradients() -> None:
    m = _model(stages=3, blocks_per_stage=3)
    assert len(m.trunks[0].stages) == 3
    for stage in m.trunks[0].stages:
        assert len(stage) == 3
        assert all(isinstance(b, M.ResidualBlock) for b in stage)
    # projection skips where the shape changes (stage 1 and 2 downsample), identity elsewhere
    assert [type(b.skip).__name__ for stage in m.trunks[0].stages for b in stage] == [
        "Identity", "Identity", "Identity", "Sequential", "Identity", "Identity", "Sequential", "Identity", "Identity",
    ]  # fmt: skip
    names = {".".join(n.split(".")[2:5]) for n, _ in m.named_parameters() if n.startswith("trunks.0.stages.")}
    assert names == {f"stages.{s}.{b}" for s in range(3) for b in range(3)}
    x = torch.randn(8, 7, 16, 16)
    z = m(x)
    (z[:4] - z[4:]).pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_spatial_size_halves_between_stages() -> None:
    m = _model(stages=3)
    h = m.trunks[0].stem(torch.randn(2, 7, 16, 16))
    sizes = []
    for stage in m.trunks[0].stages:
        h = stage(h)
        sizes.append(tuple(h.shape[1:]))
    assert sizes == [(8, 16, 16), (16, 8, 8), (32, 4, 4)]


def test_save_load_round_trip_gives_identical_embeddings(tmp_path: Path) -> None:
    specs = fixture_specs()
    m = _model()
    m.train()
    m(torch.randn(16, 7, 8, 8))  # move BatchNorm running stats off their defaults
    m.eval()
    meta = M.make_metadata(
        specs, 8, 10.0, {"width": 8, "stages": 3, "blocks_per_stage": 2}, TrainConfig(seed=3, epochs=4)
    )
    path = tmp_path / "model" / "model.pt"
    saved = M.save(path, m, meta)
    assert os.listdir(path.parent) == ["model.pt"]  # no temp file left behind
    m2, meta2 = M.load(path)
    assert not m2.training
    assert meta2 == saved
    # the version is a 12-hex-digit hash of the weights and metadata, recomputed alike from the loaded model
    assert re.fullmatch(r"[0-9a-f]{12}", meta2["model_version"]), meta2["model_version"]
    assert M.model_version(m2.state_dict(), meta2) == meta2["model_version"]
    assert M.model_version(m2.state_dict(), {**meta2, "patch_km": 11.0}) != meta2["model_version"]
    assert meta2["layers"]["landcover"] == specs["landcover"].to_dict()
    assert meta2["patch_px"] == 8 and meta2["patch_km"] == 10.0 and meta2["embedding_dim"] == 16
    assert meta2["architecture"] == {**ModelConfig().model_dump(), "width": 8, "stages": 3, "blocks_per_stage": 2}
    assert meta2["train"] == TrainConfig(seed=3, epochs=4).model_dump(mode="json")
    assert meta2["library_version"] == vectorgeo.__version__
    rng = np.random.default_rng(1)
    batch = {
        "landcover": rng.integers(0, 5, (6, 8, 8)).astype(np.uint8),
        "elevation": rng.normal(300, 100, (6, 8, 8)).astype(np.float32),
    }
    with torch.no_grad():
        assert torch.equal(m(M.encode(batch, specs)), m2(M.encode(batch, meta2)))
    # the version depends on the weights
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    assert M.save(tmp_path / "other.pt", m, meta)["model_version"] != saved["model_version"]


def test_load_rejects_missing_corrupt_and_foreign_files(tmp_path: Path) -> None:
    m = _model()
    meta = M.make_metadata(fixture_specs(), 8, 10.0, {"width": 8, "stages": 3, "blocks_per_stage": 2})
    good = tmp_path / "model.pt"
    M.save(good, m, meta)
    with pytest.raises(DataError, match="does not exist") as e:
        M.load(tmp_path / "nope.pt")
    assert "nope.pt" in str(e.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a model" * 10)
    with pytest.raises(DataError, match=r"garbage\.pt"):
        M.load(garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match=r"truncated\.pt"):
        M.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(DataError, match="not a vectorgeo model"):
        M.load(foreign)
    payload = torch.load(good, weights_only=True)
    payload["state_dict"]["head.2.bias"] += 1.0
    tampered = tmp_path / "tampered.pt"
    torch.save(payload, tampered)
    with pytest.raises(DataError, match="model_version"):
        M.load(tampered)
    payload = torch.load(good, weights_only=True)
    payload["metadata"]["architecture"]["width"] = 16
    wrong = tmp_path / "wrong.pt"
    torch.save(payload, wrong)
    with pytest.raises(DataError, match="do not match"):
        M.load(wrong)


def test_check_layers_names_the_layer_at_fault() -> None:
    specs = fixture_specs()
    meta = M.make_metadata(specs, 8, 10.0, None)
    assert list(M.check_layers(meta, specs, patch_px=8, patch_km=10.0)) == ["landcover", "elevation"]
    with pytest.raises(ConfigError, match="elevation") as e:
        M.check_layers(meta, {"landcover": specs["landcover"]})
    assert e.value.key == "layers.elevation"
    other = fixture_specs("standardize")
    with pytest.raises(ConfigError, match="normalize") as e:
        M.check_layers(meta, other)
    assert e.value.key == "layers.elevation"
    meta_one = M.make_metadata({"landcover": specs["landcover"]}, 8, 10.0, None)
    with pytest.raises(ConfigError) as e:
        M.check_layers(meta_one, specs)
    assert e.value.key == "layers.elevation"
    assert list(M.check_layers(meta_one, specs, allow_extra=True)) == ["landcover"]
    with pytest.raises(ConfigError) as e:
        M.check_layers(meta, specs, patch_px=16)
    assert e.value.key == "sample.patch_px"
    with pytest.raises(ConfigError) as e:
        M.check_layers(meta, specs, patch_km=20.0)
    assert e.value.key == "sample.patch_km"


def test_architecture_rejects_bad_values() -> None:
    with pytest.raises(ConfigError) as e:
        M.architecture({"stages": 0})
    assert e.value.key == "model.stages"
    assert M.architecture({}) == ModelConfig()
    assert M.architecture({"width": 4}).width == 4


def test_multi_band_both_and_scales_channels() -> None:
    rgb = LayerSpec.from_config(
        "rgb",
        {"kind": "continuous", "source": "x.tif", "bands": ["r", "g"], "normalize": "both",
         "mean": [10.0, 20.0], "std": [2.0, 4.0]},
    )  # fmt: skip
    specs = {"rgb": rgb}
    assert M.channel_names(specs, 2) == [
        "rgb:r:relief", "rgb:r:level", "rgb:g:relief", "rgb:g:level", "rgb:valid",
        "rgb@1:r:relief", "rgb@1:r:level", "rgb@1:g:relief", "rgb@1:g:level", "rgb@1:valid",
    ]  # fmt: skip
    v = np.array([[[[10.0, 20.0], [14.0, 28.0]], [[12.0, NAN], [10.0, 24.0]]]], np.float32)  # (1, 2, 2, 2 bands)
    x = M.encode({"rgb": v, "rgb@1": np.full((1, 2, 2, 2), 10.0, np.float32)}, specs).numpy()
    assert x.shape == (1, 10, 2, 2)
    np.testing.assert_allclose(x[0, 0], [[0.0, 1.0], [0.0, 0.0]])  # r relief: min 10, max 14; (1,0) invalid
    np.testing.assert_allclose(x[0, 1], [[0.0, 2.0], [0.0, 0.0]])  # r level: (v - 10) / 2
    np.testing.assert_allclose(x[0, 3], [[0.0, 2.0], [0.0, 1.0]])  # g level: (v - 20) / 4
    np.testing.assert_allclose(x[0, 4], [[1, 1], [0, 1]])  # valid where every band is finite
    np.testing.assert_allclose(x[0, 5:], [np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)),
                                          np.full((2, 2), -2.5), np.ones((2, 2))])  # fmt: skip
    # the model splits the channels by scale: one trunk each
    m = M.build_model(specs, ModelConfig(width=4, stages=1, blocks_per_stage=1, embedding_dim=3), n_scales=2)
    assert [t.stem[0].in_channels for t in m.trunks] == [5, 5]
    assert tuple(m(torch.from_numpy(np.repeat(x, 3, axis=0))).shape) == (3, 3)


def test_one_hot_is_the_same_from_uint8_and_from_wider_indices() -> None:
    # uint8 class maps on the CPU take the comparison path, other dtypes (and devices) the scatter path
    specs = fixture_specs("standardize")
    rng = np.random.default_rng(3)
    lc = rng.integers(0, 7, (4, 5, 5)).astype(np.uint8)
    lc[0, 0, 0] = 255
    el = rng.normal(500.0, 300.0, (4, 5, 5)).astype(np.float32)
    a = M.encode({"landcover": lc, "elevation": el}, specs)
    b = M.encode({"landcover": torch.from_numpy(lc.astype(np.int64)), "elevation": el}, specs)
    assert torch.equal(a, b)
    assert a[:, :5].sum(dim=1).max() == 1 and a[0, :5, 0, 0].sum() == 0  # nodata and 5, 6: no class
    assert a[:, :5].sum() == int((lc < 5).sum())
