"""Modality Worklist C-FIND and MPPS N-CREATE/N-SET handlers (port 4243).

C-FIND narrows candidates with the indexed keys in SQL, then applies the full PS3.4 matching
rules to each item's DICOM record (in the site's time zone) and answers exactly the requested
keys in the character set the modality understands. MPPS requests go through the Trio door to
the worklist store, whose one writer applies the transition rules.
"""

from __future__ import annotations

import datetime
import sqlite3
import time
import zoneinfo
from collections.abc import Iterator
from typing import Any, cast

from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian, generate_uid
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import time
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
)

from appliance.config import StepDefaults, WorklistScpConfig
from appliance.db import is_full
from appliance.dicom import encoded, matching, statuses
from appliance.dicom._pynetdicom import PendingFindWriter
from appliance.dicom.charsets import codecs_for, encode_for
from appliance.dicom.door import ApplianceStopping, TrioDoor
from appliance.dicom.server import AuditedQuery, Contexts, Handler, audited
from appliance.dicom.statuses import (
    CANCELLED,
    IDENTIFIER_MISMATCH,
    PENDING,
    UNABLE_TO_PROCESS,
    status,
)
from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.worklist.mpps import MppsError, Refusal
from appliance.worklist.store import IN_PROGRESS, UID_ROOT, WorklistItem, WorklistStore

log = get_logger("worklist-scp")

_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"]
WORKLIST_CONTEXTS: Contexts = [(ModalityWorklistInformationFind, _UNCOMPRESSED)]
MPPS_CONTEXTS: Contexts = [(ModalityPerformedProcedureStep, _UNCOMPRESSED)]

#: What each MPPS refusal is answered with (PS3.4 F.7.2), and its Error ID where one is named.
REFUSAL_STATUS = {
    Refusal.NO_SUCH_INSTANCE: (statuses.NO_SUCH_OBJECT_INSTANCE, None),
    Refusal.DUPLICATE_INSTANCE: (statuses.DUPLICATE_SOP_INSTANCE, None),
    Refusal.INVALID_VALUE: (statuses.INVALID_ATTRIBUTE_VALUE, None),
    Refusal.MISSING_ATTRIBUTE: (statuses.MISSING_ATTRIBUTE, None),
    Refusal.MISSING_VALUE: (statuses.MISSING_ATTRIBUTE_VALUE, None),
    Refusal.NO_LONGER_UPDATABLE: (
        statuses.PROCESSING_FAILURE,
        statuses.ERROR_ID_NO_LONGER_UPDATABLE,
    ),
}
_SPS = 0x00400100  # Scheduled Procedure Step Sequence
#: Type 1 return keys of the worklist (PS3.4 K.6): an item lacking one is not offered.
_REQUIRED = ("PatientName", "PatientID", "StudyInstanceUID", "RequestedProcedureID")
_REQUIRED_STEP = (
    "Modality",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepStartDate",
    "ScheduledStationAETitle",
)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def effective_procedure_code(item: WorklistItem, defaults: StepDefaults | None) -> tuple[str, ...]:
    """The item's procedure code, or the site default only when the item says nothing about
    its procedure (neither code nor description): units choose the acquisition protocol from
    the code, so a described procedure never gets another one's code (K.6 needs only one of
    description and code)."""
    if item.procedure_code_value:
        return (item.procedure_code_value, item.procedure_code_scheme, item.procedure_code_meaning)
    if item.study_description or defaults is None:
        return ()
    return tuple(defaults.procedure_code)


