"""Query/Retrieve as the standard and real peers expect it (the defects of a DICOM review).

Driven with dcmtk's findscu, getscu, movescu and storescp, and with pynetdicom where a test
needs a protocol detail dcmtk's tools do not expose (extended negotiation, raw statuses).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset, uid
from pynetdicom import AE, build_context, evt
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    BasicTextSRStorage,
    DigitalMammographyXRayImageStorageForPresentation,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance.testing import synthetic
from tests.support import (
    ApplianceProcess,
    dataset_bytes,
    encode,
    free_port,
    send_files,
    write_config,
)

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]

SMALL = (128, 96)
MG = DigitalMammographyXRayImageStorageForPresentation


def odd_length_copy(source: Path, target: Path) -> Path:
    """The file with Study Description's value one byte short: an odd length, as some units
    send (PS3.5 7.1.1 says even). Every other byte as it was."""
    data = source.read_bytes()
    element = b"\x08\x00\x30\x10LO\x04\x00ABCD"
    assert data.count(element) == 1
    target.write_bytes(data.replace(element, b"\x08\x00\x30\x10LO\x03\x00ABC"))
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("qr-conformance")
    ports = {"DEST": free_port(), "NOWHERE": free_port()}  # nothing ever listens on NOWHERE
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
    files = root / "files"
    files.mkdir()

    def image(name: str, **fields: object) -> Path:
        ds = synthetic.mammogram(shape=SMALL, **fields)
        path = files / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    hyphen = image("hyphen", patient_id="NHS-123-456", accession_number="ACCH")
    dated = pydicom.dcmread(image("dated", patient_id="9990000031", accession_number="ACCD"))
    dated.StudyDate, dated.StudyTime = "20261201", "063500"
    dated.save_as(files / "dated.dcm", enforce_file_format=True)
    broken_date = pydicom.dcmread(image("broken", patient_id="9990000032", accession_number="ACCB"))
    broken_date.StudyDate = "20261130"
    broken_date.save_as(files / "broken.dcm", enforce_file_format=True)
    # "2026.11.30" as some units write it; pydicom would refuse to write it, so by hand.
    good_date = b"\x08\x00\x20\x00DA\x08\x0020261130"
    data = (files / "broken.dcm").read_bytes()
    assert data.count(good_date) == 1
    (files / "broken.dcm").write_bytes(
        data.replace(good_date, b"\x08\x00\x20\x00DA\x0a\x002026.11.30")
    )
    # And a date that is no date at all (month 13).
    invalid = pydicom.dcmread(image("invalid", patient_id="9990000036", accession_number="ACCI"))
    invalid.StudyDate = "20261130"
    invalid.save_as(files / "invalid.dcm", enforce_file_format=True)
    data = (files / "invalid.dcm").read_bytes()
    (files / "invalid.dcm").write_bytes(
        data.replace(good_date, b"\x08\x00\x20\x00DA\x08\x0020261330")
    )
    # One study in three syntaxes (two from dcmtk's encoders) and one odd-length object.
    mixed_study = pydicom.uid.generate_uid()
    plain = [
        image(f"mixed-{n}", patient_id="9990000033", accession_number="ACCM",
              study_instance_uid=mixed_study)
        for n in range(3)
    ]  # fmt: skip
    mixed = [
        plain[0],
        encode(plain[1], files / "mixed-j2k.dcm", uid.JPEG2000Lossless),
        encode(plain[2], files / "mixed-rle.dcm", uid.RLELossless),
    ]
    described = pydicom.dcmread(
        image("odd-source", patient_id="9990000034", accession_number="ACCO")
    )
    described.StudyDescription = "ABCD"
    described.save_as(files / "odd-source.dcm", enforce_file_format=True)
    odd = odd_length_copy(files / "odd-source.dcm", files / "odd.dcm")
    after_odd = image("after-odd", patient_id="9990000034", accession_number="ACCO",
                      study_instance_uid=str(described.StudyInstanceUID))  # fmt: skip
    image("grouped", patient_id="9990000035", accession_number="ACCG")
    grouped = files / "grouped-gl.dcm"
    _add_group_length(files / "grouped.dcm", grouped)
    everything = [
        hyphen,
        files / "dated.dcm",
        files / "broken.dcm",
        files / "invalid.dcm",
        *mixed,
        odd,
        after_odd,
        grouped,
    ]
    with ApplianceProcess(config) as app:
        statuses = send_files(app.ports["storage"], everything)
        assert [s.Status for s in statuses] == [0] * len(everything), statuses
        yield {
            "app": app,
            "root": root,
            "ports": ports,
            "mixed": mixed,
            "mixed_plain": plain,
            "odd": odd,
            "after_odd": after_odd,
            "grouped": grouped,
        }


def _add_group_length(source: Path, target: Path) -> None:
    """The dataset re-written by dcmtk with group length elements, as older units send it."""
    subprocess.run(["dcmconv", "+g", str(source), str(target)], check=True)
    data = pydicom.dcmread(target)
    assert data.get(0x00080000) is not None
    assert data.get(0x00100000) is not None


def findscu(site, root: str, keys: dict[str, str | None], tmp_path: Path) -> list[Dataset]:
    out = tmp_path / f"find-{time.monotonic_ns()}"
    out.mkdir()
    args = ["findscu", root, "-aec", "SCREENING_PACS", "-aet", "MODALITY1", "-X", "-od", str(out)]
    for key, value in keys.items():
        args += ["-k", key if value is None else f"{key}={value}"]
    result = subprocess.run(
        [*args, "127.0.0.1", str(site["app"].ports["storage"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def pynetdicom_find(
    site, identifier: Dataset, model: str = StudyRootQueryRetrieveInformationModelFind, ext=None
) -> list[tuple[int, Dataset | None]]:
    ae = AE("MODALITY1")
    ae.add_requested_context(model)
    assoc = ae.associate(
        "127.0.0.1", site["app"].ports["storage"], ae_title="SCREENING_PACS", ext_neg=ext
    )
    assert assoc.is_established
    try:
        return [(int(s.Status), i) for s, i in assoc.send_c_find(identifier, model)]
    finally:
        assoc.release()


def study_query(**keys: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


# --- C-FIND -------------------------------------------------------------------------------------


def test_a_malformed_stored_date_does_not_break_date_queries_for_other_studies(site, tmp_path):
    """ACCD on 2026-12-01; ACCB written 2026.11.30 (the pre-3.0 form, read as a date); ACCI's
    date is no date (month 13): it matches no range, and breaks nothing."""
    answers = findscu(
        site, "-S", {"QueryRetrieveLevel": "STUDY", "StudyDate": "20261130-20261201",
                     "AccessionNumber": None}, tmp_path,
    )  # fmt: skip
    assert sorted(a.AccessionNumber for a in answers) == ["ACCB", "ACCD"]
    everyone = findscu(
        site, "-S", {"QueryRetrieveLevel": "STUDY", "StudyDate": None, "AccessionNumber": "ACCI"},
        tmp_path,
    )  # fmt: skip
    assert [a.StudyDate for a in everyone] == ["20261330"]  # answered as stored


def test_a_patient_id_with_hyphens_is_a_single_value_not_a_range(site, tmp_path):
    keys = {"QueryRetrieveLevel": "STUDY", "PatientID": "NHS-123-456", "AccessionNumber": None}
    answers = findscu(site, "-P", keys, tmp_path)
    assert [a.AccessionNumber for a in answers] == ["ACCH"]
    out = tmp_path / "got"
    out.mkdir()
    result = subprocess.run(
        ["getscu", "-P", "-aec", "SCREENING_PACS", "-aet", "MODALITY1", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=NHS-123-456",
         "-k", f"StudyInstanceUID={answers[0].StudyInstanceUID}",
         "127.0.0.1", str(site["app"].ports["storage"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(list(out.iterdir())) == 1


@pytest.mark.parametrize("level", ["PATIENT", "STUDY", "SERIES", "IMAGE"])
def test_every_answer_carries_the_retrieve_ae_title(site, tmp_path, level):
    study = pydicom.dcmread(site["mixed"][0], stop_before_pixels=True)
    keys: dict[str, str | None] = {"QueryRetrieveLevel": level, "RetrieveAETitle": None}
    if level != "PATIENT":
        keys["PatientID"] = "9990000033"
    if level in ("SERIES", "IMAGE"):
        keys["StudyInstanceUID"] = str(study.StudyInstanceUID)
    if level == "IMAGE":
        keys["SeriesInstanceUID"] = str(study.SeriesInstanceUID)
    answers = findscu(site, "-P", keys, tmp_path)
    assert answers
    assert {a.RetrieveAETitle for a in answers} == {"SCREENING_PACS"}


def test_pending_is_ff01_when_optional_keys_are_not_supported(site):
    plain = pynetdicom_find(site, study_query(AccessionNumber="ACCD"))
    assert [s for s, _ in plain] == [0xFF00, 0x0000]
    unusual = pynetdicom_find(site, study_query(AccessionNumber="ACCD", InstitutionName=""))
    assert [s for s, _ in unusual] == [0xFF01, 0x0000]


def _combined_date_time() -> SOPClassExtendedNegotiation:
    item = SOPClassExtendedNegotiation()
    item.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
    item.service_class_application_information = b"\x00\x01"  # relational no, date-time yes
    return item


def test_date_and_time_ranges_combine_only_when_negotiated(site):
    """Study on 2026-12-01 at 06:35. StudyDate 20261130-20261201 with StudyTime 0700-0800:
    separately, 06:35 is outside 07:00-08:00; as one date-time range (negotiated), it is
    inside 2026-11-30 07:00 .. 2026-12-01 08:00."""
    query = study_query(
        StudyDate="20261130-20261201", StudyTime="0700-0800", AccessionNumber="ACCD"
    )
    separate = pynetdicom_find(site, query)
    assert [s for s, _ in separate] == [0x0000]
    combined = pynetdicom_find(site, query, ext=[_combined_date_time()])
    assert [i.AccessionNumber for s, i in combined if s in (0xFF00, 0xFF01)] == ["ACCD"]


def test_the_query_level_does_not_overwrite_the_log_severity(site):
    pynetdicom_find(site, study_query(AccessionNumber="ACCD"))
    [line, *_] = [ln for ln in site["app"].log().splitlines() if "event=qr.find " in ln]
    assert "level=info" in line
    assert "query_level=STUDY" in line


# --- C-MOVE -------------------------------------------------------------------------------------


def movescu(site, destination: str, *keys: str, root: str = "-S") -> subprocess.CompletedProcess:
    args = ["movescu", root, "-aec", "SCREENING_PACS", "-aet", "MODALITY1", "-aem", destination]
    for key in keys:
        args += ["-k", key]
    return subprocess.run(
        [*args, "127.0.0.1", str(site["app"].ports["storage"])],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def pynetdicom_move(site, destination: str, identifier: Dataset) -> list[Dataset]:
    ae = AE("MODALITY1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", site["app"].ports["storage"], ae_title="SCREENING_PACS")
    assert assoc.is_established
    try:
        return [
            s
            for s, _ in assoc.send_c_move(
                identifier, destination, StudyRootQueryRetrieveInformationModelMove
            )
        ]
    finally:
        assoc.release()


class CountingSCP:
    """A storage SCP on the DEST port that counts associations and stores nothing."""

    def __init__(self, port: int) -> None:
        self.associations = 0
        ae = AE("DEST")
        ae.supported_contexts = [build_context(MG)]

        def accepted(event):
            self.associations += 1

        self._server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_ACCEPTED, accepted)]
        )

    def close(self) -> None:
        self._server.shutdown()


def test_an_invalid_move_identifier_is_a900_with_its_comment_and_opens_nothing(site):
    """A PATIENT-level retrieve through Study Root, as Orthanc sends it."""
    listener = CountingSCP(site["ports"]["DEST"])
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "PATIENT"
        identifier.PatientID = "9990000033"
        [final] = pynetdicom_move(site, "DEST", identifier)
    finally:
        listener.close()
    assert final.Status == 0xA900
    assert "Study Root has no PATIENT level" in final.ErrorComment
    assert listener.associations == 0


def test_an_unreachable_destination_is_a702_and_names_itself(site):
    identifier = study_query()
    identifier.StudyInstanceUID = str(pydicom.dcmread(site["mixed"][0]).StudyInstanceUID)
    [final] = pynetdicom_move(site, "NOWHERE", identifier)
    assert final.Status == 0xA702
    assert "NOWHERE" in final.ErrorComment
    [line] = [ln for ln in site["app"].log().splitlines() if "qr.destination_unreachable" in ln]
    assert "destination=NOWHERE" in line
    assert f"port={site['ports']['NOWHERE']}" in line
    [unknown] = pynetdicom_move(site, "STRANGER", identifier)
    assert unknown.Status == 0xA801
    assert "not configured" in unknown.ErrorComment


def test_odd_length_values_are_repaired_on_the_way_out_and_kept_as_stored(site, tmp_path):
    """dcmtk's storescp aborts on an odd length: every instance of the move must arrive, the
    repaired one with even lengths, and the stored file must still be what the unit sent."""
    out = tmp_path / "dest"
    out.mkdir()
    storescp = subprocess.Popen(
        ["storescp", "-aet", "DEST", "-od", str(out), str(site["ports"]["DEST"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)
        study = pydicom.dcmread(site["odd"], stop_before_pixels=True).StudyInstanceUID
        result = movescu(site, "DEST", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
    finally:
        storescp.terminate()
        storescp.wait(10)
    assert result.returncode == 0, result.stderr + "\n".join(
        ln for ln in site["app"].log().splitlines() if "qr." in ln or "pynetdicom" in ln
    )
    got = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in out.iterdir()}
    odd_uid = pydicom.dcmread(site["odd"]).SOPInstanceUID
    assert set(got) == {odd_uid, pydicom.dcmread(site["after_odd"]).SOPInstanceUID}
    assert got[odd_uid].StudyDescription == "ABC"
    rows = {r["sop_instance_uid"]: r for r in _rows(site)}
    stored = site["root"] / "state" / "storage" / rows[odd_uid]["storage_path"]
    assert dataset_bytes(stored) == dataset_bytes(site["odd"])  # the original, untouched


def _rows(site) -> list[dict]:
    from tests.support import index_rows

    return index_rows(site["root"] / "state")


# --- C-GET --------------------------------------------------------------------------------------


def getscu(site, tmp_path: Path, study: str, *flags: str) -> tuple[Path, str]:
    out = tmp_path / f"get-{time.monotonic_ns()}"
    out.mkdir()
    result = subprocess.run(
        ["getscu", "-S", "+B", *flags, "-aec", "SCREENING_PACS", "-aet", "MODALITY1",
         "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(site["app"].ports["storage"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out, result.stderr


@pytest.mark.parametrize(
    ("flag", "expected"),
    [("+xt", uid.JPEGLSLossless), ("+xv", uid.JPEG2000Lossless), ("", uid.ExplicitVRLittleEndian)],
    ids=["jpeg-ls-first", "jpeg2000-first", "uncompressed"],
)
def test_c_get_delivers_every_stored_syntax_whatever_the_peer_proposes(
    site, tmp_path, flag, expected
):
    """getscu proposes one compressed syntax (then uncompressed) for its role-reversed storage
    contexts; a study stored in three syntaxes must arrive whole, pixels equal, in a syntax
    the peer accepted; what is stored in that syntax byte for byte."""
    study = str(pydicom.dcmread(site["mixed"][0]).StudyInstanceUID)
    out, _ = getscu(site, tmp_path, study, *([flag] if flag else []))
    got = {pydicom.dcmread(p).SOPInstanceUID: p for p in out.iterdir()}
    plain = {pydicom.dcmread(p).SOPInstanceUID: p for p in site["mixed_plain"]}
    assert set(got) == set(plain)
    for sop_uid, path in got.items():
        received = pydicom.dcmread(path)
        assert received.file_meta.TransferSyntaxUID == expected  # the one context's syntax
        assert np.array_equal(received.pixel_array, pydicom.dcmread(plain[sop_uid]).pixel_array)
    stored_as = {pydicom.dcmread(p).SOPInstanceUID: p for p in site["mixed"]}
    for sop_uid, path in got.items():
        original = stored_as[sop_uid]
        if pydicom.dcmread(original).file_meta.TransferSyntaxUID == expected:
            assert dataset_bytes(path) == dataset_bytes(original)
    assert "No presentation context" not in site["app"].log()


def test_group_length_elements_come_back_exactly_as_received(site, tmp_path):
    study = str(pydicom.dcmread(site["grouped"]).StudyInstanceUID)
    out, _ = getscu(site, tmp_path, study)
    [path] = list(out.iterdir())
    assert dataset_bytes(path) == dataset_bytes(site["grouped"])


# --- negotiation --------------------------------------------------------------------------------


def _negotiate(site, contexts) -> list:
    ae = AE("MODALITY1")
    ae.requested_contexts = contexts
    assoc = ae.associate("127.0.0.1", site["app"].ports["storage"], ae_title="SCREENING_PACS")
    assert assoc.is_established
    try:
        return [(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
    finally:
        assoc.release()


def test_compressed_syntaxes_are_for_image_classes_only(site):
    accepted = _negotiate(
        site,
        [
            build_context(BasicTextSRStorage, [uid.JPEGLSLossless]),
            build_context(BasicTextSRStorage, [uid.JPEG2000Lossless, uid.ExplicitVRLittleEndian]),
            build_context(MG, [uid.JPEG2000Lossless]),
        ],
    )
    assert accepted == [
        (BasicTextSRStorage, uid.ExplicitVRLittleEndian),
        (MG, uid.JPEG2000Lossless),
    ]


def test_a_context_with_both_roles_takes_only_what_the_appliance_can_send(site):
    """JPEG Lossless SV1 is accepted for receiving, but the appliance cannot encode it: a
    context in which the requestor also lets the appliance send must not take it."""
    from pynetdicom import build_role

    ae = AE("MODALITY1")
    ae.add_requested_context(MG, [uid.JPEGLosslessSV1, uid.ExplicitVRLittleEndian])
    role = build_role(MG, scu_role=True, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1", site["app"].ports["storage"], ae_title="SCREENING_PACS", ext_neg=[role]
    )
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
    finally:
        assoc.release()
    assert context.transfer_syntax[0] == uid.ExplicitVRLittleEndian


def test_a_lossy_context_is_accepted_only_when_nothing_lossless_is(site):
    beside = _negotiate(
        site,
        [
            build_context(MG, [uid.JPEGBaseline8Bit]),
            build_context(MG, [uid.ExplicitVRLittleEndian]),
        ],
    )
    assert beside == [(MG, uid.ExplicitVRLittleEndian)]
    alone = _negotiate(site, [build_context(MG, [uid.JPEGBaseline8Bit])])
    assert alone == [(MG, uid.JPEGBaseline8Bit)]


def test_a_destination_that_drops_the_association_fails_one_instance_not_the_move(site):
    """The destination aborts on the first C-STORE: that sub-operation fails, the others go
    on a new association at once (no wait for the DIMSE timeout)."""
    received: list[str] = []

    def on_store(event):
        if not received:
            received.append("aborted")
            event.assoc.abort()
            return 0xC000
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ae = AE("DEST")
    ae.add_supported_context(
        MG, [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.JPEG2000Lossless,
             uid.RLELossless]
    )  # fmt: skip
    server = ae.start_server(
        ("127.0.0.1", site["ports"]["DEST"]),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    identifier = study_query()
    identifier.StudyInstanceUID = str(pydicom.dcmread(site["mixed"][0]).StudyInstanceUID)
    started = time.monotonic()
    try:
        responses = pynetdicom_move(site, "DEST", identifier)
    finally:
        server.shutdown()
    elapsed = time.monotonic() - started
    final = responses[-1]
    assert final.Status == 0xB000, final  # sub-operations complete, one or more failures
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (2, 1)
    assert len(received) == 3
    assert elapsed < 15
    assert "event=qr.destination_reassociated destination=DEST" in site["app"].log()
