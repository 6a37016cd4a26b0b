"""The audit trail: who touched which woman's data, and every security-relevant event.

Each event is a DICOM audit message (PS3.15 A.5, the XML schema IHE ATNA carries), one per line
in an append-only local trail (`<state>/audit/audit-NNNNNN.log`, mode 0600, a new file past
`audit.rotate_mb`, the oldest deleted past `audit.keep_files`). The trail is never the normal
log, which keeps no patient identifiers at INFO. `appliance audit` reads it back;
appliance.audit_forwarder sends it on to a remote audit repository (RFC 5424 over TLS).

Messages are recorded from pynetdicom's threads and from Trio alike: `record()` is thread-safe
and writes through (one write and one fdatasync per message; messages are per association,
query or action, not per image).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import socket
import sqlite3
import threading
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from attrs import field, frozen

from appliance.log import get_logger
from appliance.metrics import METRICS

log = get_logger("audit")

#: EventID codes (DCM), PS3.15 A.5.3 and PS3.16 CID 400.
EVENTS = {
    "application-activity": ("110100", "Application Activity"),
    "begin-transferring": ("110102", "Begin Transferring DICOM Instances"),
    "instances-transferred": ("110104", "DICOM Instances Transferred"),
    "patient-record": ("110110", "Patient Record"),
    "query": ("110112", "Query"),
    "security-alert": ("110113", "Security Alert"),
    "user-authentication": ("110114", "User Authentication"),
}
#: EventTypeCode codes (DCM), CID 401-403.
TYPES = {
    "application-start": ("110120", "Application Start"),
    "application-stop": ("110121", "Application Stop"),
    "login": ("110122", "Login"),
    "node-authentication": ("110126", "Node Authentication"),
    "restricted-function": ("110132", "Use of Restricted Function"),
}
#: RoleIDCode codes (DCM), CID 402.
ROLES = {
    "application": ("110150", "Application"),
    "destination": ("110152", "Destination Role ID"),
    "source": ("110153", "Source Role ID"),
}
#: EventOutcomeIndicator: success, minor failure, serious failure, major failure.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = 0, 4, 8
#: Participant object kinds: (type, role, ID type code, ID type's scheme, its meaning).
OBJECTS = {
    "patient": ("1", "1", "2", "RFC-3881", "Patient Number"),
    "study": ("2", "3", "110180", "DCM", "Study Instance UID"),
    "query": ("2", "3", "110181", "DCM", "SOP Class UID"),
    "node": ("2", "13", "110182", "DCM", "Node ID"),
    "worklist-item": ("2", "3", "11", "RFC-3881", "Accession Number"),
}
APPLIANCE = "SCREENING_GATEWAY"


@frozen
class Participant:
    """Who: an AE title, the appliance itself, or a cloud identity; where it connected from."""

    user_id: str
    requestor: bool
    address: str = ""
    role: str = ""
    alternative_user_id: str = ""


@frozen
class ParticipantObject:
    """What: a patient, a study (its instances by SOP class), a query, a node."""

    kind: str
    id: str
    #: SOP Class UID -> the instances of it (study objects).
    instances: dict[str, tuple[str, ...]] = field(factory=dict)
    accessions: tuple[str, ...] = ()
    query: bytes = b""
    description: str = ""


@frozen
class AuditEvent:
    event: str
    action: str
    outcome: int = SUCCESS
    type: str = ""
    participants: tuple[Participant, ...] = ()
    objects: tuple[ParticipantObject, ...] = ()
    description: str = ""
    when: dt.datetime = field(factory=lambda: dt.datetime.now(dt.UTC))

    def patient_ids(self) -> list[str]:
        return [o.id for o in self.objects if o.kind == "patient"]


def _code(parent: ET.Element, tag: str, code: tuple[str, str], scheme: str = "DCM") -> None:
    ET.SubElement(
        parent, tag, {"csd-code": code[0], "codeSystemName": scheme, "originalText": code[1]}
    )


def to_xml(event: AuditEvent, source_id: str) -> str:
    """The message as PS3.15 A.5.1's schema has it, on one line."""
    message = ET.Element("AuditMessage")
    identification = ET.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": event.when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "EventOutcomeIndicator": str(event.outcome),
        },
    )
    _code(identification, "EventID", EVENTS[event.event])
    if event.type:
        _code(identification, "EventTypeCode", TYPES[event.type])
    if event.description:
        ET.SubElement(identification, "EventOutcomeDescription").text = _one_line(event.description)
    for who in event.participants:
        attributes = {"UserID": who.user_id, "UserIsRequestor": str(who.requestor).lower()}
        if who.alternative_user_id:
            attributes["AlternativeUserID"] = who.alternative_user_id
        if who.address:
            attributes["NetworkAccessPointID"] = who.address
            is_ip = bool(re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]+", who.address))
            attributes["NetworkAccessPointTypeCode"] = "2" if is_ip else "1"
        participant = ET.SubElement(message, "ActiveParticipant", attributes)
        if who.role:
            _code(participant, "RoleIDCode", ROLES[who.role])
    source = ET.SubElement(message, "AuditSourceIdentification", {"AuditSourceID": source_id})
    _code(source, "AuditSourceTypeCode", ("4", "Application Server"))
    for what in event.objects:
        type_code, role, id_code, scheme, meaning = OBJECTS[what.kind]
        item = ET.SubElement(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": what.id,
                "ParticipantObjectTypeCode": type_code,
                "ParticipantObjectTypeCodeRole": role,
            },
        )
        _code(item, "ParticipantObjectIDTypeCode", (id_code, meaning), scheme)
        if what.query:
            ET.SubElement(item, "ParticipantObjectQuery").text = base64.b64encode(
                what.query
            ).decode("ascii")
        if what.description:
            ET.SubElement(item, "ParticipantObjectDescription").text = _one_line(what.description)
        for sop_class, instances in sorted(what.instances.items()):
            element = ET.SubElement(
                item, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(len(instances))}
            )
            for uid in instances:
                ET.SubElement(element, "Instance", {"UID": uid})
        for accession in what.accessions:
            ET.SubElement(item, "Accession", {"Number": accession})
    return ET.tostring(message, encoding="unicode")


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --- reading back ------------------------------------------------------------------------------


