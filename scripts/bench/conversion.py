"""Benchmark: the micro-batch check and conversion over a large history.

    python -m scripts.bench.conversion [--calls 50] [--no-tenfold]

In its own database (``payouts_bench_conversion``, dropped and recreated
each run, dropped again at the end unless ``--keep-database``) on
``DATABASE_URL``'s server or the embedded one, it seeds with set-based SQL
a history of converted and paid payments (with their conversions, payout
batches, memberships, delivered tasks and scheduled runs) and payments
pending conversion over 100,000 clients. It serves the real micro-batch
processor under gunicorn, with a stand-in for the swap executor that accepts
every task, and measures over HTTP:

1. ``POST /check-threshold`` below the threshold with 1,000,000 rows of
   history, and again once the history has grown tenfold: the check reads
   pending rows only, so the second figure must be no slower;
2. with 100,000 rows pending, the run that claims them into one conversion,
   then the ``/swap-executed`` callback that shares the USDT received over
   them, with the worker's peak memory during each step (flat: the rows
   never come into Python);
3. invariant 3 on that conversion, exactly.

Targets (issue 3): check p50 under 20 ms and no slower with ten times the
history; the claim and the sharing under 5 s each. Times on a small shared
machine are noisy, so each series of checks also counts the database
blocks the runs touched: that figure has no noise, and it is what shows
whether history is read.

Autovacuum is off for the benchmark's database, so the state each figure
is taken in is the one described here and not whatever a background vacuum
left: old history is vacuumed (all-visible, as in a system that has run a
while) and the pending payments are fresh. Growing the history adds older
payments and leaves the pending ones exactly as they were.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from flask import Flask
from psycopg2 import sql
from psycopg2.extras import RealDictCursor

from gcmicrobatchprocessor.conversion import QUERIES as MICROBATCH_QUERIES
from shared import embedded, money, schema
from shared.health import QUERIES as HEALTH_QUERIES
from shared.jobs import QUERIES as JOB_QUERIES
from shared.outbox import QUERIES as OUTBOX_QUERIES

ROOT = Path(__file__).resolve().parents[2]
DATABASE = "payouts_bench_conversion"
TOKEN = "bench-internal-token"  # noqa: S105 (a local benchmark key)
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MANUAL = {**AUTH, "X-Trigger": "manual"}

ROWS_PER_CONVERSION = 100
ROWS_PER_PAYOUT = 10
# What one ETH fetched when swapped to USDT in the benchmark's world.
USDT_PER_ETH = Decimal(3390)
WARM_UP_CALLS = 5
# A backend going idle reports its statistics at most this long after.
STATS_FLUSH_S = 11
# Two cores shared with whatever else runs: the check over ten times the
# history may take this much longer before it counts as slower.
NOISE = 1.25
# Ten times the rows may deepen a B-tree by a level, a block more per
# lookup; reading any history table would multiply the blocks instead.
BLOCKS_SLACK = 1.25

# --- seeding SQL ---------------------------------------------------------------

# History payment n is a pure function of n, so a conversion or payout batch
# can be written, with its exact totals, before the payments that point at
# it. Payment 0 is the newest and n counts back 3 seconds a payment; n
# belongs to client n mod clients, to conversion n / 100, and to the payout
# batch of its client's 10 payments around it, paid 65 minutes after the
# newest of them. Session-local, so nothing is left in the schema.
CREATE_HISTORY_FUNCTION = """
CREATE FUNCTION pg_temp.history(
    first bigint, last bigint, clients bigint, newest timestamptz
)
RETURNS TABLE (
    n bigint, client_id bigint, conversion_n bigint, payout_n bigint,
    credited_at timestamptz, paid_at timestamptz, accumulated_eth numeric,
    payment_amount_usd numeric, accumulated_usd numeric,
    accumulated_usdt numeric, platform_fee_usdt numeric
)
LANGUAGE sql STABLE
AS $$
SELECT n,
       -1001000000000 - mod(n, clients),
       n / 100,
       (n / clients / 10) * clients + mod(n, clients),
       newest - n * interval '3 seconds',
       newest + interval '65 minutes'
           - ((n / clients / 10 * 10) * clients + mod(n, clients))
             * interval '3 seconds',
       eth, usd, round(usd * 0.97, 10), gross - fee, fee
FROM generate_series(first, last) AS n,
     LATERAL (SELECT 0.0002 + mod(n, 4999) * 0.0000003 AS eth) AS paid,
     LATERAL (SELECT round(eth * 3400, 10) AS usd,
                     round(eth * 3390, 6) AS gross) AS valued,
     LATERAL (SELECT round(gross * 0.03, 6) AS fee) AS split
$$;
"""

SEED_CLIENTS = """
INSERT INTO clients (client_id, payout_strategy, payout_threshold_usd,
    wallet_address, payout_currency, payout_network, created_at, updated_at)
