"""Modality Worklist C-FIND, through pynetdicom and dcmtk's findscu -W, against a fixed worklist.

The site is in Europe/London: the cloud schedules in UTC, modalities see and query local time.
"""

from __future__ import annotations

import datetime
import subprocess
import warnings
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import ModalityWorklistInformationFind

from appliance.config import WorklistScpConfig
from appliance.dicom.worklist_scp import WorklistSCP
from appliance.state import StatePaths
from appliance.worklist.store import COMPLETED, WorklistItem, WorklistStore
from tests.support import ApplianceProcess, write_config

pytestmark = pytest.mark.usefixtures("dcmtk")
UTC = datetime.UTC


def at(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


POPULATION = [
    WorklistItem(
        "ACC-A",
        "9990000001",
        "O'BRIEN^SIÂN",
        at("2026-11-22T10:00"),
        scheduled_station_ae="HOLOGIC1",
        patient_birth_date="19700101",
        patient_sex="F",
    ),
    WorklistItem("ACC-B", "9990000002", "MÜLLER^ZOË", at("2026-11-22T15:30")),
    WorklistItem("ACC-C", "9990000003", "SMITH^JANE", at("2026-11-22T11:00"), modality="CT"),
    # 23:30 UTC on 30 June is 00:30 on 1 July in London (BST)
    WorklistItem("ACC-D", "9990000004", "JONES^ANN", at("2026-06-30T23:30")),
    WorklistItem("ACC-G", "9990000007", "BROWN^MAY", at("2026-11-25T09:00")),
]
FINISHED = WorklistItem("ACC-E", "9990000005", "DONE^ALREADY", at("2026-11-22T12:00"))
INVALID = WorklistItem("ACC-X", "", "NO^PATIENTID", at("2026-11-22T13:00"))
OFFERED = {item.accession_number for item in POPULATION}


def populate(state_dir: Path, items: list[WorklistItem]) -> WorklistStore:
    state_dir.mkdir(parents=True, exist_ok=True)
    store = WorklistStore(StatePaths(state_dir))
    store.open()
    for item in items:
        store.create(item)
    return store


@pytest.fixture(scope="module")
def worklist(tmp_path_factory):
    directory = tmp_path_factory.mktemp("worklist")
    store = populate(directory / "state", [*POPULATION, FINISHED, INVALID])
    store.set_status("ACC-E", "IN PROGRESS")
    store.database.connection.execute(
        "UPDATE worklist_items SET status = ? WHERE accession_number = 'ACC-E'", (COMPLETED,)
    )
    store.close()
    with ApplianceProcess(write_config(directory)) as app:
        yield app


def query(**keys) -> Dataset:
    """Top-level keys as keywords; `step` is a dict for the Scheduled Procedure Step item."""
    step_keys = keys.pop("step", {"Modality": ""})
    ds = Dataset()
    ds.AccessionNumber = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    step = Dataset()
    for keyword, value in step_keys.items():
        setattr(step, keyword, value)
    ds.ScheduledProcedureStepSequence = [step]
    return ds


def find(port: int, identifier: Dataset, calling: str = "MODALITY1") -> tuple[list, list[Dataset]]:
    ae = AE(calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCREENING_MWL")
    assert assoc.is_established
    statuses, answers = [], []
    try:
        for status, answer in assoc.send_c_find(identifier, ModalityWorklistInformationFind):
            statuses.append(status)
            if answer is not None and status.Status in (0xFF00, 0xFF01):
                answers.append(answer)
    finally:
        assoc.release()
    return statuses, answers


def accessions(app: ApplianceProcess, identifier: Dataset) -> set[str]:
    statuses, answers = find(app.ports["worklist"], identifier)
    assert statuses[-1].Status == 0x0000
    return {a.AccessionNumber for a in answers}


@pytest.mark.system
def test_universal_query_offers_only_scheduled_and_in_progress_valid_items(worklist):
    assert accessions(worklist, query()) == OFFERED
    assert "event=worklist.item_invalid accession_number=ACC-X" in worklist.log()


@pytest.mark.system
def test_single_value_matching(worklist):
    assert accessions(worklist, query(PatientID="9990000001")) == {"ACC-A"}
    assert accessions(worklist, query(AccessionNumber="ACC-C")) == {"ACC-C"}
    assert accessions(worklist, query(PatientID="0000000000")) == set()


@pytest.mark.system
@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("o'b*", {"ACC-A"}),  # names are matched case-insensitively
        ("M?LLER^*", {"ACC-B"}),
        ("smith^jane", {"ACC-C"}),
        ("*AN*", {"ACC-C", "ACC-D"}),  # not SIÂN: Â is not A
        ("*ÂN", {"ACC-A"}),
        ("ZZ*", set()),
    ],
)
def test_name_wildcards(worklist, pattern, expected):
    assert accessions(worklist, query(PatientName=pattern)) == expected


