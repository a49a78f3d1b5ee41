"""The land-cell stencil against h3's own enumeration and an independent land estimate."""

from __future__ import annotations

import json

import h3
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from vectorgeo.sampling import uniform_points
from vectorgeo.stencil import digest_cells, extent_bbox, iter_land_cells, write_stencil


def test_stencil_matches_h3_enumeration(land_mask) -> None:  # type: ignore[no-untyped-def]
    """At res 3: the stencil equals h3's own cell list filtered by the mask at h3's own centroids."""
    all_cells = [c for r0 in h3.get_res0_cells() for c in h3.cell_to_children(r0, 3)]
    assert len(all_cells) == h3.get_num_cells(3)
    lat = np.array([h3.cell_to_latlng(c)[0] for c in all_cells])
    lng = np.array([h3.cell_to_latlng(c)[1] for c in all_cells])
    land = land_mask.values_at(lat, lng)
    expected = np.sort(
        np.array([h3.str_to_int(c) for c, ok in zip(all_cells, land, strict=True) if ok], dtype=np.uint64)
    )
    got = np.sort(np.concatenate([c for c, *_ in iter_land_cells(land_mask, 3, 0)]))
    assert np.array_equal(got, expected)


def test_pruning_never_loses_land(land_mask) -> None:  # type: ignore[no-untyped-def]
    stats_p: dict[str, int] = {}
    stats_f: dict[str, int] = {}
    pruned = np.concatenate([c for c, *_ in iter_land_cells(land_mask, 5, 1, 3, stats=stats_p)])
    full = np.concatenate([c for c, *_ in iter_land_cells(land_mask, 5, 1, 3, prune=False, stats=stats_f)])
    assert np.array_equal(np.sort(pruned), np.sort(full))
    assert stats_f["cells_scanned"] == h3.get_num_cells(5)
    assert stats_p["cells_scanned"] < 0.5 * stats_f["cells_scanned"]


def test_land_fraction_agrees_with_sphere_sampling(land_mask) -> None:  # type: ignore[no-untyped-def]
    stats: dict[str, int] = {}
    for _ in iter_land_cells(land_mask, 5, 0, stats=stats):
        pass
    frac = stats["land_cells"] / h3.get_num_cells(5)
    lat, lng = uniform_points(np.random.default_rng(0), 1_000_000)
    sphere = land_mask.values_at(lat, lng).mean()
    assert abs(frac - sphere) < 0.01
    assert 0.2 < frac < 0.35


def test_write_stencil_regions_and_manifest(tmp_path, land_mask) -> None:  # type: ignore[no-untyped-def]
    r = write_stencil(land_mask, tmp_path / "regions", 4, 1, 2, manifest_path=tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["resolution"] == 4 and manifest["regions"] == r["regions"]
    table = ds.dataset(tmp_path / "regions").to_table()
    assert table.num_rows == r["land_cells"] == sum(v["cells"] for v in manifest["regions"].values())
    assert table.schema.field("h3").type == "uint64"
    cells = table.column("h3").to_numpy()
    assert len(np.unique(cells)) == len(cells)
    for name, info in list(manifest["regions"].items())[:20]:
        t = pq.read_table(tmp_path / "regions" / f"{name}.parquet")
        c = t.column("h3").to_numpy()
        assert np.all(np.diff(c.astype(np.int64)) > 0)  # sorted, unique
        assert digest_cells(c) == info["digest"] and len(c) == info["cells"]
        # every region is the true parent of its cells, and lat/lng are the centroids
        for cell, region, lat, lng in list(
            zip(c, t.column("region").to_numpy(), t.column("lat").to_numpy(), t.column("lng").to_numpy(), strict=True)
        )[:50]:
            s = h3.int_to_str(int(cell))
            assert h3.cell_to_parent(s, 1) == h3.int_to_str(int(region)) == name
            assert np.allclose(h3.cell_to_latlng(s), (lat, lng))


def test_extent_bbox_and_regions(tmp_path, land_mask) -> None:  # type: ignore[no-untyped-def]
    bbox = {"bbox": [5.0, 44.0, 12.0, 48.0]}
    r = write_stencil(land_mask, tmp_path / "a", 5, 2, 3, extent=bbox, manifest_path=tmp_path / "a.json")
    t = ds.dataset(tmp_path / "a").to_table()
    lat, lng = t.column("lat").to_numpy(), t.column("lng").to_numpy()
    every = [(c, la, ln) for c, la, ln, _ in iter_land_cells(land_mask, 5, 2, prune=False)]
    cells = np.concatenate([c for c, _, _ in every])
    la_all = np.concatenate([la for _, la, _ in every])
    ln_all = np.concatenate([ln for _, _, ln in every])
    inside = (la_all >= 44) & (la_all <= 48) & (ln_all >= 5) & (ln_all <= 12)
    assert np.array_equal(np.sort(t.column("h3").to_numpy()), np.sort(cells[inside]))
    assert r["land_cells"] == inside.sum() > 500
    assert lat.min() >= 44 and lat.max() <= 48 and lng.min() >= 5 and lng.max() <= 12
    # an antimeridian-crossing bbox (Fiji)
    r2 = write_stencil(
        land_mask,
        tmp_path / "b",
        5,
        1,
        3,
        extent={"bbox": [177.0, -19.0, -179.0, -16.0]},
        manifest_path=tmp_path / "b.json",
    )
    lng2 = ds.dataset(tmp_path / "b").to_table().column("lng").to_numpy()
    assert r2["land_cells"] > 50 and ((lng2 >= 177) | (lng2 <= -179)).all()
    # a list of regions: exactly those regions' land cells
    regions = sorted(r["regions"])[:2]
    r3 = write_stencil(
        land_mask, tmp_path / "c", 5, 2, 3, extent={"regions": regions}, manifest_path=tmp_path / "c.json"
    )
    assert sorted(r3["regions"]) == regions
    t3 = ds.dataset(tmp_path / "c").to_table()
    assert set(t3.column("region").to_numpy()) == {h3.str_to_int(x) for x in regions}
    w, s, e, n = extent_bbox({"regions": regions})  # type: ignore[misc]
    assert w < e and s < n


def test_read_region_checks_its_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A region file reads back in the stencil's types; a bad one names the file and what was expected."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from vectorgeo.errors import DataError
    from vectorgeo.stencil import STENCIL_SCHEMA, read_region

    good = tmp_path / "good.parquet"
    cells = np.array([h3.str_to_int(c) for c in h3.get_res0_cells()[:3]], dtype=np.uint64)
    # int64 lat/lng and an extra column: cast to the stencil's types, extra column dropped
    pq.write_table(pa.table({"h3": cells, "lat": [1, 2, 3], "lng": [4, 5, 6], "region": cells, "x": [0, 0, 0]}), good)
    t = read_region(good)
    assert t.schema == STENCIL_SCHEMA and t.column("lat").to_pylist() == [1.0, 2.0, 3.0]
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"h3": cells, "lat": [1.0, 2.0, 3.0]}), missing)
    with pytest.raises(DataError, match=r"missing\.parquet.*lng"):
        read_region(missing)
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"h3": ["a", "b", "c"], "lat": [1.0] * 3, "lng": [1.0] * 3, "region": cells}), wrong)
    with pytest.raises(DataError, match=r"wrong\.parquet.*expected stencil columns"):
        read_region(wrong)
    notparquet = tmp_path / "x.parquet"
    notparquet.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"x\.parquet"):
        read_region(notparquet)
