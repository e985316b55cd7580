"""Schema migrations (yoyo) and the check each service makes at start."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg2
from yoyo import get_backend, read_migrations

from shared.db import DatabaseUnavailable

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class SchemaOutdated(Exception):
    """The database lacks migrations this code needs: run `payoutctl migrate`."""


def _yoyo_url(database_url: str) -> str:
    # yoyo picks its driver from the scheme; psycopg2 is ``postgresql``.
    return "postgresql://" + database_url.split("://", 1)[1]


def migrate(database_url: str) -> list[str]:
    """Apply what is missing, under yoyo's lock; return the ids applied."""
    backend = get_backend(_yoyo_url(database_url))
    migrations = read_migrations(str(MIGRATIONS))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [migration.id for migration in pending]


def missing(database_url: str) -> list[str]:
    """Ids of shipped migrations the database has not applied."""
    backend = get_backend(_yoyo_url(database_url))
    return [
        migration.id for migration in backend.to_apply(read_migrations(str(MIGRATIONS)))
    ]


def require_current(database_url: str) -> None:
    """Refuse to run on a schema older than this code expects.

    A newer schema (migrations we do not know) is accepted, so a rolling
    deploy can migrate before the old revision stops.
    """
    absent = missing(database_url)
    if absent:
        raise SchemaOutdated(
            f"database schema lacks migrations {', '.join(absent)};"
            " run `payoutctl migrate`"
        )


class SchemaGate:
    """The start-up schema check, carried over to requests when the database
    was out of reach at start.

    A worker that boots while PostgreSQL is down (a new instance, a worker
    replaced after a crash) must not exit: gunicorn shuts the whole server
    down when a worker fails to boot, and the service would not come back by
    itself once the database does. So an unreachable database only defers
    the check; an outdated schema still refuses to serve.
    """

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._lock = threading.Lock()
        self.checked = False

    def check(self) -> None:
        """Raise ``SchemaOutdated``, or ``DatabaseUnavailable`` when the
        database cannot be asked; pass once the schema was found current."""
        if self.checked:
            return
        with self._lock:
            if self.checked:
                return
            try:
                require_current(self._database_url)
            except psycopg2.OperationalError as error:
                raise DatabaseUnavailable(str(error).strip()) from error
            self.checked = True
