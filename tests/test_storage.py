"""The storage SCP, driven by dcmtk storescu and a pynetdicom SCU: nothing acknowledged is lost."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import uid

from appliance.state import StatePaths
from appliance.testing import synthetic
from tests.support import (
    ApplianceProcess,
    dataset_bytes,
    encode,
    index_rows,
    send_files,
    storescu,
    write_config,
)

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]

SMALL = (256, 256)


@pytest.fixture
def appliance(tmp_path):
    with ApplianceProcess(write_config(tmp_path)) as app:
        yield app


def state(app: ApplianceProcess) -> Path:
    return app.config.parent / "state"


def stored_file(app: ApplianceProcess, sop_instance_uid: str) -> Path:
    return StatePaths(state(app)).absolute(StatePaths(state(app)).relative_path(sop_instance_uid))


def write_image(directory: Path, name: str = "image.dcm", **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    synthetic.mammogram(shape=SMALL, **fields).save_as(path, enforce_file_format=True)
    return path


def leftovers(app: ApplianceProcess) -> list[Path]:
    return list((state(app) / "spool").iterdir())


TRANSFER_SYNTAXES = {
    "implicit-le": (uid.ImplicitVRLittleEndian, "-xi"),
    "explicit-le": (uid.ExplicitVRLittleEndian, "-xe"),
    "deflated": (uid.DeflatedExplicitVRLittleEndian, None),
    "jpeg-lossless-sv1": (uid.JPEGLosslessSV1, "-xs"),
    "jpeg-ls-lossless": (uid.JPEGLSLossless, "-xt"),
    "jpeg2000-lossless": (uid.JPEG2000Lossless, "-xv"),
    "rle": (uid.RLELossless, "-xr"),
}


@pytest.mark.parametrize("name", TRANSFER_SYNTAXES)
def test_every_transfer_syntax_is_stored_byte_identical(appliance, tmp_path, name):
    transfer_syntax, storescu_flag = TRANSFER_SYNTAXES[name]
    source = write_image(tmp_path / "in", "plain.dcm")
    sent = encode(source, tmp_path / f"{name}.dcm", transfer_syntax)
    sop_uid = pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID

    [response] = send_files(appliance.ports["storage"], [sent])
    assert response.Status == 0x0000

    stored = stored_file(appliance, sop_uid)
    assert dataset_bytes(stored) == dataset_bytes(sent)
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == transfer_syntax
    [row] = index_rows(state(appliance))
    assert row["storage_hash"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert row["file_size"] == stored.stat().st_size
    assert row["transfer_syntax_uid"] == transfer_syntax
    assert leftovers(appliance) == []

    if storescu_flag:  # and the same through dcmtk, under a fresh UID
        again = synthetic.mammogram(shape=SMALL)
        again.save_as(tmp_path / "again-plain.dcm", enforce_file_format=True)
        dcmtk_file = encode(tmp_path / "again-plain.dcm", tmp_path / "again.dcm", transfer_syntax)
        result = storescu(appliance.ports["storage"], storescu_flag, str(dcmtk_file))
        assert result.returncode == 0, result.stderr
        assert dataset_bytes(stored_file(appliance, again.SOPInstanceUID)) == dataset_bytes(
            dcmtk_file
        )


def test_index_row_carries_what_the_cloud_and_queries_need(appliance, tmp_path):
    path = write_image(
        tmp_path, laterality="R", view="MLO", accession_number="ACC42", patient_id="9990001"
    )
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert storescu(appliance.ports["storage"], "-aet", "HOLOGIC1", str(path)).returncode == 0
    [row] = index_rows(state(appliance))
    assert row == row | {
        "sop_instance_uid": ds.SOPInstanceUID,
        "storage_path": StatePaths(Path()).relative_path(ds.SOPInstanceUID),
        "study_instance_uid": ds.StudyInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID,
        "sop_class_uid": synthetic.MG_FOR_PRESENTATION,
        "patient_id": "9990001",
        "patient_name": "TEST^PARTICIPANT",
        "accession_number": "ACC42",
        "modality": "MG",
        "image_laterality": "R",
        "view_position": "MLO",
        "number_of_frames": None,
        "source_aet": "HOLOGIC1",
        "source_address": "127.0.0.1",
        "status": "STORED",
    }
    assert row["created_at"].endswith("+00:00")
    # storage/ab/cd/<first 16 hex of SHA-256(UID)>.dcm
    digest = hashlib.sha256(ds.SOPInstanceUID.encode()).hexdigest()
    assert row["storage_path"] == f"{digest[:2]}/{digest[2:4]}/{digest[:16]}.dcm"


def test_identical_duplicate_is_success_and_nothing_is_rewritten(appliance, tmp_path):
    path = write_image(tmp_path)
    port = appliance.ports["storage"]
    assert send_files(port, [path])[0].Status == 0x0000
    stored = stored_file(appliance, pydicom.dcmread(path).SOPInstanceUID)
    before = os.stat(stored)
    assert send_files(port, [path])[0].Status == 0x0000
    after = os.stat(stored)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(index_rows(state(appliance))) == 1
    assert leftovers(appliance) == []


def test_same_uid_with_other_content_keeps_the_first_and_the_newcomer_aside(appliance, tmp_path):
    sop_uid = pydicom.uid.generate_uid(synthetic.UID_ROOT)
    first = write_image(tmp_path / "a", sop_instance_uid=sop_uid, accession_number="FIRST")
    second = write_image(tmp_path / "b", sop_instance_uid=sop_uid, accession_number="SECOND")
    port = appliance.ports["storage"]
    assert send_files(port, [first])[0].Status == 0x0000
    [response] = send_files(port, [second])
    assert response.Status == 0xB000  # warning: stored, with a caveat
    assert "kept aside" in response.ErrorComment

    stored = stored_file(appliance, sop_uid)
    assert dataset_bytes(stored) == dataset_bytes(first)
    [row] = index_rows(state(appliance))
    assert row["accession_number"] == "FIRST"
    [conflict] = index_rows(state(appliance), "instance_conflicts")
    aside = state(appliance) / "conflicts" / conflict["conflict_path"]
    assert dataset_bytes(aside) == dataset_bytes(second)
    assert conflict["storage_hash"] == hashlib.sha256(aside.read_bytes()).hexdigest()
    assert "outcome=conflict" in appliance.log()


def test_concurrent_duplicates_on_two_associations_do_not_collide(appliance, tmp_path):
    path = write_image(tmp_path)
    port = appliance.ports["storage"]
    results: list[int] = []

    def send() -> None:
        results.extend(response.Status for response in send_files(port, [path] * 5))

    threads = [threading.Thread(target=send) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [0x0000] * 20
    assert len(index_rows(state(appliance))) == 1
    assert index_rows(state(appliance), "instance_conflicts") == []
    assert leftovers(appliance) == []


def test_disk_floor_refuses_with_out_of_resources_and_stores_nothing(tmp_path):
    huge_floor = {"dicom": {"storage": {"min_free_mb": 1 << 40}}}
    with ApplianceProcess(write_config(tmp_path, huge_floor)) as app:
        [response] = send_files(app.ports["storage"], [write_image(tmp_path / "in")])
        assert response.Status == 0xA700
        assert "floor" in response.ErrorComment
        assert list((state(app) / "storage").rglob("*.dcm")) == []
        assert leftovers(app) == []
        assert "phase=disk-floor" in app.log()


def test_unknown_calling_ae_is_rejected_when_peers_are_configured(tmp_path):
    peers = {"dicom": {"peers": [{"ae_title": "HOLOGIC1", "addresses": ["127.0.0.1"]}]}}
    with ApplianceProcess(write_config(tmp_path, peers)) as app:
        path = write_image(tmp_path / "in")
        refused = storescu(app.ports["storage"], "-aet", "STRANGER", str(path))
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr
        allowed = storescu(app.ports["storage"], "-aet", "HOLOGIC1", str(path))
        assert allowed.returncode == 0, allowed.stderr
        assert len(index_rows(state(app))) == 1


def test_connection_from_an_address_not_allowed_is_closed(tmp_path):
    peers = {"dicom": {"peers": [{"ae_title": "HOLOGIC1", "addresses": ["10.9.9.9"]}]}}
    with ApplianceProcess(write_config(tmp_path, peers)) as app:
        refused = storescu(app.ports["storage"], "-aet", "HOLOGIC1", str(write_image(tmp_path)))
        assert refused.returncode != 0
        assert index_rows(state(app)) == []
        # Loopback is the box itself: judged on the pair (a remote address is closed at once,
        # tests/test_security.py).
        assert "event=security.association_refused" in app.log()
        assert "phase=peer " in app.log()


def _without(path: Path, keyword: str, target: Path) -> Path:
    ds = pydicom.dcmread(path)
    delattr(ds, keyword)
    ds.save_as(target, enforce_file_format=True)
    return target


def test_invalid_datasets_get_failure_statuses_and_leave_nothing(appliance, tmp_path):
    good = write_image(tmp_path / "in")
    header = good.read_bytes()[: -len(dataset_bytes(good))]
    body = dataset_bytes(good)

    def variant(name: str, dataset: bytes) -> Path:
        (tmp_path / name).write_bytes(header + dataset)
        return tmp_path / name

    no_study = _without(good, "StudyInstanceUID", tmp_path / "no-study.dcm")
    mismatched = pydicom.dcmread(good)
    mismatched.SOPInstanceUID = pydicom.uid.generate_uid(synthetic.UID_ROOT)  # meta keeps the old
    mismatched.save_as(tmp_path / "mismatch.dcm")
    pixel_data_at = body.index(b"\xe0\x7f\x10\x00")
    cases = [
        (no_study, 0xA900, "Study Instance UID missing"),
        (tmp_path / "mismatch.dcm", 0xA900, "SOP Instance UID differs from the request"),
        # (0010,0020) LO claiming 32 KiB in a dataset that ends 10 bytes later
        (
            variant("overrun.dcm", body[:300] + b"\x10\x00\x20\x00LO\xff\x7f" + b"x" * 10),
            0xC000,
            "malformed dataset: lengths past its end",
        ),
        (
            variant("cut-before-pixels.dcm", body[:pixel_data_at]),
            0xA900,
            "Pixel Data missing from an image",
        ),
        (
            variant("cut-in-pixels.dcm", body[: pixel_data_at + 5000]),
            0xA900,
            "Pixel Data truncated",
        ),
    ]
    responses = send_files(appliance.ports["storage"], [path for path, _, _ in cases])
    assert [(r.Status, r.ErrorComment) for r in responses] == [
        (status, comment) for _, status, comment in cases
    ]
    assert index_rows(state(appliance)) == []
    assert list((state(appliance) / "storage").rglob("*.dcm")) == []
    assert leftovers(appliance) == []
    assert appliance.log().count("event=instance.rejected phase=validate") == len(cases)
    # ... and the appliance is still serving.
    assert send_files(appliance.ports["storage"], [good])[0].Status == 0x0000


def test_kill_mid_association_leaves_no_partial_file_and_restart_cleans_spool(tmp_path):
    big = tmp_path / "tomo.dcm"
    synthetic.mammogram(shape=(1024, 1024), frames=150).save_as(big, enforce_file_format=True)
    small = write_image(tmp_path / "in")
    config = write_config(tmp_path)
    app = ApplianceProcess(config)
    with app:
        port = app.ports["storage"]
        assert send_files(port, [small])[0].Status == 0x0000
        sender = subprocess.Popen(
            ["storescu", "-R", "-aec", "SCREENING_PACS", "127.0.0.1", str(port), str(big)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        spool = state(app) / "spool"
        deadline = time.monotonic() + 30
        while not any(f.stat().st_size > 10_000_000 for f in spool.iterdir()):
            assert time.monotonic() < deadline, "the large object never started arriving"
            time.sleep(0.01)
        app.stop(signal.SIGKILL)
        assert sender.wait(30) != 0  # the modality saw the association fail: it will resend
    assert len(list(spool.iterdir())) == 1  # the partial object, still in the spool
    assert [p.name for p in (state(app) / "storage").rglob("*.dcm")] == [
        stored_file(app, pydicom.dcmread(small).SOPInstanceUID).name
    ]

    restarted = ApplianceProcess(config)
    with restarted:
        assert list(spool.iterdir()) == []
        assert "spool_files_removed=1" in restarted.log()
        [row] = index_rows(state(restarted))
        assert row["status"] == "STORED"