SELECT -1001000000000 - k, 'threshold', 10 + mod(k, 91),
       '0x' || left(md5('wallet-' || k) || md5('wallet+' || k), 40),
       'usdt', 'eth', %(oldest)s, %(oldest)s
FROM generate_series(0, %(clients)s - 1) AS k;
"""

# Each conversion and payout batch comes with the task that announced it,
# delivered long ago.
SEED_CONVERSIONS = """
WITH conversion AS (
    INSERT INTO batch_conversions (batch_conversion_id, outcome_currency,
        status, row_count, total_usd, total_eth, threshold_usd, swap_id,
        tx_hash, actual_usdt_received, created_at, updated_at, accepted_at,
        finished_at)
    SELECT md5('conversion-' || conversion_n)::uuid, 'eth', 'completed',
           count(*), sum(accumulated_usd), sum(accumulated_eth), 300,
           'swap-' || conversion_n,
           '0x' || md5('swap-' || conversion_n) || md5('tx-' || conversion_n),
           sum(accumulated_usdt + platform_fee_usdt),
           max(credited_at) + interval '1 minute',
           max(credited_at) + interval '11 minutes',
           max(credited_at) + interval '1 minute 5 seconds',
           max(credited_at) + interval '11 minutes'
    FROM pg_temp.history(%(first)s, %(last)s, %(clients)s, %(newest)s)
    GROUP BY conversion_n
    RETURNING *
)
INSERT INTO outbox (service, target_url, payload, dedup_key, attempts,
    next_attempt_at, sent_at, created_at)
SELECT 'gcmicrobatchprocessor', 'http://executor.bench/swap',
       jsonb_build_object(
           'kind', 'swap',
           'batch_conversion_id', batch_conversion_id,
           'from_currency', outcome_currency,
           'from_amount', total_eth::text,
           'to_currency', 'usdt',
           'row_count', row_count,
           'callback_url', 'http://microbatch.bench/swap-executed'),
       batch_conversion_id::text, 1, accepted_at, accepted_at, created_at
FROM conversion;
"""

SEED_PAYOUT_BATCHES = """
WITH batch AS (
    INSERT INTO payout_batches (batch_id, client_id, wallet_address,
        payout_currency, payout_network, total_usdt, row_count, status,
        tx_hash, amount_sent, sent_currency, created_at, updated_at,
        accepted_at, finished_at)
    SELECT md5('payout-' || payout.payout_n)::uuid, client.client_id,
           client.wallet_address, client.payout_currency,
           client.payout_network, payout.total_usdt, payout.row_count,
           'completed',
           '0x' || md5('payout-' || payout.payout_n)
                || md5('sent-' || payout.payout_n),
           payout.total_usdt, client.payout_currency,
           payout.paid_at - interval '5 minutes', payout.paid_at,
           payout.paid_at - interval '4 minutes', payout.paid_at
    FROM (
        SELECT payout_n, client_id, max(paid_at) AS paid_at,
               sum(accumulated_usdt) AS total_usdt, count(*) AS row_count
        FROM pg_temp.history(%(first)s, %(last)s, %(clients)s, %(newest)s)
        GROUP BY payout_n, client_id
    ) AS payout
    JOIN clients AS client USING (client_id)
    RETURNING *
)
INSERT INTO outbox (service, target_url, payload, dedup_key, attempts,
    next_attempt_at, sent_at, created_at)
SELECT 'gcbatchprocessor', 'http://executor.bench/payout',
       jsonb_build_object(
           'kind', 'payout',
           'batch_id', batch_id,
           'client_id', client_id,
           'amount_usdt', total_usdt::text,
           'payout_currency', payout_currency,
           'payout_network', payout_network,
           'wallet_address', wallet_address,
           'row_count', row_count,
           'callback_url', 'http://batch.bench/payout-completed'),
       batch_id::text, 1, accepted_at, accepted_at, created_at
FROM batch;
"""

SEED_HISTORY = """
INSERT INTO payout_accumulation (nowpayments_payment_id, client_id, user_id,
    payment_amount_usd, usd_source, platform_fee_percent, accumulated_usd,
    accumulated_eth, outcome_currency, conversion_status, batch_conversion_id,
    accumulated_usdt, platform_fee_usdt, is_paid_out, payout_batch_id,
    paid_out_at, created_at, updated_at)
SELECT (4000000000 + n)::text, client_id, 6000000000 + mod(n, 3000000),
       payment_amount_usd, 'price', 3, accumulated_usd, accumulated_eth, 'eth',
       'converted', md5('conversion-' || conversion_n)::uuid,
       accumulated_usdt, platform_fee_usdt, true,
       md5('payout-' || payout_n)::uuid, paid_at, credited_at, paid_at
FROM pg_temp.history(%(first)s, %(last)s, %(clients)s, %(newest)s);
"""

SEED_MEMBERS = """
INSERT INTO batch_conversion_members (batch_conversion_id, accumulation_id,
    accumulated_eth, accumulated_usd)
