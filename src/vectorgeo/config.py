"""Configuration: typed models, the one source of truth.

Every config key is a field of a pydantic model below, with its type, range, default and
description. From these models come

* the JSON Schema ``config/schema.yaml`` that Snakemake's ``validate`` checks the config against and
  takes the defaults from (written by ``python -m vectorgeo.config schema``; a test checks that the
  committed file equals the models' schema),
* the defaults themselves (there is no other copy),
* the cross-field checks (model validators: a region resolution finer than the stencil's, a
  neighbour band that does not fit the crop margin, ...),
* the per-stage parameter objects: a rule passes one section (``config["sample"]``) through
  ``params:`` and its script rebuilds the typed object (``SampleConfig.model_validate(...)``), so
  that changing one key reruns exactly the jobs that read it.

Library users call :func:`load_config` (file → validated, completed dict) or :func:`parse`
(dict → :class:`Config`). Either way a bad value raises :class:`~vectorgeo.errors.ConfigError`
naming the dotted key and what was expected.

This module is longer than the others on purpose: it declares every key with its description, and a
reader (or the generated schema) finds them all in one place.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Self, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

from vectorgeo.errors import ConfigError, RasterError
from vectorgeo.sources import BUILTINS, VECTOR_BUILTINS, builtin_name, builtin_path, expand_tiles, is_remote

NODATA_INDEX = 255
"""Class index used for nodata in categorical lookups (so at most 254 classes)."""

KM_PATCH_DIAGONAL = 0.71
"""Half the diagonal of a square patch in patch widths (sqrt(2) / 2, rounded up)."""

LAYER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def _fail(key: str, message: str) -> NoReturn:
    """Raise a validation error for ``key`` (relative to the model being validated)."""
    raise PydanticCustomError("vectorgeo", "{message}", {"key": key, "message": message})


class Section(BaseModel):
    """Base of every config section: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> Self:
        """Validate a section's mapping (e.g. a rule's ``params`` entry) into the typed section.

        Raises:
            pydantic.ValidationError: use :func:`section` for a :class:`ConfigError` naming the key.
        """
        return cls.model_validate(dict(values))

    def to_params(self, *, include: set[str] | None = None, exclude: set[str] | None = None) -> dict[str, Any]:
        """JSON-able dict of the section, or of some of its keys (what a rule passes through ``params:``).

        A rule passes exactly the keys its outputs depend on, so that changing another key does not rerun it.
        """
        return self.model_dump(mode="json", include=include, exclude=exclude)


S = TypeVar("S", bound=Section)


def _doc(model: type[BaseModel]) -> str:
    """A model's docstring as one paragraph (the description of its section in the schema)."""
    return " ".join(inspect.cleandoc(model.__doc__ or "").split())


# --- sources -------------------------------------------------------------------------------------


def _check_source(value: Any) -> Any:
    if isinstance(value, str):
        if not value:
            raise ValueError("expected a path, URL, tile glob or 'builtin:<name>', got an empty string")
        name = builtin_name(value)
        if name is not None and name not in BUILTINS:
            raise ValueError(f"unknown built-in dataset '{name}'; expected one of {', '.join(sorted(BUILTINS))}")
        return value
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(t, str) and t for t in value):
            raise ValueError(f"expected a non-empty list of tile paths or URLs, got {list(value)!r}")
        return list(value)
    raise ValueError(f"expected a path, URL, tile glob, list of tiles or 'builtin:<name>', got {value!r}")


Source = Annotated[
    str | list[str],
    BeforeValidator(_check_source),
    Field(
        description=(
            "Where a raster comes from: a local GeoTIFF path, an s3:// or https:// URL (fetched through "
            "Snakemake storage), `builtin:<name>` (" + ", ".join(sorted(BUILTINS)) + "), or a list / glob "
            "of tiles mosaicked once."
        )
    ),
]


# --- layers --------------------------------------------------------------------------------------


