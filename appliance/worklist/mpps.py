"""MPPS rules (PS3.4 F.7) on the worklist store's transactions: this module owns the
`mpps_instances` table of worklist.db.

N-CREATE must say IN PROGRESS and carry its Type 1 attributes; it links the step to its
worklist items: every item of the Scheduled Step Attributes Sequence (the "group case": one
MPPS for several requested procedures), each by accession, else the Scheduled Procedure Step
ID, which is our accession. N-SET may repeat IN PROGRESS and ends in COMPLETED (with at least
one performed series) or DISCONTINUED, after which only an exact retransmission is accepted
(answered as the success it was). Each change records its events (`mpps.in_progress`,
`mpps.completed`, `mpps.discontinued`, one per linked accession) in the same transaction.
"""

from __future__ import annotations

import enum
import json
import sqlite3
from typing import Any

from attrs import frozen

from appliance.worklist.store import (
    COMPLETED,
    DISCONTINUED,
    IN_PROGRESS,
    OFFERED,
    WorklistItem,
    WorklistStore,
    _iso,
    now_utc,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS mpps_instances (
    sop_instance_uid  TEXT PRIMARY KEY,
    accession_number  TEXT,
    status            TEXT NOT NULL,
    attributes        TEXT NOT NULL,  -- DICOM JSON of the current state
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS mpps_accession ON mpps_instances (accession_number);
-- Every accession an MPPS performs (several in the group case); mpps_instances.accession_number
-- is the first of them.
CREATE TABLE IF NOT EXISTS mpps_links (
    mpps_instance_uid TEXT NOT NULL,
    accession_number  TEXT NOT NULL,
    PRIMARY KEY (mpps_instance_uid, accession_number)
);
CREATE INDEX IF NOT EXISTS mpps_links_accession ON mpps_links (accession_number);
"""


class Refusal(enum.Enum):
    """Why an MPPS request cannot be applied (the worklist SCP maps each to its F.7 status)."""

    NO_SUCH_INSTANCE = "no-such-instance"
    DUPLICATE_INSTANCE = "duplicate-instance"
    INVALID_VALUE = "invalid-value"
    MISSING_ATTRIBUTE = "missing-attribute"  # absent (0x0120)
    MISSING_VALUE = "missing-value"  # present, empty (0x0121)
    NO_LONGER_UPDATABLE = "no-longer-updatable"  # COMPLETED or DISCONTINUED: final


class MppsError(Exception):
    """An MPPS request that cannot be applied, and why."""

    def __init__(self, refusal: Refusal, reason: str) -> None:
        super().__init__(reason)
        self.refusal = refusal
        self.reason = reason


# DICOM JSON tags used by the MPPS rules
PPS_STATUS = "00400252"
PERFORMED_SERIES = "00400340"
REFERENCED_IMAGES = "00081140"
REFERENCED_SOP_INSTANCE = "00081155"
RETRIEVE_AE_TITLE = "00080054"
SPECIFIC_CHARACTER_SET = "00080005"
SCHEDULED_STEP_ATTRIBUTES = "00400270"

#: Type 1 attributes of an N-CREATE (PS3.4 F.7.2.1, Table F.7.2-1), by DICOM JSON tag.
CREATE_TYPE_1 = {
    "00400253": "Performed Procedure Step ID",
    "00400241": "Performed Station AE Title",
    "00400244": "Performed Procedure Step Start Date",
    "00400245": "Performed Procedure Step Start Time",
    "00400252": "Performed Procedure Step Status",
    "00080060": "Modality",
}
STUDY_INSTANCE_UID = "0020000D"


def _json_text(attributes: dict[str, Any], tag: str) -> str | None:
    values = attributes.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def _check_type_1(attributes: dict[str, Any]) -> None:
    """Refuse an N-CREATE without its Type 1 attributes: absent 0x0120, empty 0x0121."""
    for tag, name in CREATE_TYPE_1.items():
        if tag not in attributes:
            raise MppsError(Refusal.MISSING_ATTRIBUTE, f"{name} missing")
        if _json_text(attributes, tag) is None:
            raise MppsError(Refusal.MISSING_VALUE, f"{name} empty")
    if SCHEDULED_STEP_ATTRIBUTES not in attributes:
        raise MppsError(Refusal.MISSING_ATTRIBUTE, "Scheduled Step Attributes Sequence missing")
    steps = attributes[SCHEDULED_STEP_ATTRIBUTES].get("Value") or []
    if not steps:
        raise MppsError(Refusal.MISSING_VALUE, "Scheduled Step Attributes Sequence empty")
    for step in steps:
        if STUDY_INSTANCE_UID not in step:
            raise MppsError(
                Refusal.MISSING_ATTRIBUTE, "Study Instance UID missing in a scheduled step"
            )
        if _json_text(step, STUDY_INSTANCE_UID) is None:
            raise MppsError(Refusal.MISSING_VALUE, "Study Instance UID empty in a scheduled step")


@frozen
class Performed:
    """What a completed MPPS says was made: the instances sent here (their series' Retrieve
    AE Title is this gateway's, or not given) and those sent elsewhere (F.7.2.2.2: a unit lists
    every instance it created, and each series may go to another AE)."""

    here: list[str]
    elsewhere: list[str]


def performed_instances(attributes: dict[str, Any], ae_title: str | None = None) -> Performed:
    here: list[str] = []
    elsewhere: list[str] = []
    for series in attributes.get(PERFORMED_SERIES, {}).get("Value") or []:
        retrieve_ae = (_json_text(series, RETRIEVE_AE_TITLE) or "").strip()
        ours = not retrieve_ae or ae_title is None or retrieve_ae == ae_title.strip()
        for image in series.get(REFERENCED_IMAGES, {}).get("Value") or []:
            uid = _json_text(image, REFERENCED_SOP_INSTANCE)
            if uid:
                (here if ours else elsewhere).append(uid)
    return Performed(here, elsewhere)


def _performed_instances(attributes: dict[str, Any]) -> list[str]:
    performed = performed_instances(attributes)
    return performed.here + performed.elsewhere


@frozen
class MppsSummary:
    status: str
    sop_instance_uid: str
    attributes: dict[str, Any]


@frozen
class MppsOutcome:
    status: str
    replay: bool  # an exact retransmission of what was already applied
    accession_number: str | None


def forget_in(db: sqlite3.Connection, mpps_instance_uid: str) -> None:
    """Inside the store's transaction: a removed test item's MPPS instance goes with it."""
    db.execute("DELETE FROM mpps_instances WHERE sop_instance_uid = ?", (mpps_instance_uid,))
    db.execute("DELETE FROM mpps_links WHERE mpps_instance_uid = ?", (mpps_instance_uid,))


class Mpps:
    def __init__(self, store: WorklistStore) -> None:
        self._store = store

    def _linked_item(
        self, db: sqlite3.Connection, accession_number: str | None, step_id: str | None
    ) -> WorklistItem | None:
        # Our Scheduled Procedure Step ID is the accession number (see worklist_scp.record).
        for key in (accession_number, step_id):
            if key:
                row = db.execute(
                    "SELECT * FROM worklist_items WHERE accession_number = ?", (key,)
                ).fetchone()
                if row is not None:
                    return WorklistItem.from_row(row)
        return None

    def create(
        self,
        sop_instance_uid: str,
        attributes: dict[str, Any],
        steps: list[tuple[str | None, str | None]],
    ) -> MppsOutcome:
        """`steps`: (Accession Number, Scheduled Procedure Step ID) of each item of the
        Scheduled Step Attributes Sequence."""
        _check_type_1(attributes)
        status = _json_text(attributes, PPS_STATUS)
        if status != IN_PROGRESS:
            raise MppsError(
                Refusal.INVALID_VALUE, f"N-CREATE status must be IN PROGRESS, not {status}"
            )
        stamp = _iso(now_utc())
        with self._store.transaction() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            if row is not None:
                if json.loads(row["attributes"]) == attributes:
                    return MppsOutcome(row["status"], True, row["accession_number"])
                raise MppsError(Refusal.DUPLICATE_INSTANCE, "MPPS instance already exists")
            linked: list[tuple[str | None, WorklistItem | None]] = []
            for accession_number, step_id in steps:
                item = self._linked_item(db, accession_number, step_id)
                accession = item.accession_number if item else accession_number
                if accession and all(accession != known for known, _ in linked):
                    linked.append((accession, item))
            if not linked:
                linked = [(None, None)]
            first = linked[0][0]
            db.execute(
                "INSERT INTO mpps_instances VALUES (?, ?, ?, ?, ?, ?)",
                (sop_instance_uid, first, status, json.dumps(attributes), stamp, stamp),
            )
            group = [accession for accession, _ in linked if accession]
            for accession, item in linked:
                if accession:
                    db.execute(
                        "INSERT OR IGNORE INTO mpps_links VALUES (?, ?)",
                        (sop_instance_uid, accession),
                    )
                if item is not None:
                    # Recorded whatever the item's state: a first image may have moved it.
                    changes: dict[str, Any] = {"mpps_instance_uid": sop_instance_uid}
                    if item.status in OFFERED:
                        changes["status"] = IN_PROGRESS
                    item = self._store.update_in(db, item, **changes)
                payload: dict[str, Any] = {
                    "mpps_instance_uid": sop_instance_uid,
                    "status": IN_PROGRESS,
                    "study_instance_uid": item.study_instance_uid if item else None,
                }
                if len(group) > 1:
                    payload["group"] = group
                self._store.record_event(
                    "mpps.in_progress", item, payload, accession_number=accession
                )
        return MppsOutcome(status, False, first)

    def _linked_accessions(self, db: sqlite3.Connection, row: sqlite3.Row) -> list[str]:
        found = [
            r[0]
            for r in db.execute(
                "SELECT accession_number FROM mpps_links WHERE mpps_instance_uid = ?"
                " ORDER BY rowid",
                (row["sop_instance_uid"],),
            )
        ]
        first = row["accession_number"]
        return found or ([first] if first else [])

    def character_set(self, sop_instance_uid: str) -> str | None:
        """The N-CREATE's Specific Character Set: an N-SET without one is in it (F.7.2.2.1)."""
        found = self.get(sop_instance_uid)
        if found is None:
            return None
        values = found["attributes"].get(SPECIFIC_CHARACTER_SET, {}).get("Value") or []
        return "\\".join(str(v or "") for v in values) or None

    def update(self, sop_instance_uid: str, modifications: dict[str, Any]) -> MppsOutcome:
        with self._store.transaction() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            if row is None:
                raise MppsError(Refusal.NO_SUCH_INSTANCE, "No such MPPS instance")
            current = json.loads(row["attributes"])
            merged = {**current, **modifications}
            if row["status"] in (COMPLETED, DISCONTINUED):
                if merged == current:  # a retransmission after a lost reply
                    return MppsOutcome(row["status"], True, row["accession_number"])
                raise MppsError(
                    Refusal.NO_LONGER_UPDATABLE, f"MPPS is {row['status']}; no more changes"
                )
            status = _json_text(merged, PPS_STATUS)
            if status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
                raise MppsError(
                    Refusal.INVALID_VALUE, f"invalid Performed Procedure Step Status {status}"
                )
            db.execute(
                "UPDATE mpps_instances SET status = ?, attributes = ?, updated_at = ?"
                " WHERE sop_instance_uid = ?",
                (status, json.dumps(merged), _iso(now_utc()), sop_instance_uid),
            )
            if status == IN_PROGRESS:
                return MppsOutcome(status, merged == current, row["accession_number"])
            if status == COMPLETED and not (merged.get(PERFORMED_SERIES, {}).get("Value") or []):
                raise MppsError(
                    Refusal.MISSING_VALUE, "COMPLETED needs at least one Performed Series item"
                )
            group = self._linked_accessions(db, row)
            targets: list[str | None] = list(group) or [None]
            for accession in targets:
                item = self._linked_item(db, accession, None) if accession else None
                if item is not None:
                    item = self._store.update_in(
                        db, item, status=status, mpps_instance_uid=sop_instance_uid
                    )
                payload = {
                    "mpps_instance_uid": sop_instance_uid,
                    "status": status,
                    "study_instance_uid": item.study_instance_uid if item else None,
                    "performed_instances": _performed_instances(merged),
                }
                if len(group) > 1:
                    payload["group"] = group
                self._store.record_event(
                    "mpps.completed" if status == COMPLETED else "mpps.discontinued",
                    item,
                    payload,
                    accession_number=accession,
                )
        return MppsOutcome(status, False, row["accession_number"])

    def latest(self, accession_number: str) -> MppsSummary | None:
        """The newest MPPS that performs an accession (alone or in a group)."""
        with self._store.reader() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE accession_number = ? OR sop_instance_uid IN"
                " (SELECT mpps_instance_uid FROM mpps_links WHERE accession_number = ?)"
                " ORDER BY updated_at DESC, created_at DESC LIMIT 1",
                (accession_number, accession_number),
            ).fetchone()
        if row is None:
            return None
        return MppsSummary(row["status"], row["sop_instance_uid"], json.loads(row["attributes"]))

    def get(self, sop_instance_uid: str) -> dict[str, Any] | None:
        with self._store.reader() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return dict(row) | {"attributes": json.loads(row["attributes"])} if row else None
