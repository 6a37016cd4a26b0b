"""The cloud's side of the relay, for development, the demo and tests.

`send_action`: the sender role on the actions hybrid connection (one action, its reply).
`acknowledge`: a conversation for a listener on the events hybrid connection that records each
envelope and acknowledges it, as the Manage Breast Screening service does.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from trio_websocket import ConnectionClosed, WebSocketConnection

from appliance.relay.sas import make_token, resource_uri
from appliance.relay.websocket import open_websocket


async def send_action(
    endpoint: str, namespace: str, path: str, key_name: str, key: bytes, text: str
) -> str:
    token = make_token(resource_uri(namespace, path), key_name, key, int(time.time() + 300))
    query = urllib.parse.urlencode({"sb-hc-action": "connect", "sb-hc-token": token})
    async with open_websocket(
        f"{endpoint.rstrip('/')}/$hc/{path}?{query}", max_message_size=16 << 20
    ) as ws:
        await ws.send_message(text)
        reply = await ws.get_message()
    return reply if isinstance(reply, str) else reply.decode()


def acknowledge(
    record: Callable[[dict[str, Any]], Awaitable[None] | None],
) -> Callable[[WebSocketConnection], Awaitable[None]]:
    async def conversation(ws: WebSocketConnection) -> None:
        try:
            while True:
                envelope = json.loads(await ws.get_message())
                outcome = record(envelope)
                if outcome is not None:
                    await outcome
                await ws.send_message(json.dumps({"ack": envelope["event_id"]}))
        except ConnectionClosed:
            return

    return conversation
