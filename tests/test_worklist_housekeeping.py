"""Daily archive of finished and stale worklist items, and the worklist CLI."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import zoneinfo

import trio

from appliance.config import WorklistConfig
from appliance.state import StatePaths
from appliance.worklist.housekeeping import WorklistHousekeeper, seconds_until
from appliance.worklist.store import CANCELLED, COMPLETED, WorklistItem, WorklistStore
from tests.support import write_config

UTC = datetime.UTC
LONDON = zoneinfo.ZoneInfo("Europe/London")


def moment(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_next_run_is_the_next_local_wall_clock_time_across_dst():
    assert seconds_until("02:00", LONDON, moment("2026-11-22T01:00")) == 3600
    assert seconds_until("02:00", LONDON, moment("2026-11-22T02:00")) == 24 * 3600
    # Clocks go back on 25 Oct 2026: 02:00 local on the 25th is 02:00 UTC, 25 h after 01:00 BST.
    assert seconds_until("02:00", LONDON, moment("2026-10-24T01:00")) == 25 * 3600


async def test_archive_moves_finished_past_items_and_stale_ones_only(tmp_path, autojump_clock):
    store = WorklistStore(StatePaths(tmp_path))
    store.open()
    for accession, when in [
        ("DONE-YESTERDAY", "2026-11-21T10:00"),
        ("CANCELLED-YESTERDAY", "2026-11-21T11:00"),
        ("OPEN-YESTERDAY", "2026-11-21T12:00"),
        ("DONE-TODAY", "2026-11-22T09:00"),
        ("OPEN-LAST-MONTH", "2026-10-20T09:00"),
    ]:
        store.create(WorklistItem(accession, "9990000001", "A^B", moment(when)))
    for accession in ("DONE-YESTERDAY", "DONE-TODAY"):
        store.set_status(accession, "IN PROGRESS")
        store.database.connection.execute(
            "UPDATE worklist_items SET status = ? WHERE accession_number = ?",
            (COMPLETED, accession),
        )
    store.set_status("CANCELLED-YESTERDAY", CANCELLED)

    now = moment("2026-11-22T02:00")
    housekeeper = WorklistHousekeeper(store, WorklistConfig(), now=lambda: now)
    async with trio.open_nursery() as nursery:
        await nursery.start(housekeeper.run)
        await trio.sleep(24 * 3600 + 1)  # the 02:00 run the next day (virtual time)
        nursery.cancel_scope.cancel()
    assert store.archived() == ["CANCELLED-YESTERDAY", "DONE-YESTERDAY", "OPEN-LAST-MONTH"]
    remaining = {item.accession_number for item in store.items()}
    assert remaining == {"OPEN-YESTERDAY", "DONE-TODAY"}
    store.close()


def appliance(config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), "worklist", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_worklist_cli_add_list_cancel(tmp_path):
    config = write_config(tmp_path)
    add = [
        "ACC-CLI",
        "9990000001",
        "O'BRIEN^SIÂN",
        "--birth-date",
        "1970-01-01",
        "--scheduled",
        "2026-07-01 09:30",
    ]
    created = appliance(config, "add", *add)
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created: ACC-CLI study 1.2.826.0.1.3680043.8.498.")
    assert appliance(config, "add", *add).stdout.startswith("exists: ACC-CLI")
    clash = appliance(
        config, "add", "ACC-CLI", "9990000002", "OTHER^PERSON", "--scheduled", "2026-07-01 09:30"
    )
    assert clash.returncode == 1
    assert "already exists with a different patient_id" in clash.stderr

    [listed] = [
        json.loads(line) for line in appliance(config, "list", "--json").stdout.split("\n") if line
    ]
    # 09:30 in London in July (BST) is 08:30 UTC: stored in UTC.
    assert listed["scheduled_at"] == "2026-07-01 08:30:00+00:00"
    assert "2026-07-01 09:30" in appliance(config, "list").stdout

    assert appliance(config, "cancel", "ACC-CLI").returncode == 0
    assert appliance(config, "list").stdout.count("ACC-CLI") == 0
    assert "CANCELLED" in appliance(config, "list", "--all").stdout
    refused = appliance(config, "cancel", "NOPE")
    assert (refused.returncode, refused.stderr.strip()) == (
        1,
        "worklist cancel: no worklist item with accession NOPE",
    )
