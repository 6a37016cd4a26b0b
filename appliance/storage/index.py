"""The tables of `pacs.db`: stored instances, conflicts kept aside, and study states.

This module is the only one that executes SQL on pacs.db's own tables (the `events` table is
appliance/outbox.py's). `Index` runs in the database's writer thread, called through the
InstanceStore that owns the database; `IndexReader` answers read-only queries from any thread
(DICOM handlers, relay fetches, status, fsck's checks) on the database's readers.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from attrs import frozen

from appliance import outbox
from appliance.db import Database
from appliance.state import StatePaths

#: Columns added after the first release: (name, declaration); added in place when missing.
PIPELINE_COLUMNS = [
    ("pipeline_state", "TEXT NOT NULL DEFAULT 'PENDING'"),  # PENDING, DONE, FAILED
    ("pipeline_attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("pipeline_next_at", "TEXT"),  # UTC; a failed attempt is retried after this
    ("pipeline_error", "TEXT"),
    ("thumbnail_path", "TEXT"),  # relative to derived/
    ("preview_path", "TEXT"),
]
#: When someone else took responsibility for an image: retention may require one of them.
#: Whether the pixel data is proved whole: WHOLE (native and complete, or every frame decoded),
#: BROKEN (a frame does not decode; pixels_error says why), NULL (not decoded yet).
PIXELS_COLUMNS = [("pixels_state", "TEXT"), ("pixels_error", "TEXT")]
#: 1 when an element has an odd length: stored as received, re-encoded (padded) when sent;
#: NULL for instances stored before this was recorded (looked up when sent).
ENCODING_COLUMNS = [("odd_lengths", "INTEGER")]
WHOLE, BROKEN = "WHOLE", "BROKEN"
RELEASE_COLUMNS = [
    ("committed_at", "TEXT"),  # UTC: storage commitment confirmed it to a modality
    ("fetched_at", "TEXT"),  # UTC: the cloud fetched it whole (image.fetch)
]

SCHEMA = (
    outbox.SCHEMA
    + """
CREATE TABLE IF NOT EXISTS stored_instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    storage_path        TEXT NOT NULL UNIQUE,
    file_size           INTEGER NOT NULL,
    storage_hash        TEXT NOT NULL,
    patient_id          TEXT,
    patient_name        TEXT,
    accession_number    TEXT,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT,
    sop_class_uid       TEXT NOT NULL,
    modality            TEXT,
    image_laterality    TEXT,
    view_position       TEXT,
    transfer_syntax_uid TEXT NOT NULL,
    number_of_frames    INTEGER,
    source_aet          TEXT,
    source_address      TEXT,
    status              TEXT NOT NULL DEFAULT 'STORED',  -- STORED, MISSING, CORRUPT
    created_at          TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS stored_instances_study ON stored_instances (study_instance_uid);
CREATE INDEX IF NOT EXISTS stored_instances_accession ON stored_instances (accession_number);
CREATE INDEX IF NOT EXISTS stored_instances_created ON stored_instances (created_at);

-- A second object arriving under a stored SOP Instance UID with different bytes.
CREATE TABLE IF NOT EXISTS instance_conflicts (
    id               INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    conflict_path    TEXT NOT NULL,
    file_size        INTEGER NOT NULL,
    storage_hash     TEXT NOT NULL,
    source_aet       TEXT,
    source_address   TEXT,
    created_at       TEXT NOT NULL
);

-- Study completeness (appliance/pipeline/studies.py decides; this is its memory).
CREATE TABLE IF NOT EXISTS studies (
    study_key          TEXT PRIMARY KEY,   -- accession number, else "uid:" + Study Instance UID
    accession_number   TEXT,
    study_instance_uid TEXT,
    state              TEXT NOT NULL,      -- OPEN, COMPLETE, DISCONTINUED
    first_instance_at  TEXT NOT NULL,
    last_instance_at   TEXT NOT NULL,
    rule               TEXT,
    completed_at       TEXT,
    completions        INTEGER NOT NULL DEFAULT 0
);

