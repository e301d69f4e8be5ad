"""docs/openapi.json describes the HTTP API the service really serves: real requests, every answer checked."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator

from service import keys
from service.app import create_app
from tests.conftest import connect, make_settings, receive_json, subscribe, token_for, txn
from tests.openapi_document import OPENAPI, assert_response, document

# Served by the control-plane commands; exercised below once the app routes them.
CONTROL_PATHS = ("/api/v1/disconnect", "/api/v1/revoke", "/api/v1/unsubscribe")


def _template(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


class Recorder:
    """Sends real requests and checks each answer against the document."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client
        self.seen: set[tuple[str, str, int]] = set()

    async def call(
        self, method: str, path: str, url: str | None = None, *, token: str | None = None, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.client.request(method, url or path, headers=headers, **kwargs) as response:
            if response.content_type == "application/json":
                body: Any = await response.json()
            else:
                body = await response.text()
            assert_response(path, method, response.status, response.content_type, body)
            self.seen.add((path, method.lower(), response.status))
            return response.status, body


def test_document_is_openapi_3_1_with_valid_schemas() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0"
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                assert response["description"], (path, method, status)
                if int(status) >= 400:
                    # Every error is {"error", "message"}, whatever the endpoint.
                    schema = response["content"]["application/json"]["schema"]
                    assert schema in ({"$ref": "#/components/schemas/Error"}, {"$ref": "#/components/schemas/NotReady"})


def test_document_is_valid_openapi_3_1() -> None:
    default = (
        OPENAPI.parent.parent / ".cache" / "openapi-schemas-2.1.0" / "package" / "schemas" / "v3.1" / "schema.json"
    )
    path = Path(os.environ.get("EVA_WS_OPENAPI_SCHEMA", default))
    assert path.is_file(), (
        f"the OpenAPI 3.1 JSON Schema is missing at {path}: scripts/test fetches it "
        "(scripts/lib/browser.sh ensure_openapi_schema), or set EVA_WS_OPENAPI_SCHEMA"
    )
    errors = list(Draft202012Validator(json.loads(path.read_text())).iter_errors(document()))
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors]


def test_docs_link_to_the_document() -> None:
    readme = (OPENAPI.parent.parent / "README.md").read_text()
    assert "(docs/openapi.json)" in readme
    assert OPENAPI.resolve().is_file()


