"""Cloud actions through the relay emulator, which speaks the Hybrid Connections protocol and
checks SAS tokens as the service does: replies, refusals, zombies, token expiry and renewal."""

from __future__ import annotations

import contextlib
import datetime
import json
import signal
import subprocess
import time

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected

from appliance.relay.actions import CloudActions
from appliance.relay.endpoint import Liveness, RelayEndpoint
from appliance.relay.listener import RelayListener
from appliance.relay.websocket import websocket_over
from appliance.state import StatePaths
from appliance.testing import synthetic
from appliance.testing.cloud import acknowledge, send_action
from appliance.testing.relay_emulator import RelayEmulator
from appliance.worklist.store import WorklistStore
from tests.support import ApplianceProcess, send_files, write_config

KEY_NAME = "RootManageSharedAccessKey"
KEY = b"emulator-test-key"


def create_item(action_id: str, accession: str = "ACC-R1", nhs: str = "9990000301") -> dict:
    return {
        "schema_version": 1,
        "action_type": "worklist.create_item",
        "action_id": action_id,
        "timestamp": "2026-11-22T09:00:00Z",
        "source_system": "manage-breast-screening",
        "parameters": {
            "worklist_item": {
                "accession_number": accession,
                "participant": {
                    "nhs_number": nhs,
                    "name": "RELAY^TEST",
                    "birth_date": "1970-01-01",
                    "sex": "female",
                },
                "scheduled": {"date": "2026-11-22", "time": "14:30"},
                "procedure": {"modality": "MG", "study_description": "Screening"},
            }
        },
    }


async def cloud_send(emulator: RelayEmulator, message: dict | str, path: str = "actions") -> dict:
    """The cloud in the sender role: connect, send one action, read one reply."""
    text = message if isinstance(message, str) else json.dumps(message)
    reply = await send_action(
        RelayEndpoint(emulator.endpoint, emulator.namespace, path, KEY_NAME, KEY), text
    )
    return json.loads(reply)


async def health() -> dict:
    return {"healthy": True, "version": "test", "checks": {}}


@pytest.fixture
async def relay(tmp_path, nursery):
    emulator = await nursery.start(RelayEmulator({KEY_NAME: KEY}).run)
    worklist = WorklistStore(StatePaths(tmp_path))
    worklist.open()
    relay = Relay(emulator, worklist)
    yield relay
    worklist.close()


class Relay:
    def __init__(self, emulator: RelayEmulator, worklist: WorklistStore) -> None:
        self.emulator = emulator
        self.worklist = worklist
        self.actions = CloudActions(worklist, health)

    def listener(
        self,
        key: bytes = KEY,
        liveness: Liveness = Liveness(1.0, 0.5),  # noqa: B008
        token_lifetime: float = 3600.0,
        **options,
    ) -> RelayListener:
        endpoint = RelayEndpoint(
            self.emulator.endpoint, self.emulator.namespace, "actions", KEY_NAME, key
        )
        return RelayListener(
            name="listener-1",
            endpoint=attrs.evolve(endpoint, token_lifetime=token_lifetime),
            handle=self.actions.handle,
            liveness=liveness,
            **({"backoff": (0.0, 0.1)} | options),
        )

    async def listening(self, nursery, **options) -> RelayListener:
        listener = self.listener(**options)
        await nursery.start(listener.run)
        await wait_until(lambda: self.emulator.listener_count("actions") == 1)
        return listener


async def wait_until(condition) -> None:
    with trio.fail_after(10):
        while True:
            if condition():
                return
            await trio.sleep(0.01)


async def test_create_item_created_exists_and_conflict(relay, nursery):
    await relay.listening(nursery)
    with trio.fail_after(20):
        created = await cloud_send(relay.emulator, create_item("action-1"))
        again = await cloud_send(relay.emulator, create_item("action-1"))
        clash = await cloud_send(relay.emulator, create_item("action-2", nhs="9990000999"))
    assert (created["status"], created["action_id"]) == ("created", "action-1")
    assert created["study_instance_uid"].startswith("1.2.826.0.1.3680043.8.498.")
    assert again["status"] == "exists"
    assert (clash["status"], clash["code"]) == ("error", "conflict")
    assert "different patient_id" in clash["message"]
    item = relay.worklist.get("ACC-R1")
    assert item.source_message_id == "action-1"
    assert item.scheduled_at == datetime.datetime(2026, 11, 22, 14, 30, tzinfo=datetime.UTC)
    assert (item.patient_birth_date, item.patient_sex) == ("19700101", "F")