@frozen
class Entry:
    """One recorded message, as `appliance audit` shows it."""

    when: str
    event: str
    action: str
    outcome: int
    type: str
    who: list[dict[str, str]]
    patients: list[str]
    studies: dict[str, int]
    description: str
    xml: str


def parse(line: str) -> Entry:
    message = ET.fromstring(line)
    identification = message.find("EventIdentification")
    assert identification is not None
    event_id = identification.find("EventID")
    event_type = identification.find("EventTypeCode")
    outcome = identification.find("EventOutcomeDescription")
    who = [dict(p.attrib) for p in message.findall("ActiveParticipant")]
    patients, studies = [], {}
    for item in message.findall("ParticipantObjectIdentification"):
        id_type = item.find("ParticipantObjectIDTypeCode")
        code = id_type.get("csd-code") if id_type is not None else ""
        object_id = item.get("ParticipantObjectID", "")
        if code == OBJECTS["patient"][2] and item.get("ParticipantObjectTypeCode") == "1":
            patients.append(object_id)
        elif code == OBJECTS["study"][2]:
            studies[object_id] = sum(
                int(c.get("NumberOfInstances", "0")) for c in item.findall("SOPClass")
            )
    return Entry(
        when=identification.get("EventDateTime", ""),
        event=event_id.get("originalText", "") if event_id is not None else "",
        action=identification.get("EventActionCode", ""),
        outcome=int(identification.get("EventOutcomeIndicator", "0")),
        type=event_type.get("originalText", "") if event_type is not None else "",
        who=who,
        patients=patients,
        studies=studies,
        description=outcome.text or "" if outcome is not None else "",
        xml=line,
    )


# --- the trail ---------------------------------------------------------------------------------

_NAME = re.compile(r"audit-(\d{6})\.log")


def files(directory: Path) -> list[Path]:
    """The trail's files, oldest first."""
    if not directory.is_dir():
        return []
    named = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [path for _, path in sorted(named)]


def lines(directory: Path) -> Iterator[str]:
    for path in files(directory):
        with path.open(encoding="utf-8") as trail:
            for line in trail:
                if line.strip():
                    yield line.rstrip("\n")


