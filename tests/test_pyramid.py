"""The tile archive (vectorgeo.pyramid): PMTiles ids, vector tiles decoded against H3, rollups and colours,
and the API serving tiles from the archive."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import h3
import mapbox_vector_tile
import numpy as np
import pytest
from pmtiles.tile import zxy_to_tileid
from test_geoparquet import region_arrays

from vectorgeo import geoparquet as gp
from vectorgeo import mvt, pyramid, tiles
from vectorgeo.errors import DataError

# two res-0 regions at res 4 (one across the antimeridian), and a pentagon's
REGIONS = ["8027fffffffffff", h3.latlng_to_cell(66.0, 179.0, 0), "8009fffffffffff"]
MAX_FEATURES = 400


def test_tile_ids_follow_pmtiles() -> None:
    rng = np.random.default_rng(0)
    for z in range(12):
        x, y = rng.integers(0, 1 << z, 64), rng.integers(0, 1 << z, 64)
        assert pyramid.tile_ids(z, x, y).tolist() == [
            zxy_to_tileid(z, int(a), int(b)) for a, b in zip(x, y, strict=True)
        ]


def test_varints_and_zigzag() -> None:
    values = np.array([0, 1, 127, 128, 300, 2**32 - 1, 2**40], dtype=np.uint64)
    expected = b"".join(_varint(int(v)) for v in values)
    assert mvt.varints(values) == expected  # the encoder the archive uses
    assert mvt.zigzag(np.array([0, -1, 1, -2, 2147483647, -2147483648])).tolist() == [
        0,
        1,
        2,
        3,
        4294967294,
        4294967295,
    ]


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    d = tmp_path_factory.mktemp("pyramid")
    files, arrays = [], {}
    for i, r in enumerate(REGIONS):
        a = region_arrays(r, res=4, dim=16, seed=i)
        path = d / f"{r}_{i:012x}.parquet"
        gp.write_region(path, a["h3"], a["lat"], a["lng"], a["embedding"], a["status"], "mv-1", region=r)
        files.append(str(path))
        arrays[r] = a
    out = d / "cells.pmtiles"
    summary = pyramid.build_pyramid(files, out, MAX_FEATURES)
    return out, summary, arrays


def _decode(data: bytes) -> list[dict]:
    return mapbox_vector_tile.decode(gzip.decompress(data), default_options={"y_coord_down": True})["cells"]["features"]


def _tile_of(lat: float, lng: float, z: int) -> tuple[int, int]:
    n = 2**z
    return int((lng + 180) / 360 * n), int((1 - math.asinh(math.tan(math.radians(lat))) / math.pi) / 2 * n)


def test_archive_tiles_hold_every_cell_with_its_hexagon_and_colour(archive: tuple[Path, dict, dict]) -> None:
    path, summary, arrays = archive
    a = pyramid.Archive(path)
    assert a.metadata["model_version"] == "mv-1" and a.metadata["resolution"] == 4
    top = tiles.max_zoom(4, MAX_FEATURES)
    assert summary["max_zoom"] == a.header["max_zoom"] == top
    ok = {int(c): i for r in REGIONS for i, c in enumerate(arrays[r]["h3"]) if arrays[r]["status"][i] == "ok"}
    assert summary["cells"] == len(ok)
    pca = a.metadata["pca"]
    # every ok cell of a region away from the antimeridian, at the top zoom: in the tile of its centre,
    # its hexagon, its colour
    r = REGIONS[0]
    emb = {int(c): e for c, e in zip(arrays[r]["h3"], arrays[r]["embedding"], strict=True)}
    seen = set()
    for cell in list(ok)[:: max(1, len(ok) // 60)]:
        if cell not in emb:
            continue
        lat, lng = h3.cell_to_latlng(h3.int_to_str(cell))
        x, y = _tile_of(lat, lng, top)
        features = {f["properties"]["h3"]: f for f in _decode(a.tile(top, x, y))}
        f = features[h3.int_to_str(cell)]
        assert f["properties"]["res"] == 4 and f["properties"]["children"] == 1
        rgb = int(pyramid.colors(emb[cell][None, :].astype(np.float64), pca)[0])
        assert f["properties"]["color"] == f"#{rgb:06x}"
        ring = np.array(f["geometry"]["coordinates"][0][:-1], dtype=np.float64)
        # an exterior ring: positive surveyor's area in tile coordinates (y down), as MVT requires
        assert (ring[:, 0] * np.roll(ring[:, 1], -1) - np.roll(ring[:, 0], -1) * ring[:, 1]).sum() > 0
        n = 2**top
        lng_v = (x + ring[:, 0] / tiles.EXTENT) / n * 360 - 180
        lat_v = np.degrees(np.arctan(np.sinh(np.pi * (1 - 2 * (y + ring[:, 1] / tiles.EXTENT) / n))))
        want = np.array(h3.cell_to_boundary(h3.int_to_str(cell)))
        # the same vertices (as a set: the ring starts anywhere), within a tile pixel
        d = np.hypot(want[:, None, 0] - lat_v[None, :], want[:, None, 1] - lng_v[None, :]).min(axis=1)
        assert d.max() < 360 / n / tiles.EXTENT * 2, d
        seen.add(cell)
    assert len(seen) > 20


def test_low_zooms_show_rollups(archive: tuple[Path, dict, dict]) -> None:
    path, _, arrays = archive
    a = pyramid.Archive(path)
    features = _decode(a.tile(0, 0, 0))
    level = tiles.level_for_zoom(0, 4, MAX_FEATURES)
    assert {f["properties"]["res"] for f in features} == {level}
    ok = sum(int((arrays[r]["status"] == "ok").sum()) for r in REGIONS)
    # every loaded cell is under exactly one shown parent (the antimeridian region's parents appear twice)
    children = {f["properties"]["h3"]: f["properties"]["children"] for f in features}
    assert sum(children.values()) == ok
    assert a.tile(0, 0, 0) is not None and a.tile(tiles.max_zoom(4, MAX_FEATURES), 0, 0) is None


def test_tiles_cut_in_small_blocks_are_the_same(archive: tuple[Path, dict, dict], tmp_path: Path) -> None:
    """Cutting each zoom in blocks of a few cells (bounded memory) gives the same archive, byte for byte,
    across the antimeridian too."""
    path, summary, _ = archive
    files = [str(path.parent / f"{r}_{i:012x}.parquet") for i, r in enumerate(REGIONS)]
    out = tmp_path / "blocks.pmtiles"
    small = pyramid.build_pyramid(files, out, MAX_FEATURES, block_cells=7)
    assert small["tiles"] == summary["tiles"] > 100
    assert out.read_bytes() == path.read_bytes()


def test_no_region_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        pyramid.build_pyramid([], tmp_path / "x.pmtiles", MAX_FEATURES)


def test_api_serves_the_archive_of_the_active_version(loaded_region, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With an archive of the active model version, tiles and /meta come from it (no tile tables are built),
    and /tiles.pmtiles answers range requests; an archive of another version is not used."""
    import psycopg
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    lr = loaded_region
    status = np.where(lr.valid, "ok", "nodata")
    region_file = tmp_path / f"{lr.region}_000000000000.parquet"
    gp.write_region(region_file, lr.h3, lr.lat, lr.lng, lr.embedding, status, lr.model_version, region=lr.region)
    archive = tmp_path / "cells.pmtiles"
    pyramid.build_pyramid([str(region_file)], archive, MAX_FEATURES)

    def built() -> object:
        with psycopg.connect(lr.url, autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('vectorgeo_tiles') IS NULL").fetchone()[0]:
                return None
            return conn.execute("SELECT built_at FROM vectorgeo_tiles").fetchall()

    before = built()
    with TestClient(create_app(lr.url, tile_archive=archive)) as c:
        meta = c.get("/meta").json()
        assert meta["resolution"] == 5 and meta["tile_maxzoom"] == tiles.max_zoom(5, MAX_FEATURES)
        lat, lng = float(lr.lat[0]), float(lr.lng[0])
        z = meta["tile_maxzoom"]
        x, y = _tile_of(lat, lng, z)
        r = c.get(f"/tiles/{z}/{x}/{y}.pbf")
        assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
        cells = {f["properties"]["h3"] for f in mapbox_vector_tile.decode(r.content)["cells"]["features"]}
        assert cells and cells <= {h3.int_to_str(int(c)) for c in lr.h3}
        assert c.get("/tiles/0/0/0.pbf").status_code == 200
        part = c.get("/tiles.pmtiles", headers={"Range": "bytes=0-126"})
        assert part.status_code == 206 and part.content[:7] == b"PMTiles" and len(part.content) == 127
    assert built() == before  # no tile tables were built
    other = tmp_path / "other.pmtiles"
    gp.write_region(region_file, lr.h3, lr.lat, lr.lng, lr.embedding, status, "another-version", region=lr.region)
    pyramid.build_pyramid([str(region_file)], other, MAX_FEATURES)
    with TestClient(create_app(lr.url, tile_archive=other)) as c:
        assert c.get("/tiles.pmtiles").status_code == 404
        assert c.get("/tiles/0/0/0.pbf").status_code == 200  # from the database's tiles
