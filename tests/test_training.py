"""Tests of vectorgeo.training on tiny synthetic shards with a known answer."""

from __future__ import annotations

import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_shards import fixture_specs, make_shard, write_shards

from vectorgeo import model as M
from vectorgeo import training as T
from vectorgeo.config import ModelConfig, TrainConfig, section
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.shards import read_shard

ARCH = ModelConfig(width=8, stages=2, blocks_per_stage=2, embedding_dim=8, head_hidden=16)
PX = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=3, per_shard=96, patch_px=PX)


def _train(shards: list[Path], out: Path, **train_cfg: Any) -> dict[str, Any]:
    cfg = {"epochs": 3, "batch_size": 32, "lr": 0.003, "seed": 0, "device": "cpu", **train_cfg}
    return T.train(
        shards,
        fixture_specs(),
        PX,
        10.0,
        ARCH,
        section(TrainConfig, cfg, "train"),
        out / "model.pt",
        out / "metrics.json",
        out / "training.png",
        threads=1,
        progress=False,
    )


def test_loss_decreases_and_outputs_are_complete(shards: list[Path], tmp_path: Path) -> None:
    metrics = _train(shards, tmp_path, epochs=4, patience=4)
    losses = [e["train_loss"] for e in metrics["epochs"]]
    assert len(losses) == 4
    assert losses[-1] < 0.5 * losses[0]
    assert metrics["best_val_triplet_accuracy"] >= 0.9  # anchor/neighbor share a pattern, distant does not
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(on_disk["epochs"][0]) == {"epoch", "train_loss", "val_loss", "val_triplet_accuracy"}
    assert on_disk["best_val_triplet_accuracy"] == max(e["val_triplet_accuracy"] for e in on_disk["epochs"])
    assert 1 <= on_disk["pca_components_99"] <= ARCH.embedding_dim
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, meta = M.load(tmp_path / "model.pt")
    assert meta["model_version"] == metrics["model_version"]
    assert meta["train"]["margin"] == 0.5 and meta["train"]["seed"] == 0
    assert meta["patch_px"] == PX and meta["patch_km"] == 10.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model.pt", "training.png"]


@pytest.mark.cuda
def test_training_on_cuda_gives_a_model_that_loads_on_cpu(shards: list[Path], tmp_path: Path) -> None:
    metrics = _train(shards, tmp_path, epochs=2, patience=2, device="cuda")
    assert len(metrics["epochs"]) == 2 and all(np.isfinite(e["train_loss"]) for e in metrics["epochs"])
    assert metrics["epochs"][-1]["train_loss"] < metrics["epochs"][0]["train_loss"]
    module, meta = M.load(tmp_path / "model.pt", map_location="cpu")
    assert meta["model_version"] == metrics["model_version"]
    assert all(p.device.type == "cpu" for p in module.parameters())


def test_best_weights_are_restored_after_early_stopping(shards: list[Path], tmp_path: Path) -> None:
    metrics = _train(shards, tmp_path, epochs=30, patience=2, lr=0.01)
    assert metrics["stopped_early"]
    assert len(metrics["epochs"]) < 30
    assert len(metrics["epochs"]) == metrics["best_epoch"] + 2
    module, meta = M.load(tmp_path / "model.pt")
    val = read_shard(shards[-1], fixture_specs(), PX).arrays
    ctx = T.StepContext(M.specs_of(meta), torch.device("cpu"), 0.5, 1.0)
    loss, acc, _ = T.evaluate(module, val, ctx)
    assert acc == metrics["best_val_triplet_accuracy"]
    assert loss == pytest.approx(metrics["best_val_loss"], abs=1e-6)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_same_config_and_shards_give_identical_weights(shards: list[Path], tmp_path: Path) -> None:
    a = _train(shards, tmp_path / "a", epochs=2)
    b = _train(shards, tmp_path / "b", epochs=2)
    c = _train(shards, tmp_path / "c", epochs=2, seed=1)
    sa, sb, sc = (_state(tmp_path / d / "model.pt") for d in "abc")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["model_version"] == b["model_version"]
    assert a["epochs"] == b["epochs"]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert c["model_version"] != a["model_version"]


