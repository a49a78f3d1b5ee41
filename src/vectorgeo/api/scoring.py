"""The in-memory side of search by example: the loaded embeddings, score maps and their tiles.

:class:`ScoreService` keeps one :class:`~vectorgeo.store.vectors.CellVectors` snapshot of the active
dataset. It is read at start-up (in the background) or at the first query, and re-checked against the
loaded regions every ``ttl_s`` seconds: when they changed, a new snapshot is read in a background
thread while the old one keeps answering.

Score maps are kept by id in a small LRU (:data:`MAP_CACHE`, ``8 n`` bytes each); their definitions
(mode and example rows, a few bytes) in a larger one, so that the tiles of an evicted map are scored
again on demand instead of failing. Encoded tiles are kept in an LRU keyed by (map id, z, x, y).

Thread safety: routes run in a thread pool; the snapshot is replaced by one assignment, the caches sit
behind locks, and a reload is serialised by a lock.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import psycopg

from vectorgeo import scores, scoretiles, store
from vectorgeo.errors import VectorgeoError
from vectorgeo.store import vectors as store_vectors
from vectorgeo.store.vectors import CellVectors

log = logging.getLogger(__name__)

MAP_CACHE = 8
DEFINITION_CACHE = 1024
TILE_CACHE = 4096

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
ConnectFn = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


class LRU(Generic[K, V]):
    """A least-recently-used map with a lock."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)


@dataclass(frozen=True)
class Definition:
    """What a score map scored: enough to score it again on the same snapshot."""

    signature: str
    mode: str
    pos: np.ndarray
    neg: np.ndarray


@dataclass(frozen=True)
class Snapshot:
    vectors: CellVectors
    levels: scoretiles.Levels
    checked_at: float

    def fresh(self, ttl_s: float) -> bool:
        """Checked against the database less than ``ttl_s`` ago."""
        return time.monotonic() - self.checked_at < ttl_s


class ScoreService:
    """Embeddings in memory, score maps and score tiles of one app.

    Args:
        connection: Context manager factory of a pooled connection (``AppState.connection``).
        ttl_s: Seconds between checks of the loaded regions.
        max_features: Feature cap per tile (zoom → level).
    """

    def __init__(self, connection: ConnectFn, ttl_s: float, max_features: int) -> None:
        self._connection = connection
        self.ttl_s = ttl_s
        self.max_features = max_features
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()
        self._reloading = False  # guarded by _lock
        self.maps: LRU[str, scores.ScoreMap] = LRU(MAP_CACHE)
        self.definitions: LRU[str, Definition] = LRU(DEFINITION_CACHE)
        self.tile_cache: LRU[tuple[str, int, int, int], bytes] = LRU(TILE_CACHE)

    def warm_up(self) -> None:
        """Read the embeddings in a background thread (a database that is down is only logged)."""

        def run() -> None:
            try:
                v = self.vectors()
                log.info("embeddings in memory: %d cells of dimension %d", v.n, v.dim)
            except VectorgeoError as e:
                log.warning("embeddings not in memory yet: %s", e)

        threading.Thread(target=run, name="vectorgeo-vectors", daemon=True).start()

    def snapshot(self) -> Snapshot:
        """The snapshot in force (read now the first time; re-checked every ``ttl_s``).

        Raises:
            DatabaseError: the database is unreachable, or nothing is loaded.
        """
        snap = self._snapshot
        if snap is not None and snap.fresh(self.ttl_s):
            return snap
        with self._lock:
            snap = self._snapshot
            if snap is None:
                with self._connection() as conn:
                    snap = self._read(conn)
                self._snapshot = snap
                return snap
            if snap.fresh(self.ttl_s) or self._reloading:
                return snap
            with self._connection() as conn:
                sig = store_vectors.signature(conn, store.dataset(conn))
            if sig == snap.vectors.signature:
                snap = Snapshot(snap.vectors, snap.levels, time.monotonic())
                self._snapshot = snap
                return snap
            self._reloading = True
        threading.Thread(target=self._reload, name="vectorgeo-vectors", daemon=True).start()
        return snap

    def vectors(self) -> CellVectors:
        """The embeddings in force (:meth:`snapshot`)."""
        return self.snapshot().vectors

    def in_memory(self, block: bool = True) -> CellVectors | None:
        """The embeddings in force when they have been read already (never waits for the first read;
        None also when the periodic check cannot reach the database).

        Args:
            block: Make the periodic check when it is due (a database round trip); False: None then
                (for a caller on the event loop, which must not wait for the database).
        """
        snap = self._snapshot
        if snap is None:
            return None
        if not block:
            return snap.vectors if snap.fresh(self.ttl_s) else None
        try:
            return self.snapshot().vectors
        except VectorgeoError:
            return None

    def _read(self, conn: psycopg.Connection[Any]) -> Snapshot:
        t0 = time.perf_counter()
        v = store_vectors.load_vectors(conn)
        log.info("read %d embeddings (%s) in %.1f s", v.n, v.model_version, time.perf_counter() - t0)
        return Snapshot(v, scoretiles.Levels(v), time.monotonic())

    def _reload(self) -> None:
        try:
            with self._connection() as conn:
                snap = self._read(conn)
            self._snapshot = snap
        except VectorgeoError as e:
            log.warning("re-reading the embeddings failed: %s", e)
        finally:
            with self._lock:
                self._reloading = False

    def remember(self, smap: scores.ScoreMap, pos: np.ndarray, neg: np.ndarray) -> None:
        """Keep a score map (and its definition) for its tiles."""
        self.maps.put(smap.id, smap)
        self.definitions.put(smap.id, Definition(smap.vectors.signature, smap.mode, pos, neg))

    def score_map(self, map_id: str) -> scores.ScoreMap | None:
        """A kept score map, scored again when evicted; None when unknown or of an older snapshot."""
        snap = self.snapshot()
        smap = self.maps.get(map_id)
        if smap is not None:
            return smap if smap.vectors is snap.vectors else None
        d = self.definitions.get(map_id)
        if d is None or d.signature != snap.vectors.signature:
            return None
        smap = scores.score_all(snap.vectors, d.mode, d.pos, d.neg, map_id)
        self.maps.put(map_id, smap)
        return smap

    def tile(self, smap: scores.ScoreMap, z: int, x: int, y: int) -> bytes:
        """A gzipped tile of a score map (cached)."""
        key = (smap.id, z, x, y)
        data = self.tile_cache.get(key)
        if data is None:
            snap = self.snapshot()
            levels = snap.levels if snap.vectors is smap.vectors else scoretiles.Levels(smap.vectors)  # rare: a reload
            raw = scoretiles.score_tile(smap, levels, z, x, y, self.max_features)
            data = gzip.compress(raw, compresslevel=5, mtime=0)
            self.tile_cache.put(key, data)
        return data
