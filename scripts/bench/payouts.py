"""Benchmark: one /process run over 100,000 clients, then their payout tasks.

    python -m scripts.bench.payouts [--clients 100000] [--concurrency 8]

In its own database (``payouts_bench_payouts``, dropped and recreated each
run) on ``DATABASE_URL``'s server or the embedded one, it seeds with
set-based SQL ``--clients`` threshold clients, each owed 1 to 3 converted
payments that together exceed its threshold (with their completed
conversions and deliveries, so the invariants of DESIGN.md section 8 hold).
Then:

1. The real batch processor, under gunicorn, gets ONE ``POST /process``.
   Its payout executor is a stub (below) and ``OUTBOX_SEND_BUDGET_S=1``, so
   the run spends about a second sending tasks after its claim commits and
   leaves the rest to the next step. Two times are printed: when the
   claim's batches and tasks became visible to another session (polled
   every 20 ms), and when the run answered. Memory is the gunicorn worker's
   resident set from ``/proc/<pid>/status``: VmRSS before the run and
   VmHWM (the peak) after it.
2. The tasks still undelivered are sent by this process through the batch
   processor's own ``Outbox`` (as its ``create_app`` builds it: the
   ``HttpSender`` and the service's hooks), ``--concurrency`` at a time, to
   the stub executor: a threaded ``http.server`` in a subprocess that
   answers 202 and counts the ``Idempotency-Key`` of every request.
3. Every batch must be ``sent``, every task delivered exactly once (no key
   twice at the stub, one key per batch), and reconciliation clean.

Targets (issue 4): the run commits everything in under 10 s with flat
memory; tasks reach the executor at 500 or more per second.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import psycopg2
import psycopg2.extras

from shared import embedded, reconcile, schema
from shared.db import Database
from shared.outbox import HttpSender, Outbox

ROOT = Path(__file__).resolve().parents[2]
DATABASE = "payouts_bench_payouts"
SERVICE = "gcbatchprocessor"  # the application_name of its sessions
TOKEN = "bench-internal-token"  # noqa: S105 (a local benchmark key)

COMMIT_TARGET_S = 10.0
DELIVERY_TARGET_PER_S = 500.0

# Client n is -1009000000000 - n; it is owed 1 + n mod 3 payments whose net
# USDT sums past its threshold of 10. Payment k of client n is worth
# 10 / (1 + n mod 3) plus up to 5 USDT; the fee is what 3% of the gross was.
SEED = """
SELECT setseed(0.42);

INSERT INTO clients (client_id, payout_strategy, payout_threshold_usd,
    wallet_address, payout_currency, payout_network)
SELECT -1009000000000 - n, 'threshold', 10,
       '0x' || lpad(to_hex(n), 40, '0'), 'usdt', 'eth'
FROM generate_series(1, %(clients)s) AS n;

-- One completed conversion per 1,000 clients; its totals are set below.
INSERT INTO batch_conversions (batch_conversion_id, outcome_currency, status,
    row_count, total_usd, total_eth, threshold_usd, swap_id, tx_hash,
    actual_usdt_received, finished_at)
SELECT md5('bench-conversion-' || c)::uuid, 'eth', 'completed', 1, 0, 1, 1000,
       'swap-' || c, '0x' || md5('swap-' || c), 0, now()
FROM generate_series(0, %(clients)s / 1000) AS c;

INSERT INTO payout_accumulation (nowpayments_payment_id, client_id, user_id,
    payment_amount_usd, usd_source, platform_fee_percent, accumulated_usd,
    accumulated_eth, outcome_currency, conversion_status, batch_conversion_id,
    accumulated_usdt, platform_fee_usdt)
SELECT 'bench-' || n || '-' || k, -1009000000000 - n, 6000000000 + n,
       net + fee, 'price', 3, net, round(net / 3390, 18), 'eth', 'converted',
       md5('bench-conversion-' || n / 1000)::uuid, net, fee
