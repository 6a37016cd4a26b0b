"""The worklist and MPPS store (`worklist.db`): the domain API used by relay actions, the CLI
and the DICOM handlers.

One writer connection, used from one thread at a time (callers serialise through a limiter);
readers take their own connections from a small pool (WAL). Every state change that the cloud
must hear of inserts its domain event in the same transaction (the `events` table: the relay
outbox drains it).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import queue
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
from attrs import frozen
from pydicom.uid import generate_uid

from appliance import events
from appliance.db import SerialWriter, connect

SCHEDULED, IN_PROGRESS, COMPLETED, DISCONTINUED, CANCELLED = (
    "SCHEDULED",
    "IN PROGRESS",
    "COMPLETED",
    "DISCONTINUED",
    "CANCELLED",
)
STATUSES = (SCHEDULED, IN_PROGRESS, COMPLETED, DISCONTINUED, CANCELLED)
OFFERED = (SCHEDULED, IN_PROGRESS)
FINISHED = (COMPLETED, DISCONTINUED, CANCELLED)
#: UID root for Study Instance UIDs the appliance generates for cloud-created items.
UID_ROOT = "1.2.826.0.1.3680043.8.498."

_ITEM_COLUMNS = """
    accession_number          TEXT PRIMARY KEY,
    patient_id                TEXT NOT NULL,
    patient_name              TEXT NOT NULL,
    patient_birth_date        TEXT NOT NULL DEFAULT '',
    patient_sex               TEXT NOT NULL DEFAULT '',
    scheduled_date            TEXT NOT NULL,   -- UTC, YYYYMMDD
    scheduled_time            TEXT NOT NULL,   -- UTC, HHMMSS
    scheduled_at              TEXT NOT NULL,   -- UTC, ISO 8601: what ranges are matched on
    modality                  TEXT NOT NULL,
    study_description         TEXT NOT NULL DEFAULT '',
    study_instance_uid        TEXT NOT NULL,
    procedure_code_value      TEXT NOT NULL DEFAULT '',
    procedure_code_scheme     TEXT NOT NULL DEFAULT '',
    procedure_code_meaning    TEXT NOT NULL DEFAULT '',
    scheduled_station_ae      TEXT NOT NULL DEFAULT '',
    scheduled_station_name    TEXT NOT NULL DEFAULT '',
    status                    TEXT NOT NULL,
    source_message_id         TEXT,
    mpps_instance_uid         TEXT,
    is_test                   INTEGER NOT NULL DEFAULT 0,
    created_at                TEXT NOT NULL,
    updated_at                TEXT NOT NULL
"""

SCHEMA = (
    events.SCHEMA
    + f"""
CREATE TABLE IF NOT EXISTS worklist_items ({_ITEM_COLUMNS});
CREATE INDEX IF NOT EXISTS worklist_items_offered ON worklist_items (status, scheduled_at);
CREATE INDEX IF NOT EXISTS worklist_items_patient ON worklist_items (patient_id);
CREATE INDEX IF NOT EXISTS worklist_items_modality ON worklist_items (modality, scheduled_at);
CREATE TABLE IF NOT EXISTS worklist_archive ({_ITEM_COLUMNS}, archived_at TEXT NOT NULL);

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
)


def now_utc() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds")


