"""Bodies sent chunked (no Content-Length) are read whole and bounded
under gunicorn: past 64 KiB they are 413, like a declared one, where
Werkzeug's own reading cut them short (a 400) or a run never looked.
"""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import INTERNAL_TOKEN
from fault_support import MICROBATCH, Gunicorn, StubExecutor

from shared.db import Database


@pytest.fixture(scope="module")
def microbatch(database_url: str, tmp_path_factory: Any) -> Iterator[str]:
    logs = Path(tmp_path_factory.mktemp("bodies"))
    executor = StubExecutor()
    service = Gunicorn(MICROBATCH.entry, logs / "microbatch.log")
    try:
        service.start(MICROBATCH.environ(database_url, service, executor))
        yield service.url
    finally:
        service.stop()


def post_chunked(base: str, path: str, body: bytes) -> tuple[int, Any]:
    """POST ``body`` in 4 KiB chunks, with no Content-Length."""
    address = urlsplit(base)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        pieces = (body[i : i + 4096] for i in range(0, len(body), 4096))
        conn.request(
            "POST",
            path,
            body=pieces,
            headers={
                "Authorization": f"Bearer {INTERNAL_TOKEN}",
                "Content-Type": "application/json",
            },
            encode_chunked=True,
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.slow
def test_a_chunked_callback_is_read_whole(microbatch: str) -> None:
    callback = {
        "batch_conversion_id": str(uuid.uuid4()),
        "swap_id": "swap-1",
        "tx_hash": "0xabc",
        "status": "completed",
        "actual_usdt_received": "10",
        # Padding past one chunk, well under the limit.
        "note": "x" * 20_000,
    }

    status, body = post_chunked(
        microbatch, "/swap-executed", json.dumps(callback).encode()
    )

    # Read and understood: the conversion is unknown, not the body unreadable.
    assert (status, body["error"]["code"]) == (404, "not_found")


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/check-threshold", "/swap-executed"])
def test_a_chunked_body_over_64_kib_is_413_and_runs_nothing(
    microbatch: str, db: Database, path: str
) -> None:
    status, body = post_chunked(microbatch, path, b" " * (64 * 1024 + 1))

    assert (status, body["error"]["code"]) == (413, "body_too_large")
    with db.transaction() as cur:
        cur.execute("SELECT count(*) AS n FROM job_runs")
        assert cur.fetchone()["n"] == 0