FROM generate_series(1, %(clients)s) AS n,
     generate_series(1, 1 + n %% 3) AS k,
     LATERAL (SELECT round(10.0 / (1 + n %% 3) + random()::numeric * 5, 6)
                  AS net) AS owed,
     LATERAL (SELECT round(net * 3 / 97, 6) AS fee) AS taken;

UPDATE batch_conversions AS conversion
SET row_count = shared.row_count, total_usd = shared.total_usd,
    total_eth = shared.total_eth, actual_usdt_received = shared.received
FROM (
    SELECT batch_conversion_id, count(*) AS row_count,
           sum(accumulated_usd) AS total_usd, sum(accumulated_eth) AS total_eth,
           sum(accumulated_usdt + platform_fee_usdt) AS received
    FROM payout_accumulation
    GROUP BY batch_conversion_id
) AS shared
WHERE conversion.batch_conversion_id = shared.batch_conversion_id;

INSERT INTO batch_conversion_members (batch_conversion_id, accumulation_id,
    accumulated_eth, accumulated_usd)
SELECT batch_conversion_id, id, accumulated_eth, accumulated_usd
FROM payout_accumulation;

INSERT INTO ipn_events (source, payment_id, payment_status, outcome,
    http_status, accumulation_id, raw_body, body_size)
SELECT 'router', nowpayments_payment_id, 'finished', 'accumulated', 200, id,
       '\\x7b7d'::bytea, 2
FROM payout_accumulation;
"""

OWED = """
SELECT count(DISTINCT client_id) AS clients, count(*) AS rows,
       sum(accumulated_usdt) AS usdt
FROM payout_accumulation
WHERE conversion_status = 'converted' AND payout_batch_id IS NULL;
"""

OUTCOME = """
SELECT (SELECT count(*) FROM payout_batches) AS batches,
       (SELECT count(*) FROM payout_batches WHERE status = 'sent') AS sent,
       (SELECT count(DISTINCT client_id) FROM payout_batches) AS clients,
       (SELECT count(*) FROM outbox) AS tasks,
       (SELECT count(*) FROM outbox WHERE sent_at IS NULL) AS undelivered,
       (SELECT count(*) FROM outbox WHERE attempts > 1) AS retried,
       (SELECT count(*) FROM payout_accumulation WHERE payout_batch_id IS NULL)
           AS unclaimed_rows;
"""


# --- the stub payout executor ------------------------------------------------


class _StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the sender's session wants
    keys: ClassVar[Counter[str]] = Counter()
    unauthorised: ClassVar[int] = 0
    lock: ClassVar[threading.Lock] = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        key = self.headers.get("Idempotency-Key", "")
        authorised = self.headers.get("Authorization") == f"Bearer {TOKEN}"
        with self.lock:
            if authorised:
                self.keys[key] += 1
            else:
                type(self).unauthorised += 1
        self._answer(202 if authorised else 401, b"")

    def do_GET(self) -> None:
        with self.lock:
            body = json.dumps(
                {
                    "requests": sum(self.keys.values()),
                    "unauthorised": self.unauthorised,
                    "keys": list(self.keys),
                    "repeated_keys": sum(1 for n in self.keys.values() if n > 1),
                }
            ).encode()
        self._answer(200, body)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_stub(port: int) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", port), _StubHandler)
    server.daemon_threads = True
    server.serve_forever()


def _stub_stats(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/stats")
    stats: dict[str, Any] = json.loads(conn.getresponse().read())
    conn.close()
    return stats


# --- processes ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def _start_stub(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "scripts.bench.payouts", "--stub-executor", str(port)],
        cwd=ROOT,
    )
    _wait_for_port(port, process)
    return process


def _service_environ(
    url: str, port: int, executor_port: int, **overrides: str
) -> dict[str, str]:
    return {
        "ENVIRONMENT": "development",
        "DATABASE_URL": url,
        "INTERNAL_AUTH_TOKEN": TOKEN,
        "SERVICE_URL": f"http://127.0.0.1:{port}",
        "PAYOUT_EXECUTOR_URL": f"http://127.0.0.1:{executor_port}/payouts",
        "MICRO_BATCH_PROCESSOR_URL": "http://127.0.0.1:9",
        "TASKS_BACKEND": "http",
        **overrides,
    }


def _start_batch_processor(
    url: str, port: int, executor_port: int, budget_s: int, log_path: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **_service_environ(
            url,
            port,
            executor_port,
            OUTBOX_SEND_BUDGET_S=str(budget_s),
            LOG_LEVEL="INFO",
            WEB_CONCURRENCY="1",
            GUNICORN_THREADS="2",
            GUNICORN_TIMEOUT="300",
        ),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("gunicorn")),
                "-c",
                "python:shared.gunicorn_conf",
                "--bind",
                f"127.0.0.1:{port}",
                "gcbatchprocessor.app:create_app()",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    _wait_for_port(port, process)
    return process


def _worker_pid(master: subprocess.Popen[bytes]) -> int:
    """The one gunicorn worker: the master's child, once it has started."""
    children = Path(f"/proc/{master.pid}/task/{master.pid}/children")
    for _ in range(200):
        found = children.read_text().split()
        if found:
            return int(found[0])
        time.sleep(0.05)
    raise RuntimeError("gunicorn started no worker")


