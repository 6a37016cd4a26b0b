"""Relay outage and zombie relay, with the real appliance and the cloud consuming events.

Outage: the emulator is stopped while studies arrive, then started again on the same port;
every event is delivered, in order per study, and the consumer sees no event id twice.
Zombie: the emulator stops answering (frozen TCP, nothing closed); the appliance notices within
two ping intervals, reconnects, and delivery resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from appliance.relay.endpoint import Liveness, RelayEndpoint
from appliance.relay.listener import RelayListener
from appliance.testing import synthetic
from appliance.testing.cloud import acknowledge
from appliance.testing.relay_emulator import RelayEmulator
from tests.chaos import Result
from tests.support import ApplianceProcess, send_files, write_config

KEY_NAME, KEY = "RootManageSharedAccessKey", b"chaos-relay-key"
PING = 2.0


class Relay:
    """The emulator on a fixed port, in its own cancel scope, so it can stop and come back."""

    def __init__(self, port: int, namespace: str) -> None:
        self.port, self.namespace = port, namespace
        self.emulator: RelayEmulator | None = None
        self.scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> RelayEmulator:
        self.emulator = RelayEmulator({KEY_NAME: KEY}, namespace=self.namespace)

        async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as self.scope:
                await self.emulator.run(port=self.port, task_status=task_status)

        await nursery.start(serve)
        return self.emulator

    def stop(self) -> None:
        self.emulator.drop()
        self.scope.cancel()


def consumer(endpoint: str, namespace: str, received: list[dict]) -> RelayListener:
    return RelayListener(
        name="cloud-events",
        endpoint=RelayEndpoint(endpoint, namespace, "events", KEY_NAME, KEY),
        conversation=acknowledge(received.append),
        liveness=Liveness(PING, PING / 2),
        backoff=(0.0, 0.5, 1.0),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _undelivered(state: Path) -> int:
    import sqlite3

    total = 0
    for db in ("pacs.db", "worklist.db"):
        with sqlite3.connect(f"file:{state / db}?mode=ro", uri=True) as c:
            total += c.execute("SELECT count(*) FROM events WHERE delivered_at IS NULL").fetchone()[
                0
            ]
    return total


async def _scenario(work: Path, outage_s: float, studies: int) -> list[Result]:
    port = _free_port()
    namespace = f"127.0.0.1:{port}"
    endpoint = f"ws://127.0.0.1:{port}"
    (work / "relay.key").write_bytes(KEY)
    config = write_config(work, {"relay": {
        "enabled": True, "namespace": namespace, "endpoint": endpoint,
        "key_file": str(work / "relay.key"), "ping_interval_s": PING, "ping_timeout_s": PING / 2,
        "ack_timeout_s": 5,
    }})  # fmt: skip
    state = work / "state"
    received: list[dict] = []
    results = []
    relay = Relay(port, namespace)
    async with trio.open_nursery() as nursery:
        await relay.start(nursery)
        cloud = consumer(endpoint, namespace, received)
        nursery.start_soon(cloud.run)
        app = ApplianceProcess(config)
        app.start()
        try:
            await trio.to_thread.run_sync(app.wait_ready)
            # --- outage ---------------------------------------------------------------------
            relay.stop()
            outage_started = time.monotonic()
            stored = 0
            for number in range(studies):
                paths = synthetic.screening_study(
                    work / f"outage{number}", shape=(256, 208), accession_number=f"OUT{number:04d}"
                )
                answers = await trio.to_thread.run_sync(send_files, app.ports["storage"], paths)
                stored += sum(1 for a in answers if a is not None and a.Status == 0)
            backlog_during = await trio.to_thread.run_sync(_undelivered, state)
            await trio.sleep(max(0.0, outage_s - (time.monotonic() - outage_started)))
            await relay.start(nursery)
            back = time.monotonic()
            with trio.move_on_after(120):
                while await trio.to_thread.run_sync(_undelivered, state) or len(received) < stored:
                    await trio.sleep(0.5)
            drained_s = time.monotonic() - back
            ids = [e["event_id"] for e in received]
            broken = []
            left = await trio.to_thread.run_sync(_undelivered, state)
            if left:
                broken.append(f"{left} events still undelivered after the outage")
            if len(ids) != len(set(ids)):
                broken.append(f"{len(ids) - len(set(ids))} event ids seen twice")
            by_study: dict[str, list[str]] = {}
            for event in received:
                accession = event["payload"].get("accession_number")
                if accession:
                    by_study.setdefault(accession, []).append(event["occurred_at"])
            disordered = [a for a, times in by_study.items() if times != sorted(times)]
            if disordered:
                broken.append(f"{len(disordered)} studies with events out of order")
            results.append(Result("relay outage", not broken, {
                "outage_s": round(time.monotonic() - outage_started - drained_s, 1),
                "images": stored, "backlog_at_peak": backlog_during,
                "delivered": len(received), "drain_s": round(drained_s, 1),
            }, broken))  # fmt: skip
            # --- zombie ---------------------------------------------------------------------
            with trio.move_on_after(60):  # the listener may still be backing off after the outage
                while relay.emulator.listener_count("actions") < 1:
                    await trio.sleep(0.1)
            before = len(received)
            relay.emulator.freeze()  # every open connection goes silent; nothing is closed
            frozen = time.monotonic()
            noticed_s = resumed_s = None
            paths = synthetic.screening_study(work / "zombie", shape=(256, 208))
            await trio.to_thread.run_sync(send_files, app.ports["storage"], paths)
            with trio.move_on_after(60):
                while noticed_s is None or resumed_s is None:
                    if noticed_s is None and "no pong within" in app.log():
                        noticed_s = time.monotonic() - frozen
                    if resumed_s is None and len(received) >= before + 4:
                        resumed_s = time.monotonic() - frozen
                    await trio.sleep(0.1)
            broken = []
            if resumed_s is None:
                broken.append("event delivery did not resume after the zombie")
            if noticed_s is None or noticed_s > 2 * PING:
                broken.append(f"the listener noticed the zombie after {noticed_s} s (> 2 pings)")
            results.append(Result("zombie relay", not broken, {
                "ping_interval_s": PING,
                "listener_noticed_s": None if noticed_s is None else round(noticed_s, 1),
                "delivery_resumed_s": None if resumed_s is None else round(resumed_s, 1),
            }, broken))  # fmt: skip
        finally:
            app.__exit__()
            nursery.cancel_scope.cancel()
    return results


def run(work: Path, outage_s: float, studies: int) -> list[Result]:
    return trio.run(_scenario, work, outage_s, studies)
