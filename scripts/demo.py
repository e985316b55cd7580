"""``make demo``: watch money flow from payment to payout, then check it.

Starts the local system (as ``make run`` does) with short intervals on ports
of its own and a database of its own, registers demo clients, replays
realistic signed NOWPayments IPNs in three waves (the fixtures' shapes:
several clients, amounts from dust to large, duplicates, non-final
statuses, an unknown channel, a forged signature), waits until every
conversion and payout has settled, prints a table per client and the
batches, runs ``payoutctl reconcile``, stops everything, and exits 0 only
when all of that held.

The sandbox executor fails a share of tasks and delivers some callbacks
twice, so the unhappy paths run too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import requests

from gcaccumulator.ipn import canonical_json, sign
from scripts import local_system
from shared import embedded, money
from shared.db import load_queries

QUERIES = load_queries(Path(__file__).with_name("demo.sql"))
PORT_BASE = int(os.environ.get("DEMO_PORT_BASE", "18180"))
DEMO_DATA = embedded.DATA_DIR / "demo"
DATABASE = "payouts_demo"
SECRET = "demo-ipn-secret"  # noqa: S105 (a local demo key)
TOKEN = "demo-internal-token"  # noqa: S105
THRESHOLD_USD = Decimal(5)
INTERVAL_S = 6
SETTLE_TIMEOUT_S = 60

# client id, open channel, strategy, threshold USD, wallet, payout currency
CLIENTS = [
    (-1003296084379, -1002000000001, "threshold", "2",
     "0x2b5f1c9a7e3d4b6a8c0e1f2a3b4c5d6e7f8a9b0c", "usdt"),
    (-1001000000002, -1002000000002, "threshold", "5",
     "0x7c1e0d9b8a7f6e5d4c3b2a1908f7e6d5c4b3a291", "shib"),
    (-1001000000004, None, "threshold", "50",
     "0x4e3d2c1b0a99887766554433221100ffeeddccbb", "usdt"),
    (-1001000000005, None, "threshold", "100000",
     "0x5f4e3d2c1b0a99887766554433221100ffeeddcc", "usdt"),
    (-1001000000003, None, "instant", None,
     "0x3d4c5b6a79880716253443526170f8e9d0c1b2a3", "eth"),
]  # fmt: skip
# From dust (whose USD rounds to almost nothing) to large.
AMOUNTS = ["0.0002734", "0.00041", "0.0015", "0.000000001", "0.25", "0.0009"]


def ipn_body(payment_id: int, channel: int, amount: str, status: str) -> dict[str, Any]:
    """An IPN in NOWPayments' shape and key order."""
    outcome = Decimal(amount)
    paid = outcome * Decimal("1.5")
    return {
        "payment_id": payment_id,
        "parent_payment_id": None,
        "invoice_id": 4522625843,
        "payment_status": status,
        "pay_address": "0x9f3a1c22b7d0e6a4c5b8f1e2d3c4b5a697887766",
        "payin_extra_id": None,
        "price_amount": Decimal("1.35"),
        "price_currency": "usd",
        "pay_amount": paid,
        "actually_paid": paid if status == "finished" else 0,
        "actually_paid_at_fiat": 0,
        "pay_currency": "eth",
        "order_id": f"PGP-{6271400000 + payment_id % 1000}|{channel}",
        "order_description": "Channel subscription 30 days",
        "purchase_id": "5837122679",
        "outcome_amount": outcome,
        "outcome_currency": "eth",
        "payment_extra_ids": None,
        "fee": {
            "currency": "eth",
            "depositFee": Decimal("0.0000041"),
            "withdrawalFee": 0,
            "serviceFee": Decimal("0.0000021"),
        },
        "created_at": "2026-12-03T16:10:02.118Z",
        "updated_at": "2026-12-03T16:16:43.480Z",
    }


_NUMBER = re.compile(r'"@number:([-0-9.eE+]+)"')


def encode(value: Any) -> bytes:
    """Compact JSON with every Decimal written as a JSON number, digit for digit."""
    text = json.dumps(value, default=lambda n: f"@number:{n}", separators=(",", ":"))
    return _NUMBER.sub(r"\1", text).encode()


