"""The project-local cluster: start/stop/status, persistence, isolation, external URLs, the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg
import pytest
from conftest import free_port, start_test_cluster

from vectorgeo import cli, db
from vectorgeo.errors import DatabaseError

pytestmark = pytest.mark.db


@pytest.fixture(scope="module")
def _module_cluster():
    cluster = start_test_cluster("vectorgeo-dbtest-")
    yield cluster
    cluster.stop(mode="immediate")
    shutil.rmtree(cluster.home, ignore_errors=True)


@pytest.fixture
def own_cluster(_module_cluster: db.Cluster) -> db.Cluster:
    """A cluster of this module's own (tests stop, kill and restart it), running at the start of each test."""
    _module_cluster.start()
    return _module_cluster


def test_start_stop_keeps_data(own_cluster: db.Cluster) -> None:
    c = own_cluster
    assert c.status()
    with psycopg.connect(c.url(), autocommit=True) as conn:
        exts = {r[0] for r in conn.execute("SELECT extname FROM pg_extension")}
        assert {"postgis", "vector"} <= exts
        vector_version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()[0]
        assert tuple(int(x) for x in vector_version.split(".")[:2]) >= (0, 8)
        assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert conn.execute("SHOW port").fetchone()[0] == str(c.port)
        conn.execute("CREATE TABLE IF NOT EXISTS kept (x int)")
        conn.execute("TRUNCATE kept")
        conn.execute("INSERT INTO kept VALUES (42)")
    assert (c.home / f".s.PGSQL.{c.port}").exists()
    assert c.stop() and not c.status()
    assert not c.stop()  # already stopped
    assert c.start() == c.url()
    with psycopg.connect(c.url()) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone()[0] == 42
    # starting a running cluster is a no-op
    pid = c.pid()
    c.start()
    assert c.pid() == pid
    # a job finds the running cluster ready (one connection, no server command); a stopped one is started
    assert c.ready()
    c.stop()
    assert not c.ready()


def test_tcp_needs_the_password(own_cluster: db.Cluster) -> None:
    c = own_cluster
    with psycopg.connect(c.url(tcp=True)) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://postgres:wrong@127.0.0.1:{c.port}/{c.dbname}", connect_timeout=5)
    assert oct(c.password_file.stat().st_mode & 0o777) == "0o600"


def test_restart_after_crash(own_cluster: db.Cluster) -> None:
    c = own_cluster
    c.kill()
    assert not c.status()
    c.start()
    with psycopg.connect(c.url()) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="runs as root only")
def test_runs_as_postgres_when_root(own_cluster: db.Cluster) -> None:
    import pwd

    assert pwd.getpwuid(own_cluster.datadir.stat().st_uid).pw_name == "postgres"
    assert oct(own_cluster.datadir.stat().st_mode & 0o777) == "0o700"


def test_external_url_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv(db.ENV_HOME, str(home))
    monkeypatch.setenv(db.ENV_URL, "postgresql://me:hunter2@db.example.invalid:5432/x")
    assert db.database_url() == "postgresql://me:hunter2@db.example.invalid:5432/x"
    assert cli.main(["db", "start"]) == 0
    out = capsys.readouterr().out
    assert "nothing to start" in out and "hunter2" not in out and "me:***@" in out
    assert not home.exists()


def test_config_url_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(db.ENV_URL, raising=False)
    monkeypatch.delenv(db.ENV_HOME, raising=False)
    cfg = {"database": {"url": "postgresql://a@h/d"}}
    assert db.database_url(cfg) == "postgresql://a@h/d"
    cfg = {"database": {"home": str(tmp_path / "h"), "port": 55999, "dbname": "zz"}}
    c = db.cluster(cfg)
    assert (c.home, c.port, c.dbname) == ((tmp_path / "h").resolve(), 55999, "zz")
    assert db.database_url(cfg) == f"postgresql://postgres@/zz?host={c.home}&port=55999"
    assert db.settings(None)["port"] == 55432


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@h:5432/d", "postgresql://u:***@h:5432/d"),
        ("postgresql://u@h/d?password=s3cret&sslmode=require", "postgresql://u@h/d?password=***&sslmode=require"),
        ("host=h user=u password=s3cret dbname=d", "host=h user=u password=*** dbname=d"),
        ("postgresql://h/d", "postgresql://h/d"),
    ],
)
def test_mask_password(url: str, shown: str) -> None:
    assert db.mask_password(url) == shown


def test_cli_status_and_url(own_cluster: db.Cluster, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv(db.ENV_URL, raising=False)
    monkeypatch.setenv(db.ENV_HOME, str(own_cluster.home))
    cfg = own_cluster.home / "config.yaml"
    cfg.write_text(
        "layers: {lc: {kind: categorical, source: builtin:modis_igbp_2019, classes: {1: forest}}}\n"
        f"land_mask: {{source: builtin:globe_landmask}}\ndatabase: {{port: {own_cluster.port}}}\n"
    )
    assert cli.main(["db", "url", "--config", str(cfg)]) == 0
    assert capsys.readouterr().out.strip() == own_cluster.url()
    assert cli.main(["db", "status", "--config", str(cfg)]) == 0
    assert "running" in capsys.readouterr().out
    assert cli.main(["db", "stop", "--config", str(cfg)]) == 0
    assert cli.main(["db", "status", "--config", str(cfg)]) == 3
    assert "stopped" in capsys.readouterr().out


def test_unstarted_cluster_is_a_clear_error(tmp_path: Path) -> None:
    from vectorgeo import store

    c = db.Cluster(home=tmp_path / "nothing", port=free_port())
    with pytest.raises(DatabaseError, match="vectorgeo db start"):
        store.connect(c.url())


def test_port_taken_by_another_server_names_the_key(own_cluster: db.Cluster) -> None:
    """A second project cluster on a port another server holds: the error says which key to change."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="vectorgeo-dbtest-port-"))
    try:
        other = db.Cluster(home=home, port=own_cluster.port)
        with pytest.raises(DatabaseError, match=rf"port {own_cluster.port} is taken .*database\.port"):
            other.start()
        assert own_cluster.ready()  # the running server is untouched
    finally:
        shutil.rmtree(home, ignore_errors=True)
