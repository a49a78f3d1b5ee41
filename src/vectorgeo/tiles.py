"""Vector tiles of the loaded cells, coloured by embedding, with coarser rollup cells at low zooms.

Colour: the first three principal components of the embeddings give red, green and blue. A PCA is fitted
once per model version on a sample of at most :data:`PCA_SAMPLE` embeddings :math:`e` (unit vectors):
:math:`\\mu = \\operatorname{mean}(e)`, :math:`c_1, c_2, c_3` = the top right singular vectors of
:math:`e - \\mu`, and for each component the 1st and 99th percentiles :math:`lo_i, hi_i` of
:math:`(e - \\mu) \\cdot c_i`. A cell's channel is then
:math:`\\operatorname{clip}(255\\,((e - \\mu) \\cdot c_i - lo_i) / (hi_i - lo_i), 0, 255)`, evaluated inside
PostgreSQL with pgvector's inner product (``-(e <#> c_i) - \\mu \\cdot c_i``).

Rollups: for each resolution :math:`p` below the loaded resolution :math:`r`, a parent's embedding is the
re-normalised mean of its loaded children, :math:`\\hat e_P = \\sum_{c \\in P} e_c / \\lVert \\sum e_c \\rVert`;
the sums are built coarser from finer (exact, one pass over the cells), with the H3 parent computed by
bit operations on the 64-bit index (resolution field set to :math:`p`, digits :math:`p+1..15` set to 7).

Zoom → resolution: a tile at zoom :math:`z` spans :math:`W = 40075 / 2^z` km at the equator (its largest
ground extent); zoom :math:`z` shows the finest resolution :math:`p \\le r` with
:math:`W^2 / \\bar A_p \\le` ``TILE_FILL * max_features`` (:math:`\\bar A_p` the mean H3 cell area), and the
tile query carries ``LIMIT max_features`` as a hard cap.

Everything lives in tables of this module, one per model version (dataset) of :mod:`vectorgeo.store`:
``tiles_<hash>`` (res, h3, children, color, Web Mercator hexagon; ``<hash>`` that of the dataset's
``cells_<hash>`` table) with one partial GiST index per resolution, and the catalog ``vectorgeo_tiles``
(model version, table, a signature of the loaded regions, PCA, bounds). :func:`ensure` builds the tiles of
the active dataset when they are missing or its regions changed since.

Public API: :func:`ensure`, :func:`current`, :func:`build`, :func:`read_meta`, :func:`level_for_zoom`, :func:`max_zoom`,
:func:`tile`, :class:`TileMeta`.
"""

from __future__ import annotations

import gzip
import json
import math
import secrets
from dataclasses import asdict, dataclass, field
from typing import Any

import h3
import numpy as np
import psycopg
import pyarrow as pa
import shapely
from psycopg import sql

from vectorgeo import h3cells, store, validation
from vectorgeo.store.catalog import fetch_one
from vectorgeo.store.connection import database_error

META_TABLE = "vectorgeo_tiles"
_LOCK_KEY = 0x7469_6C65_7321  # advisory lock serialising tile builds ("tiles!")
PCA_SAMPLE = 20_000
TILE_FILL = 0.6
EXTENT = 4096
BUFFER = 64
MAX_ZOOM = 22
MERCATOR_MAX_LAT = 85.0511287798066
EARTH_RADIUS_M = 6378137.0
EQUATOR_KM = 40075.016686


@dataclass(frozen=True)
class TileMeta:
    """What :func:`build` recorded about the tiles of one dataset.

    Attributes:
        model_version: Model version of the dataset.
        table: The tile table.
        signature: Fingerprint of the dataset's loaded regions (rows, checksums, load times).
        resolution: H3 resolution of the loaded cells.
        cells: Loaded cells with an embedding.
        bounds: ``[west, south, east, north]`` of the loaded cell centres.
        max_features: Feature cap per tile the zoom levels were chosen for.
        pca: ``mean_dot`` (3,), ``components`` (3, d), ``lo`` (3,), ``hi`` (3,).
        build_id: Changes at every build (keys tile caches).
    """

    model_version: str
    table: str
    signature: str
    resolution: int
    cells: int
    bounds: list[float]
    max_features: int
    pca: dict[str, Any] = field(default_factory=dict)
    build_id: str = ""