SELECT batch_conversion_id, id, accumulated_eth, accumulated_usd
FROM payout_accumulation
WHERE id > %(after_id)s AND conversion_status = 'converted';

-- In key order: a payout batch's payments are far apart in id, and
-- inserting them in id order would visit the primary key at random.
INSERT INTO payout_batch_members (batch_id, accumulation_id, accumulated_usdt)
SELECT payout_batch_id, id, accumulated_usdt
FROM payout_accumulation
WHERE id > %(after_id)s AND payout_batch_id IS NOT NULL
ORDER BY payout_batch_id, id;
"""

# Both jobs ran every five minutes over the history's span.
SEED_JOB_RUNS = """
INSERT INTO job_runs (job, slot, trigger, started_at, finished_at, outcome,
    figures)
SELECT job, slot, 'scheduler', slot + interval '1 second',
       slot + interval '2 seconds', 'succeeded', '{}'
FROM unnest(ARRAY['check-threshold', 'process']) AS job,
     generate_series(%(since)s::timestamptz, %(until)s::timestamptz,
                     interval '5 minutes') AS slot;
"""

# The batch processor keeps running while the benchmark does: its heartbeat
# stays fresh, so the micro-batch processor's watchdog has nothing to do.
SIBLING_HEARTBEAT = """
INSERT INTO job_runs (job, slot, trigger, started_at, finished_at, outcome)
VALUES ('process', now(), 'scheduler', now(), now(), 'succeeded');
"""

# Payment r pending conversion: client r x 7919 mod clients (7919 is prime,
# so up to ``clients`` pending payments land on as many different clients).
SEED_PENDING = """
INSERT INTO payout_accumulation (nowpayments_payment_id, client_id, user_id,
    payment_amount_usd, usd_source, platform_fee_percent, accumulated_usd,
    accumulated_eth, outcome_currency, created_at, updated_at)
SELECT (5000000000 + r)::text, -1001000000000 - mod(r * 7919, %(clients)s),
       6000000000 + mod(r, 3000000), usd, 'price', 3, round(usd * 0.97, 10),
       eth, 'eth', credited_at, credited_at
FROM generate_series(%(first)s::bigint, %(last)s) AS r,
     LATERAL (SELECT 0.0005 + mod(r, 997) * 0.000001 AS eth,
                     now() - mod(r, 240) * interval '1 second'
                         AS credited_at) AS paid,
     LATERAL (SELECT round(eth * 3400, 10) AS usd) AS valued;
"""

SEEDED_TABLES = (
    "clients",
    "batch_conversions",
    "payout_batches",
    "payout_accumulation",
    "batch_conversion_members",
    "payout_batch_members",
    "outbox",
    "job_runs",
)

# --- reading SQL ---------------------------------------------------------------

PENDING_SUMMARY = """
SELECT count(*) AS row_count, coalesce(sum(accumulated_usd), 0) AS total_usd
FROM payout_accumulation WHERE conversion_status = 'pending';
"""

# Blocks of the suite's tables and their indexes read or found in shared
# buffers, by any session; the system catalogs (which autovacuum still
# visits) are left out. Of which, those of the table holding the history.
BLOCKS_TOUCHED = """
SELECT coalesce(sum(blocks), 0) AS blocks,
       coalesce(sum(blocks) FILTER (WHERE relname = 'payout_accumulation'), 0)
           AS payment_blocks
FROM pg_statio_user_tables,
     LATERAL (SELECT coalesce(heap_blks_hit, 0) + coalesce(heap_blks_read, 0)
                     + coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0)
                     + coalesce(toast_blks_hit, 0) + coalesce(toast_blks_read, 0)
                     + coalesce(tidx_blks_hit, 0) + coalesce(tidx_blks_read, 0)
                 AS blocks) AS touched;
"""

HISTORY_SIZE = """
SELECT count(*) AS row_count FROM payout_accumulation
WHERE conversion_status = 'converted';
"""

OPEN_CONVERSION = """
SELECT batch_conversion_id, status, row_count, total_eth
FROM batch_conversions WHERE status IN ('claimed', 'swapping');
"""

# Invariant 3 (DESIGN.md section 8) for one conversion.
CONVERSION_SHARED = """
SELECT conversion.actual_usdt_received,
       sum(row.accumulated_usdt + row.platform_fee_usdt) AS shared_usdt,
       sum(row.platform_fee_usdt) AS fee_usdt,
       count(*) AS row_count
FROM batch_conversions AS conversion
JOIN payout_accumulation AS row USING (batch_conversion_id)
WHERE conversion.batch_conversion_id = %(batch_conversion_id)s
GROUP BY conversion.actual_usdt_received;
"""


# --- the app gunicorn serves ---------------------------------------------------


class SwapExecutorStandIn:
    """Accepts every task and keeps it, as a swap executor answering 2xx."""

    def __init__(self) -> None:
        self.tasks: list[Any] = []

    def send(self, task: Any) -> None:
        self.tasks.append(task)


def bench_app() -> Flask:
    """gunicorn's entry: the real micro-batch app, tasks kept in memory."""
    from gcmicrobatchprocessor.app import create_app

    return create_app(environ=dict(os.environ), sender=SwapExecutorStandIn())