@frozen
class WorklistItem:
    accession_number: str
    patient_id: str
    patient_name: str  # DICOM PN: FAMILY^GIVEN
    scheduled_at: datetime.datetime  # aware, UTC
    modality: str = "MG"
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_description: str = ""
    study_instance_uid: str = ""
    procedure_code_value: str = ""
    procedure_code_scheme: str = ""
    procedure_code_meaning: str = ""
    scheduled_station_ae: str = ""
    scheduled_station_name: str = ""
    status: str = SCHEDULED
    source_message_id: str | None = None
    mpps_instance_uid: str | None = None
    is_test: bool = False
    created_at: str = ""
    updated_at: str = ""

    #: What the cloud decides; the rest the appliance assigns or the workflow changes.
    CONTENT = (
        "patient_id",
        "patient_name",
        "patient_birth_date",
        "patient_sex",
        "scheduled_at",
        "modality",
        "study_description",
    )

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> WorklistItem:
        data = {k: row[k] for k in row.keys() if k in _FIELDS}  # noqa: SIM118 (sqlite3.Row)
        data["scheduled_at"] = datetime.datetime.fromisoformat(row["scheduled_at"])
        data["is_test"] = bool(row["is_test"])
        return cls(**data)

    def to_row(self) -> dict[str, Any]:
        row = attrs.asdict(self)
        utc = self.scheduled_at.astimezone(datetime.UTC)
        row["scheduled_at"] = _iso(utc)
        row["scheduled_date"] = utc.strftime("%Y%m%d")
        row["scheduled_time"] = utc.strftime("%H%M%S")
        row["is_test"] = int(self.is_test)
        return row

    def differences(self, other: WorklistItem) -> list[str]:
        return [name for name in self.CONTENT if getattr(self, name) != getattr(other, name)]


_FIELDS = {a.name for a in attrs.fields(WorklistItem)}


class WorklistError(Exception):
    """A request the worklist cannot apply; ``code`` is stable for replies and statuses."""

    code = "error"


class AccessionConflict(WorklistError):
    code = "conflict"


class UnknownItem(WorklistError):
    code = "not_found"


class InvalidTransition(WorklistError):
    code = "invalid_status"


