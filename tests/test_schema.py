"""Migrations apply once, and a service refuses a schema older than its code.

Each test works in a scratch database of its own on the test server, dropped
afterwards, so the session's migrated database is never touched.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg2
import pytest
from conftest import base_environ
from psycopg2 import sql

from gcaccumulator.app import create_app as create_accumulator
from gcbatchprocessor.app import create_app as create_batch_processor
from gcmicrobatchprocessor.app import create_app as create_micro_batch_processor
from shared import embedded, schema
from shared.schema import SchemaOutdated

SHIPPED = sorted(path.stem for path in schema.MIGRATIONS.glob("*.sql"))


def drop_database(admin_url: str, name: str) -> None:
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
            )
    finally:
        conn.close()


@pytest.fixture
def scratch_url(admin_url: str) -> Iterator[str]:
    """An empty, unmigrated database on the test server."""
    name = f"payouts_scratch_{uuid.uuid4().hex[:10]}"
    url = embedded.ensure_database(admin_url, name)
    yield url
    drop_database(admin_url, name)


def execute(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            rows = cur.fetchall() if cur.description else []
        conn.commit()
    finally:
        conn.close()
    return rows


def test_migrating_twice_applies_nothing_the_second_time(scratch_url: str) -> None:
    first = schema.migrate(scratch_url)
    second = schema.migrate(scratch_url)

    assert SHIPPED, "no migrations found"
    assert first == SHIPPED
    assert second == []
    assert schema.missing(scratch_url) == []


def test_concurrent_migrations_apply_each_migration_once(scratch_url: str) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        applied = list(pool.map(schema.migrate, [scratch_url] * 3))

    assert sorted(migration for ids in applied for migration in ids) == SHIPPED
    assert schema.missing(scratch_url) == []


def test_first_migration_records_when_the_database_was_created(
    scratch_url: str,
) -> None:
    schema.migrate(scratch_url)

    rows = execute(
        scratch_url, "SELECT now() - created_at < interval '1 minute' FROM suite_info"
    )
    assert rows == [(True,)]


def service_environ(service: str, database_url: str) -> dict[str, str]:
    environ = base_environ(database_url)
    if service == "microbatch":
        environ |= {
            "MICRO_BATCH_THRESHOLD_USD": "20",
            "SERVICE_URL": "http://127.0.0.1:8083",
            "SWAP_EXECUTOR_URL": "http://127.0.0.1:8090",
            "BATCH_PROCESSOR_URL": "http://127.0.0.1:8082",
        }
    if service == "batch":
        environ |= {
            "SERVICE_URL": "http://127.0.0.1:8082",
            "PAYOUT_EXECUTOR_URL": "http://127.0.0.1:8090",
            "MICRO_BATCH_PROCESSOR_URL": "http://127.0.0.1:8083",
        }
    return environ


FACTORIES = {
    "accumulator": create_accumulator,
    "microbatch": create_micro_batch_processor,
    "batch": create_batch_processor,
}


@pytest.mark.parametrize("service", FACTORIES)
def test_service_refuses_to_start_on_an_unmigrated_database(
    scratch_url: str, service: str
) -> None:
    with pytest.raises(SchemaOutdated) as refused:
        FACTORIES[service](service_environ(service, scratch_url))

    assert SHIPPED[0] in str(refused.value)
    assert "payoutctl migrate" in str(refused.value)


@pytest.mark.parametrize("service", FACTORIES)
def test_service_starts_on_a_fully_migrated_database(
    scratch_url: str, service: str
) -> None:
    schema.migrate(scratch_url)

    app = FACTORIES[service](service_environ(service, scratch_url))

    app.extensions["suite"].db.close()


def test_service_refuses_a_database_missing_its_latest_migration(
    scratch_url: str,
) -> None:
    schema.migrate(scratch_url)
    execute(
        scratch_url,
        "DELETE FROM _yoyo_migration WHERE migration_id = %s",
        (SHIPPED[-1],),
    )

    with pytest.raises(SchemaOutdated) as refused:
        create_accumulator(base_environ(scratch_url))

    assert SHIPPED[-1] in str(refused.value)


def test_service_accepts_a_schema_newer_than_its_code(scratch_url: str) -> None:
    # A rolling deploy migrates before the old revision stops serving.
    schema.migrate(scratch_url)
    execute(
        scratch_url,
        "INSERT INTO _yoyo_migration (migration_hash, migration_id, applied_at_utc)"
        " VALUES (%s, %s, now())",
        (uuid.uuid4().hex, "9999.from-a-newer-revision"),
    )

    app = create_accumulator(base_environ(scratch_url))

    app.extensions["suite"].db.close()


class Forwarder:
    """A TCP port that refuses connections until ``open`` points it at the
    test server: a database out of reach when a service starts, then back."""

    def __init__(self, admin_url: str, database_url: str) -> None:
        server = urlsplit(admin_url)
        socket_dir = parse_qs(server.query).get("host", [None])[0]
        port = server.port or 5432
        # The machine's server over TCP, or the embedded one's unix socket.
        self.target: Any = (
            f"{socket_dir}/.s.PGSQL.{port}"
            if server.hostname is None and socket_dir
            else (server.hostname or "127.0.0.1", port)
        )
        self.database = urlsplit(database_url).path
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}{self.database}"

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def _connect_upstream(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            return upstream
        return socket.create_connection(self.target)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = self._connect_upstream()
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink), daemon=True
                ).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            sink.close()


def test_a_service_started_while_its_database_is_down_serves_once_it_is_back(
    scratch_url: str, admin_url: str
) -> None:
    # gunicorn stops the whole server when a worker fails to boot, so a
    # worker that starts during an outage must start, answer 503, and serve
    # when the database is back: nothing restarts it.
    schema.migrate(scratch_url)
    database = Forwarder(admin_url, scratch_url)
    app = create_accumulator(base_environ(database.url))
    client = app.test_client()
    try:
        down = client.post("/ipn", data=b"{}")
        health_down = client.get("/health")
        livez = client.get("/livez")

        database.open()
        up = client.post("/ipn", data=b"{}", headers={"x-nowpayments-sig": "00"})
        health_up = client.get("/health")
    finally:
        app.extensions["suite"].db.close()
        database.close()

    assert down.status_code == 503
    assert down.get_json()["outcome"] == "retry_later"
    assert down.get_json()["error"]["code"] == "database_unavailable"
    assert health_down.status_code == 503
    assert health_down.get_json()["database"]["ok"] is False
    assert livez.status_code == 200
    # Served again: the forged delivery is refused on its signature.
    assert up.status_code == 401
    assert up.get_json()["outcome"] == "bad_signature"
    assert health_up.get_json()["database"]["ok"] is True


def test_a_service_started_while_its_database_is_down_still_refuses_an_old_schema(
    scratch_url: str, admin_url: str
) -> None:
    database = Forwarder(admin_url, scratch_url)
    app = create_accumulator(base_environ(database.url))
    try:
        database.open()
        answer = app.test_client().post("/ipn", data=b"{}")
    finally:
        app.extensions["suite"].db.close()
        database.close()

    assert answer.status_code == 503
    assert answer.get_json()["error"]["code"] == "schema_outdated"
    assert "payoutctl migrate" in answer.get_json()["error"]["message"]
    assert execute(scratch_url, "SELECT to_regclass('ipn_events')") == [(None,)]
