"""Query/Retrieve and Storage Commitment over the storage index, driven by dcmtk
findscu/getscu/movescu and pynetdicom."""

from __future__ import annotations

import datetime
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset, uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    DigitalMammographyXRayImageStorageForPresentation,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.state import StatePaths
from appliance.testing import synthetic
from tests.support import (
    ApplianceProcess,
    commitment_request,
    dataset_bytes,
    encode,
    free_port,
    hear_commitment,
    request_commitment,
    send_files,
    write_config,
)

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]

SMALL = (128, 96)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A running appliance holding two participants' studies: Ann's uncompressed, Beth's JPEG
    2000 lossless. Destinations: DEST (a dcmtk storescp per test), SLOW (a pynetdicom SCP),
    COMMITTER (where a storage commitment requestor that left hears its report)."""
    root = tmp_path_factory.mktemp("qr")
    ports = {"DEST": free_port(), "SLOW": free_port(), "COMMITTER": free_port()}
    config = write_config(
        root,
        {
            "dicom": {
                "destinations": [
                    {"ae_title": name, "host": "127.0.0.1", "port": port}
                    for name, port in ports.items()
                ]
            }
        },
    )
    ann = synthetic.screening_study(
        root / "ann",
        shape=SMALL,
        patient_id="9990000011",
        patient_name="ANN^ALPHA",
        accession_number="ACC11",
    )
    beth_plain = synthetic.screening_study(
        root / "beth-plain",
        shape=SMALL,
        patient_id="9990000022",
        patient_name="BETH^BRAVO",
        accession_number="ACC22",
    )
    (root / "beth").mkdir()
    beth = [encode(p, root / "beth" / p.name, uid.JPEG2000Lossless) for p in beth_plain]
    with ApplianceProcess(config) as app:
        statuses = send_files(app.ports["storage"], ann + beth, calling="MODALITY1")
        assert [s.Status for s in statuses] == [0] * 8
        yield {
            "app": app,
            "root": root,
            "ann": ann,
            "beth": beth,
            "ports": ports,
            "beth_plain": beth_plain,
        }


def study_uid(paths: list[Path]) -> str:
    return pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID


def find(port: int, model: str, keys: dict[str, str], tmp: Path) -> list[Dataset]:
    """dcmtk findscu; the answers it extracted, as datasets."""
    out = tmp / f"find-{time.monotonic_ns()}"
    out.mkdir()
    args = ["findscu", model, "-aec", "SCREENING_PACS", "-aet", "MODALITY1", "-X", "-od", str(out)]
    for key, value in keys.items():
        args += ["-k", f"{key}={value}" if value is not None else key]
    result = subprocess.run(
        [*args, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def pynetdicom_find(port: int, model: str, identifier: Dataset) -> list[tuple[int, Dataset]]:
    ae = AE("MODALITY1")
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCREENING_PACS")
    assert assoc.is_established
    try:
        return [(s.Status, i) for s, i in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def test_study_root_study_level_by_patient_id_wildcard_with_counts(site, tmp_path):
    port = site["app"].ports["storage"]
    answers = find(
        port,
        "-S",
        {
            "QueryRetrieveLevel": "STUDY",
            "PatientID": "99900000*",
            "PatientName": None,
            "StudyInstanceUID": None,
            "NumberOfStudyRelatedInstances": None,
            "ModalitiesInStudy": None,
        },
        tmp_path,
    )
    by_study = {a.StudyInstanceUID: a for a in answers}
    assert set(by_study) == {study_uid(site["ann"]), study_uid(site["beth"])}
    ann = by_study[study_uid(site["ann"])]
    assert (str(ann.PatientName), ann.NumberOfStudyRelatedInstances, ann.ModalitiesInStudy) == (
        "ANN^ALPHA",
        4,
        "MG",
    )


def test_patient_root_patient_level_names_are_case_insensitive(site, tmp_path):
    answers = find(
        site["app"].ports["storage"],
        "-P",
        {
            "QueryRetrieveLevel": "PATIENT",
            "PatientName": "beth*",
            "PatientID": None,
            "NumberOfPatientRelatedInstances": None,
        },
        tmp_path,
    )
    assert [(a.PatientID, a.NumberOfPatientRelatedInstances) for a in answers] == [
        ("9990000022", 4)
    ]


def test_series_and_image_levels_below_a_study(site, tmp_path):
    port = site["app"].ports["storage"]
    study = study_uid(site["ann"])
    [series] = find(
        port,
        "-S",
        {
            "QueryRetrieveLevel": "SERIES",
            "StudyInstanceUID": study,
            "SeriesInstanceUID": None,
            "Modality": "MG",
            "NumberOfSeriesRelatedInstances": None,
        },
        tmp_path,
    )
    assert series.NumberOfSeriesRelatedInstances == 4
    images = find(
        port,
        "-S",
        {
            "QueryRetrieveLevel": "IMAGE",
            "StudyInstanceUID": study,
            "SeriesInstanceUID": series.SeriesInstanceUID,
            "SOPInstanceUID": None,
            "ViewPosition": "MLO",
            "ImageLaterality": None,
        },
        tmp_path,
    )
    assert sorted(i.ImageLaterality for i in images) == ["L", "R"]
    assert {i.ViewPosition for i in images} == {"MLO"}


def test_date_range_and_uid_list_matching(site):
    today = datetime.date.today()
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyDate = f"{(today - datetime.timedelta(days=1)):%Y%m%d}-"
    identifier.StudyInstanceUID = [study_uid(site["ann"]), study_uid(site["beth"]), "1.2.3"]
    identifier.AccessionNumber = ""
    answers = pynetdicom_find(
        site["app"].ports["storage"], StudyRootQueryRetrieveInformationModelFind, identifier
    )
    assert sorted(i.AccessionNumber for s, i in answers if s == 0xFF00) == ["ACC11", "ACC22"]
    identifier.StudyDate = f"-{(today - datetime.timedelta(days=1)):%Y%m%d}"
    answers = pynetdicom_find(
        site["app"].ports["storage"], StudyRootQueryRetrieveInformationModelFind, identifier
    )
    assert [s for s, _ in answers] == [0x0000]


@pytest.mark.parametrize(
    ("model", "keys", "reason"),
    [
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "SERIES"},
            "StudyInstanceUID must have a single value",
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": ["1.2", "1.3"]},
            "StudyInstanceUID must have a single value",
        ),
        (
            PatientRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""},
            "PatientID must have a single value",
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "PATIENT"},
            "Study Root has no PATIENT level",
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "STUDY", "SOPInstanceUID": ""},
            "below STUDY",
        ),
        (
            StudyRootQueryRetrieveInformationModelFind,
            {"QueryRetrieveLevel": "FRAME"},
            "not one we serve",
        ),
    ],
)
def test_hierarchical_key_checks_answer_a900_with_a_comment(site, model, keys, reason):
    identifier = Dataset()
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    [(code, _)] = pynetdicom_find(site["app"].ports["storage"], model, identifier)
    assert code == 0xA900
    assert reason in site["app"].log()


def retrieved(directory: Path) -> dict[str, Path]:
    return {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in directory.iterdir()
    }


def sent(paths: list[Path]) -> dict[str, Path]:
    return retrieved(paths[0].parent)


def getscu(site, tmp_path: Path, *flags: str) -> Path:
    """dcmtk getscu (Study Root) for Beth's study; the directory the files landed in."""
    out = tmp_path / "get"
    out.mkdir()
    result = subprocess.run(
        ["getscu", "-S", "+B", *flags, "-aec", "SCREENING_PACS", "-aet", "MODALITY1",
         "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid(site['beth'])}",
         "127.0.0.1", str(site["app"].ports["storage"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out


def test_c_get_returns_the_stored_bytes_in_the_stored_transfer_syntax(site, tmp_path):
    out = getscu(site, tmp_path, "+xv")
    got, original = retrieved(out), sent(site["beth"])
    assert set(got) == set(original)
    for sop_uid, path in got.items():
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == uid.JPEG2000Lossless
        assert dataset_bytes(path) == dataset_bytes(original[sop_uid])


def test_c_get_decodes_only_when_the_requester_cannot_take_the_stored_syntax(site, tmp_path):
    out = getscu(site, tmp_path)
    got, plain = retrieved(out), sent(site["beth_plain"])
    assert set(got) == set(plain)
    for sop_uid, path in got.items():
        ds = pydicom.dcmread(path)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(ds.pixel_array, pydicom.dcmread(plain[sop_uid]).pixel_array)


def test_c_move_to_a_dcmtk_storescp_is_byte_identical(site, tmp_path):
    out = tmp_path / "dest"
    out.mkdir()
    port = site["ports"]["DEST"]
    storescp = subprocess.Popen(
        ["storescp", "+B", "-aet", "DEST", "-od", str(out), "+xa", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        result = subprocess.run(
            [
                "movescu",
                "-S",
                "-aec",
                "SCREENING_PACS",
                "-aet",
                "MODALITY1",
                "-aem",
                "DEST",
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                f"StudyInstanceUID={study_uid(site['ann'])}",
                "-k",
                "SeriesInstanceUID="
                + pydicom.dcmread(site["ann"][0], stop_before_pixels=True).SeriesInstanceUID,
                "127.0.0.1",
                str(site["app"].ports["storage"]),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        storescp.terminate()
        storescp.wait(10)
    assert result.returncode == 0, result.stderr + site["app"].log()[-3000:]
    got, original = retrieved(out), sent(site["ann"])
    assert set(got) == set(original)
    for sop_uid, path in got.items():
        assert dataset_bytes(path) == dataset_bytes(original[sop_uid])


def move(port: int, destination: str, study: str, on_pending=None) -> list[Dataset]:
    ae = AE("MODALITY1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCREENING_PACS")
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    responses = []
    try:
        for rsp, _ in assoc.send_c_move(
            identifier, destination, StudyRootQueryRetrieveInformationModelMove, msg_id=7
        ):
            responses.append(rsp)
            if on_pending and rsp.Status == 0xFF00:
                on_pending(assoc)
                on_pending = None
    finally:
        assoc.release()
    return responses


def test_unknown_move_destination_is_a801(site):
    [final] = move(site["app"].ports["storage"], "NOBODY", study_uid(site["ann"]))
    assert final.Status == 0xA801


def test_c_cancel_mid_move_stops_the_sub_operations(site):
    received = []

    def slow_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        time.sleep(0.4)
        return 0x0000

    ae = AE("SLOW")
    ae.add_supported_context(
        DigitalMammographyXRayImageStorageForPresentation,
        [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.JPEG2000Lossless],
    )
    server = ae.start_server(
        ("127.0.0.1", site["ports"]["SLOW"]),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, slow_store)],
    )
    try:
        responses = move(
            site["app"].ports["storage"],
            "SLOW",
            study_uid(site["beth"]),
            on_pending=lambda assoc: assoc.send_c_cancel(
                7, query_model=StudyRootQueryRetrieveInformationModelMove
            ),
        )
    finally:
        server.shutdown()
    final = responses[-1]
    assert final.Status == 0xFE00
    assert final.NumberOfCompletedSuboperations < 4
    assert final.NumberOfRemainingSuboperations == 4 - final.NumberOfCompletedSuboperations
    assert len(received) < 4


def test_queries_and_retrieves_leave_no_patient_identifiers_in_the_log(site):
    log = site["app"].log()
    assert "qr.find" in log
    assert "ANN^ALPHA" not in log
    assert "9990000011" not in log


# --- Storage Commitment ----------------------------------------------------------------------


def references(paths: list[Path]) -> list[tuple[str, str]]:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return [(h.SOPClassUID, h.SOPInstanceUID) for h in headers]


def commit_and_hear(site, request: Dataset) -> Dataset:
    """Request commitment as COMMITTER and receive the report where COMMITTER listens."""
    return hear_commitment(site["app"].ports["storage"], site["ports"]["COMMITTER"], request)


def test_commitment_lists_committed_instances_and_unknown_ones_as_failed(site):
    known = references(site["ann"])
    request = commitment_request([*known, (known[0][0], "1.2.826.0.1.3680043.10.1999.1")])
    report = commit_and_hear(site, request)
    assert {i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence} == {
        uid for _, uid in known
    }
    [failed] = report.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (
        "1.2.826.0.1.3680043.10.1999.1",
        0x0112,
    )


def test_a_file_damaged_on_disk_is_not_committed(site, tmp_path):
    image = tmp_path / "extra.dcm"
    synthetic.mammogram(shape=SMALL).save_as(image, enforce_file_format=True)
    [stored] = send_files(site["app"].ports["storage"], [image], calling="COMMITTER")
    assert stored.Status == 0
    [(sop_class, sop_instance)] = references([image])
    layout = StatePaths(site["root"] / "state")
    damaged = layout.absolute(layout.relative_path(sop_instance))
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF  # one flipped pixel byte: the file still parses
    damaged.write_bytes(bytes(data))

    good = references(site["ann"][:1])
    report = commit_and_hear(site, commitment_request([*good, (sop_class, sop_instance)]))
    assert [i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence] == [good[0][1]]
    [failed] = report.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == (sop_instance, 0x0110)
    assert "commitment.instance_damaged" in site["app"].log()


def test_commitment_requests_that_cannot_be_answered_are_refused_at_once(site):
    request = Dataset()
    request.TransactionUID = pydicom.uid.generate_uid()
    assert request_commitment(site["app"].ports["storage"], request) == 0x0115
    full = commitment_request(references(site["ann"]))
    # No destination is configured for this AE: it would never hear the report.
    assert request_commitment(site["app"].ports["storage"], full, calling="STRANGER") == 0x0110
