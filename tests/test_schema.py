"""Migrations apply once, and a service refuses a schema older than its code.

Each test works in a scratch database of its own on the test server, dropped
afterwards, so the session's migrated database is never touched.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
