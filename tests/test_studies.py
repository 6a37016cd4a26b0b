"""Study completeness from the workflow, through real DICOM traffic to the running appliance."""

from __future__ import annotations

import datetime
import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from appliance.state import StatePaths
from appliance.testing import synthetic
from appliance.worklist.store import WorklistItem, WorklistStore
from tests.support import ApplianceProcess, send_files, write_config
from tests.test_mpps import Modality, finished, in_progress

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]
FAST = {"studies": {"quiet_period_s": 1.0, "timeout_s": 4.0, "check_interval_s": 0.2}}


def prepare(tmp_path: Path, *accessions: str) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    store = WorklistStore(StatePaths(state))
    store.open()
    for n, accession in enumerate(accessions):
        store.create(
            WorklistItem(
                accession,
                f"99900005{n:02d}",
                "STUDY^TEST",
                datetime.datetime(2026, 11, 22, 10, tzinfo=datetime.UTC),
                source_message_id=f"action-{accession}",
            )
        )
    store.close()
    return write_config(tmp_path, FAST)


def views(tmp_path: Path, accession: str) -> list[Path]:
    return synthetic.screening_study(
        tmp_path / accession, shape=(128, 104), accession_number=accession
    )


def study_events(state: Path, accession: str | None = None) -> list[dict]:
    with sqlite3.connect(f"file:{state / 'pacs.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM events WHERE event_type LIKE 'study.%' ORDER BY seq")
        found = [dict(r) | {"payload": json.loads(r["payload"])} for r in rows]
    return [e for e in found if accession is None or e["accession_number"] == accession]


def wait_for(state: Path, count: int, accession: str | None = None, within: float = 20) -> list:
    deadline = time.monotonic() + within
    while True:
        if (state / "pacs.db").exists():
            try:
                found = study_events(state, accession)
            except sqlite3.OperationalError:  # the studies table is not there yet
                found = []
            if len(found) >= count:
                return found
        assert time.monotonic() < deadline, f"no {count} study events after {within} s"
        time.sleep(0.05)


def uids(paths: list[Path]) -> list[str]:
    return [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]


def test_mpps_completed_after_the_last_image_completes_the_study(tmp_path):
    config = prepare(tmp_path, "ACC-S1")
    paths = views(tmp_path, "ACC-S1")
    with ApplianceProcess(config) as app:
        unit = Modality(app.ports["worklist"])
        mpps = generate_uid()
        unit.create(in_progress("ACC-S1"), mpps)
        send_files(app.ports["storage"], paths)
        unit.set(finished(images=tuple(uids(paths))), mpps)
        unit.close()
        [event] = wait_for(tmp_path / "state", 1)
    payload = event["payload"]
    assert (event["event_type"], payload["rule"]) == ("study.complete", "mpps")
    assert sorted(payload["instances"]) == sorted(uids(paths))
    assert payload["views_missing"] == []
    assert event["source_message_id"] == "action-ACC-S1"


def test_mpps_completed_before_the_last_image_waits_for_it(tmp_path):
    config = prepare(tmp_path, "ACC-S2")
    paths = views(tmp_path, "ACC-S2")
    with ApplianceProcess(config) as app:
        unit = Modality(app.ports["worklist"])
        mpps = generate_uid()
        unit.create(in_progress("ACC-S2"), mpps)
        send_files(app.ports["storage"], paths[:3])
        unit.set(finished(images=tuple(uids(paths))), mpps)  # lists all four
        unit.close()
        time.sleep(1.5)
        assert study_events(tmp_path / "state") == []  # the modality said one more is coming
        send_files(app.ports["storage"], paths[3:])
        [event] = wait_for(tmp_path / "state", 1)
    assert event["payload"]["rule"] == "mpps"
    assert len(event["payload"]["instances"]) == 4


def test_all_views_then_a_quiet_period_complete_a_study_without_mpps(tmp_path):
    config = prepare(tmp_path, "ACC-S3")
    with ApplianceProcess(config) as app:
        send_files(app.ports["storage"], views(tmp_path, "ACC-S3"))
        [event] = wait_for(tmp_path / "state", 1)
    payload = event["payload"]
    assert payload["rule"] == "views"
    assert payload["views_found"] == ["LCC", "LMLO", "RCC", "RMLO"]


