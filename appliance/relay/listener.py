"""The listener on the actions hybrid connection: how cloud actions reach the appliance.

The control channel is read continuously (with trio-websocket's queue of 1, an unread channel
also stops answering pings) and each `accept` is handled in its own task, so a slow action never
blocks the next. Liveness is checked by our own pings: no pong within `ping_timeout` and the
channel is torn down and reopened, so a half-dead connection is noticed within one interval
plus the timeout. The token is renewed on the open channel (`renewToken`) before it expires.
Every failure is logged and counted with its phase: sas-token, connect, handshake,
control-channel, accept, rendezvous, action. A refused listen handshake (404: the hybrid
connection does not exist; 401/403: the key is wrong) is a configuration fault: a loud,
persistent `relay.misconfigured` state, retried on the backoff, never an exit; DICOM goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from appliance.identity import IdentityError
from appliance.log import get_logger
from appliance.relay.client import BACKOFF, MAX_MESSAGE, MISCONFIGURED, RelayClient, closed_how
from appliance.relay.endpoint import DEFAULT_LIVENESS, Liveness, RelayEndpoint
from appliance.relay.websocket import open_websocket

log = get_logger("relay")

#: While only the token in use comes back, renewal is tried again this often (at most).
RENEW_RETRY_S = 30.0


class RelayListener(RelayClient):
    def __init__(
        self,
        *,
        name: str,
        endpoint: RelayEndpoint,
        handle: Callable[..., Awaitable[str]] | None = None,
        conversation: Callable[[WebSocketConnection], Awaitable[None]] | None = None,
        liveness: Liveness = DEFAULT_LIVENESS,
        backoff: tuple[float, ...] = BACKOFF,
        clock: Callable[[], float] = time.time,
        connect: Callable[..., Any] = open_websocket,
        tokens: Callable[[], Awaitable[tuple[str, float]]] | None = None,
    ) -> None:
        super().__init__(
            name=name,
            endpoint=endpoint,
            backoff=backoff,
            clock=clock,
            connect=connect,
            tokens=tokens,
        )
        self._handle = handle
        #: What happens on an accepted connection: by default one action, one reply.
        self._conversation = conversation or self._one_action
        self._ping_interval = liveness.ping_interval
        self._ping_timeout = liveness.ping_timeout
        self.last_contact: float | None = None
        #: When the control channel now open was opened (None: not connected).
        self.connected_at: float | None = None
        self.accepted = 0
        self.renewals = 0

    def uptime(self) -> float:
        """Seconds the control channel has been open (0 when it is not)."""
        return self._clock() - self.connected_at if self.connected_at is not None else 0.0

    def statistics(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "last_contact": self.last_contact,
            "failures_by_phase": dict(self.failures),
            "accepted": self.accepted,
            "misconfigured": self.misconfigured,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Started at once: DICOM service must not wait for the cloud; status shows the relay.
        task_status.started()
        # Conversations outlive the control channel they were accepted on: a long image.fetch
        # goes on while the channel is reopened.
        async with trio.open_nursery() as conversations:
            await self._listen(conversations)

    async def _listen(self, conversations: trio.Nursery) -> None:
        while True:
            try:
                url, expiry = await self._url("listen", **{"sb-hc-id": self.name})
            except IdentityError as exc:  # Entra unreachable or refusing: shown, retried
                self._failed("identity", exc.reason)
                await self._back_off()
                continue
            except Exception as exc:
                self._failed("sas-token", exc)
                raise
            try:
                async with self._open(
                    url,
                    max_message_size=MAX_MESSAGE,
                    connect_timeout=self._ping_timeout,
                    # a zombie channel will not answer a close either: don't wait for it long
                    disconnect_timeout=min(2.0, self._ping_timeout),
                ) as control:
                    self._connected()
                    self.last_contact = self.connected_at = self._clock()
                    log.info("relay.listening", listener=self.name, path=self._path)
                    try:
                        await self._serve(control, expiry, conversations)
                    finally:
                        self.connected_at = None
            except ConnectionRejected as exc:
                self._rejected(exc, not_found="handshake")
                if exc.status_code in MISCONFIGURED:  # no such hybrid connection, wrong key
                    self._misconfigured(exc)
            except ConnectionClosed as exc:
                self._failed("control-channel", f"closed {closed_how(exc)}")
            except (HandshakeError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                self._failed("connect", f"{type(exc).__name__}: {exc}")
            await self._back_off()

    async def _serve(
        self, control: WebSocketConnection, expiry: float, conversations: trio.Nursery
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keepalive, control, nursery.cancel_scope)
                nursery.start_soon(self._renew, control, expiry)
                while True:
                    text = await control.get_message()
                    self.last_contact = self._clock()
                    try:
                        message = json.loads(text)
                        if "accept" in message:
                            conversations.start_soon(self._accept, message["accept"])
                        elif "request" in message:
                            await self._request(control, message["request"])
                    except (ValueError, TypeError, KeyError, AttributeError) as exc:
                        self._failed("control-channel", f"unreadable control message: {exc}")
        except* ConnectionClosed as group:
            # A closed channel surfaces from the nursery wrapped; it is one plain event here.
            raise group.exceptions[0] from None

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
        """Renew the channel's token before it expires. Only a token that lasts longer is sent:
        an identity's cache may hand back the one in use until close to its expiry, so until a
        newer one comes, it is asked again every so often (never later than half of what is
        left)."""
        wait = max((expiry - self._clock()) * 0.8, 0.05)  # 80 % of the lifetime: time to retry
        while True:
            await trio.sleep(wait)
            try:
                token, renewed = await self._token()
            except IdentityError as exc:  # try again soon: the current token still holds
                self._failed("identity", exc.reason)
                wait = max(min((expiry - self._clock()) * 0.5, RENEW_RETRY_S), 0.05)
                continue
            if renewed <= expiry:  # the same token again: nothing to renew with yet
                wait = max(min((expiry - self._clock()) * 0.5, RENEW_RETRY_S), 0.05)
                continue
            try:
                await control.send_message(json.dumps({"renewToken": {"token": token}}))
            except ConnectionClosed:
                return
            expiry = renewed
            self.renewals += 1
            log.info("relay.token_renewed", listener=self.name)
            wait = max((expiry - self._clock()) * 0.8, 0.05)

    async def _accept(self, accept: dict[str, Any]) -> None:
        address = accept.get("address")
        if not isinstance(address, str):
            self._failed("accept", "accept without an address")
            return
        try:
            # Dial the address exactly as given: it may name another host and carries its own
            # credentials.
            async with self._open(
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
        assert self._handle is not None  # the default conversation is for a handler
        await rendezvous.send_message(await self._handle(text, rendezvous))

    async def _request(self, control: WebSocketConnection, request: dict[str, Any]) -> None:
        """HTTP request mode, small bodies inline on the control channel."""
        body = await control.get_message() if request.get("body") else ""
        text = body if isinstance(body, str) else body.decode("utf-8", "replace")
        assert self._handle is not None  # request mode answers through the handler
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