-- Images to Manage over HTTPS (appliance/uploads.py decides; this is its memory).
CREATE TABLE IF NOT EXISTS uploads (
    sop_instance_uid TEXT PRIMARY KEY,
    state            TEXT NOT NULL,       -- PENDING (retrying), DONE, FAILED, SKIPPED
    action_id        TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,
    last_status      INTEGER,
    error            TEXT,
    instance_id      TEXT,                -- Manage's id of the image
    first_tried_at   TEXT,
    updated_at       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_waiting ON uploads (state, next_attempt_at);
"""
)


@frozen
class StoredInstance:
    """One row of the index: what was stored, where, and what it is."""

    sop_instance_uid: str
    storage_path: str  # relative to storage/
    file_size: int
    storage_hash: str  # SHA-256 of the file bytes
    study_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    created_at: str
    series_instance_uid: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    image_laterality: str | None = None
    view_position: str | None = None
    number_of_frames: int | None = None
    source_aet: str | None = None
    source_address: str | None = None
    status: str = "STORED"
    pipeline_state: str = "PENDING"
    pipeline_attempts: int = 0
    pipeline_next_at: str | None = None
    pipeline_error: str | None = None
    thumbnail_path: str | None = None
    preview_path: str | None = None
    committed_at: str | None = None
    fetched_at: str | None = None
    pixels_state: str | None = None
    pixels_error: str | None = None
    odd_lengths: int | None = None


_COLUMNS = [a.name for a in attrs.fields(StoredInstance)]


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def migrate(db: sqlite3.Connection) -> None:
    """Columns added after the first release, added in place when missing."""
    present = {row["name"] for row in db.execute("PRAGMA table_info(stored_instances)")}
    for name, declaration in PIPELINE_COLUMNS + RELEASE_COLUMNS + PIXELS_COLUMNS + ENCODING_COLUMNS:
        if name not in present:
            db.execute(f"ALTER TABLE stored_instances ADD COLUMN {name} {declaration}")
    # Upload rows whose image is gone (before rows went with their image): nothing to upload.
    db.execute(
        "DELETE FROM uploads WHERE sop_instance_uid NOT IN"
        " (SELECT sop_instance_uid FROM stored_instances)"
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS stored_instances_pipeline"
        " ON stored_instances (pipeline_state, pipeline_next_at)"
    )


def open_database(paths: StatePaths) -> Database:
    """pacs.db's Database (not yet open): its one owner is the InstanceStore."""
    return Database(paths.pacs_db, SCHEMA, migrate=migrate)


@frozen
class StudyState:
    study_key: str
    accession_number: str | None
    study_instance_uid: str | None
    state: str  # OPEN, COMPLETE, DISCONTINUED
    first_instance_at: str
    last_instance_at: str
    rule: str | None = None
    completed_at: str | None = None
    completions: int = 0


def _retention_candidates(
    db: sqlite3.Connection,
    stored_before: str,
    require_release: bool,
    limit: int,
    require_upload: bool = False,
) -> list[StoredInstance]:
    """Images retention may delete, oldest first: stored before the cut-off, processed, and
    with no image event still waiting for the cloud's ack (delivered events may have been
    purged since, undelivered ones never are). Rows left half-deleted come first."""
    released = "AND (committed_at IS NOT NULL OR fetched_at IS NOT NULL)"
    rows = db.execute(
        "SELECT * FROM stored_instances s WHERE status = 'DELETING' OR (created_at < ?"
        " AND pipeline_state IN ('DONE', 'FAILED') "
        + (released if require_release else "")
        + f" AND NOT {outbox.IMAGE_EVENT_UNDELIVERED}"
        " AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.sop_instance_uid = s.sop_instance_uid"
        " AND u.state = 'PENDING')"
        + (
            # Uploads to Manage: only what has a final outcome (done, failed, skipped) goes.
            " AND EXISTS (SELECT 1 FROM uploads u WHERE u.sop_instance_uid = s.sop_instance_uid"
            " AND u.state != 'PENDING')"
            if require_upload
            else ""
        )
        + ")"
        " ORDER BY status != 'DELETING', created_at LIMIT ?",
        (stored_before, limit),
    ).fetchall()
    return [StoredInstance(**dict(row)) for row in rows]


class Index:
    """pacs.db's SQL for its owner's writer thread."""

    def __init__(self, database: Database) -> None:
        self._database = database
        #: Called inside the transaction that indexes a new instance, to queue what else it
        #: needs in the same commit (uploads to Manage: appliance/uploads.py).
        self.on_stored: Callable[[StoredInstance], None] | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        return self._database.connection

    def get(self, sop_instance_uid: str) -> StoredInstance | None:
        row = self._db.execute(
            "SELECT * FROM stored_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return StoredInstance(**dict(row)) if row else None

    def store(self, instance: StoredInstance, *, replaces: bool = False) -> None:
        """Index a placed instance; with `replaces`, in place of its lost or damaged row (one
        transaction: a failure keeps the old row, which still says what was lost)."""
        with self._database.transaction():
            if replaces:
                self.delete(instance.sop_instance_uid)
            self.insert(instance)
            if self.on_stored is not None:
                self.on_stored(instance)

    def insert(self, instance: StoredInstance) -> None:
        placeholders = ", ".join("?" for _ in _COLUMNS)
        self._db.execute(
            f"INSERT INTO stored_instances ({', '.join(_COLUMNS)}) VALUES ({placeholders})",
            attrs.astuple(instance),
        )

    def add_conflict(self, instance: StoredInstance, conflict_path: str) -> None:
        self._db.execute(
            "INSERT INTO instance_conflicts (sop_instance_uid, conflict_path, file_size,"
            " storage_hash, source_aet, source_address, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                instance.sop_instance_uid,
                conflict_path,
                instance.file_size,
                instance.storage_hash,
                instance.source_aet,
                instance.source_address,
                instance.created_at,
            ),
        )

    def delete(self, sop_instance_uid: str) -> None:
        for table in ("stored_instances", "uploads"):
            self._db.execute(f"DELETE FROM {table} WHERE sop_instance_uid = ?", (sop_instance_uid,))

    def _release(self, column: str, sop_instance_uids: list[str]) -> None:
        self._db.executemany(
            f"UPDATE stored_instances SET {column} = ? WHERE sop_instance_uid = ?"
            f" AND {column} IS NULL",
            [(_utc_now(), uid) for uid in sop_instance_uids],
        )

    def committed(self, sop_instance_uids: list[str]) -> None:
        """Storage commitment confirmed these to a modality (retention may rely on it)."""
        self._release("committed_at", sop_instance_uids)

    def fetched(self, sop_instance_uids: list[str]) -> None:
        """The cloud fetched these whole (image.fetch)."""
        self._release("fetched_at", sop_instance_uids)

    def pixels_checked(self, outcomes: Sequence[tuple[str, str | None]]) -> None:
        """Each (SOP Instance UID, None when every frame decoded, else why not)."""
        self._db.executemany(
            "UPDATE stored_instances SET pixels_state = ?, pixels_error = ?"
            " WHERE sop_instance_uid = ?",
            [(WHOLE if error is None else BROKEN, error, uid) for uid, error in outcomes],
        )

    def retention_candidates(
        self, stored_before: str, require_release: bool, limit: int, require_upload: bool = False
    ) -> list[StoredInstance]:
        return _retention_candidates(
            self._db, stored_before, require_release, limit, require_upload
        )

    def set_status(self, sop_instance_uid: str, status: str) -> None:
        self._db.execute(
            "UPDATE stored_instances SET status = ? WHERE sop_instance_uid = ?",
            (status, sop_instance_uid),
        )

    def instances(self) -> Iterator[StoredInstance]:
        for row in self._db.execute("SELECT * FROM stored_instances ORDER BY created_at"):
            yield StoredInstance(**dict(row))

    def conflicts(self) -> list[sqlite3.Row]:
        return self._db.execute("SELECT * FROM instance_conflicts ORDER BY id").fetchall()

    # --- image pipeline ---------------------------------------------------------------------------

    def pending(self, now: str, limit: int) -> list[StoredInstance]:
        """Instances whose processing is not recorded as done, oldest first, due by `now`."""
        rows = self._db.execute(
            "SELECT * FROM stored_instances WHERE pipeline_state = 'PENDING' AND status = 'STORED'"
            " AND (pipeline_next_at IS NULL OR pipeline_next_at <= ?)"
            " ORDER BY created_at LIMIT ?",
            (now, limit),
        ).fetchall()
        return [StoredInstance(**dict(row)) for row in rows]

    def finish(
        self,
        instance: StoredInstance,
        state: str,
        event_type: str,
        payload: dict[str, Any],
        source_message_id: str | None,
        *,
        thumbnail_path: str | None = None,
        preview_path: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record the pipeline's outcome and its event in one transaction: exactly once."""
        with self._database.transaction() as db:
            updated = db.execute(
                "UPDATE stored_instances SET pipeline_state = ?, thumbnail_path = ?,"
                " preview_path = ?, pipeline_error = ?, pipeline_attempts = pipeline_attempts + 1"
                " WHERE sop_instance_uid = ? AND pipeline_state = 'PENDING'",
                (state, thumbnail_path, preview_path, error, instance.sop_instance_uid),
            ).rowcount
            if updated:  # not already finished by an earlier run
                outbox.record(
                    self._database,
                    event_type,
                    payload,
                    accession_number=instance.accession_number,
                    source_message_id=source_message_id,
                )

    def retry_later(self, sop_instance_uid: str, error: str, next_at: str) -> None:
        self._db.execute(
            "UPDATE stored_instances SET pipeline_attempts = pipeline_attempts + 1,"
            " pipeline_error = ?, pipeline_next_at = ? WHERE sop_instance_uid = ?",
            (error, next_at, sop_instance_uid),
        )

    def last_received(self) -> str | None:
        row = self._db.execute("SELECT max(created_at) FROM stored_instances").fetchone()
        return str(row[0]) if row[0] is not None else None

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM stored_instances").fetchone()[0])

    def remove_test_study(
        self, accession_number: str, study_instance_uid: str, drop_unsent_events: bool
    ) -> list[StoredInstance]:
        """Forget a self-test's instances and study: only those of its accession *and* its
        study. The instances are marked DELETING (their files are the caller's to unlink, then
        their rows to delete); with `drop_unsent_events` its events go too, which nothing would
        ever send."""
        where = "accession_number = ? AND study_instance_uid = ?"
        keys = (accession_number, study_instance_uid)
        with self._database.transaction() as db:
            rows = db.execute(f"SELECT * FROM stored_instances WHERE {where}", keys).fetchall()
            db.execute(f"UPDATE stored_instances SET status = 'DELETING' WHERE {where}", keys)
            db.execute(f"DELETE FROM studies WHERE {where}", keys)
            if drop_unsent_events:
                outbox.drop_undelivered(self._database, accession_number)
        return [StoredInstance(**dict(row)) for row in rows]

    # --- studies ----------------------------------------------------------------------------------

    def _stored(self, where: str, params: tuple[str, ...]) -> list[StoredInstance]:
        """STORED instances matching `where`, oldest first."""
        rows = self._db.execute(
            f"SELECT * FROM stored_instances WHERE status = 'STORED' AND {where}"
            " ORDER BY created_at",
            params,
        ).fetchall()
        return [StoredInstance(**dict(row)) for row in rows]

    def stored_since(self, since: str) -> list[StoredInstance]:
        """STORED instances received since `since`: what study completeness sees."""
        return self._stored("created_at >= ?", (since,))

    def study(self, study_key: str) -> StudyState | None:
        row = self._db.execute("SELECT * FROM studies WHERE study_key = ?", (study_key,)).fetchone()
        return StudyState(**dict(row)) if row else None

    def study_of(self, study_instance_uid: str) -> StudyState | None:
        """The study row for a Study Instance UID (rows of earlier releases are keyed by
        accession number, and one study may have several: an open one first, so that none is
        left open for ever, then the first one made)."""
        row = self._db.execute(
            "SELECT * FROM studies WHERE study_instance_uid = ?"
            " ORDER BY state = 'OPEN' DESC, first_instance_at LIMIT 1",
            (study_instance_uid,),
        ).fetchone()
        return StudyState(**dict(row)) if row else None

    def open_studies(self) -> list[StudyState]:
        rows = self._db.execute("SELECT * FROM studies WHERE state = 'OPEN'").fetchall()
        return [StudyState(**dict(row)) for row in rows]

    def study_instances(self, study_instance_uid: str) -> list[StoredInstance]:
        return self._stored("study_instance_uid = ?", (study_instance_uid,))

    def study_linked(self, study_key: str, accession_number: str) -> None:
        """An accession arrived with a later object of a study that had none."""
        self._db.execute(
            "UPDATE studies SET accession_number = ? WHERE study_key = ?",
            (accession_number, study_key),
        )

    def open_study(self, study: StudyState) -> None:
        self._db.execute(
            "INSERT INTO studies (study_key, accession_number, study_instance_uid, state,"
            " first_instance_at, last_instance_at) VALUES (?, ?, ?, 'OPEN', ?, ?)",
            (
                study.study_key,
                study.accession_number,
                study.study_instance_uid,
                study.first_instance_at,
                study.last_instance_at,
            ),
        )

    def study_grew(self, study_key: str, last_instance_at: str) -> None:
        self._db.execute(
            "UPDATE studies SET last_instance_at = ? WHERE study_key = ?",
            (last_instance_at, study_key),
        )

    def study_transition(
        self,
        study: StudyState,
        event_type: str,
        payload: dict[str, Any],
        source_message_id: str | None,
    ) -> None:
        """Commit a study's new state (from `study`) with its event: never one without the other."""
        completions = 1 if study.state != "OPEN" else 0
        with self._database.transaction() as db:
            db.execute(
                "UPDATE studies SET state = ?, completions = completions + ?, rule = ?,"
                " completed_at = ?, last_instance_at = ? WHERE study_key = ?",
                (
                    study.state,
                    completions,
                    study.rule,
                    study.completed_at,
                    study.last_instance_at,
                    study.study_key,
                ),
            )
            outbox.record(
                self._database,
                event_type,
                payload,
                accession_number=study.accession_number,
                source_message_id=source_message_id,
            )


class IndexReader:
    """Read-only queries on pacs.db for any thread (DICOM handlers, relay fetches, status):
    the database's read-only readers, never the writer's connection."""

    def __init__(self, database: Database, paths: StatePaths) -> None:
        self._database = database
        self._paths = paths

    def select(
        self, where: str, params: Sequence[object] = (), order: str = "created_at"
    ) -> list[sqlite3.Row]:
        with self._database.reader() as db:
            return db.execute(
                f"SELECT * FROM stored_instances WHERE {where} ORDER BY {order}", params
            ).fetchall()

    def instance(self, sop_instance_uid: str) -> sqlite3.Row | None:
        rows = self.select("sop_instance_uid = ?", (sop_instance_uid,))
        return rows[0] if rows else None

    def study(self, study_instance_uid: str) -> list[sqlite3.Row]:
        return self.select("study_instance_uid = ?", (study_instance_uid,))

    def path(self, row: sqlite3.Row) -> Path:
        return self._paths.absolute(row["storage_path"])

    def instances(self, sop_instance_uids: Sequence[str]) -> list[StoredInstance]:
        marks = ",".join("?" * len(sop_instance_uids))
        return [
            StoredInstance(**dict(row))
            for row in self.select(f"sop_instance_uid IN ({marks})", tuple(sop_instance_uids))
        ]

    def upload_outcomes(self, sop_instance_uids: Sequence[str]) -> dict[str, str]:
        """Each instance's upload state (those queued): for `appliance selftest`."""
        marks = ", ".join("?" for _ in sop_instance_uids)
        with self._database.reader() as db:
            rows = db.execute(
                f"SELECT sop_instance_uid, state FROM uploads WHERE sop_instance_uid IN ({marks})",
                tuple(sop_instance_uids),
            ).fetchall()
        return {str(uid): str(state) for uid, state in rows}

    def study_state(self, accession_number: str) -> StudyState | None:
        with self._database.reader() as db:
            row = db.execute(
                "SELECT * FROM studies WHERE accession_number = ?", (accession_number,)
            ).fetchone()
        return StudyState(**dict(row)) if row else None

    def retention_candidates(
        self, stored_before: str, require_release: bool, limit: int, require_upload: bool = False
    ) -> list[StoredInstance]:
        with self._database.reader() as db:
            return _retention_candidates(db, stored_before, require_release, limit, require_upload)

    def all_instances(self) -> list[StoredInstance]:
        return [StoredInstance(**dict(row)) for row in self.select("1")]

    @staticmethod
    def empty_summary() -> dict[str, Any]:
        return {
            "images_today": 0,
            "pipeline_backlog": 0,
            "open_studies": 0,
            "last_image_received": None,
            "uploads": {},
        }

    def summary(self, today: str) -> dict[str, Any]:
        """For `appliance status` and health: images today, pipeline backlog, open studies."""
        with self._database.reader() as db:
            try:
                images = db.execute(
                    "SELECT count(*) FROM stored_instances WHERE created_at >= ?", (today,)
                ).fetchone()[0]
                backlog = db.execute(
                    "SELECT count(*) FROM stored_instances WHERE pipeline_state = 'PENDING'"
                ).fetchone()[0]
                open_studies = db.execute(
                    "SELECT count(*) FROM studies WHERE state = 'OPEN'"
                ).fetchone()[0]
                last = db.execute("SELECT max(created_at) FROM stored_instances").fetchone()[0]
                uploads = dict(
                    db.execute("SELECT state, count(*) FROM uploads GROUP BY state").fetchall()
                )
            except sqlite3.OperationalError:  # tables not created yet
                images = backlog = open_studies = 0
                last = None
                uploads = {}
        return {
            "images_today": images,
            "pipeline_backlog": backlog,
            "open_studies": open_studies,
            "last_image_received": last,
            "uploads": {str(k).lower(): int(v) for k, v in uploads.items()},
        }
