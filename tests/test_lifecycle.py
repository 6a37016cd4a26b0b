"""The appliance process as systemd sees it: READY, WATCHDOG, STOPPING, exit codes."""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from tests.support import ApplianceProcess, write_config

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]


def echoscu(port: int, ae_title: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aec", ae_title, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_ready_watchdog_stopping_in_order_and_both_ports_echo(tmp_path):
    app = ApplianceProcess(write_config(tmp_path), env={"WATCHDOG_USEC": "1000000"})
    with app:
        assert echoscu(app.ports["storage"], "SCREENING_PACS").returncode == 0
        assert echoscu(app.ports["worklist"], "SCREENING_MWL").returncode == 0
        app.notify.wait_for("WATCHDOG", timeout=5)
        assert app.stop(signal.SIGTERM, timeout=10) == 0
        app.notify.wait_for("STOPPING", timeout=1)
    kinds = [key for message in app.notify.received for key in message if key != "STATUS"]
    assert kinds.index("READY") < kinds.index("WATCHDOG") < kinds.index("STOPPING")
    assert "WATCHDOG" not in kinds[kinds.index("STOPPING") :]
    assert "event=appliance.stopped" in app.log()


def test_called_ae_title_must_match(tmp_path):
    with ApplianceProcess(write_config(tmp_path)) as app:
        refused = echoscu(app.ports["storage"], "SOME_OTHER_AE")
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stderr


def _occupied_port() -> socket.socket:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    return blocker


def test_ready_is_withheld_while_a_port_cannot_be_bound(tmp_path):
    blocker = _occupied_port()
    port = blocker.getsockname()[1]
    app = ApplianceProcess(write_config(tmp_path, {"dicom": {"storage": {"port": port}}}))
    try:
        app.start()
        # The storage server fails to bind and is restarted; systemd hears why, but no READY.
        while "storage-scp=restarting" not in app.notify.wait_for("STATUS", timeout=20)["STATUS"]:
            pass
        assert not any("READY" in message for message in app.notify.received)
        blocker.close()
        assert app.wait_ready(timeout=20)["storage"] == port
        assert echoscu(port, "SCREENING_PACS").returncode == 0
        assert app.stop() == 0
    finally:
        blocker.close()
        app.__exit__()
    assert "event=service.crashed" in app.log()
    assert "Address already in use" in app.log()


def test_exhausted_restart_budget_exits_non_zero(tmp_path):
    blocker = _occupied_port()
    port = blocker.getsockname()[1]
    override = {"dicom": {"worklist": {"port": port}}, "supervisor": {"max_restarts": 1}}
    app = ApplianceProcess(write_config(tmp_path, override))
    try:
        assert app.start().proc.wait(timeout=30) == 1
    finally:
        blocker.close()
        app.__exit__()
    assert "event=appliance.failed phase=supervision service_name=worklist-scp" in app.log()
    assert not any("READY" in message for message in app.notify.received)