def record(
    item: WorklistItem,
    zone: zoneinfo.ZoneInfo,
    defaults: StepDefaults | None = None,
    calling_ae: str = "",
) -> Dataset:
    """The item as a full worklist record, scheduled time in the site's time zone. What the
    item does not say comes from the site's defaults for its modality, so that no Type 1 key
    (K.6) is empty: Scheduled Station AE Title (else the querying unit's own), Scheduled
    Procedure Step Description or Scheduled Protocol Code Sequence (both given), Requested
    Procedure Description or Code Sequence (both given)."""
    defaults = defaults or StepDefaults(description="", procedure_code=())
    local = item.scheduled_at.astimezone(zone)
    description = item.study_description or defaults.description
    code_parts = effective_procedure_code(item, defaults)
    step = Dataset()
    step.Modality = item.modality
    step.ScheduledStationAETitle = (
        item.scheduled_station_ae or defaults.station_ae_title or calling_ae.strip()
    )
    step.ScheduledStationName = item.scheduled_station_name or defaults.station_name
    step.ScheduledProcedureStepStartDate = local.strftime("%Y%m%d")
    step.ScheduledProcedureStepStartTime = local.strftime("%H%M%S")
    step.ScheduledProcedureStepDescription = description
    step.ScheduledProcedureStepID = item.accession_number
    step.ScheduledPerformingPhysicianName = ""
    step.ScheduledProcedureStepStatus = "STARTED" if item.status == IN_PROGRESS else "SCHEDULED"
    if len(code_parts) == 3 and all(code_parts):  # 1C: present only with a complete code
        step.ScheduledProtocolCodeSequence = [_code_item(*code_parts)]

    ds = Dataset()
    ds.AccessionNumber = item.accession_number
    ds.ReferringPhysicianName = ""
    ds.PatientName = item.patient_name
    ds.PatientID = item.patient_id
    ds.IssuerOfPatientID = "NHS" if item.patient_id.isdigit() and len(item.patient_id) == 10 else ""
    ds.PatientBirthDate = item.patient_birth_date
    ds.PatientSex = item.patient_sex
    ds.StudyInstanceUID = item.study_instance_uid
    ds.RequestedProcedureID = item.accession_number
    ds.RequestedProcedureDescription = description
    if len(code_parts) == 3 and all(code_parts):
        ds.RequestedProcedureCodeSequence = [_code_item(*code_parts)]
    ds.ScheduledProcedureStepSequence = [step]
    # Type 2 return keys (PS3.4 K.6): present, empty; strict SCUs reject records without them.
    ds.ReferencedStudySequence = []
    ds.ReferencedPatientSequence = []
    return ds


def _is_valid(ds: Dataset) -> bool:
    step = ds.ScheduledProcedureStepSequence[0]
    return all(ds.get(k) for k in _REQUIRED) and all(step.get(k) for k in _REQUIRED_STEP)


def _single(query: Dataset, keyword: str) -> str | None:
    """A key's value when it can narrow the SQL query: one value, no wildcards."""
    value = query.get(keyword)
    if value is None or value == "" or not isinstance(value, str):
        return None
    return None if any(c in value for c in "*?\\") else value


def _decoded_in(modifications: Dataset, term: str) -> Dataset:
    """The N-SET's elements read again in `term`: pydicom decodes text lazily with the
    dataset's own Specific Character Set, which the N-SET left out. The set is kept out of
    the modifications (the stored attributes already carry it)."""
    decoded = Dataset()
    decoded.SpecificCharacterSet = term.split("\\") if "\\" in term else term
    for tag in modifications.keys():  # noqa: SIM118  (the raw elements, not yet decoded)
        decoded[tag] = modifications.get_item(tag)
    result = Dataset()
    for element in decoded:
        if element.tag != 0x00080005:
            result.add(element)
    return result


