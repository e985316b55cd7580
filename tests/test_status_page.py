"""``GET /status``: the operator's page on the two processors.

The data is seeded straight into the database (clients, payments at each
stage, an aged conversion, a fresh payout batch, runs of both jobs,
undelivered tasks), then the page is read and its figures are checked
against what was seeded. The slow test renders it in headless Chromium and
keeps a screenshot.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import INTERNAL_HEADERS, INTERNAL_TOKEN, IPN_SECRET
from flask import Flask
from payout_support import (
    OTHER_WALLET,
    WALLET,
    add_client,
    add_payments,
    close_app,
    make_batch_app,
)

from shared.db import Database

ALICE, BOB, CAROL, DAVE = -1003296084379, -1001000000002, -1001000000003, -1004
CAROL_WALLET = "TJRabPrwbZy45sbavfcjinPJC18kjpRTv8"
DAVE_WALLET = "0x3d4c5b6a79880716253443526170f8e9d0c1b2a3"
SERVICES = ["gcbatchprocessor", "gcmicrobatchprocessor"]
# What the screenshot is also copied to, outside pytest's temporary tree.
SCREENSHOT_COPY = Path(
    os.environ.get("STATUS_SCREENSHOT")
    or Path(__file__).resolve().parent.parent / ".data" / "status-page.png"
)
# A taller window (STATUS_WINDOW=1280,1400) shows the whole page.
WINDOW = os.environ.get("STATUS_WINDOW", "1280,900")


# --- seeding ------------------------------------------------------------------


def execute(db: Database, statement: str, params: Any = None) -> list[dict[str, Any]]:
    with db.transaction() as cur:
        cur.execute(statement, params)
        return [dict(row) for row in cur.fetchall()] if cur.description else []


def add_runs(db: Database, job: str, runs: list[tuple[str, str, int]]) -> None:
    """Runs of ``job`` as (outcome, trigger, minutes ago), in that order."""
    for outcome, trigger, minutes_ago in runs:
        execute(
            db,
            """
            INSERT INTO job_runs (job, slot, trigger, outcome, started_at,
                finished_at)
            VALUES (%(job)s, now() - make_interval(mins => %(ago)s), %(trigger)s,
                %(outcome)s, now() - make_interval(mins => %(ago)s, secs => 2),
                CASE WHEN %(outcome)s <> 'running'
                     THEN now() - make_interval(mins => %(ago)s)
                END)
            """,
            {"job": job, "outcome": outcome, "trigger": trigger, "ago": minutes_ago},
        )


def add_payout_batch(db: Database, client_id: int, row_ids: list[int]) -> str:
    """A fresh payout batch holding ``row_ids``, waiting for the executor."""
    batch_id = str(uuid.uuid4())
    execute(
        db,
        """
        WITH rows AS (
            UPDATE payout_accumulation SET payout_batch_id = %(batch)s
            WHERE id = ANY (%(ids)s)
            RETURNING accumulated_usdt
        )
        INSERT INTO payout_batches (batch_id, client_id, wallet_address,
            payout_currency, payout_network, total_usdt, row_count, created_at)
        SELECT %(batch)s, %(client)s, %(wallet)s, 'usdt', 'eth',
               sum(accumulated_usdt), count(*), now() - interval '10 minutes'
        FROM rows
        """,
        {"batch": batch_id, "ids": row_ids, "client": client_id, "wallet": DAVE_WALLET},
    )
    return batch_id


def add_task(db: Database, service: str, sent: bool, hours_ago: int) -> None:
    execute(
        db,
        """
        INSERT INTO outbox (service, target_url, payload, dedup_key, attempts,
            last_error, sent_at, created_at)
        VALUES (%(service)s, 'http://executor.test/payouts', '{}', %(key)s, 4,
            'HTTP 503: executor down', CASE WHEN %(sent)s THEN now() END,
            now() - make_interval(hours => %(ago)s))
        """,
        {"service": service, "key": uuid.uuid4().hex, "sent": sent, "ago": hours_ago},
    )


@pytest.fixture
def seeded(db: Database) -> dict[str, Any]:
    """A day in the suite, as the page should tell it."""
    add_client(db, ALICE, threshold="2", wallet=WALLET)
    add_client(db, BOB, threshold="5", wallet=OTHER_WALLET)
    add_client(db, CAROL, threshold="100", wallet=CAROL_WALLET, network="trx")
    add_client(db, DAVE, threshold="7", wallet=DAVE_WALLET)

    # Alice: 2.42956 USD pending conversion, 1.25 USDT converted (62.5 %).
    add_payments(db, ALICE, ["0.92956", "1.5"], status="pending")
    add_payments(db, ALICE, ["1.25"])
    # Bob: 5.5 USDT converted, over his threshold of 5.
    add_payments(db, BOB, ["3", "2.5"])
    # Carol: a conversion swapping for three hours (past SWAP_STALE_AFTER),
    # and a payment that came after it.
    add_payments(db, CAROL, ["4.2"], status="swapping")
    add_payments(db, CAROL, ["0.5"], status="pending")
    execute(
        db,
        "UPDATE batch_conversions SET created_at = now() - interval '3 hours'"
        " WHERE status = 'swapping'",
    )
    [stale] = execute(
        db,
        "SELECT batch_conversion_id::text AS id FROM batch_conversions"
        " WHERE status = 'swapping'",
    )
    # Dave: a payout batch sent ten minutes ago, not stale.
    dave_rows = add_payments(db, DAVE, ["3.5", "3.500001"])
    fresh = add_payout_batch(db, DAVE, dave_rows)

    # check-threshold last succeeded 40 minutes ago (down: > 2 x 300 + 60 s);
    # process runs every 5 minutes, thirty runs of which the page shows 24.
    add_runs(
        db,
        "check-threshold",
        [("succeeded", "scheduler", 50), ("failed", "scheduler", 45),
         ("succeeded", "watchdog", 40), ("failed", "scheduler", 35)],
    )  # fmt: skip
    add_runs(
        db,
        "process",
        [("succeeded", "scheduler", 5 * n) for n in range(30, 2, -1)]
        + [("busy", "manual", 9), ("succeeded", "scheduler", 2)],
    )

    add_task(db, "gcbatchprocessor", sent=False, hours_ago=2)
    add_task(db, "gcbatchprocessor", sent=False, hours_ago=1)
    add_task(db, "gcbatchprocessor", sent=True, hours_ago=3)
    add_task(db, "gcmicrobatchprocessor", sent=False, hours_ago=1)
    return {"stale_conversion": stale["id"], "fresh_payout": fresh}


# --- apps and reading the page --------------------------------------------------


@pytest.fixture
def make_service(
    database_url: str, make_microbatch: Callable[..., Flask]
) -> Iterator[Callable[[str], Flask]]:
    made: list[Flask] = []

    def make(service: str) -> Flask:
        if service == "gcbatchprocessor":
            app = make_batch_app(database_url, APP_VERSION="v9.9.9")
        else:
            app = make_microbatch(APP_VERSION="v9.9.9")
        made.append(app)
        return app

    yield make
    for app in made:
        close_app(app)


def page_of(app: Flask) -> str:
    response = app.test_client().get("/status", headers=INTERNAL_HEADERS)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_data(as_text=True)


def text_of(markup: str) -> str:
    """What a person reads: tags dropped, entities decoded, spaces squeezed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def element(page: str, tag: str, attribute: str, value: str) -> str:
    """The markup of the first ``<tag attribute="value">`` element, whole,
    elements of the same tag nested in it included."""
    start = re.search(rf'<{tag}\b[^>]*\b{attribute}="{re.escape(value)}"', page)
    assert start, f"no <{tag} {attribute}={value!r}> on the page"
    depth = 0
    for found in re.finditer(rf"<(/?){tag}\b[^>]*>", page[start.start() :]):
        depth += -1 if found.group(1) else 1
        if depth == 0:
            return page[start.start() : start.start() + found.end()]
    raise AssertionError(f"<{tag} {attribute}={value!r}> is never closed")