def _table_exists(conn: psycopg.Connection[Any], name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def tile_table(ds: store.Dataset) -> str:
    """Tile table of a dataset: ``tiles_`` + the hash of its ``cells_<hash>`` table."""
    return "tiles_" + ds.table.removeprefix("cells_")


def signature(conn: psycopg.Connection[Any], ds: store.Dataset) -> str:
    """Fingerprint of a dataset's loaded regions (rows, checksums and load times, from the catalog)."""
    row = fetch_one(
        conn,
        "SELECT coalesce(sum(rows), 0), md5(coalesce(string_agg(region::text || ':' || checksum || ':' || "
        "loaded_at::text, ',' ORDER BY region), '')) FROM vectorgeo_regions WHERE model_version = %s",
        (ds.model_version,),
    )
    return f"{int(row[0])}:{row[1]}"


def read_meta(conn: psycopg.Connection[Any], model_version: str) -> TileMeta | None:
    """The recorded tile metadata of a model version, or None when its tiles were never built."""
    if not _table_exists(conn, META_TABLE):
        return None
    row = conn.execute(
        sql.SQL("SELECT meta FROM {} WHERE model_version = %s").format(sql.Identifier(META_TABLE)), (model_version,)
    ).fetchone()
    if row is None:
        return None
    d = row[0] if isinstance(row[0], dict) else json.loads(row[0])
    return TileMeta(**d)


def current(conn: psycopg.Connection[Any], *, max_features: int) -> TileMeta | None:
    """The recorded tiles of the active dataset when they match its loaded regions, else None (cheap:
    catalog queries only).

    Raises:
        DatabaseError: nothing loaded.
    """
    ds = store.dataset(conn)
    meta = read_meta(conn, ds.model_version)
    if (
        meta is not None
        and meta.signature == signature(conn, ds)
        and meta.max_features == max_features
        and _table_exists(conn, meta.table)
    ):
        return meta
    return None


def ensure(conn: psycopg.Connection[Any], *, max_features: int) -> TileMeta:
    """The tiles of the active dataset, built first when missing or stale (regions reloaded since).

    Args:
        conn: A store connection.
        max_features: Feature cap per tile.

    Returns:
        The tile metadata in force.

    Raises:
        DatabaseError: nothing loaded.
    """
    return current(conn, max_features=max_features) or build(conn, max_features=max_features)


def _sample_embeddings(conn: psycopg.Connection[Any], ds: store.Dataset, n: int) -> np.ndarray:
    """Up to :data:`PCA_SAMPLE` embeddings (float64, (m, d)) via a binary COPY parsed by numpy."""
    pct = min(100.0, 100.0 * 2 * PCA_SAMPLE / max(n, 1))
    record = np.dtype([("nf", ">i2"), ("len", ">i4"), ("dim", ">i2"), ("unused", ">i2"), ("e", ">f4", (ds.dim,))])

    def fetch(sample: sql.Composable) -> np.ndarray:
        q = sql.SQL(
            "COPY (SELECT embedding FROM {} {} WHERE embedding IS NOT NULL LIMIT {}) TO STDOUT (FORMAT BINARY)"
        ).format(ds.ident, sample, sql.Literal(PCA_SAMPLE))
        buf = bytearray()
        with conn.cursor() as cur, cur.copy(q) as cp:
            for block in cp:
                buf += block
        body = bytes(buf[19:-2])  # 19-byte header (signature, flags, extension length), 2-byte trailer
        return np.frombuffer(body, dtype=record)["e"].astype(np.float64)

    x = fetch(sql.SQL(f"TABLESAMPLE SYSTEM ({pct:.6f})"))
    if x.shape[0] < min(n, 3):  # a tiny table: the page sample may miss it
        x = fetch(sql.SQL(""))
    return x


def pca_colour_axes(x: np.ndarray) -> dict[str, Any]:
    """The colour PCA of a sample of embeddings: ``mean`` (d), ``components`` (3, d) with deterministic
    signs, and ``lo``/``hi``, the 1st/99th percentiles of the projections (empty components for no sample)."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] == 0:
        return {"mean": [], "components": [], "lo": [0.0] * 3, "hi": [1.0] * 3}
    mean = x.mean(axis=0)
    centred = x - mean
    # the top eigenvectors of the d x d scatter matrix are the top right singular vectors of `centred`
    _, vecs = np.linalg.eigh(centred.T @ centred)
    comps = np.zeros((3, x.shape[1]))
    k = min(3, vecs.shape[1])
    comps[:k] = vecs[:, ::-1][:, :k].T
    # deterministic signs: the largest loading of each component is positive
    idx = np.argmax(np.abs(comps), axis=1)
    comps *= np.where(comps[np.arange(3), idx] < 0, -1.0, 1.0)[:, None]
    proj = centred @ comps.T
    lo = np.percentile(proj, 1, axis=0)
    hi = np.percentile(proj, 99, axis=0)
    hi = np.where(hi - lo < 1e-9, lo + 1e-9, hi)
    return {"mean": mean.tolist(), "components": comps.tolist(), "lo": lo.tolist(), "hi": hi.tolist()}


def _fit_pca(conn: psycopg.Connection[Any], ds: store.Dataset, n: int) -> dict[str, Any]:
    """PCA of a sample of the embeddings: mean·c_i, components c_i (3, d), 1st/99th percentiles."""
    axes = pca_colour_axes(_sample_embeddings(conn, ds, n))
    mean_dot = (np.asarray(axes["components"]) @ np.asarray(axes["mean"])).tolist() if axes["components"] else [0.0] * 3
    return {"mean_dot": mean_dot, "components": axes["components"], "lo": axes["lo"], "hi": axes["hi"]}


def _colour_sql(expr: sql.Composable, pca: dict[str, Any]) -> sql.Composable:
    """SQL giving '#rrggbb' for the embedding expression ``expr`` (see the module docstring)."""
    if not pca["components"]:
        return sql.Literal("#808080")
    parts = []
    for i in range(3):
        vec = "[" + ",".join(f"{v:.8g}" for v in pca["components"][i]) + "]"
        scale = 255.0 / (pca["hi"][i] - pca["lo"][i])
        offset = pca["mean_dot"][i] + pca["lo"][i]
        chan = sql.SQL(
            "lpad(to_hex(greatest(0, least(255, round((-({e} <#> {v}::vector) - {o}) * {s})))::int), 2, '0')"
        )
        parts.append(chan.format(e=expr, v=sql.Literal(vec), o=sql.Literal(offset), s=sql.Literal(scale)))
    return sql.SQL("'#' || {} || {} || {}").format(*parts)


def _parent_sql(col: str, p: int) -> sql.Composable:
    """SQL for the H3 parent at resolution ``p`` of the bigint H3 column ``col`` (:func:`vectorgeo.h3cells.parent`)."""
    return sql.SQL("((({c} & ~({m}::bigint << {sh})) | ({p}::bigint << {sh})) | {d}::bigint)").format(
        c=sql.Identifier(col),
        m=sql.Literal(h3cells.RES_MASK),
        sh=sql.Literal(h3cells.RES_SHIFT),
        p=sql.Literal(p),
        d=sql.Literal(h3cells.unused_digits(p)),
    )


def hexagons_3857(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Web Mercator hexagons of H3 cells, ready for a tile table.

    Cells reaching beyond the Mercator latitude limit are dropped; cells crossing the antimeridian
    appear twice, once on each side (x beyond ±180° is clipped away by the tile query).

    Args:
        cells: H3 indexes (n,), uint64 or int64.

    Returns:
        ``(index, geometries)``: positions into ``cells`` (m,) and shapely polygons (m,) in EPSG:3857.
    """
    from h3ronpy import vector

    cells = np.asarray(cells).astype(np.uint64)
    if cells.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    wkb = pa.array(vector.cells_to_wkb_polygons(pa.array(cells))).to_numpy(zero_copy_only=False)
    geoms = shapely.from_wkb(wkb)
    bounds = shapely.bounds(geoms)
    keep = (bounds[:, 1] > -MERCATOR_MAX_LAT) & (bounds[:, 3] < MERCATOR_MAX_LAT)
    wraps = keep & (bounds[:, 2] - bounds[:, 0] > 180.0)
    index = np.flatnonzero(keep & ~wraps)
    out = [geoms[index]]
    w = np.flatnonzero(wraps)
    if w.size:
        east = shapely.transform(
            geoms[w], lambda xy: np.column_stack([np.where(xy[:, 0] < 0, xy[:, 0] + 360, xy[:, 0]), xy[:, 1]])
        )
        west = shapely.transform(
            geoms[w], lambda xy: np.column_stack([np.where(xy[:, 0] > 0, xy[:, 0] - 360, xy[:, 0]), xy[:, 1]])
        )
        out += [east, west]
        index = np.concatenate([index, w, w])

    def mercator(xy: np.ndarray) -> np.ndarray:
        x = np.radians(xy[:, 0]) * EARTH_RADIUS_M
        y = np.log(np.tan(np.pi / 4 + np.radians(xy[:, 1]) / 2)) * EARTH_RADIUS_M
        return np.column_stack([x, y])

    merc = shapely.transform(np.concatenate(out), mercator)
    return index, merc


def _copy_hexagons(
    conn: psycopg.Connection[Any],
    table: str,
    res: np.ndarray,
    cells: np.ndarray,
    children: np.ndarray,
    colors: np.ndarray,
) -> int:
    """COPY rows (res, h3, children, color, hexagon) into ``table``; returns rows written."""
    index, geoms = hexagons_3857(cells)
    if index.size == 0:
        return 0
    ewkb = shapely.to_wkb(shapely.set_srid(geoms, 3857), hex=True, include_srid=True)
    cols = (
        res[index].astype(str),
        cells.astype(np.int64)[index].astype(str),
        children[index].astype(str),
        colors[index].astype(str),
        ewkb.astype(str),
    )
    payload = "\n".join(map("\t".join, zip(*cols, strict=True))) + "\n"
    q = sql.SQL("COPY {} (res, h3, children, color, geom) FROM STDIN").format(sql.Identifier(table))
    with conn.cursor() as cur, cur.copy(q) as cp:
        cp.write(payload.encode())
    return int(index.size)


def level_for_zoom(z: int, resolution: int, max_features: int) -> int:
    """H3 resolution shown at zoom ``z`` (see the module docstring).

    Args:
        z: Tile zoom.
        resolution: Resolution of the loaded cells (the finest available).
        max_features: Feature cap per tile.
    """
    area = (EQUATOR_KM / 2**z) ** 2
    for p in range(resolution, 0, -1):
        if area / h3.average_hexagon_area(p, unit="km^2") <= TILE_FILL * max_features:
            return p
    return 0


def max_zoom(resolution: int, max_features: int) -> int:
    """The smallest zoom that shows the loaded resolution (tiles above it are over-zoomed by clients)."""
    for z in range(MAX_ZOOM + 1):
        if level_for_zoom(z, resolution, max_features) >= resolution:
            return z
    return MAX_ZOOM


def _summary(conn: psycopg.Connection[Any], ds: store.Dataset) -> tuple[int, list[float]]:
    """Cells with an embedding, and the bounds of their centres (a world default when there are none)."""
    row = fetch_one(
        conn,
        sql.SQL(
            "SELECT count(*), min(ST_X(geom)), min(ST_Y(geom)), max(ST_X(geom)), max(ST_Y(geom)) "
            "FROM {} WHERE embedding IS NOT NULL"
        ).format(ds.ident),
    )
    n = int(row[0])
    return n, ([float(v) for v in row[1:]] if n else [-180.0, -60.0, 180.0, 75.0])


def _create_build_tables(conn: psycopg.Connection[Any], build_table: str, sums: str) -> None:
    """The new tile table, and a temporary table of rollup sums (res, h3, sum of embeddings, count)."""
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (res smallint NOT NULL, h3 bigint NOT NULL, children integer NOT NULL, "
            "color text NOT NULL, geom geometry(Polygon, 3857) NOT NULL)"
        ).format(sql.Identifier(build_table))
    )
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} (res smallint, h3 bigint, s vector, n integer) ON COMMIT DROP").format(
            sql.Identifier(sums)
        )
    )