class WorklistSCP:
    def __init__(
        self,
        store: WorklistStore,
        door: TrioDoor,
        config: WorklistScpConfig,
        zone: str,
        defaults: dict[str, StepDefaults] | None = None,
    ) -> None:
        self._defaults = defaults or {}
        self._store = store
        self._door = door
        self._config = config
        self._zone = zoneinfo.ZoneInfo(zone)
        self._records: dict[tuple[str, str, str], Dataset | None] = {}
        self._encoded: dict[tuple[str, str, str, str, bool], encoded.EncodedRecord] = {}

    def handlers(self) -> list[Handler]:
        return [
            (evt.EVT_C_FIND, self.handle_find),
            (evt.EVT_N_CREATE, self.handle_n_create),
            (evt.EVT_N_SET, self.handle_n_set),
        ]

    # --- C-FIND -----------------------------------------------------------------------------------

    def _station_for(self, item: WorklistItem, calling_ae: str) -> str:
        """Who the record's Scheduled Station AE Title depends on: nobody when the item or the
        site says it, else the querying unit (and the cached record is that unit's)."""
        defaults = self._defaults.get(item.modality)
        if item.scheduled_station_ae or (defaults and defaults.station_ae_title):
            return ""
        return calling_ae.strip()

    def _record(self, item: WorklistItem, calling_ae: str) -> Dataset | None:
        station = self._station_for(item, calling_ae)
        key = (item.accession_number, item.updated_at, station)
        if key not in self._records:
            ds: Dataset | None = record(
                item, self._zone, self._defaults.get(item.modality), station
            )
            if ds is not None and not _is_valid(ds):
                log.warning("worklist.item_invalid", accession_number=item.accession_number)
                ds = None
            if len(self._records) > 50_000:
                self._records.clear()
            self._records[key] = ds
        return self._records[key]

    def _encoded_record(
        self, item: WorklistItem, full: Dataset, term: str, implicit: bool, calling_ae: str
    ) -> encoded.EncodedRecord:
        station = self._station_for(item, calling_ae)
        key = (item.accession_number, item.updated_at, station, term, implicit)
        found = self._encoded.get(key)
        if found is None:
            if len(self._encoded) > 50_000:
                self._encoded.clear()
            found = self._encoded[key] = encoded.EncodedRecord(
                encode_for(full, term), term, implicit
            )
        return found

    def _candidates(self, query: Dataset) -> list[WorklistItem]:
        step = query.get("ScheduledProcedureStepSequence")
        step = step[0] if step else Dataset()
        start_date = str(step.get("ScheduledProcedureStepStartDate") or "")
        start_time = str(step.get("ScheduledProcedureStepStartTime") or "")
        lower = upper = None
        if start_date:
            low, high = matching.datetime_bounds(
                start_date, start_time, "ScheduledProcedureStepStartDate"
            )
            margin = datetime.timedelta(hours=1)  # DST folds; exact matching follows in Python
            if low != datetime.datetime.min:
                lower = low.replace(tzinfo=self._zone) - margin
            if high != datetime.datetime.max:
                upper = high.replace(tzinfo=self._zone) + margin
        modality = _single(step, "Modality")
        patient_id = _single(query, "PatientID")
        accession_number = _single(query, "AccessionNumber")
        log.debug(
            "worklist.narrowed",
            scheduled_from=repr(lower),
            scheduled_to=repr(upper),
            modality=repr(modality),
            patient_id=repr(patient_id),
            accession_number=repr(accession_number),
        )
        return self._store.offered(
            scheduled_from=lower,
            scheduled_to=upper,
            modality=modality,
            patient_id=patient_id,
            accession_number=accession_number,
        )

    def _character_set(self, query: Dataset, calling_ae: str) -> str:
        configured = self._config.character_sets.get(calling_ae.strip())
        if configured:
            return configured
        asked = query.get("SpecificCharacterSet")
        if asked:
            values = [asked] if isinstance(asked, str) else list(asked)
            # Several values are only ISO 2022 code extensions (PS3.3 C.12.1.1.2); anything
            # else ('ISO_IR 100\\ISO_IR 192') is no character set: answered in the default.
            extensions = all(v.startswith("ISO 2022") for v in values[1:]) and (
                not values[0] or values[0].startswith("ISO 2022")
            )
            term = "\\".join(values)
            if (len(values) == 1 or extensions) and codecs_for(term):
                return term
        return self._config.character_set

    def handle_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        return audited(self._find)(event)

    def _find(
        self, event: evt.Event, audit_query: AuditedQuery
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        METRICS.inc("c_find_total", service="worklist")
        started = time.perf_counter()
        calling_ae = event.assoc.requestor.ae_title
        try:
            query = event.identifier
        except Exception as exc:
            log.warning("worklist.query_rejected", phase="decode", calling_ae=calling_ae)
            yield status(UNABLE_TO_PROCESS, f"Cannot decode identifier: {exc}"), None
            return
        answered = 0
        try:
            term = self._character_set(query, calling_ae)
            candidates = self._candidates(query)
            log.debug("worklist.candidates", calling_ae=calling_ae, count=len(candidates))
            syntax = event.context.transfer_syntax
            # All answers of a query take one path: written directly, or yielded to pynetdicom.
            writer = None
            if PendingFindWriter.supports(syntax) and encoded.expressible(query):
                writer = PendingFindWriter(event)
            implicit = syntax == ImplicitVRLittleEndian
            for item in candidates:
                if event.is_cancelled:
                    log.info("worklist.query_cancelled", calling_ae=calling_ae, answered=answered)
                    yield CANCELLED, None
                    return
                full = self._record(item, calling_ae)
                if full is None or not matching.matches(query, full):
                    continue
                answered += 1
                audit_query.answered(full)
                if writer is not None:
                    writer.send(
                        encoded.project(
                            query, self._encoded_record(item, full, term, implicit, calling_ae)
                        )
                    )
                else:
                    yield PENDING, encode_for(matching.project(query, full), term)
        except matching.InvalidQuery as exc:
            log.warning("worklist.query_rejected", phase="match", reason=str(exc))
            yield status(IDENTIFIER_MISMATCH, str(exc)), None
            return
        except Exception:
            log.exception("worklist.query_failed", phase="match", calling_ae=calling_ae)
            yield status(UNABLE_TO_PROCESS, "Internal error while matching"), None
            return
        log.info(
            "worklist.query",
            calling_ae=calling_ae,
            keys=" ".join(e.keyword or str(e.tag) for e in query if not matching.is_empty(e)),
            matches=answered,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )

    # --- MPPS -------------------------------------------------------------------------------------

    def _apply(self, operation: str, function: Any, *args: Any) -> tuple[Any, int | Dataset]:
        try:
            outcome = self._door.run(self._store.write, function, *args)
        except MppsError as exc:
            code, error_id = REFUSAL_STATUS[exc.refusal]
            log.warning("mpps.refused", phase=operation, reason=exc.reason, status=hex(code))
            return None, status(code, exc.reason, error_id)
        except ApplianceStopping:
            return None, status(statuses.PROCESSING_FAILURE, "Gateway is restarting; send again")
        except sqlite3.Error as exc:  # worklist.db full or failing: nothing was recorded
            if is_full(exc):
                log.warning("mpps.refused", phase=f"{operation}-record", reason=str(exc))
                return None, status(statuses.RESOURCE_LIMITATION, "MPPS database full; retry")
            log.error("mpps.failed", phase=f"{operation}-record", error=str(exc))
            return None, status(statuses.PROCESSING_FAILURE, f"MPPS record failed: {exc}")
        except Exception:
            log.exception("mpps.failed", phase=operation)
            return None, status(statuses.PROCESSING_FAILURE, f"Internal error ({operation})")
        return outcome, statuses.SUCCESS

    def _counted(self, operation: str, *args: Any) -> tuple[Any, int | Dataset]:
        outcome, result = self._apply(operation, *args)
        METRICS.inc("mpps_total", operation=operation, status=f"0x{statuses.code_of(result):04X}")
        return outcome, result

    def handle_n_create(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        attributes = event.attribute_list
        steps = attributes.get("ScheduledStepAttributesSequence") or []
        request = cast(N_CREATE, event.request)
        uid = request.AffectedSOPInstanceUID or generate_uid(UID_ROOT)
        outcome, result = self._counted(
            "n-create",
            self._store.mpps.create,
            str(uid),
            attributes.to_json_dict(),
            [
                (
                    str(step.get("AccessionNumber") or "") or None,
                    str(step.get("ScheduledProcedureStepID") or "") or None,
                )
                for step in steps
            ],
        )
        if outcome is None:
            return result, None
        log.info(
            "mpps.created",
            mpps_instance_uid=uid,
            accession_number=outcome.accession_number,
            replay=outcome.replay,
        )
        if not request.AffectedSOPInstanceUID:
            attributes.AffectedSOPInstanceUID = uid  # pynetdicom moves it into the response
        return result, attributes

    def handle_n_set(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        uid = str(cast(N_SET, event.request).RequestedSOPInstanceUID)
        modifications = event.modification_list
        if "SpecificCharacterSet" not in modifications:
            # F.7.2.2.1: an N-SET's text is in the N-CREATE's character set unless it says.
            created_in = self._store.mpps.character_set(uid)  # a reader: any thread
            if created_in:
                modifications = _decoded_in(modifications, created_in)
        outcome, result = self._counted(
            "n-set", self._store.mpps.update, uid, modifications.to_json_dict()
        )
        if outcome is None:
            return result, None
        log.info(
            "mpps.updated",
            mpps_instance_uid=uid,
            status=outcome.status,
            accession_number=outcome.accession_number,
            replay=outcome.replay,
        )
        # The unit's own attributes back, in its own bytes and character set (not re-encoded
        # in the default repertoire).
        return result, event.modification_list
