"""`just demo`: the whole round trip on this machine, each part a real process.

relay emulator -> appliance (listening for actions, sending events) -> cloud events consumer;
the cloud creates a worklist item, a simulated mammography unit queries it, performs MPPS and
stores four views; the demo waits until the cloud has received and acknowledged every event.
Exits 0 when the round trip is complete, 1 naming what did not arrive.
"""

from __future__ import annotations

import datetime
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from appliance.testing.modality import ModalitySimulator, SimulationError

EXPECTED = [
    "mpps.in_progress",
    "image.received",
    "image.received",
    "image.received",
    "image.received",
    "mpps.completed",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def dicom_config(work: Path, storage_port: int, worklist_port: int) -> str:
    """The demos' config up to the cloud's sections: state under `work`, DICOM on loopback."""
    return f"""state_dir = "{work / "state"}"
[dicom]
host = "127.0.0.1"
[dicom.storage]
port = {storage_port}
min_free_mb = 0
[dicom.worklist]
port = {worklist_port}
"""


def step(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="appliance-demo-"))
    relay_port, storage_port, worklist_port = _free_port(), _free_port(), _free_port()
    (work / "relay.key").write_text("demo-relay-key\n")
    config = work / "appliance.toml"
    config.write_text(
        dicom_config(work, storage_port, worklist_port)
        + f"""[relay]
enabled = true
namespace = "127.0.0.1:{relay_port}"
endpoint = "ws://127.0.0.1:{relay_port}"
key_file = "{work / "relay.key"}"
appliance_id = "demo-site"
ping_interval_s = 5
ping_timeout_s = 2
"""
    )
    appliance = [sys.executable, "-m", "appliance", "--config", str(config)]
    dev = [sys.executable, "-m", "appliance.testing.dev", "--config", str(config)]
    logs = (work / "emulator.log").open("w"), (work / "appliance.log").open("w")
    processes: list[subprocess.Popen[Any]] = []
    received: list[dict[str, Any]] = []
    try:
        step(f"relay emulator on ws://127.0.0.1:{relay_port}")
        processes.append(
            subprocess.Popen(
                [
                    *dev,
                    "relay-emulator",
                    "--port",
                    str(relay_port),
                    "--key-file",
                    str(work / "relay.key"),
                ],
                stdout=logs[0],
                stderr=logs[0],
            )
        )
        _wait_for_port(relay_port)
        step(f"appliance: storage port {storage_port}, worklist port {worklist_port}")
        processes.append(subprocess.Popen([*appliance, "run"], stdout=logs[1], stderr=logs[1]))
        _wait_for_port(storage_port)
        _wait_for_port(worklist_port)
        step("cloud: listening for the appliance's events")
        consumer = subprocess.Popen(
            [*dev, "cloud", "events"],
            stdout=subprocess.PIPE,
            stderr=logs[0],
            text=True,
        )
        processes.append(consumer)

        def collect() -> None:
            assert consumer.stdout is not None  # started with stdout=PIPE
            for line in consumer.stdout:
                event = json.loads(line)
                received.append(event)
                payload = event["payload"]
                what = payload.get("laterality", "") + (payload.get("view_position") or "")
                step(f"cloud received {event['event_type']} {what} (acknowledged)")

        threading.Thread(target=collect, daemon=True).start()
        time.sleep(1.5)  # the appliance's listener and the consumer register with the relay

        today = datetime.datetime.now(datetime.UTC)
        action = {
            "action_type": "worklist.create_item",
            "action_id": "demo-action-1",
            "parameters": {
                "worklist_item": {
                    "accession_number": "DEMO0001",
                    "participant": {
                        "nhs_number": "9990000001",
                        "name": "DEMO^PARTICIPANT",
                        "birth_date": "1970-01-01",
                        "sex": "F",
                    },
                    "scheduled": {
                        "date": today.strftime("%Y-%m-%d"),
                        "time": today.strftime("%H:%M"),
                    },
                    "procedure": {"modality": "MG", "study_description": "Screening mammography"},
                }
            },
        }
        step("cloud -> appliance: worklist.create_item DEMO0001")
        reply = subprocess.run(
            [*dev, "cloud", "send", "-"],
            input=json.dumps(action),
            capture_output=True,
            text=True,
            timeout=60,
        )
        step(f"appliance replied: {reply.stdout.strip() or reply.stderr.strip()}")
        if '"created"' not in reply.stdout and '"exists"' not in reply.stdout:
            return 1
        unit = ModalitySimulator("127.0.0.1", worklist_port, storage_port, calling_ae="DEMO_UNIT")
        try:
            unit.run("DEMO0001", progress=lambda text: step(f"modality: {text}"))
        except SimulationError as exc:
            step(f"FAILED at phase {exc.phase}: {exc}")
            return 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(received) < len(EXPECTED):
            time.sleep(0.2)
        kinds = sorted(event["event_type"] for event in received)
        if kinds != sorted(EXPECTED):
            step(f"FAILED: the cloud received {kinds}, expected {sorted(EXPECTED)}")
            return 1
        step(f"round trip complete: {len(received)} events delivered and acknowledged")
        return 0
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(15)
        for handle in logs:
            handle.close()
        step(f"logs and state in {work}")


if __name__ == "__main__":
    raise SystemExit(main())