def _fill_sums(conn: psycopg.Connection[Any], ds: store.Dataset, sums: str) -> None:
    """Sums and counts of the embeddings under every parent, built coarser from finer (one pass)."""
    r = ds.resolution
    conn.execute(
        sql.SQL(
            "INSERT INTO {t} SELECT {p}, {par}, sum(embedding), count(*) FROM {c} "
            "WHERE embedding IS NOT NULL GROUP BY 2"
        ).format(t=sql.Identifier(sums), p=sql.Literal(r - 1), par=_parent_sql("h3", r - 1), c=ds.ident)
    )
    for p in range(r - 2, -1, -1):
        conn.execute(
            sql.SQL("INSERT INTO {t} SELECT {p}, {par}, sum(s), sum(n) FROM {t} WHERE res = {p1} GROUP BY 2").format(
                t=sql.Identifier(sums), p=sql.Literal(p), par=_parent_sql("h3", p), p1=sql.Literal(p + 1)
            )
        )


def _write_hexagons(
    conn: psycopg.Connection[Any],
    ds: store.Dataset,
    pca: dict[str, Any],
    sums: str,
    build_table: str,
    token: str,
    chunk: int,
) -> None:
    """Coloured hexagons of the cells and their rollups into the new tile table, ``chunk`` rows at a time."""
    source = sql.SQL(
        "SELECT {r}::smallint, h3, 1, {col} FROM {c} WHERE embedding IS NOT NULL "
        "UNION ALL SELECT res, h3, n, {scol} FROM {s}"
    ).format(
        r=sql.Literal(ds.resolution),
        col=_colour_sql(sql.Identifier("embedding"), pca),
        c=ds.ident,
        scol=_colour_sql(sql.SQL("l2_normalize(s)"), pca),
        s=sql.Identifier(sums),
    )
    with conn.cursor(name=f"tiles_{token}") as cur:
        cur.itersize = chunk
        cur.execute(source)
        while rows := cur.fetchmany(chunk):
            res, cells, children, colors = (np.asarray(c) for c in zip(*rows, strict=True))
            _copy_hexagons(
                conn,
                build_table,
                res.astype(np.int16),
                cells.astype(np.int64).astype(np.uint64),
                children.astype(np.int64),
                colors.astype(str),
            )