def _memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def _service_cpu_s(url: str) -> dict[int, float] | None:
    """CPU seconds so far of each database session the batch processor holds.

    Read from ``/proc`` of the server's processes, so only when the server
    runs on this machine and we may read them; None otherwise.
    """
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (SERVICE,),
        )
        pids = [row[0] for row in cur.fetchall()]
    conn.close()
    ticks = os.sysconf("SC_CLK_TCK")
    used = {}
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used[pid] = (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, IndexError, ValueError):
        return None
    return used


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- database -----------------------------------------------------------------


def _admin_url() -> str:
    configured = os.environ.get("DATABASE_URL", "").strip()
    return configured or embedded.start(keep_running=True)


def _prepare_database(admin: str) -> str:
    conn = psycopg2.connect(admin)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
            (DATABASE,),
        )
        cur.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
    conn.close()
    url = embedded.ensure_database(admin, DATABASE)
    schema.migrate(url)
    return url


def _fetch(url: str, statement: str) -> dict[str, Any]:
    with (
        psycopg2.connect(url) as conn,
        conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur,
    ):
        cur.execute(statement)
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return dict(row)


def _seed(url: str, clients: int) -> None:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("SET work_mem = '256MB'")
        cur.execute(SEED, {"clients": clients})
    conn.autocommit = True
    with conn.cursor() as cur:
        # A running system's tables are vacuumed and analysed by autovacuum.
        cur.execute("VACUUM (ANALYZE)")
        cur.execute("CHECKPOINT")
    conn.close()


