"""Soak test: the whole local system under signed IPNs for a bounded time.

    python -m scripts.bench.soak [--seconds 60] [--senders 4]

Starts the local system as ``make demo`` does (three services under
gunicorn, the sandbox executor, the local scheduler firing every few
seconds) on free ports, with a fresh database of its own on
``DATABASE_URL``'s server or the embedded one, and registers the demo's
clients, whose low thresholds make conversions and payouts happen while
the traffic runs. A few senders then post signed IPNs back to back, as fast
as the machine answers, until ``--seconds`` or ``--max-deliveries``; among
them payments delivered again (one sender's own, and payments every sender
races to deliver), forged signatures, invalid amounts, an instant client
and an unknown channel. Every request goes to 127.0.0.1.

Then it waits briefly for the conversions and payouts in flight, prints the
figures and ``payoutctl reconcile``, stops the system, and scans every line
the processes logged for the secrets it configured and the signatures it
sent. It exits 1 when an acknowledged payment is missing or was credited
twice, a row was stored that no answer acknowledged, an answer was not what
that delivery deserved, reconcile found a breach, or a log line leaked.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scripts import demo, local_system
from scripts.bench.ingest import send_ipns
from scripts.log_scan import find_secrets
from shared import embedded, money
from shared.db import load_queries

QUERIES = load_queries(Path(__file__).with_name("soak.sql"))
SOAK_DATA = embedded.DATA_DIR / "soak"
FIRST_PAYMENT = 5_300_000_000
SENDER_SPAN = 100_000_000  # payment ids of one sender's own deliveries
RACE_FIRST = 5_290_000_000  # payments every sender delivers
RACE_EVERY = 40  # each sender's step k * RACE_EVERY delivers race payment k
UNKNOWN_CHANNEL = -1009999999999

# What each kind of delivery may be answered: (status, outcome).
EXPECTED = {
    "new": {(200, "accumulated")},
    "again": {(200, "duplicate")},
    "race": {(200, "accumulated"), (200, "duplicate")},
    "forged": {(401, "bad_signature")},
    "invalid": {(400, "invalid")},
    "instant": {(200, "instant_client")},
    "unknown": {(200, "unknown_client")},
}
# Shares of a sender's deliveries, in percent; the rest are new payments.
MIX = [("again", 8), ("forged", 4), ("invalid", 3), ("instant", 3), ("unknown", 2)]


@dataclass(frozen=True)
class Planned:
    kind: str
    payment_id: int
    signature: str


@dataclass(frozen=True)
class Answered:
    kind: str
    payment_id: int
    status: int  # 0: no answer (the connection failed)
    outcome: str | None


class Sender:
    """One sender's plan, made as it goes, and the answers it got."""

    def __init__(self, number: int, secret: str, limit: int) -> None:
        self.number = number
        self.secret = secret
        self.limit = limit
        self.random = random.Random(number)
        self.planned: list[Planned] = []
        self.answers: list[Answered] = []
        self._credited: list[tuple[bytes, str, int]] = []
        self._next_id = FIRST_PAYMENT + number * SENDER_SPAN

    def deliveries(self) -> Iterator[tuple[bytes, str]]:
        for step in range(self.limit):
            kind, payment_id, raw, signature = self._next(step)
            self.planned.append(Planned(kind, payment_id, signature))
            yield raw, signature

    def _next(self, step: int) -> tuple[str, int, bytes, str]:
        if step % RACE_EVERY == 0:
            # Every sender must send the same bytes for it, as a redelivery.
            payment_id = RACE_FIRST + step // RACE_EVERY
            chooser = random.Random(payment_id)
            return ("race", payment_id, *self._signed(payment_id, "new", chooser))
        kind = self._kind()
        if kind == "again" and self._credited:
            raw, signature, payment_id = self.random.choice(self._credited)
            return "again", payment_id, raw, signature
        if kind == "again":
            kind = "new"
        self._next_id += 1
        raw, signature = self._signed(self._next_id, kind, self.random)
        if kind == "new":
            self._credited.append((raw, signature, self._next_id))
        return kind, self._next_id, raw, signature

    def _kind(self) -> str:
        roll = self.random.randrange(100)
        for kind, percent in MIX:
            if roll < percent:
                return kind
            roll -= percent
        return "new"

    def _signed(
        self, payment_id: int, kind: str, chooser: random.Random
    ) -> tuple[bytes, str]:
        threshold_clients = [row for row in demo.CLIENTS if row[2] == "threshold"]
        client, open_channel, *_ = chooser.choice(threshold_clients)
        if kind == "instant":
            client, open_channel = demo.CLIENTS[-1][0], None
        channel = open_channel if open_channel and payment_id % 2 else client
        if kind == "unknown":
            channel = UNKNOWN_CHANNEL
        amount = "-0.001" if kind == "invalid" else chooser.choice(demo.AMOUNTS)
        body = demo.ipn_body(payment_id, channel, amount, "finished")
        if kind == "forged":
            return demo.signed("not-" + self.secret, body)
        return demo.signed(self.secret, body)

    def run(self, port: int, deadline: float) -> None:
        for index, status, outcome, _ in send_ipns(port, self.deliveries(), deadline):
            planned = self.planned[index]
            self.answers.append(
                Answered(planned.kind, planned.payment_id, status, outcome)
            )


