"""Each scheduled service watches its sibling's heartbeat, and heals it.

After its own run, a service looks at the other job's state (shared.health).
When the sibling is down it logs ``job_overdue`` at ERROR (the line an alert
policy matches) and triggers the sibling's endpoint itself, through its own
outbox, with ``X-Trigger: watchdog``. The trigger's dedup key is the
sibling's current slot, so one trigger per slot at most; the sibling's slot
dedup and job lock make a trigger that races the real scheduler harmless.
A run started by the watchdog does not watch in turn.

Optional external heartbeats: with ``HEARTBEAT_URL_CHECK_THRESHOLD`` or
``HEARTBEAT_URL_PROCESS`` set, each run pings ``<url>/start`` when it
starts, ``<url>`` when it succeeds and ``<url>/fail`` when it fails, the way
Healthchecks.io expects, so a monitor outside Google Cloud notices a job
that stops. A ping never fails or slows a run beyond its short timeout.
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from shared import outbox
from shared.config import Settings
from shared.db import Database
from shared.health import interval_of, job_health
from shared.jobs import current_slot, utcnow

log = logging.getLogger("payouts.watchdog")

SIBLING = {"check-threshold": "process", "process": "check-threshold"}
PING_TIMEOUT_S = 2


def sibling_url(settings: Settings, job: str) -> str | None:
    if job == "check-threshold":
        base = settings.micro_batch_processor_url
    else:
        base = settings.batch_processor_url
    return None if base is None else f"{base}/{job}"


def watch_sibling(
    db: Database, settings: Settings, own_job: str, tasks: outbox.Outbox
) -> dict[str, Any]:
    """Check the sibling job; trigger it when down. Returns figures for the run."""
    sibling = SIBLING[own_job]
    health = job_health(db, settings)[sibling]
    figures: dict[str, Any] = {"sibling": sibling, "sibling_state": health.state}
    if health.state != "down":
        return figures

    log.error(
        "job_overdue",
        extra={
            "job": sibling,
            "last_success_at": health.last_success_at,
            "age_s": health.age_s,
            "interval_s": health.interval_s,
            "grace_s": settings.job_grace_s,
            "watched_by": own_job,
        },
    )
    url = sibling_url(settings, sibling)
    if url is None:
        log.error("watchdog_cannot_trigger", extra={"job": sibling, "reason": "no URL"})
        return figures
    slot = current_slot(utcnow(), interval_of(settings, sibling))
    with db.transaction() as cur:
        task_id = outbox.enqueue(
            cur,
            tasks.service,
            url,
            {"kind": "watchdog", "job": sibling, "slot": slot.isoformat()},
            dedup_key=f"watchdog:{sibling}:{slot.isoformat()}",
            headers={"X-Trigger": "watchdog"},
        )
    figures["watchdog_triggered"] = task_id is not None
    if task_id is not None:
        figures["watchdog_delivered"] = tasks.deliver_due(ids=[task_id]).sent == 1
    return figures


def heartbeat_url(settings: Settings, job: str) -> str | None:
    if job == "check-threshold":
        return settings.heartbeat_url_check_threshold
    return settings.heartbeat_url_process


def ping(url: str | None, suffix: str = "") -> None:
    """Tell an external monitor; never let it fail the run."""
    if url is None:
        return
    try:
        requests.post(url + suffix, timeout=PING_TIMEOUT_S)
    except requests.RequestException as error:
        log.warning("heartbeat_ping_failed", extra={"error": type(error).__name__})