class AuditTrail:
    """The local, append-only trail. Until `open()` messages wait in memory (bounded)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._directory: Path | None = None
        self._fd = -1
        self._size = 0
        self._number = 0
        self._rotate_bytes = 16 * 1024 * 1024
        self._keep_files = 64
        self._waiting: deque[str] = deque(maxlen=10_000)
        self.source_id = socket.gethostname()

    def open(
        self, directory: Path, *, source_id: str, rotate_mb: float = 16, keep_files: int = 64
    ) -> None:
        with self._lock:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            self._directory = directory
            self.source_id = source_id
            self._rotate_bytes = int(rotate_mb * 1024 * 1024)
            self._keep_files = keep_files
            existing = files(directory)
            self._number = int(_NAME.fullmatch(existing[-1].name).group(1)) if existing else 1  # type: ignore[union-attr]
            self._open_file()
            waiting, self._waiting = list(self._waiting), deque(maxlen=10_000)
            for line in waiting:
                self._write(line)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._directory = -1, None

    @property
    def directory(self) -> Path | None:
        return self._directory

    def _open_file(self) -> None:
        assert self._directory is not None
        if self._fd >= 0:
            os.close(self._fd)
        path = self._directory / f"audit-{self._number:06d}.log"
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(self._fd, 0o600)
        self._size = os.fstat(self._fd).st_size

    def _write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        if self._size and self._size + len(data) > self._rotate_bytes:
            self._number += 1
            self._open_file()
            for old in files(self._directory or Path())[: -self._keep_files]:
                old.unlink(missing_ok=True)
        os.write(self._fd, data)
        os.fdatasync(self._fd)
        self._size += len(data)

    def record(self, event: AuditEvent) -> None:
        """Write one message; a trail that cannot be written is logged and counted, never
        raised into the DICOM service that reported the event."""
        METRICS.inc("audit_messages_total", event=event.event)
        try:
            line = to_xml(event, self.source_id)
        except Exception as exc:  # a value the XML cannot carry: counted, never raised
            METRICS.inc("audit_failures_total")
            log.error("audit.write_failed", phase="encode", event_name=event.event, error=str(exc))
            return
        with self._lock:
            if self._fd < 0:
                self._waiting.append(line)
                return
            try:
                self._write(line)
            except OSError as exc:
                METRICS.inc("audit_failures_total")
                log.error("audit.write_failed", phase="audit", error=exc.strerror or str(exc))


#: The process's trail (like appliance.metrics.METRICS: every service reports to it).
TRAIL = AuditTrail()


def record(event: AuditEvent) -> None:
    TRAIL.record(event)


# --- the events the appliance records ------------------------------------------------------------


def _appliance(
    ae_title: str = APPLIANCE, *, requestor: bool = False, role: str = ""
) -> Participant:
    return Participant(
        user_id=ae_title, requestor=requestor, role=role, alternative_user_id=str(os.getpid())
    )


def _peer(ae_title: str, address: str, *, requestor: bool = True, role: str = "") -> Participant:
    return Participant(user_id=ae_title, requestor=requestor, address=address, role=role)


def application_activity(started: bool, version: str) -> AuditEvent:
    return AuditEvent(
        event="application-activity",
        action="E",
        type="application-start" if started else "application-stop",
        participants=(_appliance(role="application"),),
        description=f"screening gateway {version}",
    )


def security_alert(
    reason: str,
    *,
    calling_ae: str,
    address: str,
    called_ae: str = "",
    authentication: bool = False,
    restricted: bool = False,
) -> AuditEvent:
    """A refused connection, association or service (or a failed certificate check)."""
    node = f"{calling_ae}@{address}" if calling_ae else address
    return AuditEvent(
        event="security-alert" if not authentication else "user-authentication",
        action="E",
        outcome=MINOR_FAILURE,
        type="restricted-function"
        if restricted
        else ("login" if authentication else "node-authentication"),
        participants=(
            _peer(calling_ae or "(unknown)", address),
            _appliance(called_ae or APPLIANCE, requestor=False),
        ),
        objects=(ParticipantObject("node", node, description=reason),),
        description=reason,
    )


def authentication_failed(who: str, reason: str) -> AuditEvent:
    """The appliance's own identity could not authenticate (a token or certificate failure)."""
    return AuditEvent(
        event="user-authentication",
        action="E",
        outcome=MINOR_FAILURE,
        type="login",
        participants=(_appliance(who, requestor=True),),
        description=reason,
    )


def query(
    *,
    calling_ae: str,
    address: str,
    called_ae: str,
    sop_class: str,
    identifier: bytes,
    patients: Iterable[str] = (),
    outcome: int = SUCCESS,
) -> AuditEvent:
    """A C-FIND: the query itself (PS3.15 A.5.3.10), and the patients it answered with."""
    return AuditEvent(
        event="query",
        action="E",
        outcome=outcome,
        participants=(
            _peer(calling_ae, address, role="source"),
            _appliance(called_ae, role="destination"),
        ),
        objects=(
            ParticipantObject("query", sop_class, query=identifier),
            *(ParticipantObject("patient", pid) for pid in sorted(set(patients)) if pid),
        ),
    )