@pytest.mark.system
@pytest.mark.parametrize(
    ("dates", "expected"),
    [
        ("20261122", {"ACC-A", "ACC-B", "ACC-C"}),
        ("20261122-", {"ACC-A", "ACC-B", "ACC-C", "ACC-G"}),
        ("-20261122", {"ACC-A", "ACC-B", "ACC-C", "ACC-D"}),
        ("20261101-20261130", {"ACC-A", "ACC-B", "ACC-C", "ACC-G"}),
        ("20260701", {"ACC-D"}),  # the site's local date, not UTC's
        ("20260630", set()),
    ],
)
def test_date_ranges_in_the_site_time_zone(worklist, dates, expected):
    step = {"ScheduledProcedureStepStartDate": dates}
    assert accessions(worklist, query(step=step)) == expected


@pytest.mark.system
def test_combined_date_time_range(worklist):
    morning = {
        "ScheduledProcedureStepStartDate": "20261122",
        "ScheduledProcedureStepStartTime": "0900-1200",
    }
    assert accessions(worklist, query(step=morning)) == {"ACC-A", "ACC-C"}
    # From 15:00 on the 22nd to 09:30 on the 25th, not "15:00-09:30 on each day".
    span = {
        "ScheduledProcedureStepStartDate": "20261122-20261125",
        "ScheduledProcedureStepStartTime": "1500-0930",
    }
    assert accessions(worklist, query(step=span)) == {"ACC-B", "ACC-G"}
    afternoon_any_day = {"ScheduledProcedureStepStartTime": "1500-1600"}
    assert accessions(worklist, query(step=afternoon_any_day)) == {"ACC-B"}


@pytest.mark.system
def test_list_of_uids(worklist):
    _, answers = find(worklist.ports["worklist"], query(StudyInstanceUID=""))
    uids = {a.AccessionNumber: a.StudyInstanceUID for a in answers}
    wanted = query(StudyInstanceUID=[uids["ACC-A"], uids["ACC-B"]])
    assert accessions(worklist, wanted) == {"ACC-A", "ACC-B"}


@pytest.mark.system
def test_sequence_matching_on_modality_and_station(worklist):
    assert accessions(worklist, query(step={"Modality": "CT"})) == {"ACC-C"}
    assert accessions(worklist, query(step={"Modality": "MG"})) == OFFERED - {"ACC-C"}
    station = {"ScheduledStationAETitle": "HOLOGIC1"}
    assert accessions(worklist, query(step=station)) == {"ACC-A"}


@pytest.mark.system
def test_answers_carry_exactly_the_requested_keys(worklist):
    identifier = Dataset()
    identifier.PatientName = ""
    identifier.PatientWeight = ""  # a key the worklist does not hold: returned empty
    step = Dataset()
    step.Modality = "CT"
    identifier.ScheduledProcedureStepSequence = [step]
    [answer] = find(worklist.ports["worklist"], identifier)[1]
    assert [e.keyword for e in answer] == [  # no Specific Character Set: none was asked for
        "PatientName",
        "PatientWeight",
        "ScheduledProcedureStepSequence",
    ]
    assert answer.PatientWeight in (None, "")
    assert [e.keyword for e in answer.ScheduledProcedureStepSequence[0]] == ["Modality"]