def signed(secret: str, body: dict[str, Any]) -> tuple[bytes, str]:
    """The bytes NOWPayments sends for ``body``, and their signature."""
    raw = encode(body)
    # NOWPayments signs its sorted form, not the bytes it sends.
    parsed = json.loads(raw, parse_float=Decimal)
    sorted_form = canonical_json(parsed, arrays_as_objects=True).encode()
    return raw, sign(secret, sorted_form)


Delivery = tuple[str, dict[str, Any], str]  # what, body, expected outcome


def waves() -> list[list[Delivery]]:
    """Three waves of deliveries, each worth at least one conversion."""
    plan: list[list[Delivery]] = []
    payment = 5_100_000_000
    for wave in range(3):
        deliveries: list[Delivery] = []
        for index, (client, open_channel, strategy, *_) in enumerate(CLIENTS):
            for amount in AMOUNTS[index : index + 3]:
                payment += 1
                channel = open_channel if open_channel and payment % 2 else client
                expected = (
                    "accumulated" if strategy == "threshold" else "instant_client"
                )
                body = ipn_body(payment, channel, amount, "finished")
                deliveries.append((f"wave {wave}", body, expected))
        plan.append(deliveries)
    first_client = CLIENTS[0][0]
    payment += 1
    extras: list[Delivery] = [("duplicate", plan[0][0][1], "duplicate")]
    for status in ("waiting", "confirming", "partially_paid"):
        body = ipn_body(payment, first_client, "0.001", status)
        extras.append((status, body, "not_final"))
    extras += [
        (
            "finished",
            ipn_body(payment, first_client, "0.001", "finished"),
            "accumulated",
        ),
        (
            "unknown channel",
            ipn_body(payment + 1, -1009999999999, "0.001", "finished"),
            "unknown_client",
        ),
        (
            "large",
            ipn_body(payment + 2, CLIENTS[2][0], "2.5", "finished"),
            "accumulated",
        ),
    ]
    plan[-1] += extras
    return plan


def deliver(base: str, deliveries: list[Delivery]) -> list[str]:
    """Send signed IPNs as NOWPayments does; return what did not go as expected."""
    problems = []
    for what, body, expected in deliveries:
        raw, signature = signed(SECRET, body)
        response = requests.post(
            f"{base}/ipn",
            data=raw,
            headers={"x-nowpayments-sig": signature},
            timeout=10,
        )
        outcome = response.json().get("outcome")
        if outcome != expected:
            problems.append(f"{what}: expected {expected}, got {outcome}")
    return problems


def deliver_forgery(base: str) -> list[str]:
    raw = encode(ipn_body(5_199_999_999, CLIENTS[0][0], "1", "finished"))
    headers = {"x-nowpayments-sig": "0" * 128}
    response = requests.post(f"{base}/ipn", data=raw, headers=headers, timeout=10)
    if response.status_code != 401:
        return [f"a forged signature was answered {response.status_code}"]
    return []


def query(url: str, name: str) -> list[dict[str, Any]]:
    return local_system.fetch_all(url, QUERIES[name])


def is_settled(state: dict[str, Any]) -> bool:
    return bool(
        state["open_conversions"] == 0
        and state["open_payouts"] == 0
        and state["pending_usd"] < THRESHOLD_USD
        and state["clients_due"] == 0
    )


