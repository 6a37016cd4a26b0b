"""Entra ID tokens through the real azure-identity client, against an Azure Arc HIMDS endpoint
that speaks Arc's challenge flow (appliance/testing/entra.py), and a relay namespace that
accepts only bearer tokens of that tenant."""

from __future__ import annotations

import os
import time

import pytest
import trio

from appliance.identity import RELAY_RESOURCE, EntraTokens, IdentityError, managed_identity
from appliance.relay.endpoint import Liveness, RelayEndpoint
from appliance.relay.listener import RelayListener
from appliance.testing.entra import EntraEmulator, verify
from appliance.testing.relay_emulator import EntraTrust, RelayEmulator

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="Arc's key files live under /var/opt")


@pytest.fixture
def entra(monkeypatch):
    with EntraEmulator().running() as emulator:
        for name, value in emulator.environment().items():
            monkeypatch.setenv(name, value)
        yield emulator


async def test_a_token_from_the_arc_endpoint_through_azure_identity(entra):
    tokens = EntraTokens(managed_identity)
    token = await tokens.get(RELAY_RESOURCE)
    claims = verify(token.token, entra.jwks(), audience=RELAY_RESOURCE, issuers=(entra.issuer,))
    assert claims["oid"] == entra.oid
    assert token.expires_on > time.time() + 3000
    assert entra.challenges == 1  # the 401 challenge, then the key file's secret
    assert (await tokens.get(RELAY_RESOURCE)) is token  # cached, not asked again
    assert tokens.fetched == 1


async def test_failures_name_the_reason(entra, monkeypatch):
    entra.reject_resources.add("api://manage-unknown")
    tokens = EntraTokens(managed_identity)
    with pytest.raises(IdentityError, match=r"^audience rejected"):
        await tokens.get("api://manage-unknown")
    assert tokens.failing is not None
    unreachable = EntraTokens(managed_identity)
    monkeypatch.setenv("IDENTITY_ENDPOINT", "http://127.0.0.1:9/metadata/identity/oauth2/token")
    with pytest.raises(IdentityError, match=r"^endpoint unreachable"):
        await unreachable.get(RELAY_RESOURCE)


async def test_a_listener_authenticated_by_bearer_token_renews_it_before_expiry(entra):
    entra.lifetime_s = 8  # renewal at 80 % of what is left, refreshed inside the margin
    tokens = EntraTokens(managed_identity, refresh_margin_s=3)
    trust = EntraTrust(entra.jwks(), (entra.issuer,), frozenset({entra.oid}))
    relay = RelayEmulator({}, namespace="site.servicebus.windows.net", entra=trust)

    async def bearer() -> tuple[str, float]:
        token = await tokens.get(RELAY_RESOURCE)
        return f"Bearer {token.token}", token.expires_on

    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        endpoint = RelayEndpoint(relay.endpoint, relay.namespace, "actions", "", b"")
        listener = RelayListener(
            name="gw-1",
            endpoint=endpoint,
            handle=None,
            liveness=Liveness(ping_interval=1.0, ping_timeout=0.5),
            tokens=bearer,
        )
        nursery.start_soon(listener.run)
        with trio.fail_after(30):
            while listener.renewals < 2:  # noqa: ASYNC110 (a counter, not an event)
                await trio.sleep(0.1)
        assert relay.listener_count("actions") == 1
        assert relay.refusals == []  # every renewal was a valid, fresh token
        assert len(entra.issued) >= 2
        nursery.cancel_scope.cancel()


async def test_the_namespace_refuses_a_bearer_token_of_another_identity(entra):
    trust = EntraTrust(entra.jwks(), (entra.issuer,), frozenset({"someone-else"}))
    relay = RelayEmulator({}, namespace="site.servicebus.windows.net", entra=trust)
    tokens = EntraTokens(managed_identity)

    async def bearer() -> tuple[str, float]:
        token = await tokens.get(RELAY_RESOURCE)
        return f"Bearer {token.token}", token.expires_on

    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        endpoint = RelayEndpoint(relay.endpoint, relay.namespace, "actions", "", b"")
        listener = RelayListener(name="gw-1", endpoint=endpoint, handle=None, tokens=bearer)
        nursery.start_soon(listener.run)
        with trio.fail_after(10):
            while not listener.misconfigured:  # noqa: ASYNC110 (a counter, not an event)
                await trio.sleep(0.05)
        assert listener.failures["identity"] >= 1
        assert "holds no Relay role" in relay.refusals[0][1]
        nursery.cancel_scope.cancel()
