"""The sender on the events hybrid connection: the outbox, delivered at least once, in order.

One long-lived connection carries many events. Each event is sent as an envelope and marked
delivered only when the cloud's `{"ack": event_id}` for it arrives; no ack within
`ack_timeout` and the connection is dropped and the event sent again on the next one (the
cloud drops duplicates by event_id). While the cloud is away (404: no listener; 401/403: a
token problem) the sender retries with backoff for ever: outages only delay delivery.
"""

from __future__ import annotations

import datetime
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
from appliance.metrics import METRICS
from appliance.outbox import Outbox
from appliance.relay.client import BACKOFF, MAX_MESSAGE, RelayClient, closed_how
from appliance.relay.endpoint import DEFAULT_LIVENESS, Liveness, RelayEndpoint
from appliance.relay.websocket import open_websocket

log = get_logger("relay")

PURGE_INTERVAL = 3600.0


class RelaySender(RelayClient):
    def __init__(
        self,
        *,
        outbox: Outbox,
        endpoint: RelayEndpoint,
        appliance_id: str,
        ack_timeout: float = 30.0,
        liveness: Liveness = DEFAULT_LIVENESS,
        retention_days: float = 30.0,
        backoff: tuple[float, ...] = BACKOFF,
        clock: Callable[[], float] = time.time,
        connect: Callable[..., Any] = open_websocket,
        tokens: Callable[[], Awaitable[tuple[str, float]]] | None = None,
    ) -> None:
        super().__init__(
            name="relay-sender",
            endpoint=endpoint,
            backoff=backoff,
            clock=clock,
            connect=connect,
            tokens=tokens,
        )
        self._outbox = outbox
        self._appliance_id = appliance_id
        self._ack_timeout = ack_timeout
        self._ping_interval = liveness.ping_interval
        self._retention = datetime.timedelta(days=retention_days)
        self.sent = 0
        self.last_ack: float | None = None

    def statistics(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "sent": self.sent,
            "last_ack": self.last_ack,
            "failures_by_phase": dict(self.failures),
            "misconfigured": self.misconfigured,
        }

    def purge_delivered(self) -> int:
        cutoff = datetime.datetime.now(datetime.UTC) - self._retention
        removed = self._outbox.purge(cutoff.isoformat(timespec="milliseconds"))
        if removed:
            log.info("outbox.purged", events=removed)
        return removed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._outbox.listen()
        task_status.started()
        next_purge = trio.current_time()
        while True:
            if trio.current_time() >= next_purge:
                await trio.to_thread.run_sync(self.purge_delivered)
                next_purge = trio.current_time() + PURGE_INTERVAL
            if not await trio.to_thread.run_sync(self._outbox.pending, 1):
                # Nothing to send, no connection kept idle: woken when an event commits.
                with trio.move_on_after(PURGE_INTERVAL):
                    await self._outbox.wait_for_events()
                continue
            try:
                url, _expiry = await self._url("connect")
            except IdentityError as exc:
                self._failed("identity", exc.reason)
                await self._back_off()
                continue
            try:
                async with self._open(
                    url, max_message_size=MAX_MESSAGE, disconnect_timeout=2
                ) as connection:
                    self._connected()
                    await self._deliver(connection)
            except ConnectionRejected as exc:  # 404: no listener on the events connection
                self._rejected(exc, not_found="connect")
                if exc.status_code in (401, 403):  # the key is wrong: an operator must act
                    self._misconfigured(exc)
            except ConnectionClosed as exc:
                self._failed("send", f"connection closed {closed_how(exc)}")
            except trio.TooSlowError:
                self._failed("ack", f"no ack within {self._ack_timeout:g} s")
            except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
                self._failed("connect", f"{type(exc).__name__}: {exc}")
            await self._back_off()

    async def _deliver(self, connection: WebSocketConnection) -> None:
        idle_since = trio.current_time()
        while True:
            batch = await trio.to_thread.run_sync(self._outbox.pending, 50)
            if not batch:
                if trio.current_time() - idle_since >= self._ping_interval:
                    with trio.fail_after(self._ack_timeout):
                        await connection.ping()  # idle relay sockets are dropped after ~4 min
                    idle_since = trio.current_time()
                with trio.move_on_at(idle_since + self._ping_interval):
                    await self._outbox.wait_for_events()
                continue
            for event in batch:
                await connection.send_message(json.dumps(event.envelope(self._appliance_id)))
                METRICS.inc("events_sent_total")
                with trio.fail_after(self._ack_timeout):
                    reply = await connection.get_message()
                try:
                    acked = json.loads(reply).get("ack")
                except (ValueError, AttributeError):
                    acked = None
                if acked != event.event_id:
                    self._failed("ack", f"expected ack for {event.event_id}, got {reply!r:.100}")
                    return
                await trio.to_thread.run_sync(self._outbox.delivered, event)
                METRICS.inc("events_acked_total")
                self.sent += 1
                self.last_ack = self._clock()
            idle_since = trio.current_time()
