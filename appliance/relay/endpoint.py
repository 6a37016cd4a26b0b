"""How a relay client is addressed and kept alive: one value each, used by the listener, the
sender, the cloud's tools, the CLI and the tests."""

from __future__ import annotations

import time
import urllib.parse
from typing import TYPE_CHECKING

from attrs import field, frozen

from appliance.relay.sas import make_token, resource_uri

if TYPE_CHECKING:
    from appliance.config import RelayConfig


@frozen
class RelayEndpoint:
    """One hybrid connection: where to connect, and the credentials for its tokens."""

    url: str  # wss://{namespace}, or the emulator's ws://host:port
    namespace: str
    path: str
    key_name: str
    key: bytes = field(repr=False)
    token_lifetime: float = 3600.0

    @classmethod
    def from_config(cls, relay: RelayConfig, path: str, key: bytes) -> RelayEndpoint:
        return cls(relay.url, relay.namespace, path, relay.key_name, key, relay.token_lifetime_s)

    @property
    def resource(self) -> str:
        return resource_uri(self.namespace, self.path)

    def token(self, now: float | None = None) -> tuple[str, float]:
        """A SAS token for this hybrid connection, and when it expires."""
        expiry = int((time.time() if now is None else now) + self.token_lifetime)
        return make_token(self.resource, self.key_name, self.key, expiry), expiry

    def address(self, action: str, now: float | None = None, **extra: str) -> tuple[str, float]:
        """The WebSocket URL for `action` (listen or connect) with a SAS token, and its expiry."""
        token, expiry = self.token(now)
        return self.url_for(action, token, **extra), expiry

    def url_for(self, action: str, token: str, **extra: str) -> str:
        """The WebSocket URL for `action` carrying `token` (SAS, or `Bearer <jwt>`)."""
        query = urllib.parse.urlencode({"sb-hc-action": action, **extra, "sb-hc-token": token})
        return f"{self.url.rstrip('/')}/$hc/{urllib.parse.quote(self.path)}?{query}"


@frozen
class Liveness:
    """WebSocket pings: how often, and how long to wait for the pong before giving up."""

    ping_interval: float = 30.0
    ping_timeout: float = 10.0


#: What real-world clients use: a ping every 30 s, given up after 10 s.
DEFAULT_LIVENESS = Liveness()