def _index_and_swap(conn: psycopg.Connection[Any], meta: TileMeta, build_table: str) -> None:
    """One partial GiST index per resolution, ANALYZE, then the new table replaces the old one."""
    for p in range(meta.resolution + 1):
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} USING gist (geom) WHERE res = {}").format(
                sql.Identifier(f"{meta.table}_r{p}_{meta.build_id}"), sql.Identifier(build_table), sql.Literal(p)
            )
        )
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(build_table)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(meta.table)))
    conn.execute(sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(build_table), sql.Identifier(meta.table)))


def _record_meta(conn: psycopg.Connection[Any], meta: TileMeta) -> None:
    """Write the tile metadata into the tile catalog (created when missing)."""
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (model_version text PRIMARY KEY, table_name text NOT NULL, "
            "meta jsonb NOT NULL, built_at timestamptz NOT NULL)"
        ).format(sql.Identifier(META_TABLE))
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (model_version, table_name, meta, built_at) VALUES (%s, %s, %s, now()) "
            "ON CONFLICT (model_version) DO UPDATE SET table_name = EXCLUDED.table_name, "
            "meta = EXCLUDED.meta, built_at = EXCLUDED.built_at"
        ).format(sql.Identifier(META_TABLE)),
        (meta.model_version, meta.table, json.dumps(asdict(meta))),
    )


