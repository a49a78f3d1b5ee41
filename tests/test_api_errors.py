"""Error answers of the API (vectorgeo.api.errors, .limits) and how its state meets database trouble.

Against a real PostgreSQL: one that is down, one that dies during a query and comes back, a pool whose
connections are all taken (by hand, and by slow queries), queries cancelled by the statement timeout,
backends that the server terminated, routes that fail on the server side; and the limits in front of
the routes: request body size, CORS.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import psycopg
import pytest
from conftest import start_test_cluster
from test_api import CELL, Synthetic, a_valid_cell, live_server, load_synthetic, serve_with

from vectorgeo.api.errors import RETRY_AFTER_S

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def synthetic(pg_cluster, tmp_path_factory) -> Synthetic:
    return load_synthetic(pg_cluster, tmp_path_factory.mktemp("api-error-regions"), bbox=(8.0, 45.0, 10.0, 47.0))


def test_database_down_is_503():
    """No database: the server still starts; data endpoints answer 503 with a short message, never a 500."""
    import socket

    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    url = f"postgresql://nobody:secret@127.0.0.1:{port}/none"
    with TestClient(create_app(url, pool_timeout_s=0.5)) as c:
        for path in ("/healthz", "/meta", f"/similar?h3={CELL}", "/point?lat=1&lng=2", "/tiles/0/0/0.pbf"):
            r = c.get(path)
            assert r.status_code == 503, (path, r.text)
            body = r.json()
            assert body == {
                "error": "unavailable",
                "message": f"cannot connect to database postgresql://nobody:***@127.0.0.1:{port}/none",
                "param": None,
            }, path  # no password, no driver text
        assert c.get("/point?lat=100&lng=2").status_code == 422  # bad input is still bad input


def test_busy_pool_is_503_and_says_so(synthetic):
    """Every connection taken: a request waits the pool timeout, then 503 saying they are busy."""
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    app = create_app(synthetic.url, serve=serve_with(pool_size=1), pool_timeout_s=0.5, build_tiles=False)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        with app.state.vectorgeo.connection():  # the only connection
            r = c.get("/healthz")
        assert r.status_code == 503
        assert r.json()["error"] == "unavailable" and "busy" in r.json()["message"]
        assert c.get("/healthz").status_code == 200  # given back


def test_terminated_backends_are_replaced(synthetic):
    """Connections the server killed are noticed at checkout and replaced: no failed request."""
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    with TestClient(create_app(synthetic.url, build_tiles=False)) as c:
        cell = a_valid_cell(synthetic)
        assert c.get(f"/cells/{cell}").status_code == 200
        with psycopg.connect(synthetic.url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
        assert killed >= 1
        for _ in range(3):
            assert c.get(f"/cells/{cell}").status_code == 200


def test_server_errors_are_500_with_their_kind(synthetic):
    """A server-side data problem is a 500 naming the file at fault; an unexpected error names only its type."""
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app
    from vectorgeo.errors import DataError

    app = create_app(synthetic.url, build_tiles=False)

    def missing_file() -> None:
        raise DataError("/srv/countries.zip", "no such file")

    def bug() -> None:
        raise ZeroDivisionError("secret detail")

    app.add_api_route("/test-data-error", missing_file)
    app.add_api_route("/test-bug", bug)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/test-data-error")
        assert r.status_code == 500
        assert r.json() == {"error": "internal", "message": "/srv/countries.zip: no such file", "param": None}
        r = c.get("/test-bug")
        assert r.status_code == 500
        assert r.json()["message"] == "internal error: ZeroDivisionError" and "secret" not in r.text


# --- slow queries, a busy pool, a database that dies -----------------------------------------------------------
def cells_table(url: str) -> str:
    from vectorgeo import store

    with store.connect(url) as conn:
        return store.dataset(conn).table


@contextmanager
def table_locked(url: str, table: str) -> Iterator[psycopg.Connection]:
    """Hold an ACCESS EXCLUSIVE lock on ``table``: every query that reads it waits (a slow query)."""
    conn = psycopg.connect(url)
    try:
        conn.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
        yield conn
    finally:
        try:
            conn.rollback()
            conn.close()
        except psycopg.OperationalError:  # the server died under it
            pass


def wait_for_lock_waiters(url: str, n: int, timeout: float = 30) -> None:
    """Until ``n`` backends wait for a lock (the requests are inside their query)."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            waiting = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchone()[0]
            if waiting >= n:
                return
            assert time.monotonic() < deadline, f"{waiting} of {n} requests reached the database"
            time.sleep(0.05)


