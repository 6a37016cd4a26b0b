"""Query/Retrieve SCP over the storage index: C-FIND, C-GET and C-MOVE, Patient and Study Root.

Records are built per entity (patient, study, series, image) from the index and one stored
header per entity, then matched with the worklist's PS3.4 rules (appliance.dicom.matching).
Identifiers are checked as hierarchical queries demand (PS3.4 C.4.1.2): the unique key of every
level above the query level present with a single value, no key below it; anything else is
refused with 0xA900 and a comment.

Retrieval sends the stored file's bytes as received when the peer accepted the stored transfer
syntax, and decodes only when it did not (see appliance.dicom._pynetdicom.StoredFile).
"""

from __future__ import annotations

import socket
import sqlite3
import time
from collections.abc import Iterator
from typing import cast

import pydicom
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # names made at import time
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from appliance import audit
from appliance.config import DestinationConfig, TlsConfig
from appliance.dicom import matching
from appliance.dicom._pynetdicom import StoredFile
from appliance.dicom.server import AuditedQuery, Contexts, Handler, audited, grant_of
from appliance.dicom.statuses import (
    CANCELLED,
    IDENTIFIER_MISMATCH,
    MOVE_DESTINATION_UNKNOWN,
    PENDING,
    PENDING_WITH_UNSUPPORTED_KEYS,
    SUBOPERATIONS_IMPOSSIBLE,
    SUCCESS,
    UNABLE_TO_PROCESS,
    status,
)
from appliance.dicom.tls import tls_args
from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.storage.index import IndexReader

log = get_logger("qr-scp")


PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
}
QR_SOP_CLASSES = [
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
]