@pytest.mark.system
def test_full_record_for_a_cloud_created_item_is_complete_and_stable(worklist):
    identifier = query(
        PatientName="",
        PatientID="",
        PatientBirthDate="",
        PatientSex="",
        StudyInstanceUID="",
        RequestedProcedureID="",
        AccessionNumber="ACC-A",
        step={
            "Modality": "",
            "ScheduledStationAETitle": "",
            "ScheduledProcedureStepStartDate": "",
            "ScheduledProcedureStepStartTime": "",
            "ScheduledProcedureStepID": "",
        },
    )
    [first] = find(worklist.ports["worklist"], identifier)[1]
    [again] = find(worklist.ports["worklist"], identifier)[1]
    assert first.StudyInstanceUID.startswith("1.2.826.0.1.3680043.8.498.")
    assert first.StudyInstanceUID == again.StudyInstanceUID
    step = first.ScheduledProcedureStepSequence[0]
    assert (step.ScheduledProcedureStepStartDate, step.ScheduledProcedureStepStartTime) == (
        "20261122",
        "100000",  # 10:00 UTC is 10:00 GMT in November
    )
    assert (first.PatientBirthDate, first.PatientSex, first.RequestedProcedureID) == (
        "19700101",
        "F",
        "ACC-A",
    )


@pytest.mark.system
def test_names_round_trip_in_utf8_and_latin1(worklist):
    """A query naming no Specific Character Set declares the default repertoire (PS3.4
    K.4.1.1.3.1): the answer is ASCII, transliterated, and declares nothing."""
    [plain] = find(worklist.ports["worklist"], query(PatientName="", PatientID="9990000002"))[1]
    assert "SpecificCharacterSet" not in plain
    assert str(plain.PatientName) == "MULLER^ZOE"
    utf8 = query(PatientName="", PatientID="9990000002")
    utf8.SpecificCharacterSet = "ISO_IR 192"
    [utf8] = find(worklist.ports["worklist"], utf8)[1]
    assert utf8.SpecificCharacterSet == "ISO_IR 192"
    assert str(utf8.PatientName) == "MÜLLER^ZOË"
    latin = query(PatientName="", PatientID="9990000002")
    latin.SpecificCharacterSet = "ISO_IR 100"
    [answer] = find(worklist.ports["worklist"], latin)[1]
    assert answer.SpecificCharacterSet == "ISO_IR 100"
    assert str(answer.PatientName) == "MÜLLER^ZOË"
    obrien = query(PatientName="", PatientID="9990000001")
    obrien.SpecificCharacterSet = "ISO_IR 192"
    [obrien] = find(worklist.ports["worklist"], obrien)[1]
    assert str(obrien.PatientName) == "O'BRIEN^SIÂN"