async def test_bad_requests_get_structured_errors_and_the_listener_keeps_serving(relay, nursery):
    listener = await relay.listening(nursery)
    missing_field = create_item("action-3")
    del missing_field["parameters"]["worklist_item"]["participant"]["nhs_number"]
    with trio.fail_after(20):
        malformed = await cloud_send(relay.emulator, "{not json")
        unknown = await cloud_send(relay.emulator, {"action_type": "fly", "action_id": "a-4"})
        invalid = await cloud_send(relay.emulator, missing_field)
        still = await cloud_send(relay.emulator, create_item("action-5"))
    assert malformed["status"] == "error"
    assert malformed["message"].startswith("malformed JSON")
    assert (unknown["status"], unknown["action_id"]) == ("error", "a-4")
    assert "unknown action_type 'fly'" in unknown["message"]
    assert invalid["status"] == "error"
    assert "parameters.worklist_item.participant.nhs_number" in invalid["message"]
    assert still["status"] == "created"
    assert listener.connected


async def test_status_updates_cancel_echo_and_health(relay, nursery):
    await relay.listening(nursery)
    with trio.fail_after(20):
        await cloud_send(relay.emulator, create_item("a-1"))
        updated = await cloud_send(
            relay.emulator,
            {
                "action_type": "worklist.update_status",
                "action_id": "a-2",
                "parameters": {
                    "worklist_item": {"accession_number": "ACC-R1", "status": "IN PROGRESS"}
                },
            },
        )
        cancelled = await cloud_send(
            relay.emulator,
            {
                "action_type": "worklist.cancel_item",
                "action_id": "a-3",
                "parameters": {"worklist_item": {"accession_number": "ACC-R1"}},
            },
        )
        unknown = await cloud_send(
            relay.emulator,
            {
                "action_type": "worklist.cancel_item",
                "action_id": "a-4",
                "parameters": {"worklist_item": {"accession_number": "NOPE"}},
            },
        )
        echo = await cloud_send(
            relay.emulator, {"action_type": "echo", "action_id": "a-5", "payload": {"ping": 1}}
        )
        healthy = await cloud_send(relay.emulator, {"action_type": "health", "action_id": "a-6"})
    assert updated["status"] == "updated"
    assert cancelled["status"] == "cancelled"
    assert relay.worklist.get("ACC-R1").status == "CANCELLED"
    assert (unknown["status"], unknown["code"]) == ("error", "not_found")
    assert echo == {"status": "echo", "payload": {"ping": 1}, "action_id": "a-5"}
    assert healthy["status"] == "ok"
    assert healthy["health"]["healthy"] is True


async def test_a_sender_with_no_listener_gets_404(relay):
    with trio.fail_after(10), pytest.raises(ConnectionRejected) as rejected:
        await cloud_send(relay.emulator, create_item("a-1"))
    assert rejected.value.status_code == 404


async def test_a_wrong_key_is_refused_at_the_handshake_and_counted(relay, nursery):
    listener = relay.listener(key=b"not-the-key")
    await nursery.start(listener.run)
    await wait_until(lambda: listener.failures["sas-token"] >= 2)
    assert not listener.connected
    assert ("sas-token", "signature does not match") in relay.emulator.refusals


async def test_a_zombie_control_channel_is_replaced_within_two_ping_intervals(relay, nursery):
    listener = await relay.listening(nursery, liveness=Liveness(2.0, 0.5))
    relay.emulator.freeze()  # no close, no pong: the connection just goes silent
    frozen_at = trio.current_time()
    await wait_until(lambda: listener.failures["control-channel"] >= 1)
    assert trio.current_time() - frozen_at <= 2 * 2.0  # within two ping intervals
    # The service, like the listener, notices the silent channel by its own pings and drops it.
    await wait_until(
        lambda: (
            listener.connected
            and any(kind == "listener-silent" for kind, _ in relay.emulator.refusals)
            and relay.emulator.listener_count("actions") == 1
        )
    )
    with trio.fail_after(20):
        reply = await cloud_send(relay.emulator, create_item("after-zombie"))
    assert reply["status"] == "created"


