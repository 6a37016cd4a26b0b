"""Domain events for the cloud: one `events` table per database, written in the same
transaction as the state change that causes them (the relay outbox drains them in order).

Every event has a stable `event_id` (UUID) so the cloud can drop duplicates of an
at-least-once delivery.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import uuid
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id          TEXT NOT NULL UNIQUE,
    event_type        TEXT NOT NULL,
    occurred_at       TEXT NOT NULL,
    accession_number  TEXT,
    source_message_id TEXT,
    payload           TEXT NOT NULL,
    delivered_at      TEXT
);
"""


def insert(
    db: sqlite3.Connection,
    event_type: str,
    payload: dict[str, Any],
    *,
    accession_number: str | None,
    source_message_id: str | None,
) -> str:
    """Insert an event; call inside the transaction that makes the change it reports."""
    event_id = str(uuid.uuid4())
    db.execute(
        "INSERT INTO events (event_id, event_type, occurred_at, accession_number,"
        " source_message_id, payload) VALUES (?, ?, ?, ?, ?, ?)",
        (
            event_id,
            event_type,
            datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            accession_number,
            source_message_id,
            json.dumps(payload, sort_keys=True),
        ),
    )
    return event_id


def read_all(db: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = db.execute("SELECT * FROM events ORDER BY seq").fetchall()
    return [dict(row) | {"payload": json.loads(row["payload"])} for row in rows]


def undelivered(db: sqlite3.Connection) -> tuple[int, str | None]:
    """How many events wait for the cloud, and when the oldest of them occurred."""
    count, oldest = db.execute(
        "SELECT count(*), min(occurred_at) FROM events WHERE delivered_at IS NULL"
    ).fetchone()
    return count, oldest


def undelivered_batch(db: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT * FROM events WHERE delivered_at IS NULL ORDER BY seq LIMIT ?", (limit,)
    ).fetchall()
    return [dict(row) | {"payload": json.loads(row["payload"])} for row in rows]


def mark_delivered(db: sqlite3.Connection, event_id: str) -> None:
    db.execute(
        "UPDATE events SET delivered_at = ? WHERE event_id = ? AND delivered_at IS NULL",
        (datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"), event_id),
    )


def mark_undelivered(db: sqlite3.Connection, event_id: str | None) -> int:
    """`appliance outbox retry`: send again (all delivered events when event_id is None)."""
    if event_id is None:
        return db.execute("UPDATE events SET delivered_at = NULL").rowcount
    return db.execute(
        "UPDATE events SET delivered_at = NULL WHERE event_id = ?", (event_id,)
    ).rowcount


def purge_delivered(db: sqlite3.Connection, before: str) -> int:
    return db.execute(
        "DELETE FROM events WHERE delivered_at IS NOT NULL AND delivered_at < ?", (before,)
    ).rowcount