def findscu(port: int, out: Path, *keys: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    args = [arg for key in keys for arg in ("-k", key)]
    result = subprocess.run(
        [
            "findscu",
            "-W",
            "-aec",
            "SCREENING_MWL",
            "-X",
            "-od",
            str(out),
            *args,
            "127.0.0.1",
            str(port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return sorted(out.glob("rsp*.dcm"))


@pytest.mark.system
def test_findscu_sees_latin1_bytes_when_it_asks_for_latin1(worklist, tmp_path):
    [response] = findscu(
        worklist.ports["worklist"],
        tmp_path,
        "SpecificCharacterSet=ISO_IR 100",
        "PatientName=m*",
        "PatientID",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261122",
    )
    raw = response.read_bytes()
    assert "MÜLLER^ZOË".encode("latin-1") in raw
    assert "MÜLLER".encode() not in raw  # not UTF-8 bytes under a Latin-1 label
    assert pydicom.dcmread(response).PatientID == "9990000002"


@pytest.mark.system
def test_findscu_today_and_modality(worklist, tmp_path):
    responses = findscu(
        worklist.ports["worklist"],
        tmp_path,
        "AccessionNumber",
        "PatientName",
        "ScheduledProcedureStepSequence[0].Modality=MG",
        "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261122",
    )
    assert {pydicom.dcmread(p).AccessionNumber for p in responses} == {"ACC-A", "ACC-B"}


@pytest.mark.system
@pytest.mark.parametrize(
    ("step", "complaint"),
    [
        ({"ScheduledProcedureStepStartDate": "2026-11-22"}, "ScheduledProcedureStepStartDate"),
        ({"ScheduledProcedureStepStartDate": "20261341"}, "not a valid date"),
        (
            {
                "ScheduledProcedureStepStartDate": "20261122",
                "ScheduledProcedureStepStartTime": "2599",
            },
            "not a valid time",
        ),
    ],
)
def test_malformed_keys_get_a_failure_status_naming_the_problem(worklist, step, complaint):
    with warnings.catch_warnings():  # pydicom warns about the bad value we mean to send
        warnings.simplefilter("ignore")
        malformed = query(step=step)
        statuses, answers = find(worklist.ports["worklist"], malformed)
    assert answers == []
    assert statuses[-1].Status == 0xA900
    assert complaint in statuses[-1].ErrorComment
    assert accessions(worklist, query()) == OFFERED  # still serving


@pytest.mark.system
def test_character_set_per_calling_ae_replaces_what_it_cannot_carry(tmp_path):
    populate(
        tmp_path / "state",
        [
            WorklistItem("ACC-L", "9990000010", "ŁUKASZ^ZOË", at("2026-11-22T10:00")),
            WorklistItem("ACC-J", "9990000011", "山田^太郎", at("2026-11-22T11:00")),
        ],
    ).close()
    units = {"OLDUNIT": "ISO_IR 100", "JPUNIT": "\\ISO 2022 IR 87"}
    override = {"dicom": {"worklist": {"character_sets": units}}}
    with ApplianceProcess(write_config(tmp_path, override)) as app:
        port = app.ports["worklist"]
        _, [answer] = find(port, query(PatientName="", PatientID="9990000010"), calling="OLDUNIT")
        assert answer.SpecificCharacterSet == "ISO_IR 100"
        # Ë is Latin-1 and stays; Ł has no Latin-1 form and is transliterated, not mis-encoded.
        assert str(answer.PatientName) == "LUKASZ^ZOË"
        modern_query = query(PatientName="", PatientID="9990000010")
        modern_query.SpecificCharacterSet = "ISO_IR 192"
        _, [modern] = find(port, modern_query, calling="NEWUNIT")
        assert str(modern.PatientName) == "ŁUKASZ^ZOË"
        _, [plain] = find(port, query(PatientName="", PatientID="9990000010"), calling="NEWUNIT")
        assert "SpecificCharacterSet" not in plain  # no set named: the default repertoire
        assert str(plain.PatientName) == "LUKASZ^ZOE"
        _, [japanese] = find(port, query(PatientName="", PatientID="9990000011"), calling="JPUNIT")
        assert list(japanese.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
        assert str(japanese.PatientName) == "山田^太郎"


class _Requestor:
    ae_title = "MODALITY1"


class _Association:
    requestor = _Requestor()


class CancellingEvent:
    """An EVT_C_FIND as pynetdicom presents it, whose C-CANCEL arrives after `after` answers.

    End to end, pynetdicom's one DUL thread both writes answers and reads the C-CANCEL, so when
    the answers back up the cancel is read late; the handler's own contract is tested here.
    """

    def __init__(self, identifier: Dataset, after: int) -> None:
        self.identifier = identifier
        self.assoc = _Association()
        # A deflated context: answers are yielded to pynetdicom rather than written directly.
        self.context = SimpleNamespace(context_id=1, transfer_syntax=DeflatedExplicitVRLittleEndian)
        self.after = after
        self.answered = 0

    @property
    def is_cancelled(self) -> bool:
        return self.answered >= self.after


def test_c_cancel_stops_the_answers_at_once(tmp_path):
    store = populate(tmp_path, POPULATION)
    scp = WorklistSCP(store, door=None, config=WorklistScpConfig(), zone="Europe/London")
    event = CancellingEvent(query(), after=2)
    statuses = []
    for status, _answer in scp.handle_find(event):
        statuses.append(status)
        event.answered += status == 0xFF00
    assert statuses == [0xFF00, 0xFF00, 0xFE00]
    uncancelled = CancellingEvent(query(), after=len(POPULATION) + 1)
    assert [status for status, _ in scp.handle_find(uncancelled)] == [0xFF00] * len(POPULATION)
    store.close()


EQUIVALENCE_QUERIES = [
    query(),
    query(PatientName="", PatientWeight="", step={"Modality": ""}),
    query(
        PatientName="*",
        PatientID="",
        StudyInstanceUID="",
        RequestedProcedureCodeSequence=[],
        step={
            "ScheduledProcedureStepStartDate": "20261122-",
            "ScheduledStationAETitle": "",
            "ScheduledProtocolCodeSequence": [],
            "ScheduledProcedureStepID": "",
        },
    ),
]


@pytest.mark.parametrize("term", ["ISO_IR 192", "ISO_IR 100"])
@pytest.mark.parametrize("implicit", [True, False])
def test_byte_answers_decode_to_exactly_the_dataset_answers(term, implicit):
    import zoneinfo

    from appliance.dicom import encoded, matching
    from appliance.dicom.charsets import encode_for
    from appliance.dicom.worklist_scp import record

    zone = zoneinfo.ZoneInfo("Europe/London")
    for identifier in EQUIVALENCE_QUERIES:
        assert encoded.expressible(identifier)
        for item in POPULATION:
            full = record(item, zone)
            if not matching.matches(identifier, full):
                continue
            expected = encode_for(matching.project(identifier, full), term)
            as_bytes = encoded.project(
                identifier, encoded.EncodedRecord(encode_for(full, term), term, implicit)
            )
            assert decode(BytesIO(as_bytes), implicit, True) == expected


def test_nested_sequence_templates_take_the_dataset_path():
    from appliance.dicom import encoded

    code = Dataset()
    code.CodeValue = "MAMMO"
    nested = query(step={"ScheduledProtocolCodeSequence": [code]})
    assert not encoded.expressible(nested)


def test_the_site_default_code_is_given_only_to_items_that_describe_no_procedure():
    """Units choose the acquisition protocol from the code: a described procedure must not
    be sent another procedure's code (K.6 needs one of description and code)."""
    import zoneinfo

    from appliance.config import StepDefaults
    from appliance.dicom.worklist_scp import record

    zone = zoneinfo.ZoneInfo("Europe/London")
    at = datetime.datetime(2026, 12, 3, 10, tzinfo=datetime.UTC)
    defaults = StepDefaults()
    described = WorklistItem(
        "ACC-D1", "9990000301", "DESC^ONE", at, study_description="Diagnostic mammography"
    )
    full = record(described, zone, defaults)
    assert "RequestedProcedureCodeSequence" not in full
    assert "ScheduledProtocolCodeSequence" not in full.ScheduledProcedureStepSequence[0]
    assert full.RequestedProcedureDescription == "Diagnostic mammography"
    silent = record(WorklistItem("ACC-D2", "9990000302", "DESC^TWO", at), zone, defaults)
    assert silent.RequestedProcedureDescription == "Screening mammography"
    assert silent.RequestedProcedureCodeSequence[0].CodeValue == "24623002"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scheduled_station_ae", "NORTH MG1 TOO LONG NAME"),
        ("scheduled_station_name", "A\\B"),
        ("study_description", "x" * 65),
        ("procedure_code_value", "1" * 17),
    ],
)
def test_an_item_no_worklist_answer_could_carry_is_refused_naming_the_field(tmp_path, field, value):
    import attrs

    from appliance.worklist.store import InvalidItem

    store = WorklistStore(StatePaths(tmp_path))
    store.open()
    at = datetime.datetime(2026, 12, 3, 10, tzinfo=datetime.UTC)
    item = attrs.evolve(WorklistItem("ACC-V1", "9990000311", "VALUE^CHECK", at), **{field: value})
    with pytest.raises(InvalidItem, match=field):
        store.create(item)
    assert store.items() == []
    store.close()
