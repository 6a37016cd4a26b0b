"""Client WebSockets for the relay, over TCP streams we own.

trio-websocket's `open_websocket_url` (0.12) leaves the socket open when the server rejects
the handshake: a listener retrying against a 401 or 404 would leak one descriptor per attempt.
Here the stream is opened by us and closed whatever happens; trio-websocket only speaks the
protocol over it.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.parse
from collections.abc import AsyncIterator

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto.utilities import LocalProtocolError

from appliance import errors


@contextlib.asynccontextmanager
async def open_websocket(
    url: str,
    *,
    max_message_size: int,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 2.0,
) -> AsyncIterator[WebSocketConnection]:
    target = urllib.parse.urlsplit(url)
    secure = target.scheme == "wss"
    host = target.hostname or ""
    port = target.port or (443 if secure else 80)
    with trio.fail_after(connect_timeout):
        if secure:
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl.create_default_context()
            )
        else:
            stream = await trio.open_tcp_stream(host, port)
    async with (
        stream,
        websocket_over(
            stream,
            url,
            max_message_size=max_message_size,
            connect_timeout=connect_timeout,
            disconnect_timeout=disconnect_timeout,
        ) as connection,
    ):
        yield connection


@contextlib.asynccontextmanager
async def websocket_over(
    stream: trio.abc.Stream,
    url: str,
    *,
    max_message_size: int,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 2.0,
) -> AsyncIterator[WebSocketConnection]:
    """The WebSocket protocol over a stream the caller owns (and closes)."""
    target = urllib.parse.urlsplit(url)
    resource = target.path + (f"?{target.query}" if target.query else "")
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                connection = await wrap_client_stream(
                    nursery,
                    stream,  # type: ignore[arg-type]  # any trio Stream works, as tests show
                    target.netloc,
                    resource,
                    max_message_size=max_message_size,
                )
            try:
                yield connection
            finally:
                with trio.move_on_after(disconnect_timeout, shield=True):
                    await connection.aclose()
                nursery.cancel_scope.cancel()
    # trio-websocket's reader task reports a rejected handshake or a closed connection from
    # inside our nursery, and the body's own exceptions come out of it wrapped too: callers
    # handle each as the plain exception it is.
    except* LocalProtocolError as group:
        # e.g. a pong crossing a close: the connection is over, like any other close.
        raise ConnectionClosed(CloseReason(1006, str(group.exceptions[0]))) from None
    except* Exception as group:
        found = list(errors.leaves(group))
        if len(found) == 1:
            raise found[0] from None
        raise