def test_a_missing_view_completes_only_at_the_timeout_naming_it(tmp_path):
    config = prepare(tmp_path, "ACC-S4")
    with ApplianceProcess(config) as app:
        started = time.monotonic()
        send_files(app.ports["storage"], views(tmp_path, "ACC-S4")[:3])  # no LMLO
        [event] = wait_for(tmp_path / "state", 1)
        assert time.monotonic() - started >= 4.0
    assert (event["payload"]["rule"], event["payload"]["views_missing"]) == ("timeout", ["LMLO"])


def test_discontinued_procedure_reports_what_was_received(tmp_path):
    config = prepare(tmp_path, "ACC-S5")
    paths = views(tmp_path, "ACC-S5")
    with ApplianceProcess(config) as app:
        unit = Modality(app.ports["worklist"])
        mpps = generate_uid()
        unit.create(in_progress("ACC-S5"), mpps)
        send_files(app.ports["storage"], paths[:2])
        unit.set(finished("DISCONTINUED"), mpps)
        unit.close()
        [event] = wait_for(tmp_path / "state", 1)
    assert event["event_type"] == "study.discontinued"
    assert sorted(event["payload"]["instances"]) == sorted(uids(paths[:2]))


def test_a_late_image_amends_and_the_study_completes_again(tmp_path):
    config = prepare(tmp_path, "ACC-S6")
    paths = views(tmp_path, "ACC-S6")
    extra = synthetic.mammogram(
        shape=(128, 104),
        accession_number="ACC-S6",
        laterality="R",
        view="MLO",
        study_instance_uid=pydicom.dcmread(paths[0]).StudyInstanceUID,
    )
    extra.save_as(tmp_path / "extra.dcm", enforce_file_format=True)
    with ApplianceProcess(config) as app:
        send_files(app.ports["storage"], paths)
        wait_for(tmp_path / "state", 1)
        send_files(app.ports["storage"], [tmp_path / "extra.dcm"])
        found = wait_for(tmp_path / "state", 3)
    assert [e["event_type"] for e in found] == ["study.complete", "study.amended", "study.complete"]
    assert found[1]["payload"]["late_instances"] == [extra.SOPInstanceUID]
    assert len(found[2]["payload"]["instances"]) == 5


def test_restart_at_each_step_gives_exactly_one_completion(tmp_path):
    config = prepare(tmp_path, "ACC-S7")
    paths = views(tmp_path, "ACC-S7")
    state = tmp_path / "state"
    with ApplianceProcess(config) as app:  # killed with the images in, before the quiet period
        send_files(app.ports["storage"], paths)
        app.stop(signal.SIGKILL)
    assert study_events(state) == []
    with ApplianceProcess(config) as app:
        wait_for(state, 1)
        app.stop(signal.SIGKILL)  # killed after completing
    with ApplianceProcess(config):
        time.sleep(2)  # several evaluation rounds
    assert [e["event_type"] for e in study_events(state)] == ["study.complete"]


