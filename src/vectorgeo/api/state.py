"""The state the routes share: one :class:`AppState` per app, created by ``create_app``.

Thread safety: routes run in a thread pool. The connection pool is psycopg_pool's; the tile cache
is behind a lock; the tile metadata and the loaded resolution are immutable snapshots
(:class:`Checked`) replaced by one assignment, and the lock of :class:`TileTracker` serialises the
checks and builds that replace them.

Database faults: every query of a request runs in one ``REPEATABLE READ`` transaction, so a request
sees one snapshot (a region reloaded meanwhile shows up entirely or not at all, never half); the
server cancels any statement after ``serve.statement_timeout_s`` (a
:class:`~vectorgeo.errors.QueryTimeout`); a connection lost mid-request, or none free within the pool
timeout, is a :class:`~vectorgeo.errors.DatabaseError` with a short message (the driver's text goes
to the log only), and the pool replaces broken connections, so the API recovers by itself once the
database is back.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import psycopg
from fastapi import Depends, Request
from psycopg import IsolationLevel
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from vectorgeo import db, pyramid, store, tiles
from vectorgeo.api.scoring import ScoreService
from vectorgeo.api.settings import ServeSettings
from vectorgeo.errors import DatabaseError, QueryTimeout, VectorgeoError
from vectorgeo.inputs import InputLayers
from vectorgeo.store import QuerySettings
from vectorgeo.store.vectors import CellVectors

log = logging.getLogger(__name__)

META_TTL_S = 30.0
POOL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10
PROBE_TIMEOUT_S = 3
TILE_CACHE_SIZE = 4096

T = TypeVar("T")
TileKey = tuple[str, int, int, int]


@dataclass(frozen=True)
class Checked(Generic[T]):
    """A value and when it was read (time.monotonic)."""

    value: T
    at: float

    def fresh(self, ttl_s: float) -> bool:
        return time.monotonic() - self.at < ttl_s


class TileCache:
    """Least-recently-used encoded tiles, keyed by (build id, z, x, y)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._data: OrderedDict[TileKey, bytes] = OrderedDict()

    def get(self, key: TileKey) -> bytes | None:
        with self._lock:
            data = self._data.get(key)
            if data is not None:
                self._data.move_to_end(key)
            return data

    def put(self, key: TileKey, data: bytes) -> None:
        with self._lock:
            self._data[key] = data
            while len(self._data) > self._size:
                self._data.popitem(last=False)


class TileTracker:
    """The tiles in force: built at the first check (start-up), re-checked against the loaded regions
    every ``ttl_s`` seconds, and when stale rebuilt in a background thread while the old ones are served.

    Args:
        url: Database URL (the rebuild thread uses a connection of its own, not one of the pool's).
        max_features: Feature cap per tile.
        ttl_s: Seconds between checks.
    """

    def __init__(self, url: str, max_features: int, ttl_s: float) -> None:
        self._url = url
        self._max_features = max_features
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._current: Checked[tiles.TileMeta] | None = None
        self._building = False  # guarded by _lock

    def fresh(self) -> tiles.TileMeta | None:
        """The tiles in force when checked less than ``ttl_s`` ago, else None."""
        current = self._current
        return current.value if current is not None and current.fresh(self._ttl_s) else None

    def check(self, conn: psycopg.Connection[Any]) -> tiles.TileMeta:
        """The tiles in force, checked against the loaded regions when due (built here the first time).

        Raises:
            DatabaseError: nothing loaded, or the first build failed.
        """
        with self._lock:
            current = self._current
            if current is None:
                meta = tiles.current(conn, max_features=self._max_features) or self._build()
                self._current = Checked(meta, time.monotonic())
                return meta
            if current.fresh(self._ttl_s) or self._building:
                return current.value
            latest = tiles.current(conn, max_features=self._max_features)
            if latest is not None:
                self._current = Checked(latest, time.monotonic())
                return latest
            self._building = True
            threading.Thread(target=self._rebuild, name="vectorgeo-tiles", daemon=True).start()
            return current.value

    def _build(self) -> tiles.TileMeta:
        """Build the tiles on a connection of their own (no statement timeout, outside any request)."""
        with store.connect(self._url) as conn:
            return tiles.ensure(conn, max_features=self._max_features)

    def _rebuild(self) -> None:
        try:
            meta = self._build()
            with self._lock:
                self._current = Checked(meta, time.monotonic())
            log.info("tiles of %s rebuilt: %d cells", meta.model_version, meta.cells)
        except VectorgeoError as e:
            log.warning("tile rebuild failed: %s", e)
        finally:
            with self._lock:
                self._building = False


