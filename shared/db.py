"""The connection pool and the transaction helper.

Every piece of work is one ``with db.transaction() as cur:`` block: it commits
when the block ends and rolls back when it raises. A connection that broke
(server restarted, network cut) is thrown away rather than returned to the
pool, so the service recovers by itself when the database comes back.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from shared import money


class DatabaseUnavailable(Exception):
    """The database cannot be reached or broke mid-transaction: retry later."""


def _json_default(value: object) -> str:
    if isinstance(value, Decimal):
        return money.to_text(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value: Any) -> psycopg2.extras.Json:
    """Wrap a value for a JSONB parameter; Decimals become strings, never floats."""
    return psycopg2.extras.Json(
        value, dumps=lambda v: json.dumps(v, default=_json_default)
    )


def load_queries(path: Path) -> dict[str, str]:
    """Named queries from a ``.sql`` file: each starts with ``-- name: NAME``."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = line.removeprefix("-- name:").strip(), []
        elif name:
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


_BROKEN = (psycopg2.OperationalError, psycopg2.InterfaceError)


class Database:
    """A bounded, thread-safe pool that waits for a free connection.

    Idle connections are reused last-in first-out. When one turns out broken
    (the server restarted), every idle one is dropped too: they are almost
    certainly dead as well, and reconnecting costs less than a failed request.
    """

    def __init__(
        self,
        dsn: str,
        size: int = 8,
        statement_timeout_ms: int = 15_000,
        application_name: str = "payout-suite",
        acquire_timeout_s: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self._slots = threading.BoundedSemaphore(size)
        self._acquire_timeout_s = acquire_timeout_s
        self._application_name = application_name
        self._server_options = (
            f"-c statement_timeout={statement_timeout_ms} -c timezone=UTC"
        )
        self._idle: list[psycopg2.extensions.connection] = []
        self._idle_lock = threading.Lock()

    def _take(self) -> psycopg2.extensions.connection:
        with self._idle_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None and not conn.closed:
            return conn
        try:
            return psycopg2.connect(
                self.dsn,
                connect_timeout=5,
                application_name=self._application_name,
                options=self._server_options,
            )
        except _BROKEN as error:
            raise DatabaseUnavailable(str(error).strip()) from error

    def _give_back(self, conn: psycopg2.extensions.connection) -> None:
        status = conn.get_transaction_status() if not conn.closed else None
        if status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            with self._idle_lock:
                self._idle.append(conn)
            return
        conn.close()
        with self._idle_lock:
            stale, self._idle = self._idle, []
        for old in stale:
            old.close()

    @contextmanager
    def connection(self) -> Iterator[psycopg2.extensions.connection]:
        if not self._slots.acquire(timeout=self._acquire_timeout_s):
            raise DatabaseUnavailable("no free database connection in time")
        try:
            conn = self._take()
            try:
                yield conn
            finally:
                self._give_back(conn)
        finally:
            self._slots.release()

    @contextmanager
    def transaction(self) -> Iterator[psycopg2.extras.RealDictCursor]:
        """One transaction: commit at the end of the block, roll back on error."""
        with self.connection() as conn:
            try:
                with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                    yield cur
                conn.commit()
            except psycopg2.errors.QueryCanceled as error:
                # The connection is fine; the statement ran out of time.
                _rollback_quietly(conn)
                raise DatabaseUnavailable(
                    f"a statement ran past its time limit: {str(error).strip()}"
                ) from error
            except _BROKEN as error:
                _rollback_quietly(conn)
                conn.close()
                raise DatabaseUnavailable(str(error).strip()) from error
            except BaseException:
                _rollback_quietly(conn)
                raise

    def ping(self) -> None:
        with self.transaction() as cur:
            cur.execute("SELECT 1")

    def close(self) -> None:
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _rollback_quietly(conn: psycopg2.extensions.connection) -> None:
    # The rollback of a broken connection fails too; the connection is then
    # closed by ``connection()`` and the original error is what matters.
    if not conn.closed:
        try:
            conn.rollback()
        except _BROKEN:
            conn.close()