def build(conn: psycopg.Connection[Any], *, max_features: int, chunk: int = 200_000) -> TileMeta:
    """(Re)build the tiles of the active dataset: PCA colours, rollups, hexagons, indexes.

    One transaction: memory is bounded by ``chunk`` rows, and the previous tiles are served until the
    new ones are committed.

    Args:
        conn: A store connection.
        max_features: Feature cap per tile.
        chunk: Rows fetched and written per batch.

    Returns:
        The new tile metadata.

    Raises:
        DatabaseError: nothing loaded, or the database refused the build.
    """
    ds = store.dataset(conn)
    token = secrets.token_hex(4)
    table = tile_table(ds)
    build_table = f"{table}_{token}"
    sums = f"tile_sums_{token}"
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            sig = signature(conn, ds)
            n, bounds = _summary(conn, ds)
            pca = _fit_pca(conn, ds, n)
            _create_build_tables(conn, build_table, sums)
            if n and ds.resolution > 0:
                _fill_sums(conn, ds, sums)
            _write_hexagons(conn, ds, pca, sums, build_table, token, chunk)
            meta = TileMeta(
                model_version=ds.model_version,
                table=table,
                signature=sig,
                resolution=ds.resolution,
                cells=n,
                bounds=bounds,
                max_features=max_features,
                pca=pca,
                build_id=token,
            )
            _index_and_swap(conn, meta, build_table)
            _record_meta(conn, meta)
    except psycopg.Error as e:
        raise database_error(f"building the tiles of model_version {ds.model_version!r}", e) from None
    return meta