class ArchiveTracker:
    """The tile archive (a workflow output, :mod:`vectorgeo.pyramid`) when it holds the active model version.

    Re-checked every ``ttl_s`` seconds (the file may be rebuilt, another version activated); when missing,
    or of another version, tiles come from the database (:class:`TileTracker`).

    Args:
        path: The ``.pmtiles`` file (None: never use one).
        ttl_s: Seconds between checks.
    """

    def __init__(self, path: str | Path | None, ttl_s: float) -> None:
        self.path = Path(path) if path is not None else None
        self._ttl_s = ttl_s
        self._lock = threading.Lock()
        self._current: Checked[pyramid.Archive | None] | None = None
        self._stamp: tuple[int, int] | None = None

    def get(self, active_version: Callable[[], str]) -> pyramid.Archive | None:
        """The archive when it is there and holds the active model version, else None."""
        current = self._current
        if current is not None and current.fresh(self._ttl_s):
            return current.value
        with self._lock:
            archive = current.value if current is not None else None
            if self.path is None or not self.path.is_file():
                self._current = Checked(None, time.monotonic())
                return None
            st = self.path.stat()
            if archive is None or self._stamp != (st.st_mtime_ns, st.st_size):
                try:
                    archive = pyramid.Archive(self.path)
                except Exception as e:  # a damaged or foreign file: serve from the database instead
                    log.warning("tile archive %s unreadable: %s", self.path, e)
                    archive = None
                self._stamp = (st.st_mtime_ns, st.st_size)
            usable = (
                archive if archive is not None and archive.metadata.get("model_version") == active_version() else None
            )
            self._current = (
                Checked(archive, time.monotonic()) if usable is not None else Checked(None, time.monotonic())
            )
            return usable

    def meta(self, archive: pyramid.Archive) -> tiles.TileMeta:
        """The archive as tile metadata (what /meta and the tile cache keys need)."""
        m = archive.metadata
        return tiles.TileMeta(
            model_version=str(m["model_version"]),
            table="",
            signature=f"archive:{self._stamp}",
            resolution=int(m["resolution"]),
            cells=int(m["cells"]),
            bounds=[float(v) for v in m["bounds"]],
            max_features=int(m["max_features"]),
            pca={},
            build_id=f"archive-{self._stamp[0] if self._stamp else 0}",
        )