class LayerConfig(Section):
    """A model input raster layer (``layers.<name>``)."""

    kind: Literal["categorical", "continuous"] = Field(
        description="categorical (a class map, one-hot encoded) or continuous (scaled)."
    )
    source: Source
    nodata: float | None = Field(None, description="Raw nodata value of the raster (null if none).")
    water: list[int] = Field(
        [],
        description="Raw values that are water / ocean (categorical layers); they count as unusable in patches.",
    )
    classes: dict[int, str] | None = Field(
        None,
        description="Categorical only. Raw value -> class name; the class index is the position in this map.",
    )
    scale: float = Field(1.0, description="Continuous only. Physical value = raw * scale + offset.")
    offset: float = Field(0.0, description="Continuous only. Physical value = raw * scale + offset.")
    bands: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]] | None = Field(
        None,
        description=(
            "Continuous only. Names of the raster's bands in order, for a multi-band raster (imagery: e.g. [red, "
            "green, blue]); null = a single-band raster. The count must equal the raster's band count."
        ),
    )
    normalize: Literal["patch_minmax", "standardize", "both"] = Field(
        "patch_minmax",
        description=(
            "Continuous only. Model input scaling: patch_minmax (per-patch min-max, relief only), standardize "
            "((v - mean) / std with the global mean and std below, absolute level) or both (a relief channel and "
            "a level channel)."
        ),
    )
    mean: float | list[float] = Field(
        0.0,
        description=(
            "Continuous only. Global mean (physical units) for normalize=standardize or both; one per band for a "
            "multi-band layer (or one for all)."
        ),
    )
    std: float | list[Annotated[float, Field(gt=0)]] = Field(
        1.0,
        description=(
            "Continuous only. Global standard deviation (physical units, > 0) for normalize=standardize or both; "
            "one per band for a multi-band layer (or one for all)."
        ),
    )

    @model_validator(mode="after")
    def _check_kind(self) -> LayerConfig:
        if self.kind == "categorical":
            if not self.classes:
                _fail("classes", "a categorical layer needs a non-empty mapping raw value -> class name")
            if len(self.classes) >= NODATA_INDEX:
                _fail("classes", f"at most {NODATA_INDEX - 1} classes are supported, got {len(self.classes)}")
            unknown = [w for w in self.water if w not in self.classes]
            if unknown:
                _fail("water", f"water values {unknown} are not in classes")
            if self.bands is not None:
                _fail("bands", "only continuous layers have bands")
        else:
            if self.classes:
                _fail("classes", "only categorical layers have classes")
            self._check_bands()
        return self

    def _check_bands(self) -> None:
        if isinstance(self.std, float) and self.std <= 0:
            _fail("std", f"must be > 0, got {self.std}")
        n = len(self.bands) if self.bands is not None else 1
        if self.bands is not None:
            if not self.bands:
                _fail("bands", "expected a non-empty list of band names, or null for a single-band raster")
            if len(set(self.bands)) != len(self.bands):
                _fail("bands", f"lists a band twice: {self.bands}")
        name = builtin_name(self.source)
        if name is not None and name in BUILTINS and BUILTINS[name].bands != n:
            _fail(
                "bands",
                f"built-in '{name}' has {BUILTINS[name].bands} band(s), the layer lists {n}"
                + ("" if self.bands else " (no bands list)")
                + f"; expected {BUILTINS[name].bands} band names",
            )
        for key in ("mean", "std"):
            v = getattr(self, key)
            if isinstance(v, list) and len(v) != n:
                _fail(key, f"has {len(v)} values for {n} band(s); expected one per band (or one number)")

    @property
    def n_bands(self) -> int:
        """Bands of the raster (1 for a single-band layer)."""
        return len(self.bands) if self.bands else 1


class LandMaskConfig(Section):
    """The raster that decides what is land (``land_mask``)."""

    source: Source
    water: list[int] = Field(
        [1],
        description="Raw values that are water / ocean; every other value except nodata is land.",
    )
    nodata: float | None = Field(None, description="Raw nodata value (treated as not land), or null.")


# --- database and API ----------------------------------------------------------------------------


class DatabaseConfig(Section):
    """The PostgreSQL + PostGIS + pgvector database the embeddings are loaded into.

    With url null (and no VECTORGEO_DATABASE_URL in the environment) `vectorgeo db start` runs a
    project-local cluster.
    """

    url: str | None = Field(
        None,
        description=(
            "External database URL (postgresql://user:password@host:port/dbname), e.g. RDS or Aurora; the "
            "environment variable VECTORGEO_DATABASE_URL overrides it. null = the project-local cluster."
        ),
    )
    home: str | None = Field(
        None,
        description=(
            "Folder of the project-local cluster (data in <home>/pgdata, socket and log in <home>); the "
            "environment variable VECTORGEO_HOME overrides it. null = .vectorgeo in the project folder."
        ),
    )
    port: int = Field(
        55432, ge=1024, le=65535, description="TCP port of the project-local cluster (it listens on 127.0.0.1 only)."
    )
    dbname: str = Field(
        "vectorgeo",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the database in the project-local cluster.",
    )
    hnsw_m: int = Field(
        16,
        ge=2,
        le=100,
        description="HNSW index parameter m (graph links per node), built once after all regions are loaded.",
    )
    hnsw_ef_construction: int = Field(
        64, ge=4, le=1000, description="HNSW index parameter ef_construction (candidate list size while building)."
    )
    ef_search: int = Field(
        100,
        ge=1,
        le=1000,
        description=(
            "HNSW candidate list size per query (hnsw.ef_search); raised to k when k is larger. The index path "
            "re-ranks that many candidates with the float32 embeddings and keeps the best k."
        ),
    )
    max_scan_tuples: int = Field(
        50000,
        ge=1,
        description="Upper bound of tuples an iterative HNSW scan visits for a filtered query (hnsw.max_scan_tuples).",
    )
    exact_scan_max_rows: int | None = Field(
        None,
        ge=0,
        description=(
            "A filtered query whose filter is estimated to match at most this many rows is answered by an exact "
            "scan over the filtered rows; above it by an iterative HNSW index scan. null = a cost model: the exact "
            "scan visits R filtered rows, the index scan about N k / R candidates at ~1.5 times the cost each, so "
            "exact when R <= sqrt(2 N k) (about 4,500 rows for N = 1M, 8,900 for N = 4M, k = 10)."
        ),
    )
    local_exact_rings: int = Field(
        10,
        ge=0,
        le=50,
        description=(
            "On the HNSW path of a query by cell, the cells up to this many H3 rings around the query cell "
            "(3 r (r + 1) + 1 cells, 331 for 10, read by primary key) are ranked exactly beside the index's "
            "candidates. An HNSW graph of millions of rows leaves some neighbourhoods badly connected: at 4M rows "
            "the index alone missed 6 % of the exact top 10 whatever ef_search, most of them cells next to the query "
            "cell (benchmarks/load.py). 0 = the index's candidates only."
        ),
    )
    maintenance_work_mem: str = Field(
        "1GB", description="PostgreSQL maintenance_work_mem for the index build (HNSW builds fastest in memory)."
    )
    hnsw_storage: Literal["vector", "halfvec"] = Field(
        "halfvec",
        description=(
            "How the HNSW index holds the embeddings: vector (float32) or halfvec (an index on embedding::halfvec(d), "
            "float16: half the index size and memory, a faster build; the index's candidates are re-ranked with the "
            "float32 embeddings of the table)."
        ),
    )
    index_build_workers: int = Field(
        1,
        ge=0,
        le=16,
        description=(
            "Parallel workers of the HNSW build besides the leader process (PostgreSQL "
            "max_parallel_maintenance_workers of the build); 0 = the leader alone."
        ),
    )