def check_tile(z: int, x: int, y: int) -> None:
    """Validate tile coordinates.

    Raises:
        RequestError: naming ``z``, ``x`` or ``y`` when out of range.
    """
    validation.check_tile(z, x, y, MAX_ZOOM)


def tile(conn: psycopg.Connection[Any], meta: TileMeta, z: int, x: int, y: int, *, compress: bool = True) -> bytes:
    """One Mapbox Vector Tile (layer ``cells``; properties h3, res, children, color), gzipped by default.

    Args:
        conn: A store connection.
        meta: The tile metadata in force.
        z: Zoom.
        x: Column.
        y: Row.
        compress: Gzip the tile (serve with ``Content-Encoding: gzip``).

    Raises:
        RequestError: tile coordinates out of range.
    """
    check_tile(z, x, y)
    level = level_for_zoom(z, meta.resolution, meta.max_features)
    env = sql.SQL("ST_TileEnvelope({}, {}, {})").format(sql.Literal(z), sql.Literal(x), sql.Literal(y))
    margin = sql.SQL("ST_TileEnvelope({}, {}, {}, margin => {})").format(
        sql.Literal(z), sql.Literal(x), sql.Literal(y), sql.Literal(BUFFER / EXTENT)
    )
    q = sql.SQL(
        "SELECT ST_AsMVT(t, 'cells', {ext}, 'geom') FROM ("
        " SELECT to_hex(h3) AS h3, res::integer AS res, children, color,"
        " ST_AsMVTGeom(geom, {env}, {ext}, {buf}, true) AS geom"
        " FROM {tbl} WHERE res = {lvl} AND geom && {margin} LIMIT {lim}) t WHERE geom IS NOT NULL"
    ).format(
        ext=sql.Literal(EXTENT),
        env=env,
        buf=sql.Literal(BUFFER),
        tbl=sql.Identifier(meta.table),
        lvl=sql.Literal(level),
        margin=margin,
        lim=sql.Literal(meta.max_features),
    )
    row = conn.execute(q).fetchone()
    data = bytes(row[0]) if row and row[0] is not None else b""
    return gzip.compress(data, compresslevel=5, mtime=0) if compress else data


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """``(west, south, east, north)`` in degrees of a Web Mercator tile."""
    n = 2.0**z

    def lat(t: float) -> float:
        return math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * t / n))))

    return x / n * 360 - 180, lat(y + 1), (x + 1) / n * 360 - 180, lat(y)
