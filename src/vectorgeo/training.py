"""Tile2Vec triplet training of the :mod:`vectorgeo.model` encoder on sample shards.

Data. Sample shards (``results/samples/shard-{i}.npz``, see
``vectorgeo.sampling``) hold, for each role in ``anchor``, ``neighbor``,
``distant`` and each layer L, ``{role}_{L}`` of shape (N, P, P) (uint8 class
indices with 255 nodata, or float32 physical values with NaN nodata), plus
``{role}_latlng`` and a JSON ``meta``. Every shard is validated against the
config's layers and ``sample.patch_px`` before training (:func:`read_shard`).
The last ``train.val_shards`` shards are held out for validation; training
shards are streamed with bounded memory (:mod:`vectorgeo.batches`).

Loss. ``train.objective`` (triplet margin, InfoNCE or VICReg) plus, with
``train.reconstruction`` > 0, a reconstruction head's loss: see
:mod:`vectorgeo.objectives`. Every objective is validated with the same
criterion, the validation triplet accuracy: the fraction of held-out triplets
with :math:`\\lVert a - p \\rVert < \\lVert a - n \\rVert` on unit vectors.
The metrics also give the effective rank of the validation anchors'
embeddings, which falls towards 1 when the embeddings collapse.

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

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vectorgeo import model as vg_model
from vectorgeo import objectives
from vectorgeo.atomic import atomic_path, write_json_atomic
from vectorgeo.batches import TrainingData, _pin, _Prefetcher, iterate_batches, stack_roles
from vectorgeo.config import ModelConfig, TrainConfig
from vectorgeo.layers import LayerSpec
from vectorgeo.sampling import patch_keys

log = logging.getLogger("vectorgeo.training")


# --- steps -------------------------------------------------------------------------------------


@dataclass
class StepContext:
    """What a training or validation step needs besides the model and data."""

    specs: dict[str, LayerSpec]
    device: torch.device
    margin: float
    grad_clip: float
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: Any = None
    n_scales: int = 1
    objective: objectives.Objective = "triplet"
    temperature: float = 0.1
    reconstruction: float = 0.0
    recon_head: objectives.ReconstructionHead | None = None

    @property
    def keys(self) -> list[str]:
        """Patch keys of a batch: every layer at every scale."""
        return patch_keys(self.specs, self.n_scales)

    def autocast(self) -> Any:
        """Mixed-precision context (a no-op on CPU or with amp off)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def encode_stacked(stacked: Mapping[str, np.ndarray | torch.Tensor], ctx: StepContext) -> torch.Tensor:
    """Encode role-stacked patches (see :func:`stack_roles`) into model input (3B, C, P, P) on the device."""
    x = vg_model.encode({k: stacked[k] for k in ctx.keys}, ctx.specs, ctx.device)
    if ctx.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def encode_triplets(batch: Mapping[str, np.ndarray], ctx: StepContext) -> torch.Tensor:
    """Encode a triplet batch into one (3B, C, P, P) tensor: anchors, then neighbors, then distants."""
    return encode_stacked(stack_roles(batch, ctx.keys), ctx)