def service_environ(database_url: str, threshold_usd: Decimal) -> dict[str, str]:
    return {
        "ENVIRONMENT": "development",
        "DATABASE_URL": database_url,
        "INTERNAL_AUTH_TOKEN": TOKEN,
        "MICRO_BATCH_THRESHOLD_USD": money.to_text(threshold_usd),
        "SERVICE_URL": "http://microbatch.bench",
        "SWAP_EXECUTOR_URL": "http://executor.bench/swap",
        "BATCH_PROCESSOR_URL": "http://batch.bench",
        "LOG_LEVEL": "WARNING",
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": "2",
        # Long enough that a slow sharing is measured, not killed.
        "GUNICORN_TIMEOUT": "120",
    }


# --- database ------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    clients: int
    history: int
    pending: int
    claim_rows: int


def _admin_url() -> tuple[str, bool]:
    """The server's admin URL, and whether this run started the server."""
    configured = os.environ.get("DATABASE_URL", "").strip()
    if configured:
        return configured, False
    already_running = (embedded.DATA_DIR / "pg" / "postmaster.pid").exists()
    return embedded.start(keep_running=True), not already_running


def _drop_database(admin_url: str) -> None:
    conn = _connect(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (DATABASE,),
            )
            cur.execute(
                sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DATABASE))
            )
    finally:
        conn.close()


def _prepare_database(admin_url: str) -> str:
    _drop_database(admin_url)
    url = embedded.ensure_database(admin_url, DATABASE)
    schema.migrate(url)
    conn = _connect(url)
    try:
        with conn.cursor() as cur:
            for table in SEEDED_TABLES:
                cur.execute(
                    sql.SQL(
                        "ALTER TABLE {} SET (autovacuum_enabled = false,"
                        " toast.autovacuum_enabled = false)"
                    ).format(sql.Identifier(table))
                )
    finally:
        conn.close()
    return url


def _connect(url: str) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(url, options="-c timezone=UTC")
    conn.autocommit = True
    return conn


def _fetch_one(url: str, query: str, params: dict[str, Any] | None = None) -> Any:
    conn = _connect(url)
    try:
        with conn.cursor(cursor_factory=RealDictCursor) as cur:
            cur.execute(query, params or {})
            return cur.fetchone()
    finally:
        conn.close()


def _explain(url: str, query: str, params: dict[str, Any]) -> list[str]:
    """The plan as run, with buffers; the statement is rolled back."""
    conn = psycopg2.connect(url, options="-c timezone=UTC")
    try:
        with conn.cursor() as cur:
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + query, params)
            return [row[0] for row in cur.fetchall()]
    finally:
        conn.rollback()
        conn.close()


class Seeder:
    """Writes the benchmark's data, on one session that owns the function."""

    def __init__(self, url: str, sizes: Sizes, newest: datetime) -> None:
        self.conn = _connect(url)
        self.sizes = sizes
        self.newest = newest
        with self.conn.cursor() as cur:
            # Room for the seeding's aggregates (one group per payout batch).
            cur.execute("SET work_mem = '512MB'")
            cur.execute("SET maintenance_work_mem = '1GB'")
            cur.execute(CREATE_HISTORY_FUNCTION)
        self.foreign_keys_checked = not self._skip_foreign_key_checks()

    def _skip_foreign_key_checks(self) -> bool:
        """Seed without the per-row foreign key triggers, where allowed.

        They are most of the seeding's time, and the keys hold by
        construction: a batch and its payments derive the batch's id from
        the same expression. CHECK and UNIQUE constraints still apply, and
        the service's own sessions check every key as usual. Only a
        superuser may do this; anyone else seeds with the checks, slower.
        """
        try:
            with self.conn.cursor() as cur:
                cur.execute("SET session_replication_role = replica")
        except psycopg2.errors.InsufficientPrivilege:
            return False
        return True

    def close(self) -> None:
        self.conn.close()

    def clients(self) -> None:
        oldest = self._moment(self.sizes.history * 10)
        self._run(SEED_CLIENTS, {"clients": self.sizes.clients, "oldest": oldest})

    def history(self, first: int, last: int) -> None:
        """History payments ``first`` to ``last`` (older ones are larger)."""
        window = {"first": first, "last": last, "clients": self.sizes.clients}
        with self.conn.cursor() as cur:
            cur.execute("SELECT coalesce(max(id), 0) FROM payout_accumulation")
            after_id = cur.fetchone()[0]
        self._run(SEED_CONVERSIONS, window)
        self._run(SEED_PAYOUT_BATCHES, window)
        self._run(SEED_HISTORY, window)
        self._run(SEED_MEMBERS, {"after_id": after_id})
        self._run(
            SEED_JOB_RUNS, {"since": self._moment(last), "until": self._moment(first)}
        )

    def pending(self, first: int, last: int) -> None:
        self._run(
            SEED_PENDING, {"first": first, "last": last, "clients": self.sizes.clients}
        )

    def vacuum(self) -> None:
        self._run("VACUUM (ANALYZE)", {})

    def analyze(self) -> None:
        self._run("ANALYZE", {})

    def sibling_heartbeat(self) -> None:
        self._run(SIBLING_HEARTBEAT, {})

    def checkpoint(self) -> bool:
        """Write out what seeding dirtied, so timing does not compete with it.

        Needs a superuser or pg_checkpoint; without, the figures that follow
        may be slowed by the server writing the seeded data meanwhile.
        """
        try:
            self._run("CHECKPOINT", {})
        except psycopg2.errors.InsufficientPrivilege:
            return False
        return True

    def _moment(self, n: int) -> datetime:
        """When history payment ``n`` was credited."""
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT %(newest)s::timestamptz - %(n)s * interval '3 seconds'",
                {"newest": self.newest, "n": n},
            )
            moment: datetime = cur.fetchone()[0]
            return moment

    def _run(self, statement: str, params: dict[str, Any]) -> None:
        with self.conn.cursor() as cur:
            cur.execute(statement, {"newest": self.newest, **params})


