"""What the listener and the sender share: credentials and URLs, failures counted by phase,
and the reconnect backoff (roughly 0, 1, 2, 5, 10, 30 s, jittered)."""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.relay.endpoint import RelayEndpoint
from appliance.relay.websocket import open_websocket
from appliance.supervisor import Criticality

log = get_logger("relay")

BACKOFF = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)
#: Handshake refusals no retry cures without an operator: no such hybrid connection, wrong key.
MISCONFIGURED = (401, 403, 404)
MAX_MESSAGE = 16 * 1024 * 1024


def closed_how(exc: ConnectionClosed) -> str:
    """`<code> <reason>` of a closed WebSocket, for logs and failure counts."""
    if exc.reason is None:
        return "without a close frame"
    return f"{exc.reason.code} {exc.reason.reason}"


class RelayClient:
    criticality = Criticality.AUXILIARY

    def __init__(
        self,
        *,
        name: str,
        endpoint: RelayEndpoint,
        backoff: tuple[float, ...],
        clock: Callable[[], float] = time.time,
        connect: Callable[..., AbstractAsyncContextManager[WebSocketConnection]] = open_websocket,
        tokens: Callable[[], Awaitable[tuple[str, float]]] | None = None,
    ) -> None:
        self.name = name
        #: Where `sb-hc-token` values come from: an Entra bearer token source (appliance/
        #: identity.py), or None for SAS tokens signed with the endpoint's key.
        self._tokens = tokens
        #: How WebSockets are opened (TCP in production; in-memory streams in virtual-time tests).
        self._open = connect
        self.endpoint = endpoint
        self._path = endpoint.path
        self._backoff = backoff
        self._clock = clock
        self._attempt = 0
        self.connected = False
        self.failures: collections.Counter[str] = collections.Counter()
        #: Why the relay refuses this client's configuration (status shows it), or None.
        self.misconfigured: str | None = None

    async def _token(self) -> tuple[str, float]:
        """An `sb-hc-token` value and its expiry. Raises IdentityError (Entra)."""
        if self._tokens is None:
            return self.endpoint.token(self._clock())
        return await self._tokens()

    async def _url(self, action: str, **extra: str) -> tuple[str, float]:
        token, expiry = await self._token()
        return self.endpoint.url_for(action, token, **extra), expiry

    def _failed(self, phase: str, error: object, *, quiet: bool = False) -> None:
        self.failures[phase] += 1
        METRICS.inc("relay_failures_total", client=self.name, phase=phase)
        (log.debug if quiet else log.warning)(
            "relay.failed", client=self.name, phase=phase, error=str(error)[:300]
        )

    def _rejected(self, exc: ConnectionRejected, not_found: str) -> None:
        body = (exc.body or b"").decode("utf-8", "replace")[:200]
        # Already reported as relay.misconfigured: counted, not logged again on every retry.
        quiet = self.misconfigured is not None and exc.status_code in MISCONFIGURED
        if exc.status_code == 404:
            self._failed(
                "connect" if not_found == "connect" else "handshake",
                f"HTTP 404: {body or 'not found'}",
                quiet=quiet,
            )
        elif exc.status_code in (401, 403):
            phase = "sas-token" if self._tokens is None else "identity"
            self._failed(phase, f"HTTP {exc.status_code}: {body}", quiet=quiet)
        else:
            self._failed("handshake", f"HTTP {exc.status_code}: {body}")

    def _misconfigured(self, exc: ConnectionRejected) -> None:
        body = (exc.body or b"").decode("utf-8", "replace")[:200]
        why = f"HTTP {exc.status_code} on {self._path}: {body or 'refused'}"
        if self.misconfigured is None:  # one event per change of state, not per retry
            log.error("relay.misconfigured", client=self.name, phase="handshake", error=why)
        self.misconfigured = why

    def _connected(self) -> None:
        if self.misconfigured is not None:
            log.info("relay.configured", client=self.name, path=self._path)
            self.misconfigured = None
        self.connected = True
        self._attempt = 0
        METRICS.inc("relay_connects_total", client=self.name)

    async def _back_off(self) -> None:
        self.connected = False
        delay = self._backoff[min(self._attempt, len(self._backoff) - 1)]
        self._attempt += 1
        await trio.sleep(delay * random.uniform(0.8, 1.2))
