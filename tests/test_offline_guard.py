"""Commands that must not run beside a live appliance refuse; those that only read, or that
the appliance can do itself, go on. One guard: the state directory's lock, held by the
appliance for as long as it runs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pydicom
import pytest

from appliance.state import StatePaths
from appliance.testing import synthetic
from tests.support import ApplianceProcess, index_rows, send_files, write_config

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]


def appliance_cli(config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def stored_image(tmp_path, port: int) -> str:
    path = tmp_path / "in.dcm"
    synthetic.mammogram(shape=(96, 80)).save_as(path, enforce_file_format=True)
    assert [r.Status for r in send_files(port, [path])] == [0]
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_fsck_beside_the_running_appliance_checks_and_refuses_to_repair(tmp_path):
    config = write_config(tmp_path)
    paths = StatePaths(tmp_path / "state")
    with ApplianceProcess(config) as app:
        uid = stored_image(tmp_path, app.ports["storage"])
        # A file being received right now: fsck must not touch it.
        live = paths.spool / "rx-in-progress.dcm"
        live.write_bytes(b"\0" * 1024)
        clean = appliance_cli(config, "fsck")
        paths.absolute(paths.relative_path(uid)).unlink()  # now a repair is needed
        refused = appliance_cli(config, "fsck")
        assert live.exists()
        rows = index_rows(paths.state_dir)
        assert app.stop() == 0
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "1 indexed instances" in clean.stdout
    assert refused.returncode == 2
    assert "missing 1" in refused.stdout  # what a repair would do, reported
    assert "stop it" in refused.stderr
    assert [row["status"] for row in rows] == ["STORED"]  # nothing was changed
    repaired = appliance_cli(config, "fsck")  # stopped: the repair runs
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    assert [row["status"] for row in index_rows(paths.state_dir)] == ["MISSING"]


def test_outbox_changes_wait_for_the_appliance_to_stop(tmp_path):
    config = write_config(tmp_path)
    with ApplianceProcess(config):
        retry = appliance_cli(config, "outbox", "retry", "--all")
        purge = appliance_cli(config, "outbox", "purge")
        listing = appliance_cli(config, "outbox", "list")
    assert (retry.returncode, purge.returncode) == (2, 2)
    assert "the appliance is running" in retry.stderr
    assert listing.returncode == 0  # reading is always fine
    assert appliance_cli(config, "outbox", "purge").returncode == 0


def test_worklist_changes_beside_the_appliance_are_made_by_it(tmp_path):
    config = write_config(tmp_path)
    with ApplianceProcess(config):
        added = appliance_cli(
            config, "worklist", "add", "ACC-CLI-1", "9990000901", "CLI^TEST",
            "--scheduled", "2026-12-02 10:00",
        )  # fmt: skip
        listed = appliance_cli(config, "worklist", "list", "--json")
        cancelled = appliance_cli(config, "worklist", "cancel", "ACC-CLI-1")
        again = appliance_cli(config, "worklist", "cancel", "ACC-UNKNOWN")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("created: ACC-CLI-1 study ")
    assert [json.loads(line)["accession_number"] for line in listed.stdout.splitlines()] == [
        "ACC-CLI-1"
    ]
    assert cancelled.returncode == 0, cancelled.stderr
    assert again.returncode == 1
    assert "ACC-UNKNOWN" in again.stderr
    with sqlite3.connect(tmp_path / "state" / "worklist.db") as db:
        [(status, source)] = db.execute(
            "SELECT status, source_message_id FROM worklist_items"
        ).fetchall()
    assert status == "CANCELLED"
    assert source == "cli-ACC-CLI-1"  # written by the appliance, from the command's request


def test_a_second_appliance_on_the_same_state_directory_does_not_start(tmp_path):
    config = write_config(tmp_path)
    with ApplianceProcess(config):
        second = appliance_cli(config, "run")
    assert second.returncode == 1
    assert "in use" in second.stdout + second.stderr