def wait_until_settled(url: str, timeout_s: float) -> dict[str, Any] | None:
    """None once settled, else the last state seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = query(url, "unsettled")[0]
        if is_settled(state):
            return None
        if time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "  (none)"
    headers = list(rows[0])
    cells = [[_cell(row[name]) for name in headers] for row in rows]
    widths = [
        max(len(name), *(len(line[i]) for line in cells))
        for i, name in enumerate(headers)
    ]
    lines = [headers, *cells]
    return "\n".join(
        "  " + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _cell(value: Any) -> str:
    if isinstance(value, Decimal):
        return money.to_text(value)
    return "-" if value is None else str(value)


def register_clients(payoutctl: str, env: dict[str, str]) -> None:
    for client, open_channel, strategy, threshold, wallet, currency in CLIENTS:
        args = [payoutctl, "clients", "add", f"--client-id={client}"]
        args += ["--strategy", strategy, "--wallet", wallet]
        args += ["--currency", currency, "--network", "eth"]
        if open_channel:
            args.append(f"--open-channel-id={open_channel}")
        if threshold:
            args += ["--threshold", threshold]
        subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)


def system_env(url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": url,
        "NOWPAYMENTS_IPN_SECRET": SECRET,
        "INTERNAL_AUTH_TOKEN": TOKEN,
        "MICRO_BATCH_THRESHOLD_USD": str(THRESHOLD_USD),
        "CHECK_THRESHOLD_INTERVAL_S": str(INTERVAL_S),
        "PROCESS_INTERVAL_S": str(INTERVAL_S),
        "JOB_GRACE_S": "5",
        "SANDBOX_DELAY_S": "0.5",
        "SANDBOX_JITTER_S": "1.0",
        "SANDBOX_FAIL_PERCENT": "20",
        "SANDBOX_DUPLICATE_PERCENT": "40",
        "SANDBOX_SEED": "7",
        "LOG_LEVEL": "INFO",
    }


def run_demo(url: str, env: dict[str, str]) -> list[str]:
    bases = local_system.bases(PORT_BASE)
    local_system.wait_for_services(bases, 60)
    payoutctl = str(Path(sys.executable).with_name("payoutctl"))
    register_clients(payoutctl, env)
    plan = waves()
    count = sum(len(wave) for wave in plan) + 1
    print(f"registered {len(CLIENTS)} clients; replaying {count} IPN deliveries")

    failures = deliver_forgery(bases[0])
    for number, wave in enumerate(plan, start=1):
        failures += deliver(bases[0], wave)
        # Let each wave become its own conversion before the next arrives.
        state = wait_until_settled(url, 2.5 * INTERVAL_S)
        # A wave is given a bounded wait; what is still moving carries into
        # the next, and the end waits until everything has settled.
        after = "settled" if state is None else "still settling, next wave"
        print(f"wave {number}: {len(wave)} deliveries; {after}")
    state = wait_until_settled(url, SETTLE_TIMEOUT_S)
    if state is not None:
        failures.append(f"not settled after {SETTLE_TIMEOUT_S} s: {state}")

    print("\ndeliveries by outcome:")
    print(table(query(url, "deliveries")))
    print("\nper client (threshold clients; exact amounts):")
    per_client = query(url, "per_client")
    print(table(per_client))
    print("\nbatches (a failed one's rows went to a later batch):")
    print(table(query(url, "batches")))
    paid = [row for row in per_client if row["paid_usdt"] > 0]
    if len(paid) != 3:
        failures.append(f"expected 3 clients paid, got {len(paid)}")

    print("\npayoutctl reconcile:")
    reconcile = subprocess.run(
        [payoutctl, "reconcile"], env=env, capture_output=True, text=True, check=False
    )
    print("  " + reconcile.stdout.strip().replace("\n", "\n  "))
    if reconcile.returncode != 0:
        failures.append("reconcile found breaches")
    return failures


def main() -> int:
    started_at = time.monotonic()
    admin, _ = local_system.admin_url(DEMO_DATA)
    own_server = not os.environ.get("DATABASE_URL")
    # Named after the ports: two demos on one server (a developer's and a
    # test run's) must not drop each other's database.
    url = local_system.fresh_database(admin, f"{DATABASE}_{PORT_BASE}")
    env = system_env(url)
    log_path = DEMO_DATA / f"system-{PORT_BASE}.log"
    ports = f"{PORT_BASE + 1}-{PORT_BASE + 4}"
    print(f"starting the demo system on ports {ports}; its logs: {log_path}")
    system = local_system.start(env, PORT_BASE, log_path)
    try:
        failures = run_demo(url, env)
    finally:
        local_system.stop(system)
        if own_server:
            embedded.stop(DEMO_DATA)

    elapsed = time.monotonic() - started_at
    if failures:
        print(f"\nDEMO FAILED after {elapsed:.0f} s:")
        print("\n".join(f"  - {failure}" for failure in failures))
        return 1
    print(
        f"\ndemo passed in {elapsed:.0f} s: every delivery answered as expected,"
        " everything settled, reconcile clean"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
