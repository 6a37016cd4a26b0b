"""The events outbox and its sender, through the relay emulator: in order, at least once, and
never twice to a consumer that acknowledges."""

from __future__ import annotations

import datetime
import socket
import sqlite3
import subprocess
import sys

import pytest
import trio

from appliance import outbox
from appliance.outbox import Outbox
from appliance.relay.endpoint import Liveness, RelayEndpoint
from appliance.relay.listener import RelayListener
from appliance.relay.sender import RelaySender
from appliance.state import StatePaths
from appliance.storage.store import InstanceStore
from appliance.testing.cloud import acknowledge
from appliance.testing.relay_emulator import RelayEmulator
from appliance.worklist.store import WorklistStore
from tests.support import write_config

KEY_NAME, KEY = "RootManageSharedAccessKey", b"outbox-test-key"


_STORES: dict = {}


def make_state(tmp_path) -> Outbox:
    """Both databases, opened by their owners, and the outbox over them."""
    paths = StatePaths(tmp_path)
    worklist, images = WorklistStore(paths), InstanceStore(paths)
    worklist.open()
    images.open()
    _STORES[tmp_path] = (worklist.database, images.database)
    return Outbox({"worklist": worklist.database, "images": images.database})


def add_events(tmp_path, count: int) -> list[str]:
    """Alternate between the two databases, as MPPS and image events interleave."""
    ids = []
    for n in range(count):
        database = _STORES[tmp_path][0 if n % 2 else 1]

        def insert(database=database, n=n) -> str:
            with database.transaction():
                return outbox.record(
                    database, f"test.{n}", {"n": n}, accession_number="ACC", source_message_id="m"
                )

        ids.append(database.run_sync(insert))
    return ids


def sender(emulator: RelayEmulator, outbox, **options) -> RelaySender:
    return RelaySender(
        outbox=outbox,
        endpoint=RelayEndpoint(emulator.endpoint, emulator.namespace, "events", KEY_NAME, KEY),
        appliance_id="site-test",
        **({"ack_timeout": 2.0, "backoff": (0.0, 0.2)} | options),
    )


def consumer(emulator: RelayEmulator, conversation) -> RelayListener:
    return RelayListener(
        name="cloud",
        endpoint=RelayEndpoint(emulator.endpoint, emulator.namespace, "events", KEY_NAME, KEY),
        conversation=conversation,
        liveness=Liveness(1.0, 0.5),
        backoff=(0.0, 0.1),
    )


async def wait_until(condition) -> None:
    with trio.fail_after(20):
        while True:
            if condition():
                return
            await trio.sleep(0.02)


async def test_events_leave_in_order_once_each_and_are_marked_delivered(tmp_path, nursery):
    outbox = make_state(tmp_path)
    ids = add_events(tmp_path, 12)
    emulator = await nursery.start(RelayEmulator({KEY_NAME: KEY}).run)
    received: list[dict] = []
    await nursery.start(consumer(emulator, acknowledge(received.append)).run)
    await wait_until(lambda: emulator.listener_count("events") == 1)
    await nursery.start(sender(emulator, outbox).run)
    await wait_until(lambda: len(received) == 12)
    await wait_until(lambda: not outbox.pending())
    assert [e["event_id"] for e in received] == ids
    assert received[0] | {"payload": None} == {
        "event_id": ids[0],
        "event_type": "test.0",
        "occurred_at": received[0]["occurred_at"],
        "appliance_id": "site-test",
        "source_message_id": "m",
        "payload": None,
    }
    assert all(row["delivered_at"] for row in outbox.listing(include_delivered=True))


async def test_a_long_outage_only_delays_delivery(tmp_path, nursery):
    outbox = make_state(tmp_path)
    ids = add_events(tmp_path, 5)
    emulator = await nursery.start(RelayEmulator({KEY_NAME: KEY}).run)
    relay_sender = sender(emulator, outbox)
    await nursery.start(relay_sender.run)
    await wait_until(lambda: relay_sender.failures["connect"] >= 3)  # 404: the cloud is away
    assert len(outbox.pending()) == 5
    received: list[dict] = []
    await nursery.start(consumer(emulator, acknowledge(received.append)).run)
    await wait_until(lambda: len(received) == 5)
    assert [e["event_id"] for e in received] == ids


