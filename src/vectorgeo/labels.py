"""Evaluation labels: the tasks of ``evaluate.tasks`` and their labels at cell centroids.

A task is a label from real data that is not a model input: a raster (a ``builtin:`` dataset or a
GeoTIFF, prepared like a layer: class values or a continuous value with scale and offset) or a vector
file (polygons with a label attribute, e.g. Natural Earth countries, looked up by point in polygon).
:func:`task_labels` returns the labels of one task at given points, with NaN / -1 where none applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from vectorgeo.config import NODATA_INDEX, EvaluateConfig, TaskConfig, section
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.layers import Layer, LayerSpec
from vectorgeo.probes import CLASSIFICATION_METRICS, MAIN_METRIC, REGRESSION_METRICS, Labels, TaskKind
from vectorgeo.sources import builtin_name, builtin_path


@dataclass(frozen=True)
class TaskSpec:
    """An evaluation task: a validated ``evaluate.tasks.<name>`` entry plus its name.

    Attributes:
        name: Task name.
        kind: ``classification`` or ``regression``.
        type: ``raster`` (looked up like a layer) or ``vector`` (point in polygon).
        source: Raster or vector source (path, URL or ``builtin:<name>``).
        field: Vector only: the attribute holding the label.
        nodata: Raster only: raw nodata value.
        classes: Raster classification only: (raw value, class name) pairs.
        scale: Raster regression only: value = raw * scale + offset.
        offset: Raster regression only.
        min_class_cells: Classification: classes with fewer evaluated cells are dropped.
        location: A location task (judged as embedding+latlng against the +latlng baselines).
    """

    name: str
    kind: TaskKind
    type: Literal["raster", "vector"]
    source: str
    field: str | None
    nodata: float | None
    classes: tuple[tuple[int, str], ...]
    scale: float
    offset: float
    min_class_cells: int
    location: bool = False

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
            cfg.update(kind="categorical", classes=dict(self.classes))
        else:
            cfg.update(kind="continuous", scale=self.scale, offset=self.offset)
        return LayerSpec.from_config(self.name, cfg, key=key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for Snakemake params and the report)."""
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
            "location": self.location,
        }

    @classmethod
    def from_task(cls, name: str, task: TaskConfig) -> TaskSpec:
        """The spec of a validated task entry (a vector built-in's label field filled in)."""
        return cls(
            name=name,
            kind=task.kind,
            type=task.type,
            source=task.source,
            field=task.label_field,
            nodata=task.nodata,
            classes=tuple((task.classes or {}).items()) if task.type == "raster" else (),
            scale=task.scale,
            offset=task.offset,
            min_class_cells=task.min_class_cells,
            location=task.location,
        )

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> TaskSpec:
        """Validate a task's config mapping into a spec.

        Raises:
            ConfigError: naming the key at fault.
        """
        return cls.from_task(name, section(TaskConfig, cfg, f"evaluate.tasks.{name}"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskSpec:
        """Inverse of :meth:`to_dict`."""
        body = {k: v for k, v in d.items() if k != "name"}
        if not body.get("classes"):
            body.pop("classes", None)
        return cls.from_config(str(d["name"]), body)


def task_specs(config: Mapping[str, Any]) -> dict[str, TaskSpec]:
    """The tasks of a config (``evaluate.tasks``; the default tasks when the config has none), in order.

    Raises:
        ConfigError: a bad task.
    """
    ev = section(EvaluateConfig, config.get("evaluate"), "evaluate")
    return {name: TaskSpec.from_task(name, t) for name, t in ev.tasks.items()}


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
    path = Path(task.source) if bname is None else builtin_path(bname, key, vector=True)
    if not path.exists():
        raise ConfigError(key, f"vector file {path} does not exist")
    return path


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


def task_labels(task: TaskSpec, path: str | Path, lat: np.ndarray, lng: np.ndarray) -> Labels:
    """Labels of a task at points: a prepared raster (``.npy``) or a vector file."""
    if task.type == "raster":
        return raster_labels(task, path, lat, lng)
    geoms, names = read_polygons(task, path)
    y, valid, class_names = polygon_labels(geoms, names, lat, lng)
    return Labels(y, valid, class_names)
