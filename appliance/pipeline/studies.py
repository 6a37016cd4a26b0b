"""Study completeness, from what the modality tells us rather than from a timer.

A study is its Study Instance UID (an accession number, from any of its objects, links it to
the worklist item and the MPPS; objects without one are still the same study). It is complete
when, in order:
1. its MPPS is COMPLETED and every instance the MPPS lists for this gateway is stored and
   processed (rule "mpps"); instances whose series names another Retrieve AE Title were sent
   elsewhere and are never waited for;
2. the expected views are in (screening: RCC, LCC, RMLO, LMLO, or per procedure code) and
   nothing new has arrived for the quiet period (rule "views"), whether or not an MPPS listed
   instances that never came (named in the event);
3. as a last resort, nothing new has arrived for the timeout (rule "timeout"), naming what is
   missing: no study stays open past it, not even one whose thumbnails are still pending.
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
from appliance.worklist.mpps import performed_instances
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
        ae_title: str | None = None,
    ) -> None:
        #: This gateway's storage AE title: MPPS series with another Retrieve AE went there.
        self._ae_title = ae_title
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
        # Every study with news in the window, whole (a late image joins all its study's
        # instances, not only those of the window), and every study still open, however old
        # (the appliance was off): none may stay open past the timeout.
        uids = {instance.study_instance_uid for instance in index.stored_since(since)}
        open_count = 0
        for study in index.open_studies():
            uid = study.study_instance_uid
            if uid and uid not in uids and not index.study_instances(uid):
                if self._close_empty(study, now) == "OPEN":
                    open_count += 1
            elif uid:
                uids.add(uid)
        for uid in uids:
            instances = index.study_instances(uid)
            if instances and self._track(uid, instances, now) == "OPEN":
                open_count += 1
        self.open_studies = open_count

    def _close_empty(self, study: StudyState, now: datetime.datetime) -> str:
        """An open study none of whose instances is stored any more (found missing or corrupt
        by a scrub, deleted): closed by the timeout, saying so."""
        if _age(study.last_instance_at, now) < self._config.timeout_s:
            return "OPEN"
        finished = attrs.evolve(
            study,
            state="COMPLETE",
            rule="timeout",
            completed_at=now.isoformat(timespec="milliseconds"),
        )
        payload: dict[str, Any] = {
            "accession_number": study.accession_number,
            "study_instance_uid": study.study_instance_uid,
            "rule": "timeout",
            "instances": [],
            "reason": "no instance of the study is stored any more",
            "first_instance_at": study.first_instance_at,
            "last_instance_at": study.last_instance_at,
        }
        self._store.index.study_transition(finished, "study.complete", payload, None)
        log.warning(
            "study.complete", accession_number=study.accession_number, rule="timeout", instances=0
        )
        return "COMPLETE"

    def _track(self, uid: str, instances: list[StoredInstance], now: datetime.datetime) -> str:
        index = self._store.index
        first, last = instances[0].created_at, instances[-1].created_at
        accession = next((i.accession_number for i in instances if i.accession_number), None)
        study = index.study_of(uid)
        if study is None:
            study = StudyState(
                study_key=f"uid:{uid}",
                accession_number=accession,
                study_instance_uid=uid,
                state="OPEN",
                first_instance_at=first,
                last_instance_at=last,
            )
            index.open_study(study)
        elif study.accession_number is None and accession:
            index.study_linked(study.study_key, accession)
            study = attrs.evolve(study, accession_number=accession)
        if study.state != "OPEN" and study.completed_at and last > study.completed_at:
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
            index.study_grew(study.study_key, last)
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
        unprocessed = sorted(i.sop_instance_uid for i in instances if i.pipeline_state == "PENDING")
        quiet = _age(last, now)
        timed_out = quiet >= self._config.timeout_s
        if unprocessed and not timed_out:
            return "OPEN"  # thumbnails still being made: the study is not safe and shown yet
        accession = study.accession_number
        # One study may carry several accessions (the group case, or two requested
        # procedures imaged together): every one is linked, and the MPPS of any of them counts.
        linked = {i.accession_number for i in instances} | {accession}
        accessions = sorted(a for a in linked if a)
        item = self._worklist.get(accession) if accession else None
        expected = set(
            self._config.views_by_procedure.get(
                item.procedure_code_value if item else "", self._config.expected_views
            )
        )
        found = {f"{i.image_laterality or ''}{i.view_position or ''}" for i in instances}
        mpps = next((m for m in map(self._worklist.mpps.latest, accessions) if m is not None), None)
        performed = performed_instances(mpps.attributes, self._ae_title) if mpps else None
        # What arrived here counts as here whatever Retrieve AE Title the unit wrote (some name
        # themselves or the PACS); only what never arrived is elsewhere or missing.
        received = {i.sop_instance_uid for i in instances}
        listed_here = (
            set(performed.here) | (set(performed.elsewhere) & received) if performed else set()
        )
        elsewhere = set(performed.elsewhere) - received if performed else set()
        listed_missing = sorted(listed_here - processed.keys())
        rule, state, event_type = None, "COMPLETE", "study.complete"
        if mpps and mpps.status == "DISCONTINUED":
            rule, state, event_type = "mpps-discontinued", "DISCONTINUED", "study.discontinued"
        elif (
            mpps
            and mpps.status == "COMPLETED"
            and listed_here
            and not (listed_missing or unprocessed)
        ):
            rule = "mpps"
        elif expected <= found and quiet >= self._config.quiet_period_s and not unprocessed:
            rule = "views"
        elif timed_out:
            rule = "timeout"
        if rule is None:
            return "OPEN"
        payload: dict[str, Any] = {
            "accession_number": accession,
            "accession_numbers": accessions,
            "study_instance_uid": study.study_instance_uid,
            "rule": rule,
            "instances": sorted(processed),
            "views_found": sorted(found & expected) + sorted(found - expected),
            "views_missing": sorted(expected - found),
            "mpps_instance_uid": mpps.sop_instance_uid if mpps else None,
            # Listed by the MPPS for this gateway but never received / sent to other AEs.
            "instances_missing": listed_missing,
            "instances_elsewhere": sorted(elsewhere),
            "instances_unprocessed": unprocessed,
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
        log.info(
            event_type,
            accession_number=accession,
            rule=rule,
            instances=len(processed),
            missing=len(listed_missing) + len(expected - found),
        )
        return state