def cell(row: str, css_class: str) -> str:
    found = re.search(rf'<td class="[^"]*\b{css_class}\b[^"]*">(.*?)</td>', row, re.S)
    assert found, f"no {css_class} cell in {row}"
    return text_of(found.group(1))


# --- who may see it -------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_the_page_is_refused_without_the_internal_token(
    service: str, make_service: Callable[[str], Flask]
) -> None:
    client = make_service(service).test_client()

    missing = client.get("/status")
    wrong = client.get("/status", headers={"Authorization": "Bearer not-the-token"})
    right = client.get("/status", headers=INTERNAL_HEADERS)

    assert missing.status_code == 401
    assert missing.json["error"]["code"] == "unauthorized"
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert right.mimetype == "text/html"
    assert right.headers["Cache-Control"] == "no-store"
    assert "default-src 'none'" in right.headers["Content-Security-Policy"]


def test_the_accumulator_serves_no_status_page(accumulator: Flask) -> None:
    answer = accumulator.test_client().get("/status", headers=INTERNAL_HEADERS)

    assert answer.status_code == 404
    assert answer.json["error"]["code"] == "not_found"


# --- what it shows ----------------------------------------------------------------


@pytest.mark.parametrize("service", SERVICES)
def test_no_secret_and_no_full_wallet_address_is_on_the_page(
    service: str, make_service: Callable[[str], Flask], seeded: dict[str, Any]
) -> None:
    page = page_of(make_service(service))

    for secret in (INTERNAL_TOKEN, IPN_SECRET):
        assert secret not in page
    for wallet in (WALLET, OTHER_WALLET, CAROL_WALLET, DAVE_WALLET):
        assert wallet not in page
        assert wallet.lower() not in page.lower()
    assert "0x2b5f…9b0c" in page
    assert "TJRabP…RTv8" in page
    # Nothing is fetched from anywhere: no script, no link, no image.
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert "http://" not in page and "https://" not in page


