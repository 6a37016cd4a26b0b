"""Study completeness on a controlled clock: what only days of time would show (a late image
after the look-back window, a study whose instances are gone, two accessions in one study)."""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path
from typing import Any

import pytest

from appliance.config import StudiesConfig
from appliance.pipeline.studies import StudyTracker
from appliance.state import StatePaths
from appliance.storage.index import StoredInstance
from appliance.storage.store import InstanceStore
from appliance.worklist.store import WorklistItem, WorklistStore

T0 = datetime.datetime(2026, 11, 22, 10, tzinfo=datetime.UTC)
MINUTE = datetime.timedelta(minutes=1)
FOUR_VIEWS = [("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")]


class Site:
    def __init__(self, root: Path) -> None:
        state = root / "state"
        state.mkdir()
        paths = StatePaths(state)
        self.worklist = WorklistStore(paths)
        self.worklist.open()
        self.store = InstanceStore(paths)
        self.store.open()
        self.now = T0
        self.tracker = StudyTracker(
            self.store,
            self.worklist,
            StudiesConfig(quiet_period_s=60, timeout_s=1800),
            now=lambda: self.now,
            ae_title="GW",
        )
        self._numbers = itertools.count()

    def image(self, study: str, accession: str | None, view: tuple[str, str], at) -> str:
        n = next(self._numbers)
        self.store.index.insert(
            StoredInstance(
                sop_instance_uid=f"1.2.9.{n}",
                storage_path=f"x/{n}",
                file_size=1,
                storage_hash="h",
                study_instance_uid=study,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                created_at=at.isoformat(timespec="milliseconds"),
                accession_number=accession,
                image_laterality=view[0],
                view_position=view[1],
                pipeline_state="DONE",
            )
        )
        return f"1.2.9.{n}"

    def at(self, moment: datetime.datetime) -> None:
        self.now = moment
        self.tracker.evaluate()

    def events(self) -> list[dict[str, Any]]:
        return [e for e in self.store.events() if e["event_type"].startswith("study.")]


@pytest.fixture
def site(tmp_path: Path):
    found = Site(tmp_path)
    yield found
    found.store.close()
    found.worklist.close()


def test_an_image_after_the_look_back_window_is_judged_with_its_whole_study(site):
    for view in FOUR_VIEWS:
        site.image("1.2.3", "ACC1", view, T0)
    site.at(T0 + 2 * MINUTE)
    late = T0 + datetime.timedelta(days=2)
    site.image("1.2.3", "ACC1", ("R", "CC"), late)
    site.at(late + 2 * MINUTE)  # quiet again: complete by views, not 30 minutes later
    complete, amended, again = site.events()
    assert (complete["event_type"], amended["event_type"]) == ("study.complete", "study.amended")
    assert again["payload"]["rule"] == "views"
    assert len(again["payload"]["instances"]) == 5
    assert again["payload"]["views_missing"] == []


def test_an_open_study_whose_instances_are_gone_closes_at_the_timeout(site):
    uid = site.image("1.2.5", "ACC5", ("R", "CC"), T0)
    site.at(T0 + MINUTE / 2)
    site.store.index.set_status(uid, "MISSING")  # a scrub found the file gone
    site.at(T0 + datetime.timedelta(days=3))
    [event] = site.events()
    assert event["payload"]["rule"] == "timeout"
    assert event["payload"]["instances"] == []
    assert site.tracker.open_studies == 0


def test_two_accessions_in_one_study_are_both_linked_and_either_s_mpps_counts(site):
    for accession in ("ACC1", "ACC2"):
        site.worklist.create(WorklistItem(accession, "999", "A^B", T0, source_message_id=accession))
    for view in FOUR_VIEWS[:2]:
        site.image("1.2.3", "ACC1", view, T0)
    for view in FOUR_VIEWS[2:]:
        site.image("1.2.3", "ACC2", view, T0)
    site.at(T0 + 2 * MINUTE)
    [event] = site.events()
    assert event["payload"]["accession_numbers"] == ["ACC1", "ACC2"]
    assert len(event["payload"]["instances"]) == 4
