"""MPPS rules (PS3.4 F.7) on the worklist store's transactions: this module owns the
`mpps_instances` table of worklist.db.

N-CREATE must say IN PROGRESS and links the step to its worklist item (by accession, else the
Scheduled Procedure Step ID, which is our accession); N-SET may repeat IN PROGRESS and ends in
COMPLETED or DISCONTINUED, after which only an exact retransmission is accepted (answered as
the success it was). Each change records its event (`mpps.in_progress`, `mpps.completed`,
`mpps.discontinued`) in the same transaction.
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
"""


class Refusal(enum.Enum):
    """Why an MPPS request cannot be applied (the worklist SCP maps each to its F.7 status)."""

    NO_SUCH_INSTANCE = "no-such-instance"
    DUPLICATE_INSTANCE = "duplicate-instance"
    INVALID_VALUE = "invalid-value"
    MISSING_ATTRIBUTE = "missing-attribute"
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


def _json_text(attributes: dict[str, Any], tag: str) -> str | None:
    values = attributes.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


def _performed_instances(attributes: dict[str, Any]) -> list[str]:
    found = []
    for series in attributes.get(PERFORMED_SERIES, {}).get("Value") or []:
        for image in series.get(REFERENCED_IMAGES, {}).get("Value") or []:
            uid = _json_text(image, REFERENCED_SOP_INSTANCE)
            if uid:
                found.append(uid)
    return found


@frozen
class MppsOutcome:
    status: str
    replay: bool  # an exact retransmission of what was already applied
    accession_number: str | None


def forget_in(db: sqlite3.Connection, mpps_instance_uid: str) -> None:
    """Inside the store's transaction: a removed test item's MPPS instance goes with it."""
    db.execute("DELETE FROM mpps_instances WHERE sop_instance_uid = ?", (mpps_instance_uid,))


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
        accession_number: str | None,
        step_id: str | None,
    ) -> MppsOutcome:
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
            item = self._linked_item(db, accession_number, step_id)
            accession = item.accession_number if item else accession_number
            db.execute(
                "INSERT INTO mpps_instances VALUES (?, ?, ?, ?, ?, ?)",
                (sop_instance_uid, accession, status, json.dumps(attributes), stamp, stamp),
            )
            if item is not None:
                # Recorded whatever the item's state: a first image may have moved it already.
                changes: dict[str, Any] = {"mpps_instance_uid": sop_instance_uid}
                if item.status in OFFERED:
                    changes["status"] = IN_PROGRESS
                item = self._store.update_in(db, item, **changes)
            self._store.record_event(
                "mpps.in_progress",
                item,
                {
                    "mpps_instance_uid": sop_instance_uid,
                    "status": IN_PROGRESS,
                    "study_instance_uid": item.study_instance_uid if item else None,
                },
                accession_number=accession,
            )
        return MppsOutcome(status, False, accession)

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
            item = self._linked_item(db, row["accession_number"], None)
            if item is not None:
                item = self._store.update_in(
                    db, item, status=status, mpps_instance_uid=sop_instance_uid
                )
            self._store.record_event(
                "mpps.completed" if status == COMPLETED else "mpps.discontinued",
                item,
                {
                    "mpps_instance_uid": sop_instance_uid,
                    "status": status,
                    "study_instance_uid": item.study_instance_uid if item else None,
                    "performed_instances": _performed_instances(merged),
                },
                accession_number=row["accession_number"],
            )
        return MppsOutcome(status, False, row["accession_number"])

    def latest(self, accession_number: str) -> tuple[str, str, list[str]] | None:
        """(status, MPPS UID, performed instances) of the newest MPPS for an accession."""
        with self._store.reader() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE accession_number = ?"
                " ORDER BY updated_at DESC, created_at DESC LIMIT 1",
                (accession_number,),
            ).fetchone()
        if row is None:
            return None
        attributes = json.loads(row["attributes"])
        return row["status"], row["sop_instance_uid"], _performed_instances(attributes)

    def get(self, sop_instance_uid: str) -> dict[str, Any] | None:
        with self._store.reader() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return dict(row) | {"attributes": json.loads(row["attributes"])} if row else None
