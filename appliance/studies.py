"""Study completeness, from what the modality tells us rather than from a timer.

A study (keyed by accession number, else Study Instance UID) is complete when, in order:
1. its MPPS is COMPLETED and every instance the MPPS lists is stored and processed (rule "mpps");
2. without a completed MPPS, the expected views are in (screening: RCC, LCC, RMLO, LMLO, or per
   procedure code) and nothing new has arrived for the quiet period (rule "views");
3. as a last resort, nothing new has arrived for the timeout (rule "timeout").
A DISCONTINUED MPPS ends it as `study.discontinued`. An image arriving after the end re-opens it
(`study.amended`) and it completes again. State lives in pacs.db next to the instances, and each
transition commits with its event, so a restart neither loses nor repeats a completion.
"""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Callable
from typing import Any

import trio

from appliance import events
from appliance.config import StudiesConfig
from appliance.log import get_logger
from appliance.storage.store import InstanceStore
from appliance.worklist.store import WorklistStore

log = get_logger("studies")

SCHEMA = """
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
"""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _age(since: str, now: datetime.datetime) -> float:
    return (now - datetime.datetime.fromisoformat(since)).total_seconds()


class StudyTracker:
    name = "study-tracker"

    def __init__(
        self,
        store: InstanceStore,
        worklist: WorklistStore,
        config: StudiesConfig,
        now: Callable[[], datetime.datetime] = _now,
    ) -> None:
        self._store = store
        self._worklist = worklist
        self._config = config
        self._now = now
        self._wake = trio.Event()
        self.open_studies = 0

    def notify(self) -> None:
        """Something changed (an instance processed): evaluate now rather than at the next tick."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self._store.write(lambda: self._store.index.db.executescript(SCHEMA))
        task_status.started()
        while True:
            self._wake = trio.Event()
            await self._store.write(self.evaluate)
            with trio.move_on_after(self._config.check_interval_s):
                await self._wake.wait()

    # --- evaluation (runs in the index's writer thread) -----------------------------------------

    def evaluate(self) -> None:
        db = self._store.index.db
        now = self._now()
        lookback = max(self._config.timeout_s * 2, 86400.0)
        since = (now - datetime.timedelta(seconds=lookback)).isoformat(timespec="milliseconds")
        rows = db.execute(
            "SELECT * FROM stored_instances WHERE status = 'STORED' AND created_at >= ?"
            " ORDER BY created_at",
            (since,),
        ).fetchall()
        studies: dict[str, list[sqlite3.Row]] = {}
        for row in rows:
            key = row["accession_number"] or f"uid:{row['study_instance_uid']}"
            studies.setdefault(key, []).append(row)
        open_count = 0
        for key, instances in studies.items():
            if self._track(db, key, instances, now) == "OPEN":
                open_count += 1
        self.open_studies = open_count

    def _track(self, db: sqlite3.Connection, key: str, instances: list, now) -> str:
        first, last = instances[0]["created_at"], instances[-1]["created_at"]
        study = db.execute("SELECT * FROM studies WHERE study_key = ?", (key,)).fetchone()
        accession = instances[0]["accession_number"]
        if study is None:
            db.execute(
                "INSERT INTO studies (study_key, accession_number, study_instance_uid, state,"
                " first_instance_at, last_instance_at) VALUES (?, ?, ?, 'OPEN', ?, ?)",
                (key, accession, instances[0]["study_instance_uid"], first, last),
            )
            study = db.execute("SELECT * FROM studies WHERE study_key = ?", (key,)).fetchone()
        elif study["state"] != "OPEN" and last > study["completed_at"]:
            late = [
                i["sop_instance_uid"] for i in instances if i["created_at"] > study["completed_at"]
            ]
            self._transition(
                db,
                study,
                "OPEN",
                "study.amended",
                None,
                {"late_instances": late, "previous_rule": study["rule"]},
                last_instance_at=last,
            )
            study = db.execute("SELECT * FROM studies WHERE study_key = ?", (key,)).fetchone()
        elif study["state"] == "OPEN" and last != study["last_instance_at"]:
            db.execute("UPDATE studies SET last_instance_at = ? WHERE study_key = ?", (last, key))
        if study["state"] != "OPEN":
            return study["state"]
        return self._decide(db, study, instances, last, now)

    def _decide(self, db, study: sqlite3.Row, instances: list, last: str, now) -> str:
        processed = {
            i["sop_instance_uid"]: i for i in instances if i["pipeline_state"] != "PENDING"
        }
        if len(processed) < len(instances):
            return "OPEN"  # thumbnails still being made: the study is not safe and shown yet
        item = self._worklist.get(study["accession_number"]) if study["accession_number"] else None
        expected = set(
            self._config.views_by_procedure.get(
                item.procedure_code_value if item else "", self._config.expected_views
            )
        )
        found = {f"{i['image_laterality'] or ''}{i['view_position'] or ''}" for i in instances}
        mpps = (
            self._worklist.latest_mpps(study["accession_number"])
            if study["accession_number"]
            else None
        )
        quiet = _age(last, now)
        rule, state, event_type = None, "COMPLETE", "study.complete"
        if mpps and mpps[0] == "DISCONTINUED":
            rule, state, event_type = "mpps-discontinued", "DISCONTINUED", "study.discontinued"
        elif mpps and mpps[0] == "COMPLETED" and mpps[2]:
            if not set(mpps[2]) <= processed.keys():
                return "OPEN"  # the modality says more is coming
            rule = "mpps"
        elif expected <= found and quiet >= self._config.quiet_period_s:
            rule = "views"
        elif quiet >= self._config.timeout_s:
            rule = "timeout"
        if rule is None:
            return "OPEN"
        payload = {
            "accession_number": study["accession_number"],
            "study_instance_uid": study["study_instance_uid"],
            "rule": rule,
            "instances": sorted(processed),
            "views_found": sorted(found & expected) + sorted(found - expected),
            "views_missing": sorted(expected - found),
            "mpps_instance_uid": mpps[1] if mpps else None,
            "first_instance_at": study["first_instance_at"],
            "last_instance_at": last,
            "seconds_first_to_complete": round(_age(study["first_instance_at"], now), 1),
            "test": bool(item and item.is_test),
        }
        self._transition(
            db,
            study,
            state,
            event_type,
            item.source_message_id if item else None,
            payload,
            rule=rule,
            completed_at=now.isoformat(timespec="milliseconds"),
            last_instance_at=last,
        )
        log.info(
            event_type,
            accession_number=study["accession_number"],
            rule=rule,
            instances=len(processed),
        )
        return state

    def _transition(
        self,
        db,
        study: sqlite3.Row,
        state: str,
        event_type: str,
        source_message_id: str | None,
        payload: dict[str, Any],
        **changes: Any,
    ) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            assignments = ", ".join(f"{column} = ?" for column in changes)
            completions = 1 if state != "OPEN" else 0
            db.execute(
                f"UPDATE studies SET state = ?, completions = completions + ?"
                f"{', ' + assignments if assignments else ''} WHERE study_key = ?",
                (state, completions, *changes.values(), study["study_key"]),
            )
            events.insert(
                db,
                event_type,
                payload,
                accession_number=study["accession_number"],
                source_message_id=source_message_id,
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
