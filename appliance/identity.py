"""Who the appliance is to the cloud: Microsoft Entra ID access tokens, through azure-identity.

Production (the NHS's Manage service and its relay namespace) accepts no shared keys: the
gateway presents a bearer token of its machine's identity. By default that is the Azure Arc
system-assigned managed identity (`ManagedIdentityCredential`: Arc's local HIMDS endpoint,
found by the IDENTITY_ENDPOINT and IMDS_ENDPOINT environment variables, with its challenge key
file readable by root or the `himds` group); where a site has no Arc agent, an app
registration's client certificate (`CertificateCredential`).

azure-identity is synchronous (it does HTTP with requests), so tokens are fetched in a worker
thread and cached per resource until `identity.refresh_margin_s` before they expire: a token
is never presented that could expire in flight, and the endpoint is asked about once an hour,
not once per connection. Failures are phase `identity` with the reason an operator can act on
(endpoint unreachable, key file unreadable, audience rejected, no identity configured) and are
shown by `appliance status` and `health`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
from attrs import frozen

from appliance import audit
from appliance.config import IdentityConfig, secret_path
from appliance.log import get_logger

log = get_logger("identity")

#: A token request taking longer is given up (and tried again by its caller).
FETCH_TIMEOUT_S = 30.0
#: The audience of Entra tokens for Azure Relay (the listener's `sb-hc-token: Bearer <jwt>`).
RELAY_RESOURCE = "https://relay.azure.net"


class IdentityError(Exception):
    """No token: ``reason`` says why in an operator's words."""

    phase = "identity"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Credential(Protocol):
    """azure-identity's TokenCredential, as far as this module uses it."""

    def get_token(self, *scopes: str, claims: str | None = None) -> Any: ...


@frozen
class AccessToken:
    token: str
    expires_on: float


def reason_for(exc: BaseException) -> str:
    """What an azure-identity failure means for the operator."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)[:600]
    names = {type(e).__name__ for e in chain}
    lowered = text.lower()
    if names & {
        "ServiceRequestError",
        "ConnectionError",
        "ConnectionRefusedError",
        "NewConnectionError",
    }:
        return f"endpoint unreachable: {text}"
    if "key file" in lowered or "could not read file" in lowered or "PermissionError" in names:
        return f"key file unreadable: {text}"
    if "aadsts500011" in lowered or "invalid_resource" in lowered or "audience" in lowered:
        return f"audience rejected: {text}"
    if "CredentialUnavailableError" in names:
        return f"no identity available: {text}"
    return f"token request failed: {text}"


class EntraTokens:
    """Access tokens per resource, fetched in a thread, cached until shortly before expiry."""

    def __init__(
        self,
        make_credential: Callable[[], Credential],
        *,
        refresh_margin_s: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._make_credential = make_credential
        self._credential: Credential | None = None
        self._margin = refresh_margin_s
        self._clock = clock
        self._cache: dict[str, AccessToken] = {}
        self._refused: set[str] = set()
        self._lock = trio.Lock()
        self.fetched = 0
        #: Why the last attempt failed (status and health show it), or None.
        self.failing: str | None = None

    def statistics(self) -> dict[str, Any]:
        return {
            "fetched": self.fetched,
            "failing": self.failing,
            "expires_on": {resource: t.expires_on for resource, t in self._cache.items()},
        }

    def _fresh(self, resource: str) -> AccessToken | None:
        cached = self._cache.get(resource)
        if cached is not None and cached.expires_on - self._margin > self._clock():
            return cached
        return None

    async def get(self, resource: str) -> AccessToken:
        """A token for `resource` (e.g. https://relay.azure.net) valid for at least the refresh
        margin. Raises IdentityError."""
        cached = self._fresh(resource)
        if cached is not None:
            return cached
        async with self._lock:  # one request per expiry, however many callers wait
            cached = self._fresh(resource)
            if cached is not None:
                return cached
            # A token we held and let go (stale, or refused): the library's own cache would
            # hand the same one back, so it is asked past its cache.
            renewing = resource in self._cache or resource in self._refused
            try:
                with trio.fail_after(FETCH_TIMEOUT_S):  # azure-identity retries for minutes
                    token = await trio.to_thread.run_sync(
                        self._fetch, resource, renewing, abandon_on_cancel=True
                    )
            except Exception as exc:
                reason = (
                    f"endpoint unreachable: no token within {FETCH_TIMEOUT_S:g} s"
                    if isinstance(exc, trio.TooSlowError)
                    else reason_for(exc)
                )
                if self.failing != reason:  # one event per change, not per retry
                    log.error("identity.failed", phase="identity", resource=resource, error=reason)
                    audit.record(audit.authentication_failed(f"entra:{resource}", reason))
                self.failing = reason
                raise IdentityError(reason) from None
            if self.failing is not None:
                log.info("identity.recovered", resource=resource)
            self.failing = None
            self.fetched += 1
            self._cache[resource] = token
            self._refused.discard(resource)
            return token

    def forget(self, resource: str) -> None:
        """Drop the cached token: the service refused it (revoked, rotated keys)."""
        self._cache.pop(resource, None)
        self._refused.add(resource)

    def bearer(self, resource: str) -> Callable[[], Awaitable[tuple[str, float]]]:
        """A token source for `resource` in the `Bearer <jwt>` form Azure Relay takes as its
        `sb-hc-token`, with its expiry."""

        async def source() -> tuple[str, float]:
            token = await self.get(resource)
            return f"Bearer {token.token}", token.expires_on

        return source

    def _fetch(self, resource: str, past_the_cache: bool) -> AccessToken:
        if self._credential is None:
            self._credential = self._make_credential()
        scope = resource.rstrip("/") + "/.default"
        if past_the_cache:  # a claims challenge makes MSAL skip its token cache
            claims = json.dumps(
                {"access_token": {"nbf": {"essential": True, "value": str(int(time.time()))}}}
            )
            found = self._credential.get_token(scope, claims=claims)
        else:
            found = self._credential.get_token(scope)
        return AccessToken(str(found.token), float(found.expires_on))


def managed_identity() -> Credential:
    """The machine's managed identity (Azure Arc on a site gateway)."""
    from azure.identity import ManagedIdentityCredential

    return ManagedIdentityCredential()


def credential_for(identity: IdentityConfig) -> Callable[[], Credential]:
    """The credential the config names, made on first use (so a site that never talks to an
    Entra-protected cloud never needs the Arc agent)."""
    if identity.credential == "certificate":
        path = str(secret_path(identity.certificate_file))
        return client_certificate(identity.tenant_id, identity.client_id, path)
    return managed_identity


def client_certificate(
    tenant_id: str, client_id: str, certificate_path: str
) -> Callable[[], Credential]:
    """An app registration's certificate credential, for sites without the Arc agent."""

    def make() -> Credential:
        from azure.identity import CertificateCredential

        return CertificateCredential(tenant_id, client_id, certificate_path)

    return make
