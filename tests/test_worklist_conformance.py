"""Worklist answers as strict units and other SCUs read them: dcmtk's findscu checked against
the PS3.4 K.6 return-key types, Orthanc's find-worklist, character sets by the bytes, and
every object the project's modality simulator makes validated by dciodvfy."""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

import pydicom
import pytest

from appliance.state import StatePaths
from appliance.testing import synthetic
from appliance.testing.modality import ModalitySimulator
from appliance.worklist.store import WorklistItem, WorklistStore
from tests.support import ApplianceProcess, OrthancProcess, write_config

pytestmark = [pytest.mark.usefixtures("dcmtk", "dicom3tools"), pytest.mark.system]

TODAY = datetime.datetime.now(datetime.UTC).replace(hour=10, minute=0, second=0, microsecond=0)

#: PS3.4 Table K.6-1 return key types, for the keys these tests ask for.
TYPE_1 = ["PatientName", "PatientID", "StudyInstanceUID", "RequestedProcedureID"]
TYPE_1_STEP = [
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "Modality",
    "ScheduledProcedureStepID",
]
TYPE_2 = [
    "AccessionNumber",
    "ReferringPhysicianName",
    "PatientBirthDate",
    "PatientSex",
    "ReferencedStudySequence",
    "ReferencedPatientSequence",
]
TYPE_2_STEP = ["ScheduledPerformingPhysicianName", "ScheduledStationName"]
#: 1C pairs: at least one of each pair has a value.
EITHER = [("RequestedProcedureDescription", "RequestedProcedureCodeSequence")]
EITHER_STEP = [("ScheduledProcedureStepDescription", "ScheduledProtocolCodeSequence")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("worklist-conformance")
    state = root / "state"
    state.mkdir()
    store = WorklistStore(StatePaths(state))
    store.open()
    # As the cloud creates them: no description, no code, no station.
    store.create(WorklistItem("ACC-K1", "9990000201", "BROWN^ALICE^^^", TODAY))
    store.create(WorklistItem("ACC-K2", "9990000202", "MÜLLER^ZOË", TODAY))
    store.create(
        WorklistItem("ACC-K3", "9990000203", "KAUR^PRIYA", TODAY, scheduled_station_ae="NORTH_MG1")
    )
    store.close()
    with ApplianceProcess(write_config(root)) as app:
        yield {"app": app, "root": root}


def findscu(site, tmp_path: Path, *keys: str, calling: str = "STRICT_MG") -> list[Path]:
    out = tmp_path / "answers"
    out.mkdir(exist_ok=True)
    args = ["findscu", "-W", "-X", "-od", str(out), "-aec", "SCREENING_MWL", "-aet", calling]
    for key in keys:
        args += ["-k", key]
    result = subprocess.run(
        [*args, "127.0.0.1", str(site["app"].ports["worklist"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return sorted(out.glob("rsp*.dcm"))


ALL_KEYS = [
    *TYPE_1, *TYPE_2, "RequestedProcedureDescription", "RequestedProcedureCodeSequence",
    *[f"ScheduledProcedureStepSequence[0].{k}" for k in
      [*TYPE_1_STEP, *TYPE_2_STEP, "ScheduledProcedureStepDescription",
       "ScheduledProtocolCodeSequence"]],
]  # fmt: skip


def test_every_answer_meets_the_k6_return_key_types(site, tmp_path):
    answers = [pydicom.dcmread(p) for p in findscu(site, tmp_path, *ALL_KEYS)]
    assert sorted(a.AccessionNumber for a in answers) == ["ACC-K1", "ACC-K2", "ACC-K3"]
    for answer in answers:
        step = answer.ScheduledProcedureStepSequence[0]
        for keyword in TYPE_1:
            assert answer.get(keyword), f"{answer.AccessionNumber}: Type 1 {keyword} empty"
        for keyword in TYPE_1_STEP:
            assert step.get(keyword), f"{answer.AccessionNumber}: Type 1 {keyword} empty"
        for keyword in TYPE_2:
            assert keyword in answer, f"Type 2 {keyword} missing"
        for keyword in TYPE_2_STEP:
            assert keyword in step, f"Type 2 {keyword} missing"
        for pair in EITHER:
            assert any(answer.get(k) for k in pair), f"neither of {pair}"
        for pair in EITHER_STEP:
            assert any(step.get(k) for k in pair), f"neither of {pair}"
        for sequence in (answer.RequestedProcedureCodeSequence, step.ScheduledProtocolCodeSequence):
            [code] = sequence
            assert all(code.get(k) for k in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning"))


def test_the_station_is_the_item_s_else_the_querying_unit_s(site, tmp_path):
    keys = ["AccessionNumber", "ScheduledProcedureStepSequence[0].ScheduledStationAETitle"]
    answers = {
        a.AccessionNumber: a.ScheduledProcedureStepSequence[0].ScheduledStationAETitle
        for a in map(pydicom.dcmread, findscu(site, tmp_path, *keys, calling="SOUTH_MG2"))
    }
    assert answers == {"ACC-K1": "SOUTH_MG2", "ACC-K2": "SOUTH_MG2", "ACC-K3": "NORTH_MG1"}


# 'ISO_IR 100\\ISO_IR 192' is no character set (several values are only ISO 2022 extensions,
# PS3.3 C.12.1.1.2): answered in the default repertoire, not echoed back.
@pytest.mark.parametrize("declared", [None, "ISO_IR 6", "ISO_IR 100\\ISO_IR 192"])
def test_a_query_in_the_default_repertoire_gets_ascii_bytes(site, tmp_path, declared):
    keys = ["PatientName", "PatientID=9990000202"]
    if declared:
        keys.append(f"SpecificCharacterSet={declared}")
    [path] = findscu(site, tmp_path, *keys)
    answer = pydicom.dcmread(path)
    raw = answer.get_item(0x00100010).value
    assert raw.rstrip(b" ") == b"MULLER^ZOE"  # transliterated, not 0xDC/0xC9 or UTF-8
    assert answer.get("SpecificCharacterSet") in (None, "", "ISO_IR 6")


def test_person_names_match_without_trailing_empty_components(site, tmp_path):
    answers = findscu(site, tmp_path, "PatientName=BROWN^ALICE", "AccessionNumber")
    assert [pydicom.dcmread(p).AccessionNumber for p in answers] == ["ACC-K1"]


def test_orthanc_reads_the_worklist(site, tmp_path):
    """Orthanc as worklist SCU (its own process and config, REST find-worklist)."""
    with OrthancProcess(tmp_path / "orthanc", {}) as orthanc:
        gateway = {
            "AET": "SCREENING_MWL",
            "Host": "127.0.0.1",
            "Port": site["app"].ports["worklist"],
        }
        orthanc.request("PUT", "/modalities/worklist", gateway)
        answers = orthanc.post(
            "/modalities/worklist/find-worklist",
            {"AccessionNumber": "", "PatientName": "", "PatientID": "9990000201",
             "ScheduledProcedureStepSequence": [{"ScheduledStationAETitle": "",
                                                 "ScheduledProcedureStepDescription": ""}]},
        )  # fmt: skip
    [answer] = answers
    assert answer["AccessionNumber"] == "ACC-K1"
    [step] = answer["ScheduledProcedureStepSequence"]
    assert step["ScheduledStationAETitle"] == "ORTHANC"  # the querying AE: nothing else said
    assert step["ScheduledProcedureStepDescription"] == "Screening mammography"


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def test_every_object_the_simulator_makes_is_a_valid_iod(tmp_path):
    """What selftest, the demo and the cloud's test participant send: dciodvfy finds no
    error in a Digital Mammography X-Ray Image For Presentation, any view, any shape."""
    item = pydicom.Dataset()
    item.PatientID, item.PatientName = "9990000299", "TEST^PARTICIPANT"
    item.AccessionNumber, item.StudyInstanceUID = "ACC-SIM", pydicom.uid.generate_uid()
    series = ModalitySimulator.series_uid(item)
    for laterality, view in synthetic.SCREENING_VIEWS:
        ds = synthetic.mammogram(
            laterality=laterality, view=view, shape=(256, 208),
            patient_id=str(item.PatientID), patient_name=str(item.PatientName),
            accession_number=str(item.AccessionNumber),
            study_instance_uid=str(item.StudyInstanceUID), series_instance_uid=series,
        )  # fmt: skip
        path = tmp_path / f"{laterality}{view}.dcm"
        ds.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], path.name
