"""docs/openapi.json, loaded once, and an assertion that a real HTTP response conforms to it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Final

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

OPENAPI: Final = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
_URI: Final = "urn:eva-ws:openapi"


@functools.cache
def document() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(OPENAPI.read_text())
    return result


@functools.cache
def _registry() -> Registry[Any]:
    return Registry().with_resource(_URI, Resource.from_contents(document(), default_specification=DRAFT202012))


def _pointer(*parts: str) -> str:
    return "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


def response_validator(path: str, method: str, status: int, content_type: str) -> Draft202012Validator:
    """The schema the document gives for this answer; AssertionError if it documents none."""
    operation = document()["paths"].get(path, {}).get(method.lower())
    assert operation is not None, f"{method} {path} is not documented"
    response = operation["responses"].get(str(status))
    assert response is not None, f"{method} {path} answered {status}, which is not documented"
    assert content_type in response["content"], f"{method} {path} {status}: {content_type} is not documented"
    ref = f"{_URI}#/" + _pointer("paths", path, method.lower(), "responses", str(status), "content", content_type)
    return Draft202012Validator({"$ref": ref + "/schema"}, registry=_registry())


def assert_response(path: str, method: str, status: int, content_type: str, body: Any) -> None:
    errors = list(response_validator(path, method, status, content_type).iter_errors(body))
    assert not errors, f"{method} {path} {status} does not match docs/openapi.json: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors
    )
