"""Events for the cloud and the outbox that drains them: this module owns the `events` table.

Each database has an `events` table. The store that owns the database records an event inside
the transaction that makes the change it reports (`record`), so a change and its event commit
together or not at all; MPPS and worklist events live in worklist.db, image and study events in
pacs.db. The Outbox reads both through read-only readers, merges them by occurrence time (each
database's own order kept, so a study's events leave in the order they happened), and marks an
event delivered through its database's writer. A committed event wakes the sender at once.

Every event has a stable `event_id` (UUID) so the cloud can drop duplicates of an
at-least-once delivery.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import json
import sqlite3
import uuid
from typing import Any

import attrs
import trio

from appliance.db import Database
from appliance.supervisor import Criticality

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


def _now() -> str:
    # Microseconds: events of the two databases are merged by this, and one study's events
    # can commit within the same millisecond.
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def _notify(database: Database) -> None:
    for listener in database.event_listeners:
        listener()


def record(
    database: Database,
    event_type: str,
    payload: dict[str, Any],
    *,
    accession_number: str | None,
    source_message_id: str | None,
) -> str:
    """Insert an event; call inside the owner's transaction that makes the change it reports."""
    event_id = str(uuid.uuid4())
    database.connection.execute(
        "INSERT INTO events (event_id, event_type, occurred_at, accession_number,"
        " source_message_id, payload) VALUES (?, ?, ?, ?, ?, ?)",
        (
            event_id,
            event_type,
            _now(),
            accession_number,
            source_message_id,
            json.dumps(payload, sort_keys=True),
        ),
    )
    database.after_commit(lambda: _notify(database))
    return event_id


def _decoded(rows: list[sqlite3.Row]) -> list[dict[str, Any]]:
    return [dict(row) | {"payload": json.loads(row["payload"])} for row in rows]


def events_of(db: sqlite3.Connection, accession_number: str | None = None) -> list[dict[str, Any]]:
    """Every event of one database (optionally of one accession), oldest first; any connection."""
    if accession_number is None:
        rows = db.execute("SELECT * FROM events ORDER BY seq").fetchall()
    else:
        rows = db.execute(
            "SELECT * FROM events WHERE accession_number = ? ORDER BY seq", (accession_number,)
        ).fetchall()
    return _decoded(rows)


def undelivered_of(db: sqlite3.Connection) -> tuple[int, str | None]:
    """How many events of one database wait for the cloud, and when the oldest occurred."""
    try:
        count, oldest = db.execute(
            "SELECT count(*), min(occurred_at) FROM events WHERE delivered_at IS NULL"
        ).fetchone()
    except sqlite3.OperationalError:  # a database created before its tables
        return 0, None
    return count, oldest


def drop_undelivered(database: Database, accession_number: str) -> int:
    """Inside the owner's transaction: events of an accession that must never be sent (a
    self-test's, with no relay to send them)."""
    return database.connection.execute(
        "DELETE FROM events WHERE accession_number = ? AND delivered_at IS NULL",
        (accession_number,),
    ).rowcount


#: SQL condition on a `stored_instances s` row: an image event about it still waits for the
#: cloud's ack (retention keeps such an image; delivered events may have been purged since).
IMAGE_EVENT_UNDELIVERED = (
    "EXISTS (SELECT 1 FROM events e WHERE e.delivered_at IS NULL"
    " AND e.event_type IN ('image.received', 'image.failed')"
    " AND json_extract(e.payload, '$.sop_instance_uid') = s.sop_instance_uid)"
)


@attrs.frozen
class OutboxEvent:
    source: str  # "worklist" or "images"
    event_id: str
    event_type: str
    occurred_at: str
    source_message_id: str | None
    payload: dict[str, Any]

    def envelope(self, appliance_id: str) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "occurred_at": self.occurred_at,
            "appliance_id": appliance_id,
            "source_message_id": self.source_message_id,
            "payload": self.payload,
        }


