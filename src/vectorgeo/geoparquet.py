"""Per-region embedding files: the one GeoParquet 1.1 writer and reader.

A region file ``results/embeddings/{region}_{digest}.parquet`` holds one row per stencil cell of the
region, sorted by ``h3``:

============== ==================================== ===================================================
column         type                                 meaning
============== ==================================== ===================================================
h3             uint64                               H3 cell index
h3_str         string                               the same as 15 lowercase hex digits
lat, lng       float64                              cell centroid, degrees
geometry       binary (WKB Point, EPSG:4326)        the centroid as a point (x = lng, y = lat)
embedding      fixed_size_list<float32>[d], null    unit vector; null when the cell is unusable
status         string                               ``ok`` or why the embedding is null (e.g. ``nodata``)
model_version  string                               version of the model that made the embedding
============== ==================================== ===================================================

File metadata: ``geo`` (GeoParquet 1.1: primary column ``geometry``, WKB, Point, PROJJSON of
EPSG:4326, bbox) so that GeoPandas and DuckDB read the file as it is, and ``vectorgeo`` (JSON:
``format``, ``region``, ``model_version``, ``embedding_dim``, plus what the caller adds).

Public API: :func:`write_region` (atomic), :func:`read_region` (validating, raises
:class:`~vectorgeo.errors.DataError` naming the file and what is wrong), :class:`RegionData`,
:func:`point_wkb`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vectorgeo import arrowbuf
from vectorgeo.atomic import write_parquet_atomic
from vectorgeo.errors import DataError

FORMAT_VERSION = 1
STATUS_OK = "ok"
COLUMNS = ("h3", "h3_str", "lat", "lng", "geometry", "embedding", "status", "model_version")

# PROJJSON of EPSG:4326 (WGS 84). GeoParquet coordinates are always x = longitude, y = latitude.
EPSG_4326_PROJJSON: dict[str, Any] = {
    "$schema": "https://proj.org/schemas/v0.7/projjson.schema.json",
    "type": "GeographicCRS",
    "name": "WGS 84",
    "datum": {
        "type": "GeodeticReferenceFrame",
        "name": "World Geodetic System 1984",
        "ellipsoid": {"name": "WGS 84", "semi_major_axis": 6378137, "inverse_flattening": 298.257223563},
    },
    "coordinate_system": {
        "subtype": "ellipsoidal",
        "axis": [
            {"name": "Geodetic latitude", "abbreviation": "Lat", "direction": "north", "unit": "degree"},
            {"name": "Geodetic longitude", "abbreviation": "Lon", "direction": "east", "unit": "degree"},
        ],
    },
    "id": {"authority": "EPSG", "code": 4326},
}

_WKB_POINT = np.dtype([("order", "u1"), ("type", "<u4"), ("x", "<f8"), ("y", "<f8")])


def point_wkb(lng: np.ndarray, lat: np.ndarray) -> pa.BinaryArray:
    """WKB points (little endian, 21 bytes each) as an Arrow binary array, built without a Python loop."""
    n = len(lng)
    rec = np.empty(n, dtype=_WKB_POINT)
    rec["order"] = 1
    rec["type"] = 1
    rec["x"] = lng
    rec["y"] = lat
    offsets = np.arange(0, 21 * (n + 1), 21, dtype=np.int32)
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(rec.tobytes())])


def h3_strings(h3: np.ndarray) -> pa.Array:
    """15-digit lowercase hex strings of H3 indexes."""
    cells = arrowbuf.hex_cells(h3)
    if cells is not None:
        return cells
    from h3ronpy import cells_to_string

    return pa.array(cells_to_string(np.ascontiguousarray(h3, dtype=np.uint64))).cast(pa.string())


@dataclass
class RegionData:
    """The content of a region file.

    Attributes:
        path: The file it was read from (or will be written to).
        h3: uint64 (n,).
        lat: float64 (n,).
        lng: float64 (n,).
        embedding: float32 (n, d); rows where ``valid`` is False are zero.
        valid: bool (n,), False where the embedding is null.
        status: Arrow string array (n,).
        model_version: The single model version of the file.
        region: Region cell as a hex string, when the file metadata names it.
        metadata: The ``vectorgeo`` file metadata.
    """

    path: str
    h3: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    embedding: np.ndarray
    valid: np.ndarray
    status: pa.Array
    model_version: str
    region: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    def __len__(self) -> int:
        return int(self.h3.shape[0])


def _geo_metadata(lng: np.ndarray, lat: np.ndarray) -> dict[str, Any]:
    col: dict[str, Any] = {"encoding": "WKB", "geometry_types": ["Point"], "crs": EPSG_4326_PROJJSON}
    if len(lng):
        col["bbox"] = [float(lng.min()), float(lat.min()), float(lng.max()), float(lat.max())]
    return {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": col}}


def write_region(
    path: str | Path,
    h3: np.ndarray,
    lat: np.ndarray,
    lng: np.ndarray,
    embedding: np.ndarray,
    status: str | Sequence[str] | np.ndarray | pa.Array,
    model_version: str,
    *,
    valid: np.ndarray | None = None,
    region: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    row_group_size: int = 65536,
) -> Path:
    """Write one region file atomically (temp file in the same folder, then rename).

    Args:
        path: Destination ``.parquet``.
        h3: H3 indexes (n,), any integer dtype; written as uint64 in the given order.
        lat: Centroid latitudes (n,).
        lng: Centroid longitudes (n,).
        embedding: (n, d) float array.
        status: ``'ok'`` or a reason per row, or one string for all rows.
        model_version: Version string of the model.
        valid: Rows whose embedding is not null; default ``status == 'ok'``.
        region: Region cell (hex string) recorded in the metadata.
        metadata: Extra keys for the ``vectorgeo`` metadata.
        row_group_size: Rows per Parquet row group.

    Returns:
        The path written.

    Raises:
        DataError: inconsistent shapes or non-finite valid embeddings.
    """
    path = Path(path)
    h3 = np.asarray(h3).astype(np.uint64, copy=False)
    n = h3.shape[0]
    lat = np.asarray(lat, dtype=np.float64)
    lng = np.asarray(lng, dtype=np.float64)
    emb = np.asarray(embedding, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != n or lat.shape != (n,) or lng.shape != (n,):
        raise DataError(
            str(path),
            f"expected h3, lat, lng of shape ({n},) and embedding ({n}, d); "
            f"got lat {lat.shape}, lng {lng.shape}, embedding {emb.shape}",
        )
    if isinstance(status, str):
        status_arr = arrowbuf.repeated_string(status, n)
    else:
        status_arr = pa.array(status, pa.string()) if not isinstance(status, pa.Array) else status.cast(pa.string())
    if len(status_arr) != n:
        raise DataError(str(path), f"expected {n} status values, got {len(status_arr)}")
    if valid is None:
        import pyarrow.compute as pc

        valid = np.asarray(pc.fill_null(pc.equal(status_arr, STATUS_OK), False).to_numpy(zero_copy_only=False))
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n,):
        raise DataError(str(path), f"expected valid of shape ({n},), got {valid.shape}")
    if not np.isfinite(emb[valid]).all():
        raise DataError(str(path), "non-finite values in embeddings of valid rows")
    d = emb.shape[1]
    # columns built from numpy buffers (vectorgeo.arrowbuf: pa.array would import pandas)
    flat = arrowbuf.primitive(np.where(valid[:, None], emb, 0).reshape(-1), pa.float32())
    emb_arr = pa.FixedSizeListArray.from_arrays(flat, d, mask=arrowbuf.bools(~valid))
    columns = {
        "h3": arrowbuf.primitive(h3, pa.uint64()),
        "h3_str": h3_strings(h3),
        "lat": arrowbuf.primitive(lat, pa.float64()),
        "lng": arrowbuf.primitive(lng, pa.float64()),
        "geometry": point_wkb(lng, lat),
        "embedding": emb_arr,
        "status": status_arr,
        "model_version": arrowbuf.repeated_string(model_version, n),
    }
    table = pa.Table.from_arrays(list(columns.values()), names=list(columns))
    vg_meta = {
        "format": FORMAT_VERSION,
        "region": region,
        "model_version": model_version,
        "embedding_dim": d,
        "rows": n,
        **(metadata or {}),
    }
    table = table.replace_schema_metadata(
        {b"geo": json.dumps(_geo_metadata(lng, lat)).encode(), b"vectorgeo": json.dumps(vg_meta).encode()}
    )
    write_parquet_atomic(path, table, row_group_size=row_group_size)
    return path


_EXPECTED = {
    "h3": pa.uint64(),
    "lat": pa.float64(),
    "lng": pa.float64(),
    "geometry": pa.binary(),
    "status": pa.string(),
    "model_version": pa.string(),
}


def read_metadata(path: str | Path) -> tuple[pa.Schema, dict[str, Any], int]:
    """Schema, ``vectorgeo`` metadata and row count of a region file, without reading the data.

    Raises:
        DataError: missing or unreadable file.
    """
    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise DataError(str(path), "file does not exist") from None
    except (OSError, pa.ArrowException) as e:
        raise DataError(str(path), f"not a readable Parquet file: {e}") from None
    schema = pf.schema_arrow
    meta = schema.metadata or {}
    try:
        vg = json.loads(meta.get(b"vectorgeo", b"{}"))
    except ValueError:
        raise DataError(str(path), "the 'vectorgeo' metadata is not valid JSON") from None
    return schema, vg, pf.metadata.num_rows


def embedding_dim(schema: pa.Schema, path: str | Path) -> int:
    """The dimension d of the ``embedding`` column (fixed_size_list<float32>[d]).

    Raises:
        DataError: the column is missing or of another type.
    """
    if "embedding" not in schema.names:
        raise DataError(str(path), "missing column 'embedding'")
    t = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(t) and t.value_type == pa.float32()):
        raise DataError(str(path), f"column 'embedding' must be fixed_size_list<float32>[d], got {t}")
    return int(t.list_size)


def read_region(path: str | Path, *, expected_dim: int | None = None, check_norm: bool = False) -> RegionData:
    """Read and validate a region file.

    Checks: the columns and their types, ``geo`` metadata present, no nulls in h3/lat/lng/status,
    unique h3, latitudes and longitudes in range, a single model_version, finite embeddings where
    not null, the embedding dimension (when ``expected_dim`` is given) and, with ``check_norm``, unit
    norm (|‖e‖ - 1| < 1e-3) where not null.

    Raises:
        DataError: naming the file and what is wrong.
    """
    p = str(path)
    schema, vg, _ = read_metadata(path)
    missing = [c for c in COLUMNS if c not in schema.names]
    if missing:
        raise DataError(p, f"missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    for name, typ in _EXPECTED.items():
        got = schema.field(name).type
        ok = (
            got == typ
            or (typ == pa.string() and got == pa.large_string())
            or (typ == pa.binary() and got == pa.large_binary())
        )
        if not ok:
            raise DataError(p, f"column '{name}' must be {typ}, got {got}")
    d = embedding_dim(schema, path)
    if expected_dim is not None and d != expected_dim:
        raise DataError(p, f"embedding dimension is {d}, expected {expected_dim}")
    if b"geo" not in (schema.metadata or {}):
        raise DataError(p, "missing GeoParquet 'geo' metadata")
    try:
        table = pq.read_table(path, columns=["h3", "lat", "lng", "embedding", "status", "model_version"])
    except (OSError, pa.ArrowException) as e:
        raise DataError(p, f"cannot read data: {e}") from None
    for c in ("h3", "lat", "lng", "status", "model_version"):
        if table.column(c).null_count:
            raise DataError(p, f"column '{c}' has {table.column(c).null_count} null value(s)")
    h3 = table.column("h3").to_numpy()
    lat = table.column("lat").to_numpy()
    lng = table.column("lng").to_numpy()
    n = h3.shape[0]
    # region files are written in stencil order, which is increasing: then no sort is needed
    if n > 1 and not (h3[1:] > h3[:-1]).all():
        dup = n - np.unique(h3).shape[0]
        if dup:
            raise DataError(p, f"{dup} duplicate h3 value(s)")
    if n and not ((np.abs(lat) <= 90).all() and (np.abs(lng) <= 180).all()):
        raise DataError(p, "lat must be within [-90, 90] and lng within [-180, 180]")
    versions = table.column("model_version").unique().to_pylist()
    if len(versions) > 1:
        raise DataError(p, f"expected one model_version, found {len(versions)}: {versions[:5]}")
    model_version = versions[0] if versions else str(vg.get("model_version") or "")
    emb_col = table.column("embedding").combine_chunks()
    valid = ~np.asarray(emb_col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    # null slots of a fixed-size list still hold d child values: slice the child array directly
    values = emb_col.values.slice(emb_col.offset * d, n * d)
    emb = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, d).copy()
    emb[~valid] = 0
    if not np.isfinite(emb).all():
        raise DataError(p, "non-finite values in embeddings")
    if check_norm and valid.any():
        norms = np.linalg.norm(emb[valid], axis=1)
        bad = int((np.abs(norms - 1) >= 1e-3).sum())
        if bad:
            raise DataError(p, f"{bad} embedding(s) are not unit vectors")
    status = table.column("status").combine_chunks().cast(pa.string())
    return RegionData(
        path=p,
        h3=h3.astype(np.uint64, copy=False),
        lat=lat.astype(np.float64, copy=False),
        lng=lng.astype(np.float64, copy=False),
        embedding=emb,
        valid=valid,
        status=status,
        model_version=str(model_version),
        region=vg.get("region"),
        metadata=vg,
    )