def test_streaming_shards_through_bounded_memory(tmp_path: Path) -> None:
    paths = write_shards(tmp_path / "s", n_shards=4, per_shard=48, patch_px=PX, seed=5)
    m1 = _train(paths, tmp_path / "a", epochs=2, shards_in_memory=1)
    m2 = _train(paths, tmp_path / "b", epochs=2, shards_in_memory=1)
    assert m1["train_triplets"] == 3 * 48 and m1["val_triplets"] == 48
    assert m1["model_version"] == m2["model_version"]


def test_batches_mix_shards_and_cover_every_triplet() -> None:
    arrays = {"k": np.arange(100)}
    seen = [b["k"] for b in T.iterate_batches(arrays, 32, np.random.default_rng(0))]
    assert sorted(np.concatenate(seen).tolist()) == list(range(100))
    assert [len(s) for s in seen] == [32, 32, 32, 4]
    assert not np.array_equal(np.concatenate(seen), np.arange(100))  # shuffled across shard boundaries


def test_too_few_shards_names_the_key(shards: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _train(shards[:1], tmp_path)
    assert e.value.key == "train.val_shards"


def test_bad_train_config_names_the_key(shards: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        _train(shards, tmp_path, batch_size=0)
    assert e.value.key == "train.batch_size"
    with pytest.raises(ConfigError) as e:
        _train(shards, tmp_path, device="tpu")
    assert e.value.key == "train.device"


# --- bad shards ---------------------------------------------------------------------------------


def _save(path: Path, arrays: dict[str, Any]) -> Path:
    np.savez(path, **arrays)
    return path


def _expect(path: Path, pattern: str, specs: Any = None, px: int | None = PX) -> DataError:
    with pytest.raises(DataError) as e:
        read_shard(path, specs or fixture_specs(), px, 10.0)
    assert e.value.path == str(path)
    assert str(path) in str(e.value)
    assert re.search(pattern, str(e.value)), str(e.value)
    return e.value


def test_shard_from_other_layer_set_is_rejected(tmp_path: Path) -> None:
    only_lc = {"landcover": fixture_specs()["landcover"]}
    p = _save(tmp_path / "shard-0.npz", make_shard(only_lc, 8, PX))
    _expect(p, r"layer set differs.*missing \['elevation'\]")
    q = _save(tmp_path / "shard-1.npz", make_shard(fixture_specs(), 8, PX))
    _expect(q, r"not in config \['elevation'\]", specs=only_lc)


def test_shard_with_other_patch_size_is_rejected(tmp_path: Path) -> None:
    p = _save(tmp_path / "shard-0.npz", make_shard(fixture_specs(), 8, 16))
    _expect(p, r"patch size is 16 px.*sample\.patch_px is 8")


def test_shard_with_other_encoding_is_rejected(tmp_path: Path) -> None:
    p = _save(tmp_path / "shard-0.npz", make_shard(fixture_specs("standardize"), 8, PX))
    _expect(p, r"layer 'elevation' was sampled with other settings.*normalize")


def test_empty_and_corrupt_shards_are_rejected(tmp_path: Path) -> None:
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    _expect(empty, "empty")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01 not a zip" * 100)
    _expect(garbage, "not a readable npz")
    good = _save(tmp_path / "good.npz", make_shard(fixture_specs(), 64, PX))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _expect(truncated, "not a readable npz")
    zero = _save(tmp_path / "zero.npz", make_shard(fixture_specs(), 0, PX))
    _expect(zero, r"empty \(0 triplets\)")
    _expect(tmp_path / "missing.npz", "does not exist")


def test_shard_with_bad_values_is_rejected(tmp_path: Path) -> None:
    arrays = make_shard(fixture_specs(), 8, PX)
    arrays["distant_landcover"][0, 0, 0] = 9
    _expect(
        _save(tmp_path / "a.npz", arrays), r"'distant_landcover' has class index 9; layer 'landcover' has 5 classes"
    )
    arrays = make_shard(fixture_specs(), 8, PX)
    arrays["anchor_landcover"] = arrays["anchor_landcover"].astype(np.float32)
    _expect(_save(tmp_path / "b.npz", arrays), r"'anchor_landcover' is float32; expected uint8")
    arrays = make_shard(fixture_specs(), 8, PX)
    arrays["neighbor_elevation"] = arrays["neighbor_elevation"][:5]
    _expect(_save(tmp_path / "c.npz", arrays), r"'neighbor_elevation' has 5 patches, other keys 8")
    arrays = make_shard(fixture_specs(), 8, PX)
    del arrays["distant_elevation"]
    _expect(_save(tmp_path / "d.npz", arrays), r"key 'distant_elevation' is missing")


def test_training_stops_on_a_bad_shard_before_training(shards: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "shard-9.npz"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("anchor_landcover.npy", b"garbage")
    with pytest.raises(DataError, match=re.escape(str(bad))):
        _train([shards[0], bad, shards[2]], tmp_path / "out")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_pca_components() -> None:
    rng = np.random.default_rng(0)
    x = np.zeros((500, 8))
    x[:, :3] = rng.normal(size=(500, 3)) * [10, 5, 3]
    assert T.pca_components(x) == 3
    assert T.pca_components(np.ones((10, 4))) == 0


def test_background_loader_keeps_order_and_reraises_errors() -> None:
    pre = T._Prefetcher(iter(range(50)), depth=3, transform=lambda i: i * 2)
    assert list(pre) == [2 * i for i in range(50)]
    pre.close()

    def failing() -> Any:
        yield 1
        raise DataError("shard-3.npz", "broken")

    pre = T._Prefetcher(failing(), depth=2)
    with pytest.raises(DataError, match="shard-3"):
        list(pre)
    pre.close()
    stopped = T._Prefetcher(iter(range(10**6)), depth=2)
    next(iter(stopped))
    stopped.close()  # a consumer that stops early does not leave the thread blocked
    assert not stopped._thread.is_alive()


@pytest.mark.parametrize(
    ("objective", "reconstruction"),
    [("triplet", 0.0), ("triplet", 1.0), ("infonce", 0.0), ("infonce", 1.0), ("vicreg", 0.0), ("vicreg", 1.0)],
)
def test_every_objective_learns_multi_scale_triplets(tmp_path: Path, objective: str, reconstruction: float) -> None:
    """Anchor and neighbor share a place at both scales, the distant patch does not: every objective learns it."""
    paths = write_shards(tmp_path / "s", n_shards=2, per_shard=160, patch_px=PX, scales=(1.0, 4.0))
    m = T.train(
        paths, fixture_specs(), PX, 10.0, ARCH,
        section(TrainConfig, {"epochs": 3, "batch_size": 32, "lr": 0.003, "device": "cpu", "objective": objective,
                              "reconstruction": reconstruction}, "train"),
        tmp_path / "model.pt", threads=1, progress=False, scales=(1.0, 4.0),
    )  # fmt: skip
    assert m["objective"] == objective and all(np.isfinite(e["train_loss"]) for e in m["epochs"])
    assert m["best_val_triplet_accuracy"] > 0.8
    assert 1.0 < m["effective_rank"] <= ARCH.embedding_dim
    module, meta = M.load(tmp_path / "model.pt")
    assert meta["scales"] == [1.0, 4.0] and len(module.trunks) == 2
    assert meta["in_channels"] == 2 * M.input_channels(fixture_specs())


def test_shards_of_other_scales_are_refused(tmp_path: Path) -> None:
    paths = write_shards(tmp_path, n_shards=1, per_shard=8, patch_px=PX, scales=(1.0, 4.0))
    assert sorted(read_shard(paths[0], fixture_specs(), scales=(1.0, 4.0)).arrays)[:2] == [
        "anchor_elevation", "anchor_elevation@1"
    ]  # fmt: skip
    with pytest.raises(DataError, match="scales"):
        read_shard(paths[0], fixture_specs(), scales=(1.0, 8.0))


def test_effective_rank_catches_collapse() -> None:
    from vectorgeo.objectives import effective_rank

    rng = np.random.default_rng(0)
    assert effective_rank(torch.from_numpy(rng.normal(size=(2000, 8)))) > 7.5
    collapsed = np.outer(rng.normal(size=2000), rng.normal(size=8))
    assert effective_rank(torch.from_numpy(collapsed + 1e-9 * rng.normal(size=(2000, 8)))) < 1.1
