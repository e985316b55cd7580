"""The micro-batch processor: converts pending crypto to USDT in micro-batches.

Its scheduled ``/check-threshold`` run and the swap callback arrive with
issue 3; for now it serves ``/health`` and ``/livez`` so the local system is
whole.
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
    config = load_config("microbatch", environ, secrets)
    return create_service_app(config, "gcmicrobatchprocessor")
