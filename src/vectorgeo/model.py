"""The Tile2Vec encoder: input encoding, a multi-scale ResNet, and a self-describing model file.

Input encoding (:func:`encode`, the one place that turns patches into model
input). A batch is a mapping patch key -> array of shape (N, P, P) (or
(N, P, P, B) for a multi-band layer), as stored in sample shards and as
returned by ``vectorgeo.sampling.patches``: key ``L`` is layer L's local patch,
``L@k`` its context patch at scale k. Channels are laid out scale by scale, and
layer by layer in the order of the layer specs within a scale:

* categorical layer with K classes -> K one-hot channels; pixel value ``k`` in
  ``0..K-1`` sets channel ``k`` to 1, nodata (255, or any value >= K) leaves
  all K channels at 0.
* continuous layer -> per band one *value* channel (two for ``both``: relief
  then level), then one *validity* channel. A pixel is valid when every band
  is finite (nodata is NaN). Values are scaled per the layer's ``normalize``:

  - ``patch_minmax``: :math:`v' = (v - \\min_p) / (\\max_p - \\min_p)` with the
    min and max over the valid pixels of that patch; a flat patch
    (:math:`\\max_p = \\min_p`) gives 0 everywhere (relief);
  - ``standardize``: :math:`v' = (v - \\mu_b) / \\sigma_b` with the spec's global
    ``mean`` and ``std`` of band b (level);
  - ``both``: the relief channel, then the level channel.

  Invalid pixels get value 0 and validity 0; valid pixels validity 1.

So per scale :math:`C = \\sum_{cat} K_l + \\sum_{cont} (B_l m_l + 1)` with
:math:`m_l = 2` for ``both`` else 1, and the input has :math:`S \\cdot C` channels.

Network (:class:`Encoder`): per scale a :class:`Trunk` (a 3x3 stem convolution,
``stages`` stages of ``blocks_per_stage`` residual blocks each (3x3
conv-BN-ReLU-3x3 conv-BN plus an identity skip, or a strided 1x1 conv-BN
projection where the shape changes), channel width doubling and spatial stride
2 between stages, global average pooling); the pooled features of all scales
are concatenated, an MLP head (Linear-ReLU-Linear) maps them to
``embedding_dim`` and L2 normalisation makes every embedding a unit vector.

Model file (:func:`save` / :func:`load`): a ``torch.save`` dict of plain types
``{"format": "vectorgeo-model", "format_version": 2, "state_dict", "metadata"}``.
The metadata carries everything inference needs: ``layers`` (name -> spec
dict, in channel order), ``patch_px``, ``patch_km``, ``scales``,
``architecture``, ``embedding_dim``, ``in_channels``, ``train`` (the training
config), ``library_version`` and ``model_version``: the first 12 hex digits of
the SHA-256 of the weights and the rest of the metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vectorgeo.atomic import atomic_path
from vectorgeo.config import ModelConfig, TrainConfig, section
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.layers import LayerSpec

FORMAT = "vectorgeo-model"
FORMAT_VERSION = 2

SpecsLike = Mapping[str, LayerSpec] | Mapping[str, Any]


def specs_of(specs_or_metadata: SpecsLike) -> dict[str, LayerSpec]:
    """Layer specs, in channel order, from specs or from model/shard metadata.

    Args:
        specs_or_metadata: ``{name: LayerSpec}``, or a metadata dict whose
            ``layers`` is ``{name: spec dict}`` (or a list of spec dicts).

    Raises:
        ConfigError: the metadata has no usable ``layers``.
    """
    if "layers" in specs_or_metadata and not isinstance(specs_or_metadata["layers"], LayerSpec):
        layers = specs_or_metadata["layers"]
        if isinstance(layers, Mapping):
            items = list(layers.values())
        elif isinstance(layers, list):
            items = layers
        else:
            raise ConfigError("layers", f"expected layer spec dicts in metadata, got {type(layers).__name__}")
        out: dict[str, LayerSpec] = {}
        for d in items:
            if isinstance(d, LayerSpec):
                out[d.name] = d
            else:
                spec = LayerSpec.from_dict(d)
                out[spec.name] = spec
        return out
    out = {}
    for name, spec in specs_or_metadata.items():
        if not isinstance(spec, LayerSpec):
            raise ConfigError(f"layers.{name}", f"expected a LayerSpec, got {type(spec).__name__}")
        out[str(name)] = spec
    return out


def n_scales_of(specs_or_metadata: SpecsLike, batch: Mapping[str, Any] | None = None) -> int:
    """Number of patch scales: the metadata's ``scales``, else the ``name@k`` keys of a batch, else 1."""
    scales = specs_or_metadata.get("scales") if "layers" in specs_or_metadata else None
    if isinstance(scales, (list, tuple)) and scales:
        return len(scales)
    if batch:
        first = next(iter(specs_of(specs_or_metadata)), None)
        k = 1
        while first is not None and f"{first}@{k}" in batch:
            k += 1
        return k
    return 1


