"""The vectorised MVT encoder (vectorgeo.mvt), decoded by mapbox-vector-tile (an independent decoder)."""

from __future__ import annotations

import mapbox_vector_tile
import numpy as np
import pytest

from vectorgeo import mvt


def decode(data: bytes) -> dict:
    return mapbox_vector_tile.decode(data, default_options={"y_coord_down": True})


def shoelace(ring: list[list[int]]) -> float:
    xy = np.array(ring, dtype=float)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def test_varints_match_protobuf() -> None:
    values = np.array([0, 1, 127, 128, 300, 16383, 16384, 2**32, 2**63 + 5], dtype=np.uint64)
    want = b""
    for v in values.tolist():
        while True:
            byte = v & 0x7F
            v >>= 7
            want += bytes([byte | (0x80 if v else 0)])
            if not v:
                break
    assert mvt.varints(values) == want
    assert mvt.varints(np.zeros(0, dtype=np.uint64)) == b""
    assert mvt.zigzag(np.array([0, -1, 1, -2, 2])).tolist() == [0, 1, 2, 3, 4]


def test_polygons_round_trip() -> None:
    rng = np.random.default_rng(3)
    m = 300
    nv = rng.integers(3, 9, m)  # hexagons, pentagons and more (cells with distortion vertices)
    centres = rng.uniform(-200, 4300, (m, 2))
    rings = []
    for c, k in zip(centres, nv, strict=True):
        t = np.sort(rng.uniform(0, 2 * np.pi, k))
        if rng.random() < 0.5:
            t = t[::-1]  # half of them in the other winding order
        rings.append(np.column_stack([c[0] + 30 * np.cos(t), c[1] + 30 * np.sin(t)]))
    xy = np.concatenate(rings)
    offsets = np.concatenate([[0], np.cumsum(nv)])
    h3 = np.array([f"{i:015x}" for i in range(m)])
    score = rng.random(m).astype(np.float32)
    data = mvt.encode_polygons("scores", xy, offsets, {"h3": h3, "score": score})
    layer = decode(data)["scores"]
    assert layer["extent"] == 4096 and layer["version"] == 2
    feats = layer["features"]
    assert len(feats) == m
    for i, f in enumerate(feats):
        assert f["properties"]["h3"] == h3[i]
        assert f["properties"]["score"] == pytest.approx(float(score[i]))
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1]
        assert shoelace(ring) > 0  # exterior rings have a positive area in tile coordinates (y down)
        got = {tuple(p) for p in ring[:-1]}
        assert got == {tuple(p) for p in np.rint(rings[i]).astype(int).tolist()}


def test_degenerate_rings_are_dropped() -> None:
    xy = np.array([[5, 5], [5, 5], [5, 5], [0, 0], [10, 0], [0, 10], [1, 1], [2, 2], [3, 3]])
    offsets = np.array([0, 3, 6, 9])
    data = mvt.encode_polygons("l", xy, offsets, {"score": np.array([0.1, 0.2, 0.3], dtype=np.float32)})
    feats = decode(data)["l"]["features"]
    assert [f["properties"]["score"] for f in feats] == [pytest.approx(0.2)]
    assert mvt.encode_polygons("l", xy[:3], offsets[:2], {}) == b""
    assert mvt.encode_polygons("l", np.zeros((0, 2)), np.zeros(1, dtype=int), {}) == b""


def test_properties_must_be_floats_or_fixed_strings() -> None:
    xy = np.array([[0, 0], [10, 0], [0, 10], [0, 0], [10, 0], [0, 10]])
    offsets = np.array([0, 3, 6])
    with pytest.raises(ValueError, match="same length"):
        mvt.encode_polygons("l", xy, offsets, {"h3": np.array(["abc", "ab"])})
    with pytest.raises(ValueError, match="floats"):
        mvt.encode_polygons("l", xy, offsets, {"n": np.array([1, 2])})
