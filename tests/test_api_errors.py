"""Error answers of the API (vectorgeo.api.errors) and how its state meets database trouble.

Against a real PostgreSQL: one that is down, a pool whose connections are all taken, backends that the
server terminated, and routes that fail on the server side.
"""

from __future__ import annotations

import psycopg
import pytest
from test_api import CELL, Synthetic, a_valid_cell, load_synthetic, serve_with

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