class CommitWatch:
    """Polls from its own session for the first payout batch to be visible.

    The claim writes every batch and task in one transaction, so the first
    batch visible is the moment all of them were committed.
    """

    def __init__(self, url: str) -> None:
        self._conn = psycopg2.connect(url)
        self._conn.autocommit = True
        self._stop = threading.Event()
        self.seen_at: float | None = None
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _poll(self) -> None:
        with self._conn.cursor() as cur:
            while not self._stop.is_set():
                cur.execute("SELECT EXISTS (SELECT 1 FROM payout_batches)")
                row = cur.fetchone()
                if row is not None and row[0]:
                    self.seen_at = time.perf_counter()
                    return
                time.sleep(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._conn.close()


def _post_process(port: int) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request(
        "POST",
        "/process",
        headers={"Authorization": f"Bearer {TOKEN}", "X-Trigger": "manual"},
    )
    response = conn.getresponse()
    body: dict[str, Any] = json.loads(response.read())
    conn.close()
    return response.status, body


def _deliver(
    url: str, port: int, executor_port: int, concurrency: int
) -> tuple[int, int, float]:
    """Send every undelivered payout task; (sent, failed, seconds).

    The outbox is the batch processor's own, built by its ``create_app``:
    the same sender (``HttpSender``) and hooks as in the service, only its
    concurrency set from the command line.
    """
    from gcbatchprocessor.app import create_app

    environ = _service_environ(
        url,
        port,
        executor_port,
        LOG_LEVEL="WARNING",
        DB_POOL_SIZE=str(concurrency + 2),
    )
    app = create_app(environ=environ)
    outbox: Outbox = app.extensions["outbox"]
    assert isinstance(outbox.sender, HttpSender)
    outbox.concurrency = concurrency
    started = time.perf_counter()
    report = outbox.deliver_due()
    elapsed = time.perf_counter() - started
    app.extensions["suite"].db.close()
    return report.sent, report.failed, elapsed


def _breaches(url: str) -> list[str]:
    db = Database(url, size=1, statement_timeout_ms=300_000)
    with db.transaction() as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        lines = [breach.line for breach in reconcile.find_breaches(cur)]
    db.close()
    return lines


def _server_version(url: str) -> str:
    return str(_fetch(url, "SHOW server_version")["server_version"])


# --- the benchmark ------------------------------------------------------------


@dataclass
class RunMeasure:
    """What one ``POST /process`` did and cost."""

    status: int
    body: dict[str, Any]
    committed_s: float | None
    answered_s: float
    database_cpu_s: float | None
    rss_before_kib: int
    peak_before_kib: int
    peak_after_kib: int


def _measure_run(url: str, port: int, worker: int) -> RunMeasure:
    rss_before = _memory_kib(worker, "VmRSS")
    peak_before = _memory_kib(worker, "VmHWM")
    cpu_before = _service_cpu_s(url)
    watch = CommitWatch(url)
    watch.start()
    started = time.perf_counter()
    status, body = _post_process(port)
    answered_s = time.perf_counter() - started
    watch.stop()
    peak_after = _memory_kib(worker, "VmHWM")
    cpu_after = _service_cpu_s(url)
    cpu_s = None
    if cpu_before is not None and cpu_after is not None:
        cpu_s = sum(
            seconds - cpu_before.get(pid, 0.0) for pid, seconds in cpu_after.items()
        )
    return RunMeasure(
        status=status,
        body=body,
        committed_s=None if watch.seen_at is None else watch.seen_at - started,
        answered_s=answered_s,
        database_cpu_s=cpu_s,
        rss_before_kib=rss_before,
        peak_before_kib=peak_before,
        peak_after_kib=peak_after,
    )


def _print_run(run: RunMeasure) -> None:
    figures = run.body.get("figures", {})
    print(f"POST /process: HTTP {run.status}, outcome {run.body.get('outcome')}")
    print(
        f"  batches created {figures.get('batches_created', 0):,}, rows claimed"
        f" {figures.get('rows_claimed', 0):,}, USDT claimed"
        f" {figures.get('usdt_claimed')}, tasks sent within the run"
        f" {figures.get('tasks_sent', 0):,} (OUTBOX_SEND_BUDGET_S=1)"
    )
    if run.committed_s is None:
        print("  claim never became visible")
    else:
        print(
            f"  claim committed (all batches and tasks visible) after"
            f" {run.committed_s:.2f} s (target < {COMMIT_TARGET_S:g} s)"
        )
    print(
        f"  run answered after {run.answered_s:.2f} s (run's own duration_ms"
        f" {run.body.get('duration_ms')})"
    )
    if run.database_cpu_s is not None:
        print(
            f"  database CPU of the service's sessions during the run:"
            f" {run.database_cpu_s:.2f} s (from /proc of the server's backends)"
        )
    growth = run.peak_after_kib - max(run.rss_before_kib, run.peak_before_kib)
    print(
        f"  gunicorn worker memory: VmRSS {run.rss_before_kib / 1024:.1f} MiB"
        f" before, VmHWM {run.peak_after_kib / 1024:.1f} MiB peak after"
        f" (+{growth / 1024:.1f} MiB over the earlier peak, for"
        f" {figures.get('rows_claimed', 0):,} rows)"
    )


def _check_outcome(url: str, clients: int, stats: dict[str, Any]) -> bool:
    """Print what reached the stub and the database; True when all is right."""
    outcome = _fetch(url, OUTCOME)
    batch_ids = _batch_ids(url)
    keys = set(stats["keys"])
    print(
        f"stub executor: {stats['requests']:,} requests, {len(keys):,} distinct"
        f" Idempotency-Keys, {stats['repeated_keys']} sent more than once,"
        f" {stats['unauthorised']} unauthorised; keys == batch ids:"
        f" {keys == batch_ids}"
    )
    print(
        f"database: {outcome['batches']:,} batches for {outcome['clients']:,}"
        f" clients, {outcome['sent']:,} sent; {outcome['tasks']:,} tasks,"
        f" {outcome['undelivered']} undelivered, {outcome['retried']} retried;"
        f" {outcome['unclaimed_rows']} rows unclaimed"
    )
    breaches = _breaches(url)
    print(f"reconcile: {'clean' if not breaches else breaches[:5]}")
    every_batch_sent = (
        outcome["batches"] == clients == outcome["sent"] == outcome["clients"]
    )
    delivered_once = stats["requests"] == len(keys) == clients and keys == batch_ids
    return every_batch_sent and delivered_once and not breaches


def _batch_ids(url: str) -> set[str]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT batch_id::text FROM payout_batches")
        ids = {row[0] for row in cur.fetchall()}
    conn.close()
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--stub-executor", type=int, metavar="PORT", help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.stub_executor:
        serve_stub(args.stub_executor)
        return 0

    url = _prepare_database(_admin_url())
    print(
        f"payout benchmark: {args.clients:,} clients, PostgreSQL"
        f" {_server_version(url)}, {os.cpu_count()} cores,"
        f" Python {platform.python_version()}"
    )
    started = time.perf_counter()
    _seed(url, args.clients)
    owed = _fetch(url, OWED)
    print(
        f"seeded in {time.perf_counter() - started:.1f} s: {owed['clients']:,}"
        f" clients over threshold, {owed['rows']:,} converted rows,"
        f" {owed['usdt']} USDT owed"
    )

    executor_port, service_port = _free_port(), _free_port()
    stub = _start_stub(executor_port)
    log_path = Path(tempfile.gettempdir()) / "bench-payouts-gunicorn.log"
    service = _start_batch_processor(
        url, service_port, executor_port, budget_s=1, log_path=log_path
    )
    try:
        worker = _worker_pid(service)
        time.sleep(1.0)  # the worker has imported the app and connected
        run = _measure_run(url, service_port, worker)
        sent, failed, delivery_s = _deliver(
            url, service_port, executor_port, args.concurrency
        )
        stats = _stub_stats(executor_port)
    finally:
        _stop(service)
        _stop(stub)

    _print_run(run)
    per_second = sent / delivery_s if delivery_s else 0.0
    print(
        f"delivery: {sent:,} tasks in {delivery_s:.2f} s = {per_second:,.0f}"
        f" tasks/s (target >= {DELIVERY_TARGET_PER_S:g}/s), concurrency"
        f" {args.concurrency}, {failed} failed"
    )
    correct = _check_outcome(url, args.clients, stats)
    met = (
        run.status == 200
        and run.committed_s is not None
        and run.committed_s < COMMIT_TARGET_S
        and per_second >= DELIVERY_TARGET_PER_S
    )
    print(
        f"targets {'met' if met else 'MISSED'};"
        f" results {'correct' if correct else 'WRONG'}"
    )
    if run.status != 200:
        print(f"gunicorn's log: {log_path}")
    return 0 if met and correct else 1


if __name__ == "__main__":
    sys.exit(main())
