"""MPPS N-CREATE / N-SET through a pynetdicom SCU: transitions, replays and refusals (PS3.4 F.7)."""

from __future__ import annotations

import datetime

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

from appliance.state import StatePaths
from appliance.testing import synthetic
from appliance.worklist.store import WorklistItem, WorklistStore
from tests.support import ApplianceProcess, send_files, write_config

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]
ITEM = WorklistItem(
    "ACC-M1",
    "9990000101",
    "MPPS^TEST",
    datetime.datetime(2026, 11, 22, 10, tzinfo=datetime.UTC),
    source_message_id="cloud-action-1",
)


@pytest.fixture
def appliance(tmp_path):
    (tmp_path / "state").mkdir()
    store = WorklistStore(StatePaths(tmp_path / "state"))
    store.open()
    store.create(ITEM)
    store.close()
    with ApplianceProcess(write_config(tmp_path)) as app:
        # Read-only beside the running appliance: an unopened store reads through its readers.
        app.worklist = WorklistStore(StatePaths(tmp_path / "state"))
        yield app


def in_progress(accession: str = "ACC-M1") -> Dataset:
    step = Dataset()
    step.AccessionNumber = accession
    step.ScheduledProcedureStepID = accession
    step.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[accession])  # Type 1
    ds = Dataset()
    ds.ScheduledStepAttributesSequence = [step]
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepID = "PPS-1"
    ds.PerformedStationAETitle = "MODALITY1"
    ds.PerformedProcedureStepStartDate = "20261122"
    ds.PerformedProcedureStepStartTime = "100500"
    ds.Modality = "MG"
    ds.PatientName = "MPPS^TEST"
    ds.PatientID = "9990000101"
    ds.PerformedSeriesSequence = []
    return ds


def finished(status: str = "COMPLETED", images: tuple[str, ...] = ()) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = "20261122"
    ds.PerformedProcedureStepEndTime = "101500"
    series = Dataset()
    series.SeriesInstanceUID = "1.2.3.4"
    series.ReferencedImageSequence = []
    for uid in images:
        ref = Dataset()
        ref.ReferencedSOPClassUID = synthetic.MG_FOR_PRESENTATION
        ref.ReferencedSOPInstanceUID = uid
        series.ReferencedImageSequence.append(ref)
    ds.PerformedSeriesSequence = [series]
    return ds


class Modality:
    """One association carrying MPPS requests, as a mammography unit would."""

    def __init__(self, port: int) -> None:
        ae = AE("MODALITY1")
        ae.add_requested_context(MPPS)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="SCREENING_MWL")
        assert self.assoc.is_established

    def create(self, ds: Dataset, uid: str) -> Dataset:
        return self.assoc.send_n_create(ds, MPPS, uid)[0]

    def set(self, ds: Dataset, uid: str) -> Dataset:
        return self.assoc.send_n_set(ds, MPPS, uid)[0]

    def set_with_reply(self, ds: Dataset, uid: str) -> tuple[Dataset, Dataset | None]:
        status, attributes = self.assoc.send_n_set(ds, MPPS, uid)
        return status, attributes

    def close(self) -> None:
        self.assoc.release()


@pytest.fixture
def modality(appliance):
    unit = Modality(appliance.ports["worklist"])
    yield unit
    unit.close()


def event_types(app) -> list[str]:
    return [event["event_type"] for event in app.worklist.events()]


def test_n_create_links_the_item_and_emits_in_progress(appliance, modality):
    uid = generate_uid()
    assert modality.create(in_progress(), uid).Status == 0x0000
    item = appliance.worklist.get("ACC-M1")
    assert (item.status, item.mpps_instance_uid) == ("IN PROGRESS", uid)
    [event] = appliance.worklist.events()
    assert event["event_type"] == "mpps.in_progress"
    assert event["source_message_id"] == "cloud-action-1"
    assert event["payload"]["study_instance_uid"] == item.study_instance_uid


def test_intermediate_n_set_is_accepted_and_completion_finishes_the_item(appliance, modality):
    uid = generate_uid()
    modality.create(in_progress(), uid)
    progress = Dataset()
    progress.PerformedProcedureStepStatus = "IN PROGRESS"
    progress.PerformedProcedureStepDescription = "2 views so far"
    assert modality.set(progress, uid).Status == 0x0000
    assert event_types(appliance) == ["mpps.in_progress"]
    assert modality.set(finished(images=("1.2.3.4.1", "1.2.3.4.2")), uid).Status == 0x0000
    assert appliance.worklist.get("ACC-M1").status == "COMPLETED"
    completed = appliance.worklist.events()[-1]
    assert completed["event_type"] == "mpps.completed"
    assert completed["source_message_id"] == "cloud-action-1"
    assert completed["payload"]["performed_instances"] == ["1.2.3.4.1", "1.2.3.4.2"]
    assert appliance.worklist.mpps.get(uid)["status"] == "COMPLETED"


def test_discontinued(appliance, modality):
    uid = generate_uid()
    modality.create(in_progress(), uid)
    assert modality.set(finished("DISCONTINUED"), uid).Status == 0x0000
    assert appliance.worklist.get("ACC-M1").status == "DISCONTINUED"
    assert event_types(appliance) == ["mpps.in_progress", "mpps.discontinued"]


