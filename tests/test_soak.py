"""The soak test (`make soak`): its checks can fail, and a short soak passes.

The slow test runs the real thing for five seconds: the whole local system,
signed IPNs from several senders with redeliveries and forgeries, then the
database, reconcile and the processes' logs checked. The fast ones show the
checks it relies on catch what they are meant to catch.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from scripts.bench.soak import Answered, check
from shared.db import Database

ROOT = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"^  ([a-z_]+):\s+([0-9.]+)  \(", re.MULTILINE)


def _store(db: Database, payment_id: str, client_id: int) -> None:
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO payout_accumulation (nowpayments_payment_id, client_id,"
            " user_id, payment_amount_usd, usd_source, platform_fee_percent,"
            " accumulated_usd, accumulated_eth, outcome_currency)"
            " VALUES (%s, %s, 6271402111, 0.92956, 'price', 3, 0.9016732,"
            " 0.0002734, 'eth')",
            (payment_id, client_id),
        )


def test_soak_check_reports_missing_twice_and_unacknowledged_payments(
    db: Database, database_url: str, fixture_clients: list[dict[str, Any]]
) -> None:
    client_id = fixture_clients[0]["client_id"]
    _store(db, "1", client_id)
    _store(db, "3", client_id)
    answers = [
        Answered("new", 1, 200, "accumulated"),
        Answered("race", 1, 200, "accumulated"),
        Answered("new", 2, 200, "accumulated"),
    ]

    figures = check(database_url, answers, 1.0)

    assert figures.acknowledged == 3
    assert figures.stored == 2
    problems = "\n".join(figures.problems)
    assert "1 payments acknowledged but missing from the database: 2" in problems
    assert "1 payments credited twice: 1" in problems
    assert "1 payments stored but never acknowledged: 3" in problems
    assert "only 0 of 3 deliveries recorded" in problems


def test_soak_check_reports_an_answer_the_delivery_did_not_deserve(
    database_url: str,
) -> None:
    figures = check(database_url, [Answered("forged", 9, 200, "duplicate")], 1.0)

    assert "1 'forged' deliveries answered 200 duplicate" in figures.problems


@pytest.mark.slow
def test_short_soak_stores_each_acknowledged_payment_once_and_leaks_nothing(
    admin_url: str,
) -> None:
    # The soak makes and drops its own database on the tests' server.
    env = {**os.environ, "DATABASE_URL": admin_url}
    command = [sys.executable, "-m", "scripts.bench.soak", "--seconds", "5"]

    result = subprocess.run(
        [*command, "--senders", "3", "--settle-seconds", "30"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    figures = {name: float(value) for name, value in FIGURE.findall(result.stdout)}
    assert figures["acknowledged"] > 0, output
    assert figures["duplicates"] > 0 and figures["refused"] > 0, output
    answered = sum(
        figures[name]
        for name in ("acknowledged", "duplicates", "refused", "not_credited")
    )
    assert figures["sent"] == answered + figures["retryable"], output
    # A 5xx may still have committed its row; every other answer is exact.
    assert (
        figures["acknowledged"]
        <= figures["stored"]
        <= figures["acknowledged"] + figures["retryable"]
    ), output
    assert figures["recorded"] >= figures["sent"] - figures["retryable"], output
    assert re.search(r"conversions:\s+completed \d+", result.stdout), output
    assert "reconcile: clean" in result.stdout
    assert "(scanned; leaks: 0)" in result.stdout
