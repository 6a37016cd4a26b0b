"""The clinic keeps imaging on a real small filesystem (a loop-mounted ext4 image, root): filled to
0 bytes by another writer, filled during a 1 GB receive, derived/ unwritable. Each ends in a
DICOM status or an image.failed, never in an exit; freeing space resumes everything."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from appliance.status import STALE_AFTER
from appliance.testing import synthetic
from tests.support import (
    ApplianceProcess,
    SmallDisk,
    index_rows,
    large_object,
    send_files,
    write_config,
)

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("dcmtk")]

FLOOR_MB = 16


def _appliance(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [".venv/bin/appliance", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _echo(port: int) -> int:
    return subprocess.run(
        ["echoscu", "-aec", "SCREENING_PACS", "127.0.0.1", str(port)], capture_output=True
    ).returncode


def _image(directory: Path, name: str) -> Path:
    path = directory / f"{name}.dcm"
    synthetic.mammogram(shape=(512, 416)).save_as(path, enforce_file_format=True)
    return path


def assert_one_event_per_line(log: str) -> None:
    """Tracebacks folded into their event: journald keeps each event whole."""
    strays = [line for line in log.splitlines() if not line.startswith("ts=")]
    assert not strays, strays[:5]


def _status(config: Path) -> dict:
    return json.loads(_appliance("status", "--json", config=config).stdout)


def _status_once(config: Path, ready, timeout: float = 10.0) -> dict:
    """`appliance status --json` once the status file shows `ready` (written every few s)."""
    deadline = time.monotonic() + timeout
    while not ready(found := _status(config)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


def test_a_disk_filled_to_zero_by_another_writer_refuses_stores_and_stays_alive(tmp_path):
    with SmallDisk(tmp_path, 96) as disk:
        config = write_config(
            tmp_path,
            {
                "state_dir": str(disk.mount / "state"),
                "dicom": {"storage": {"port": 0, "min_free_mb": FLOOR_MB}},
            },
        )
        with ApplianceProcess(config) as app:
            port = app.ports["storage"]
            [first] = send_files(port, [_image(tmp_path, "before")])
            assert first.Status == 0
            disk.fill()
            assert disk.free_bytes() == 0
            [refused] = send_files(port, [_image(tmp_path, "full")])
            assert refused.Status == 0xA700
            assert "disk space" in refused.ErrorComment
            time.sleep(6)  # several status refreshes fail meanwhile
            assert app.proc.poll() is None, app.log()
            assert _echo(port) == 0
            status = _status(config)
            assert status["running"] is True  # not "NOT RUNNING" because status.json is stale
            assert status["disk"]["ok"] is False
            assert status["disk"]["free_bytes"] < 1024 * 1024  # what the refused spool gave back
            human = _appliance("status", config=config).stdout
            assert "appliance: running" in human
            assert "BELOW THE FLOOR" in human
            assert app.stop() == 0
        assert "status.write_failed" in app.log()

        # A restart on the full disk: read-only duties work, C-STORE is refused until space.
        with ApplianceProcess(config) as app:
            port = app.ports["storage"]
            assert _echo(port) == 0
            find = subprocess.run(
                ["findscu", "-W", "-aec", "SCREENING_MWL", "-k", "PatientName",
                 "127.0.0.1", str(app.ports["worklist"])], capture_output=True,
            )  # fmt: skip
            assert find.returncode == 0
            [refused] = send_files(port, [_image(tmp_path, "still-full")])
            assert refused.Status == 0xA700
            # The start released the emergency reserve, so status.json could be written; the
            # other writer takes that too, and the file goes stale while the process runs.
            disk.fill()
            time.sleep(STALE_AFTER + 1)
            status = _status(config)
            assert status["running"] is True  # asked over the control socket, not the file
            assert status["asked_live"] is True
            assert status["services"]["storage-scp"]["state"] == "up"
            disk.free()  # the operator removes the other writer's files
            [stored] = send_files(port, [_image(tmp_path, "after")])
            assert stored.Status == 0
            assert app.stop() == 0
        assert_one_event_per_line(app.log())
        assert len(index_rows(disk.mount / "state")) == 2
        fsck = _appliance("fsck", "--verify-hashes", config=config)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert list((disk.mount / "state" / "spool").iterdir()) == []


def test_a_disk_filling_during_a_1gb_receive_refuses_that_store_and_keeps_the_association(
    tmp_path,
):
    tomo = large_object(tmp_path / "tomo.dcm", 1024 * 1024 * 1024)  # outside the small disk
    with SmallDisk(tmp_path, 320) as disk:
        config = write_config(
            tmp_path,
            {
                "state_dir": str(disk.mount / "state"),
                "dicom": {"storage": {"port": 0, "min_free_mb": 64}},
            },
        )
        with ApplianceProcess(config) as app:
            disk.fill(leave_bytes=240 * 1024 * 1024)  # 240 MB free, 64 MB floor, 1 GB object
            small = _image(tmp_path, "next")
            _config.STORE_SEND_CHUNKED_DATASET = True
            ae = AE("MODALITY1")
            for path in (tomo, small):
                meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
                ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", app.ports["storage"], ae_title="SCREENING_PACS")
            assert assoc.is_established
            try:
                refused = assoc.send_c_store(tomo)
                assert refused.Status == 0xA700, refused
                assert "disk space" in refused.ErrorComment
                assert assoc.send_c_echo().Status == 0  # the same association goes on
                assert assoc.send_c_store(small).Status == 0
            finally:
                assoc.release()
            assert disk.free_bytes() > 200 * 1024 * 1024  # the partial 1 GB is gone
            space = _status_once(config, lambda found: found["disk_refusals"]["refusals"] > 0)
            disk_now = space["disk"]
            assert disk_now["ok"] is True
            assert disk_now["floor_bytes"] == 64 * 1024 * 1024
            assert abs(disk_now["free_bytes"] - disk.free_bytes()) < 1024 * 1024  # statvfs, as we
            assert space["disk_refusals"]["refusals"] == 1
            assert list((disk.mount / "state" / "spool").iterdir()) == []
            assert app.proc.poll() is None
            assert app.stop() == 0
        log = app.log()
        assert "instance.refused" in log
        assert "phase=disk-floor" in log
        assert_one_event_per_line(log)


def test_an_unwritable_derived_folder_fails_the_image_not_the_appliance(tmp_path):
    with SmallDisk(tmp_path, 64) as disk:
        state = disk.mount / "state"
        config = write_config(
            tmp_path,
            {
                "state_dir": str(state),
                "pipeline": {"max_attempts": 2, "retry_after_s": 0.2},
            },
        )
        state.mkdir()
        # A file where the folder should be: every thumbnail write fails (ENOTDIR), as root too.
        (state / "derived").write_bytes(b"")
        with ApplianceProcess(config) as app:
            [stored] = send_files(app.ports["storage"], [_image(tmp_path, "one")])
            assert stored.Status == 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                events = index_rows(state, "events")
                if any(e["event_type"] == "image.failed" for e in events):
                    break
                time.sleep(0.3)
            [failed] = [e for e in index_rows(state, "events") if e["event_type"] == "image.failed"]
            assert json.loads(failed["payload"])["phase"] == "write"
            assert app.proc.poll() is None
            assert _echo(app.ports["storage"]) == 0
            status = _status(config)
            assert status["services"]["image-pipeline"]["restarts"] == 0
            assert app.stop() == 0


def test_a_full_database_answers_0xa700_and_never_leaves_a_stored_file_without_its_row(
    tmp_path,
):
    """pacs.db on its own small filesystem (state_dir/pacs.db a symlink; SQLite keeps the WAL
    beside the real file), which another writer fills: the file is placed, the index insert
    fails with SQLITE_FULL, the placement is undone before the answer."""
    with SmallDisk(tmp_path / "state-disk", 96) as disk, SmallDisk(tmp_path / "db-disk", 16) as db:
        state = disk.mount / "state"
        state.mkdir()
        (state / "pacs.db").symlink_to(db.mount / "pacs.db")
        config = write_config(
            tmp_path, {"state_dir": str(state), "pipeline": {"retry_after_s": 0.2}}
        )
        with ApplianceProcess(config) as app:
            port = app.ports["storage"]
            [first] = send_files(port, [_image(tmp_path, "first")])
            assert first.Status == 0
            time.sleep(3)  # the first image's pipeline outcome is recorded
            db.fill()
            doomed = _image(tmp_path, "doomed")
            [refused] = send_files(port, [doomed])
            assert refused.Status == 0xA700, refused
            assert "Index database full" in refused.ErrorComment
            assert app.proc.poll() is None
            assert _echo(port) == 0
            assert app.stop() == 0
        db.free()
        with ApplianceProcess(config) as app:  # recovery must not index the refused image
            [again] = send_files(app.ports["storage"], [_image(tmp_path, "after")])
            assert again.Status == 0
            assert app.stop() == 0
        rows = index_rows(state)
        doomed_uid = str(pydicom.dcmread(doomed, stop_before_pixels=True).SOPInstanceUID)
        assert doomed_uid not in {row["sop_instance_uid"] for row in rows}
        assert len(rows) == 2
        files = [p for p in (state / "storage").rglob("*.dcm")]
        assert len(files) == 2  # no placed file without its row
        assert "files_reindexed=0" in app.log()
        fsck = _appliance("fsck", "--verify-hashes", config=config)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert_one_event_per_line(app.log())