def _newest_history(url: str) -> datetime:
    """The newest history payment: paid out (65 minutes later) before now."""
    row = _fetch_one(url, "SELECT date_trunc('hour', now()) - interval '2 hours' AS t")
    moment: datetime = row["t"]
    return moment


def _threshold_between(url: str, sizes: Sizes) -> Decimal:
    """Above the USD now pending, below that of ``claim_rows`` such payments.

    Pending amounts cycle every 997 payments and grow along the cycle, so
    the larger set's USD is at least in proportion to its count.
    """
    pending_usd = _fetch_one(url, PENDING_SUMMARY)["total_usd"]
    midway = Decimal(sizes.pending + sizes.claim_rows) / 2 / sizes.pending
    return money.quantize(pending_usd * midway, money.USD).quantize(Decimal(1))


# --- the server ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_gunicorn(
    environ: dict[str, str], port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("gunicorn")),
                "-c",
                "python:shared.gunicorn_conf",
                "--bind",
                f"127.0.0.1:{port}",
                "scripts.bench.conversion:bench_app()",
            ],
            cwd=ROOT,
            env={**os.environ, **environ},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if _request(port, "GET", "/livez")[0] == 200:
                return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    process.wait(timeout=30)
    raise RuntimeError(f"gunicorn did not start:\n{_tail(log_path)}")


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def _request(
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, Any], float]:
    """One request: its status, its JSON body and the seconds it took."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    payload = None if body is None else json.dumps(body).encode()
    headers = dict(headers or {})
    if payload is not None:
        headers["Content-Type"] = "application/json"
    try:
        started = time.perf_counter()
        conn.request(method, path, payload, headers)
        response = conn.getresponse()
        text = response.read()
        elapsed = time.perf_counter() - started
    finally:
        if own:
            conn.close()
    return response.status, json.loads(text or b"{}"), elapsed


def _worker_pid(master_pid: int) -> int:
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text()
    return int(children.split()[0])


def _memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _reset_peak(pid: int) -> bool:
    """Restart the worker's peak RSS (VmHWM) from its current RSS."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- measurements --------------------------------------------------------------


@dataclass(frozen=True)
class CheckTimes:
    history_rows: int
    pending_rows: int
    p50_ms: float
    p95_ms: float
    run_p50_ms: float
    blocks_per_run: float
    payment_blocks_per_run: float
    plan: list[str]
    others: list[tuple[str, str]]


@dataclass(frozen=True)
class StepFigures:
    seconds: float
    run_ms: int | None
    rss_before_mb: float
    peak_mb: float
    peak_reset: bool


def time_checks(port: int, url: str, calls: int) -> CheckTimes:
    """``calls`` manual runs below the threshold, after a few to warm up.

    Besides the times, it counts the blocks of the suite's tables the runs
    touched (nothing else uses this database meanwhile): unlike a time on a
    shared machine, that figure has no noise.
    """
    _call_checks(port, WARM_UP_CALLS)
    time.sleep(STATS_FLUSH_S)
    before = _fetch_one(url, BLOCKS_TOUCHED)
    results = _call_checks(port, calls)
    latencies = [elapsed * 1000 for elapsed, _ in results]
    durations = [duration_ms for _, duration_ms in results]
    time.sleep(STATS_FLUSH_S)
    after = _fetch_one(url, BLOCKS_TOUCHED)
    return CheckTimes(
        history_rows=_fetch_one(url, HISTORY_SIZE)["row_count"],
        pending_rows=_fetch_one(url, PENDING_SUMMARY)["row_count"],
        p50_ms=statistics.median(latencies),
        p95_ms=statistics.quantiles(latencies, n=20)[18],
        run_p50_ms=statistics.median(durations),
        blocks_per_run=(after["blocks"] - before["blocks"]) / calls,
        payment_blocks_per_run=(after["payment_blocks"] - before["payment_blocks"])
        / calls,
        plan=_explain(url, MICROBATCH_QUERIES["pending_totals"], {}),
        others=_other_statements(url),
    )


