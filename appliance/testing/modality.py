"""A mammography unit, simulated: what a radiographer's machine does for one participant.

Worklist query for the accession -> MPPS N-CREATE (IN PROGRESS) -> C-STORE of a synthetic
four-view study built from the worklist answer -> MPPS N-SET (COMPLETED) listing the images.
Used by the `worklist.create_test_item` action, `appliance dev modality` and the demo. Each step
is a named phase; a failure raises SimulationError naming it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from attrs import frozen
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # made at import time
    DigitalMammographyXRayImageStorageForPresentation,
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
)

from appliance.testing import synthetic


class SimulationError(Exception):
    def __init__(self, phase: str, detail: str) -> None:
        super().__init__(f"{phase}: {detail}")
        self.phase = phase


@frozen
class ModalitySimulator:
    host: str
    worklist_port: int
    storage_port: int
    worklist_ae: str = "SCREENING_MWL"
    storage_ae: str = "SCREENING_PACS"
    calling_ae: str = "SIMULATOR"
    shape: tuple[int, int] = (1024, 832)

    def _associate(self, contexts: list[str], port: int, called: str, phase: str) -> Any:
        ae = AE(self.calling_ae)
        for context in contexts:
            ae.add_requested_context(context)
        assoc = ae.associate(self.host, port, ae_title=called)
        if not assoc.is_established:
            raise SimulationError(phase, f"no association with {called} at {self.host}:{port}")
        return assoc

    def query(self, accession: str) -> Dataset:
        query = Dataset()
        # A unit that writes ISO_IR 192 says so in its query (else it is answered in ASCII).
        query.SpecificCharacterSet = "ISO_IR 192"
        query.AccessionNumber = accession
        for keyword in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyInstanceUID",
        ):
            setattr(query, keyword, "")
        step = Dataset()
        step.ScheduledProcedureStepID = ""
        step.Modality = ""
        query.ScheduledProcedureStepSequence = [step]
        assoc = self._associate(
            [ModalityWorklistInformationFind],
            self.worklist_port,
            self.worklist_ae,
            "worklist-query",
        )
        try:
            answers = [
                answer
                for status, answer in assoc.send_c_find(query, ModalityWorklistInformationFind)
                if status and status.Status in (0xFF00, 0xFF01) and answer is not None
            ]
        finally:
            assoc.release()
        if len(answers) != 1:
            raise SimulationError("worklist-query", f"{len(answers)} items for {accession}")
        answer: Dataset = answers[0]
        return answer

    def run(
        self,
        accession: str,
        progress: Callable[[str], None] = lambda line: None,
        phases: list[tuple[str, float]] | None = None,
    ) -> list[str]:
        """Perform the item; `phases` gets each finished step's name and seconds."""
        started = time.monotonic()
        mark = started

        def done(phase: str, line: str) -> None:
            nonlocal mark
            now = time.monotonic()
            if phases is not None:
                phases.append((phase, round(now - mark, 3)))
            mark = now
            progress(line)

        item = self.query(accession)
        done("worklist-query", f"worklist query: found {accession}")
        mpps_uid = self.new_mpps_uid()
        with self.mpps_association() as assoc:
            self.mpps_start(assoc, item, mpps_uid)
            done("mpps-start", "mpps: IN PROGRESS")
            stored = self.store(item)
            done("store", f"store: {len(stored)} views stored")
            self.mpps_complete(assoc, mpps_uid, item, stored)
            done("mpps-complete", f"mpps: COMPLETED ({time.monotonic() - started:.1f} s)")
        return stored

    @staticmethod
    def new_mpps_uid() -> str:
        return generate_uid(synthetic.UID_ROOT)

    @staticmethod
    def series_uid(item: Dataset) -> str:
        """The one series a screening exam's four views go in, named again by the MPPS."""
        return str(generate_uid(synthetic.UID_ROOT, entropy_srcs=[str(item.StudyInstanceUID)]))

    @contextlib.contextmanager
    def mpps_association(self) -> Iterator[Any]:
        assoc = self._associate(
            [ModalityPerformedProcedureStep], self.worklist_port, self.worklist_ae, "mpps-start"
        )
        try:
            yield assoc
        finally:
            assoc.release()

    def mpps_start(self, assoc: Any, item: Dataset, mpps_uid: str) -> None:
        step = Dataset()
        step.AccessionNumber = item.AccessionNumber
        step.ScheduledProcedureStepID = item.ScheduledProcedureStepSequence[0].get(
            "ScheduledProcedureStepID", item.AccessionNumber
        )
        step.StudyInstanceUID = item.StudyInstanceUID
        step.ReferencedStudySequence = []
        step.RequestedProcedureID = item.get("RequestedProcedureID", item.AccessionNumber)
        step.RequestedProcedureDescription = item.get("RequestedProcedureDescription", "")
        step.ScheduledProcedureStepDescription = item.ScheduledProcedureStepSequence[0].get(
            "ScheduledProcedureStepDescription", ""
        )
        step.ScheduledProtocolCodeSequence = []
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ScheduledStepAttributesSequence = [step]
        # PS3.4 F.7.2.1 (Table F.7.2-1): every Type 1 and Type 2 attribute of the N-CREATE.
        ds.PatientName, ds.PatientID = item.PatientName, item.PatientID
        ds.PatientBirthDate = item.get("PatientBirthDate", "")
        ds.PatientSex = item.get("PatientSex", "")
        ds.ReferencedPatientSequence = []
        ds.PerformedProcedureStepStatus = "IN PROGRESS"
        ds.PerformedProcedureStepID = mpps_uid[-16:]
        ds.PerformedStationAETitle = self.calling_ae
        ds.PerformedStationName = self.calling_ae
        ds.PerformedLocation = ""
        ds.PerformedProcedureStepStartDate = time.strftime("%Y%m%d")
        ds.PerformedProcedureStepStartTime = time.strftime("%H%M%S")
        ds.PerformedProcedureStepEndDate = ""
        ds.PerformedProcedureStepEndTime = ""
        ds.PerformedProcedureStepDescription = step.ScheduledProcedureStepDescription
        ds.PerformedProcedureTypeDescription = ""
        ds.ProcedureCodeSequence = []
        ds.Modality = "MG"
        ds.StudyID = "1"
        ds.PerformedProtocolCodeSequence = []
        ds.PerformedSeriesSequence = []
        status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, mpps_uid)
        if not status or status.Status != 0x0000:
            raise SimulationError("mpps-start", f"N-CREATE status {status.get('Status')}")

    def store(self, item: Dataset) -> list[str]:
        assoc = self._associate(
            [DigitalMammographyXRayImageStorageForPresentation],
            self.storage_port,
            self.storage_ae,
            "store",
        )
        stored = []
        try:
            series = self.series_uid(item)
            for number, (laterality, view) in enumerate(synthetic.SCREENING_VIEWS, start=1):
                ds = synthetic.mammogram(
                    laterality=laterality,
                    view=view,
                    shape=self.shape,
                    patient_id=str(item.PatientID),
                    patient_name=str(item.PatientName),
                    accession_number=str(item.AccessionNumber),
                    study_instance_uid=str(item.StudyInstanceUID),
                    series_instance_uid=series,
                )
                ds.InstanceNumber = number
                status = assoc.send_c_store(ds)
                if not status or status.Status != 0x0000:
                    code = f"0x{status.Status:04X}" if status else "no response"
                    comment = status.get("ErrorComment", "") if status else ""
                    raise SimulationError("store", f"{laterality}{view}: status {code} {comment}")
                stored.append(str(ds.SOPInstanceUID))
        finally:
            assoc.release()
        return stored

    def mpps_complete(self, assoc: Any, mpps_uid: str, item: Dataset, stored: list[str]) -> None:
        """COMPLETED, naming the series and images `store` made (PS3.4 F.7.2.2, Table F.7.2-2:
        the final state's required attributes)."""
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PerformedProcedureStepStatus = "COMPLETED"
        ds.PerformedProcedureStepEndDate = time.strftime("%Y%m%d")
        ds.PerformedProcedureStepEndTime = time.strftime("%H%M%S")
        series = Dataset()
        series.SeriesInstanceUID = self.series_uid(item)
        series.RetrieveAETitle = self.storage_ae
        series.SeriesDescription = "Screening mammography"
        series.PerformingPhysicianName = ""
        series.OperatorsName = ""
        series.ProtocolName = "Screening 4 views"
        series.ReferencedNonImageCompositeSOPInstanceSequence = []
        series.ReferencedImageSequence = []
        for uid in stored:
            reference = Dataset()
            reference.ReferencedSOPClassUID = synthetic.MG_FOR_PRESENTATION
            reference.ReferencedSOPInstanceUID = uid
            series.ReferencedImageSequence.append(reference)
        ds.PerformedSeriesSequence = [series]
        status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, mpps_uid)
        if not status or status.Status != 0x0000:
            raise SimulationError("mpps-complete", f"N-SET status {status.get('Status')}")