class Outbox:
    """Synchronous and thread-safe (reads on readers, writes queued to each owner's writer);
    call it from a worker thread. `wait_for_events` is the one async method."""

    def __init__(self, sources: dict[str, Database]) -> None:
        self._sources = sources
        self._token: trio.lowlevel.TrioToken | None = None
        self._committed = trio.Event()
        for database in sources.values():
            database.event_listeners.append(self._wake)

    # --- waking the sender ------------------------------------------------------------------------

    def listen(self) -> None:
        """From the Trio thread, before the first look at `pending`: commits wake it from now."""
        self._token = trio.lowlevel.current_trio_token()

    def _wake(self) -> None:  # a writer thread, after COMMIT
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._committed.set)

    async def wait_for_events(self) -> None:
        """Return when an event has committed since the last return (callers bound the wait
        with their own cancel scope)."""
        await self._committed.wait()
        self._committed = trio.Event()

    # --- reads ------------------------------------------------------------------------------------

    def pending(self, limit: int = 50) -> list[OutboxEvent]:
        streams = []
        for source, database in self._sources.items():
            with database.reader() as db:
                rows = db.execute(
                    "SELECT * FROM events WHERE delivered_at IS NULL ORDER BY seq LIMIT ?",
                    (limit,),
                ).fetchall()
            streams.append(
                [
                    OutboxEvent(
                        source,
                        row["event_id"],
                        row["event_type"],
                        row["occurred_at"],
                        row["source_message_id"],
                        row["payload"],
                    )
                    for row in _decoded(rows)
                ]
            )
        merged = heapq.merge(*streams, key=lambda event: event.occurred_at)
        return list(merged)[:limit]

    def listing(self, include_delivered: bool = False) -> list[dict[str, Any]]:
        rows = []
        for source, database in self._sources.items():
            with database.reader() as db:
                for row in events_of(db):
                    if include_delivered or row["delivered_at"] is None:
                        rows.append(row | {"source": source})
        return sorted(rows, key=lambda row: row["occurred_at"])

    def undelivered(self) -> tuple[int, str | None]:
        total, oldest = 0, []
        for database in self._sources.values():
            if not database.exists:
                continue
            with database.reader() as db:
                count, first = undelivered_of(db)
            total += count
            oldest += [first] if first else []
        return total, min(oldest) if oldest else None

    # --- writes, each through its database's writer -----------------------------------------------

    def delivered(self, event: OutboxEvent) -> None:
        database = self._sources[event.source]

        def mark() -> None:
            database.connection.execute(
                "UPDATE events SET delivered_at = ? WHERE event_id = ? AND delivered_at IS NULL",
                (_now(), event.event_id),
            )

        database.run_sync(mark)

    def retry(self, event_id: str | None) -> int:
        """`appliance outbox retry`: send again (every delivered event when event_id is None)."""

        def unmark(database: Database) -> int:
            if event_id is None:
                return database.connection.execute("UPDATE events SET delivered_at = NULL").rowcount
            return database.connection.execute(
                "UPDATE events SET delivered_at = NULL WHERE event_id = ?", (event_id,)
            ).rowcount

        return sum(database.run_sync(unmark, database) for database in self._sources.values())

    def purge(self, before: str) -> int:
        """Delete events delivered before `before` (ISO 8601, UTC); undelivered ones never."""

        def delete(database: Database) -> int:
            return database.connection.execute(
                "DELETE FROM events WHERE delivered_at IS NOT NULL AND delivered_at < ?", (before,)
            ).rowcount

        return sum(database.run_sync(delete, database) for database in self._sources.values())


class LocalRecord:
    """The outbox under a cloud that takes no events (profile manage: images go by HTTPS
    upload, appliance/uploads.py): events are kept as the local record, marked delivered as
    they commit (so retention and status do not wait for a consumer that never comes) and
    purged after the configured days, like delivered events."""

    name = "outbox-local-record"
    criticality = Criticality.AUXILIARY

    def __init__(self, outbox: Outbox, retention_days: float) -> None:
        self._outbox = outbox
        self._retention = retention_days * 86400

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._outbox.listen()
        task_status.started()
        next_purge = trio.current_time()
        while True:
            while events := await trio.to_thread.run_sync(self._outbox.pending, 200):
                for event in events:
                    await trio.to_thread.run_sync(self._outbox.delivered, event)
            if trio.current_time() >= next_purge:
                cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
                    seconds=self._retention
                )
                await trio.to_thread.run_sync(
                    self._outbox.purge, cutoff.isoformat(timespec="milliseconds")
                )
                next_purge = trio.current_time() + 3600
            with trio.move_on_after(60):
                await self._outbox.wait_for_events()
