"""The project-local PostgreSQL cluster (embedded default) and the database URL.

Without ``VECTORGEO_DATABASE_URL`` and ``database.url``, vectorgeo runs its own PostgreSQL cluster:
``initdb`` into ``<home>/pgdata``, where ``<home>`` is ``VECTORGEO_HOME``, ``database.home`` or
``.vectorgeo`` in the project folder. It listens on 127.0.0.1 only, on its own port
(``database.port``, default 55432), with its unix socket and log file in ``<home>``, so it never
touches the system cluster. PostgreSQL refuses to run as root: when run as root, the cluster belongs
to the unprivileged ``postgres`` user and every server command runs through ``runuser``.

Authentication: unix-socket connections are trusted (the socket lives in ``<home>``, which only the
cluster owner and root can enter); TCP connections on 127.0.0.1 need the password kept in
``<home>/password`` (mode 0600), shown by ``vectorgeo db url --tcp``.

One database for a cluster run: jobs on other machines cannot use a server that listens on their own
127.0.0.1, and must never start one each. With ``VECTORGEO_DATABASE_URL`` (or ``database.url``) every job
uses that server. Without it, the main Snakemake process of a run whose jobs go to other machines (the
SLURM profile) calls :func:`share_database` once, before the first job: it starts the project-local
cluster (in the shared project folder) listening also on this machine's name (``VECTORGEO_DATABASE_HOST``
overrides it), with password authentication from other hosts, and puts the TCP URL into
``VECTORGEO_DATABASE_URL``, which every SLURM job inherits (``sbatch --export=ALL``).

Public API: :func:`settings` (and :func:`config_section`), :func:`database_url`, :func:`share_database`,
:class:`Cluster` (``start``, ``stop``, ``status``, ``url``, ``kill``), :func:`cluster`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from vectorgeo.errors import DatabaseError

ENV_URL = "VECTORGEO_DATABASE_URL"
ENV_HOME = "VECTORGEO_HOME"
ENV_HOST = "VECTORGEO_DATABASE_HOST"
LOCALHOST = "127.0.0.1"
# pg_hba.conf lines that let other machines in with the password (a shared server only)
REMOTE_HBA = ("host all all 0.0.0.0/0 scram-sha-256", "host all all ::/0 scram-sha-256")
PG_MAJOR = 15
RUN_USER = "postgres"
EXTENSIONS = ("postgis", "vector")

# Written into postgresql.conf at initdb; port and socket are given on the command line at each start.
SERVER_CONF = {
    "listen_addresses": "'127.0.0.1'",
    "shared_buffers": "'512MB'",
    "work_mem": "'32MB'",
    "maintenance_work_mem": "'1GB'",
    "max_parallel_maintenance_workers": "1",
    "max_wal_size": "'4GB'",
    "checkpoint_timeout": "'15min'",
    "random_page_cost": "1.1",
    "jit": "off",
    "logging_collector": "off",
}


def config_section(config: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """A top-level config section with every default filled in (from the config models).

    Args:
        config: A full config (only the section ``name`` is read), or None for the defaults.
        name: The section: ``database`` or ``serve``.

    Raises:
        ConfigError: a bad value in the section.
    """
    from vectorgeo.config import DatabaseConfig, ServeConfig, section

    models: dict[str, type[DatabaseConfig] | type[ServeConfig]] = {"database": DatabaseConfig, "serve": ServeConfig}
    return section(models[name], (config or {}).get(name), name).model_dump()


def settings(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``database`` config section with every default filled in (from the config models).

    Args:
        config: A full config (only its ``database`` section is read), or None for the defaults.

    Raises:
        ConfigError: a bad ``database.*`` value.
    """
    return config_section(config, "database")


def project_dir(start: Path | None = None) -> Path:
    """The project folder: the nearest folder upwards holding a Snakefile or ``.vectorgeo``, else cwd."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "Snakefile").exists() or (d / ".vectorgeo").is_dir():
            return d
    return here


def home_dir(config: Mapping[str, Any] | None = None) -> Path:
    """Folder of the project-local cluster: VECTORGEO_HOME, database.home or <project>/.vectorgeo."""
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).resolve()
    home = settings(config).get("home")
    if home:
        return Path(home).resolve()
    return project_dir() / ".vectorgeo"


def external_url(config: Mapping[str, Any] | None = None) -> str | None:
    """The external database URL (VECTORGEO_DATABASE_URL, else database.url), or None."""
    return os.environ.get(ENV_URL) or settings(config).get("url") or None


def mask_password(url: str) -> str:
    """The URL with any password replaced by ``***`` (both ``user:pw@`` and ``password=`` forms)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable database URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = "&".join(("password=***" if q.lower().startswith("password=") else q) for q in parts.query.split("&") if q)
    masked = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not parts.scheme:  # a libpq key=value string
        masked = " ".join("password=***" if w.lower().startswith("password=") else w for w in url.split())
    return masked