def _call_checks(port: int, calls: int) -> list[tuple[float, int]]:
    """Runs back to back on one connection: each one's HTTP round trip and
    the duration the service recorded."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    results = []
    try:
        for _ in range(calls):
            status, body, elapsed = _request(
                port, "POST", "/check-threshold", headers=MANUAL, conn=conn
            )
            if status != 200 or body["figures"].get("conversions_created") != 0:
                raise RuntimeError(f"check-threshold answered {status}: {body}")
            results.append((elapsed, body["duration_ms"]))
    finally:
        conn.close()
    return results


def _other_statements(url: str) -> list[tuple[str, str]]:
    """What the run's other statements read: scans, buffers, time."""
    statements = [
        (
            "slot_succeeded",
            JOB_QUERIES["slot_succeeded"],
            {"job": "check-threshold", "slot": "2000-01-01T00:00:00Z"},
        ),
        (
            "stale_conversions",
            MICROBATCH_QUERIES["stale_conversions"],
            {"stale_after_s": 7200},
        ),
        (
            "lease_due",
            OUTBOX_QUERIES["lease_due"],
            {
                "service": "gcmicrobatchprocessor",
                "limit": 1000,
                "lease_s": 60,
                "ids": None,
            },
        ),
        (
            "job_heartbeats",
            HEALTH_QUERIES["job_heartbeats"],
            {"jobs": ["check-threshold", "process"]},
        ),
    ]
    return [
        (name, _plan_summary(_explain(url, query, params)))
        for name, query, params in statements
    ]


def _plan_summary(plan: list[str]) -> str:
    scans = sorted(
        {
            line.split("  (")[0].replace("->", "").strip()
            for line in plan
            if " Scan " in line
        }
    )
    buffers = next((line.strip() for line in plan if "Buffers:" in line), "")
    execution = next(line for line in plan if line.startswith("Execution Time"))
    return f"{', '.join(scans)}; {buffers}; {execution}"


def _measure_step(
    worker: int, call: Callable[[], tuple[int, dict[str, Any], float]]
) -> tuple[StepFigures, dict[str, Any]]:
    rss_before = _memory_kb(worker, "VmRSS")
    reset = _reset_peak(worker)
    status, body, elapsed = call()
    peak = _memory_kb(worker, "VmHWM")
    if status != 200:
        raise RuntimeError(f"answered {status}: {body}")
    figures = StepFigures(
        seconds=elapsed,
        run_ms=body.get("duration_ms"),
        rss_before_mb=rss_before / 1024,
        peak_mb=peak / 1024,
        peak_reset=reset,
    )
    return figures, body


@dataclass(frozen=True)
class ConversionFigures:
    claim: StepFigures
    share: StepFigures
    shared: dict[str, Any]
    claim_reads: str
    share_reads: str


def claim_and_share(port: int, url: str, worker: int) -> ConversionFigures:
    """One run claims every pending row; its callback shares the USDT."""
    claim_reads = _history_reads(
        url,
        MICROBATCH_QUERIES["claim_pending"],
        {
            "batch_conversion_id": "00000000-0000-4000-8000-000000000000",
            "currency": "eth",
            "threshold_usd": Decimal(1),
        },
    )
    claim, run = _measure_step(
        worker, lambda: _request(port, "POST", "/check-threshold", headers=MANUAL)
    )
    if run["figures"].get("conversions_created") != 1:
        raise RuntimeError(f"the run created no conversion: {run}")
    conversion = _fetch_one(url, OPEN_CONVERSION)
    received = (conversion["total_eth"] * USDT_PER_ETH).quantize(
        money.USDT.unit, rounding=ROUND_DOWN
    )
    callback = {
        "batch_conversion_id": str(conversion["batch_conversion_id"]),
        "swap_id": "bench-swap-1",
        "tx_hash": "0x" + "ab" * 32,
        "status": "completed",
        "actual_usdt_received": money.to_text(received),
    }
    share_reads = _history_reads(
        url,
        MICROBATCH_QUERIES["share_usdt"],
        {**callback, "actual_usdt_received": received},
    )
    share, _ = _measure_step(
        worker,
        lambda: _request(port, "POST", "/swap-executed", callback, headers=AUTH),
    )
    shared = _fetch_one(
        url, CONVERSION_SHARED, {"batch_conversion_id": callback["batch_conversion_id"]}
    )
    return ConversionFigures(claim, share, shared, claim_reads, share_reads)


