"""Uploads to Manage through the running appliance: a kill -9 with uploads in flight, and an
upload's memory."""

from __future__ import annotations

import datetime
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from appliance.state import StatePaths
from appliance.testing import synthetic
from appliance.testing.entra import EntraEmulator
from appliance.testing.manage import ManageAction, ManageEmulator
from appliance.worklist.store import WorklistItem, WorklistStore
from tests.support import ApplianceProcess, index_rows, send_files, write_config

pytestmark = [
    pytest.mark.system,
    pytest.mark.usefixtures("dcmtk"),
    pytest.mark.skipif(os.geteuid() != 0, reason="Arc's key files live under /var/opt"),
]
AUDIENCE = "api://manage-test"


@pytest.fixture
def cloud():
    with EntraEmulator().running() as entra:
        manage = ManageEmulator(entra.jwks(), entra.issuer, AUDIENCE)
        with manage.running():
            yield entra, manage


def site(tmp_path: Path, entra: EntraEmulator, manage: ManageEmulator, accessions: list[str]):
    state = tmp_path / "state"
    state.mkdir()
    worklist = WorklistStore(StatePaths(state))
    worklist.open()
    now = datetime.datetime.now(datetime.UTC)
    for n, accession in enumerate(accessions):
        action = f"action-{accession}"
        worklist.create(
            WorklistItem(accession, f"99900077{n:02d}", "UP^LOAD", now, source_message_id=action)
        )
        manage.actions[action] = ManageAction(gateway_oid=entra.oid)
    worklist.close()
    settings = {"cloud": {"profile": "manage", "api_url": manage.url, "api_audience": AUDIENCE}}
    return write_config(tmp_path, settings)


def upload_states(state: Path) -> dict[str, str]:
    try:
        with sqlite3.connect(f"file:{state / 'pacs.db'}?mode=ro", uri=True) as db:
            return dict(db.execute("SELECT sop_instance_uid, state FROM uploads").fetchall())
    except sqlite3.OperationalError:
        return {}


def wait(condition, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_kill_9_with_uploads_in_flight_leaves_each_image_uploaded_once(tmp_path, cloud):
    entra, manage = cloud
    accessions = ["ACC-U1", "ACC-U2"]
    config = site(tmp_path, entra, manage, accessions)
    paths = []
    for accession in accessions:
        paths += synthetic.screening_study(
            tmp_path / accession, shape=(256, 208), accession_number=accession
        )
    sops = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    manage.delay_s = 0.3  # uploads stay in flight long enough to be cut
    first = ApplianceProcess(config, env=entra.environment())
    with first:
        assert all(r.Status == 0 for r in send_files(first.ports["storage"], paths))
        wait(lambda: len(manage.uploads(201)) >= 2)
        first.stop(signal.SIGKILL)
    assert len(manage.uploads(201)) < len(paths), "everything went before the kill"
    manage.delay_s = 0.0
    with ApplianceProcess(config, env=entra.environment()):
        wait(lambda: set(upload_states(tmp_path / "state").values()) == {"DONE"}
             and len(upload_states(tmp_path / "state")) == len(paths))  # fmt: skip
    # As Manage sees it: each image exactly once, whatever was sent twice.
    assert {sop for _action, sop in manage.instances} == sops
    assert len(manage.instances) == len(paths)


def test_an_upload_streams_from_disk(tmp_path, cloud):
    """A 90 MB mammogram goes up without the DICOM process holding it in memory."""
    entra, manage = cloud
    config = site(tmp_path, entra, manage, ["ACC-BIG"])
    big = tmp_path / "big.dcm"
    ds = synthetic.mammogram(shape=(64, 52), accession_number="ACC-BIG")
    rows = columns = 6700
    ds.Rows, ds.Columns = rows, columns
    del ds.PixelData
    ds.save_as(big, enforce_file_format=True)
    with big.open("r+b") as out:  # Pixel Data: its header, then a hole of zeros
        out.seek(0, os.SEEK_END)
        out.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (rows * columns * 2).to_bytes(4, "little"))
        out.truncate(out.tell() + rows * columns * 2)
    with ApplianceProcess(config, env=entra.environment()) as app:
        assert app.proc is not None
        assert send_files(app.ports["storage"], [big])[0].Status == 0
        before = _peak_rss_mb(app.proc.pid)
        wait(lambda: set(upload_states(tmp_path / "state").values()) == {"DONE"}, within=120)
        after = _peak_rss_mb(app.proc.pid)
    [row] = index_rows(tmp_path / "state")
    stored = tmp_path / "state" / "storage" / row["storage_path"]
    assert manage.received[str(ds.SOPInstanceUID)] == stored.read_bytes()  # as stored
    assert after - before < 30, f"peak RSS grew {after - before:.0f} MB during a 90 MB upload"


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def _selftest(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), "selftest", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_selftest_under_manage_proves_the_way_to_manage_and_uploads_nothing(tmp_path, cloud):
    """No event goes to a cloud under manage: the self-test's images pass the upload queue
    (kept from Manage, which knows no self-test action), and the appliance shows it holds a
    token for Manage's audience and reaches its health check."""
    entra, manage = cloud
    config = site(tmp_path, entra, manage, [])
    with ApplianceProcess(config, env=entra.environment()):
        result = _selftest(config, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    phases = [p["phase"] for p in report["phases"]]
    assert phases[-3:] == ["upload-queue", "manage-reachable", "cleanup"], phases
    queue = next(p for p in report["phases"] if p["phase"] == "upload-queue")
    assert queue["detail"] == "4 SKIPPED"
    assert ("GET", "", 200) in manage.log
    assert not [entry for entry in manage.log if entry[0] == "PUT"]
    assert upload_states(tmp_path / "state") == {}  # the test's rows went with its images


def test_selftest_under_manage_names_the_phase_when_manage_is_unreachable(tmp_path, cloud):
    entra, _manage = cloud
    unreachable = "http://127.0.0.1:9"  # nothing listens there
    cloud_settings = {"profile": "manage", "api_url": unreachable, "api_audience": AUDIENCE}
    config = write_config(tmp_path, {"cloud": cloud_settings})
    with ApplianceProcess(config, env=entra.environment()):
        result = _selftest(config)
    assert result.returncode != 0
    assert "manage-reachable FAILED: upload: ConnectError" in result.stdout, result.stdout
