"""The one way vectorgeo connects to PostgreSQL: :func:`connect`, and :func:`configure` for pools."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql

from vectorgeo import db
from vectorgeo.errors import DatabaseError, QueryTimeout


def database_url(config: Mapping[str, Any] | None = None) -> str:
    """The database URL: VECTORGEO_DATABASE_URL, database.url, else the project-local cluster."""
    return db.database_url(config)


def mask_message(msg: str, url: str) -> str:
    """A driver message with the URL's password (and any ``password=...``) replaced by ``***``."""
    try:
        pw = urlsplit(url).password
    except ValueError:
        pw = None
    if pw:
        msg = msg.replace(pw, "***").replace(unquote(pw), "***")
    return re.sub(r"(password=)\S+", r"\1***", msg)


def database_error(what: str, e: psycopg.Error) -> DatabaseError:
    """The :class:`~vectorgeo.errors.DatabaseError` for a driver error: a short message naming ``what``
    failed and why in words (cancelled by the statement timeout, connection lost), the driver's text as
    its ``detail`` only.

    Args:
        what: The operation, e.g. "similarity query".
        e: The driver's error.
    """
    detail = str(e).strip() or type(e).__name__
    if isinstance(e, psycopg.errors.QueryCanceled):
        return QueryTimeout(f"{what} was cancelled: it ran longer than the statement timeout", detail)
    if isinstance(e, psycopg.OperationalError):
        return DatabaseError(f"{what} failed: the database connection was lost", detail)
    return DatabaseError(f"{what} failed", detail)


def configure(conn: psycopg.Connection[Any]) -> None:
    """Register the pgvector type on a new connection, creating the extensions when missing.

    The ``configure`` callback of a ``psycopg_pool.ConnectionPool`` (pgvector-python's recommended
    way), and the last step of :func:`connect`.

    Raises:
        DatabaseError: the database lacks the extensions and cannot create them.
    """
    from pgvector.psycopg import register_vector

    try:
        register_vector(conn)
        return
    except psycopg.ProgrammingError:
        pass
    try:
        for ext in db.EXTENSIONS:
            conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))
        if not conn.autocommit:
            conn.commit()
        register_vector(conn)
    except psycopg.Error as e:
        raise DatabaseError(
            f"database {conn.info.dbname!r} on {conn.info.host} lacks the extensions postgis and vector "
            "and cannot create them",
            detail=str(e).strip(),
        ) from None


def connect(
    url: str | None = None, config: Mapping[str, Any] | None = None, connect_timeout: int = 10
) -> psycopg.Connection[Any]:
    """Connect (autocommit) and register the pgvector type; the one way vectorgeo connects.

    Args:
        url: Database URL; default :func:`database_url` of ``config``.
        config: Config whose ``database`` section gives the URL when ``url`` is None.
        connect_timeout: Seconds to wait for the server.

    Returns:
        A connection in autocommit mode (use ``with conn.transaction():`` for several statements).

    Raises:
        DatabaseError: unreachable server, bad credentials or missing pgvector extension; the message
            names the URL with its password masked.
    """
    url = url or database_url(config)
    shown = db.mask_password(url)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout)
    except (psycopg.Error, ValueError) as e:
        hint = ""
        if db.external_url(config) is None and "host=/" in url:
            hint = " (is the project-local cluster running? `vectorgeo db start`)"
        raise DatabaseError(
            f"cannot connect to database {shown}{hint}", detail=mask_message(str(e).strip(), url)
        ) from None
    try:
        configure(conn)
    except DatabaseError:
        conn.close()
        raise
    return conn