def pg_bindir() -> Path:
    """Folder of the PostgreSQL server binaries (initdb, pg_ctl, postgres)."""
    cand = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
    if (cand / "pg_ctl").exists():
        return cand
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        d = Path(out.stdout.strip())
        if (d / "pg_ctl").exists():
            return d
    raise DatabaseError(
        f"PostgreSQL server binaries not found in {cand} or via pg_config; run `bash setup/postgres.sh`"
    )


@dataclass(frozen=True)
class Cluster:
    """A project-local PostgreSQL cluster.

    Attributes:
        home: Folder holding ``pgdata/``, the socket, ``postgres.log`` and ``password``.
        port: TCP port on 127.0.0.1 (also names the unix socket).
        dbname: The database created with the postgis and vector extensions.
    """

    home: Path
    port: int = 55432
    dbname: str = "vectorgeo"

    @property
    def datadir(self) -> Path:
        return self.home / "pgdata"

    @property
    def logfile(self) -> Path:
        return self.home / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.home / "password"

    def url(self, tcp: bool = False, host: str = LOCALHOST) -> str:
        """Connection URL: through the unix socket (default) or TCP to ``host`` with the password."""
        if tcp:
            pw = quote(self.password_file.read_text().strip(), safe="") if self.password_file.exists() else ""
            return f"postgresql://{RUN_USER}:{pw}@{host}:{self.port}/{self.dbname}"
        return f"postgresql://{RUN_USER}@/{self.dbname}?host={quote(str(self.home), safe='/')}&port={self.port}"

    # --- process control -------------------------------------------------------------------------------
    def _as_owner(
        self, args: list[str | Path], check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise DatabaseError("running as root needs `runuser` to start PostgreSQL as an unprivileged user")
            cmd = ["runuser", "-u", RUN_USER, "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, cwd="/")
        if check and proc.returncode != 0:
            raise DatabaseError(f"{' '.join(cmd)} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
        return proc

    def _prepare_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.home.chmod(0o700)
            return
        import pwd

        try:
            pw = pwd.getpwnam(RUN_USER)
        except KeyError:
            raise DatabaseError(
                f"running as root needs the unprivileged user '{RUN_USER}' (installed with postgresql)"
            ) from None
        os.chown(self.home, pw.pw_uid, pw.pw_gid)
        self.home.chmod(0o700)
        # the server user must be able to traverse every parent folder (search permission only)
        for d in self.home.parents:
            st = d.stat()
            if not st.st_mode & stat.S_IXOTH and st.st_uid != pw.pw_uid:
                d.chmod(st.st_mode | stat.S_IXOTH)

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        """``initdb`` the data folder (no-op when it exists)."""
        if self.initialized():
            return
        self._prepare_home()
        bindir = pg_bindir()
        pwfile = self.home / ".pwfile"
        password = secrets.token_urlsafe(24)
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam(RUN_USER)
            os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        pwfile.chmod(0o600)
        try:
            self._as_owner(
                [
                    bindir / "initdb",
                    "-D",
                    self.datadir,
                    "-U",
                    RUN_USER,
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                ]
            )
        finally:
            if pwfile.exists():
                pwfile.replace(self.password_file)
        conf = self.datadir / "postgresql.conf"
        extra = "\n# vectorgeo project-local cluster\n" + "".join(f"{k} = {v}\n" for k, v in SERVER_CONF.items())
        with open(conf, "a") as f:
            f.write(extra)

    def status(self) -> bool:
        """True when the server of this cluster runs (a stale ``postmaster.pid`` counts as stopped)."""
        if not self.initialized():
            return False
        proc = self._as_owner([pg_bindir() / "pg_ctl", "status", "-D", self.datadir], check=False)
        return proc.returncode == 0

    def start(self, listen: str = LOCALHOST) -> str:
        """Initialise if needed, start if stopped, create the database and extensions; return the URL.

        Concurrent calls (e.g. two workflow jobs) are serialised by the lock file ``<home>/start.lock``.

        Args:
            listen: Address the server listens on besides 127.0.0.1 (other machines then connect with
                the password); a running server that does not listen there is restarted.
        """
        import fcntl

        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start(listen)

    def _listen_addresses(self) -> str | None:
        """The running server's listen_addresses (None when it cannot be asked)."""
        import psycopg

        try:
            with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
                row = conn.execute("SHOW listen_addresses").fetchone()
        except psycopg.Error:
            return None
        return str(row[0]) if row else None

    def _allow_remote(self) -> None:
        """Password authentication for connections from other hosts (pg_hba.conf, once)."""
        hba = self.datadir / "pg_hba.conf"
        text = hba.read_text()
        missing = [line for line in REMOTE_HBA if line not in text]
        if missing:
            with open(hba, "a") as f:
                f.write(
                    "# vectorgeo: a server shared by the jobs of a cluster run\n" + "".join(f"{m}\n" for m in missing)
                )

    def _start(self, listen: str = LOCALHOST) -> str:
        self.init()
        addresses = LOCALHOST if listen == LOCALHOST else f"{LOCALHOST},{listen}"
        if listen != LOCALHOST:
            self._allow_remote()
            if self.status() and self._listen_addresses() != addresses:
                self.stop()
        if not self.status():
            self._prepare_home()
            opts = f"-p {self.port} -k '{self.home}' -c listen_addresses='{addresses}'"
            proc = self._as_owner(
                [
                    pg_bindir() / "pg_ctl",
                    "start",
                    "-w",
                    "-t",
                    "120",
                    "-D",
                    self.datadir,
                    "-l",
                    self.logfile,
                    "-o",
                    opts,
                ],
                check=False,
                timeout=180,
            )
            if proc.returncode != 0:
                tail = ""
                if self.logfile.exists():
                    tail = "\n".join(self.logfile.read_text(errors="replace").splitlines()[-10:])
                hint = ""
                if "Address already in use" in tail:
                    hint = (
                        f"port {self.port} is taken by another server: set config key database.port to a free "
                        "port, or VECTORGEO_DATABASE_URL to use that server\n"
                    )
                raise DatabaseError(
                    f"could not start PostgreSQL in {self.datadir} on port {self.port}: "
                    f"{hint}{(proc.stderr or proc.stdout).strip()}\n{tail}"
                )
        self._create_database()
        return self.url()

    def _create_database(self) -> None:
        import psycopg

        admin = f"postgresql://{RUN_USER}@/postgres?host={quote(str(self.home), safe='/')}&port={self.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(admin, autocommit=True) as conn:
                    exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.dbname,)).fetchone()
                    if not exists:
                        from psycopg import sql

                        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.dbname)))
                break
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise DatabaseError(f"PostgreSQL in {self.datadir} does not accept connections: {e}") from None
                time.sleep(0.3)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            for ext in EXTENSIONS:
                conn.execute(f"CREATE EXTENSION IF NOT EXISTS {ext}")

    def ready(self) -> bool:
        """True when the server accepts connections to the database and its extensions exist."""
        import psycopg

        if not self.initialized():
            return False
        try:
            with psycopg.connect(self.url(), autocommit=True, connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_extension WHERE extname = ANY(%s)", (list(EXTENSIONS),)
                ).fetchone()
        except psycopg.Error:
            return False
        return bool(row and row[0] == len(EXTENSIONS))

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server; returns False when it was not running."""
        if not self.status():
            return False
        self._as_owner([pg_bindir() / "pg_ctl", "stop", "-w", "-m", mode, "-D", self.datadir], timeout=180)
        return True

    def pid(self) -> int | None:
        """PID of the postmaster from ``postmaster.pid``, or None."""
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """Kill the postmaster and its backends with SIGKILL (a crash, for tests)."""
        pid = self.pid()
        if pid is None:
            return
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
        for p in [pid, *(int(c) for c in children.stdout.split())]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def cluster(config: Mapping[str, Any] | None = None) -> Cluster:
    """The project-local cluster described by the config (or the defaults)."""
    s = settings(config)
    return Cluster(home=home_dir(config), port=int(s["port"]), dbname=str(s["dbname"]))


def database_url(config: Mapping[str, Any] | None = None) -> str:
    """The database URL: VECTORGEO_DATABASE_URL, database.url, else the project-local cluster's URL.

    The local cluster is not started here: see :meth:`Cluster.start` (``vectorgeo db start``).
    """
    return external_url(config) or cluster(config).url()


def share_database(config: Mapping[str, Any] | None = None) -> str:
    """The one database of a run whose jobs run on other machines, as a URL they can use.

    The external URL when one is set; else the project-local cluster, started here (once, by the main
    process of the run) listening on this machine's name (``VECTORGEO_DATABASE_HOST`` overrides it)
    with password authentication, and its TCP URL.

    Raises:
        DatabaseError: the server cannot be started.
    """
    import socket

    external = external_url(config)
    if external is not None:
        return external
    host = os.environ.get(ENV_HOST) or socket.gethostname()
    c = cluster(config)
    c.start(listen=host)
    return c.url(tcp=True, host=host)


def ensure_database(config: Mapping[str, Any] | None = None) -> str:
    """The database URL, after starting the project-local cluster when no external URL is set.

    A cluster that already serves the database with its extensions is used as it is: one connection,
    no server commands (what every load job after the first finds).
    """
    external = external_url(config)
    if external is not None:
        return external
    c = cluster(config)
    return c.url() if c.ready() else c.start()