def triplet_distances(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d(a, p) and d(a, n) from stacked embeddings (3B, d)."""
    a, p, n = z.float().chunk(3)
    return torch.linalg.vector_norm(a - p, dim=1), torch.linalg.vector_norm(a - n, dim=1)


def batch_loss(model: nn.Module, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective (plus the weighted reconstruction loss) of an encoded triplet batch, and the unit vectors."""
    with ctx.autocast():
        h = model.project(x) if isinstance(model, vg_model.Encoder) else model(x)
    z = F.normalize(h.float(), dim=1)
    loss = objectives.objective_loss(ctx.objective, z, h, margin=ctx.margin, temperature=ctx.temperature)
    if ctx.recon_head is not None and ctx.reconstruction > 0:
        loss = loss + ctx.reconstruction * ctx.recon_head.loss(z, x)
    return loss, z


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
    """One optimisation step on an encoded triplet batch; returns the (detached) loss."""
    optimizer.zero_grad(set_to_none=True)
    loss, _ = batch_loss(model, x, ctx)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, ctx.grad_clip)
        ctx.scaler.step(optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        nn.utils.clip_grad_norm_(params, ctx.grad_clip)
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
        loss, z = batch_loss(model, encode_triplets(batch, ctx), ctx)
        d_ap, d_an = triplet_distances(z)
        loss_sum += loss * len(d_ap)
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
    ax1.set_ylabel(f"{metrics.get('objective', 'triplet')} loss")
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

    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


# --- training ----------------------------------------------------------------------------------


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _step_context(
    module: nn.Module, specs: dict[str, LayerSpec], device: torch.device, cfg: TrainConfig, n_scales: int = 1
) -> tuple[nn.Module, StepContext]:
    """Device placement and mixed precision: channels_last and AMP on CUDA, plain float32 on the CPU.

    With ``train.reconstruction`` > 0 the context holds a reconstruction head (seeded after the encoder).
    """
    cuda = device.type == "cuda"
    amp_dtype: torch.dtype | None = None
    scaler = None
    if cuda:
        module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if cfg.amp:
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            if amp_dtype == torch.float16:
                scaler = torch.amp.GradScaler("cuda")
    head = None
    if cfg.reconstruction > 0 and isinstance(module, vg_model.Encoder):
        dim = int(module.head[-1].out_features)  # type: ignore[arg-type]
        head = objectives.ReconstructionHead(dim, vg_model.input_channels(specs), n_scales).to(device)
    ctx = StepContext(
        specs,
        device,
        cfg.margin,
        cfg.grad_clip,
        amp_dtype,
        cuda,
        scaler,
        n_scales=n_scales,
        objective=cfg.objective,
        temperature=cfg.temperature,
        reconstruction=cfg.reconstruction,
        recon_head=head,
    )
    return module, ctx


@dataclass
class _EarlyStopping:
    """Best epoch by validation accuracy (ties broken by lower loss), with patience."""

    patience: int
    best: tuple[float, float] | None = None
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    epoch: int = 0
    embeddings: np.ndarray | None = None
    bad_epochs: int = 0

    def update(self, epoch: int, val_acc: float, val_loss: float, module: nn.Module, emb: np.ndarray) -> bool:
        """Record an epoch; True when training should stop."""
        if self.best is None or (val_acc, -val_loss) > self.best:
            self.best, self.state, self.epoch, self.embeddings = (val_acc, -val_loss), _state_copy(module), epoch, emb
            self.bad_epochs = 0
            return False
        self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def _run_epoch(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterator[dict[str, np.ndarray]],
    ctx: StepContext,
    bar: Any,
    on_step: Callable[[int, float, int], None],
) -> tuple[float, int]:
    """One pass over the training batches; returns (mean loss, triplets seen)."""
    module.train()
    loss_sum = torch.zeros((), device=ctx.device)
    n_steps, n_seen = 0, 0
    prefetch = _Prefetcher(batches, depth=6, transform=_pin) if ctx.device.type == "cuda" else None
    try:
        for batch in iter(prefetch) if prefetch is not None else batches:
            x = encode_stacked(batch, ctx)
            loss_sum += train_step(module, optimizer, x, ctx)
            scheduler.step()
            n_steps += 1
            n_seen += x.shape[0] // 3
            bar.update(1)
            on_step(n_steps, float(loss_sum) / n_steps if n_steps % 20 == 0 else math.nan, n_seen)
    finally:
        if prefetch is not None:
            prefetch.close()
    return float(loss_sum) / max(n_steps, 1), n_seen


@dataclass
class _Fit:
    """What the epochs of one training run left: the best epoch, the epoch log, triplets seen, seconds."""

    stopper: _EarlyStopping
    epochs: list[dict[str, Any]]
    seen: int
    stopped_early: bool
    seconds: float


def _fit(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data: TrainingData,
    ctx: StepContext,
    cfg: TrainConfig,
    rng: np.random.Generator,
    steps_per_epoch: int,
    progress: bool | None,
) -> _Fit:
    """Train epoch by epoch, validate after each, stop early on no improvement or a non-finite loss."""
    fit = _Fit(_EarlyStopping(cfg.patience), [], 0, False, 0.0)
    t_train = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        with _epoch_bar(epoch, cfg.epochs, steps_per_epoch, progress, t_train, fit.seen) as (bar, on_step):
            train_loss, seen = _run_epoch(
                module, optimizer, scheduler, data.batches(rng, cfg.batch_size), ctx, bar, on_step
            )
        fit.seen += seen
        val_loss, val_acc, emb = evaluate(module, data.val, ctx, batch_size=4 * cfg.batch_size)
        fit.epochs.append(
            {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_triplet_accuracy": val_acc}
        )
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, val triplet accuracy %.4f",
            *(epoch, cfg.epochs, train_loss, val_loss, val_acc),
        )
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            log.warning("loss is not finite at epoch %d; stopping and keeping the best weights", epoch)
            fit.stopped_early = True
            break
        if fit.stopper.update(epoch, val_acc, val_loss, module, emb):
            log.info("early stop after epoch %d: no improvement for %d epochs", epoch, fit.stopper.bad_epochs)
            fit.stopped_early = epoch < cfg.epochs
            break
    fit.seconds = time.perf_counter() - t_train
    return fit


def train(
    shards: Sequence[str | Path],
    specs: Mapping[str, LayerSpec],
    patch_px: int | None,
    patch_km: float | None,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    model_path: str | Path,
    metrics_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    scales: Sequence[float] | None = None,
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
        scales: ``sample.scales`` (checked against the shards; None: as in the shards).

    Returns:
        The metrics dict (also written to ``metrics_path``).

    Raises:
        ConfigError: too few shards, CUDA asked for without a GPU.
        DataError: a shard that is unreadable, empty or does not match the config.
    """
    t_start = time.perf_counter()
    cfg = train_cfg
    device = vg_model.resolve_device(cfg.device, "train.device")
    cuda = device.type == "cuda"
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if threads:
        torch.set_num_threads(int(threads))
    if not cuda:
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    try:
        data = TrainingData.read(shards, specs, patch_px, patch_km, cfg, scales)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        n_scales = len(data.scales)
        module, ctx = _step_context(
            vg_model.build_model(data.specs, model_cfg, n_scales).to(device), data.specs, device, cfg, n_scales
        )
        params = list(module.parameters()) + (list(ctx.recon_head.parameters()) if ctx.recon_head else [])
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(data.n_train / cfg.batch_size)  # for the progress bar and LR schedule
        total_steps = max(1, steps_per_epoch * cfg.epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
        log.info(
            "training on %s: %d train triplets (%d shards), %d validation triplets, %d input channels",
            device,
            data.n_train,
            len(data.train_paths),
            data.n_val,
            vg_model.input_channels(data.specs),
        )
        fit = _fit(module, optimizer, scheduler, data, ctx, cfg, rng, steps_per_epoch, progress)
        stopper, epochs, stopped_early, train_seconds = fit.stopper, fit.epochs, fit.stopped_early, fit.seconds
        module.load_state_dict(stopper.state)
        best_acc = stopper.best[0] if stopper.best else None
        meta = vg_model.make_metadata(
            data.specs,
            data.patch_px,
            patch_km,
            model_cfg,
            cfg,
            scales=data.scales,
            best_epoch=stopper.epoch,
            best_val_triplet_accuracy=best_acc,
        )
        saved = vg_model.save(model_path, module, meta)
        metrics: dict[str, Any] = {
            "epochs": epochs,
            "best_epoch": stopper.epoch,
            "best_val_triplet_accuracy": best_acc,
            "best_val_loss": -stopper.best[1] if stopper.best else None,
            "pca_components_99": pca_components(stopper.embeddings) if stopper.embeddings is not None else None,
            "effective_rank": (
                round(objectives.effective_rank(torch.from_numpy(stopper.embeddings)), 2)
                if stopper.embeddings is not None
                else None
            ),
            "objective": cfg.objective,
            "reconstruction": cfg.reconstruction,
            "stopped_early": stopped_early,
            "margin": cfg.margin,
            "model_version": saved["model_version"],
            "device": str(device),
            "train_triplets": data.n_train,
            "val_triplets": data.n_val,
            "train_seconds": round(train_seconds, 2),
            "seconds": round(time.perf_counter() - t_start, 2),
            "samples_per_s": round(fit.seen / train_seconds, 1) if train_seconds > 0 else None,
        }
        _write_outputs(metrics, metrics_path, plot_path)
        return metrics
    finally:
        torch.set_num_threads(prev_threads)
        if not cuda:
            torch.use_deterministic_algorithms(prev_det)


@contextmanager
def _epoch_bar(
    epoch: int, epochs: int, steps: int, progress: bool | None, t_train: float, seen_before: int
) -> Iterator[tuple[Any, Callable[[int, float, int], None]]]:
    """A progress bar on a terminal; otherwise a log line every fifth of an epoch."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    log_every = max(1, steps // 5)
    bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", disable=not show, leave=False)

    def on_step(step: int, mean_loss: float, seen: int) -> None:
        if show and not math.isnan(mean_loss):
            bar.set_postfix(loss=f"{mean_loss:.4f}")
        elif not show and step % log_every == 0:
            rate = (seen_before + seen) / (time.perf_counter() - t_train)
            log.info("epoch %d: step %d/%d, %.0f triplets/s", epoch, step, steps, rate)

    try:
        yield bar, on_step
    finally:
        bar.close()


def _write_outputs(metrics: dict[str, Any], metrics_path: str | Path | None, plot_path: str | Path | None) -> None:
    if metrics_path:
        write_json_atomic(metrics_path, metrics)
    if plot_path and metrics["epochs"]:
        plot_training(metrics, plot_path)
    log.info(
        "model %s: best val triplet accuracy %.4f at epoch %d, %d PCA components for 99%% variance, %.0f s",
        metrics["model_version"],
        metrics["best_val_triplet_accuracy"] or float("nan"),
        metrics["best_epoch"],
        metrics["pca_components_99"] or 0,
        metrics["seconds"],
    )


def train_from_config(
    config: Mapping[str, Any],
    shards: Sequence[str | Path],
    out_dir: str | Path,
    threads: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train with a whole workflow config; writes model.pt, metrics.json, training.png in ``out_dir``."""
    from vectorgeo.config import parse
    from vectorgeo.layers import layer_specs

    cfg = parse(config)
    out = Path(out_dir)
    return train(
        shards,
        layer_specs(config),
        cfg.sample.patch_px,
        cfg.sample.patch_km,
        cfg.model,
        cfg.train,
        out / "model.pt",
        out / "metrics.json",
        out / "training.png",
        threads=threads,
        progress=progress,
        scales=cfg.sample.scales,
    )