def test_two_studies_interleaved_on_two_associations_complete_separately(tmp_path):
    config = prepare(tmp_path, "ACC-A", "ACC-B")
    first, second = views(tmp_path, "ACC-A"), views(tmp_path, "ACC-B")
    with ApplianceProcess(config) as app:
        port = app.ports["storage"]
        senders = [
            threading.Thread(target=lambda: [send_files(port, [p]) for p in first]),
            threading.Thread(target=lambda: [send_files(port, [p]) for p in second]),
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
        wait_for(tmp_path / "state", 2)
    by_study = {e["accession_number"]: e["payload"] for e in study_events(tmp_path / "state")}
    assert sorted(by_study["ACC-A"]["instances"]) == sorted(uids(first))
    assert sorted(by_study["ACC-B"]["instances"]) == sorted(uids(second))


def _series(retrieve_ae: str, instances: list[str]) -> pydicom.Dataset:
    series = pydicom.Dataset()
    series.SeriesInstanceUID = generate_uid()
    series.RetrieveAETitle = retrieve_ae
    series.ReferencedImageSequence = []
    for uid in instances:
        ref = pydicom.Dataset()
        ref.ReferencedSOPClassUID = synthetic.MG_FOR_PRESENTATION
        ref.ReferencedSOPInstanceUID = uid
        series.ReferencedImageSequence.append(ref)
    return series


def test_an_mpps_listing_an_image_that_never_comes_completes_by_views_naming_it(tmp_path):
    """PS3.4 F.7.2.2.2: the unit lists every instance it made, also one it never sends here
    (a rejected exposure). The study completes by its views and the quiet period."""
    config = prepare(tmp_path, "ACC-S9")
    paths = views(tmp_path, "ACC-S9")
    never = generate_uid()
    with ApplianceProcess(config) as app:
        unit = Modality(app.ports["worklist"])
        mpps = generate_uid()
        unit.create(in_progress("ACC-S9"), mpps)
        send_files(app.ports["storage"], paths)
        unit.set(finished(images=(*uids(paths), never)), mpps)
        unit.close()
        [event] = wait_for(tmp_path / "state", 1, within=10)
    payload = event["payload"]
    assert (event["event_type"], payload["rule"]) == ("study.complete", "views")
    assert payload["instances_missing"] == [never]


def test_instances_the_mpps_sent_elsewhere_are_not_waited_for(tmp_path):
    """Each Performed Series carries its Retrieve AE Title: a For Processing series sent to
    CAD is not this gateway's to wait for; the MPPS rule fires on what was sent here."""
    config = prepare(tmp_path, "ACC-SA")
    paths = views(tmp_path, "ACC-SA")
    cad = [generate_uid(), generate_uid()]
    with ApplianceProcess(config) as app:
        unit = Modality(app.ports["worklist"])
        mpps = generate_uid()
        unit.create(in_progress("ACC-SA"), mpps)
        send_files(app.ports["storage"], paths)
        done = finished()
        done.PerformedSeriesSequence = [
            _series("SCREENING_PACS", uids(paths)),
            _series("CAD_SERVER", cad),
        ]
        assert unit.set(done, mpps).Status == 0
        unit.close()
        [event] = wait_for(tmp_path / "state", 1, within=10)
    payload = event["payload"]
    assert payload["rule"] == "mpps"
    assert sorted(payload["instances_elsewhere"]) == sorted(cad)
    assert payload["instances_missing"] == []


def test_objects_without_an_accession_belong_to_their_study(tmp_path):
    """A dose report or a secondary capture without Accession Number, same Study Instance UID:
    one study, one completion, the accession found on its other objects."""
    config = prepare(tmp_path, "ACC-SB")
    paths = views(tmp_path, "ACC-SB")
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    extra = tmp_path / "no-accession.dcm"
    synthetic.mammogram(
        shape=(64, 64), accession_number="", study_instance_uid=study, laterality="R", view="XCC"
    ).save_as(extra, enforce_file_format=True)
    with ApplianceProcess(config) as app:
        send_files(app.ports["storage"], [extra, *paths])
        [event] = wait_for(tmp_path / "state", 1, within=10)
        time.sleep(2)  # a second completion would have come by now
        assert len(study_events(tmp_path / "state")) == 1
    assert event["accession_number"] == "ACC-SB"
    assert len(event["payload"]["instances"]) == 5


def test_one_mpps_for_two_requested_procedures_completes_both(tmp_path):
    """The group case: two items in the Scheduled Step Attributes Sequence."""
    config = prepare(tmp_path, "ACC-G1", "ACC-G2")
    with ApplianceProcess(config) as app:
        unit = Modality(app.ports["worklist"])
        mpps = generate_uid()
        group = in_progress("ACC-G1")
        second = pydicom.Dataset()
        second.AccessionNumber = "ACC-G2"
        second.ScheduledProcedureStepID = "ACC-G2"
        second.StudyInstanceUID = group.ScheduledStepAttributesSequence[0].StudyInstanceUID
        group.ScheduledStepAttributesSequence.append(second)
        assert unit.create(group, mpps).Status == 0
        assert unit.set(finished(images=("1.2.3.4.9",)), mpps).Status == 0
        unit.close()
        store = WorklistStore(StatePaths(tmp_path / "state"))
        assert [store.get(a).status for a in ("ACC-G1", "ACC-G2")] == ["COMPLETED", "COMPLETED"]
        events = [(e["event_type"], e["accession_number"]) for e in store.events()]
    assert ("mpps.completed", "ACC-G1") in events
    assert ("mpps.completed", "ACC-G2") in events
