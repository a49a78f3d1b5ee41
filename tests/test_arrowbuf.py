from __future__ import annotations

import subprocess
import sys
import textwrap

import h3
import numpy as np
import pyarrow as pa
import pytest

from vectorgeo import arrowbuf


def test_column_numpy_reads_chunks_slices_and_falls_back_for_nulls() -> None:
    a = pa.chunked_array([pa.array(np.arange(5, dtype=np.uint64)), pa.array(np.arange(10, 13, dtype=np.uint64))])
    assert arrowbuf.column_numpy(a, np.uint64).tolist() == [0, 1, 2, 3, 4, 10, 11, 12]
    sliced = pa.array(np.linspace(0, 1, 6)).slice(2, 3)
    assert arrowbuf.column_numpy(sliced, np.float64).tolist() == pytest.approx([0.4, 0.6, 0.8])
    with_null = pa.array([1.0, None, 3.0])
    got = arrowbuf.column_numpy(with_null, np.float64)
    assert got[0] == 1.0 and np.isnan(got[1]) and got[2] == 3.0
    assert arrowbuf.column_numpy(pa.chunked_array([], pa.int64()), np.int64).shape == (0,)


def test_builders_match_pa_array() -> None:
    v = np.array([3.5, -1.0, 2.25], dtype=np.float32)
    assert arrowbuf.primitive(v, pa.float32()).equals(pa.array(v))
    with pytest.raises(ValueError, match="32-bit"):
        arrowbuf.primitive(np.arange(3, dtype=np.int64), pa.float32())
    m = np.array([True, False, True, True, False, False, True, False, True])
    assert arrowbuf.bools(m).equals(pa.array(m))
    assert arrowbuf.strings(["ok", "nodata", "", "é"]).equals(pa.array(["ok", "nodata", "", "é"]))
    assert arrowbuf.repeated_string("ff77fc07a4b3", 4).equals(pa.array(["ff77fc07a4b3"] * 4))
    assert arrowbuf.repeated_string("", 2).equals(pa.array(["", ""]))
    assert arrowbuf.repeated_string("x", 0).equals(pa.array([], pa.string()))


def test_hex_cells_are_h3_strings() -> None:
    cells = np.array([h3.str_to_int(c) for c in ("8021fffffffffff", "85283473fffffff", "8f2830828052d25")], np.uint64)
    got = arrowbuf.hex_cells(cells)
    assert got is not None and got.to_pylist() == [h3.int_to_str(int(c)) for c in cells]
    assert arrowbuf.hex_cells(np.array([], np.uint64)).to_pylist() == []  # type: ignore[union-attr]
    assert arrowbuf.hex_cells(np.array([0xF000000000000000], np.uint64)) is None  # not a cell: general path


def test_writing_and_reading_a_region_does_not_import_pandas(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # pandas costs every embed job ~0.2 s of start-up; the region file path must not pull it in
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        from vectorgeo import arrowbuf, geoparquet
        cells = np.array([0x8021fffffffffff, 0x8023fffffffffff], np.uint64)
        lat, lng = np.array([60.0, 61.0]), np.array([10.0, 11.0])
        status = pa.DictionaryArray.from_arrays(
            arrowbuf.primitive(np.array([0, 1], np.int8), pa.int8()), arrowbuf.strings(["ok", "nodata"])
        ).cast(pa.string())
        path = r"{tmp_path / "r.parquet"}"
        emb = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
        geoparquet.write_region(path, cells, lat, lng, emb, status, "m1", valid=np.array([True, False]))
        t = pq.ParquetFile(path).read(columns=["h3", "lat"])
        assert arrowbuf.column_numpy(t.column("h3"), np.uint64).tolist() == cells.tolist()
        print("pandas" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
