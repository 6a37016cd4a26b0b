"""Restart recovery and `appliance fsck`: files and index reconciled, problems reported."""

from __future__ import annotations

import subprocess
import sys

import pydicom
import pytest

from appliance.state import StatePaths
from appliance.testing import synthetic
from tests.support import ApplianceProcess, index_rows, send_files, write_config

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]


def image(tmp_path, name: str):
    path = tmp_path / "in" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    synthetic.mammogram(shape=(128, 128)).save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


def fsck(config_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "fsck", "--config", str(config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_restart_reindexes_unindexed_files_and_flags_missing_ones(tmp_path):
    config_path = write_config(tmp_path)
    state = tmp_path / "state"
    layout = StatePaths(state)
    kept, kept_uid = image(tmp_path, "kept.dcm")
    lost, lost_uid = image(tmp_path, "lost.dcm")
    with ApplianceProcess(config_path) as app:
        assert [r.Status for r in send_files(app.ports["storage"], [kept, lost])] == [0, 0]
        assert app.stop() == 0

    # A crash between placing a file and indexing it leaves a file without a row; a disk
    # problem leaves a row without its file.
    import sqlite3

    with sqlite3.connect(state / "pacs.db") as db:
        db.execute("DELETE FROM stored_instances WHERE sop_instance_uid = ?", (kept_uid,))
    layout.absolute(layout.relative_path(lost_uid)).unlink()

    with ApplianceProcess(config_path) as app:
        assert "files_reindexed=1 " in app.log()
        assert "rows_missing=1 " in app.log()
        rows = {row["sop_instance_uid"]: row for row in index_rows(state)}
        assert rows[kept_uid]["status"] == "STORED"
        assert rows[lost_uid]["status"] == "MISSING"
        # The modality re-sends the lost image: restored, not refused as a duplicate.
        assert send_files(app.ports["storage"], [lost])[0].Status == 0x0000
        assert {row["status"] for row in index_rows(state)} == {"STORED"}


def test_fsck_verifies_hashes_flags_corruption_and_shows_progress(tmp_path):
    config_path = write_config(tmp_path)
    state = tmp_path / "state"
    paths = [image(tmp_path, f"{n}.dcm") for n in range(3)]
    with ApplianceProcess(config_path) as app:
        send_files(app.ports["storage"], [path for path, _ in paths])
        assert app.stop() == 0

    clean = fsck(config_path, "--verify-hashes")
    assert clean.returncode == 0, clean.stderr
    assert "hashes verified 3" in clean.stdout
    assert "fsck: verify 3/3 (100%)" in clean.stderr

    layout = StatePaths(state)
    victim = layout.absolute(layout.relative_path(paths[1][1]))
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the pixel data
    victim.write_bytes(bytes(data))

    assert fsck(config_path).returncode == 0  # without --verify-hashes, sizes are not enough
    found = fsck(config_path, "--verify-hashes")
    assert found.returncode == 1
    assert "corrupt 1" in found.stdout
    statuses = {row["sop_instance_uid"]: row["status"] for row in index_rows(state)}
    assert statuses[paths[1][1]] == "CORRUPT"
    assert [statuses[uid] for _, uid in (paths[0], paths[2])] == ["STORED", "STORED"]


def test_a_deletion_a_crash_interrupted_is_finished_never_undone(tmp_path):
    """Retention and a test participant's removal mark rows DELETING, remove the files, then the
    rows. Killed in between, the next start finishes the deletion: the file is not re-indexed
    (which would bring back an image that was being deleted) nor the row flagged missing."""
    import sqlite3

    config_path = write_config(tmp_path)
    state = tmp_path / "state"
    layout = StatePaths(state)
    with_file, with_file_uid = image(tmp_path, "a.dcm")
    without_file, without_file_uid = image(tmp_path, "b.dcm")
    with ApplianceProcess(config_path) as app:
        assert [r.Status for r in send_files(app.ports["storage"], [with_file, without_file])] == [
            0,
            0,
        ]
        assert app.stop() == 0
    with sqlite3.connect(state / "pacs.db") as db:
        db.execute("UPDATE stored_instances SET status = 'DELETING'")
    layout.absolute(layout.relative_path(without_file_uid)).unlink()  # got that far

    with ApplianceProcess(config_path) as app:
        assert "deletions_finished=2 " in app.log()
        assert "files_reindexed=0 " in app.log()
        assert "rows_missing=0 " in app.log()
        assert index_rows(state) == []
        assert not layout.absolute(layout.relative_path(with_file_uid)).exists()
        assert app.stop() == 0
