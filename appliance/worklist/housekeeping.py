"""Daily worklist housekeeping: finished items of past days, and stale ones, are archived.

The NHS gateway backs up and clears its worklist database nightly for the same reason: a
modality's worklist should show today's women, not last month's.
"""

from __future__ import annotations

import datetime
import zoneinfo
from collections.abc import Callable

import trio

from appliance.config import WorklistConfig
from appliance.log import get_logger
from appliance.supervisor import Criticality
from appliance.worklist.store import WorklistStore, now_utc

log = get_logger("worklist")


def seconds_until(local_time: str, zone: zoneinfo.ZoneInfo, now: datetime.datetime) -> float:
    """Seconds from `now` to the next `HH:MM` in `zone` (strictly later)."""
    hour, minute = map(int, local_time.split(":"))
    local_now = now.astimezone(zone)
    target = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target <= local_now:
        target = (local_now + datetime.timedelta(days=1)).replace(
            hour=hour, minute=minute, second=0, microsecond=0
        )
    # Re-localise: across a DST change the wall-clock time keeps its meaning.
    target = target.replace(tzinfo=None).replace(tzinfo=zone)
    return (target - now).total_seconds()


class WorklistHousekeeper:
    name = "worklist-housekeeping"
    criticality = Criticality.AUXILIARY

    def __init__(
        self,
        store: WorklistStore,
        config: WorklistConfig,
        now: Callable[[], datetime.datetime] = now_utc,
    ) -> None:
        self._store = store
        self._config = config
        self._zone = zoneinfo.ZoneInfo(config.timezone)
        self._now = now

    async def archive_once(self) -> int:
        local_midnight = (
            self._now().astimezone(self._zone).replace(hour=0, minute=0, second=0, microsecond=0)
        )
        before = local_midnight.astimezone(datetime.UTC)
        stale_before = before - datetime.timedelta(days=self._config.stale_after_days)
        archived = await self._store.write(self._store.archive, before, stale_before)
        log.info("worklist.archived", items=archived)
        return archived

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(seconds_until(self._config.archive_at, self._zone, self._now()))
            await self.archive_once()