class AppState:
    """What every route needs: the connection pool, the settings, the tile metadata and caches.

    Args:
        url: Database URL.
        serve: API settings (``serve`` config section).
        query: Similarity query settings (``database`` config section).
        pool_timeout_s: Seconds a request waits for a database connection before it gets a 503.
        meta_ttl_s: Seconds between checks of the loaded resolution and tiles.
        inputs: The model's prepared input layers (the cell inspector), or None.
    """

    def __init__(
        self,
        url: str,
        serve: ServeSettings,
        query: QuerySettings,
        *,
        pool_timeout_s: float,
        meta_ttl_s: float,
        inputs: InputLayers | None = None,
        tile_archive: str | Path | None = None,
    ) -> None:
        self.url = url
        self.serve = serve
        self.query = query
        self.meta_ttl_s = meta_ttl_s
        # pgvector-python's way: the pool's configure callback registers the vector type
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=serve.pool_size,
            open=False,
            configure=functools.partial(_configure, statement_timeout_s=serve.statement_timeout_s),
            check=ConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            timeout=pool_timeout_s,
            name="vectorgeo",
        )
        self.tiles = TileTracker(url, serve.tile_max_features, meta_ttl_s)
        self.archive = ArchiveTracker(tile_archive, meta_ttl_s)
        self.tile_cache = TileCache(TILE_CACHE_SIZE)
        self._dataset: Checked[store.Dataset] | None = None
        self.scores = ScoreService(self.connection, meta_ttl_s, serve.tile_max_features)
        self.inputs = inputs

    def open(self) -> None:
        """Start the pool (connections are made in the background; a database that is down is no error)."""
        self.pool.open(wait=False)

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for the block, inside one ``REPEATABLE READ`` transaction (one snapshot).

        Raises:
            DatabaseError: no connection within the pool timeout (the message says whether the database
                cannot be reached or every connection is busy), or the connection broke during the block.
            QueryTimeout: a statement ran longer than ``serve.statement_timeout_s``.
        """
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield conn
        except (PoolTimeout, PoolClosed):
            raise DatabaseError(self._why_no_connection()) from None
        except psycopg.errors.QueryCanceled as e:
            log.warning("query cancelled: %s", e)
            raise QueryTimeout(self._timeout_message(), detail=str(e).strip()) from None
        except psycopg.OperationalError as e:
            log.warning("database connection lost: %s", e)
            raise DatabaseError("the database connection was lost; try again", detail=str(e).strip()) from None

    def _timeout_message(self) -> str:
        return (
            f"the query ran longer than {self.serve.statement_timeout_s:g} s and was cancelled; "
            "narrow it (smaller k, radius or bbox) or try again"
        )

    def _why_no_connection(self) -> str:
        """Why the pool gave no connection, from one direct attempt (details go to the log only)."""
        shown = db.mask_password(self.url)
        try:
            store.connect(self.url, connect_timeout=PROBE_TIMEOUT_S).close()
        except DatabaseError as e:
            log.warning("%s", e)
            return f"cannot connect to database {shown}"
        return f"all {self.serve.pool_size} database connections are busy; try again"

    def dataset(self, conn: psycopg.Connection[Any]) -> store.Dataset:
        """The active dataset (table, dimension, resolution, index storage), re-read every ``meta_ttl_s`` seconds."""
        current = self._dataset
        if current is None or not current.fresh(self.meta_ttl_s):
            current = Checked(store.dataset(conn), time.monotonic())
            self._dataset = current
        return current.value

    def vectors_in_memory(self, block: bool = True) -> CellVectors | None:
        """The embeddings in memory when they are the active dataset's, else None (not read yet, or of
        another model version).

        Args:
            block: Make the periodic checks of the active dataset and of the loaded regions when they are
                due (database round trips, every ``meta_ttl_s``); False: None then (for the event loop).
        """
        vectors = self.scores.in_memory(block)
        if vectors is None:
            return None
        current = self._dataset
        if current is not None and current.fresh(self.meta_ttl_s):
            ds = current.value
        elif not block:
            return None
        else:
            with self.connection() as conn:
                ds = self.dataset(conn)
        return vectors if vectors.model_version == ds.model_version else None

    def resolution(self, conn: psycopg.Connection[Any]) -> int:
        """H3 resolution of the active dataset, re-read every ``meta_ttl_s`` seconds."""
        return self.dataset(conn).resolution

    def tile_archive(self) -> pyramid.Archive | None:
        """The tile archive when it holds the active model version (checked every ``meta_ttl_s``)."""

        def active() -> str:
            with self.connection() as conn:
                return store.dataset(conn).model_version

        return self.archive.get(active)

    def tile_meta(self) -> tiles.TileMeta:
        """The tiles in force: the archive's, else the database's (takes a connection only when a check is due)."""
        archive = self.tile_archive()
        if archive is not None:
            return self.archive.meta(archive)
        meta = self.tiles.fresh()
        if meta is not None:
            return meta
        with self.connection() as conn:
            return self.tiles.check(conn)


def _configure(conn: psycopg.Connection[Any], *, statement_timeout_s: float) -> None:
    """The pool's configure callback: the vector type (:func:`vectorgeo.store.configure`), the statement
    timeout of the session, and REPEATABLE READ for the transaction of each request."""
    store.configure(conn)
    ms = max(1, round(statement_timeout_s * 1000))
    conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{ms}ms",))
    conn.isolation_level = IsolationLevel.REPEATABLE_READ


async def get_state(request: Request) -> AppState:
    """The app's state (a FastAPI dependency; async: no thread-pool hop)."""
    state: AppState = request.app.state.vectorgeo
    return state


StateDep = Annotated[AppState, Depends(get_state)]
