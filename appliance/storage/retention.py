"""Storage housekeeping under the supervisor: retention, the disk floor alarm, WAL checkpoints.

Retention deletes a stored image and its derived files only when all of these hold: it was
stored more than `retention.keep_days` ago (never fewer than `retention.safety_days`), the
pipeline has finished with it, no event about it is still waiting for the cloud's ack, and, with
`retention.require_commit_or_fetch`, a modality's storage commitment or the cloud's image.fetch
has confirmed it. With the relay disabled events are never acked, so nothing is deleted.

A deletion marks the row DELETING (committed), removes the files, then the row: a crash in
between leaves a row the next pass finishes, never a file that recovery would re-index.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import attrs
import trio

from appliance.config import RetentionConfig
from appliance.log import get_logger
from appliance.storage.index import StoredInstance
from appliance.storage.space import DiskFloor, Reserve, Space
from appliance.storage.store import InstanceStore
from appliance.supervisor import Criticality
from appliance.worklist.store import WorklistStore

log = get_logger("housekeeping")

BATCH = 200
DISK_CHECK_S = 30.0
CHECKPOINT_S = 3600.0


@attrs.define
class RetentionReport:
    candidates: int = 0
    deleted: int = 0
    bytes_freed: int = 0
    seconds: float = 0.0


class StorageHousekeeper:
    name = "storage-housekeeping"
    criticality = Criticality.AUXILIARY

    def __init__(
        self,
        store: InstanceStore,
        config: RetentionConfig,
        floor: DiskFloor,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        worklist: WorklistStore | None = None,
        require_upload: bool = False,
    ) -> None:
        #: Images go to Manage by upload (profile manage): only those with a final outcome go.
        self._require_upload = require_upload
        self._store = store
        self._worklist = worklist
        self._config = config
        self._floor = floor
        self._reserve = Reserve(store.layout.reserve)
        self._now = now
        self.below_floor = False
        self.last_retention: RetentionReport | None = None

    def cutoff(self) -> str:
        days = max(self._config.keep_days, self._config.safety_days)
        return (self._now() - datetime.timedelta(days=days)).isoformat(timespec="milliseconds")

    async def retention_pass(
        self, dry_run: bool = False, progress: Callable[[str, int, int], None] | None = None
    ) -> RetentionReport:
        """Delete (or, dry, count) every eligible image, in batches, with progress."""
        report = RetentionReport()
        started = trio.current_time()
        index = self._store.index
        while True:
            if dry_run:  # counts everything in one read, on a reader: it never writes
                batch = await trio.to_thread.run_sync(
                    self._store.reader.retention_candidates,
                    self.cutoff(),
                    self._config.require_commit_or_fetch,
                    10**9,
                    self._require_upload,
                )
            else:
                batch = await self._store.read(
                    index.retention_candidates,
                    self.cutoff(),
                    self._config.require_commit_or_fetch,
                    BATCH,
                    self._require_upload,
                )
            if not batch:
                break
            report.candidates += len(batch)
            for instance in batch:
                if not dry_run:
                    await self._delete(instance)
                    report.deleted += 1
                report.bytes_freed += instance.file_size
            if progress is not None:
                progress("retention", report.candidates, report.candidates)
            log.info(
                "retention.progress",
                deleted=report.deleted,
                candidates=report.candidates,
                bytes_freed=report.bytes_freed,
                dry_run=dry_run,
            )
            if dry_run:
                break
        report.seconds = round(trio.current_time() - started, 3)
        log.info("retention.done", dry_run=dry_run, **attrs.asdict(report))
        self.last_retention = report
        return report

    async def _delete(self, instance: StoredInstance) -> None:
        index = self._store.index
        await self._store.write(index.set_status, instance.sop_instance_uid, "DELETING")
        await trio.to_thread.run_sync(self._store.unlink_files, instance)
        await self._store.write(index.delete, instance.sop_instance_uid)

    def check_disk(self) -> Space:
        """The alarm, logged once per crossing of the floor (counted as the refusal counts)."""
        space = self._floor.measure()
        if not space.ok and not self.below_floor:
            log.error("disk.below_floor", phase="disk", **space.as_dict())
        elif space.ok and self.below_floor:
            log.info("disk.recovered", **space.as_dict())
        self.below_floor = not space.ok
        if self._reserve.replenish(space):
            log.info("disk.reserve_taken", bytes=self._reserve.size)
        return space

    async def checkpoint(self) -> None:
        """Fold each database's WAL back in, so it does not grow between quiet periods."""
        databases = [self._store.database]
        if self._worklist is not None:
            databases.append(self._worklist.database)
        for database in databases:
            busy, pages, moved = await database.write(database.checkpoint)
            log.info(
                "storage.checkpoint",
                database=database.path.name,
                busy=busy,
                wal_pages=pages,
                moved=moved,
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_retention = next_checkpoint = trio.current_time()
        while True:
            await trio.to_thread.run_sync(self.check_disk)
            now = trio.current_time()
            if self._config.keep_days > 0 and now >= next_retention:
                await self.retention_pass()
                next_retention = now + self._config.interval_s
            if now >= next_checkpoint:
                await self.checkpoint()
                next_checkpoint = now + CHECKPOINT_S
            await trio.sleep(DISK_CHECK_S)
