"""`just demo --profile manage`: the NHS Manage round trip on this machine.

A test tenant (Azure Arc's HIMDS endpoint and the tenant's keys), a relay namespace that accepts
only that tenant's bearer tokens for the listener, an emulator of Manage's image API, and the
appliance (profile manage, relay.auth entra) as its own process. Manage creates a worklist item
over the relay; a simulated mammography unit queries the worklist, performs MPPS and stores
four views; the demo waits until Manage has answered 201 to each upload. Exits 0 when the round
trip is complete, 1 naming what did not arrive.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from appliance.relay.endpoint import RelayEndpoint
from appliance.testing.cloud import send_action
from appliance.testing.demo import _free_port, _wait_for_port, dicom_config, step
from appliance.testing.entra import EntraEmulator
from appliance.testing.manage import ManageAction, ManageEmulator
from appliance.testing.modality import ModalitySimulator, SimulationError
from appliance.testing.relay_emulator import EntraTrust, RelayEmulator

AUDIENCE = "api://manage-demo"
CLOUD_KEY = b"manage-demo-sender-key"
NAMESPACE = "relay-manbrs-demo.servicebus.windows.net"


def _relay_in_a_thread(trust: EntraTrust, port: int) -> None:
    relay = RelayEmulator({"manage": CLOUD_KEY}, namespace=NAMESPACE, entra=trust)

    async def serve() -> None:
        await relay.run("127.0.0.1", port)

    threading.Thread(target=trio.run, args=(serve,), daemon=True).start()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="appliance-demo-manage-"))
    relay_port, storage_port, worklist_port = _free_port(), _free_port(), _free_port()
    action_id = str(uuid.uuid4())
    accession = "ACC" + datetime.date.today().strftime("%Y%m%d") + "0DE1"
    with EntraEmulator().running() as entra:
        manage = ManageEmulator(entra.jwks(), entra.issuer, AUDIENCE)
        manage.actions[action_id] = ManageAction(gateway_oid=entra.oid)
        with manage.running():
            step(f"tenant {entra.tenant_id}: the gateway's identity is oid {entra.oid}")
            _relay_in_a_thread(EntraTrust(entra.jwks(), (entra.issuer,)), relay_port)
            _wait_for_port(relay_port)
            step(f"relay namespace on ws://127.0.0.1:{relay_port} (listeners: Entra tokens only)")
            step(f"Manage's API on {manage.url}")
            config = work / "appliance.toml"
            config.write_text(
                dicom_config(work, storage_port, worklist_port)
                + f"""[relay]
enabled = true
auth = "entra"
namespace = "{NAMESPACE}"
endpoint = "ws://127.0.0.1:{relay_port}"
ping_interval_s = 5
ping_timeout_s = 2
[cloud]
profile = "manage"
api_url = "{manage.url}"
api_audience = "{AUDIENCE}"
"""
            )
            log = (work / "appliance.log").open("w")
            environment = {**os.environ, **entra.environment()}
            appliance = subprocess.Popen(
                [sys.executable, "-m", "appliance", "--config", str(config), "run"],
                stdout=log,
                stderr=log,
                env=environment,
            )
            try:
                return _round_trip(
                    work, manage, action_id, accession, relay_port, storage_port, worklist_port
                )
            finally:
                appliance.terminate()
                appliance.wait(15)
                log.close()
                step(f"logs and state in {work}")


def _round_trip(
    work: Path,
    manage: ManageEmulator,
    action_id: str,
    accession: str,
    relay_port: int,
    storage_port: int,
    worklist_port: int,
) -> int:
    _wait_for_port(storage_port)
    _wait_for_port(worklist_port)
    step(f"appliance: storage port {storage_port}, worklist port {worklist_port}")
    now = datetime.datetime.now(datetime.UTC)
    action: dict[str, Any] = {
        "schema_version": 1,
        "action_id": action_id,
        "action_type": "worklist.create_item",
        "timestamp": now.isoformat(),
        "source_system": "manage-breast-screening",
        "source_reference": {"appointment_id": str(uuid.uuid4()), "participant_id": "p-1"},
        "parameters": {
            "worklist_item": {
                "accession_number": accession,
                "participant": {
                    "nhs_number": "9990000001",
                    "name": "DEMO^PARTICIPANT",
                    "birth_date": "19700101",
                    "sex": "F",
                },
                "scheduled": {"date": now.strftime("%Y%m%d"), "time": now.strftime("%H%M%S")},
                "procedure": {"modality": "MG", "study_description": "Breast screening"},
            }
        },
    }
    sender = RelayEndpoint(
        f"ws://127.0.0.1:{relay_port}", NAMESPACE, "actions", "manage", CLOUD_KEY
    )
    reply = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until the appliance's listener has its token
        try:
            reply = trio.run(send_action, sender, json.dumps(action))
            break
        except Exception:  # no listener yet: the relay answers 404
            time.sleep(0.5)
    step(f"Manage -> appliance: worklist.create_item {accession}; reply {reply}")
    if json.loads(reply or "{}").get("status") not in ("created", "exists"):
        return 1
    unit = ModalitySimulator("127.0.0.1", worklist_port, storage_port, calling_ae="DEMO_UNIT")
    try:
        unit.run(accession, progress=lambda text: step(f"modality: {text}"))
    except SimulationError as exc:
        step(f"FAILED at phase {exc.phase}: {exc}")
        return 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(manage.uploads(201)) < 4:
        time.sleep(0.2)
    uploaded = len(manage.uploads(201))
    for _action, sop in manage.instances:
        step(f"Manage: 201 for {sop}")
    if uploaded < 4:
        step(f"FAILED: Manage acknowledged {uploaded} uploads, expected 4; see {work}")
        return 1
    step(f"round trip complete: {uploaded} images uploaded, each answered 201")
    _rest_of_the_session(sender, action, accession)
    answered = {f"{method} {status}": 0 for method, _action, status in manage.log}
    for method, _action, status in manage.log:
        answered[f"{method} {status}"] += 1
    step(f"what Manage's API answered in the session: {answered}")
    return 0


def _rest_of_the_session(sender: RelayEndpoint, create: dict[str, Any], accession: str) -> None:
    """The other actions Manage sends in a clinic session, each with the appliance's reply."""

    def envelope(action_type: str, parameters: dict[str, Any]) -> dict[str, Any]:
        return create | {
            "action_id": str(uuid.uuid4()),
            "action_type": action_type,
            "parameters": parameters,
        }

    def status(accession_number: str, value: str) -> dict[str, Any]:
        item = {"accession_number": accession_number, "status": value}
        return envelope("worklist.update_status", {"worklist_item": item})

    for label, action in (
        ("create_item again (Manage retried)", create),
        ("health", envelope("health", {})),
        ("update_status COMPLETED", status(accession, "completed")),
        ("update_status of an unknown accession", status("ACC000000000000", "completed")),
        ("an action this gateway does not know", envelope("worklist.delete_item", {})),
    ):
        reply = trio.run(send_action, sender, json.dumps(action))
        shown = json.loads(reply)
        if "health" in shown:  # the health block's checks, in brief
            checks = shown["health"]["checks"]
            shown["health"]["checks"] = {name: check["ok"] for name, check in checks.items()}
        step(f"Manage -> appliance: {label}; reply {json.dumps(shown)}")


if __name__ == "__main__":
    raise SystemExit(main())