async def test_every_documented_endpoint_answers_as_documented(aiohttp_client: Any) -> None:
    settings = make_settings()
    app = create_app(settings)
    client: TestClient[Any, Any] = await aiohttp_client(app)
    api = Recorder(client)
    admin = token_for(settings, sub="root", customers=[], roles=["admin"])
    publisher = token_for(settings, sub="backend", customers=[], roles=["publisher"])
    alice = token_for(settings, sub="alice", customers=["C1"])

    assert (await api.call("GET", "/healthz"))[0] == 200
    assert (await api.call("GET", "/readyz"))[0] == 200
    assert (await api.call("GET", "/metrics"))[0] == 200
    status, served = await api.call("GET", "/api/v1/openapi.json")
    assert (status, served) == (200, document())

    ws = await connect(client, alice)
    assert (await subscribe(ws))["type"] == "subscribed"

    publish = "/api/v1/publish"
    event = {"type": "transaction_update", "data": txn()}
    assert (await api.call("POST", publish, token=publisher, json=event))[0] == 202
    assert (await receive_json(ws))["type"] == "transaction_update"
    assert (await api.call("POST", publish, token=publisher, json={"events": [event, event]}))[0] == 202
    assert (await api.call("POST", publish, token=publisher, data=b"{not json"))[1]["error"] == "invalid_json"
    assert (await api.call("POST", publish, token=publisher, json={"type": "x"}))[1]["error"] == "invalid_event"
    assert (await api.call("POST", publish, json=event))[0] == 401
    assert (await api.call("POST", publish, token=alice, json=event))[0] == 403
    assert (await api.call("POST", publish, token=publisher, data=b"x" * (2 * 1024 * 1024)))[0] == 413

    presence = "/api/v1/presence/{customerId}"
    status, body = await api.call("GET", presence, "/api/v1/presence/C1", token=alice)
    assert (status, [c["userId"] for c in body["connections"]]) == (200, ["alice"])
    assert (await api.call("GET", presence, "/api/v1/presence/C1", token=publisher))[0] == 200
    assert (await api.call("GET", presence, "/api/v1/presence/C%2A", token=alice))[0] == 400
    assert (await api.call("GET", presence, "/api/v1/presence/C1"))[0] == 401
    assert (await api.call("GET", presence, "/api/v1/presence/C2", token=alice))[0] == 403

    snapshot = "/api/v1/transactions/{customerId}"
    status, body = await api.call("GET", snapshot, "/api/v1/transactions/C1", token=alice)
    assert (status, [t["id"] for t in body["transactions"]], body["position"]["offset"]) == (200, ["T1"], 3)
    assert (await api.call("GET", snapshot, "/api/v1/transactions/C%2A", token=alice))[0] == 400
    assert (await api.call("GET", snapshot, "/api/v1/transactions/C1"))[0] == 401
    assert (await api.call("GET", snapshot, "/api/v1/transactions/C2", token=alice))[0] == 403

    channels = "/api/v1/channels"
    status, body = await api.call("GET", channels, token=admin)
    assert (status, body["channels"]) == (
        200,
        [{"channel": "transactions", "subscription": "transactions:C1", "subscribers": 1}],
    )
    assert (await api.call("GET", channels))[0] == 401
    assert (await api.call("GET", channels, token=publisher))[0] == 403

    connections = "/api/v1/connections"
    status, body = await api.call("GET", connections, f"{connections}?userId=alice", token=admin)
    assert (status, [c["userId"] for c in body["connections"]]) == (200, ["alice"])
    assert (await api.call("GET", connections, f"{connections}?customerId=C1&limit=1", token=admin))[0] == 200
    for query in ("", "?userId=alice&customerId=C1", "?userId=a*", "?userId=alice&limit=0"):
        status, body = await api.call("GET", connections, connections + query, token=admin)
        assert (status, body["error"]) == (400, "invalid_query"), query
    status, body = await api.call("GET", connections, f"{connections}?userId=alice&cursor=nope", token=admin)
    assert (status, body["error"]) == (400, "invalid_cursor")
    assert (await api.call("GET", connections, f"{connections}?userId=alice"))[0] == 401
    assert (await api.call("GET", connections, f"{connections}?userId=alice", token=alice))[0] == 403

    routed = {_template(r.canonical) for r in app.router.resources()}
    for path in CONTROL_PATHS:
        if _template(path) not in routed:
            continue
        assert (await api.call("POST", path, json={"userId": "nobody"}))[0] == 401
        assert (await api.call("POST", path, token=publisher, json={"userId": "nobody"}))[0] == 403
        assert (await api.call("POST", path, token=admin, data=b"{not json"))[0] == 400
    if set(CONTROL_PATHS) <= routed:
        for path, body in (
            ("/api/v1/disconnect", {"userId": "nobody"}),
            ("/api/v1/revoke", {"jti": "no-such-token"}),
            ("/api/v1/revoke", {"userId": "nobody", "issuedBefore": 1}),
            ("/api/v1/unsubscribe", {"userId": "nobody", "channel": "notifications"}),
        ):
            assert (await api.call("POST", path, token=admin, json=body))[0] == 202, path

    app[keys.LIFECYCLE].draining = True
    assert (await api.call("GET", "/readyz"))[0] == 503
    await ws.close()

    documented = {(path, method) for path, item in document()["paths"].items() for method in item}
    served = {(path, method) for path, method in documented if _template(path) in routed}
    exercised = {(path, method) for path, method, _ in api.seen}
    assert served - exercised == set(), "documented and served, but not exercised"
    # Only the control commands may be documented ahead of the code that serves them.
    assert {path for path, _ in documented - served} <= set(CONTROL_PATHS)
    for path, method in served:
        statuses = {status for p, m, status in api.seen if (p, m) == (path, method)}
        assert any(s < 300 for s in statuses), f"{method} {path}: no success exercised"
        if path not in ("/healthz", "/metrics", "/api/v1/openapi.json"):
            assert any(s >= 400 for s in statuses), f"{method} {path}: no error exercised"


@pytest.mark.parametrize("prefix", ["/api/", "/healthz", "/readyz", "/metrics"])
def test_every_served_http_route_is_documented(prefix: str) -> None:
    app = create_app(make_settings())
    paths = {_template(p) for p in document()["paths"]}
    for resource in app.router.resources():
        if resource.canonical.startswith(prefix):
            assert _template(resource.canonical) in paths, (
                f"{resource.canonical} is served but not in docs/openapi.json"
            )


async def test_error_of_an_unknown_api_path_is_json(aiohttp_client: Any) -> None:
    client = await aiohttp_client(create_app(make_settings()))
    async with client.get("/api/v1/nothing-here") as response:
        assert response.status == 404
        body = await response.json()
    assert set(body) == {"error", "message"}