def test_exact_replays_are_answered_with_success_and_change_nothing(appliance, modality):
    uid = generate_uid()
    assert modality.create(in_progress(), uid).Status == 0x0000
    assert modality.create(in_progress(), uid).Status == 0x0000  # reply was lost; resent
    assert modality.set(finished(), uid).Status == 0x0000
    assert modality.set(finished(), uid).Status == 0x0000
    assert event_types(appliance) == ["mpps.in_progress", "mpps.completed"]
    assert "replay=True" in appliance.log()


def test_refusals_carry_the_ps34_statuses(appliance, modality):
    uid = generate_uid()
    modality.create(in_progress(), uid)
    modality.set(finished(), uid)

    changed_after_completion = modality.set(finished("DISCONTINUED"), uid)
    assert changed_after_completion.Status == 0x0110
    assert changed_after_completion.ErrorID == 0xA710

    assert modality.set(finished(), generate_uid()).Status == 0x0112  # no such instance

    conflicting = in_progress()
    conflicting.PerformedProcedureStepID = "PPS-OTHER"
    assert modality.create(conflicting, uid).Status == 0x0111  # duplicate SOP instance

    born_completed = in_progress()
    born_completed.PerformedProcedureStepStatus = "COMPLETED"
    assert modality.create(born_completed, generate_uid()).Status == 0x0106

    other = generate_uid()
    modality.create(in_progress(), other)
    paused = Dataset()
    paused.PerformedProcedureStepStatus = "PAUSED"
    assert modality.set(paused, other).Status == 0x0106

    no_steps = in_progress()
    del no_steps.ScheduledStepAttributesSequence
    assert modality.create(no_steps, generate_uid()).Status == 0x0120

    # Type 1 attributes of the N-CREATE: absent is 0x0120 (Missing Attribute), present but
    # empty is 0x0121 (Missing Attribute Value); the status was answered 0x0106 before.
    no_status = in_progress()
    del no_status.PerformedProcedureStepStatus
    refused = modality.create(no_status, generate_uid())
    assert refused.Status == 0x0120
    assert "Performed Procedure Step Status" in refused.ErrorComment
    no_station = in_progress()
    no_station.PerformedStationAETitle = ""
    assert modality.create(no_station, generate_uid()).Status == 0x0121
    no_study = in_progress()
    no_study.ScheduledStepAttributesSequence[0].StudyInstanceUID = ""
    assert modality.create(no_study, generate_uid()).Status == 0x0121
    absent_study = in_progress()
    del absent_study.ScheduledStepAttributesSequence[0].StudyInstanceUID
    assert modality.create(absent_study, generate_uid()).Status == 0x0120
    empty_steps = in_progress()
    empty_steps.ScheduledStepAttributesSequence = []
    assert modality.create(empty_steps, generate_uid()).Status == 0x0121

    # COMPLETED says what was performed: at least one series (PS3.4 F.7.2.2.2).
    empty = generate_uid()
    modality.create(in_progress(), empty)
    nothing = finished()
    nothing.PerformedSeriesSequence = []
    assert modality.set(nothing, empty).Status == 0x0121

    assert appliance.worklist.get("ACC-M1").status == "COMPLETED"
    assert appliance.log().count("event=mpps.refused") == 12


def test_first_image_moves_the_item_in_progress_and_mpps_is_still_recorded(
    appliance, modality, tmp_path
):
    image = tmp_path / "lcc.dcm"
    synthetic.mammogram(shape=(64, 64), accession_number="ACC-M1").save_as(
        image, enforce_file_format=True
    )
    assert send_files(appliance.ports["storage"], [image])[0].Status == 0x0000
    assert appliance.worklist.get("ACC-M1").status == "IN PROGRESS"
    assert event_types(appliance) == ["worklist.status_changed"]

    uid = generate_uid()
    assert modality.create(in_progress(), uid).Status == 0x0000
    assert appliance.worklist.get("ACC-M1").mpps_instance_uid == uid
    sop_uid = pydicom.dcmread(image).SOPInstanceUID
    modality.set(finished(images=(sop_uid,)), uid)
    assert appliance.worklist.get("ACC-M1").status == "COMPLETED"


def test_unscheduled_procedure_is_recorded_without_an_item(appliance, modality):
    uid = generate_uid()
    assert modality.create(in_progress("WALK-IN-1"), uid).Status == 0x0000
    assert appliance.worklist.mpps.get(uid)["accession_number"] == "WALK-IN-1"
    [event] = appliance.worklist.events()
    assert (event["event_type"], event["source_message_id"]) == ("mpps.in_progress", None)


def test_an_n_set_without_character_set_is_read_in_the_n_create_s(appliance, modality):
    """F.7.2.2.1: the N-SET's text is in the N-CREATE's Specific Character Set unless it
    names its own. UTF-8 bytes under no label were stored as Latin-1 mojibake."""
    from pydicom.dataelem import DataElement

    uid = generate_uid()
    created = in_progress()
    created.SpecificCharacterSet = "ISO_IR 192"
    assert modality.create(created, uid).Status == 0
    update = Dataset()
    update.PerformedProcedureStepStatus = "IN PROGRESS"
    text = "Mammographie für Zoë"
    # The unit's bytes: UTF-8, no Specific Character Set in the N-SET.
    update.add(DataElement(0x00400254, "LO", text.encode("utf-8")))
    status, reply = modality.set_with_reply(update, uid)
    assert status.Status == 0
    stored = appliance.worklist.mpps.get(uid)["attributes"]
    assert stored["00400254"]["Value"] == [text]
    # The reply's attributes are the unit's own bytes, not re-encoded in the default repertoire.
    assert reply is not None
    assert reply.get_item(0x00400254).value.rstrip(b" ") == text.encode("utf-8")
