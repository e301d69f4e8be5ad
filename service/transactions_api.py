"""GET /api/v1/transactions/{customerId}: a customer's transactions as a snapshot, for rendering before subscribing."""

from __future__ import annotations

import orjson
from aiohttp import web

from service import keys
from service.auth import AuthError, authorize_subscription, token_from_request
from service.broker.base import BrokerUnavailable
from service.http_errors import json_error
from service.log import get_logger
from service.protocol import Channel, ClientMessage, ErrorCode, Filters, ProtocolError, is_valid_id, position_json

log = get_logger("eva_ws.transactions_api")


async def transactions(request: web.Request) -> web.Response:
    """The state `"snapshot": true` sends, authorized like that subscribe; subscribe with `since` its position."""
    token = token_from_request(request)
    if token is None:
        return json_error(401, "unauthorized", "a token is required (?token= or Authorization: Bearer)")
    try:
        principal = await request.app[keys.VERIFIER].verify(token)
    except AuthError as error:
        return json_error(401, error.error, error.message)
    customer_id = request.match_info["customer_id"]
    if not is_valid_id(customer_id):
        return json_error(400, "invalid_customer", "not a valid customer id")
    try:
        key, _ = authorize_subscription(
            principal,
            ClientMessage(type="subscribe", channel=Channel.TRANSACTIONS, filters=Filters(customer_id=customer_id)),
        )
    except ProtocolError as error:
        if error.code is ErrorCode.FORBIDDEN:
            return json_error(403, "forbidden", "not allowed to see this customer")
        raise
    try:
        snapshot = await request.app[keys.HUB].read_snapshot(key)
    except BrokerUnavailable as error:
        log.warning("snapshot_unavailable", channel=key, error=str(error))
        return json_error(503, "unavailable", "the transactions cannot be read right now; retry")
    body = {
        "customerId": customer_id,
        "subscription": key,
        "position": position_json(snapshot.position),
        "transactions": [t.encoded for t in snapshot.transactions],
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")