@frozen
class StudyTransfer:
    """What moved of one study: its patient, accessions and instances by SOP class."""

    study_uid: str
    patient_id: str
    accessions: tuple[str, ...] = ()
    instances: dict[str, tuple[str, ...]] = field(factory=dict)


def _study_objects(studies: Iterable[StudyTransfer]) -> tuple[ParticipantObject, ...]:
    objects: list[ParticipantObject] = []
    patients: list[str] = []
    for study in studies:
        objects.append(
            ParticipantObject(
                "study", study.study_uid, instances=study.instances, accessions=study.accessions
            )
        )
        if study.patient_id and study.patient_id not in patients:
            patients.append(study.patient_id)
    return (*objects, *(ParticipantObject("patient", p) for p in patients))


def instances_transferred(
    *,
    source: Participant,
    destination: Participant,
    studies: Iterable[StudyTransfer],
    received: bool,
    outcome: int = SUCCESS,
    description: str = "",
) -> AuditEvent:
    """Instances received (action C) or sent (R), per study (PS3.15 A.5.3.5)."""
    return AuditEvent(
        event="instances-transferred",
        action="C" if received else "R",
        outcome=outcome,
        participants=(
            Participant(
                source.user_id,
                source.requestor,
                source.address,
                "source",
                source.alternative_user_id,
            ),
            Participant(
                destination.user_id,
                destination.requestor,
                destination.address,
                "destination",
                destination.alternative_user_id,
            ),
        ),
        objects=_study_objects(studies),
        description=description,
    )


def begin_transferring(
    *, source: Participant, destination: Participant, studies: Iterable[StudyTransfer]
) -> AuditEvent:
    return AuditEvent(
        event="begin-transferring",
        action="E",
        participants=(
            Participant(source.user_id, source.requestor, source.address, "source"),
            Participant(
                destination.user_id, destination.requestor, destination.address, "destination"
            ),
        ),
        objects=_study_objects(studies),
    )


def patient_record(
    *,
    action: str,
    patient_id: str,
    accession: str,
    cloud: str,
    outcome: int = SUCCESS,
    description: str = "",
    when: dt.datetime | None = None,
) -> AuditEvent:
    """A worklist item created (C), updated (U) or cancelled (D) by the cloud (or a person)."""
    return AuditEvent(
        event="patient-record",
        action=action,
        outcome=outcome,
        participants=(
            Participant(cloud, requestor=True, role="source"),
            _appliance(role="destination"),
        ),
        objects=tuple(
            ParticipantObject(kind, value)
            for kind, value in (("patient", patient_id), ("worklist-item", accession))
            if value
        ),
        description=description,
        when=when or dt.datetime.now(dt.UTC),
    )


def appliance_participant(ae_title: str = APPLIANCE, *, requestor: bool = False) -> Participant:
    return _appliance(ae_title, requestor=requestor)


def peer_participant(ae_title: str, address: str, *, requestor: bool = True) -> Participant:
    return _peer(ae_title, address, requestor=requestor)


class Transfers:
    """Instances of an association (or a retrieve), gathered by study for one message each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._studies: dict[str, tuple[str, list[str], dict[str, list[str]]]] = {}

    def add(
        self, study_uid: str, patient_id: str, accession: str, sop_class: str, sop_instance: str
    ) -> None:
        with self._lock:
            _, accessions, instances = self._studies.setdefault(study_uid, (patient_id, [], {}))
            if accession and accession not in accessions:
                accessions.append(accession)
            instances.setdefault(sop_class, []).append(sop_instance)

    def studies(self) -> list[StudyTransfer]:
        with self._lock:
            return [
                StudyTransfer(
                    study_uid=uid,
                    patient_id=patient,
                    accessions=tuple(accessions),
                    instances={k: tuple(v) for k, v in instances.items()},
                )
                for uid, (patient, accessions, instances) in self._studies.items()
            ]

    @classmethod
    def of_rows(cls, rows: Iterable[sqlite3.Row]) -> Transfers:
        """From stored_instances rows."""
        transfers = cls()
        for row in rows:
            transfers.add(
                row["study_instance_uid"],
                row["patient_id"] or "",
                row["accession_number"] or "",
                row["sop_class_uid"],
                row["sop_instance_uid"],
            )
        return transfers

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for _, _, i in self._studies.values() for v in i.values())
