"""A local Azure Relay Hybrid Connections service, for tests, the demo and development.

It speaks the public protocol: listeners open a control channel
(`/$hc/{path}?sb-hc-action=listen`), senders connect (`sb-hc-action=connect`), the service
sends the listener an `accept` with a rendezvous address, the listener dials it, and the two
WebSockets are joined. Tokens are checked as the service checks them (signature, expiry,
`sr` prefix), in `sb-hc-token` or the `ServiceBusAuthorization` header; or, given a tenant to
trust (`EntraTrust`), an Entra ID bearer token (`Bearer <jwt>`: RS256 by a key of the tenant,
audience https://relay.azure.net, the tenant's issuer, not expired; optionally only some
identities' `oid`), as production namespaces require. `renewToken` on the control channel
extends either; an expired token closes the channel with 1008. A sender with no listener gets
HTTP 404, a bad token 401.

Faults for tests: `freeze()` stops all traffic without closing anything (a zombie connection:
no pongs, no close, as in the NHS gateway's overnight failure), `drop()` cuts every connection,
`drop_rendezvous = N` cuts the next N rendezvous dials.
"""

from __future__ import annotations

import json
import random
import time
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_server_stream,
)

from appliance.identity import RELAY_RESOURCE
from appliance.log import get_logger
from appliance.relay.sas import TokenError, resource_uri, verify


@attrs.frozen
class EntraTrust:
    """The tenant whose bearer tokens the namespace accepts (its JWKS and issuers)."""

    jwks: dict[str, Any]
    issuers: tuple[str, ...]
    #: Identities holding a Relay role on the namespace; None: any identity of the tenant.
    oids: frozenset[str] | None = None


log = get_logger("relay-emulator")

MAX_MESSAGE = 64 * 1024 * 1024
RENDEZVOUS_TIMEOUT = 30.0
EXPIRY_CHECK = 0.5
LISTENER_PING = 1.0


@attrs.define
class _Rendezvous:
    path: str
    arrived: trio.Event = attrs.Factory(trio.Event)
    finished: trio.Event = attrs.Factory(trio.Event)
    listener: WebSocketConnection | None = None
    rejected: tuple[int, str] | None = None


@attrs.define
class _ControlChannel:
    id: str
    ws: WebSocketConnection
    expiry: int


class _Link:
    """One proxied TCP connection; frozen links hold their bytes and never close."""

    def __init__(self) -> None:
        self.frozen = False
        self.scope = trio.CancelScope()