class ServeConfig(Section):
    """The similarity-search API and map viewer (`vectorgeo serve`, `make serve`).

    The database comes from the database section. Hard limits of the API: k <= 1000, radius <= 5,000 km.
    """

    host: str = Field("127.0.0.1", description="Address to listen on (127.0.0.1 = this machine only).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on.")
    workers: int = Field(
        2,
        ge=1,
        le=64,
        description=(
            "uvicorn worker processes (one port, requests spread by the kernel). Each holds its own copy of the "
            "active dataset's embeddings, n (4 d + 24) bytes (1.1 GB for the 4M cells of a res-6 world at d = 64, "
            "7.8 GB for 28M), and its own database pool. Python answers one request at a time per process: two "
            "workers on the 2-core development machine served POST /search at twice the rate of one."
        ),
    )
    pool_size: int = Field(
        8, ge=1, le=64, description="Database connections kept open by the API (one per concurrent request at most)."
    )
    default_k: int = Field(
        50,
        ge=1,
        le=1000,
        description="Number of similar cells the viewer asks for at first (the API's default k is 10).",
    )
    default_radius_km: float = Field(
        500, gt=0, le=5000, description="Search radius the viewer starts with, in kilometres."
    )
    tile_max_features: int = Field(
        4000,
        ge=100,
        le=20000,
        description=(
            "Most hexagons in one vector tile; each zoom level shows the finest rollup resolution whose cells fit "
            "a tile within this count."
        ),
    )
    cors_allow_origins: list[str] = Field(
        [],
        description=(
            "Origins (scheme://host[:port]) whose web pages may call the API from a browser (CORS); [] = same "
            "origin only (the viewer the API serves itself); ['*'] = any origin (a public, read-only API)."
        ),
    )
    max_body_bytes: int = Field(
        1_048_576,
        ge=1024,
        le=67_108_864,
        description="Largest request body the API reads, in bytes; a larger one is refused with 413.",
    )
    statement_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description=(
            "Longest a database query of the API may run, in seconds: the database cancels it and the request "
            "gets 503 with a message (PostgreSQL statement_timeout of the API's connections)."
        ),
    )

    @model_validator(mode="after")
    def _check_origins(self) -> ServeConfig:
        for i, origin in enumerate(self.cors_allow_origins):
            if origin != "*" and not re.fullmatch(r"https?://[^/\s?#]+", origin):
                _fail(
                    f"cors_allow_origins.{i}",
                    f"expected '*' or an origin scheme://host[:port] without a path, e.g. https://maps.example.org, "
                    f"got {origin!r}",
                )
        return self


# --- stencil -------------------------------------------------------------------------------------


def _no_property_defaults(schema: dict[str, Any]) -> None:
    # Snakemake fills defaults by setting them on every instance a "properties" keyword sees, even one that
    # is not an object (a null extent checked against the object branch of anyOf): so, no defaults here.
    for prop in schema.get("properties", {}).values():
        prop.pop("default", None)


class ExtentConfig(Section):
    """An area to restrict the run to: exactly one of ``bbox`` and ``regions``."""

    model_config = ConfigDict(json_schema_extra=_no_property_defaults)

    bbox: list[float] | None = Field(
        None,
        min_length=4,
        max_length=4,
        description="[west, south, east, north] in degrees (west > east crosses the antimeridian).",
    )
    regions: list[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{15}$")]] | None = Field(
        None, min_length=1, description="H3 cells (15 hex digits) at stencil.region_resolution."
    )

    @model_validator(mode="after")
    def _one_of(self) -> ExtentConfig:
        if (self.bbox is None) == (self.regions is None):
            _fail("", "expected exactly one of 'bbox' and 'regions'")
        if self.bbox is not None:
            w, s, e, n = self.bbox
            if not (-90 <= s < n <= 90):
                _fail("bbox", f"expected south < north within [-90, 90], got {s}, {n}")
            if not (-180 <= w <= 180 and -180 <= e <= 180 and w != e):
                _fail("bbox", f"expected west != east within [-180, 180], got {w}, {e}")
        return self


