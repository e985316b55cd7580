"""A sandbox swap and payout executor for the local system and the demo.

It stands in for the two executor services outside the suite: it accepts
swap and payout tasks over HTTP (``POST /tasks``, internal bearer token,
``Idempotency-Key``), answers at once, and later calls the task's
``callback_url`` the way the real executors do, after a simulated delay.

Knobs (environment):

- ``SANDBOX_PORT`` (8084), ``INTERNAL_AUTH_TOKEN``
- ``SANDBOX_DELAY_S`` seconds before a callback (1.0), ``SANDBOX_JITTER_S`` (0.5)
- ``SANDBOX_ETH_USDT`` USDT per unit of crypto swapped (3400), less
  ``SANDBOX_SLIPPAGE_PERCENT`` (0.5)
- ``SANDBOX_FAIL_PERCENT`` share of tasks that fail (0)
- ``SANDBOX_DUPLICATE_PERCENT`` share of callbacks delivered twice (0)
- ``SANDBOX_PRICES`` USD price of payout currencies, ``usdt=1,eth=3400,shib=0.00001``

A task seen again under the same ``Idempotency-Key`` is acknowledged and
not executed twice, as the real executors promise. Amounts are Decimal
throughout; the randomness only decides failure, duplication and delay.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import random
import threading
import time
from decimal import ROUND_DOWN, Decimal, localcontext
from typing import Any

import requests
from flask import Flask, Response, jsonify, request

from shared import logging as suite_logging
from shared import money

log = logging.getLogger("payouts.sandbox")


def _decimal_env(name: str, default: str) -> Decimal:
    return Decimal(os.environ.get(name, default).strip() or default)


def _prices(text: str) -> dict[str, Decimal]:
    prices = {}
    for part in text.split(","):
        currency, _, price = part.partition("=")
        prices[currency.strip().lower()] = Decimal(price.strip())
    return prices


class Sandbox:
    def __init__(self) -> None:
        self.token = os.environ.get("INTERNAL_AUTH_TOKEN", "").strip()
        self.delay_s = _decimal_env("SANDBOX_DELAY_S", "1.0")
        self.jitter_s = _decimal_env("SANDBOX_JITTER_S", "0.5")
        self.rate = _decimal_env("SANDBOX_ETH_USDT", "3400")
        self.slippage = _decimal_env("SANDBOX_SLIPPAGE_PERCENT", "0.5")
        self.fail_percent = _decimal_env("SANDBOX_FAIL_PERCENT", "0")
        self.duplicate_percent = _decimal_env("SANDBOX_DUPLICATE_PERCENT", "0")
        self.prices = _prices(
            os.environ.get("SANDBOX_PRICES", "usdt=1,usdc=1,eth=3400,shib=0.00001")
        )
        self.seen: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.random = random.Random(os.environ.get("SANDBOX_SEED"))

    def _chance(self, percent: Decimal) -> bool:
        return Decimal(self.random.randrange(10_000)) < percent * 100

    def outcome(self, task: dict[str, Any]) -> dict[str, Any]:
        """The callback body for a task, decided once per task."""
        failed = self._chance(self.fail_percent)
        if task["kind"] == "swap":
            return self._swap(task, failed)
        return self._payout(task, failed)

    def _swap(self, task: dict[str, Any], failed: bool) -> dict[str, Any]:
        swap_id = "sandbox-swap-" + task["batch_conversion_id"][:8]
        if failed:
            return {
                "batch_conversion_id": task["batch_conversion_id"],
                "swap_id": swap_id,
                "tx_hash": None,
                "status": "failed",
                "actual_usdt_received": None,
            }
        gross = money.multiply(Decimal(task["from_amount"]), self.rate)
        received = gross - money.percent_of(gross, self.slippage, money.USDT)
        received = received.quantize(money.USDT.unit, rounding=ROUND_DOWN)
        return {
            "batch_conversion_id": task["batch_conversion_id"],
            "swap_id": swap_id,
            "tx_hash": "0x" + os.urandom(32).hex(),
            "status": "completed",
            "actual_usdt_received": money.to_text(received),
        }

    def _payout(self, task: dict[str, Any], failed: bool) -> dict[str, Any]:
        if failed:
            return {
                "batch_id": task["batch_id"],
                "status": "failed",
                "tx_hash": None,
                "amount_usdt": None,
                "amount_sent": None,
                "currency": task["payout_currency"],
            }
        amount_usdt = Decimal(task["amount_usdt"])
        price = self.prices.get(task["payout_currency"], Decimal(1))
        with localcontext() as ctx:
            # Millions of USDT in a token worth 10^-5 USD, to 18 decimals,
            # is more digits than the default context holds.
            ctx.prec = 60
            sent = money.divide(amount_usdt, price).quantize(
                money.CRYPTO.unit, rounding=ROUND_DOWN
            )
        return {
            "batch_id": task["batch_id"],
            "status": "completed",
            "tx_hash": "0x" + os.urandom(32).hex(),
            "amount_usdt": task["amount_usdt"],
            "amount_sent": money.to_text(sent),
            "currency": task["payout_currency"],
        }

    def delay(self) -> float:
        jitter = self.jitter_s * Decimal(self.random.random())
        return float(self.delay_s + jitter)  # a timer's seconds, not money

    def call_back(self, url: str, body: dict[str, Any], times: int) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        for _ in range(times):
            for attempt in range(6):
                try:
                    response = requests.post(
                        url, json=body, headers=headers, timeout=10
                    )
                except requests.RequestException as error:
                    log.warning("sandbox_callback_failed", extra={"error": str(error)})
                else:
                    log.info(
                        "sandbox_called_back",
                        extra={**body, "url": url, "http_status": response.status_code},
                    )
                    if response.status_code < 500:
                        break
                time.sleep(2**attempt)


def create_app() -> Flask:
    suite_logging.configure("sandbox-executor", os.environ.get("LOG_LEVEL", "INFO"))
    sandbox = Sandbox()
    app = Flask("sandbox-executor")

    @app.get("/livez")
    def livez() -> Response:
        return jsonify({"status": "ok"})

    @app.post("/tasks")
    def accept() -> tuple[Response, int]:
        header = request.headers.get("Authorization", "")
        presented = header.removeprefix("Bearer ").strip().encode()
        if not sandbox.token or not hmac.compare_digest(
            presented, sandbox.token.encode()
        ):
            return jsonify(
                {"error": {"code": "unauthorized", "message": "bad token"}}
            ), 401
        task = json.loads(request.get_data() or b"{}", parse_float=Decimal)
        key = request.headers.get("Idempotency-Key", "")
        if task.get("kind") not in ("swap", "payout") or not key:
            message = "a swap or payout task with an Idempotency-Key"
            return jsonify({"error": {"code": "invalid", "message": message}}), 400
        with sandbox.lock:
            if key in sandbox.seen:
                return jsonify({"accepted": True, "repeat": True}), 200
            body = sandbox.outcome(task)
            sandbox.seen[key] = body
        times = 2 if sandbox._chance(sandbox.duplicate_percent) else 1
        timer = threading.Timer(
            sandbox.delay(), sandbox.call_back, (task["callback_url"], body, times)
        )
        timer.daemon = True
        timer.start()
        log.info("sandbox_task_accepted", extra={"kind": task["kind"], "key": key})
        return jsonify({"accepted": True}), 202

    return app
