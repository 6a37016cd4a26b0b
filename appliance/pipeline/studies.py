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
from collections.abc import Callable
from typing import Any

import attrs
import trio

from appliance.config import StudiesConfig
from appliance.log import get_logger
from appliance.storage.index import StoredInstance, StudyState
from appliance.storage.store import InstanceStore
from appliance.supervisor import Criticality
from appliance.worklist.store import WorklistStore

log = get_logger("studies")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _age(since: str, now: datetime.datetime) -> float:
    return (now - datetime.datetime.fromisoformat(since)).total_seconds()


class StudyTracker:
    name = "study-tracker"
    criticality = Criticality.AUXILIARY

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

    def statistics(self) -> dict[str, int]:
        return {"open": self.open_studies}

    def notify(self) -> None:
        """Something changed (an instance processed): evaluate now rather than at the next tick."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            self._wake = trio.Event()
            await self._store.write(self.evaluate)
            with trio.move_on_after(self._config.check_interval_s):
                await self._wake.wait()

    # --- evaluation (runs in pacs.db's writer thread, through the store's index) ----------------

    def evaluate(self) -> None:
        index = self._store.index
        now = self._now()
        lookback = max(self._config.timeout_s * 2, 86400.0)
        since = (now - datetime.timedelta(seconds=lookback)).isoformat(timespec="milliseconds")
        studies: dict[str, list[StoredInstance]] = {}
        for instance in index.stored_since(since):
            key = instance.accession_number or f"uid:{instance.study_instance_uid}"
            studies.setdefault(key, []).append(instance)
        open_count = 0
        for key, instances in studies.items():
            if self._track(key, instances, now) == "OPEN":
                open_count += 1
        self.open_studies = open_count

    def _track(self, key: str, instances: list[StoredInstance], now: datetime.datetime) -> str:
        index = self._store.index
        first, last = instances[0].created_at, instances[-1].created_at
        study = index.study(key)
        if study is None:
            study = StudyState(
                study_key=key,
                accession_number=instances[0].accession_number,
                study_instance_uid=instances[0].study_instance_uid,
                state="OPEN",
                first_instance_at=first,
                last_instance_at=last,
            )
            index.open_study(study)
        elif study.state != "OPEN" and study.completed_at and last > study.completed_at:
            completed_at = study.completed_at
            late = [i.sop_instance_uid for i in instances if i.created_at > completed_at]
            reopened = attrs.evolve(study, state="OPEN", last_instance_at=last)
            index.study_transition(
                reopened,
                "study.amended",
                {"late_instances": late, "previous_rule": study.rule},
                None,
            )
            study = reopened
        elif study.state == "OPEN" and last != study.last_instance_at:
            index.study_grew(key, last)
            study = attrs.evolve(study, last_instance_at=last)
        if study.state != "OPEN":
            return study.state
        return self._decide(study, instances, last, now)

    def _decide(
        self,
        study: StudyState,
        instances: list[StoredInstance],
        last: str,
        now: datetime.datetime,
    ) -> str:
        processed = {i.sop_instance_uid: i for i in instances if i.pipeline_state != "PENDING"}
        if len(processed) < len(instances):
            return "OPEN"  # thumbnails still being made: the study is not safe and shown yet
        accession = study.accession_number
        item = self._worklist.get(accession) if accession else None
        expected = set(
            self._config.views_by_procedure.get(
                item.procedure_code_value if item else "", self._config.expected_views
            )
        )
        found = {f"{i.image_laterality or ''}{i.view_position or ''}" for i in instances}
        mpps = self._worklist.mpps.latest(accession) if accession else None
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
        payload: dict[str, Any] = {
            "accession_number": accession,
            "study_instance_uid": study.study_instance_uid,
            "rule": rule,
            "instances": sorted(processed),
            "views_found": sorted(found & expected) + sorted(found - expected),
            "views_missing": sorted(expected - found),
            "mpps_instance_uid": mpps[1] if mpps else None,
            "first_instance_at": study.first_instance_at,
            "last_instance_at": last,
            "seconds_first_to_complete": round(_age(study.first_instance_at, now), 1),
            "test": bool(item and item.is_test),
        }
        finished = attrs.evolve(
            study,
            state=state,
            rule=rule,
            completed_at=now.isoformat(timespec="milliseconds"),
            last_instance_at=last,
        )
        self._store.index.study_transition(
            finished, event_type, payload, item.source_message_id if item else None
        )
        log.info(event_type, accession_number=accession, rule=rule, instances=len(processed))
        return state
