"""Orthanc (Debian's package, its own process and config) as the appliance's peer: C-STORE SCU,
Query/Retrieve SCU (C-FIND and C-MOVE, PATIENT level through Study Root included) and
Storage Commitment SCU, driven through Orthanc's REST API. Nothing here is the project's code
pretending to be a peer; what the appliance stores, answers and reports is what Orthanc saw."""

from __future__ import annotations

import struct
import subprocess
import time
import urllib.error
from pathlib import Path

import pydicom
import pytest

from appliance.testing import synthetic
from tests.support import (
    ApplianceProcess,
    OrthancProcess,
    dataset_bytes,
    encode,
    index_rows,
    send_files,
    storescu,
    write_config,
)

pytestmark = [pytest.mark.usefixtures("dcmtk", "dicom3tools"), pytest.mark.system]

SMALL = (128, 96)


def image(directory: Path, name: str, **fields: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.dcm"
    synthetic.mammogram(shape=SMALL, **fields).save_as(path, enforce_file_format=True)
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    root = tmp_path_factory.mktemp("orthanc")
    orthanc = OrthancProcess(root / "orthanc", {})
    config = write_config(
        root,
        {
            "dicom": {
                "destinations": [
                    {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
                ]
            }
        },
    )
    with ApplianceProcess(config) as app, orthanc:
        gateway = {"AET": "SCREENING_PACS", "Host": "127.0.0.1", "Port": app.ports["storage"]}
        orthanc.request("PUT", "/modalities/gateway", gateway)
        yield {"app": app, "orthanc": orthanc, "root": root}


def stored_rows(peers) -> dict[str, dict]:
    return {r["sop_instance_uid"]: r for r in index_rows(peers["root"] / "state")}


def test_orthanc_stores_into_the_appliance_as_it_holds_the_images(peers, tmp_path):
    plain = image(tmp_path, "plain", patient_id="9990000041", accession_number="ACCO1")
    jpeg_ls = encode(
        image(tmp_path, "ls-source", patient_id="9990000041", accession_number="ACCO1"),
        tmp_path / "ls.dcm",
        pydicom.uid.JPEGLSLossless,
    )
    orthanc = peers["orthanc"]
    ids = [orthanc.post("/instances", path.read_bytes())["ID"] for path in (plain, jpeg_ls)]
    job = orthanc.post("/modalities/gateway/store", {"Resources": ids, "Synchronous": True})
    assert job["FailedInstancesCount"] == 0, job
    rows = stored_rows(peers)
    for path in (plain, jpeg_ls):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        row = rows[header.SOPInstanceUID]
        assert row["transfer_syntax_uid"] == header.file_meta.TransferSyntaxUID
        stored = peers["root"] / "state" / "storage" / row["storage_path"]
        assert dataset_bytes(stored) == dataset_bytes(path)
        assert dciodvfy_errors(stored) == []


def test_orthanc_finds_a_study_and_moves_it_to_itself(peers, tmp_path):
    study = [
        image(tmp_path, f"view-{n}", patient_id="9990000042", accession_number="ACCO2",
              study_instance_uid="1.2.826.0.1.3680043.8.498.4242")
        for n in range(2)
    ]  # fmt: skip
    j2k = encode(study[1], tmp_path / "view-1-j2k.dcm", pydicom.uid.JPEG2000Lossless)
    for path in (study[0], j2k):
        result = storescu(peers["app"].ports["storage"], "-aet", "MODALITY1", "-xv", str(path))
        assert result.returncode == 0, result.stderr
    orthanc = peers["orthanc"]
    query = orthanc.post(
        "/modalities/gateway/query",
        {"Level": "Study", "Query": {"PatientID": "9990000042", "AccessionNumber": ""}},
    )
    answers = orthanc.get(f"/queries/{query['ID']}/answers")
    assert len(answers) == 1
    content = orthanc.get(f"/queries/{query['ID']}/answers/0/content?simplify")
    assert content["AccessionNumber"] == "ACCO2"
    assert content["RetrieveAETitle"] == "SCREENING_PACS"
    orthanc.post(f"/queries/{query['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    for path in (study[0], j2k):
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        [found] = orthanc.post("/tools/lookup", sop_uid.encode())
        received = tmp_path / f"received-{sop_uid}.dcm"
        received.write_bytes(orthanc.request("GET", f"/instances/{found['ID']}/file", raw=True))
        assert dataset_bytes(received) == dataset_bytes(path)  # as stored, syntax and all


def test_a_patient_level_move_through_study_root_is_refused_with_its_reason(peers):
    orthanc = peers["orthanc"]
    before = len(orthanc.get("/instances"))
    with pytest.raises(urllib.error.HTTPError):
        orthanc.post(
            "/modalities/gateway/move",
            {"Level": "Patient", "Resources": [{"PatientID": "9990000042"}],
             "TargetAet": "ORTHANC", "Synchronous": True},
        )  # fmt: skip
    log = peers["app"].log()
    assert "event=qr.retrieve_rejected phase=identifier" in log
    assert "Study Root has no PATIENT level" in log
    assert len(orthanc.get("/instances")) == before
    assert "has failed with DIMSE status 0xA900" in orthanc.log_path.read_text()  # not 0xC515


def _broken_jpeg_ls(directory: Path) -> Path:
    """A JPEG-LS image (dcmcjpls) whose codestream is cut inside sound items."""
    source = encode(
        image(directory, "cut-source", patient_id="9990000043", accession_number="ACCO3"),
        directory / "cut-ls.dcm",
        pydicom.uid.JPEGLSLossless,
    )
    data = source.read_bytes()
    delimiter = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    end = data.rindex(delimiter)
    last = data.rindex(b"\xfe\xff\x00\xe0", 0, end)
    (length,) = struct.unpack_from("<I", data, last + 4)
    kept = (length // 3) & ~1
    broken = directory / "broken.dcm"
    broken.write_bytes(
        data[: last + 4] + struct.pack("<I", kept) + data[last + 8 : last + 8 + kept] + delimiter
    )
    return broken


def test_orthanc_storage_commitment_confirms_only_what_is_whole(peers, tmp_path):
    whole = image(tmp_path, "whole", patient_id="9990000043", accession_number="ACCO3")
    broken = _broken_jpeg_ls(tmp_path)
    statuses = send_files(peers["app"].ports["storage"], [whole, broken], calling="ORTHANC")
    assert [s.Status for s in statuses] == [0, 0]
    refs = []
    for path in (whole, broken):
        header = pydicom.dcmread(path, stop_before_pixels=True)
        refs.append([str(header.SOPClassUID), str(header.SOPInstanceUID)])
    orthanc = peers["orthanc"]
    job = orthanc.post(
        "/modalities/gateway/storage-commitment", {"DicomInstances": refs, "Timeout": 60}
    )
    deadline = time.monotonic() + 60
    report = orthanc.get(job["Path"])
    while report["Status"] == "Pending" and time.monotonic() < deadline:
        time.sleep(0.5)
        report = orthanc.get(job["Path"])
    assert report["Status"] == "Failure", report
    assert [s["SOPInstanceUID"] for s in report["Success"]] == [refs[0][1]]
    [failure] = report["Failures"]
    assert failure["SOPInstanceUID"] == refs[1][1]
    assert failure["FailureReason"] == 0x0110