def send(port: int, seconds: float, senders: list[Sender]) -> float:
    """Run every sender until the deadline or its limit; the seconds taken."""
    started = time.perf_counter()
    deadline = started + seconds
    threads = [
        threading.Thread(target=sender.run, args=(port, deadline), daemon=True)
        for sender in senders
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def query(url: str, name: str) -> list[dict[str, Any]]:
    return local_system.fetch_all(url, QUERIES[name])


@dataclass
class Figures:
    sent: int
    acknowledged: int
    stored: int
    refused: int
    duplicates: int
    not_credited: int
    retryable: int
    recorded: int
    rate: float
    problems: list[str]


def check(url: str, answers: list[Answered], elapsed: float) -> Figures:
    """The figures, and every way the answers and the database disagree."""
    problems: list[str] = []
    unexpected = Counter(
        (answer.kind, answer.status, answer.outcome)
        for answer in answers
        if answer.status < 500
        and answer.status != 0
        and (answer.status, answer.outcome) not in EXPECTED[answer.kind]
    )
    for (kind, status, outcome), count in sorted(unexpected.items()):
        problems.append(f"{count} '{kind}' deliveries answered {status} {outcome}")

    acknowledged = Counter(
        str(answer.payment_id)
        for answer in answers
        if (answer.status, answer.outcome) == (200, "accumulated")
    )
    retried = {str(a.payment_id) for a in answers if a.status >= 500 or not a.status}
    stored_rows = {
        row["nowpayments_payment_id"]: row["row_count"]
        for row in query(url, "stored_payments")
    }
    twice = [payment for payment, count in acknowledged.items() if count > 1]
    twice += [payment for payment, count in stored_rows.items() if count > 1]
    missing = set(acknowledged) - set(stored_rows)
    unacknowledged = set(stored_rows) - set(acknowledged) - retried
    for what, payments in (
        ("acknowledged but missing from the database", missing),
        ("credited twice", twice),
        ("stored but never acknowledged", unacknowledged),
    ):
        if payments:
            sample = ", ".join(sorted(payments)[:5])
            problems.append(f"{len(payments)} payments {what}: {sample}")

    answered = [answer for answer in answers if answer.status]
    recorded = query(url, "recorded_deliveries")[0]["delivery_count"]
    if recorded < sum(1 for answer in answered if answer.status < 500):
        problems.append(f"only {recorded} of {len(answered)} deliveries recorded")
    return Figures(
        sent=len(answers),
        acknowledged=sum(acknowledged.values()),
        stored=sum(stored_rows.values()),
        refused=sum(1 for a in answers if a.status in (400, 401)),
        duplicates=sum(
            1 for a in answers if (a.status, a.outcome) == (200, "duplicate")
        ),
        not_credited=sum(
            1
            for a in answers
            if a.status == 200 and a.outcome in ("instant_client", "unknown_client")
        ),
        retryable=sum(1 for a in answers if a.status >= 500 or not a.status),
        recorded=recorded,
        rate=len(answers) / elapsed if elapsed else 0.0,
        problems=problems,
    )


def print_figures(figures: Figures, answers: list[Answered], elapsed: float) -> None:
    statuses = Counter(answer.status for answer in answers)
    lines = [
        ("sent", figures.sent, f"deliveries answered in {elapsed:.1f} s"),
        ("acknowledged", figures.acknowledged, "200 accumulated"),
        ("stored", figures.stored, "rows in payout_accumulation"),
        (
            "refused",
            figures.refused,
            f"401 bad_signature {statuses[401]}, 400 invalid {statuses[400]}",
        ),
        ("duplicates", figures.duplicates, "200 duplicate"),
        ("not_credited", figures.not_credited, "200 instant_client, unknown_client"),
        ("retryable", figures.retryable, "5xx or no answer"),
        ("recorded", figures.recorded, "deliveries in ipn_events"),
    ]
    for name, value, meaning in lines:
        print(f"  {name + ':':<14}{value:>8}  ({meaning})")
    print(f"  {'rate:':<14}{figures.rate:>8.1f}  (deliveries per second)")


def print_batches(url: str) -> None:
    states = query(url, "batch_states")
    for kind in ("conversion", "payout"):
        counts = ", ".join(
            f"{row['status']} {row['batch_count']}"
            for row in states
            if row["kind"] == kind
        )
        print(f"  {kind + 's:':<14}{counts or 'none'}")
    paid = query(url, "paid_usdt")[0]
    print(
        f"  {'paid:':<14}{money.to_text(paid['paid_usdt'])} usdt"
        f" over {paid['paid_rows']} payments"
    )


def system_env(url: str, secret: str, token: str, args: argparse.Namespace) -> dict:
    return {
        **os.environ,
        "DATABASE_URL": url,
        "NOWPAYMENTS_IPN_SECRET": secret,
        "INTERNAL_AUTH_TOKEN": token,
        "MICRO_BATCH_THRESHOLD_USD": str(demo.THRESHOLD_USD),
        "CHECK_THRESHOLD_INTERVAL_S": str(args.interval),
        "PROCESS_INTERVAL_S": str(args.interval),
        "JOB_GRACE_S": str(args.interval),
        "WEB_CONCURRENCY": str(args.workers),
        "SANDBOX_DELAY_S": "0.5",
        "SANDBOX_JITTER_S": "0.5",
        "SANDBOX_FAIL_PERCENT": "10",
        "SANDBOX_DUPLICATE_PERCENT": "20",
        "LOG_LEVEL": "INFO",
    }


def reconcile(env: dict[str, str]) -> bool:
    payoutctl = str(Path(sys.executable).with_name("payoutctl"))
    result = subprocess.run(
        [payoutctl, "reconcile"], env=env, capture_output=True, text=True, check=False
    )
    print("  " + (result.stdout + result.stderr).strip().replace("\n", "\n  "))
    return result.returncode == 0


def scan_logs(log_path: Path, secrets_: list[str], senders: list[Sender]) -> list[str]:
    signatures = [planned.signature for s in senders for planned in s.planned]
    text = log_path.read_text(errors="replace")
    leaks = find_secrets(text, [*secrets_, *signatures])
    lines = text.count("\n")
    print(f"  {'log lines:':<14}{lines:>8}  (scanned; leaks: {len(leaks)})")
    # How many and where to look, never what: printing a line leaks it again.
    if not leaks:
        return []
    return [f"{len(leaks)} log lines of {log_path} hold a secret or signature"]


def soak(args: argparse.Namespace) -> int:
    admin, started_server = local_system.admin_url(SOAK_DATA)
    database = f"payouts_soak_{os.getpid()}"
    url = local_system.fresh_database(admin, database)
    secret = "soak-ipn-" + secrets.token_hex(16)
    token = "soak-token-" + secrets.token_hex(16)
    configured = [secret, token, urlsplit(admin).password or ""]
    env = system_env(url, secret, token, args)
    port_base = local_system.free_port_base()
    log_path = SOAK_DATA / f"{database}.log"
    where = "DATABASE_URL's server" if os.environ.get("DATABASE_URL") else "embedded"
    print(
        f"soak: {args.seconds:g} s, {args.senders} senders, ports"
        f" {port_base + 1}-{port_base + 4}, database {database} ({where})"
    )
    senders = [
        Sender(number, secret, args.max_deliveries // args.senders)
        for number in range(args.senders)
    ]
    try:
        problems = run(args, env, port_base, log_path, senders)
        problems += scan_logs(log_path, configured, senders)
        if problems:
            print("SOAK FAILED:")
            print("\n".join(f"  - {problem}" for problem in problems))
            print(f"  database {database} and log {log_path} are kept")
            return 1
        print("soak passed: every acknowledged payment stored once,")
        print("reconcile clean, no secret or signature in the logs")
        if not args.keep:
            log_path.unlink()
            local_system.drop_database(admin, database)
        return 0
    finally:
        if started_server:
            embedded.stop(SOAK_DATA)


def run(
    args: argparse.Namespace,
    env: dict[str, str],
    port_base: int,
    log_path: Path,
    senders: list[Sender],
) -> list[str]:
    """Start the system, send, settle, check and stop it; the problems seen."""
    url = env["DATABASE_URL"]
    bases = local_system.bases(port_base)
    system = local_system.start(env, port_base, log_path)
    try:
        local_system.wait_for_services(bases, 90)
        demo.register_clients(str(Path(sys.executable).with_name("payoutctl")), env)
        port = urlsplit(bases[0]).port
        assert port is not None
        elapsed = send(port, args.seconds, senders)
        state = demo.wait_until_settled(url, args.settle_seconds)
        answers = [answer for sender in senders for answer in sender.answers]
        figures = check(url, answers, elapsed)
        print_figures(figures, answers, elapsed)
        print_batches(url)
        print(f"  {'settled:':<14}{'yes' if state is None else f'no: {state}'}")
        clean = reconcile(env)
    finally:
        # Stopped before the logs are scanned, so every line is written.
        local_system.stop(system)
    return figures.problems + ([] if clean else ["reconcile found breaches"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--max-deliveries", type=int, default=500_000)
    parser.add_argument("--interval", type=int, default=3, help="scheduler, s")
    parser.add_argument("--settle-seconds", type=float, default=30)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn, each")
    parser.add_argument("--keep", action="store_true", help="keep the database and log")
    return soak(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
