"""``GET /status``: a read-only page for an operator, on the two processors.

It shows what ``payoutctl status`` shows, in a browser: each scheduled job's
state (as ``/health`` judges it) with a timeline of its recent runs, the
money waiting per client, open conversions and payouts with the stale ones
flagged, and the tasks not yet delivered. The figures are read in one
read-only snapshot, with the queries of ``payoutctl status`` where they fit
and bounded queries of its own (``status_page.sql``) where a page needs
less than a terminal.

The page is private, behind the internal auth: the bearer token in token
mode, a Google ID token from an invoker in ``ALLOWED_INVOKERS`` in oidc mode.
A browser sends neither by itself, so an operator opens it through a local
proxy that adds the header. In oidc mode the token's audience must be the
service URL: the tokens ``gcloud run services proxy`` attaches for a user carry
gcloud's own audience and are refused; a token minted for a service account
(``gcloud auth print-identity-token --impersonate-service-account=...
--audiences=SERVICE_URL``) is accepted when that account is an invoker.
It holds no secret and no full wallet address (the database shortens them),
loads nothing from outside (inline CSS, no script) and reloads itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, make_response, render_template

from shared import health, money
from shared.auth import require_internal_auth
from shared.clients import QUERIES as STATUS_QUERIES
from shared.config import Settings
from shared.db import Database, load_queries
from shared.web import suite

QUERIES = load_queries(Path(__file__).with_name("status_page.sql"))

RUNS_PER_JOB = 24
CLIENTS_SHOWN = 50
BATCHES_SHOWN = 50
REFRESH_S = 30

# The page loads nothing but itself: no script, no image, no font, no frame.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
    ),
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}

Row = dict[str, Any]

# What a figure that does not exist (yet) is written as: an en dash.
NOTHING = "\u2013"

bp = Blueprint("status_page", __name__, template_folder="templates")


@dataclass(frozen=True)
class JobView:
    name: str
    health: health.JobHealth
    grace_s: int
    runs: list[Row]  # oldest first


@dataclass(frozen=True)
class StatusPage:
    service: str
    version: str
    now: datetime
    verdict: str  # as /health says it: ok, degraded, down
    jobs: list[JobView]
    pending_conversion: list[Row]
    converted_unpaid: Row
    clients: list[Row]
    clients_waiting: int
    batch_counts: Row
    open_batches: list[Row]
    stale_after_s: int
    undelivered_tasks: list[Row]
    refresh_s: int = REFRESH_S
    runs_per_job: int = RUNS_PER_JOB


def gather(db: Database, settings: Settings, service: str) -> StatusPage:
    """Every figure of the page; the money in one consistent snapshot."""
    jobs = health.job_health(db, settings)
    stale_after_s = settings.swap_stale_after
    with db.transaction() as cur:
        cur.execute(STATUS_QUERIES["reconcile_snapshot"])
        cur.execute(STATUS_QUERIES["status_now"])
        clock = cur.fetchone()
        cur.execute(
            QUERIES["recent_runs"],
            {"jobs": list(jobs), "runs_per_job": RUNS_PER_JOB},
        )
        runs = [dict(row) for row in cur.fetchall()]
        cur.execute(STATUS_QUERIES["status_pending_conversion"])
        pending = [dict(row) for row in cur.fetchall()]
        cur.execute(STATUS_QUERIES["status_converted_unpaid"])
        unpaid = cur.fetchone()
        cur.execute(QUERIES["clients_waiting"], {"limit": CLIENTS_SHOWN})
        clients = [dict(row) for row in cur.fetchall()]
        cur.execute(health.QUERIES["open_batches"], {"stale_after_s": stale_after_s})
        counts = cur.fetchone()
        cur.execute(
            STATUS_QUERIES["status_open_batches"],
            {"stale_after_s": stale_after_s, "limit": BATCHES_SHOWN},
        )
        batches = [dict(row) for row in cur.fetchall()]
        cur.execute(STATUS_QUERIES["status_undelivered_tasks"])
        tasks = [dict(row) for row in cur.fetchall()]
    assert clock is not None and unpaid is not None and counts is not None

    stuck = counts["conversions_stuck"] + counts["payouts_stuck"]
    return StatusPage(
        service=service,
        version=settings.version,
        now=clock["now"],
        verdict=health.verdict(jobs, stuck),
        jobs=[
            JobView(
                name=name,
                health=state,
                grace_s=settings.job_grace_s,
                runs=[run for run in runs if run["job"] == name],
            )
            for name, state in jobs.items()
        ],
        pending_conversion=pending,
        converted_unpaid=dict(unpaid),
        clients=clients,
        clients_waiting=clients[0]["clients_waiting"] if clients else 0,
        batch_counts=dict(counts),
        open_batches=batches,
        stale_after_s=stale_after_s,
        undelivered_tasks=tasks,
    )


@bp.get("/status")
@require_internal_auth
def status_page() -> Response:
    current = suite()
    page = gather(current.db, current.config.settings, current.name)
    response = make_response(render_template("status_page.html", page=page))
    response.headers.update(_HEADERS)
    return response


# --- how the template writes figures ----------------------------------------


@bp.app_template_filter("amount")
def amount_filter(amount: Decimal | None) -> str:
    """An exact amount, grouped: money is never a float on its way out."""
    return NOTHING if amount is None else money.to_display(amount)


@bp.app_template_filter("utc")
def utc_filter(moment: datetime | None) -> str:
    return NOTHING if moment is None else moment.strftime("%Y-%m-%d %H:%M:%SZ")


@bp.app_template_filter("hhmm")
def hhmm_filter(moment: datetime | None) -> str:
    return NOTHING if moment is None else moment.strftime("%H:%M")


@bp.app_template_filter("duration")
def duration_filter(seconds: int | Decimal | None) -> str:
    """A span for a person: ``45 s``, ``12 min``, ``2 h 05 min``, ``3 d 4 h``."""
    if seconds is None:
        return NOTHING
    whole = int(seconds)
    if whole < 120:
        return f"{whole} s"
    minutes, hours, days = whole // 60, whole // 3600, whole // 86400
    if whole < 3600:
        return f"{minutes} min"
    if whole < 86400:
        return f"{hours} h {minutes % 60:02d} min"
    return f"{days} d {hours % 24} h"


@bp.app_template_filter("took")
def took_filter(seconds: Decimal | None) -> str:
    """How long a run took, to a tenth of a second."""
    if seconds is None:
        return "still running"
    return f"{Decimal(seconds).quantize(Decimal('0.1'))} s"
