"""The OpenAPI documents in ``openapi/``: valid, loadable, and complete.

Each service's document must list exactly the routes its Flask app serves,
so a route added without documentation (or documented but gone) fails
here. What the routes answer is checked against the documents by
test_schemathesis.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from conftest import base_environ
from flask import Flask
from openapi_spec_validator import validate
from schemathesis.core.result import Err

OPENAPI = Path(__file__).resolve().parent.parent / "openapi"
SERVICES = ["gcaccumulator", "gcmicrobatchprocessor", "gcbatchprocessor"]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Werkzeug answers these for every rule by itself; no document lists them.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}

BATCH_ENV = {
    "SERVICE_URL": "http://batch.test",
    "PAYOUT_EXECUTOR_URL": "http://executor.test/payouts",
    "MICRO_BATCH_PROCESSOR_URL": "http://microbatch.test",
}


def document_path(name: str) -> Path:
    return OPENAPI / f"{name}.yaml"


def load_document(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(document_path(name).read_text())
    return document


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield method.upper(), path, operation


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: ``/x/<int:id>`` is ``/x/{id}``."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def served_routes(app: Flask) -> set[tuple[str, str]]:
    return {
        (method, openapi_path(rule.rule))
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or set()) - IMPLICIT_METHODS
    }


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for method, path, _ in operations(document)}


@pytest.fixture
def make_app(
    database_url: str,
    make_accumulator: Callable[..., Flask],
    make_microbatch: Callable[..., Flask],
) -> Iterator[Callable[[str], Flask]]:
    made: list[Flask] = []

    def make(service: str) -> Flask:
        if service == "gcaccumulator":
            app = make_accumulator()
        elif service == "gcmicrobatchprocessor":
            app = make_microbatch()
        else:
            from gcbatchprocessor.app import create_app

            app = create_app(environ=base_environ(database_url, **BATCH_ENV))
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["suite"].db.close()


@pytest.mark.parametrize("name", [*SERVICES, "common"])
def test_each_document_is_valid_openapi_with_every_reference_resolved(
    name: str,
) -> None:
    path = document_path(name)
    validate(load_document(name), base_uri=path.as_uri())


@pytest.mark.parametrize("service", SERVICES)
def test_schemathesis_loads_every_operation_of_each_document(service: str) -> None:
    schema = schemathesis.openapi.from_path(document_path(service))
    results = list(schema.get_all_operations())
    errors = [str(result.err()) for result in results if isinstance(result, Err)]

    assert errors == []
    loaded = {
        (operation.method.upper(), operation.path)
        for operation in (result.ok() for result in results)
    }
    assert loaded == documented_routes(load_document(service))


@pytest.mark.parametrize("service", SERVICES)
def test_each_document_lists_exactly_the_routes_its_app_serves(
    service: str, make_app: Callable[[str], Flask]
) -> None:
    app = make_app(service)

    assert served_routes(app) == documented_routes(load_document(service))


def test_a_route_added_without_documentation_is_caught(
    make_app: Callable[[str], Flask],
) -> None:
    app = make_app("gcaccumulator")
    app.add_url_rule("/refunds/<int:refund_id>", "refund", lambda refund_id: "")

    missing = served_routes(app) - documented_routes(load_document("gcaccumulator"))

    assert missing == {("GET", "/refunds/{refund_id}")}


@pytest.mark.parametrize("service", SERVICES)
def test_every_operation_documents_its_refusals_and_server_errors(
    service: str,
) -> None:
    """Bad input is 4xx, a retry-worthy failure 5xx: each is documented."""
    document = load_document(service)
    for method, path, operation in operations(document):
        statuses = set(operation["responses"])
        assert "500" in statuses, (method, path)
        if operation.get("security", document.get("security")):
            assert "401" in statuses, (method, path)
        if method == "POST":
            assert {"400", "503"} <= statuses, (method, path)


@pytest.mark.parametrize("service", SERVICES)
def test_internal_endpoints_require_the_bearer_scheme_and_probes_none(
    service: str,
) -> None:
    document = load_document(service)
    public = {("POST", "/ipn"), ("GET", "/health"), ("GET", "/livez")}
    for method, path, operation in operations(document):
        expected = [] if (method, path) in public else [{"internalBearer": []}]
        assert operation.get("security") == expected, (method, path)
