"""The listener on the actions hybrid connection: how cloud actions reach the appliance.

The control channel is read continuously (with trio-websocket's queue of 1, an unread channel
also stops answering pings) and each `accept` is handled in its own task, so a slow action never
blocks the next. Liveness is checked by our own pings: no pong within `ping_timeout` and the
channel is torn down and reopened, so a half-dead connection is noticed within one interval
plus the timeout. The token is renewed on the open channel (`renewToken`) before it expires.
Every failure is logged and counted with its phase: sas-token, connect, handshake,
control-channel, accept, rendezvous, action.
"""

from __future__ import annotations

import collections
import json
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from appliance.log import get_logger
from appliance.relay.sas import make_token, resource_uri
from appliance.relay.websocket import open_websocket

log = get_logger("relay")

#: Reconnect delays (seconds), jittered; the last repeats.
BACKOFF = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_MESSAGE = 16 * 1024 * 1024


class HybridConnectionMissing(Exception):
    """404 on the listen handshake: the hybrid connection does not exist (configuration)."""


class RelayListener:
    def __init__(
        self,
        *,
        name: str,
        endpoint: str,
        namespace: str,
        path: str,
        key_name: str,
        key: bytes,
        handle: Callable[[str], Awaitable[str]] | None = None,
        conversation: Callable[[WebSocketConnection], Awaitable[None]] | None = None,
        token_lifetime: float = 3600.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        backoff: tuple[float, ...] = BACKOFF,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._endpoint = endpoint.rstrip("/")
        self._resource = resource_uri(namespace, path)
        self._path = path
        self._key_name = key_name
        self._key = key
        self._handle = handle
        #: What happens on an accepted connection: by default one action, one reply.
        self._conversation = conversation or self._one_action
        self._lifetime = token_lifetime
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._backoff = backoff
        self._clock = clock
        self.connected = False
        self.last_contact: float | None = None
        self.failures: collections.Counter[str] = collections.Counter()
        self.accepted = 0

    def statistics(self) -> dict:
        return {
            "connected": self.connected,
            "last_contact": self.last_contact,
            "failures_by_phase": dict(self.failures),
            "accepted": self.accepted,
        }

    def _token(self) -> tuple[str, float]:
        expiry = int(self._clock() + self._lifetime)
        return make_token(self._resource, self._key_name, self._key, expiry), expiry

    def _failed(self, phase: str, error: object) -> None:
        self.failures[phase] += 1
        log.warning("relay.failed", listener=self.name, phase=phase, error=str(error)[:300])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Started at once: DICOM service must not wait for the cloud; status shows the relay.
        task_status.started()
        attempt = 0
        while True:
            try:
                token, expiry = self._token()
            except Exception as exc:
                self._failed("sas-token", exc)
                raise
            query = urllib.parse.urlencode(
                {"sb-hc-action": "listen", "sb-hc-id": self.name, "sb-hc-token": token}
            )
            url = f"{self._endpoint}/$hc/{urllib.parse.quote(self._path)}?{query}"
            try:
                async with open_websocket(
                    url,
                    max_message_size=MAX_MESSAGE,
                    connect_timeout=self._ping_timeout,
                    # a zombie channel will not answer a close either: don't wait for it long
                    disconnect_timeout=min(2.0, self._ping_timeout),
                ) as control:
                    attempt = 0
                    self.connected = True
                    self.last_contact = self._clock()
                    log.info("relay.listening", listener=self.name, path=self._path)
                    await self._serve(control, expiry)
            except ConnectionRejected as exc:
                if exc.status_code == 404:
                    self._failed("handshake", f"hybrid connection {self._path} not found (404)")
                    raise HybridConnectionMissing(self._path) from exc
                phase = "sas-token" if exc.status_code in (401, 403) else "handshake"
                self._failed(phase, f"HTTP {exc.status_code}: {(exc.body or b'').decode()[:200]}")
            except ConnectionClosed as exc:
                self._failed("control-channel", f"closed {exc.reason.code} {exc.reason.reason}")
            except (HandshakeError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                self._failed("connect", f"{type(exc).__name__}: {exc}")
            finally:
                self.connected = False
            delay = self._backoff[min(attempt, len(self._backoff) - 1)] * random.uniform(0.8, 1.2)
            attempt += 1
            await trio.sleep(delay)

    async def _serve(self, control: WebSocketConnection, expiry: float) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive, control, nursery.cancel_scope)
            nursery.start_soon(self._renew, control, expiry)
            while True:
                text = await control.get_message()
                self.last_contact = self._clock()
                try:
                    message = json.loads(text)
                    if "accept" in message:
                        nursery.start_soon(self._accept, message["accept"])
                    elif "request" in message:
                        await self._request(control, message["request"])
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    self._failed("control-channel", f"unreadable control message: {exc}")

    async def _keepalive(self, control: WebSocketConnection, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(self._ping_interval)
            with trio.move_on_after(self._ping_timeout) as timeout:
                await control.ping()
                self.last_contact = self._clock()
            if timeout.cancelled_caught:
                self._failed(
                    "control-channel", f"no pong within {self._ping_timeout:g} s: reconnecting"
                )
                scope.cancel()  # leaves _serve; the connection is abandoned, then reopened
                return

    async def _renew(self, control: WebSocketConnection, expiry: float) -> None:
        while True:
            # Renew when 80% of the lifetime has passed: ample time for one more try.
            await trio.sleep(max((expiry - self._clock()) * 0.8, 0.05))
            try:
                token, expiry = self._token()
                await control.send_message(json.dumps({"renewToken": {"token": token}}))
                log.info("relay.token_renewed", listener=self.name)
            except ConnectionClosed:
                return

    async def _accept(self, accept: dict) -> None:
        address = accept.get("address")
        if not isinstance(address, str):
            self._failed("accept", "accept without an address")
            return
        try:
            # Dial the address exactly as given: it may name another host and carries its own
            # credentials.
            async with open_websocket(
                address, max_message_size=MAX_MESSAGE, disconnect_timeout=2
            ) as rendezvous:
                self.accepted += 1
                await self._conversation(rendezvous)
        except (HandshakeError, ConnectionClosed, OSError) as exc:
            self._failed("rendezvous", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # an action's failure must not take the listener down
            self._failed("action", f"{type(exc).__name__}: {exc}")

    async def _one_action(self, rendezvous: WebSocketConnection) -> None:
        request = await rendezvous.get_message()
        text = request if isinstance(request, str) else request.decode("utf-8", "replace")
        await rendezvous.send_message(await self._handle(text))

    async def _request(self, control: WebSocketConnection, request: dict) -> None:
        """HTTP request mode, small bodies inline on the control channel."""
        body = await control.get_message() if request.get("body") else ""
        text = body if isinstance(body, str) else body.decode("utf-8", "replace")
        reply = await self._handle(text)
        response = {
            "response": {
                "requestId": request.get("id"),
                "statusCode": 200,
                "responseHeaders": {"Content-Type": "application/json"},
                "body": True,
            }
        }
        await control.send_message(json.dumps(response))
        await control.send_message(reply.encode())