def _history_reads(url: str, query: str, params: dict[str, Any]) -> str:
    """How a statement's plan (EXPLAIN alone: nothing runs) reaches payments."""
    conn = psycopg2.connect(url, options="-c timezone=UTC")
    try:
        with conn.cursor() as cur:
            cur.execute("EXPLAIN " + query, params)
            plan = [row[0] for row in cur.fetchall()]
    finally:
        conn.rollback()
        conn.close()
    scans = {
        line.split("  (")[0].replace("->", "").strip()
        for line in plan
        if " Scan " in line and "payout_accumulation" in line
    }
    return "; ".join(sorted(scans))


# --- output --------------------------------------------------------------------


def _line(label: str, value: str) -> None:
    print(f"{label:<56} {value}", flush=True)


def _print_check(times: CheckTimes) -> None:
    rows = f"{times.history_rows:,} history, {times.pending_rows:,} pending"
    print(f"check-threshold below the threshold ({rows}):")
    _line("  p50, HTTP round trip", f"{times.p50_ms:.1f} ms")
    _line("  p95, HTTP round trip", f"{times.p95_ms:.1f} ms")
    _line("  p50, run duration in job_runs", f"{times.run_p50_ms:.0f} ms")
    _line("  table and index blocks touched per run", f"{times.blocks_per_run:.0f}")
    _line("    of which payout_accumulation's", f"{times.payment_blocks_per_run:.0f}")
    print("  EXPLAIN (ANALYZE, BUFFERS) pending_totals:")
    for line in times.plan:
        print(f"    {line}")
    print("  the run's other statements:")
    for name, summary in times.others:
        print(f"    {name}: {summary}")


def _print_step(step: StepFigures, reads: str) -> None:
    _line("  HTTP round trip", f"{step.seconds:.2f} s")
    if step.run_ms is not None:
        _line("  run duration in job_runs", f"{step.run_ms} ms")
    _line("  worker RSS before", f"{step.rss_before_mb:.1f} MB")
    growth = step.peak_mb - step.rss_before_mb
    _line(
        "  worker peak RSS " + ("during the request" if step.peak_reset else "so far"),
        f"{step.peak_mb:.1f} MB (+{growth:.1f} MB)",
    )
    print(f"  its plan reaches payout_accumulation by: {reads}")


def _print_shared(shared: dict[str, Any]) -> bool:
    holds = bool(shared["shared_usdt"] == shared["actual_usdt_received"])
    print("invariant 3 on that conversion:")
    _line("  actual_usdt_received", f"{shared['actual_usdt_received']} USDT")
    _line(
        "  sum(accumulated_usdt + platform_fee_usdt)",
        f"{shared['shared_usdt']} USDT over {shared['row_count']:,} rows",
    )
    _line("  of which platform fee", f"{shared['fee_usdt']} USDT")
    _line("  exactly equal", "yes" if holds else "NO: INVARIANT 3 BROKEN")
    return holds


def _verdict(target: str, met: bool) -> None:
    _line(f"  {target}", "met" if met else "MISSED")


# --- the run -------------------------------------------------------------------


def _parse_args() -> tuple[argparse.Namespace, Sizes]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--clients", type=int, default=100_000)
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--pending", type=int, default=20_000)
    parser.add_argument("--claim-rows", type=int, default=100_000)
    parser.add_argument(
        "--tenfold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="grow the history tenfold and time the check again (default: on)",
    )
    parser.add_argument("--keep-database", action="store_true")
    args = parser.parse_args()
    sizes = Sizes(args.clients, args.history, args.pending, args.claim_rows)
    payout_rows = sizes.clients * ROWS_PER_PAYOUT
    if sizes.history % payout_rows or sizes.history % ROWS_PER_CONVERSION:
        parser.error(
            f"--history must be a multiple of {payout_rows} and of"
            f" {ROWS_PER_CONVERSION}"
        )
    if not 0 < sizes.pending < sizes.claim_rows:
        parser.error("need 0 < --pending < --claim-rows")
    if args.calls < 2:
        parser.error("--calls must be 2 or more")
    return args, sizes


def _seed(seeder: Seeder, sizes: Sizes) -> None:
    started = time.perf_counter()
    seeder.clients()
    seeder.history(0, sizes.history - 1)
    seeded = time.perf_counter()
    seeder.vacuum()
    vacuumed = time.perf_counter()
    seeder.pending(0, sizes.pending - 1)
    seeder.analyze()
    print("seeding:")
    _line(
        f"  {sizes.clients:,} clients, {sizes.history:,} history rows",
        f"{seeded - started:.1f} s",
    )
    _line("  VACUUM (ANALYZE) of that history", f"{vacuumed - seeded:.1f} s")
    _line(
        f"  {sizes.pending:,} pending rows, then ANALYZE",
        f"{time.perf_counter() - vacuumed:.1f} s",
    )
    _line(
        "  foreign key checks while seeding",
        "on" if seeder.foreign_keys_checked else "off (keys hold by construction)",
    )