def in_thread(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
    """Run ``fn(*args, **kwargs)`` in a thread; returns a function that waits and gives its result (or raises)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # pragma: no cover - re-raised below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def result(timeout: float = 60):  # type: ignore[no-untyped-def]
        t.join(timeout)
        assert not t.is_alive(), "request still running: the API hangs"
        if "error" in out:
            raise out["error"]
        return out["value"]

    return result


def test_statement_timeout_cancels_a_slow_query(synthetic):
    """A query that runs past serve.statement_timeout_s is cancelled by the database: 503 'timeout' with a
    message and Retry-After; the connection is fine afterwards."""
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    app = create_app(synthetic.url, serve=serve_with(statement_timeout_s=0.5, pool_size=1), build_tiles=False)
    cell = a_valid_cell(synthetic)
    with TestClient(app) as c:
        assert c.get(f"/cells/{cell}").status_code == 200
        with table_locked(synthetic.url, cells_table(synthetic.url)):
            for path in (f"/cells/{cell}", f"/similar?h3={cell}&k=5", "/point?lat=46&lng=9"):
                r = c.get(path)
                assert r.status_code == 503, (path, r.text)
                assert r.json() == {
                    "error": "timeout",
                    "message": "the query ran longer than 0.5 s and was cancelled; narrow it (smaller k, radius or "
                    "bbox) or try again",
                    "param": None,
                }, path
                assert r.headers["retry-after"] == str(RETRY_AFTER_S)
        assert c.get(f"/cells/{cell}").status_code == 200  # the same (only) connection serves again


def test_pool_exhausted_by_slow_queries_is_503_with_retry_after(synthetic):
    """Both connections held by queries that wait: the next request gets 503 'busy' with Retry-After after the
    pool timeout (no hang); the slow ones end at the statement timeout; then everything is served again."""
    from vectorgeo.api import create_app

    app = create_app(
        synthetic.url, serve=serve_with(pool_size=2, statement_timeout_s=5), pool_timeout_s=1, build_tiles=False
    )
    cell = a_valid_cell(synthetic)
    with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as c:
        assert c.get(f"/cells/{cell}").status_code == 200
        with table_locked(synthetic.url, cells_table(synthetic.url)):
            slow = [in_thread(httpx.get, f"{base}/cells/{cell}", timeout=30) for _ in range(2)]
            wait_for_lock_waiters(synthetic.url, 2)
            r = c.get("/healthz")  # no table read: it would be fast, but no connection is free
            assert r.status_code == 503 and r.headers["retry-after"] == str(RETRY_AFTER_S), r.text
            assert r.json() == {
                "error": "unavailable",
                "message": "all 2 database connections are busy; try again",
                "param": None,
            }
            for res in slow:
                r = res()
                assert r.status_code == 503 and r.json()["error"] == "timeout", r.text
        assert c.get(f"/cells/{cell}").status_code == 200
        assert c.get("/healthz").status_code == 200


def test_database_dies_during_a_query_and_the_api_recovers(tmp_path):
    """The server is killed (SIGKILL, a crash) while a request's query runs: 503 with a short message and no
    driver text; 503 while it is down; once it is back the same app serves again, without a restart."""

    from vectorgeo.api import create_app

    cluster = start_test_cluster("vectorgeo-pg-dies-")
    try:
        s = load_synthetic(cluster, tmp_path / "regions", bbox=(9.0, 46.0, 9.6, 46.4))
        cell = a_valid_cell(s, (46.2, 9.3))
        app = create_app(s.url, pool_timeout_s=1, build_tiles=False)
        with live_server(app) as base, httpx.Client(base_url=base, timeout=30) as c:
            assert c.get(f"/cells/{cell}").status_code == 200
            with table_locked(s.url, cells_table(s.url)):
                running = in_thread(c.get, f"/cells/{cell}")
                wait_for_lock_waiters(s.url, 1)
                cluster.kill()
                r = running()
            assert r.status_code == 503
            assert r.json() == {"error": "unavailable", "message": "the database connection was lost; try again",
                                "param": None}  # fmt: skip
            assert r.headers["retry-after"] == str(RETRY_AFTER_S)
            for word in ("psycopg", "Traceback", "server closed", "terminat", "SSL", "socket"):
                assert word not in r.text, r.text
            down = c.get(f"/similar?h3={cell}")
            assert down.status_code == 503 and down.json()["message"].startswith("cannot connect to database")
            assert "psycopg" not in down.text and "Connection refused" not in down.text, down.text
            cluster.start()
            deadline = time.monotonic() + 60
            while (r := c.get(f"/cells/{cell}")).status_code != 200:
                assert r.status_code == 503, r.text
                assert time.monotonic() < deadline, f"the API did not recover: {r.text}"
                time.sleep(0.5)
            assert r.json()["h3"] == cell
            assert c.get(f"/similar?h3={cell}&k=3").status_code == 200
    finally:
        cluster.stop(mode="immediate")
        shutil.rmtree(cluster.home, ignore_errors=True)


# --- limits: body size, CORS ------------------------------------------------------------------------------------
def test_request_body_over_the_limit_is_413(synthetic):
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    app = create_app(synthetic.url, serve=serve_with(max_body_bytes=2048), build_tiles=False)
    cell = a_valid_cell(synthetic)
    ok = {"lat": 47.0, "lon": 10.0, "h3": cell, "circleRadiusMeters": 50000, "limit": 3}
    with TestClient(app) as c:
        assert c.post("/search", json=ok).status_code == 200
        padded = {**ok, "pad": "x" * 2100}  # unknown keys are ignored: only the size is wrong
        r = c.post("/search", json=padded)
        assert r.status_code == 413
        assert r.json() == {
            "error": "too_large",
            "message": f"request body: {len(httpx.Request('POST', 'http://x', json=padded).content)} bytes; at most "
            "2048 are accepted (serve.max_body_bytes)",
            "param": "body",
        }
        # no Content-Length (chunked): refused once the bytes received pass the limit
        chunks = (b'{"pad": "' + b"x" * 1000 if i == 0 else b"x" * 1000 for i in range(5))
        r = c.post("/search", content=chunks, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["message"].startswith("request body: more than 2048 bytes")
        small = (
            part for part in (b'{"lat": 47.0, "lon": 10.0, ', f'"h3": "{cell}", "circleRadiusMeters": 5e4}}'.encode())
        )
        assert c.post("/search", content=small, headers={"Content-Type": "application/json"}).status_code == 200
        bad = c.post("/search", content=b"{}", headers={"Content-Length": "junk", "Content-Type": "application/json"})
        assert bad.status_code in (400, 413)


def test_cors_default_is_same_origin_only(synthetic):
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    with TestClient(create_app(synthetic.url, build_tiles=False)) as c:
        r = c.get("/healthz", headers={"Origin": "https://elsewhere.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        pre = c.options(
            "/search",
            headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"},
        )
        assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers


def test_cors_allow_list(synthetic):
    from fastapi.testclient import TestClient

    from vectorgeo.api import create_app

    app = create_app(
        synthetic.url, serve=serve_with(cors_allow_origins=["https://maps.example.org"]), build_tiles=False
    )
    with TestClient(app) as c:
        r = c.get("/healthz", headers={"Origin": "https://maps.example.org"})
        assert r.headers["access-control-allow-origin"] == "https://maps.example.org"
        pre = c.options(
            "/search",
            headers={
                "Origin": "https://maps.example.org",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]
        other = c.get("/healthz", headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers
        denied = c.options(
            "/search", headers={"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
        )
        assert denied.status_code == 400 and "access-control-allow-origin" not in denied.headers
        # errors carry CORS too, so that a page of an allowed origin can read them
        err = c.get("/cells/zz", headers={"Origin": "https://maps.example.org"})
        assert err.status_code == 422 and err.headers["access-control-allow-origin"] == "https://maps.example.org"


def test_cors_origins_are_checked():
    from vectorgeo.config import ServeConfig, section
    from vectorgeo.errors import ConfigError

    with pytest.raises(ConfigError, match=r"serve\.cors_allow_origins\.0.*without a path"):
        section(ServeConfig, {"cors_allow_origins": ["https://maps.example.org/app"]}, "serve")
