"""Tile2Vec triplet training of the :mod:`vectorgeo.model` encoder on sample shards.

Data. Sample shards (``results/samples/shard-{i}.npz``, see
``vectorgeo.sampling``) hold, for each role in ``anchor``, ``neighbor``,
``distant`` and each layer L, ``{role}_{L}`` of shape (N, P, P) (uint8 class
indices with 255 nodata, or float32 physical values with NaN nodata), plus
``{role}_latlng`` and a JSON ``meta``. Every shard is validated against the
config's layers and ``sample.patch_px`` before training (:func:`read_shard`).
The last ``train.val_shards`` shards are held out for validation. Training
shards are read ``train.shards_in_memory`` at a time (all of them, and kept,
when they fit), and batches are drawn from a random permutation across the
shards in memory, so memory stays bounded by that many shards. A batch stays
uint8/float32 numpy until :func:`vectorgeo.model.encode` turns it into a
tensor on the training device.

Loss. With unit-vector embeddings :math:`a, p, n` of anchor, neighbor and
distant patch, the triplet margin loss is

.. math::

    L = \\max(0, \\lVert a - p \\rVert_2 - \\lVert a - n \\rVert_2 + m)

(``train.margin`` = m; distances lie in [0, 2]). The validation triplet
accuracy is the fraction of held-out triplets with
:math:`\\lVert a - p \\rVert < \\lVert a - n \\rVert`.

Optimisation: AdamW (``train.lr``, ``train.weight_decay``) with a per-step
cosine learning-rate decay over ``train.epochs``, gradient-norm clipping
(``train.grad_clip``) after backward, early stopping on validation accuracy
(ties broken by validation loss) with ``train.patience`` epochs of patience,
restoring the best weights. On CUDA: mixed precision (bfloat16 where
supported), ``channels_last``, pinned host memory and a background loader
thread. On CPU: deterministic algorithms, so the same config and shards give
identical weights (with the same number of threads).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vectorgeo import model as vg_model
from vectorgeo.atomic import atomic_path
from vectorgeo.errors import ConfigError, DataError
from vectorgeo.layers import NODATA_INDEX, LayerSpec

log = logging.getLogger("vectorgeo.training")

ROLES = ("anchor", "neighbor", "distant")

TRAIN_DEFAULTS: dict[str, Any] = {
    "device": "auto",
    "epochs": 1,
    "batch_size": 256,
    "lr": 0.002,
    "weight_decay": 0.0001,
    "margin": 0.5,
    "grad_clip": 1.0,
    "patience": 2,
    "val_shards": 1,
    "shards_in_memory": 16,
    "amp": True,
    "seed": 0,
}
"""Defaults of ``config['train']`` (kept equal to config/schema.yaml)."""


def train_config(train_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``train`` config section with defaults filled in and values checked.

    Raises:
        ConfigError: naming the ``train.*`` key at fault.
    """
    cfg = {**TRAIN_DEFAULTS, **dict(train_cfg or {})}
    if cfg["device"] not in ("auto", "cpu", "cuda") and not str(cfg["device"]).startswith("cuda:"):
        raise ConfigError("train.device", f"expected auto, cpu or cuda, got {cfg['device']!r}")
    for k in ("epochs", "batch_size", "patience", "val_shards", "shards_in_memory"):
        v = cfg[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"train.{k}", f"expected a positive integer, got {v!r}")
    for k in ("lr", "margin", "grad_clip"):
        v = cfg[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ConfigError(f"train.{k}", f"expected a positive number, got {v!r}")
    if not isinstance(cfg["weight_decay"], (int, float)) or cfg["weight_decay"] < 0:
        raise ConfigError("train.weight_decay", f"expected a number >= 0, got {cfg['weight_decay']!r}")
    if not isinstance(cfg["seed"], int):
        raise ConfigError("train.seed", f"expected an integer, got {cfg['seed']!r}")
    return cfg


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``/``cuda`` as given.

    Raises:
        ConfigError: ``cuda`` requested but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device", f"'{name}' requested but this torch build sees no CUDA device")
    return torch.device(name)


# --- shards -------------------------------------------------------------------------------------


@dataclass
class Shard:
    """A validated sample shard in memory.

    Attributes:
        path: The file.
        n: Number of triplets.
        arrays: ``{role}_{layer}`` -> (n, P, P) array (uint8 or float32).
        meta: The shard's ``meta`` JSON (empty when absent).
    """

    path: str
    n: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)


