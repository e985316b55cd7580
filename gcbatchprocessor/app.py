"""The batch processor: pays each client once converted USDT reaches its threshold.

Its scheduled ``/process`` run and the payout callback arrive with issue 4;
for now it serves ``/health`` and ``/livez`` so the local system is whole.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import Flask

from shared.config import load_config
from shared.secrets import SecretSource
from shared.web import create_service_app


def create_app(
    environ: Mapping[str, str] | None = None, secrets: SecretSource | None = None
) -> Flask:
    config = load_config("batch", environ, secrets)
    return create_service_app(config, "gcbatchprocessor")