def _grow_tenfold(seeder: Seeder, sizes: Sizes) -> None:
    # No VACUUM here: it would mark the pending rows' pages all-visible,
    # and the check after the growth must see them as the first one did.
    started = time.perf_counter()
    seeder.history(sizes.history, sizes.history * 10 - 1)
    seeded = time.perf_counter()
    seeder.analyze()
    print("growing the history tenfold:")
    _line(
        f"  {sizes.history * 9:,} older history rows",
        f"{seeded - started:.1f} s",
    )
    _line("  ANALYZE", f"{time.perf_counter() - seeded:.1f} s")


def _add_claim_rows(seeder: Seeder, sizes: Sizes) -> None:
    started = time.perf_counter()
    seeder.vacuum()  # what autovacuum would have done to the history by now
    vacuumed = time.perf_counter()
    seeder.pending(sizes.pending, sizes.claim_rows - 1)
    seeder.analyze()
    print(f"bringing the pending rows to {sizes.claim_rows:,}:")
    _line("  VACUUM (ANALYZE) first", f"{vacuumed - started:.1f} s")
    _line(
        f"  {sizes.claim_rows - sizes.pending:,} more pending rows, then ANALYZE",
        f"{time.perf_counter() - vacuumed:.1f} s",
    )


def _settle(seeder: Seeder) -> None:
    """Before timing: the seeding's writes on disk, the sibling job up."""
    started = time.perf_counter()
    if seeder.checkpoint():
        _line("  CHECKPOINT", f"{time.perf_counter() - started:.1f} s")
    else:
        print("  no CHECKPOINT (not allowed): expect the seeding's writes as noise")
    seeder.sibling_heartbeat()


def main() -> int:
    args, sizes = _parse_args()
    admin_url, started_server = _admin_url()
    try:
        return _run(args, sizes, admin_url)
    finally:
        if started_server:
            embedded.stop()


def _run(args: argparse.Namespace, sizes: Sizes, admin_url: str) -> int:
    url = _prepare_database(admin_url)
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}")
    print(f"PostgreSQL: {_fetch_one(url, 'SELECT version() AS v')['v']}")
    seeder = Seeder(url, sizes, _newest_history(url))
    try:
        _seed(seeder, sizes)
        threshold = _threshold_between(url, sizes)
        _line("micro-batch threshold (MICRO_BATCH_THRESHOLD_USD)", f"{threshold} USD")
        with tempfile.TemporaryDirectory() as folder:
            log_path = Path(folder) / "gunicorn.log"
            holds = _measure(args, sizes, seeder, url, threshold, log_path)
    finally:
        seeder.close()
        if not args.keep_database:
            _drop_database(admin_url)
    return 0 if holds else 1


def _measure(
    args: argparse.Namespace,
    sizes: Sizes,
    seeder: Seeder,
    url: str,
    threshold: Decimal,
    log_path: Path,
) -> bool:
    port = _free_port()
    server = _start_gunicorn(service_environ(url, threshold), port, log_path)
    try:
        worker = _worker_pid(server.pid)
        _settle(seeder)
        base = time_checks(port, url, args.calls)
        _print_check(base)
        tenfold = None
        if args.tenfold:
            _grow_tenfold(seeder, sizes)
            _settle(seeder)
            tenfold = time_checks(port, url, args.calls)
            _print_check(tenfold)
        _add_claim_rows(seeder, sizes)
        _settle(seeder)
        conversion = claim_and_share(port, url, worker)
    except BaseException:
        print(_tail(log_path), file=sys.stderr)
        raise
    finally:
        server.terminate()
        server.wait(timeout=30)

    return _report(base, tenfold, conversion)


def _report(
    base: CheckTimes, tenfold: CheckTimes | None, conversion: ConversionFigures
) -> bool:
    claim, share = conversion.claim, conversion.share
    rows = conversion.shared["row_count"]
    print(f"claim of {rows:,} pending rows (one check-threshold run):")
    _print_step(claim, conversion.claim_reads)
    print(f"sharing of the USDT over those {rows:,} rows (swap-executed):")
    _print_step(share, conversion.share_reads)
    print(
        "  (peak: VmHWM of the gunicorn worker, from /proc, reset through"
        " /proc/PID/clear_refs just before the request)"
    )
    holds = _print_shared(conversion.shared)
    print("targets:")
    _verdict("check p50 under 20 ms", base.p50_ms < 20)
    if tenfold is not None:
        ratio = tenfold.p50_ms / base.p50_ms
        _verdict(
            f"check no slower with 10x history (p50 ratio {ratio:.2f})",
            ratio < NOISE,
        )
        blocks = tenfold.blocks_per_run / base.blocks_per_run
        _verdict(
            f"check reads no more with 10x history (blocks ratio {blocks:.2f})",
            blocks < BLOCKS_SLACK,
        )
    _verdict("claim under 5 s", claim.seconds < 5)
    _verdict("sharing under 5 s", share.seconds < 5)
    return holds


if __name__ == "__main__":
    sys.exit(main())
