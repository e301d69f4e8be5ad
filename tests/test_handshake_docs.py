"""Every refusal a real handshake answers with is in docs/protocol.md's handshake table."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

import aiohttp

from service import keys
from tests.conftest import AppClient, connect, token_for

PROTOCOL_DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def _documented_refusals() -> set[tuple[int, str]]:
    """(status, error) of each row of the table after 'A refused handshake gets an HTTP error'."""
    text = PROTOCOL_DOC.read_text()
    table = text[text.index("A refused handshake gets an HTTP error") :].split("\n\n")[1]
    return {(int(status), error) for status, error in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", table, re.M)}


def _upgrade_headers(version: str = "13") -> dict[str, str]:
    return {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": version,
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }


async def test_every_handshake_refusal_is_in_the_protocol_docs(app_client: AppClient):
    client = await app_client(max_connections_per_user="1")
    settings = client.app[keys.SETTINGS]
    token = token_for(settings)
    url = f"/ws/transactions?token={token}"
    refusals: set[tuple[int, str]] = set()

    async def refusal(response: aiohttp.ClientResponse) -> None:
        refusals.add((response.status, (await response.json())["error"]))

    await refusal(await client.get("/ws/transactions", headers=_upgrade_headers()))
    await refusal(await client.get(url, headers={**_upgrade_headers(), "Origin": "https://evil.example"}))
    await refusal(await client.get(url))
    await refusal(await client.get(url, headers=_upgrade_headers(version="8")))
    first = await connect(client, token)
    await refusal(await client.get(url, headers=_upgrade_headers()))
    await first.close()
    client.app[keys.LIFECYCLE].draining = True
    await refusal(await client.get(url, headers=_upgrade_headers()))

    assert {status for status, _ in refusals} == {400, 401, 403, 426, 429, 503}
    assert refusals <= _documented_refusals()