def read_shard(
    path: str | Path, specs: Mapping[str, LayerSpec], patch_px: int | None, patch_km: float | None = None
) -> Shard:
    """Read and validate one sample shard.

    Args:
        path: ``shard-{i}.npz``.
        specs: The config's layers (the model input).
        patch_px: Expected patch size (``sample.patch_px``); None: take the shard's.
        patch_km: Expected footprint (``sample.patch_km``), checked against the
            shard's ``meta`` when both are known.

    Raises:
        DataError: naming the shard and what is wrong: unreadable, empty,
            missing or extra layers, other class maps or scaling, other patch
            size, wrong dtype, class indices out of range.
    """
    p = str(path)
    if not os.path.isfile(p):
        raise DataError(p, "shard file does not exist")
    if os.path.getsize(p) == 0:
        raise DataError(p, "shard file is empty (0 bytes)")
    try:
        with np.load(p, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as e:
        raise DataError(p, f"not a readable npz shard ({type(e).__name__}: {e})") from None
    except Exception as e:  # zlib.error and friends from a damaged member
        raise DataError(p, f"not a readable npz shard ({type(e).__name__}: {e})") from None
    meta: dict[str, Any] = {}
    if "meta" in raw:
        try:
            meta = json.loads(str(raw.pop("meta")[()]))
        except (ValueError, TypeError) as e:
            raise DataError(p, f"'meta' is not JSON: {e}") from None
    shard_layers = sorted({k.split("_", 1)[1] for k in raw if "_" in k and k.split("_", 1)[0] in ROLES} - {"latlng"})
    meta_layers = meta.get("layers")
    if isinstance(meta_layers, Mapping) and meta_layers:
        shard_layers = sorted(set(shard_layers) | set(meta_layers))
    missing = [n for n in specs if n not in shard_layers]
    extra = [n for n in shard_layers if n not in specs]
    if missing or extra:
        raise DataError(
            p,
            f"layer set differs from the config: shard has {shard_layers}, config has {list(specs)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; not in config {extra}" if extra else ""),
        )
    if isinstance(meta_layers, Mapping):
        for name, spec in specs.items():
            if name in meta_layers:
                try:
                    other = LayerSpec.from_dict(meta_layers[name]).encoding_dict()
                except Exception as e:
                    raise DataError(p, f"meta spec of layer '{name}' is invalid: {e}") from None
                mine = spec.encoding_dict()
                diff = sorted(k for k in mine if mine[k] != other.get(k))
                if diff:
                    raise DataError(
                        p, f"layer '{name}' was sampled with other settings than the config (fields {', '.join(diff)})"
                    )
    if patch_km is not None and meta.get("patch_km") is not None:
        if abs(float(meta["patch_km"]) - float(patch_km)) > 1e-9:
            raise DataError(p, f"patches are {meta['patch_km']} km across; config sample.patch_km is {patch_km}")
    arrays: dict[str, np.ndarray] = {}
    n: int | None = None
    for role in ROLES:
        for name, spec in specs.items():
            key = f"{role}_{name}"
            if key not in raw:
                raise DataError(p, f"key '{key}' is missing; keys are {sorted(raw)}")
            a = raw[key]
            if a.ndim != 3 or a.shape[1] != a.shape[2]:
                raise DataError(p, f"'{key}' has shape {a.shape}; expected (N, P, P)")
            if patch_px is not None and a.shape[1] != patch_px:
                raise DataError(p, f"patch size is {a.shape[1]} px ('{key}'), config sample.patch_px is {patch_px}")
            if n is None:
                n = a.shape[0]
                patch_px = a.shape[1]
            elif a.shape[0] != n:
                raise DataError(p, f"'{key}' has {a.shape[0]} patches, other keys {n}")
            if spec.kind == "categorical":
                if a.dtype != np.uint8:
                    raise DataError(p, f"'{key}' is {a.dtype}; expected uint8 class indices")
                bad = (a >= spec.n_classes) & (a != NODATA_INDEX)
                if bad.any():
                    raise DataError(
                        p, f"'{key}' has class index {int(a[bad].max())}; layer '{name}' has {spec.n_classes} classes"
                    )
            else:
                if a.dtype.kind != "f":
                    raise DataError(p, f"'{key}' is {a.dtype}; expected float32 physical values")
                a = a.astype(np.float32, copy=False)
            arrays[key] = a
    if not n:
        raise DataError(p, "shard is empty (0 triplets)")
    return Shard(p, int(n), arrays, meta)


