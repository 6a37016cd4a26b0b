"""Entra ID tokens through the real azure-identity client, against an Azure Arc HIMDS endpoint
that speaks Arc's challenge flow (appliance/testing/entra.py), and a relay namespace that
accepts only bearer tokens of that tenant."""

from __future__ import annotations

import json
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

    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        endpoint = RelayEndpoint(relay.endpoint, relay.namespace, "actions", "", b"")
        listener = RelayListener(
            name="gw-1",
            endpoint=endpoint,
            handle=None,
            liveness=Liveness(ping_interval=1.0, ping_timeout=0.5),
            tokens=tokens.bearer(RELAY_RESOURCE),
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

    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        endpoint = RelayEndpoint(relay.endpoint, relay.namespace, "actions", "", b"")
        listener = RelayListener(
            name="gw-1", endpoint=endpoint, handle=None, tokens=tokens.bearer(RELAY_RESOURCE)
        )
        nursery.start_soon(listener.run)
        with trio.fail_after(10):
            while not listener.misconfigured:  # noqa: ASYNC110 (a counter, not an event)
                await trio.sleep(0.05)
        assert listener.failures["identity"] >= 1
        assert "holds no Relay role" in relay.refusals[0][1]
        nursery.cancel_scope.cancel()


def entra_relay(emulator: RelayEmulator) -> dict:
    """The relay settings of a gateway that authenticates with its Entra identity."""
    return {
        "enabled": True,
        "auth": "entra",
        "namespace": emulator.namespace,
        "endpoint": emulator.endpoint,
    }


@pytest.mark.system
async def test_the_running_appliance_listens_with_its_arc_identity_and_speaks_manage(
    entra, tmp_path, nursery
):
    """`appliance run` with relay.auth = entra and cloud.profile = manage: the namespace sees
    only a bearer token, and the cloud gets Manage's reply shapes."""
    from appliance.testing.cloud import send_action
    from tests.support import ApplianceProcess, write_config
    from tests.test_manage_contract import ACTION_ID, create

    trust = EntraTrust(entra.jwks(), (entra.issuer,), frozenset({entra.oid}))
    # The cloud sends with a SAS key of its own; the gateway's listener has only its identity.
    emulator = await nursery.start(
        RelayEmulator(
            {"cloud": b"cloud-key"}, namespace="site.servicebus.windows.net", entra=trust
        ).run
    )
    settings = {
        "relay": entra_relay(emulator) | {"ping_interval_s": 2, "ping_timeout_s": 1},
        # Manage's API is not reached here (no images): its address only has to be configured.
        "cloud": {"profile": "manage", "api_url": "http://127.0.0.1:9", "api_audience": "api://m"},
    }
    app = ApplianceProcess(write_config(tmp_path, settings), env=entra.environment())
    app.start()
    try:
        await trio.to_thread.run_sync(app.wait_ready)
        with trio.fail_after(30):
            while emulator.listener_count("actions") != 1:  # noqa: ASYNC110 (a count)
                await trio.sleep(0.05)
            cloud = RelayEndpoint(
                emulator.endpoint, emulator.namespace, "actions", "cloud", b"cloud-key"
            )
            reply = json.loads(await send_action(cloud, create()))
            health = json.loads(
                await send_action(cloud, json.dumps({"action_type": "health", "action_id": "h"}))
            )
    finally:
        await trio.to_thread.run_sync(app.stop)
        app.__exit__()
    assert reply == {"status": "created", "action_id": ACTION_ID}
    assert health["health"]["checks"]["mwl_port"] == {"ok": True}
    assert health["health"]["listener_uptime_seconds"] >= 0
    assert emulator.refusals == []
    assert entra.challenges >= 1  # the token came through Arc's challenge flow


@pytest.mark.system
async def test_an_identity_failure_is_shown_by_status_with_its_reason(tmp_path, nursery):
    """Arc's endpoint down: the listener cannot get a token; `appliance status` says so."""
    import subprocess
    import sys

    from tests.support import ApplianceProcess, write_config

    emulator = await nursery.start(RelayEmulator({}, namespace="site.servicebus.windows.net").run)
    config = write_config(tmp_path, {"relay": entra_relay(emulator)})
    unreachable = {
        "IDENTITY_ENDPOINT": "http://127.0.0.1:9/metadata/identity/oauth2/token",
        "IMDS_ENDPOINT": "http://127.0.0.1:9",
    }
    app = ApplianceProcess(config, env=unreachable)
    app.start()
    try:
        await trio.to_thread.run_sync(app.wait_ready)

        def status() -> str:
            command = [sys.executable, "-m", "appliance", "--config", str(config), "status"]
            return subprocess.run(command, capture_output=True, text=True).stdout

        wanted = "identity: FAILING: endpoint unreachable"
        with trio.fail_after(60):
            while wanted not in await trio.to_thread.run_sync(status):  # noqa: ASYNC110 (a file)
                await trio.sleep(0.5)
    finally:
        await trio.to_thread.run_sync(app.stop)
        app.__exit__()
    assert "event=identity.failed" in app.log()


async def test_renewal_sends_only_a_token_that_lasts_longer(autojump_clock):
    """An identity's cache may return the token in use until close to its expiry: the listener
    waits for a newer one instead of renewing with the same (the NHS gateway's gap at token
    refresh)."""
    sent: list[str] = []

    class Control:
        async def send_message(self, text: str) -> None:
            sent.append(json.loads(text)["renewToken"]["token"])

    async def tokens() -> tuple[str, float]:
        now = trio.current_time()
        # The same token until 60 s before it expires at 1000, then a new one.
        return ("Bearer old", 1000.0) if now < 940 else ("Bearer new", 4600.0)

    endpoint = RelayEndpoint("ws://unused", "ns", "actions", "", b"")
    listener = RelayListener(
        name="gw", endpoint=endpoint, handle=None, clock=trio.current_time, tokens=tokens
    )
    with trio.move_on_after(1000 - trio.current_time() - 1):
        await listener._renew(Control(), 1000.0)  # the channel opened with the old token
    assert sent == ["Bearer new"]
    assert trio.current_time() < 1000