async def test_expired_token_closes_the_channel_with_1008(tmp_path, nursery):
    skew = [0.0]
    emulator = await nursery.start(
        RelayEmulator({KEY_NAME: KEY}, clock=lambda: time.time() + skew[0]).run
    )
    worklist = WorklistStore(StatePaths(tmp_path))
    worklist.open()
    relay = Relay(emulator, worklist)
    listener = await relay.listening(nursery, token_lifetime=3600.0)
    skew[0] = 7200  # the service's clock passes the token's expiry
    await wait_until(lambda: listener.failures["control-channel"] >= 1)
    assert ("expired", "listener-1") in emulator.refusals
    worklist.close()


def relay_settings(tmp_path, emulator: RelayEmulator) -> dict:
    (tmp_path / "relay.key").write_bytes(KEY + b"\n")
    return {
        "enabled": True,
        "namespace": emulator.namespace,
        "endpoint": emulator.endpoint,
        "key_file": str(tmp_path / "relay.key"),
        "ping_interval_s": 2,
        "ping_timeout_s": 1,
    }


def events_consumer(emulator: RelayEmulator, received: list[dict]) -> RelayListener:
    """The cloud on the events hybrid connection, acknowledging everything it receives."""
    return RelayListener(
        name="cloud-events",
        endpoint=RelayEndpoint(emulator.endpoint, emulator.namespace, "events", KEY_NAME, KEY),
        conversation=acknowledge(received.append),
    )


async def cloud_and_appliance(tmp_path, nursery):
    """The emulator, a cloud consumer acknowledging events, and the appliance with its relay."""
    emulator = await nursery.start(RelayEmulator({KEY_NAME: KEY}).run)
    received: list[dict] = []
    await nursery.start(events_consumer(emulator, received).run)
    app = ApplianceProcess(write_config(tmp_path, {"relay": relay_settings(tmp_path, emulator)}))
    app.start()
    await trio.to_thread.run_sync(app.wait_ready)
    await wait_until(lambda: emulator.listener_count("actions") == 1)
    return emulator, received, app


@pytest.mark.system
@pytest.mark.usefixtures("dcmtk")
async def test_a_cloud_action_reaches_the_modality_worklist_of_the_running_appliance(
    tmp_path, nursery
):
    emulator, received, app = await cloud_and_appliance(tmp_path, nursery)
    image = tmp_path / "lcc.dcm"
    synthetic.mammogram(shape=(128, 104), accession_number="ACC-R1").save_as(
        image, enforce_file_format=True
    )
    try:
        with trio.fail_after(30):
            created = await cloud_send(emulator, create_item("e2e-1"))
            [stored] = await trio.to_thread.run_sync(send_files, app.ports["storage"], [image])
            await wait_until(lambda: len(received) >= 2)
            health_reply = await cloud_send(emulator, {"action_type": "health", "action_id": "h"})
        found = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    "findscu",
                    "-W",
                    "-v",
                    "-aec",
                    "SCREENING_MWL",
                    "-k",
                    "PatientName",
                    "-k",
                    "AccessionNumber=ACC-R1",
                    "127.0.0.1",
                    str(app.ports["worklist"]),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
        )
    finally:
        app.__exit__()
    assert created["status"] == "created"
    assert "RELAY^TEST" in found.stderr
    health_checks = health_reply["health"]["checks"]
    assert health_reply["health"]["healthy"] is True
    assert (health_checks["storage_port"], health_checks["worklist_port"]) == (True, True)
    assert health_checks["relay"]["listener"]["connected"] is True
    assert stored.Status == 0x0000
    assert [e["event_type"] for e in received] == ["worklist.status_changed", "image.received"]
    assert {e["source_message_id"] for e in received} == {"e2e-1"}
    assert received[1]["payload"]["thumbnail"]
    assert len({e["event_id"] for e in received}) == 2


@pytest.mark.system
@pytest.mark.usefixtures("dcmtk")
async def test_create_test_item_runs_a_simulated_unit_whose_events_reach_the_cloud(
    tmp_path, nursery
):
    emulator, received, app = await cloud_and_appliance(tmp_path, nursery)
    action = create_item("test-participant-1", accession="TEST-0001")
    action["action_type"] = "worklist.create_test_item"
    try:
        with trio.fail_after(60):
            reply = await cloud_send(emulator, action)
            await wait_until(lambda: len(received) >= 6)
    finally:
        app.__exit__()
    assert (reply["status"], reply["test"]) == ("created", True)
    assert len(reply["stored_instances"]) == 4
    kinds = [event["event_type"] for event in received]
    assert kinds[0] == "mpps.in_progress"
    assert kinds.count("image.received") == 4
    assert "mpps.completed" in kinds
    assert all(event["payload"]["test"] is True for event in received)
    assert {event["source_message_id"] for event in received} == {"test-participant-1"}