@pytest.mark.parametrize("service", SERVICES)
def test_each_clients_pending_and_unpaid_money_matches_the_rows(
    service: str, make_service: Callable[[str], Flask], seeded: dict[str, Any]
) -> None:
    page = page_of(make_service(service))
    alice = element(page, "tr", "data-client", str(ALICE))
    bob = element(page, "tr", "data-client", str(BOB))

    assert cell(alice, "pending-usd") == "2.42956 (2)"
    assert cell(alice, "unpaid-usdt") == "1.25 (1)"
    assert cell(alice, "threshold") == "2"
    assert "62.5%" in text_of(alice) and "payable" not in text_of(alice)
    assert cell(bob, "unpaid-usdt") == "5.5 (2)"
    assert "110.0%" in text_of(bob) and "payable" in text_of(bob)
    # Bob is over his threshold: he comes first.
    assert page.index(f'data-client="{BOB}"') < page.index(f'data-client="{ALICE}"')
    # Only Carol's newest payment waits: her others are swapping.
    carol = element(page, "tr", "data-client", str(CAROL))
    assert cell(carol, "pending-usd") == "0.5 (1)"
    assert cell(carol, "unpaid-usdt") == "0 (0)"
    # Dave's rows are claimed by a payout: nothing of his waits.
    assert f'data-client="{DAVE}"' not in page

    pending = text_of(element(page, "div", "data-pending-currency", "eth"))
    unpaid = text_of(element(page, "div", "id", "converted-unpaid"))
    assert "2.92956 USD" in pending and "in 3 payments" in pending
    assert "6.75 USDT" in unpaid and "2 clients, 1 over their threshold" in unpaid


@pytest.mark.parametrize("service", SERVICES)
def test_the_stale_conversion_is_flagged_and_the_fresh_payout_is_not(
    service: str, make_service: Callable[[str], Flask], seeded: dict[str, Any]
) -> None:
    page = page_of(make_service(service))
    stale = element(page, "tr", "data-batch", seeded["stale_conversion"])
    fresh = element(page, "tr", "data-batch", seeded["fresh_payout"])

    assert 'class="stale"' in stale and "stale" in text_of(stale)
    assert "swapping" in text_of(stale)
    assert "(4.2 USD)" in text_of(stale) and "3 h 00 min" in text_of(stale)
    assert 'class="stale"' not in fresh and "stale" not in text_of(fresh)
    assert f"7.000001 USDT for client {DAVE}" in text_of(fresh)
    counts = text_of(element(page, "span", "id", "batch-counts"))
    assert counts.startswith("1 conversion (1 stale), 1 payout (0 stale)")
    assert "stale after 2 h 00 min" in counts


@pytest.mark.parametrize("service", SERVICES)
def test_job_states_and_recent_runs_are_those_of_job_runs(
    service: str, make_service: Callable[[str], Flask], seeded: dict[str, Any]
) -> None:
    page = page_of(make_service(service))
    check = element(page, "section", "data-job", "check-threshold")
    process = element(page, "section", "data-job", "process")

    assert 'data-state="down"' in check
    assert re.search(r'job-state">down<', check)
    assert "40 min ago" in text_of(check)
    assert 'data-state="up"' in process
    assert re.search(r'job-state">up<', process)
    assert "every 5 min" in text_of(process)

    check_runs = re.findall(r'data-outcome="(\w+)"\s+data-trigger="(\w+)"', check)
    assert check_runs == [
        ("succeeded", "scheduler"),
        ("failed", "scheduler"),
        ("succeeded", "watchdog"),
        ("failed", "scheduler"),
    ]
    assert check.count("run empty") == 20
    process_runs = re.findall(r'data-outcome="(\w+)"\s+data-trigger="(\w+)"', process)
    # The newest 24 of 30: 22 scheduled runs, the busy manual one, the last.
    assert len(process_runs) == 24
    assert process_runs[-2:] == [("busy", "manual"), ("succeeded", "scheduler")]
    assert "run empty" not in process
    assert 'id="verdict">down<' in page


