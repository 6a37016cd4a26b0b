"""The worklist store: the one owner of `worklist.db` (items, their archive, MPPS instances).

The domain API used by relay actions, the CLI and the DICOM handlers. Writes run in the
database's writer thread (`await store.write(store.create, item)` inside the appliance; offline
commands call the methods directly); reads use read-only readers from any thread. Every state
change that the cloud must hear of records its event in the same transaction (appliance/outbox.py).
The MPPS rules are appliance/worklist/mpps.py, on this store's transactions.
"""

from __future__ import annotations

import contextlib
import datetime
import sqlite3
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import attrs
from attrs import frozen
from pydicom.uid import generate_uid

from appliance import outbox
from appliance.db import Database
from appliance.state import StatePaths

T = TypeVar("T")
P = ParamSpec("P")

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
    outbox.SCHEMA
    + f"""
CREATE TABLE IF NOT EXISTS worklist_items ({_ITEM_COLUMNS});
CREATE INDEX IF NOT EXISTS worklist_items_offered ON worklist_items (status, scheduled_at);
CREATE INDEX IF NOT EXISTS worklist_items_patient ON worklist_items (patient_id);
CREATE INDEX IF NOT EXISTS worklist_items_modality ON worklist_items (modality, scheduled_at);
CREATE TABLE IF NOT EXISTS worklist_archive ({_ITEM_COLUMNS}, archived_at TEXT NOT NULL);



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


class InvalidItem(WorklistError):
    """A value a worklist answer could not carry (PS3.5 6.2: AE 16, SH 16, LO 64, one value)."""

    code = "invalid"


#: Field -> (what it becomes in the answer, its VR's length limit).
_LIMITS = {
    "scheduled_station_ae": ("Scheduled Station AE Title", 16),
    "scheduled_station_name": ("Scheduled Station Name", 16),
    "study_description": ("Requested Procedure Description", 64),
    "procedure_code_value": ("code value", 16),
    "procedure_code_scheme": ("coding scheme", 16),
    "procedure_code_meaning": ("code meaning", 64),
}


def check_values(item: WorklistItem) -> None:
    """Raise InvalidItem naming the first value that a worklist answer could not carry."""
    for name, (meaning, limit) in _LIMITS.items():
        value = getattr(item, name)
        if len(value) > limit or "\\" in value or any(ord(c) < 0x20 for c in value):
            raise InvalidItem(
                f"{name} ({meaning}): at most {limit} characters, one value, no control "
                f"characters: {value[:80]!r}"
            )


class WorklistStore:
    def __init__(self, paths: StatePaths) -> None:
        from appliance.worklist import mpps  # the MPPS rules build on this module

        self.database = Database(paths.worklist_db, SCHEMA + mpps.SCHEMA)
        #: The MPPS rules, on this store's transactions.
        self.mpps = mpps.Mpps(self)

    def open(self) -> None:
        self.database.open()

    def close(self) -> None:
        self.database.close()

    async def write(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run one of this store's write methods in the database's writer thread."""
        return await self.database.write(function, *args, **kwargs)

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return self.database.transaction()

    def reader(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A read-only connection for any thread (C-FIND runs in association threads)."""
        return self.database.reader()

    # --- events -----------------------------------------------------------------------------------

    def record_event(
        self,
        event_type: str,
        item: WorklistItem | None,
        payload: dict[str, Any],
        accession_number: str | None = None,
    ) -> None:
        """Inside a transaction: the event that reports its change."""
        outbox.record(
            self.database,
            event_type,
            payload | {"test": bool(item and item.is_test)},
            accession_number=item.accession_number if item else accession_number,
            source_message_id=item.source_message_id if item else None,
        )

    def events(self, accession_number: str | None = None) -> list[dict[str, Any]]:
        with self.reader() as db:
            return outbox.events_of(db, accession_number)

    # --- items ------------------------------------------------------------------------------------

    def get(self, accession_number: str) -> WorklistItem | None:
        with self.reader() as db:
            row = db.execute(
                "SELECT * FROM worklist_items WHERE accession_number = ?", (accession_number,)
            ).fetchone()
        return WorklistItem.from_row(row) if row else None

    def create(self, item: WorklistItem) -> tuple[str, WorklistItem]:
        """Returns ("created" | "exists", the stored item). Raises AccessionConflict, or
        InvalidItem for a value no worklist answer could carry."""
        check_values(item)
        if not item.study_instance_uid:
            item = attrs.evolve(item, study_instance_uid=generate_uid(UID_ROOT))
        stamp = _iso(now_utc())
        item = attrs.evolve(item, status=SCHEDULED, created_at=stamp, updated_at=stamp)
        with self.transaction() as db:
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
        with self.transaction() as db:
            item = self.item_in(db, accession_number)
            if item.status == status:
                return item
            if item.status in FINISHED:
                raise InvalidTransition(
                    f"accession {accession_number} is {item.status}; it cannot become {status}"
                )
            item = self.update_in(db, item, status=status)
            self.record_event("worklist.status_changed", item, {"status": status})
        return item

    def item_in(self, db: sqlite3.Connection, accession_number: str) -> WorklistItem:
        """Inside a transaction: the item, or UnknownItem."""
        row = db.execute(
            "SELECT * FROM worklist_items WHERE accession_number = ?", (accession_number,)
        ).fetchone()
        if row is None:
            raise UnknownItem(f"no worklist item with accession {accession_number}")
        return WorklistItem.from_row(row)

    def update_in(self, db: sqlite3.Connection, item: WorklistItem, **changes: Any) -> WorklistItem:
        """Inside a transaction: change an item's workflow fields."""
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
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM worklist_items WHERE accession_number = ? AND status = ?",
                (accession_number, SCHEDULED),
            ).fetchone()
            if row is None:
                return False
            item = self.update_in(db, WorklistItem.from_row(row), status=IN_PROGRESS)
            self.record_event("worklist.status_changed", item, {"status": IN_PROGRESS})
        return True

    def archive(self, before: datetime.datetime, stale_before: datetime.datetime) -> int:
        """Move items scheduled before `before` that are finished, or scheduled before
        `stale_before` whatever their state, into worklist_archive (kept, no longer offered)."""
        params = {"before": _iso(before), "stale": _iso(stale_before), "now": _iso(now_utc())}
        condition = (
            "(scheduled_at < :before AND status IN ('COMPLETED', 'DISCONTINUED', 'CANCELLED'))"
            " OR scheduled_at < :stale"
        )
        with self.transaction() as db:
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

    def remove_test_item(self, accession_number: str, drop_unsent_events: bool) -> str | None:
        """Forget a test item (never a real one), its archive copy and its MPPS; with
        `drop_unsent_events` its events too, which nothing would ever send. Returns the test
        item's Study Instance UID (so its images can go), or None if there is no such item."""
        from appliance.worklist import mpps

        with self.transaction() as db:
            found = [
                (row["study_instance_uid"], row["mpps_instance_uid"])
                for table in ("worklist_items", "worklist_archive")
                for row in db.execute(
                    f"SELECT study_instance_uid, mpps_instance_uid FROM {table}"
                    " WHERE accession_number = ? AND is_test = 1",
                    (accession_number,),
                )
            ]
            if not found:
                return None
            for table in ("worklist_items", "worklist_archive"):
                db.execute(
                    f"DELETE FROM {table} WHERE accession_number = ? AND is_test = 1",
                    (accession_number,),
                )
            for _study, mpps_uid in found:
                if mpps_uid:
                    mpps.forget_in(db, mpps_uid)
            if drop_unsent_events:
                outbox.drop_undelivered(self.database, accession_number)
        return str(found[0][0])