class MppsError(Exception):
    """An MPPS request that cannot be applied; ``status`` is the DICOM status (PS3.4 F.7)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


NO_SUCH_INSTANCE = 0x0112
DUPLICATE_INSTANCE = 0x0111
INVALID_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
#: "Performed Procedure Step object may no longer be updated" (PS3.4 F.7.2.2, error id A710).
NO_LONGER_UPDATABLE = 0x0110

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


class WorklistStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        #: Async callers run write methods through it: ``await store.write(store.create, item)``
        self.write = SerialWriter()

    def open(self) -> None:
        self._db = connect(self._path)
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        while not self._readers.empty():
            self._readers.get_nowait().close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("WorklistStore is not open")
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read connection for any thread (C-FIND runs in association threads)."""
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            db = connect(self._path)
        try:
            yield db
        finally:
            self._readers.put(db)

    # --- events -----------------------------------------------------------------------------------

    def _event(
        self,
        db: sqlite3.Connection,
        event_type: str,
        item: WorklistItem | None,
        payload: dict[str, Any],
        accession_number: str | None = None,
    ) -> None:
        events.insert(
            db,
            event_type,
            payload | {"test": bool(item and item.is_test)},
            accession_number=item.accession_number if item else accession_number,
            source_message_id=item.source_message_id if item else None,
        )

    def events(self) -> list[dict[str, Any]]:
        with self.reader() as db:
            return events.read_all(db)

    def undelivered_events(self) -> tuple[int, str | None]:
        with self.reader() as db:
            return events.undelivered(db)

    # --- items ------------------------------------------------------------------------------------

    def get(self, accession_number: str) -> WorklistItem | None:
        with self.reader() as db:
            row = db.execute(
                "SELECT * FROM worklist_items WHERE accession_number = ?", (accession_number,)
            ).fetchone()
        return WorklistItem.from_row(row) if row else None

    def create(self, item: WorklistItem) -> tuple[str, WorklistItem]:
        """Returns ("created" | "exists", the stored item). Raises AccessionConflict."""
        if not item.study_instance_uid:
            item = attrs.evolve(item, study_instance_uid=generate_uid(UID_ROOT))
        stamp = _iso(now_utc())
        item = attrs.evolve(item, status=SCHEDULED, created_at=stamp, updated_at=stamp)
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM worklist_items WHERE accession_number = ?",
                (item.accession_number,),
            ).fetchone()
            if row is not None:
                existing = WorklistItem.from_row(row)
                different = item.differences(existing)
                if not different:
                    return "exists", existing
                raise AccessionConflict(
                    f"accession {item.accession_number} already exists with a different "
                    + ", ".join(different)
                )
            values = item.to_row()
            columns = ", ".join(values)
            db.execute(
                f"INSERT INTO worklist_items ({columns}) VALUES "
                f"({', '.join(':' + c for c in values)})",
                values,
            )
        return "created", item

    def set_status(self, accession_number: str, status: str) -> WorklistItem:
        """Operator/cloud status change (e.g. cancel). Finished items stay finished."""
        if status not in STATUSES:
            raise InvalidTransition(f"{status!r} is not one of {', '.join(STATUSES)}")
        with self._transaction() as db:
            item = self._item(db, accession_number)
            if item.status == status:
                return item
            if item.status in FINISHED:
                raise InvalidTransition(
                    f"accession {accession_number} is {item.status}; it cannot become {status}"
                )
            item = self._update(db, item, status=status)
            self._event(db, "worklist.status_changed", item, {"status": status})
        return item

    def _item(self, db: sqlite3.Connection, accession_number: str) -> WorklistItem:
        row = db.execute(
            "SELECT * FROM worklist_items WHERE accession_number = ?", (accession_number,)
        ).fetchone()
        if row is None:
            raise UnknownItem(f"no worklist item with accession {accession_number}")
        return WorklistItem.from_row(row)

    def _update(self, db: sqlite3.Connection, item: WorklistItem, **changes: Any) -> WorklistItem:
        item = attrs.evolve(item, **changes, updated_at=_iso(now_utc()))
        assignments = ", ".join(f"{key} = :{key}" for key in [*changes, "updated_at"])
        db.execute(
            f"UPDATE worklist_items SET {assignments} WHERE accession_number = :accession_number",
            item.to_row(),
        )
        return item

    def items(self, *, include_finished: bool = True) -> list[WorklistItem]:
        where = "" if include_finished else "WHERE status IN ('SCHEDULED', 'IN PROGRESS')"
        with self.reader() as db:
            rows = db.execute(f"SELECT * FROM worklist_items {where} ORDER BY scheduled_at")
            return [WorklistItem.from_row(row) for row in rows.fetchall()]

    def offered(
        self,
        *,
        scheduled_from: datetime.datetime | None = None,
        scheduled_to: datetime.datetime | None = None,
        modality: str | None = None,
        patient_id: str | None = None,
        accession_number: str | None = None,
    ) -> list[WorklistItem]:
        """Items a modality may see, narrowed by the indexed keys; exact matching is the SCP's."""
        clauses = ["status IN ('SCHEDULED', 'IN PROGRESS')"]
        params: list[Any] = []
        for column, value in (
            ("modality", modality),
            ("patient_id", patient_id),
            ("accession_number", accession_number),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if scheduled_from is not None:
            clauses.append("scheduled_at >= ?")
            params.append(_iso(scheduled_from))
        if scheduled_to is not None:
            clauses.append("scheduled_at <= ?")
            params.append(_iso(scheduled_to))
        sql = f"SELECT * FROM worklist_items WHERE {' AND '.join(clauses)} ORDER BY scheduled_at"
        with self.reader() as db:
            return [WorklistItem.from_row(row) for row in db.execute(sql, params).fetchall()]

    def image_arrived(self, accession_number: str) -> bool:
        """The first image of a scheduled item moves it to IN PROGRESS (as the NHS gateway)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM worklist_items WHERE accession_number = ? AND status = ?",
                (accession_number, SCHEDULED),
            ).fetchone()
            if row is None:
                return False
            item = self._update(db, WorklistItem.from_row(row), status=IN_PROGRESS)
            self._event(db, "worklist.status_changed", item, {"status": IN_PROGRESS})
        return True

    def archive(self, before: datetime.datetime, stale_before: datetime.datetime) -> int:
        """Move items scheduled before `before` that are finished, or scheduled before
        `stale_before` whatever their state, into worklist_archive (kept, no longer offered)."""
        params = {"before": _iso(before), "stale": _iso(stale_before), "now": _iso(now_utc())}
        condition = (
            "(scheduled_at < :before AND status IN ('COMPLETED', 'DISCONTINUED', 'CANCELLED'))"
            " OR scheduled_at < :stale"
        )
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO worklist_archive SELECT *, :now FROM worklist_items"
                f" WHERE {condition}",
                params,
            )
            cursor = db.execute(f"DELETE FROM worklist_items WHERE {condition}", params)
        return cursor.rowcount

    def archived(self) -> list[str]:
        with self.reader() as db:
            rows = db.execute("SELECT accession_number FROM worklist_archive ORDER BY 1")
            return [row[0] for row in rows.fetchall()]

    # --- MPPS -------------------------------------------------------------------------------------

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

    def mpps_create(
        self,
        sop_instance_uid: str,
        attributes: dict[str, Any],
        accession_number: str | None,
        step_id: str | None,
    ) -> MppsOutcome:
        status = _json_text(attributes, PPS_STATUS)
        if status != IN_PROGRESS:
            raise MppsError(INVALID_VALUE, f"N-CREATE status must be IN PROGRESS, not {status}")
        stamp = _iso(now_utc())
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            if row is not None:
                if json.loads(row["attributes"]) == attributes:
                    return MppsOutcome(row["status"], True, row["accession_number"])
                raise MppsError(DUPLICATE_INSTANCE, "MPPS instance already exists")
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
                item = self._update(db, item, **changes)
            self._event(
                db,
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

    def mpps_set(self, sop_instance_uid: str, modifications: dict[str, Any]) -> MppsOutcome:
        with self._transaction() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
            if row is None:
                raise MppsError(NO_SUCH_INSTANCE, "No such MPPS instance")
            current = json.loads(row["attributes"])
            merged = {**current, **modifications}
            if row["status"] in (COMPLETED, DISCONTINUED):
                if merged == current:  # a retransmission after a lost reply
                    return MppsOutcome(row["status"], True, row["accession_number"])
                raise MppsError(NO_LONGER_UPDATABLE, f"MPPS is {row['status']}; no more changes")
            status = _json_text(merged, PPS_STATUS)
            if status not in (IN_PROGRESS, COMPLETED, DISCONTINUED):
                raise MppsError(INVALID_VALUE, f"invalid Performed Procedure Step Status {status}")
            db.execute(
                "UPDATE mpps_instances SET status = ?, attributes = ?, updated_at = ?"
                " WHERE sop_instance_uid = ?",
                (status, json.dumps(merged), _iso(now_utc()), sop_instance_uid),
            )
            if status == IN_PROGRESS:
                return MppsOutcome(status, merged == current, row["accession_number"])
            item = self._linked_item(db, row["accession_number"], None)
            if item is not None:
                item = self._update(db, item, status=status, mpps_instance_uid=sop_instance_uid)
            self._event(
                db,
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

    def latest_mpps(self, accession_number: str) -> tuple[str, str, list[str]] | None:
        """(status, MPPS UID, performed instances) of the newest MPPS for an accession."""
        with self.reader() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE accession_number = ?"
                " ORDER BY updated_at DESC, created_at DESC LIMIT 1",
                (accession_number,),
            ).fetchone()
        if row is None:
            return None
        attributes = json.loads(row["attributes"])
        return row["status"], row["sop_instance_uid"], _performed_instances(attributes)

    def mpps(self, sop_instance_uid: str) -> dict[str, Any] | None:
        with self.reader() as db:
            row = db.execute(
                "SELECT * FROM mpps_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
            ).fetchone()
        return dict(row) | {"attributes": json.loads(row["attributes"])} if row else None
