"""The sender on the events hybrid connection: the outbox, delivered at least once, in order.

One long-lived connection carries many events. Each event is sent as an envelope and marked
delivered only when the cloud's `{"ack": event_id}` for it arrives; no ack within
`ack_timeout` and the connection is dropped and the event sent again on the next one (the
cloud drops duplicates by event_id). While the cloud is away (404: no listener; 401/403: a
token problem) the sender retries with backoff for ever: outages only delay delivery.
"""

from __future__ import annotations

import collections
import json
import random
import time
import urllib.parse
from collections.abc import Callable

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from appliance.log import get_logger
from appliance.relay.listener import BACKOFF, MAX_MESSAGE
from appliance.relay.outbox import Outbox
from appliance.relay.sas import make_token, resource_uri
from appliance.relay.websocket import open_websocket

log = get_logger("relay")

IDLE_POLL = 0.5


class RelaySender:
    name = "relay-sender"

    def __init__(
        self,
        *,
        outbox: Outbox,
        endpoint: str,
        namespace: str,
        path: str,
        key_name: str,
        key: bytes,
        appliance_id: str,
        token_lifetime: float = 3600.0,
        ack_timeout: float = 30.0,
        ping_interval: float = 30.0,
        backoff: tuple[float, ...] = BACKOFF,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._outbox = outbox
        self._endpoint = endpoint.rstrip("/")
        self._resource = resource_uri(namespace, path)
        self._path = path
        self._key_name = key_name
        self._key = key
        self._appliance_id = appliance_id
        self._lifetime = token_lifetime
        self._ack_timeout = ack_timeout
        self._ping_interval = ping_interval
        self._backoff = backoff
        self._clock = clock
        self.connected = False
        self.sent = 0
        self.last_ack: float | None = None
        self.failures: collections.Counter[str] = collections.Counter()

    def statistics(self) -> dict:
        return {
            "connected": self.connected,
            "sent": self.sent,
            "last_ack": self.last_ack,
            "failures_by_phase": dict(self.failures),
        }

    def _failed(self, phase: str, error: object) -> None:
        self.failures[phase] += 1
        log.warning("relay.failed", sender=self.name, phase=phase, error=str(error)[:300])

    def _url(self) -> str:
        token = make_token(
            self._resource, self._key_name, self._key, int(self._clock() + self._lifetime)
        )
        query = urllib.parse.urlencode({"sb-hc-action": "connect", "sb-hc-token": token})
        return f"{self._endpoint}/$hc/{urllib.parse.quote(self._path)}?{query}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        attempt = 0
        while True:
            if not await trio.to_thread.run_sync(self._outbox.pending, 1):
                await trio.sleep(IDLE_POLL)  # nothing to send: no connection kept idle
                continue
            try:
                async with open_websocket(
                    self._url(), max_message_size=MAX_MESSAGE, disconnect_timeout=2
                ) as connection:
                    self.connected = True
                    attempt = 0
                    await self._deliver(connection)
            except ConnectionRejected as exc:
                if exc.status_code == 404:
                    self._failed("connect", "no listener on the events hybrid connection (404)")
                else:
                    phase = "sas-token" if exc.status_code in (401, 403) else "handshake"
                    self._failed(phase, f"HTTP {exc.status_code}")
            except ConnectionClosed as exc:
                self._failed("send", f"connection closed {exc.reason.code} {exc.reason.reason}")
            except trio.TooSlowError:
                self._failed("ack", f"no ack within {self._ack_timeout:g} s")
            except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
                self._failed("connect", f"{type(exc).__name__}: {exc}")
            finally:
                self.connected = False
            delay = self._backoff[min(attempt, len(self._backoff) - 1)] * random.uniform(0.8, 1.2)
            attempt += 1
            await trio.sleep(delay)

    async def _deliver(self, connection) -> None:
        idle_since = trio.current_time()
        while True:
            batch = await trio.to_thread.run_sync(self._outbox.pending, 50)
            if not batch:
                if trio.current_time() - idle_since > self._ping_interval:
                    with trio.fail_after(self._ack_timeout):
                        await connection.ping()  # idle relay sockets are dropped after ~4 min
                    idle_since = trio.current_time()
                await trio.sleep(IDLE_POLL)
                continue
            for event in batch:
                await connection.send_message(json.dumps(event.envelope(self._appliance_id)))
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
                self.sent += 1
                self.last_ack = self._clock()
            idle_since = trio.current_time()
