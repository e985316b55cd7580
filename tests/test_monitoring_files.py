"""The alerting-as-code files: well formed, consistent, and about real events."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "scripts" / "monitoring"
SOURCE = "\n".join(
    path.read_text()
    for package in (
        "shared",
        "gcaccumulator",
        "gcbatchprocessor",
        "gcmicrobatchprocessor",
    )
    for path in (ROOT / package).rglob("*.py")
)
SERVICES = {"gcaccumulator", "gcbatchprocessor", "gcmicrobatchprocessor"}


def load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((MONITORING / f"{name}.json").read_text())
    return data


def messages_in(filter_text: str) -> set[str]:
    """The log messages (event names) a Cloud Logging filter matches on."""
    found: set[str] = set()
    for clause in re.findall(
        r"jsonPayload\.message=\(?([^)]*?)\)?(?: AND|$)", filter_text
    ):
        found |= set(re.findall(r'"([a-z_]+)"', clause))
    return found


def test_every_log_metric_matches_events_the_code_really_logs() -> None:
    metrics = load("log_metrics")

    assert {metric["name"] for metric in metrics} >= {
        "payouts-job-overdue",
        "payouts-run-failed",
    }
    for metric in metrics:
        assert metric["description"]
        assert "severity>=ERROR" in metric["filter"]
        assert metric["metricDescriptor"]["metricKind"] == "DELTA"
        events = messages_in(metric["filter"])
        assert events, metric["name"]
        for event in events:
            # Each is logged as a constant message somewhere in the suite.
            assert f'"{event}"' in SOURCE, f"{metric['name']}: {event} is never logged"


def test_the_overdue_metric_matches_exactly_the_watchdogs_line() -> None:
    [metric] = [m for m in load("log_metrics") if m["name"] == "payouts-job-overdue"]

    assert messages_in(metric["filter"]) == {"job_overdue"}
    assert metric["labelExtractors"]["job"] == "EXTRACT(jsonPayload.job)"


@pytest.mark.parametrize(
    "policy", load("alert_policies"), ids=lambda p: p["displayName"]
)
def test_each_alert_policy_is_complete_and_tells_the_operator_what_to_do(
    policy: dict[str, Any],
) -> None:
    metric_names = {metric["name"] for metric in load("log_metrics")}

    assert policy["severity"] in {"CRITICAL", "ERROR", "WARNING"}
    assert policy["notificationChannels"] == ["${NOTIFICATION_CHANNEL}"]
    assert policy["conditions"]
    for condition in policy["conditions"]:
        threshold = condition["conditionThreshold"]
        metric_type = re.search(r'metric\.type="([^"]+)"', threshold["filter"])
        assert metric_type is not None
        user = metric_type.group(1).removeprefix("logging.googleapis.com/user/")
        if metric_type.group(1).startswith("logging.googleapis.com/user/"):
            assert user in metric_names
        else:
            assert metric_type.group(1).startswith(
                "monitoring.googleapis.com/uptime_check/"
            )
        assert threshold["comparison"] == "COMPARISON_GT"
    runbook = policy["documentation"]["content"]
    assert "payoutctl" in runbook or "/health" in runbook


def test_every_log_metric_has_an_alert_policy() -> None:
    alerted = {
        match
        for policy in load("alert_policies")
        for condition in policy["conditions"]
        for match in re.findall(
            r"logging.googleapis.com/user/([a-z-]+)",
            condition["conditionThreshold"]["filter"],
        )
    }

    assert alerted == {metric["name"] for metric in load("log_metrics")}


def test_each_service_has_an_authenticated_uptime_check_on_health() -> None:
    checks = load("uptime_checks")

    assert {check["displayName"].split()[1] for check in checks} == SERVICES
    for check in checks:
        http = check["httpCheck"]
        assert http["path"] == "/health"
        assert http["useSsl"] is True
        assert http["serviceAgentAuthentication"] == {"type": "OIDC_TOKEN"}
        # 503 (a job down, the database unreachable) is a failed check.
        assert http["acceptedResponseStatusCodes"] == [
            {"statusClass": "STATUS_CLASS_2XX"}
        ]
        assert check["monitoredResource"]["type"] == "uptime_url"