def concat_shards(shards: Sequence[Shard]) -> dict[str, np.ndarray]:
    """Concatenate the arrays of several shards (one array per key)."""
    if len(shards) == 1:
        return shards[0].arrays
    return {k: np.concatenate([s.arrays[k] for s in shards]) for k in shards[0].arrays}


def iterate_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, rng: np.random.Generator | None
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of triplets: a random permutation when ``rng`` is given, else in order.

    A trailing batch of a single triplet is dropped (BatchNorm needs more).
    """
    n = len(next(iter(arrays.values())))
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        if len(idx) < 2 and rng is not None:
            break
        idx = np.sort(idx)  # order within a batch does not matter; sorted gathers are faster
        yield {k: a[idx] for k, a in arrays.items()}


class _Prefetcher:
    """Run an iterator in a background thread, ``depth`` items ahead."""

    _END = object()

    def __init__(self, it: Iterator[Any], depth: int = 4, transform: Callable[[Any], Any] | None = None) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._it, self._tf = it, transform
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._it:
                if not self._put(self._tf(item) if self._tf else item):
                    return
        except BaseException as e:
            self._put(e)
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _pin(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(a).pin_memory() for k, a in batch.items()}


# --- steps -------------------------------------------------------------------------------------


@dataclass
class StepContext:
    """What a training or validation step needs besides the model and data."""

    specs: dict[str, LayerSpec]
    device: torch.device
    margin: float
    grad_clip: float = 1.0
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: Any = None

    def autocast(self) -> Any:
        """Mixed-precision context (a no-op on CPU or with amp off)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def stack_roles(batch: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Per layer, the anchor, neighbor and distant patches stacked into one (3B, P, P) array (dtype kept)."""
    return {name: np.concatenate([batch[f"{role}_{name}"] for role in ROLES]) for name in names}


def encode_stacked(stacked: Mapping[str, np.ndarray | torch.Tensor], ctx: StepContext) -> torch.Tensor:
    """Encode role-stacked patches (see :func:`stack_roles`) into model input (3B, C, P, P) on the device."""
    x = vg_model.encode(stacked, ctx.specs, ctx.device)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def encode_triplets(batch: Mapping[str, np.ndarray], ctx: StepContext) -> torch.Tensor:
    """Encode a triplet batch into one (3B, C, P, P) tensor: anchors, then neighbors, then distants."""
    return encode_stacked(stack_roles(batch, ctx.specs), ctx)


def triplet_distances(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d(a, p) and d(a, n) from stacked embeddings (3B, d)."""
    a, p, n = z.float().chunk(3)
    return torch.linalg.vector_norm(a - p, dim=1), torch.linalg.vector_norm(a - n, dim=1)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """One optimisation step on an encoded triplet batch; returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    with ctx.autocast():
        z = model(x)
    a, p, n = z.float().chunk(3)
    loss = F.triplet_margin_loss(a, p, n, margin=ctx.margin)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), ctx.grad_clip)
        optimizer.step()
    return loss.detach()


@torch.no_grad()
def evaluate(
    model: nn.Module, arrays: Mapping[str, np.ndarray], ctx: StepContext, batch_size: int = 1024
) -> tuple[float, float, np.ndarray]:
    """Validation loss, triplet accuracy and anchor embeddings of a set of triplets (in eval mode)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device)
    n = 0
    anchors = []
    for batch in iterate_batches(arrays, batch_size, None):
        with ctx.autocast():
            z = model(encode_triplets(batch, ctx))
        d_ap, d_an = triplet_distances(z)
        loss_sum += F.relu(d_ap - d_an + ctx.margin).sum()
        correct += (d_ap < d_an).sum()
        n += len(d_ap)
        anchors.append(z.float()[: len(d_ap)].cpu())
    model.train(was_training)
    return float(loss_sum) / n, float(correct) / n, torch.cat(anchors).numpy()