class RelayEmulator:
    def __init__(
        self,
        keys: dict[str, bytes],
        namespace: str = "",
        clock: Callable[[], float] = time.time,
        entra: EntraTrust | None = None,
    ) -> None:
        self._keys = keys
        self._entra = entra
        self._clock = clock
        self._namespace = namespace
        self._listeners: dict[str, list[_ControlChannel]] = defaultdict(list)
        self._rendezvous: dict[str, _Rendezvous] = {}
        self._links: list[_Link] = []
        self.host = "127.0.0.1"
        self.port: int | None = None
        #: (phase, detail) of everything refused, for tests and the console
        self.refusals: list[tuple[str, str]] = []
        #: Fault: the next N rendezvous dials are cut as they arrive.
        self.drop_rendezvous = 0
        #: Fault: hybrid connections that do not exist (listen and connect get 404).
        self.missing: set[str] = set()

    # --- faults -------------------------------------------------------------------------------

    def freeze(self) -> None:
        for link in self._links:
            link.frozen = True

    def drop(self) -> None:
        for link in self._links:
            link.scope.cancel()

    def listener_count(self, path: str) -> int:
        return len(self._listeners[path])

    # --- serving ------------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def endpoint(self) -> str:
        return f"ws://{self.host}:{self.port}"

    async def run(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[RelayEmulator] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        self.host = host
        async with trio.open_nursery() as nursery:
            inner = await nursery.start(
                partial(
                    serve_websocket,
                    self._handle,
                    "127.0.0.1",
                    0,
                    None,
                    handler_nursery=nursery,
                    max_message_size=MAX_MESSAGE,
                )
            )
            listeners = await nursery.start(
                partial(trio.serve_tcp, partial(self._proxy, inner.port), port, host=host)
            )
            self.port = listeners[0].socket.getsockname()[1]
            self._namespace = self._namespace or f"{host}:{self.port}"
            log.info("emulator.listening", endpoint=self.endpoint)
            task_status.started(self)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection over a stream the caller made (in-memory, for virtual time)."""
        try:
            async with trio.open_nursery() as nursery:
                request = await wrap_server_stream(nursery, stream, max_message_size=MAX_MESSAGE)
                await self._handle(request)
                nursery.cancel_scope.cancel()
        except (Exception, BaseExceptionGroup) as exc:  # a dying connection's last words
            if isinstance(exc, BaseExceptionGroup) and exc.subgroup(trio.Cancelled):
                raise
            log.debug("emulator.connection_ended", error=str(exc)[:200])

    async def _proxy(self, inner_port: int, outside: trio.SocketStream) -> None:
        link = _Link()
        self._links.append(link)
        try:
            async with outside, await trio.open_tcp_stream("127.0.0.1", inner_port) as inside:
                with link.scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump, outside, inside, link, nursery.cancel_scope)
                        nursery.start_soon(self._pump, inside, outside, link, nursery.cancel_scope)
        except OSError:
            pass
        finally:
            self._links.remove(link)

    @staticmethod
    async def _pump(
        source: trio.SocketStream,
        target: trio.SocketStream,
        link: _Link,
        scope: trio.CancelScope,
    ) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    break
                while link.frozen:  # a zombie: keep everything open, pass nothing on
                    await trio.sleep_forever()
                await target.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _handle(self, request: WebSocketRequest) -> None:
        # A client gone mid-handshake (a killed appliance) ends its own connection, never the
        # emulator: the real service shrugs off a peer that vanished before its reply.
        try:
            await self._answer(request)
        except ConnectionClosed as exc:
            log.debug("emulator.client_vanished", reason=str(exc.reason)[:200])

    async def _answer(self, request: WebSocketRequest) -> None:
        target = urllib.parse.urlsplit(request.path)
        query = dict(urllib.parse.parse_qsl(target.query))
        path = target.path.removeprefix("/$hc/")
        action = query.get("sb-hc-action")
        if action == "accept":
            await self._rendezvous_arrives(request, query)
            return
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        token = query.get("sb-hc-token") or headers.get("servicebusauthorization", "")
        try:
            expiry = self._verified(token, path)
        except TokenError as exc:
            self.refusals.append(("sas-token", str(exc)))
            await request.reject(401, body=str(exc).encode())
            return
        if path in self.missing and action in ("listen", "connect"):
            self.refusals.append(("missing", path))
            await request.reject(404, body=b"hybrid connection not found")
            return
        if action == "listen":
            await self._listen(request, path, query.get("sb-hc-id", ""), expiry)
        elif action == "connect":
            await self._connect(request, path, headers)
        else:
            await request.reject(400, body=b"unknown sb-hc-action")

    def _verified(self, token: str, path: str) -> int:
        """The token's expiry, or TokenError: a SAS token for the path, or a bearer token of
        the trusted tenant."""
        if not token.startswith("Bearer "):
            return verify(
                token, resource_uri(self._namespace, path), self._keys, self._clock()
            ).expiry
        if self._entra is None:
            raise TokenError("bearer tokens are not accepted by this namespace")
        import jwt

        from appliance.testing.entra import verify as verify_bearer

        try:
            claims = verify_bearer(
                token.removeprefix("Bearer "),
                self._entra.jwks,
                audience=RELAY_RESOURCE,
                issuers=self._entra.issuers,
            )
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"bearer token refused: {exc}") from None
        if self._entra.oids is not None and claims.get("oid") not in self._entra.oids:
            raise TokenError(f"identity {claims.get('oid')} holds no Relay role here")
        return int(claims["exp"])

    async def _listen(self, request: WebSocketRequest, path: str, id: str, expiry: int) -> None:
        ws = await request.accept()
        channel = _ControlChannel(id or str(uuid.uuid4()), ws, expiry)
        self._listeners[path].append(channel)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire, channel, nursery.cancel_scope)
                nursery.start_soon(self._keepalive, channel, nursery.cancel_scope)
                await self._read_control(channel, path)
                nursery.cancel_scope.cancel()
        finally:
            self._listeners[path].remove(channel)

    async def _read_control(self, channel: _ControlChannel, path: str) -> None:
        try:
            while True:
                message = json.loads(await channel.ws.get_message())
                renewal = message.get("renewToken", {}).get("token")
                if renewal is None:
                    continue
                try:
                    channel.expiry = self._verified(renewal, path)
                except TokenError as exc:
                    self.refusals.append(("renew", str(exc)))
                    await channel.ws.aclose(1008, str(exc))
                    return
        except (ConnectionClosed, json.JSONDecodeError, AttributeError):
            return

    async def _keepalive(self, channel: _ControlChannel, scope: trio.CancelScope) -> None:
        """The service drops listeners that stop answering its pings."""
        while True:
            await trio.sleep(LISTENER_PING)
            with trio.move_on_after(LISTENER_PING) as timeout:
                try:
                    await channel.ws.ping()
                except ConnectionClosed:
                    scope.cancel()
                    return
            if timeout.cancelled_caught:
                self.refusals.append(("listener-silent", channel.id))
                scope.cancel()
                return

    async def _expire(self, channel: _ControlChannel, scope: trio.CancelScope) -> None:
        while True:  # the expiry moves when the listener renews its token
            remaining = channel.expiry - self._clock()
            if remaining <= 0:
                break
            await trio.sleep(min(remaining, EXPIRY_CHECK))
        self.refusals.append(("expired", channel.id))
        await channel.ws.aclose(1008, "ExpiredToken")
        scope.cancel()

    async def _connect(self, request: WebSocketRequest, path: str, headers: dict[str, Any]) -> None:
        if not self._listeners[path]:
            self.refusals.append(("connect", f"no listener for {path}"))
            await request.reject(404, body=b"no listener")
            return
        channel = random.choice(self._listeners[path])
        rendezvous_id = str(uuid.uuid4())
        rendezvous = self._rendezvous[rendezvous_id] = _Rendezvous(path)
        address = (
            f"{self.endpoint}/$hc/{urllib.parse.quote(path)}?sb-hc-action=accept"
            f"&sb-hc-id={rendezvous_id}"
        )
        remote = request.remote
        accept = {
            "accept": {
                "address": address,
                "id": rendezvous_id,
                "connectHeaders": {k: v for k, v in headers.items() if k.startswith("x-")},
                "remoteEndpoint": {
                    "address": str(getattr(remote, "address", "")),
                    "port": getattr(remote, "port", 0),
                },
            }
        }
        try:
            await channel.ws.send_message(json.dumps(accept))
            with trio.move_on_after(RENDEZVOUS_TIMEOUT):
                await rendezvous.arrived.wait()
            if rendezvous.rejected is not None:
                code, description = rendezvous.rejected
                await request.reject(code, body=description.encode())
                return
            if rendezvous.listener is None:
                await request.reject(504, body=b"listener did not accept in time")
                return
            sender = await request.accept()
            await _join(sender, rendezvous.listener)
        except ConnectionClosed:
            pass
        finally:
            rendezvous.finished.set()
            self._rendezvous.pop(rendezvous_id, None)

    async def _rendezvous_arrives(self, request: WebSocketRequest, query: dict[str, Any]) -> None:
        rendezvous = self._rendezvous.get(query.get("sb-hc-id", ""))
        if rendezvous is not None and self.drop_rendezvous > 0:
            self.drop_rendezvous -= 1
            self.refusals.append(("rendezvous-dropped", query.get("sb-hc-id", "")))
            rendezvous.rejected = (502, "rendezvous dropped")
            rendezvous.arrived.set()
            await request.reject(502, body=b"rendezvous dropped")
            return
        if rendezvous is None:
            await request.reject(404, body=b"no such rendezvous")
            return
        if "sb-hc-statusCode" in query:
            rendezvous.rejected = (
                int(query["sb-hc-statusCode"]),
                query.get("sb-hc-statusDescription", ""),
            )
            rendezvous.arrived.set()
            await request.reject(410, body=b"rejected by listener")
            return
        rendezvous.listener = await request.accept()
        rendezvous.arrived.set()
        await rendezvous.finished.wait()


async def _join(a: WebSocketConnection, b: WebSocketConnection) -> None:
    async def pump(source: WebSocketConnection, target: WebSocketConnection) -> None:
        code, reason = 1000, None
        try:
            while True:
                await target.send_message(await source.get_message())
        except ConnectionClosed as exc:
            # Pass the close on as it was given (e.g. 1009 message too big), as the relay does.
            code = (exc.reason.code if exc.reason else None) or 1000
            reason = exc.reason.reason if exc.reason else None
        if code in (1005, 1006):  # no status / abnormal: not codes one may send
            code = 1000
        for side in (source, target):  # whichever end closed, the other hears the same
            await side.aclose(code, reason)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b)
        nursery.start_soon(pump, b, a)