async def test_a_dropped_rendezvous_is_counted_and_the_next_action_is_served(relay, nursery):
    listener = await relay.listening(nursery)
    relay.emulator.drop_rendezvous = 1
    with trio.fail_after(20):
        with pytest.raises(ConnectionRejected) as cut:
            await cloud_send(relay.emulator, create_item("lost"))
        served = await cloud_send(relay.emulator, create_item("served"))
    assert cut.value.status_code == 502
    assert listener.failures["rendezvous"] == 1
    assert served["status"] == "created"
    assert listener.connected


@pytest.mark.system
@pytest.mark.usefixtures("dcmtk")
async def test_undelivered_events_survive_an_appliance_kill_and_are_delivered_once(
    tmp_path, nursery
):
    emulator = await nursery.start(RelayEmulator({KEY_NAME: KEY}).run)
    config = write_config(tmp_path, {"relay": relay_settings(tmp_path, emulator)})
    image = tmp_path / "one.dcm"
    synthetic.mammogram(shape=(128, 104)).save_as(image, enforce_file_format=True)
    first = ApplianceProcess(config)
    first.start()
    try:  # the cloud is away: the event waits in the outbox
        await trio.to_thread.run_sync(first.wait_ready)
        [stored] = await trio.to_thread.run_sync(send_files, first.ports["storage"], [image])
        assert stored.Status == 0x0000
        await wait_until(lambda: "event=image.processed" in first.log())
        first.stop(signal.SIGKILL)
    finally:
        first.__exit__()
    received: list[dict] = []
    await nursery.start(events_consumer(emulator, received).run)
    second = ApplianceProcess(config)
    second.start()
    try:
        await trio.to_thread.run_sync(second.wait_ready)
        await wait_until(lambda: len(received) >= 1)
        await trio.sleep(1)  # time for a duplicate to show up, if one were coming
    finally:
        second.__exit__()
    assert [e["event_type"] for e in received] == ["image.received"]


def in_memory(emulator: RelayEmulator, nursery):
    """Open relay WebSockets over in-memory streams to the emulator: no sockets, so the test
    can run in virtual time."""

    @contextlib.asynccontextmanager
    async def connect(url: str, *, max_message_size: int, **timeouts):
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(emulator.serve_stream, server)
        async with (
            client,
            websocket_over(client, url, max_message_size=max_message_size, **timeouts) as ws,
        ):
            yield ws

    return connect


def virtual_relay(nursery, **listener_options):
    epoch = 1_800_000_000.0

    def clock() -> float:
        return epoch + trio.current_time()

    emulator = RelayEmulator({KEY_NAME: KEY}, namespace="relay.test:443", clock=clock)
    emulator.host, emulator.port = "relay.test", 443
    listener = RelayListener(
        name="listener-v",
        endpoint=RelayEndpoint(
            emulator.endpoint, emulator.namespace, "actions", KEY_NAME, KEY, token_lifetime=3600.0
        ),
        handle=echo_back,
        clock=clock,
        connect=in_memory(emulator, nursery),
        **listener_options,
    )
    return emulator, listener


async def echo_back(text: str) -> str:
    return text


async def test_token_renewal_keeps_one_channel_open_for_hours_in_virtual_time(
    autojump_clock, nursery
):
    emulator, listener = virtual_relay(nursery)
    await nursery.start(listener.run)
    await trio.sleep(3 * 3600 + 60)  # three token lifetimes
    assert listener.connected
    assert listener.renewals >= 3
    assert not listener.failures
    assert not [r for r in emulator.refusals if r[0] in ("expired", "renew")]


async def test_a_listener_that_never_renews_is_closed_with_1008_at_expiry(autojump_clock, nursery):
    emulator, listener = virtual_relay(nursery)

    async def never(control, expiry) -> None:
        await trio.sleep_forever()

    listener._renew = never  # a client that forgets to renew (as the NHS gateway's did)
    await nursery.start(listener.run)
    await trio.sleep(3599)
    assert not listener.failures
    await trio.sleep(2)
    assert listener.failures["control-channel"] == 1
    assert ("expired", "listener-v") in emulator.refusals