class StencilConfig(Section):
    """Which H3 cells get an embedding."""

    resolution: int = Field(5, ge=0, le=12, description="H3 resolution of the embedded cells (7 in production).")
    region_resolution: int = Field(
        0, ge=0, le=6, description="H3 resolution of region cells; one job per region downstream."
    )
    extent: ExtentConfig | None = Field(
        None,
        description=(
            "Restrict the run to an area: null (the whole world), {bbox: [west, south, east, north]} in degrees, "
            "or {regions: [h3 cell strings at region_resolution]}."
        ),
    )
    extent_margin_km: float = Field(
        300,
        ge=0,
        description=(
            "With an extent, prepared layers are cropped to its bbox grown by this many km; it must cover a patch "
            "around a neighbor of an anchor (sample.neighbor_km_max + 0.71 * sample.patch_km). Kept apart from the "
            "sample keys so that changing them does not re-prepare the layers."
        ),
    )
    prune_resolution: int = Field(
        3,
        ge=0,
        le=10,
        description="Resolution at which all-ocean parent cells are skipped before the exact centroid test.",
    )

    @model_validator(mode="after")
    def _check_resolutions(self) -> StencilConfig:
        if self.region_resolution > self.resolution:
            _fail(
                "region_resolution",
                f"must be <= stencil.resolution ({self.resolution}), got {self.region_resolution}",
            )
        if self.prune_resolution > self.resolution:
            _fail("prune_resolution", f"must be <= stencil.resolution ({self.resolution}), got {self.prune_resolution}")
        if self.extent is not None and self.extent.regions is not None:
            import h3

            for r in self.extent.regions:
                if not h3.is_valid_cell(r) or h3.get_resolution(r) != self.region_resolution:
                    _fail(
                        "extent.regions", f"'{r}' is not a valid H3 cell at region_resolution {self.region_resolution}"
                    )
        return self


# --- sampling, model, training -------------------------------------------------------------------


class SampleConfig(Section):
    """Triplet sampling (stage 1)."""

    shards: int = Field(
        8, ge=2, description="Number of npz shards; the last one is held out for validation by training."
    )
    per_shard: int = Field(20000, ge=1, description="Accepted triplets per shard (exactly).")
    seed: int = Field(
        0, description="Base seed; shard i uses the seed sequence (seed, i), so each shard is reproducible on its own."
    )
    patch_px: int = Field(16, ge=4, description="Patch size in pixels (P × P), the model's input size.")
    patch_km: float = Field(80, gt=0, description="Ground width of a patch in km, the same at every latitude.")
    neighbor_km_min: float = Field(40, ge=0, description="Minimum great-circle anchor-neighbor distance in km.")
    neighbor_km_max: float = Field(160, gt=0, description="Maximum great-circle anchor-neighbor distance in km.")
    distant_km_min: float = Field(250, ge=0, description="Minimum great-circle anchor-distant distance in km.")
    max_nodata_frac: float = Field(
        0.5,
        ge=0,
        le=1,
        description=(
            "Reject a triplet when any patch of any layer has more than this fraction of nodata / water pixels."
        ),
    )
    max_same_frac: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Reject a triplet when any categorical patch's most common class covers more than this fraction.",
    )
    batch: int = Field(
        4096, ge=1, description="Candidate triplets drawn per vectorised batch (memory per batch grows with it)."
    )
    context_scales: list[Annotated[float, Field(gt=1)]] = Field(
        [8.0],
        description=(
            "Wide context patches besides the local one: each a patch_px x patch_px patch covering patch_km times "
            "this factor (sampled more coarsely), so the model sees every location at several scales. [] = the "
            "local patch only. Only the local patch decides whether a triplet or a cell is usable."
        ),
    )

    @model_validator(mode="after")
    def _check_band(self) -> SampleConfig:
        if self.neighbor_km_min >= self.neighbor_km_max:
            _fail(
                "neighbor_km_min",
                f"must be < sample.neighbor_km_max ({self.neighbor_km_max}), got {self.neighbor_km_min}",
            )
        return self

    @property
    def scales(self) -> tuple[float, ...]:
        """Footprint factors of every patch scale: 1 (the local patch), then the context scales."""
        return (1.0, *(float(x) for x in self.context_scales))

    @property
    def margin_km(self) -> float:
        """Distance from an anchor that a neighbor's patch can reach."""
        return self.neighbor_km_max + KM_PATCH_DIAGONAL * self.patch_km


class ModelConfig(Section):
    """The Tile2Vec ResNet encoder (stage 2); recorded in model.pt, which rebuilds itself from the file."""

    width: int = Field(16, ge=1, description="Channels of the stem and the first stage; each later stage doubles them.")
    stages: int = Field(
        3, ge=1, description="Residual stages; every stage after the first halves the spatial size (stride 2)."
    )
    blocks_per_stage: int = Field(
        2, ge=1, description="Residual blocks (two 3x3 conv-BN layers plus a skip) in every stage."
    )
    embedding_dim: int = Field(16, ge=1, description="Length of the L2-normalised embedding vector.")
    head_hidden: int = Field(
        64, ge=1, description="Hidden units of the MLP head between global average pooling and the embedding."
    )


Device = Literal["auto", "cpu", "cuda"]


