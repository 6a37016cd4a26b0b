"""`appliance status`: one command tells an operator what the appliance is doing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from appliance.testing import synthetic
from tests.support import ApplianceProcess, send_files, write_config

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]


def status(config) -> tuple[int, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), "status", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, json.loads(result.stdout)


def test_status_shows_services_ports_traffic_and_backlog_then_not_running(tmp_path):
    config = write_config(tmp_path)
    image = tmp_path / "one.dcm"
    synthetic.mammogram(shape=(128, 104)).save_as(image, enforce_file_format=True)
    with ApplianceProcess(config) as app:
        assert send_files(app.ports["storage"], [image])[0].Status == 0x0000
        deadline = time.monotonic() + 20
        while True:  # the status file is rewritten every 2 s
            code, found = status(config)
            if found.get("ports", {}).get("storage") and found["outbox"]["undelivered"]:
                break
            assert time.monotonic() < deadline, found
            time.sleep(0.2)
        assert code == 0
        assert found["running"] is True
        assert {name: s["state"] for name, s in found["services"].items()} == {
            name: "up" for name in found["services"]
        }
        assert {"storage-scp", "worklist-scp", "image-pipeline"} <= found["services"].keys()
        assert found["ports"] == {
            "storage": app.ports["storage"],
            "worklist": app.ports["worklist"],
        }
        assert found["images_today"] == 1
        # No relay configured: the image's event waits in the outbox, and status says so.
        assert found["outbox"]["undelivered"] >= 1
        assert found["outbox"]["oldest_undelivered"]
        assert app.stop() == 0
    code, found = status(config)
    assert (code, found["running"]) == (1, False)
