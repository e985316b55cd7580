"""The local system on ports and a database of its own, for the demo and soak.

``make run`` is ``scripts.run_local`` on the fixed ports; the demo and the
soak test start that same command with ``--port-base`` in a process group
of their own, its output (every process's log lines) in one file, and stop
it when they are done. The database is a fresh one on ``DATABASE_URL``'s
server when set, else on an embedded server under ``.data/<purpose>``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
import requests
from psycopg2 import sql

from shared import embedded, schema

ROOT = Path(__file__).resolve().parent.parent
# run_local's offsets: accumulator, batch, micro-batch, sandbox executor.
OFFSETS = (1, 2, 3, 4)


def bases(port_base: int) -> list[str]:
    """The four base URLs, in run_local's order of offsets."""
    return [f"http://127.0.0.1:{port_base + offset}" for offset in OFFSETS]


def free_port_base() -> int:
    """A base whose four ports are free right now (others may take them)."""
    candidates = list(range(20000, 60000, 10))
    random.shuffle(candidates)
    for base in candidates:
        if all(_free(base + offset) for offset in OFFSETS):
            return base
    raise RuntimeError("no four free ports for the local system")


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def admin_url(data_dir: Path) -> tuple[str, bool]:
    """The server to make databases on; and whether we started it now."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        return configured, False
    already = (data_dir / "pg" / "postmaster.pid").exists()
    return embedded.start(data_dir, keep_running=True), not already


def fresh_database(admin: str, name: str) -> str:
    """Database ``name`` dropped if it was there, created and migrated."""
    drop_database(admin, name)
    url = embedded.ensure_database(admin, name)
    schema.migrate(url)
    return url


def drop_database(admin: str, name: str) -> None:
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s",
                (name,),
            )
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
            )
    finally:
        conn.close()


def fetch_all(url: str, statement: str) -> list[dict[str, Any]]:
    """Every row of one read-only statement, on a connection of its own."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(statement)
            return [dict(row) for row in cur.fetchall()]
    finally:
        conn.close()


def start(env: dict[str, str], port_base: int, log_path: Path) -> subprocess.Popen:
    """``scripts.run_local`` on ``port_base``, its output into ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "scripts.run_local", "--port-base", str(port_base)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own group, so stopping it reaches every process it started.
            start_new_session=True,
        )


def stop(system: subprocess.Popen) -> None:
    os.killpg(system.pid, signal.SIGTERM)
    system.wait(timeout=30)


def wait_for_services(urls: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for base in urls:
        while True:
            try:
                if requests.get(f"{base}/livez", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{base} did not start; see the system log")
            time.sleep(0.3)
