"""Retention deletes only what is safe: old enough, processed, its event acknowledged (and, if
required, committed or fetched); a half-finished deletion is finished, never resurrected."""

from __future__ import annotations

import datetime

import pytest

from appliance.config import RetentionConfig
from appliance.state import StatePaths
from appliance.storage.files import hash_and_sync
from appliance.storage.recovery import recover
from appliance.storage.retention import StorageHousekeeper
from appliance.storage.space import DiskFloor
from appliance.storage.store import InstanceStore, describe
from appliance.testing import synthetic

LATER = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=40)


@pytest.fixture
async def store(tmp_path):
    store = InstanceStore(StatePaths(tmp_path / "state"))
    store.open()
    yield store
    store.close()


async def stored(store: InstanceStore, tmp_path, name: str, *, acked: bool) -> str:
    """An image stored, processed (thumbnail written) and its event acked or not."""
    source = tmp_path / f"{name}.dcm"
    synthetic.mammogram(shape=(64, 48)).save_as(source, enforce_file_format=True)
    spooled = store.layout.spool / f"rx-{name}.dcm"
    spooled.write_bytes(source.read_bytes())
    digest, size = hash_and_sync(spooled)
    instance = describe(spooled, storage_hash=digest, file_size=size, layout=store.layout)
    await store.commit(spooled, instance)
    thumbnail = instance.storage_path.removesuffix(".dcm") + ".thumb.jpg"
    (store.layout.state_dir / "derived" / thumbnail).parent.mkdir(parents=True, exist_ok=True)
    (store.layout.state_dir / "derived" / thumbnail).write_bytes(b"jpeg")
    payload = {"sop_instance_uid": instance.sop_instance_uid}
    index = store.index
    await store.write(
        index.finish, instance, "DONE", "image.received", payload, None, thumbnail_path=thumbnail
    )
    if acked:
        [event] = [
            e
            for e in store.events()
            if e["payload"]["sop_instance_uid"] == instance.sop_instance_uid
        ]
        await store.write(lambda: store.database.connection.execute(
            "UPDATE events SET delivered_at = 'now' WHERE event_id = ?", (event["event_id"],)
        ))  # fmt: skip
    return instance.sop_instance_uid


def housekeeper(store, **config) -> StorageHousekeeper:
    settings = RetentionConfig(**({"keep_days": 30, "safety_days": 7} | config))
    return StorageHousekeeper(
        store, settings, DiskFloor(store.layout.state_dir, 0), now=lambda: LATER
    )


def files_of(store: InstanceStore, uid: str) -> list:
    row = store.index.get(uid)
    return [store.layout.absolute(row.storage_path)] if row else []


async def test_only_images_whose_events_were_acked_are_deleted(store, tmp_path):
    acked = await stored(store, tmp_path, "acked", acked=True)
    waiting = await stored(store, tmp_path, "waiting", acked=False)
    acked_file = files_of(store, acked)[0]
    derived = list((store.layout.state_dir / "derived").rglob("*.jpg"))
    assert len(derived) == 2

    report = await housekeeper(store).retention_pass()

    assert (report.deleted, report.candidates) == (1, 1)
    assert store.index.get(acked) is None
    assert not acked_file.exists()
    assert store.index.get(waiting) is not None
    assert files_of(store, waiting)[0].exists()
    assert len(list((store.layout.state_dir / "derived").rglob("*.jpg"))) == 1


async def test_nothing_younger_than_the_safety_window_even_with_keep_days_zero_point_one(
    store, tmp_path
):
    await stored(store, tmp_path, "recent", acked=True)
    keeper = StorageHousekeeper(
        store,
        RetentionConfig(keep_days=0.1, safety_days=7),
        DiskFloor(store.layout.state_dir, 0),
        now=lambda: datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=6),
    )
    assert (await keeper.retention_pass()).deleted == 0


async def test_commitment_or_fetch_can_be_required(store, tmp_path):
    committed = await stored(store, tmp_path, "committed", acked=True)
    fetched = await stored(store, tmp_path, "fetched", acked=True)
    neither = await stored(store, tmp_path, "neither", acked=True)
    await store.committed([committed])
    await store.fetched([fetched])

    dry = await housekeeper(store, require_commit_or_fetch=True).retention_pass(dry_run=True)
    assert (dry.candidates, dry.deleted) == (2, 0)
    assert store.index.get(committed) is not None  # a dry run deletes nothing

    await housekeeper(store, require_commit_or_fetch=True).retention_pass()
    assert [store.index.get(u) is None for u in (committed, fetched, neither)] == [
        True,
        True,
        False,
    ]


async def test_a_deletion_cut_short_is_finished_and_never_reindexed(store, tmp_path):
    uid = await stored(store, tmp_path, "half", acked=True)
    path = files_of(store, uid)[0]
    # A crash after the row was marked, before the file went.
    await store.write(store.index.set_status, uid, "DELETING")
    report = await trio_recover(store)
    assert report.files_reindexed == 0
    await housekeeper(store, keep_days=365).retention_pass()  # not old enough, but half-deleted
    assert store.index.get(uid) is None
    assert not path.exists()


async def trio_recover(store: InstanceStore):
    return await store.write(
        lambda: recover(store.layout, list(store.index.instances()), store.index)
    )


async def test_checkpoints_fold_both_write_ahead_logs_back(store, tmp_path):
    from appliance.worklist.store import WorklistStore

    worklist = WorklistStore(StatePaths(tmp_path / "state"))
    worklist.open()
    try:
        for n in range(3):
            await stored(store, tmp_path, f"wal{n}", acked=False)
        wal = store.layout.state_dir / "pacs.db-wal"
        assert wal.stat().st_size > 0
        keeper = StorageHousekeeper(
            store, RetentionConfig(), DiskFloor(store.layout.state_dir, 0), worklist=worklist
        )
        await keeper.checkpoint()
        assert wal.stat().st_size == 0
        assert (tmp_path / "state" / "worklist.db-wal").stat().st_size == 0
    finally:
        worklist.close()


async def test_the_disk_floor_alarm_is_raised_once_and_cleared(store, caplog):
    caplog.set_level("INFO", logger="appliance")
    floor = DiskFloor(store.layout.state_dir, 1 << 62)
    below = StorageHousekeeper(store, RetentionConfig(), floor)
    below.check_disk()
    below.check_disk()
    assert below.below_floor is True
    assert [r.getMessage() for r in caplog.records].count("disk.below_floor") == 1
    floor.floor_bytes = 0  # space came back (here: the floor went)
    below.check_disk()
    assert below.below_floor is False
    assert "disk.recovered" in [r.getMessage() for r in caplog.records]