def input_channels(specs_or_metadata: SpecsLike) -> int:
    """Number of input channels C of the encoding of these layers at one scale."""
    return len(channel_names(specs_or_metadata, 1))


def _continuous_channels(spec: LayerSpec) -> list[str]:
    bands = list(spec.bands) or ["value"]
    if spec.normalize == "both":
        return [f"{b}:{kind}" for b in bands for kind in ("relief", "level")] + ["valid"]
    return [*bands, "valid"]


def channel_names(specs_or_metadata: SpecsLike, n_scales: int | None = None) -> list[str]:
    """Names of the input channels in order, e.g. ``landcover:water``, ``elevation:valid``, ``landcover@1:water``.

    Channels are laid out scale by scale (the local patch first), layer by layer within a scale.
    """
    n = n_scales_of(specs_or_metadata) if n_scales is None else n_scales
    names: list[str] = []
    for k in range(n):
        for name, spec in specs_of(specs_or_metadata).items():
            key = name if k == 0 else f"{name}@{k}"
            if spec.kind == "categorical":
                names.extend(f"{key}:{c}" for c in spec.class_names)
            elif spec.kind == "continuous":
                names.extend(f"{key}:{c}" for c in _continuous_channels(spec))
            else:
                raise ConfigError(f"layers.{name}.kind", f"expected categorical or continuous, got {spec.kind!r}")
    return names


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device, non_blocking=True) if device is not None else t