def pca_components(embeddings: np.ndarray, fraction: float = 0.99) -> int:
    """Number of principal components that explain ``fraction`` of the variance (0 when there is none)."""
    x = embeddings.astype(np.float64)
    x = x - x.mean(axis=0)
    var = np.linalg.svd(x, compute_uv=False) ** 2
    total = var.sum()
    if total <= 0:
        return 0
    cum = np.cumsum(var) / total
    return min(int(np.searchsorted(cum, fraction - 1e-12)) + 1, len(var))


# --- outputs -----------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically."""

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    _atomic_write(Path(path), w)


def plot_training(metrics: Mapping[str, Any], path: str | Path) -> None:
    """Loss and validation accuracy curves per epoch, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ep = [e["epoch"] for e in metrics["epochs"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(ep, [e["train_loss"] for e in metrics["epochs"]], "o-", label="train")
    ax1.plot(ep, [e["val_loss"] for e in metrics["epochs"]], "o-", label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel(f"triplet loss (margin {metrics.get('margin', '?')})")
    ax1.legend()
    ax2.plot(ep, [e["val_triplet_accuracy"] for e in metrics["epochs"]], "o-", color="C2")
    if metrics.get("best_epoch") is not None:
        ax2.axvline(metrics["best_epoch"], color="grey", ls=":", label=f"best (epoch {metrics['best_epoch']})")
        ax2.legend(loc="lower right")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation triplet accuracy")
    ax2.set_ylim(max(0.0, min(e["val_triplet_accuracy"] for e in metrics["epochs"]) - 0.05), 1.0)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"vectorgeo model {metrics.get('model_version', '')}")
    fig.tight_layout()

    def w(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=100)

    try:
        _atomic_write(Path(path), w)
    finally:
        plt.close(fig)


# --- training ----------------------------------------------------------------------------------


def split_shards(shards: Sequence[str | Path], val_shards: int) -> tuple[list[str], list[str]]:
    """Training and validation shard paths: the last ``val_shards`` are held out.

    Raises:
        ConfigError: fewer than ``val_shards + 1`` shards.
    """
    paths = [str(s) for s in shards]
    if len(paths) < val_shards + 1:
        raise ConfigError(
            "train.val_shards",
            f"{val_shards} validation shard(s) need at least {val_shards + 1} shards (sample.shards), got {len(paths)}",
        )
    return paths[:-val_shards], paths[-val_shards:]


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train(
    shards: Sequence[str | Path],
    specs: Mapping[str, LayerSpec],
    patch_px: int | None,
    patch_km: float | None,
    model_cfg: Mapping[str, Any] | None,
    train_cfg: Mapping[str, Any] | None,
    model_path: str | Path,
    metrics_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    threads: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train the encoder on sample shards and write the model, metrics and plot.

    Args:
        shards: Shard paths in order (the last ``train.val_shards`` validate).
        specs: The config's layers, in channel order.
        patch_px: ``sample.patch_px`` (None: as in the shards).
        patch_km: ``sample.patch_km`` (recorded in the model; checked against shards).
        model_cfg: The ``model`` config section.
        train_cfg: The ``train`` config section.
        model_path: Output ``model.pt``.
        metrics_path: Output ``metrics.json`` (optional).
        plot_path: Output ``training.png`` (optional).
        threads: CPU threads for torch (default: leave torch's setting).
        progress: Show a progress bar; default only when stderr is a terminal.

    Returns:
        The metrics dict (also written to ``metrics_path``).

    Raises:
        ConfigError: bad ``train``/``model`` values, too few shards.
        DataError: a shard that is unreadable, empty or does not match the config.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    cfg = train_config(train_cfg)
    arch = vg_model.architecture(model_cfg)
    specs = dict(specs)
    device = resolve_device(cfg["device"])
    cuda = device.type == "cuda"
    show = sys.stderr.isatty() if progress is None else progress
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    if threads:
        torch.set_num_threads(int(threads))
    if not cuda:
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        train_paths, val_paths = split_shards(shards, cfg["val_shards"])
        val_shards = [read_shard(p, specs, patch_px, patch_km) for p in val_paths]
        patch_px = val_shards[0].arrays[next(iter(val_shards[0].arrays))].shape[1]
        val = concat_shards(val_shards)
        n_val = sum(s.n for s in val_shards)
        del val_shards
        cache: list[dict[str, np.ndarray]] | None = None
        group = cfg["shards_in_memory"]
        if len(train_paths) <= group:
            shard_objs = [read_shard(p, specs, patch_px, patch_km) for p in train_paths]
            n_train = sum(s.n for s in shard_objs)
            cache = [concat_shards(shard_objs)]
            del shard_objs
        else:  # validate everything before spending time on training
            n_train = sum(read_shard(p, specs, patch_px, patch_km).n for p in train_paths)

        torch.manual_seed(cfg["seed"])
        rng = np.random.default_rng(cfg["seed"])
        module = vg_model.build_model(specs, arch).to(device)
        amp_dtype: torch.dtype | None = None
        scaler = None
        if cuda:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if cfg["amp"]:
                amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
                if amp_dtype == torch.float16:
                    scaler = torch.amp.GradScaler("cuda")
        ctx = StepContext(specs, device, float(cfg["margin"]), float(cfg["grad_clip"]), amp_dtype, cuda, scaler)
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        steps_per_epoch = math.ceil(n_train / cfg["batch_size"])  # for the progress bar and LR schedule
        log_every = max(1, steps_per_epoch // 5)
        total_steps = max(1, steps_per_epoch * cfg["epochs"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
        log.info(
            "training on %s: %d train triplets (%d shards), %d validation triplets (%d shards), %d input channels",
            device,
            n_train,
            len(train_paths),
            n_val,
            len(val_paths),
            vg_model.input_channels(specs),
        )

        def epoch_groups() -> Iterator[dict[str, np.ndarray]]:
            if cache is not None:
                yield from cache
                return
            order = rng.permutation(len(train_paths))
            for i in range(0, len(order), group):
                yield concat_shards(
                    [read_shard(train_paths[j], specs, patch_px, patch_km) for j in order[i : i + group]]
                )

        def epoch_batches() -> Iterator[dict[str, np.ndarray]]:
            # uint8 / float32 patches, roles stacked; pinned by the loader thread on CUDA
            for arrays in epoch_groups():
                for batch in iterate_batches(arrays, cfg["batch_size"], rng):
                    yield stack_roles(batch, specs)

        epochs: list[dict[str, Any]] = []
        best: tuple[float, float] | None = None
        best_state = _state_copy(module)
        best_epoch = 0
        best_emb: np.ndarray | None = None
        bad_epochs = 0
        stopped_early = False
        n_seen = 0
        t_train = time.perf_counter()
        for epoch in range(1, cfg["epochs"] + 1):
            module.train()
            loss_sum = torch.zeros((), device=device)
            n_steps = 0
            batches: Any = epoch_batches()
            prefetch = None
            if cuda:
                prefetch = _Prefetcher(batches, depth=6, transform=_pin)
                batches = iter(prefetch)
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{cfg['epochs']}", disable=not show, leave=False)
            try:
                for batch in batches:
                    x = encode_stacked(batch, ctx)
                    loss_sum += train_step(module, optimizer, x, ctx)
                    scheduler.step()
                    n_steps += 1
                    n_seen += x.shape[0] // 3
                    bar.update(1)
                    if show and n_steps % 20 == 0:
                        bar.set_postfix(loss=f"{float(loss_sum) / n_steps:.4f}")
                    elif not show and n_steps % log_every == 0:  # a quiet log still shows progress
                        log.info(
                            "epoch %d: step %d/%d, train loss %.4f, %.0f triplets/s",
                            epoch,
                            n_steps,
                            steps_per_epoch,
                            float(loss_sum) / n_steps,
                            n_seen / (time.perf_counter() - t_train),
                        )
            finally:
                bar.close()
                if prefetch is not None:
                    prefetch.close()
            train_loss = float(loss_sum) / max(n_steps, 1)
            val_loss, val_acc, emb = evaluate(module, val, ctx, batch_size=4 * cfg["batch_size"])
            epochs.append(
                {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_triplet_accuracy": val_acc}
            )
            log.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, val triplet accuracy %.4f",
                epoch,
                cfg["epochs"],
                train_loss,
                val_loss,
                val_acc,
            )
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                log.warning("loss is not finite at epoch %d; stopping and keeping the best weights", epoch)
                stopped_early = True
                break
            if best is None or (val_acc, -val_loss) > best:
                best, best_state, best_epoch, best_emb, bad_epochs = (
                    (val_acc, -val_loss),
                    _state_copy(module),
                    epoch,
                    emb,
                    0,
                )
            else:
                bad_epochs += 1
                if bad_epochs >= cfg["patience"]:
                    log.info("early stop after epoch %d: no improvement for %d epochs", epoch, bad_epochs)
                    stopped_early = epoch < cfg["epochs"]
                    break
        train_seconds = time.perf_counter() - t_train
        module.load_state_dict(best_state)
        meta = vg_model.make_metadata(
            specs,
            patch_px,
            patch_km,
            arch,
            cfg,
            best_epoch=best_epoch,
            best_val_triplet_accuracy=best[0] if best else None,
        )
        saved = vg_model.save(model_path, module, meta)
        metrics: dict[str, Any] = {
            "epochs": epochs,
            "best_epoch": best_epoch,
            "best_val_triplet_accuracy": best[0] if best else None,
            "best_val_loss": -best[1] if best else None,
            "pca_components_99": pca_components(best_emb) if best_emb is not None else None,
            "stopped_early": stopped_early,
            "margin": cfg["margin"],
            "model_version": saved["model_version"],
            "device": str(device),
            "train_triplets": n_train,
            "val_triplets": n_val,
            "train_seconds": round(train_seconds, 2),
            "seconds": round(time.perf_counter() - t_start, 2),
            "samples_per_s": round(n_seen / train_seconds, 1) if train_seconds > 0 else None,
        }
        if metrics_path:
            write_json(metrics_path, metrics)
        if plot_path and epochs:
            plot_training(metrics, plot_path)
        log.info(
            "model %s: best val triplet accuracy %.4f at epoch %d, %d PCA components for 99%% variance, %.0f s",
            saved["model_version"],
            metrics["best_val_triplet_accuracy"] or float("nan"),
            best_epoch,
            metrics["pca_components_99"] or 0,
            metrics["seconds"],
        )
        return metrics
    finally:
        torch.set_num_threads(prev_threads)
        if not cuda:
            torch.use_deterministic_algorithms(prev_det)


def train_from_config(
    config: Mapping[str, Any],
    shards: Sequence[str | Path],
    out_dir: str | Path,
    threads: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train with a whole workflow config; writes model.pt, metrics.json, training.png in ``out_dir``."""
    from vectorgeo.layers import layer_specs

    sample = config.get("sample", {}) or {}
    out = Path(out_dir)
    return train(
        shards,
        layer_specs(config),
        sample.get("patch_px"),
        sample.get("patch_km"),
        config.get("model"),
        config.get("train"),
        out / "model.pt",
        out / "metrics.json",
        out / "training.png",
        threads=threads,
        progress=progress,
    )
