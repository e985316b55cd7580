"""``payoutctl smoke`` against the real apps, served over real HTTP.

The ID tokens come from a fake token source; everything else is what runs
after a deploy: a GET of each service's /health, judged on its answer.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner, Result
from flask import Flask
from payout_support import close_app, make_batch_app

from shared.cli import Runtime, main

VERSION = "2024.06.1-abc123"


class Tokens:
    """Hands out a token per audience and remembers whom it was for."""

    def __init__(self) -> None:
        self.audiences: list[str] = []

    def __call__(self, audience: str) -> str:
        self.audiences.append(audience)
        return f"id-token-for-{audience}"


class Recording:
    """WSGI middleware keeping each request's Authorization header."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.authorizations: list[str | None] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.authorizations.append(environ.get("HTTP_AUTHORIZATION"))
        return self.app(environ, start_response)


@pytest.fixture
def apps(
    make_accumulator: Callable[..., Flask],
    make_microbatch: Callable[..., Flask],
    database_url: str,
) -> Iterator[Callable[[str], dict[str, Flask]]]:
    made: list[Flask] = []

    def make(version: str) -> dict[str, Flask]:
        found = {
            "gcaccumulator": make_accumulator(APP_VERSION=version),
            "gcmicrobatchprocessor": make_microbatch(APP_VERSION=version),
            "gcbatchprocessor": make_batch_app(database_url, APP_VERSION=version),
        }
        made.extend(found.values())
        return found

    yield make
    for app in made:
        close_app(app)


def free_port_with_nothing_on_it() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def smoke(urls: dict[str, str], version: str, tokens: Tokens) -> Result:
    runtime = Runtime()
    runtime.token_source = tokens
    args = ["smoke", "--expect-version", version, "--timeout", "5"]
    for name, url in urls.items():
        args += ["--url", f"{name}={url}"]
    return CliRunner().invoke(main, args, obj=runtime)


def test_every_service_at_the_deployed_version_passes_with_a_token_for_its_url(
    apps: Callable[[str], dict[str, Flask]], serve: Any
) -> None:
    recorders = {name: Recording(app) for name, app in apps(VERSION).items()}
    urls = {name: serve(recorder) for name, recorder in recorders.items()}
    tokens = Tokens()

    result = smoke(urls, VERSION, tokens)

    assert result.exit_code == 0, result.output
    assert "smoke: all 3 service(s) healthy" in result.output
    for name, url in urls.items():
        assert f"{name}: ok (status ok, version {VERSION})" in result.output
        assert recorders[name].authorizations == [f"Bearer id-token-for-{url}"]
    assert tokens.audiences == list(urls.values())
    assert "id-token-for" not in result.output


def test_a_service_at_another_version_fails_and_is_named(
    apps: Callable[[str], dict[str, Flask]], serve: Any
) -> None:
    current = apps(VERSION)
    current["gcbatchprocessor"] = apps("2024.05.9-old")["gcbatchprocessor"]
    urls = {name: serve(app) for name, app in current.items()}

    result = smoke(urls, VERSION, Tokens())

    assert result.exit_code == 1
    assert (
        f"gcbatchprocessor: FAILED: version is '2024.05.9-old', expected '{VERSION}'"
        in result.output
    )
    assert "gcaccumulator: ok" in result.output
    assert "smoke: 1 of 3 failed: gcbatchprocessor" in result.output


def test_a_service_that_is_down_fails_and_is_named(
    apps: Callable[[str], dict[str, Flask]], serve: Any
) -> None:
    running = apps(VERSION)
    urls = {
        name: serve(running[name]) for name in ("gcaccumulator", "gcbatchprocessor")
    }
    urls["gcmicrobatchprocessor"] = f"http://127.0.0.1:{free_port_with_nothing_on_it()}"

    result = smoke(urls, VERSION, Tokens())

    assert result.exit_code == 1
    assert "gcmicrobatchprocessor: FAILED: unreachable" in result.output
    assert "smoke: 1 of 3 failed: gcmicrobatchprocessor" in result.output


def test_a_url_serving_another_service_fails(
    apps: Callable[[str], dict[str, Flask]], serve: Any
) -> None:
    url = serve(apps(VERSION)["gcaccumulator"])

    result = smoke({"gcbatchprocessor": url}, VERSION, Tokens())

    assert result.exit_code == 1
    assert "gcbatchprocessor: FAILED: it says it is 'gcaccumulator'" in result.output


def test_a_token_that_cannot_be_had_fails_without_calling(
    apps: Callable[[str], dict[str, Flask]], serve: Any
) -> None:
    recorder = Recording(apps(VERSION)["gcaccumulator"])
    url = serve(recorder)

    def no_credentials(audience: str) -> str:
        raise RuntimeError("no default credentials")

    runtime = Runtime()
    runtime.token_source = no_credentials
    result = CliRunner().invoke(
        main,
        ["smoke", "--url", f"gcaccumulator={url}", "--expect-version", VERSION],
        obj=runtime,
    )

    assert result.exit_code == 1
    assert f"gcaccumulator: FAILED: no ID token for {url}" in result.output
    assert recorder.authorizations == []


def test_a_service_answering_503_fails(serve: Any) -> None:
    app = Flask("down")

    @app.get("/health")
    def health() -> tuple[dict[str, str], int]:
        return {"status": "down", "service": "gcaccumulator", "version": VERSION}, 503

    url = serve(app)

    result = smoke({"gcaccumulator": url}, VERSION, Tokens())

    assert result.exit_code == 1
    assert "gcaccumulator: FAILED: HTTP 503 (status 'down')" in result.output
