"""A local stand-in for Cloud Scheduler.

Every ``CHECK_THRESHOLD_INTERVAL_S`` / ``PROCESS_INTERVAL_S`` seconds,
aligned to the interval as a unix-cron schedule is, it sends what Cloud
Scheduler sends: ``POST`` with ``X-CloudScheduler: true``, the job name in
``X-CloudScheduler-JobName``, the slot in ``X-CloudScheduler-ScheduleTime``,
Cloud Scheduler's user agent, and the internal bearer token (OIDC in the
cloud). A failed attempt is retried a few times within the slot, as a job's
retry config would.

``LOCAL_SCHEDULER_JOBS`` chooses the jobs (``check-threshold,process``):
leaving one out replays the incident of a scheduler job that stopped firing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import UTC, datetime

import requests

from shared import logging as suite_logging

log = logging.getLogger("payouts.scheduler")


def _job_table() -> dict[str, tuple[str, int]]:
    return {
        "check-threshold": (
            os.environ.get("MICRO_BATCH_PROCESSOR_URL", "http://127.0.0.1:8083")
            + "/check-threshold",
            int(os.environ.get("CHECK_THRESHOLD_INTERVAL_S", "300")),
        ),
        "process": (
            os.environ.get("BATCH_PROCESSOR_URL", "http://127.0.0.1:8082") + "/process",
            int(os.environ.get("PROCESS_INTERVAL_S", "300")),
        ),
    }


def fire(job: str, url: str, slot: datetime, token: str) -> int:
    headers = {
        "X-CloudScheduler": "true",
        "X-CloudScheduler-JobName": f"local-{job}",
        "X-CloudScheduler-ScheduleTime": slot.isoformat().replace("+00:00", "Z"),
        "User-Agent": "Google-Cloud-Scheduler",
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/octet-stream",
    }
    for attempt in range(4):
        try:
            response = requests.post(url, headers=headers, data=b"", timeout=120)
        except requests.RequestException as error:
            log.warning(
                "scheduler_attempt_failed", extra={"job": job, "error": str(error)}
            )
        else:
            level = logging.INFO if response.status_code < 400 else logging.WARNING
            log.log(
                level,
                "scheduler_fired",
                extra={"job": job, "slot": slot, "status": response.status_code},
            )
            if response.status_code < 500:
                return response.status_code
        time.sleep(min(30, 2**attempt))
    return 0


def run_job(
    job: str, url: str, interval_s: int, token: str, stop: threading.Event
) -> None:
    while not stop.is_set():
        now = time.time()
        next_slot = now - now % interval_s + interval_s
        if stop.wait(next_slot - now):
            return
        fire(job, url, datetime.fromtimestamp(next_slot, tz=UTC), token)


def main() -> None:
    suite_logging.configure("local-scheduler", os.environ.get("LOG_LEVEL", "INFO"))
    token = os.environ["INTERNAL_AUTH_TOKEN"].strip()
    chosen = os.environ.get("LOCAL_SCHEDULER_JOBS", "check-threshold,process")
    jobs = _job_table()
    stop = threading.Event()
    threads = []
    for job in (name.strip() for name in chosen.split(",") if name.strip()):
        url, interval_s = jobs[job]
        log.info(
            "scheduler_job", extra={"job": job, "url": url, "interval_s": interval_s}
        )
        thread = threading.Thread(
            target=run_job, args=(job, url, interval_s, token, stop), daemon=True
        )
        thread.start()
        threads.append(thread)
    try:
        while any(thread.is_alive() for thread in threads):
            time.sleep(1)
    except KeyboardInterrupt:
        stop.set()


if __name__ == "__main__":
    main()
