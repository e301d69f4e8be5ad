"""Cross-site WebSocket hijacking: only the listed origins, matched exactly, may open a socket from a browser."""

from __future__ import annotations

import pytest

from service.config import ConfigError
from tests.conftest import make_settings, token_for


async def _status(client, settings, origin: str | None) -> int:
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    if origin is not None:
        headers["Origin"] = origin
    response = await client.get(f"/ws/transactions?token={token_for(settings)}", headers=headers)
    response.release()
    return response.status


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com:8443",  # port mismatch
        "https://app.example.com:443",  # browsers omit the default port; a listed origin is matched as written
        "http://app.example.com",  # scheme mismatch
        "wss://app.example.com",
        "https://app.example.com.",  # trailing dot
        "https://app.example.com/",
        "https://app.example.com.evil.example",  # look-alike suffix
        "https://evilapp.example.com",
        "https://app-example.com",
        "https://evil.example#https://app.example.com",
        "https://app.example.com, https://evil.example",
        "*",
        "null",
        "",
    ],
)
async def test_foreign_and_look_alike_origins_get_403(app_client, origin):
    settings = make_settings()
    client = await app_client(settings)
    assert await _status(client, settings, origin) == 403


@pytest.mark.parametrize("origin", ["https://app.example.com", "HTTPS://APP.EXAMPLE.COM", "https://App.Example.Com"])
async def test_listed_origin_matches_in_any_case(app_client, origin):
    # Scheme and host are case-insensitive (RFC 6454); browsers send them in lower case.
    settings = make_settings()
    client = await app_client(settings)
    assert await _status(client, settings, origin) == 101


async def test_port_is_part_of_the_origin(app_client):
    settings = make_settings(allowed_origins="https://app.example.com:8443")
    client = await app_client(settings)
    assert await _status(client, settings, "https://app.example.com:8443") == 101
    assert await _status(client, settings, "https://app.example.com") == 403


async def test_star_allows_every_origin(app_client):
    settings = make_settings(allowed_origins="*")
    client = await app_client(settings)
    assert await _status(client, settings, "https://anything.example") == 101


async def test_no_origin_list_refuses_every_browser(app_client):
    settings = make_settings(allowed_origins="")
    client = await app_client(settings)
    assert await _status(client, settings, "https://app.example.com") == 403
    assert await _status(client, settings, None) == 101  # a non-browser client with a token


async def test_foreign_origin_is_refused_before_the_token_is_looked_at(app_client):
    settings = make_settings()
    client = await app_client(settings)
    response = await client.get(
        "/ws/transactions?token=garbage",
        headers={"Upgrade": "websocket", "Connection": "Upgrade", "Origin": "https://evil.example"},
    )
    assert response.status == 403


@pytest.mark.parametrize(
    "value",
    ["https://*.example.com", "app.example.com", "https://app.example.com/path", "ftp://app.example.com"],
)
def test_origin_patterns_and_non_origins_refuse_to_start(value):
    with pytest.raises(ConfigError):
        make_settings(allowed_origins=value)
