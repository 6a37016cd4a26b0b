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
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

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
    resource = target.path + (f"?{target.query}" if target.query else "")
    with trio.fail_after(connect_timeout):
        if secure:
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=ssl.create_default_context()
            )
        else:
            stream = await trio.open_tcp_stream(host, port)
    try:
        async with stream, trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                connection = await wrap_client_stream(
                    nursery,
                    stream,
                    host if target.port is None else f"{host}:{port}",
                    resource,
                    max_message_size=max_message_size,
                )
            try:
                yield connection
            finally:
                with trio.move_on_after(disconnect_timeout, shield=True):
                    await connection.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # trio-websocket's reader task reports a rejected handshake or a closed connection from
        # inside our nursery; callers handle those as the plain exceptions they are.
        leaves = list(errors.leaves(group))
        if leaves and all(isinstance(e, HandshakeError | ConnectionClosed) for e in leaves):
            raise leaves[0] from None
        raise
