"""The outbox: undelivered events of both databases, in the order they occurred.

MPPS and worklist events live in worklist.db, image events in pacs.db, each inserted in the
transaction that made the change. The outbox merges them by occurrence time (each database's
own order kept), so a study's events leave in the order they happened.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Callable
from typing import Any

import attrs

from appliance import events


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
    """Synchronous; run its methods in a worker thread. `connect` opens a fresh connection per
    call so the outbox never shares a connection with the stores' writers."""

    def __init__(self, databases: dict[str, Callable[[], sqlite3.Connection]]) -> None:
        self._databases = databases

    def _each(self):
        for source, connect in self._databases.items():
            db = connect()
            try:
                yield source, db
            finally:
                db.close()

    def pending(self, limit: int = 50) -> list[OutboxEvent]:
        streams = []
        for source, db in self._each():
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
                    for row in events.undelivered_batch(db, limit)
                ]
            )
        merged = heapq.merge(*streams, key=lambda event: event.occurred_at)
        return list(merged)[:limit]

    def delivered(self, event: OutboxEvent) -> None:
        db = self._databases[event.source]()
        try:
            events.mark_delivered(db, event.event_id)
        finally:
            db.close()

    def listing(self, include_delivered: bool = False) -> list[dict[str, Any]]:
        rows = []
        for source, db in self._each():
            for row in events.read_all(db):
                if include_delivered or row["delivered_at"] is None:
                    rows.append(row | {"source": source})
        return sorted(rows, key=lambda row: row["occurred_at"])

    def retry(self, event_id: str | None) -> int:
        return sum(events.mark_undelivered(db, event_id) for _, db in self._each())

    def purge(self, before: str) -> int:
        return sum(events.purge_delivered(db, before) for _, db in self._each())