_FIND = {PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind}
#: C-FIND (permission "query") and C-MOVE/C-GET (permission "retrieve").
FIND_CONTEXTS: Contexts = [
    (sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in QR_SOP_CLASSES
    if sop_class in _FIND
]
RETRIEVE_CONTEXTS: Contexts = [
    (sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for sop_class in QR_SOP_CLASSES
    if sop_class not in _FIND
]

LEVELS = ["PATIENT", "STUDY", "SERIES", "IMAGE"]
#: How long a move destination may take to accept a TCP connection before 0xA702.
REACH_TIMEOUT_S = 5.0
#: Each level's unique key and the index column that holds it.
UNIQUE = {
    "PATIENT": ("PatientID", "patient_id"),
    "STUDY": ("StudyInstanceUID", "study_instance_uid"),
    "SERIES": ("SeriesInstanceUID", "series_instance_uid"),
    "IMAGE": ("SOPInstanceUID", "sop_instance_uid"),
}
#: Attributes of each level (PS3.4 C.6.1.1 / C.6.2.1, plus what screening units send).
LEVEL_KEYS = {
    "PATIENT": {
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "OtherPatientIDsSequence",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances",
    },
    "STUDY": {
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyInstanceUID",
        "ReferringPhysicianName",
        "StudyDescription",
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "ProcedureCodeSequence",
        "PatientAge",
    },
    "SERIES": {
        "Modality",
        "SeriesNumber",
        "SeriesInstanceUID",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "Laterality",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
    },
    "IMAGE": {
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "ImageLaterality",
        "ViewPosition",
        "ContentDate",
        "ContentTime",
        "NumberOfFrames",
        "Rows",
        "Columns",
        "AvailableTransferSyntaxUID",
        "PresentationIntentType",
    },
}
ALWAYS_ALLOWED = {
    "SpecificCharacterSet",
    "QueryRetrieveLevel",
    "TimezoneOffsetFromUTC",
    "RetrieveAETitle",
}
#: Extended negotiation of C-FIND (PS3.4 C.5.1.1.1): byte 2 asks for combined date-time
#: matching, the only option the SCP offers (relational queries, fuzzy semantic matching and
#: timezone adjustment are answered 0).
COMBINED_DATE_TIME = 1
FIND_SOP_CLASSES = _FIND


class InvalidIdentifier(Exception):
    """The identifier breaks the hierarchical query rules: 0xA900."""


def _single(element_value: object) -> str | None:
    """A unique key's single value. Unique keys are LO (Patient ID) or UI: neither has range
    matching, so '-' is an ordinary character (Patient IDs such as 'NHS-123' exist)."""
    text = "" if element_value is None else str(element_value)
    if not text or any(c in text for c in "*?\\"):
        return None
    return text


def unsupported_keys(identifier: Dataset, level: str) -> list[str]:
    """Optional keys outside the attributes the SCP matches at `level` and above: answered
    from the stored header where it has them, but neither promised nor always matched, so
    the pending status says so (0xFF01)."""
    known = set(ALWAYS_ALLOWED)
    for name in LEVELS[: LEVELS.index(level) + 1]:
        known |= LEVEL_KEYS[name]
    return sorted(
        element.keyword or str(element.tag)
        for element in identifier
        if element.tag.element != 0 and element.keyword not in known
    )


def check_identifier(identifier: Dataset, sop_class: str) -> str:
    """The query level, once the identifier is known to be a valid hierarchical query."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS:
        raise InvalidIdentifier(f"Query/Retrieve Level {level or '(empty)'} is not one we serve")
    patient_root = sop_class in PATIENT_ROOT
    if not patient_root and level == "PATIENT":
        raise InvalidIdentifier("Study Root has no PATIENT level")
    depth = LEVELS.index(level)
    # Patient attributes belong to the STUDY level in Study Root.
    top = 0 if patient_root else 1
    for above in LEVELS[top:depth]:
        keyword = UNIQUE[above][0]
        if _single(identifier.get(keyword, "") and identifier[keyword].value) is None:
            raise InvalidIdentifier(f"{keyword} must have a single value to query at {level}")
    allowed = set(ALWAYS_ALLOWED)
    for name in LEVELS[: depth + 1]:
        allowed |= LEVEL_KEYS[name]
    for element in identifier:
        if element.tag.element == 0 or element.keyword in allowed:
            continue
        owner = next((n for n in LEVELS if element.keyword in LEVEL_KEYS[n]), None)
        if owner is not None:
            raise InvalidIdentifier(f"{element.keyword} is a {owner} key, below {level}")
        # Keys we do not know are return keys answered empty, as the worklist does.
    return level


def _uid_list(value: object) -> list[str]:
    if value is None or value == "":
        return []
    values = list(value) if isinstance(value, pydicom.multival.MultiValue) else [value]
    texts = [str(v) for v in values if str(v)]
    return [] if any(c in t for t in texts for c in "*?") else texts


def prefilter(identifier: Dataset) -> tuple[str, list[str]]:
    """SQL for the stored instances the identifier's UID and ID keys allow (single values or
    UID lists); wildcards and the rest are left to matching."""
    where, params = ["status = 'STORED'"], []
    for keyword, column in [*UNIQUE.values(), ("AccessionNumber", "accession_number")]:
        values = _uid_list(identifier.get(keyword, "") and identifier[keyword].value)
        if values:
            where.append(f"{column} IN ({','.join('?' * len(values))})")
            params += values
    return " AND ".join(where), params


def _rows(index: IndexReader, identifier: Dataset) -> list[sqlite3.Row]:
    where, params = prefilter(identifier)
    return index.select(where, params, order="study_instance_uid, series_instance_uid, created_at")


def _group(rows: list[sqlite3.Row], level: str) -> dict[str, list[sqlite3.Row]]:
    column = UNIQUE[level][1]
    groups: dict[str, list[sqlite3.Row]] = {}
    for row in rows:
        groups.setdefault(row[column] or "", []).append(row)
    return groups


def entity_record(level: str, rows: list[sqlite3.Row], header: Dataset) -> Dataset:
    """One entity's record: its first instance's header plus the computed attributes."""
    record = Dataset()
    for element in header:
        if element.tag.group != 0x0002 and element.tag != 0x7FE00010:
            record.add(element)
    record.QueryRetrieveLevel = level
    studies = {r["study_instance_uid"] for r in rows}
    series = {r["series_instance_uid"] for r in rows}
    if level == "PATIENT":
        record.NumberOfPatientRelatedStudies = len(studies)
        record.NumberOfPatientRelatedSeries = len(series)
        record.NumberOfPatientRelatedInstances = len(rows)
    elif level == "STUDY":
        record.NumberOfStudyRelatedSeries = len(series)
        record.NumberOfStudyRelatedInstances = len(rows)
        record.ModalitiesInStudy = sorted({r["modality"] for r in rows if r["modality"]})
        record.SOPClassesInStudy = sorted({r["sop_class_uid"] for r in rows})
    elif level == "SERIES":
        record.NumberOfSeriesRelatedInstances = len(rows)
    else:
        record.AvailableTransferSyntaxUID = rows[0]["transfer_syntax_uid"]
    return record


def _sop_class(event: evt.Event) -> str:
    """The request's Affected SOP Class UID (which information model it queries)."""
    return str(getattr(event.request, "AffectedSOPClassUID", "") or "")


class QueryRetrieveSCP:
    def __init__(
        self,
        index: IndexReader,
        destinations: tuple[DestinationConfig, ...],
        ae_title: str,
        tls: TlsConfig | None = None,
    ) -> None:
        self._index = index
        self._destinations = {d.ae_title: d for d in destinations}
        self._tls = tls or TlsConfig()
        #: Where the answers can be retrieved from: this AE (PS3.4 C.4.1.1.3.2).
        self._ae_title = ae_title

    def handlers(self) -> list[Handler]:
        return [
            (evt.EVT_C_FIND, self.handle_find),
            (evt.EVT_C_GET, self.handle_get),
            (evt.EVT_C_MOVE, self.handle_move),
            (evt.EVT_SOP_EXTENDED, self.handle_extended_negotiation),
        ]

    @staticmethod
    def handle_extended_negotiation(event: evt.Event) -> dict[str, bytes]:
        """Accept combined date-time matching for C-FIND when asked; nothing else."""
        accepted = {}
        requested: dict[str, bytes] = getattr(event, "app_info", None) or {}
        for sop_class, info in requested.items():
            if sop_class in FIND_SOP_CLASSES and info:
                flags = bytearray(len(info))
                if len(info) > COMBINED_DATE_TIME and info[COMBINED_DATE_TIME] == 1:
                    flags[COMBINED_DATE_TIME] = 1
                accepted[sop_class] = bytes(flags)
        return accepted

    @staticmethod
    def combined_date_time(event: evt.Event) -> bool:
        """Whether this association negotiated combined date-time matching for the model."""
        negotiated = cast(dict[str, bytes], event.assoc.acceptor.sop_class_extended)
        info = negotiated.get(_sop_class(event), b"")
        return len(info) > COMBINED_DATE_TIME and info[COMBINED_DATE_TIME] == 1

    # --- C-FIND -------------------------------------------------------------------------------

    def matches(
        self, identifier: Dataset, level: str, *, combined_date_time: bool = False
    ) -> Iterator[Dataset]:
        """Each matching entity's answer, in study order."""
        query = Dataset()
        for element in identifier:
            if element.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet"):
                query.add(element)
        unique = UNIQUE[level][0]
        if unique not in query:
            tag = pydicom.datadict.tag_for_keyword(unique)
            assert tag is not None  # UNIQUE names keywords of the dictionary
            query.add_new(tag, "UI" if level != "PATIENT" else "LO", None)
        for rows in _group(_rows(self._index, identifier), level).values():
            record = entity_record(
                level, rows, pydicom.dcmread(self._index.path(rows[0]), stop_before_pixels=True)
            )
            if not matching.matches(query, record, combined_date_time=combined_date_time):
                continue
            answer = matching.project(query, record)
            answer.QueryRetrieveLevel = level
            answer.RetrieveAETitle = self._ae_title
            if "SpecificCharacterSet" in record:
                answer.SpecificCharacterSet = record.SpecificCharacterSet
            yield answer

    def handle_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        return audited(self._find)(event)

    def _find(
        self, event: evt.Event, audit_query: AuditedQuery
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        started = time.perf_counter()
        calling_ae = event.assoc.requestor.ae_title
        METRICS.inc("c_find_total", service="query-retrieve")
        answered = 0
        try:
            identifier = event.identifier
            level = check_identifier(identifier, _sop_class(event))
            unsupported = unsupported_keys(identifier, level)
            pending = PENDING_WITH_UNSUPPORTED_KEYS if unsupported else PENDING
            combined = self.combined_date_time(event)
            for answer in self.matches(identifier, level, combined_date_time=combined):
                if event.is_cancelled:
                    log.info("qr.find_cancelled", calling_ae=calling_ae, answered=answered)
                    yield CANCELLED, None
                    return
                answered += 1
                yield pending, answer
        except (InvalidIdentifier, matching.InvalidQuery) as exc:
            log.warning(
                "qr.query_rejected", phase="identifier", reason=str(exc), calling_ae=calling_ae
            )
            yield status(IDENTIFIER_MISMATCH, str(exc)), None
            return
        except Exception:
            log.exception("qr.query_failed", phase="match", calling_ae=calling_ae)
            yield status(UNABLE_TO_PROCESS, "Internal error while matching"), None
            return
        log.info(
            "qr.find",
            calling_ae=calling_ae,
            query_level=level,
            matches=answered,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        yield SUCCESS, None

    # --- C-GET and C-MOVE ---------------------------------------------------------------------

    @staticmethod
    def _retrieve_level(identifier: Dataset, sop_class: str) -> str:
        """The level of a valid retrieve identifier; InvalidIdentifier otherwise."""
        level = check_identifier(identifier, sop_class)
        if not any(
            _uid_list(identifier.get(k, "") and identifier[k].value) for k, _ in UNIQUE.values()
        ):
            raise InvalidIdentifier(f"a retrieve at {level} needs its unique key")
        return level

    def _instances(self, identifier: Dataset, sop_class: str) -> list[sqlite3.Row]:
        level = self._retrieve_level(identifier, sop_class)
        rows = _rows(self._index, identifier)
        wanted = _group(rows, level)
        return [row for group in wanted.values() for row in group]

    def _send(
        self, event: evt.Event, rows: list[sqlite3.Row], verb: str, destination: str = ""
    ) -> Iterator[tuple[int, Dataset | None]]:
        calling_ae = event.assoc.requestor.ae_title
        started = time.perf_counter()
        requestor = event.assoc.requestor
        # C-GET: to the requestor itself; C-MOVE: to the destination, for the requestor.
        if verb == "move" and destination in self._destinations:
            known = self._destinations[destination]
            receiver = audit.peer_participant(destination, known.host, requestor=False)
        else:
            receiver = audit.peer_participant(calling_ae, requestor.address)
        sender = audit.appliance_participant(self._ae_title)
        planned = audit.Transfers.of_rows(rows)
        audit.record(
            audit.begin_transferring(source=sender, destination=receiver, studies=planned.studies())
        )
        sent_rows: list[sqlite3.Row] = []
        try:
            yield from self._each(event, rows, verb, sent_rows)
        finally:
            done = audit.Transfers.of_rows(sent_rows)
            audit.record(
                audit.instances_transferred(
                    source=sender,
                    destination=receiver,
                    studies=done.studies() or planned.studies(),
                    received=False,
                    outcome=audit.SUCCESS if len(sent_rows) == len(rows) else audit.MINOR_FAILURE,
                    description=f"C-{verb.upper()} by {calling_ae}: "
                    f"{len(sent_rows)} of {len(rows)} sent",
                )
            )
        log.info(
            f"qr.{verb}",
            calling_ae=calling_ae,
            destination=destination,
            instances=len(rows),
            ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def _each(
        self, event: evt.Event, rows: list[sqlite3.Row], verb: str, sent_rows: list[sqlite3.Row]
    ) -> Iterator[tuple[int, Dataset | None]]:
        calling_ae = event.assoc.requestor.ae_title
        for sent, row in enumerate(rows):
            if event.is_cancelled:
                log.info(
                    f"qr.{verb}_cancelled",
                    calling_ae=calling_ae,
                    sent=sent,
                    remaining=len(rows) - sent,
                )
                cancelled = Dataset()
                cancelled.FailedSOPInstanceUIDList = [r["sop_instance_uid"] for r in rows[sent:]]
                yield CANCELLED, cancelled
                return
            yield (
                PENDING,
                StoredFile(
                    self._index.path(row),
                    row["sop_class_uid"],
                    row["sop_instance_uid"],
                    row["transfer_syntax_uid"],
                    odd_lengths=None if row["odd_lengths"] is None else bool(row["odd_lengths"]),
                ),
            )
            sent_rows.append(row)

    def check_move(
        self, assoc: Association, request: C_MOVE, identifier: Dataset
    ) -> Dataset | None:
        """A C-MOVE's refusal before any sub-association is opened (see
        appliance.dicom._pynetdicom), or None to go ahead: an unknown destination (0xA801), an
        invalid identifier (0xA900), a destination that does not answer (0xA702)."""
        calling_ae = assoc.requestor.ae_title
        target = str(request.MoveDestination or "").strip()
        known = self._destinations.get(target)
        if known is None:
            log.warning(
                "qr.retrieve_rejected",
                phase="destination",
                destination=target,
                calling_ae=calling_ae,
            )
            return status(MOVE_DESTINATION_UNKNOWN, f"Move destination {target} is not configured")
        if not self._may_move_to(assoc, target):
            log.warning(
                "security.move_refused",
                phase="permissions",
                destination=target,
                calling_ae=calling_ae,
                address=assoc.requestor.address,
            )
            METRICS.inc("move_refusals_total", destination=target)
            # A801: for this peer, no destination by that name exists (dcmtk and viewers know
            # only the C-MOVE statuses of PS3.4 C.4.2.1.5, not the general 0124 Not Authorized).
            return status(MOVE_DESTINATION_UNKNOWN, f"{calling_ae} may not move to {target}")
        try:
            self._retrieve_level(identifier, str(request.AffectedSOPClassUID or ""))
        except InvalidIdentifier as exc:
            log.warning(
                "qr.retrieve_rejected", phase="identifier", reason=str(exc), calling_ae=calling_ae
            )
            return status(IDENTIFIER_MISMATCH, str(exc))
        try:
            socket.create_connection((known.host, known.port), timeout=REACH_TIMEOUT_S).close()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            log.error(
                "qr.destination_unreachable",
                phase="connect",
                destination=target,
                host=known.host,
                port=known.port,
                error=reason,
                calling_ae=calling_ae,
            )
            return status(
                SUBOPERATIONS_IMPOSSIBLE, f"Cannot reach {target} at {known.host}:{known.port}"
            )
        return None

    @staticmethod
    def _may_move_to(assoc: Association, target: str) -> bool:
        grant = grant_of(assoc)
        return grant is not None and grant.may_move_to(target)

    def handle_get(self, event: evt.Event) -> Iterator[int | tuple[int | Dataset, Dataset | None]]:
        METRICS.inc("retrieve_total", verb="c-get")
        try:
            rows = self._instances(event.identifier, _sop_class(event))
        except InvalidIdentifier as exc:
            log.warning("qr.retrieve_rejected", phase="identifier", reason=str(exc))
            yield 1
            yield status(IDENTIFIER_MISMATCH, str(exc)), None
            return
        yield len(rows)
        yield from self._send(event, rows, "get")

    def handle_move(self, event: evt.Event) -> Iterator[object]:
        METRICS.inc("retrieve_total", verb="c-move")
        target = str(event.move_destination).strip()
        known = self._destinations.get(target)
        if known is None or not self._may_move_to(event.assoc, target):
            log.warning("qr.retrieve_rejected", phase="destination", destination=target)
            yield None, None  # pynetdicom answers 0xA801 Move Destination Unknown
            return
        try:
            rows = self._instances(event.identifier, _sop_class(event))
        except InvalidIdentifier as exc:
            log.warning("qr.retrieve_rejected", phase="identifier", reason=str(exc))
            yield known.host, known.port
            yield 1
            yield status(IDENTIFIER_MISMATCH, str(exc)), None
            return
        contexts = StoredFile.contexts_for(
            {(r["sop_class_uid"], r["transfer_syntax_uid"]) for r in rows}
        )
        yield known.host, known.port, {"contexts": contexts, "tls_args": tls_args(self._tls, known)}
        yield len(rows)
        yield from self._send(event, rows, "move", target)