class TrainConfig(Section):
    """Training on the sampled triplets (stage 2). Same config and shards on CPU give identical weights."""

    device: Device = Field(
        "auto",
        description=(
            "auto (CUDA when the machine has a GPU, else CPU), cpu or cuda. When it resolves to cuda the "
            "train_model rule requests resources gpu=1 (set it to cuda explicitly for cluster submission)."
        ),
    )
    epochs: int = Field(
        1,
        ge=1,
        description=(
            "Maximum passes over the training shards (cosine learning-rate decay spans them). One pass over the "
            "default 140,000 training triplets reaches a validation triplet accuracy of about 0.95."
        ),
    )
    batch_size: int = Field(256, ge=2, description="Triplets per optimisation step.")
    lr: float = Field(0.002, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0001, ge=0, description="AdamW decoupled weight decay.")
    objective: Literal["triplet", "infonce", "vicreg"] = Field(
        "triplet",
        description=(
            "Training objective on the sampled triplets: triplet (margin loss, anchor nearer its neighbor than "
            "its distant patch), infonce (anchor and neighbor are positives, the batch's other neighbors and "
            "distant patches negatives; temperature below) or vicreg (invariance, variance and covariance terms "
            "on anchor and neighbor). See vectorgeo.objectives."
        ),
    )
    margin: float = Field(0.5, gt=0, description="Triplet margin on unit-vector distances (which lie in [0, 2]).")
    temperature: float = Field(0.1, gt=0, description="InfoNCE temperature (objective infonce).")
    reconstruction: float = Field(
        0.0,
        ge=0,
        description=(
            "Weight of the reconstruction loss: a linear head predicts each patch's class fractions and band means "
            "(every scale) from the embedding. 0 = no reconstruction head."
        ),
    )
    grad_clip: float = Field(
        1.0, gt=0, description="Maximum global gradient norm (clipped after backward, before the step)."
    )
    patience: int = Field(
        2,
        ge=1,
        description=(
            "Early stopping; epochs without a better validation triplet accuracy before stopping (best weights "
            "are restored)."
        ),
    )
    val_shards: int = Field(1, ge=1, description="The last this many sample shards are held out for validation.")
    shards_in_memory: int = Field(
        16,
        ge=1,
        description="Training shards held in memory at once; batches are shuffled across them (bounds memory).",
    )
    amp: bool = Field(
        True, description="Mixed precision (bfloat16, or float16 with loss scaling) on CUDA; ignored on CPU."
    )
    seed: int = Field(0, description="Seed of weight initialisation and batch shuffling.")


# --- embedding -----------------------------------------------------------------------------------


class EmbedConfig(Section):
    """Stage 3: one embedding per stencil cell, one GeoParquet file per region, plus rollups.

    The patch spec (patch_px, patch_km) comes from model.pt, never from here.
    """

    batch_size: int = Field(
        2048,
        ge=1,
        description=(
            "Cells per model batch. An execution setting (changing it does not rerun regions); memory per batch "
            "grows with it."
        ),
    )
    max_nodata_frac: float = Field(
        0.9,
        ge=0,
        le=1,
        description=(
            "A cell whose patch has, for any layer, more than this fraction of nodata / water / off-grid pixels "
            "gets a null embedding and status 'nodata'. Homogeneous patches stay valid."
        ),
    )
    device: Device = Field(
        "auto",
        description=(
            "auto (CUDA when the machine running Snakemake sees a GPU, else CPU), cpu or cuda. When it resolves to "
            "cuda the embed_batch rule requests resources gpu=1 (set cuda explicitly for cluster submission). An "
            "execution setting: changing it does not rerun regions."
        ),
    )
    cpu_threads: int = Field(
        1,
        ge=1,
        description=(
            "Threads of one embed_batch job on CPU: torch's intra-op threads (one more thread gathers patches); "
            "Snakemake runs --cores / cpu_threads batches at once. On the 2-core development machine two one-thread "
            "jobs side by side embedded a res-6 world in 850 s, one two-thread job at a time in 1,157 s. On CUDA a "
            "job takes 4 threads to gather patches for the GPU. An execution setting: changing it does not rerun "
            "regions."
        ),
    )
    batch_cells: int = Field(
        200_000,
        ge=1,
        description=(
            "Cells per embed job: regions, in id order, are grouped into batches of at least this many cells, "
            "and one embed_batch job embeds a batch, so that Python, torch (and CUDA) start once per batch "
            "instead of once per region (~1 s each). A batch's region files are in "
            "results/embeddings/batches/batch-{region}-{digest}/; a batch reruns when one of its regions' cells "
            "change. 1 gives one job per region."
        ),
    )
    rollup_resolutions: list[Annotated[int, Field(ge=0, le=15)]] = Field(
        [2, 3],
        description=(
            "H3 resolutions (coarser than stencil.resolution) of the rollup files "
            "results/embeddings/rollup/res{p}.parquet: the re-normalised mean of the ok children."
        ),
    )


# --- evaluation ----------------------------------------------------------------------------------

BASE_METHODS: tuple[str, ...] = (
    "embedding",
    "random_init",
    "class_histogram",
    "context_histogram",
    "pca_raw",
    "random_features",
    "latlng",
)
"""Feature methods the evaluation knows; ``embedding`` is the method under test. Every method but latlng
also exists as ``<method>+latlng`` (its features beside the latlng vector)."""

SAME_INPUT_BASELINES: tuple[str, ...] = (
    "class_histogram",
    "context_histogram",
    "pca_raw",
    "random_init",
    "random_features",
)
"""Baselines computed from the same input layers as the model: the embedding must beat each on content tasks."""

METHODS: tuple[str, ...] = (*BASE_METHODS, *(f"{m}+latlng" for m in BASE_METHODS if m != "latlng"))
"""Every method name the evaluation accepts (the default list)."""


