"""Schema migrations (yoyo) and the check each service makes at start."""

from __future__ import annotations

from pathlib import Path

from yoyo import get_backend, read_migrations

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