def _patch_minmax(v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    inf = torch.tensor(float("inf"), device=v.device)
    lo = torch.where(valid, v, inf).amin(dim=(1, 2), keepdim=True)
    hi = torch.where(valid, v, -inf).amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    return torch.where(ok, (v - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(v))


def _encode_continuous(x: torch.Tensor, spec: LayerSpec, out: torch.Tensor) -> int:
    """Write a continuous layer's channels into ``out`` (N, c, P, P); returns c."""
    v = x.to(torch.float32)
    if v.ndim == 3:
        v = v.unsqueeze(-1)
    # a pixel is valid where every band is finite (band by band: a reduction over a last axis of 1 to 3
    # values is slower than the comparisons themselves)
    valid = torch.isfinite(v[..., 0])
    for b in range(1, v.shape[-1]):
        valid &= torch.isfinite(v[..., b])
    # channels are computed straight into ``out`` and zeroed where invalid in place (most patches
    # have no invalid pixel: then nothing is zeroed)
    invalid = ~valid
    zero_invalid = bool(invalid.any())
    c = 0
    for b in range(v.shape[-1]):
        vb = v[..., b]
        kinds = ("patch_minmax", "standardize") if spec.normalize == "both" else (spec.normalize,)
        for kind in kinds:
            o = out[:, c]
            if kind == "standardize":
                torch.sub(vb, spec.mean[b], out=o)
                o.div_(spec.std[b])
            else:
                o.copy_(_patch_minmax(vb, valid))
            if zero_invalid:
                o.masked_fill_(invalid, 0.0)
            c += 1
    out[:, c] = valid
    return c + 1


def _one_hot(x: torch.Tensor, n_cls: int, out: torch.Tensor) -> None:
    """One-hot class indices (N, P, P) into ``out`` (N, n_cls, P, P); nodata (255) and values >= n_cls: all zero."""
    if x.device.type == "cpu" and out.device.type == "cpu" and x.dtype == torch.uint8:
        # one comparison per class straight into the float channel (measured 1.6x faster than zero + scatter)
        xn, on = x.numpy(), out.numpy()
        for k in range(n_cls):
            np.equal(xn, k, out=on[:, k], casting="unsafe")
        return
    idx = x.to(torch.int64)
    known = idx < n_cls
    out.zero_()
    out.scatter_(1, torch.where(known, idx, 0).unsqueeze(1), known.unsqueeze(1).to(torch.float32))


def encode(
    batch: Mapping[str, np.ndarray | torch.Tensor],
    specs_or_metadata: SpecsLike,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Encode a batch of patches into model input (see the module docstring).

    Args:
        batch: Patch key -> (N, P, P) array (``(N, P, P, B)`` for a multi-band layer): uint8 class
            indices (255 nodata) for categorical layers, float32 physical values (NaN nodata) for
            continuous ones; keys ``name`` for the local patch and ``name@k`` for context scale k.
            numpy arrays or tensors (kept on their device unless ``device`` is given).
        specs_or_metadata: Layer specs (``{name: LayerSpec}``; the scales are then those present in the
            batch) or model metadata (its ``scales``).
        device: Where to compute; default: where the tensors are (CPU for numpy).

    Returns:
        float32 tensor (N, S·C, P, P): the channels of every scale, scale by scale.

    Raises:
        DataError: a layer is missing from the batch or has the wrong shape.
    """
    specs = specs_of(specs_or_metadata)
    if not specs:
        raise ConfigError("layers", "no model input layers")
    n_scales = n_scales_of(specs_or_metadata, batch)
    xs: dict[str, torch.Tensor] = {}
    shape: tuple[int, ...] | None = None
    for k in range(n_scales):
        for name, spec in specs.items():
            key = name if k == 0 else f"{name}@{k}"
            if key not in batch:
                raise DataError("batch", f"layer '{key}' is missing; got {sorted(batch)}")
            x = _as_tensor(batch[key], device)
            want_ndim = 4 if spec.bands else 3
            if x.ndim != want_ndim or (shape is not None and tuple(x.shape[:3]) != shape):
                raise DataError(
                    "batch", f"layer '{key}' has shape {tuple(x.shape)}; expected (N, P, P) like the others"
                )
            shape = tuple(x.shape[:3])
            xs[key] = x
    assert shape is not None
    first = next(iter(xs.values()))
    per_scale = input_channels(specs)
    # one output buffer, filled channel group by channel group (no concatenation copies)
    out = torch.empty((shape[0], n_scales * per_scale, shape[1], shape[2]), dtype=torch.float32, device=first.device)
    c = 0
    for k in range(n_scales):
        for name, spec in specs.items():
            x = xs[name if k == 0 else f"{name}@{k}"]
            if spec.kind == "categorical":
                n_cls = spec.n_classes
                _one_hot(x, n_cls, out[:, c : c + n_cls])  # nodata (255) and out-of-range values: all zero
                c += n_cls
            else:
                c += _encode_continuous(x, spec, out[:, c:])
    return out


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a skip (identity, or 1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.skip(x), inplace=True)


class Trunk(nn.Module):
    """The ResNet of one scale: stem, residual stages, global average pooling → (N, width · 2^(stages-1))."""

    def __init__(self, in_channels: int, width: int, stages: int, blocks_per_stage: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stage_list: list[nn.Module] = []
        c = width
        for s in range(stages):
            c_out = width * 2**s
            blocks = [ResidualBlock(c, c_out, stride=1 if s == 0 else 2)]
            blocks += [ResidualBlock(c_out, c_out) for _ in range(blocks_per_stage - 1)]
            stage_list.append(nn.Sequential(*blocks))
            c = c_out
        self.stages = nn.Sequential(*stage_list)
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of a batch."""
        out: torch.Tensor = self.stages(self.stem(x)).mean(dim=(2, 3))
        return out


class Encoder(nn.Module):
    """Multi-scale ResNet encoder: (N, S·C, P, P) float -> (N, embedding_dim) unit vectors.

    Each of the S scales (the local patch, then the context patches) has its own :class:`Trunk`; their
    pooled features are concatenated and an MLP head maps them to the embedding.
    """

    def __init__(
        self,
        in_channels: int,
        *,
        width: int,
        stages: int,
        blocks_per_stage: int,
        embedding_dim: int,
        head_hidden: int,
        n_scales: int = 1,
    ) -> None:
        super().__init__()
        if min(in_channels, width, stages, blocks_per_stage, embedding_dim, head_hidden, n_scales) < 1:
            raise ConfigError(
                "model", "in_channels, width, stages, blocks_per_stage, embedding_dim, head_hidden must be >= 1"
            )
        self.in_channels = in_channels
        self.trunks = nn.ModuleList(Trunk(in_channels, width, stages, blocks_per_stage) for _ in range(n_scales))
        c = sum(t.out_channels for t in self.trunks)  # type: ignore[misc]
        self.head = nn.Sequential(
            nn.Linear(c, head_hidden), nn.ReLU(inplace=True), nn.Linear(head_hidden, embedding_dim)
        )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The head's output before normalisation (N, embedding_dim) (what variance objectives act on)."""
        parts = torch.split(x, self.in_channels, dim=1)
        h = torch.cat([trunk(p) for trunk, p in zip(self.trunks, parts, strict=True)], dim=1)
        out: torch.Tensor = self.head(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch; rows of the result have L2 norm 1."""
        return F.normalize(self.project(x).float(), dim=1)


def architecture(model_cfg: ModelConfig | Mapping[str, Any] | None) -> ModelConfig:
    """The typed ``model`` section (from the config, or from a model file's ``architecture``).

    Raises:
        ConfigError: naming the ``model.*`` key at fault.
    """
    if isinstance(model_cfg, ModelConfig):
        return model_cfg
    return section(ModelConfig, model_cfg, "model")


def build_model(
    specs_or_metadata: SpecsLike, model_cfg: ModelConfig | Mapping[str, Any] | None, n_scales: int | None = None
) -> Encoder:
    """A fresh encoder for these layers.

    Args:
        specs_or_metadata: Layer specs or model metadata (decides C, and S from the metadata's ``scales``).
        model_cfg: The ``model`` config section (or metadata ``architecture``).
        n_scales: Patch scales S (default: the metadata's, else 1).
    """
    arch = architecture(model_cfg)
    return Encoder(
        input_channels(specs_or_metadata),
        width=arch.width,
        stages=arch.stages,
        blocks_per_stage=arch.blocks_per_stage,
        embedding_dim=arch.embedding_dim,
        head_hidden=arch.head_hidden,
        n_scales=n_scales_of(specs_or_metadata) if n_scales is None else n_scales,
    )


def resolve_device(name: str, key: str) -> torch.device:
    """A device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``) as a torch device.

    ``auto`` is CUDA when torch sees a GPU, else the CPU.

    Args:
        name: The setting.
        key: Its config key (``train.device``, ``embed.device``), for the error message.

    Raises:
        ConfigError: an unknown name, or CUDA asked for where torch sees no CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not str(name).startswith("cuda"):
        raise ConfigError(key, f"expected auto, cpu or cuda, got {name!r}")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(key, f"'{name}' requested but this torch build sees no CUDA device")
    return torch.device(name)


def make_metadata(
    specs: Mapping[str, LayerSpec],
    patch_px: int,
    patch_km: float | None,
    model_cfg: ModelConfig | Mapping[str, Any] | None,
    train_cfg: TrainConfig | None = None,
    scales: Sequence[float] = (1.0,),
    **extra: Any,
) -> dict[str, Any]:
    """Model metadata (without ``model_version``, which :func:`save` adds)."""
    import vectorgeo

    arch = architecture(model_cfg)
    return {
        "layers": {name: spec.to_dict() for name, spec in specs.items()},
        "channels": channel_names(specs, len(scales)),
        "in_channels": input_channels(specs) * len(scales),
        "patch_px": int(patch_px),
        "patch_km": None if patch_km is None else float(patch_km),
        "scales": [float(x) for x in scales],
        "architecture": arch.model_dump(mode="json"),
        "embedding_dim": arch.embedding_dim,
        "train": train_cfg.model_dump(mode="json") if train_cfg is not None else {},
        "library_version": vectorgeo.__version__,
        **extra,
    }


def model_version(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> str:
    """Short hash (12 hex) of the weights and the metadata (its own ``model_version`` excluded)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    meta = {k: v for k, v in metadata.items() if k != "model_version"}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def save(path: str | Path, module: nn.Module, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Write a model file atomically.

    Args:
        path: Destination (``model.pt``).
        module: The encoder (its weights are copied to CPU).
        metadata: From :func:`make_metadata`; must be JSON-able.

    Returns:
        The metadata as saved, with ``model_version`` set.
    """
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    meta = json.loads(json.dumps({k: v for k, v in metadata.items() if k != "model_version"}))
    meta["model_version"] = model_version(state, meta)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "state_dict": state, "metadata": meta}
    with atomic_path(path) as tmp:
        buf = io.BytesIO()
        torch.save(payload, buf)
        tmp.write_bytes(buf.getvalue())
    out: dict[str, Any] = meta
    return out


def load(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """Rebuild an encoder from a model file alone.

    Args:
        path: A file written by :func:`save`.
        map_location: Device for the weights.

    Returns:
        (module in eval mode, metadata with ``model_version``).

    Raises:
        DataError: naming the file when it is missing, corrupt, not a vectorgeo
            model, or its weights do not match its metadata or hash.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "model file does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, runtime) for a damaged file
        raise DataError(str(path), f"not a readable model file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise DataError(str(path), f"not a vectorgeo model file (expected format '{FORMAT}')")
    if payload.get("format_version") != FORMAT_VERSION:
        raise DataError(
            str(path), f"model format version {payload.get('format_version')!r}; this library reads {FORMAT_VERSION}"
        )
    meta, state = payload.get("metadata"), payload.get("state_dict")
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise DataError(str(path), "model file lacks metadata or state_dict")
    for key in ("layers", "patch_px", "architecture", "model_version"):
        if key not in meta:
            raise DataError(str(path), f"model metadata lacks '{key}'")
    try:
        module = build_model(meta, meta["architecture"])
        module.load_state_dict(state, strict=True)
    except (ConfigError, RuntimeError, KeyError, TypeError) as e:
        raise DataError(str(path), f"weights do not match the model metadata: {e}") from None
    if model_version(state, meta) != meta["model_version"]:
        raise DataError(str(path), f"content does not match its model_version {meta['model_version']} (modified?)")
    module.to(map_location)
    module.eval()
    return module, meta


def check_layers(
    metadata: Mapping[str, Any],
    specs: Mapping[str, LayerSpec],
    *,
    patch_px: int | None = None,
    patch_km: float | None = None,
    allow_extra: bool = False,
) -> dict[str, LayerSpec]:
    """Check that a model's input layers are the given layers, encoded the same way.

    Args:
        metadata: Model metadata (from :func:`load`).
        specs: The layers at hand (the config's, or those of opened layers), by name.
        patch_px: ``sample.patch_px`` to check against the model's, if known.
        patch_km: ``sample.patch_km`` to check against the model's, if known.
        allow_extra: Accept layers the model does not use (else such a layer is an error: retrain).

    Returns:
        The model's layer specs in channel order.

    Raises:
        ConfigError: naming the layer (or key) that is missing, extra or differs.
    """
    version = metadata.get("model_version", "?")
    model_specs = specs_of(metadata)
    for name, spec in model_specs.items():
        if name not in specs:
            raise ConfigError(
                f"layers.{name}", f"model {version} needs layer '{name}'; the given layers are {sorted(specs)}"
            )
        a, b = spec.encoding_dict(), specs[name].encoding_dict()
        diff = sorted(k for k in a if a.get(k) != b.get(k))
        if diff:
            raise ConfigError(
                f"layers.{name}", f"model {version} encodes layer '{name}' differently (fields {', '.join(diff)})"
            )
    extra = [n for n in specs if n not in model_specs]
    if extra and not allow_extra:
        raise ConfigError(f"layers.{extra[0]}", f"model {version} was trained without layer '{extra[0]}'; retrain it")
    if patch_px is not None and int(patch_px) != int(metadata["patch_px"]):
        raise ConfigError(
            "sample.patch_px", f"model {version} expects {metadata['patch_px']} px patches, config has {patch_px}"
        )
    km = metadata.get("patch_km")
    if patch_km is not None and km is not None and abs(float(patch_km) - float(km)) > 1e-9:
        raise ConfigError("sample.patch_km", f"model {version} expects patches {km} km across, config has {patch_km}")
    return model_specs