class TaskConfig(Section):
    """A held-out evaluation task (``evaluate.tasks.<name>``)."""

    kind: Literal["classification", "regression"] = Field(
        description="classification (probes report macro-F1 and accuracy) or regression (R²)."
    )
    type: Literal["raster", "vector"] = Field(
        "raster", description="raster (looked up like a layer) or vector (point in polygon; classification only)."
    )
    source: str = Field(
        min_length=1,
        description=(
            "A GeoTIFF path, an s3:// or https:// URL, or `builtin:<name>`: raster built-ins as for layers ("
            + ", ".join(sorted(BUILTINS))
            + "), vector built-in "
            + ", ".join(sorted(VECTOR_BUILTINS))
            + "; or a vector file path."
        ),
    )
    field: str | None = Field(
        None, description="Vector only. Attribute holding the label (null: the built-in's own label attribute)."
    )
    nodata: float | None = Field(None, description="Raster only. Raw nodata value, or null.")
    classes: dict[int, str] | None = Field(None, description="Raster classification only. Raw value -> class name.")
    scale: float = Field(1.0, description="Raster regression only. Label = raw * scale + offset.")
    offset: float = Field(0.0, description="Raster regression only. Label = raw * scale + offset.")
    min_class_cells: int = Field(
        20, ge=1, description="Classification. Classes with fewer evaluated cells are dropped from the task."
    )
    location: bool = Field(
        False,
        description=(
            "A task decided mostly by where a cell is (e.g. country) rather than what is there: the goal compares "
            "embedding+latlng with latlng and every <baseline>+latlng. Otherwise a content task: the embedding "
            "must beat every same-input baseline."
        ),
    )

    @model_validator(mode="after")
    def _check_type(self) -> TaskConfig:
        name = builtin_name(self.source)
        known = VECTOR_BUILTINS if self.type == "vector" else BUILTINS
        if name is not None and name not in known:
            _fail(
                "source", f"unknown built-in {self.type} data set '{name}'; expected one of {', '.join(sorted(known))}"
            )
        if self.type == "vector":
            if self.kind != "classification":
                _fail("kind", "vector tasks are classification tasks (one label per polygon)")
            if self.field is None and name is None:
                _fail("field", "a vector task needs the name of its label attribute")
        elif self.kind == "classification" and not self.classes:
            _fail("classes", "a raster classification needs a mapping raw value -> class name")
        return self

    @property
    def label_field(self) -> str | None:
        """The vector attribute holding the label (a built-in's own when ``field`` is null)."""
        name = builtin_name(self.source)
        if self.type != "vector":
            return None
        return self.field or (VECTOR_BUILTINS[name].field if name else None)


def _default_tasks() -> dict[str, TaskConfig]:
    return {
        "koppen": TaskConfig(
            kind="classification",
            source="builtin:koppen_geiger",
            nodata=0,
            classes={1: "tropical", 2: "arid", 3: "temperate", 4: "cold", 5: "polar"},
        ),
        "elevation": TaskConfig(
            kind="regression", source="builtin:pvlib_altitude", nodata=255, scale=28.0, offset=-450.0
        ),
        "turbidity": TaskConfig(kind="regression", source="builtin:linke_turbidity", scale=0.05),
        "country": TaskConfig(
            kind="classification",
            type="vector",
            source="builtin:naturalearth_countries",
            field="ADMIN",
            location=True,
        ),
    }


