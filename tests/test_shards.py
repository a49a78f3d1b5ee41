"""Streaming sample shards (vectorgeo.shards): headers-only validation, chunked reads, bounded groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_shards import fixture_specs, make_shard, write_shards

from vectorgeo.errors import DataError
from vectorgeo.shards import concat_shards, iter_chunks, read_shard, shard_info, stream_groups

PX = 8


def test_streamed_groups_hold_every_triplet_once_in_bounded_chunks(tmp_path: Path) -> None:
    specs = fixture_specs()
    paths = write_shards(tmp_path, n_shards=5, per_shard=70, patch_px=PX, seed=3)
    infos = [shard_info(p, specs, PX, 10.0) for p in paths]
    assert [i.n for i in infos] == [70] * 5
    whole = concat_shards([read_shard(p, specs, PX, 10.0) for p in paths])
    rows = 16
    groups = list(stream_groups(infos, specs, np.random.default_rng(0), 2, chunk_bytes=rows * infos[0].triplet_bytes))
    assert max(len(g["anchor_latlng"]) for g in groups) <= 2 * rows  # memory: two chunks of 16 triplets
    streamed = {k: np.concatenate([g[k] for g in groups]) for k in whole}
    # the same triplets, each once: match rows by their anchor position
    order_w = np.lexsort(whole["anchor_latlng"].T)
    order_s = np.lexsort(streamed["anchor_latlng"].T)
    for k in whole:
        assert np.array_equal(whole[k][order_w], streamed[k][order_s], equal_nan=True), k
    # another epoch visits the shards in another order
    again = list(stream_groups(infos, specs, np.random.default_rng(1), 2, chunk_bytes=rows * infos[0].triplet_bytes))
    assert not np.array_equal(groups[0]["anchor_latlng"], again[0]["anchor_latlng"])


def test_chunks_are_checked_as_they_are_read(tmp_path: Path) -> None:
    specs = fixture_specs()
    arrays = make_shard(specs, 40, PX)
    arrays["distant_landcover"][35, 0, 0] = 9  # in the last chunk
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    info = shard_info(bad, specs, PX, 10.0)  # the headers are fine
    chunks = iter_chunks(info, specs, rows=10)
    for _ in range(3):
        next(chunks)
    with pytest.raises(DataError, match="'distant_landcover' has class index 9"):
        next(chunks)


def test_headers_are_checked_without_reading_patches(tmp_path: Path) -> None:
    specs = fixture_specs()
    arrays = make_shard(specs, 8, PX)
    arrays["neighbor_elevation"] = arrays["neighbor_elevation"][:5]
    short = tmp_path / "short.npz"
    np.savez(short, **arrays)
    with pytest.raises(DataError, match="'neighbor_elevation' has 5 patches, other keys 8"):
        shard_info(short, specs, PX)
    with pytest.raises(DataError, match="patch size is 8 px"):
        shard_info(write_shards(tmp_path / "px", 1, 8, PX)[0], specs, 16)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00 not a zip" * 50)
    with pytest.raises(DataError, match="not a readable npz"):
        shard_info(garbage, specs)
