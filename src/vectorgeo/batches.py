"""Training data: validated sample shards as shuffled batches, in memory or streamed.

The last ``train.val_shards`` shards are held out for validation and read whole. Training shards are
validated from their headers first, then streamed: ``train.shards_in_memory`` of them are read side by
side in chunks, and batches are drawn from a random permutation of each group of chunks, so memory stays
bounded whatever the number and size of the shards (few triplets, at most :data:`CACHE_BYTES`, are read
once and kept). A batch stays uint8/float32 numpy, roles stacked, until
:func:`vectorgeo.model.encode` turns it into a tensor on the training device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vectorgeo.config import TrainConfig
from vectorgeo.errors import ConfigError
from vectorgeo.layers import LayerSpec
from vectorgeo.sampling import patch_keys
from vectorgeo.shards import ROLES, ShardInfo, concat_shards, read_shard, shard_info, stream_groups

CACHE_BYTES = 256 << 20
"""Training triplets up to this size are read once and kept in memory across epochs; more are streamed."""


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


def stack_roles(batch: Mapping[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Per patch key, the anchor, neighbor and distant patches stacked into one (3B, P, P) array (dtype kept)."""
    return {name: np.concatenate([batch[f"{role}_{name}"] for role in ROLES]) for name in names}


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


@dataclass
class TrainingData:
    """Validated shards: the validation triplets in memory, the training ones in memory or read per group.

    Attributes:
        specs: The layers, in channel order.
        patch_px: Patch size of every shard.
        patch_km: Patch footprint (``sample.patch_km``), checked against the shards.
        train_paths: Training shard paths.
        n_train: Training triplets.
        val: Validation arrays (``{role}_{layer}``).
        n_val: Validation triplets.
        group: Training shards read side by side (chunks of each are shuffled together).
        cache: All training triplets, when they are few (kept across epochs).
        infos: The training shards' headers.
    """

    specs: dict[str, LayerSpec]
    patch_px: int
    patch_km: float | None
    scales: list[float]
    train_paths: list[str]
    n_train: int
    val: dict[str, np.ndarray]
    n_val: int
    group: int
    cache: dict[str, np.ndarray] | None
    infos: list[ShardInfo] = field(default_factory=list)

    @classmethod
    def read(
        cls,
        shards: Sequence[str | Path],
        specs: Mapping[str, LayerSpec],
        patch_px: int | None,
        patch_km: float | None,
        cfg: TrainConfig,
        scales: Sequence[float] | None = None,
    ) -> TrainingData:
        """Read and validate every shard before any training starts.

        Raises:
            ConfigError: too few shards for ``train.val_shards``.
            DataError: a shard that is unreadable, empty or does not match the layers.
        """
        specs = dict(specs)
        train_paths, val_paths = split_shards(shards, cfg.val_shards)
        val_shards = [read_shard(p, specs, patch_px, patch_km, scales) for p in val_paths]
        px = val_shards[0].patch_px
        own = [float(x) for x in val_shards[0].meta.get("scales") or [1.0]]
        scales = own if scales is None else [float(x) for x in scales]
        val = concat_shards(val_shards)
        n_val = sum(s.n for s in val_shards)
        del val_shards
        # training shards: validated from their headers now, streamed in chunks at each epoch
        infos = [shard_info(p, specs, px, patch_km, scales) for p in train_paths]
        n_train = sum(i.n for i in infos)
        cache = None
        if len(infos) <= cfg.shards_in_memory and sum(i.nbytes for i in infos) <= CACHE_BYTES:
            cache = concat_shards([read_shard(p, specs, px, patch_km, scales) for p in train_paths])
        return cls(specs, px, patch_km, scales, train_paths, n_train, val, n_val, cfg.shards_in_memory, cache, infos)

    @property
    def keys(self) -> list[str]:
        """Patch keys: every layer at every scale."""
        return patch_keys(self.specs, len(self.scales))

    def groups(self, rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
        """The training triplets of one epoch, a group at a time: all of them when cached, else streamed
        (:func:`vectorgeo.shards.stream_groups`: memory bounded whatever the number of shards)."""
        if self.cache is not None:
            yield self.cache
            return
        yield from stream_groups(self.infos, self.specs, rng, self.group)

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Shuffled batches of one epoch, roles stacked (uint8 / float32 patches)."""
        for arrays in self.groups(rng):
            for batch in iterate_batches(arrays, batch_size, rng):
                yield stack_roles(batch, self.keys)