class EvaluateConfig(Section):
    """Stage 6, the evaluation report.

    Held-out tasks looked up at cell centroids, probed with the embedding and with cheap baselines under
    spatial-block cross-validation.
    """

    max_cells: int = Field(
        20000,
        ge=10,
        description="Cells (with a usable embedding) drawn with `seed` for the probes; bounds the run time.",
    )
    map_cells: int = Field(
        200000, ge=1, description="Cells drawn for the report's embedding map (a superset of the probe cells)."
    )
    seed: int = Field(0, description="Seed of the cell draw, the fold assignment and the PCA solvers.")
    folds: int = Field(5, ge=2, description="Number of spatial-block cross-validation folds.")
    fold_resolution: int = Field(
        1,
        ge=0,
        le=15,
        description=(
            "H3 resolution of the blocks that decide a cell's fold (all cells of a block share it), so that "
            "neighbours of a test cell are never in training. Must be <= stencil.resolution."
        ),
    )
    knn_k: int = Field(5, ge=1, description="Neighbours of the kNN probes.")
    logistic_c: float = Field(
        1.0, gt=0, description="Inverse L2 regularisation strength of the logistic-regression probe."
    )
    logistic_max_iter: int = Field(300, ge=1, description="Iteration limit of the logistic-regression solver (lbfgs).")
    ridge_alpha: float = Field(1.0, ge=0, description="L2 penalty of the ridge-regression probe.")
    pca_fit_cells: int = Field(
        4000,
        ge=1,
        description="Cells the pca_raw PCA and the random_features filters are fitted on (memory grows with it).",
    )
    random_features: int = Field(
        1024,
        ge=2,
        multiple_of=2,
        description=(
            "Width of the random_features baseline (MOSAIKS-style: half as many whitened 3x3 filters drawn from "
            "real encoded patches, each giving two ReLU features averaged over the patch)."
        ),
    )
    context_scales: list[Annotated[float, Field(gt=0)]] = Field(
        [0.2, 1.0, 8.0],
        min_length=2,
        description=(
            "Scales of the context_histogram baseline, as factors of the model's patch footprint (patch_km): by "
            "default about the cell's own footprint, the local patch and the wide context the model sees."
        ),
    )
    context_px: int = Field(
        32, ge=2, description="Pixels across each context_histogram patch (sampled nearest-neighbour, every scale)."
    )
    label_fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        [0.01, 0.1, 1.0],
        min_length=1,
        description=(
            "Label-efficiency curve: the linear probes are also trained on these fractions of each training "
            "fold's cells (drawn with seed) and scored on the whole test fold."
        ),
    )
    selection_fraction: float = Field(
        0.2,
        ge=0,
        lt=1,
        description=(
            "Fraction of fold blocks (H3 parents at fold_resolution, chosen by a hash of the block id) held out "
            "for model selection: their cells are never evaluated here, and benchmarks/eval_experiments.py "
            "chooses variants and hyperparameters on them only. 0 = none held out."
        ),
    )
    batch_size: int = Field(
        256, ge=1, description="Cells per batch when patches are gathered and encoded for the baselines."
    )
    methods: list[str] = Field(
        list(METHODS),
        min_length=1,
        description=(
            "Feature methods compared on the same cells and folds: embedding (the method under test), "
            + ", ".join(BASE_METHODS[1:])
            + ", and <method>+latlng for every method but latlng."
        ),
    )
    tasks: dict[str, TaskConfig] = Field(
        _default_tasks(),
        min_length=1,
        description=(
            "Held-out tasks, name -> task. Labels are looked up at cell centroids from data that is not a model "
            "input. Add a task by adding an entry."
        ),
    )

    @model_validator(mode="after")
    def _check_methods(self) -> EvaluateConfig:
        if "embedding" not in self.methods:
            _fail("methods", "must include 'embedding' (the method under test)")
        if len(set(self.methods)) != len(self.methods):
            _fail("methods", f"lists a method twice: {self.methods}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            _fail("methods", f"unknown method(s) {unknown}; expected some of {', '.join(METHODS)}")
        return self


# --- the whole config ----------------------------------------------------------------------------


class Config(Section):
    """Configuration of the vectorgeo workflow.

    Validated by `snakemake.utils.validate` (which fills in the defaults) before any job runs, and by
    `vectorgeo.config.load_config`. Generated from the models in src/vectorgeo/config.py: edit those,
    then run `python -m vectorgeo.config schema > config/schema.yaml`.
    """

    layers: dict[str, LayerConfig] = Field(
        min_length=1, description="Named input raster layers; every layer is a model input channel group."
    )
    land_mask: LandMaskConfig = Field(
        description="The raster that decides what is land (stencil cells, sample anchors)."
    )
    results: str = Field(
        "results", min_length=1, description="Folder (or storage prefix) that holds every output of the workflow."
    )
    database: DatabaseConfig = Field(DatabaseConfig(), description=_doc(DatabaseConfig))
    serve: ServeConfig = Field(ServeConfig(), description=_doc(ServeConfig))
    stencil: StencilConfig = Field(StencilConfig(), description=_doc(StencilConfig))
    sample: SampleConfig = Field(SampleConfig(), description=_doc(SampleConfig))
    model: ModelConfig = Field(ModelConfig(), description=_doc(ModelConfig))
    train: TrainConfig = Field(TrainConfig(), description=_doc(TrainConfig))
    embed: EmbedConfig = Field(EmbedConfig(), description=_doc(EmbedConfig))
    evaluate: EvaluateConfig = Field(EvaluateConfig(), description=_doc(EvaluateConfig))

    @model_validator(mode="after")
    def _check_across_sections(self) -> Config:
        for name in self.layers:
            if name == "land_mask":
                _fail("layers.land_mask", "the name 'land_mask' is reserved for the land mask; rename the layer")
            if not LAYER_NAME.match(name):
                _fail(f"layers.{name}", "a layer name must start with a letter and hold only letters, digits and _")
        res = self.stencil.resolution
        finer = [p for p in self.embed.rollup_resolutions if p > res]
        if finer:
            _fail("embed.rollup_resolutions", f"{finer} must not be finer than stencil.resolution ({res})")
        if self.evaluate.fold_resolution > res:
            _fail(
                "evaluate.fold_resolution",
                f"must be <= stencil.resolution ({res}), got {self.evaluate.fold_resolution}",
            )
        if self.stencil.extent is not None and self.stencil.extent_margin_km < self.sample.margin_km:
            _fail(
                "stencil.extent_margin_km",
                f"must be >= sample.neighbor_km_max + {KM_PATCH_DIAGONAL} * sample.patch_km = "
                f"{self.sample.margin_km:.0f} km so that patches near the extent's edge stay inside the cropped "
                f"layers, got {self.stencil.extent_margin_km}",
            )
        if self.train.val_shards >= self.sample.shards:
            _fail(
                "train.val_shards",
                f"must be < sample.shards ({self.sample.shards}) so that some shards are left for training",
            )
        return self


# --- errors, parsing, loading ----------------------------------------------------------------------

_TAG = re.compile(r"^[\w-]*\[.*\]$|^(str|int|float|bool|list|dict|none)$")


def config_error(e: ValidationError, prefix: str = "") -> ConfigError:
    """The first error of a pydantic validation as a :class:`ConfigError` naming the dotted key."""
    err = e.errors(include_url=False)[0]
    parts = [str(p) for p in err["loc"] if not (isinstance(p, str) and _TAG.match(p))]
    ctx = err.get("ctx") or {}
    if ctx.get("key"):
        parts.append(str(ctx["key"]))
    if prefix:
        parts.insert(0, prefix)
    key = ".".join(parts) or "(top level)"
    kind = err["type"]
    if kind == "vectorgeo":
        message = str(ctx["message"])
    elif kind == "extra_forbidden":
        message = "unknown key (check its spelling against config/schema.yaml)"
    elif kind == "missing":
        message = "is required"
    else:
        message = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {err['input']!r}"
    return ConfigError(key, message)


def parse(config: Mapping[str, Any]) -> Config:
    """Validate a config mapping into a :class:`Config` (defaults filled in, cross-field checks run).

    Raises:
        ConfigError: naming the first key at fault.
    """
    if not isinstance(config, Mapping):
        raise ConfigError("(top level)", f"expected a mapping, got {type(config).__name__}")
    try:
        return Config.model_validate(dict(config))
    except ValidationError as e:
        raise config_error(e) from None


def section(model: type[S], values: Mapping[str, Any] | None, key: str) -> S:
    """Validate one section (e.g. a rule's ``params``) into its typed model.

    Raises:
        ConfigError: naming ``key.<field>`` at fault.
    """
    try:
        return model.model_validate(dict(values or {}))
    except ValidationError as e:
        raise config_error(e, key) from None


def complete(config: MutableMapping[str, Any]) -> Config:
    """Validate a config in place: replace its content by the validated one with every default filled in."""
    cfg = parse(config)
    config.clear()
    config.update(cfg.model_dump(mode="json"))
    return cfg


class _SchemaWithoutFieldTitles(GenerateJsonSchema):
    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Config` (what config/schema.yaml holds)."""
    s = Config.model_json_schema(mode="validation", schema_generator=_SchemaWithoutFieldTitles)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **s}


def schema_yaml() -> str:
    """:func:`schema` as YAML text, with a header saying where it comes from."""
    header = (
        "# Generated from the models in src/vectorgeo/config.py; do not edit by hand.\n"
        "# Regenerate: python -m vectorgeo.config schema > config/schema.yaml\n"
    )
    return header + yaml.safe_dump(schema(), sort_keys=False, allow_unicode=True, width=110)


# --- checks that read files ------------------------------------------------------------------------


def _check_local(path: str, key: str) -> None:
    from vectorgeo.rasters import inspect_source

    if not os.path.exists(path):
        raise ConfigError(key, f"raster file '{path}' does not exist")
    try:
        inspect_source(path)
    except RasterError as e:
        raise ConfigError(key, str(e)) from None


def check_source_files(source: str | list[str], key: str) -> None:
    """Check that a source's local files exist and are lat/lng rasters (remote ones are not fetched).

    Raises:
        ConfigError: naming ``key``.
    """
    name = builtin_name(source)
    if name is not None:
        builtin_path(name, key)
        return
    if isinstance(source, list) or any(ch in source for ch in "*?["):
        for t in expand_tiles(source, key):
            if not is_remote(t):
                _check_local(t, key)
        return
    if not is_remote(source):
        _check_local(source, key)


def check_files(cfg: Config) -> None:
    """Check every local input: layer and land-mask rasters, built-in packages, task sources.

    Raises:
        ConfigError: naming the key whose file is missing or unusable.
    """
    for name, layer in cfg.layers.items():
        check_source_files(layer.source, f"layers.{name}.source")
    check_source_files(cfg.land_mask.source, "land_mask.source")
    for name, task in cfg.evaluate.tasks.items():
        key = f"evaluate.tasks.{name}.source"
        bname = builtin_name(task.source)
        if bname is not None:
            builtin_path(bname, key, vector=task.type == "vector")
        elif task.type == "vector" and not os.path.exists(task.source):
            raise ConfigError(key, f"vector file '{task.source}' does not exist")


def check(config: Mapping[str, Any], check_files_too: bool = True) -> Config:
    """Validate a config and (by default) the local files it names.

    Raises:
        ConfigError: naming the key at fault.
    """
    cfg = parse(config)
    if check_files_too:
        check_files(cfg)
    return cfg


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file as it is (no validation, no defaults).

    Raises:
        ConfigError: unreadable file, or not a mapping at the top level.
    """
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError(str(path), f"cannot read config file: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), f"not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(str(path), "expected a mapping at the top level")
    return cfg


def deep_update(base: MutableMapping[str, Any], other: Mapping[str, Any]) -> MutableMapping[str, Any]:
    """Merge ``other`` into ``base`` recursively, as Snakemake merges several ``--configfile``s."""
    for k, v in other.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), MutableMapping):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def load_config(
    path: str | Path | list[str | Path], overrides: Mapping[str, Any] | None = None, check_files_too: bool = True
) -> dict[str, Any]:
    """Load, validate and complete a config file (or several, merged in order like ``--configfile``).

    Args:
        path: YAML file(s).
        overrides: Top-level keys that replace those from the file(s).
        check_files_too: Also check that the local rasters it names exist and are usable.

    Returns:
        The config as a plain dict with every default filled in.

    Raises:
        ConfigError: unreadable file or invalid content.
    """
    paths = path if isinstance(path, list) else [path]
    cfg: dict[str, Any] = {}
    for p in paths:
        deep_update(cfg, read_config_file(p))
    if overrides:
        cfg.update(overrides)
    typed = check(cfg, check_files_too)
    return typed.model_dump(mode="json")


def main(argv: list[str] | None = None) -> int:
    """``python -m vectorgeo.config schema``: print the JSON Schema as YAML."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if args != ["schema"]:
        print("usage: python -m vectorgeo.config schema > config/schema.yaml", file=sys.stderr)
        return 2
    sys.stdout.write(schema_yaml())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