async def test_an_unacknowledged_event_is_sent_again(tmp_path, nursery):
    outbox = make_state(tmp_path)
    ids = add_events(tmp_path, 3)
    emulator = await nursery.start(RelayEmulator({KEY_NAME: KEY}).run)
    seen: list[str] = []
    crashed = []

    async def crashes_once(ws) -> None:
        if not crashed:  # the cloud dies after reading the first event, before acking it
            seen.append(await ws.get_message())
            crashed.append(True)
            await ws.aclose()
            return
        await acknowledge(lambda envelope: seen.append(envelope["event_id"]))(ws)

    await nursery.start(consumer(emulator, crashes_once).run)
    await wait_until(lambda: emulator.listener_count("events") == 1)
    relay_sender = sender(emulator, outbox)
    await nursery.start(relay_sender.run)
    await wait_until(lambda: len(seen) == 4)
    assert seen[1:] == ids  # the first event again, then the rest, each once after its ack
    assert ids[0] in seen[0]
    assert relay_sender.failures["send"] + relay_sender.failures["ack"] >= 1


@pytest.mark.system
def test_outbox_command_lists_retries_and_purges(tmp_path):
    config = write_config(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    make_state(state)
    ids = add_events(state, 2)

    def outbox(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "--config", str(config), "outbox", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = outbox("list").stdout
    assert all(event_id in listed for event_id in ids)
    assert listed.count("pending") == 2
    with sqlite3.connect(state / "pacs.db") as db:  # the cloud acknowledged it
        db.execute("UPDATE events SET delivered_at = 'now' WHERE event_id = ?", (ids[0],))
    assert ids[0] not in outbox("list").stdout
    assert outbox("retry", ids[0]).stdout.startswith("outbox retry: 1 event(s)")
    assert ids[0] in outbox("list").stdout
    assert outbox("retry").returncode == 2
    assert "0 delivered event(s)" in outbox("purge").stdout


async def test_events_wait_out_a_relay_that_is_down_entirely(tmp_path, nursery):
    outbox = make_state(tmp_path)
    ids = add_events(tmp_path, 4)
    with socket.socket() as probe:  # a port with nothing behind it yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    waiting = RelayEmulator({KEY_NAME: KEY})
    waiting.port, waiting._namespace = port, f"127.0.0.1:{port}"
    relay_sender = sender(waiting, outbox)
    await nursery.start(relay_sender.run)
    await wait_until(lambda: relay_sender.failures["connect"] >= 2)  # connection refused
    emulator = await nursery.start(RelayEmulator({KEY_NAME: KEY}).run, "127.0.0.1", port)
    received: list[dict] = []
    await nursery.start(consumer(emulator, acknowledge(received.append)).run)
    await wait_until(lambda: len(received) == 4)
    assert [e["event_id"] for e in received] == ids


def test_delivered_events_are_purged_after_the_retention_period_and_pending_ones_never(tmp_path):
    outbox = make_state(tmp_path)
    old, recent, pending = add_events(tmp_path, 3)
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    for event_id, delivered_at in ((old, "2026-01-01T00:00:00.000+00:00"), (recent, now)):
        for name in ("worklist.db", "pacs.db"):
            with sqlite3.connect(tmp_path / name) as db:  # the cloud acknowledged it then
                db.execute(
                    "UPDATE events SET delivered_at = ? WHERE event_id = ?",
                    (delivered_at, event_id),
                )
    relay_sender = RelaySender(
        outbox=outbox,
        endpoint=RelayEndpoint("ws://127.0.0.1:9", "ns", "events", KEY_NAME, KEY),
        appliance_id="t",
        retention_days=30,
    )
    assert relay_sender.purge_delivered() == 1
    remaining = {row["event_id"] for row in outbox.listing(include_delivered=True)}
    assert remaining == {recent, pending}