@pytest.mark.parametrize("service", SERVICES)
def test_undelivered_tasks_are_counted_per_service(
    service: str, make_service: Callable[[str], Flask], seeded: dict[str, Any]
) -> None:
    page = page_of(make_service(service))
    batch = element(page, "tr", "data-service", "gcbatchprocessor")
    microbatch = element(page, "tr", "data-service", "gcmicrobatchprocessor")

    assert cell(batch, "tasks") == "2"
    assert "2 h 00 min" in text_of(batch)
    assert cell(microbatch, "tasks") == "1"
    # The executor's error text is not for this page (payoutctl status).
    assert "executor down" not in page


@pytest.mark.parametrize("service", SERVICES)
def test_an_empty_suite_is_a_calm_page(
    service: str, make_service: Callable[[str], Flask], db: Database
) -> None:
    page = text_of(page_of(make_service(service)))

    assert "No client has money waiting." in page
    assert "No conversion or payout is open." in page
    assert "Every task has been delivered." in page
    assert "never succeeded" in page


def test_text_from_the_database_is_escaped(
    make_service: Callable[[str], Flask], db: Database
) -> None:
    """Autoescaping: a task's service name is shown as text, never as markup."""
    add_task(db, "<b>gcbatch</b>", sent=False, hours_ago=1)

    page = page_of(make_service("gcbatchprocessor"))

    assert "<b>gcbatch</b>" not in page
    assert "&lt;b&gt;gcbatch&lt;/b&gt;" in page


# --- in a real browser --------------------------------------------------------------


def chromium() -> str:
    """Debian's Chromium, installed with apt-get when it is missing."""
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is missing and apt-get cannot install it here")
    wait = ["-o", "DPkg::Lock::Timeout=900"]  # other installs may hold the lock
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    update = subprocess.run(
        ["apt-get", *wait, "update"], env=env, capture_output=True, timeout=900
    )
    install = subprocess.run(
        ["apt-get", *wait, "install", "-y", "--no-install-recommends", "chromium"],
        env=env,
        capture_output=True,
        timeout=1800,
    )
    if install.returncode != 0 or not Path("/usr/bin/chromium").exists():
        pytest.skip(
            "chromium could not be installed with apt-get: "
            f"update exit {update.returncode}, install exit {install.returncode}: "
            + install.stderr.decode(errors="replace")[-300:]
        )
    return "/usr/bin/chromium"


@contextmanager
def authorising_proxy(upstream: str) -> Iterator[str]:
    """A local proxy adding the bearer token a browser cannot be given."""

    class Forward(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = requests.get(
                upstream + self.path, headers=INTERNAL_HEADERS, timeout=30
            )
            self.send_response(answer.status_code)
            for name in ("Content-Type", "Content-Security-Policy"):
                if name in answer.headers:
                    self.send_header(name, answer.headers[name])
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def browse(binary: str, profile: Path, url: str, *extra: str) -> str:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW}",
        *extra,
        url,
    ]
    done = subprocess.run(command, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(
    make_service: Callable[[str], Flask],
    serve: Callable[[Flask], str],
    seeded: dict[str, Any],
    tmp_path: Path,
) -> None:
    binary = chromium()
    base = serve(make_service("gcbatchprocessor"))
    screenshot = tmp_path / "status.png"

    with authorising_proxy(base) as url:
        dom = browse(binary, tmp_path / "profile-dom", f"{url}/status", "--dump-dom")
        browse(
            binary,
            tmp_path / "profile-shot",
            f"{url}/status",
            f"--screenshot={screenshot}",
        )

    assert screenshot.exists()
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000
    for heading in (
        "Scheduled jobs",
        "Money waiting",
        "Per client",
        "Open conversions and payouts",
        "Undelivered tasks",
    ):
        assert f"<h2>{heading}" in dom
    assert 'data-job="check-threshold" data-state="down"' in dom
    assert WALLET not in dom
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    print(f"status page screenshot: {SCREENSHOT_COPY} ({screenshot.stat().st_size} B)")


def test_amounts_on_the_page_are_decimal_text() -> None:
    from shared.status_page import NOTHING, amount_filter, duration_filter

    assert amount_filter(Decimal("1234567.8900000000")) == "1,234,567.89"
    assert amount_filter(Decimal("0.000001")) == "0.000001"
    assert amount_filter(Decimal("0E-10")) == "0"
    assert amount_filter(None) == NOTHING
    assert [duration_filter(s) for s in (59, 600, 7200, 90061)] == [
        "59 s",
        "10 min",
        "2 h 00 min",
        "1 d 1 h",
    ]
