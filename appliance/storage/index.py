"""The SQLite index of stored instances (`pacs.db`).

Synchronous and not thread-safe on its own: the InstanceStore is its one writer and serialises
every call through a single-thread limiter. WAL lets status readers use their own connections.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
from attrs import frozen

from appliance import events
from appliance.db import connect
from appliance.storage.layout import StorageLayout

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
RELEASE_COLUMNS = [
    ("committed_at", "TEXT"),  # UTC: storage commitment confirmed it to a modality
    ("fetched_at", "TEXT"),  # UTC: the cloud fetched it whole (image.fetch)
]

SCHEMA = (
    events.SCHEMA
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


_COLUMNS = [a.name for a in attrs.fields(StoredInstance)]


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


class Index:
    def __init__(self, path: Path) -> None:
        self._db = connect(path)
        self._db.executescript(SCHEMA)
        present = {row["name"] for row in self._db.execute("PRAGMA table_info(stored_instances)")}
        for name, declaration in PIPELINE_COLUMNS + RELEASE_COLUMNS:
            if name not in present:
                self._db.execute(f"ALTER TABLE stored_instances ADD COLUMN {name} {declaration}")
        self._db.execute(
            "CREATE INDEX IF NOT EXISTS stored_instances_pipeline"
            " ON stored_instances (pipeline_state, pipeline_next_at)"
        )

    def close(self) -> None:
        self._db.close()

    def get(self, sop_instance_uid: str) -> StoredInstance | None:
        row = self._db.execute(
            "SELECT * FROM stored_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        ).fetchone()
        return StoredInstance(**dict(row)) if row else None

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
        self._db.execute(
            "DELETE FROM stored_instances WHERE sop_instance_uid = ?", (sop_instance_uid,)
        )

    def released(self, column: str, sop_instance_uids: list[str]) -> None:
        """Record that storage commitment (`committed_at`) or the cloud (`fetched_at`) has them."""
        if column not in dict(RELEASE_COLUMNS):
            raise ValueError(column)
        self._db.executemany(
            f"UPDATE stored_instances SET {column} = ? WHERE sop_instance_uid = ?"
            f" AND {column} IS NULL",
            [(_utc_now(), uid) for uid in sop_instance_uids],
        )

    def retention_candidates(
        self, stored_before: str, require_release: bool, limit: int
    ) -> list[StoredInstance]:
        """Images retention may delete, oldest first: stored before the cut-off, processed, and
        with no image event still waiting for the cloud's ack (delivered events may have been
        purged since, undelivered ones never are). Rows left half-deleted come first."""
        released = "AND (committed_at IS NOT NULL OR fetched_at IS NOT NULL)"
        rows = self._db.execute(
            "SELECT * FROM stored_instances s WHERE status = 'DELETING' OR (created_at < ?"
            " AND pipeline_state IN ('DONE', 'FAILED') "
            + (released if require_release else "")
            + " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.delivered_at IS NULL"
            " AND e.event_type IN ('image.received', 'image.failed')"
            " AND json_extract(e.payload, '$.sop_instance_uid') = s.sop_instance_uid))"
            " ORDER BY status != 'DELETING', created_at LIMIT ?",
            (stored_before, limit),
        ).fetchall()
        return [StoredInstance(**dict(row)) for row in rows]

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
        payload: dict,
        source_message_id: str | None,
        *,
        thumbnail_path: str | None = None,
        preview_path: str | None = None,
        error: str | None = None,
    ) -> None:
        """Record the pipeline's outcome and its event in one transaction: exactly once."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            updated = self._db.execute(
                "UPDATE stored_instances SET pipeline_state = ?, thumbnail_path = ?,"
                " preview_path = ?, pipeline_error = ?, pipeline_attempts = pipeline_attempts + 1"
                " WHERE sop_instance_uid = ? AND pipeline_state = 'PENDING'",
                (state, thumbnail_path, preview_path, error, instance.sop_instance_uid),
            ).rowcount
            if updated:  # not already finished by an earlier run
                events.insert(
                    self._db,
                    event_type,
                    payload,
                    accession_number=instance.accession_number,
                    source_message_id=source_message_id,
                )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def retry_later(self, sop_instance_uid: str, error: str, next_at: str) -> None:
        self._db.execute(
            "UPDATE stored_instances SET pipeline_attempts = pipeline_attempts + 1,"
            " pipeline_error = ?, pipeline_next_at = ? WHERE sop_instance_uid = ?",
            (error, next_at, sop_instance_uid),
        )

    def events(self) -> list[dict]:
        return events.read_all(self._db)

    def undelivered_events(self) -> tuple[int, str | None]:
        return events.undelivered(self._db)

    def last_received(self) -> str | None:
        return self._db.execute("SELECT max(created_at) FROM stored_instances").fetchone()[0]

    @property
    def db(self) -> sqlite3.Connection:
        """The write connection, for the study tracker, which runs in this index's writer."""
        return self._db

    def count(self) -> int:
        return self._db.execute("SELECT count(*) FROM stored_instances").fetchone()[0]


class IndexReader:
    """Read-only queries on the index for any thread (DICOM handlers, relay fetches): a
    connection of its own per call, never the writer's."""

    def __init__(self, layout: StorageLayout) -> None:
        self._layout = layout

    def select(
        self, where: str, params: Sequence[object] = (), order: str = "created_at"
    ) -> list[sqlite3.Row]:
        db = sqlite3.connect(f"file:{self._layout.index_path}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=10000")
            return db.execute(
                f"SELECT * FROM stored_instances WHERE {where} ORDER BY {order}", params
            ).fetchall()
        finally:
            db.close()

    def instance(self, sop_instance_uid: str) -> sqlite3.Row | None:
        rows = self.select("sop_instance_uid = ?", (sop_instance_uid,))
        return rows[0] if rows else None

    def study(self, study_instance_uid: str) -> list[sqlite3.Row]:
        return self.select("study_instance_uid = ?", (study_instance_uid,))

    def path(self, row: sqlite3.Row) -> Path:
        return self._layout.absolute(row["storage_path"])
