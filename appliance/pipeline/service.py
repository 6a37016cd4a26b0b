"""The image pipeline: every stored instance gets its thumbnail, preview and cloud event.

Off the association's path: the storage SCP only drops a notice on a channel (or nothing, if
the channel is full); this service also sweeps the index for instances whose processing is not
recorded as done, so a restart, a full channel or a failed attempt delays work, never loses
it. Decoding and rendering run in worker processes (appliance/pipeline/workers.py), never in
the DICOM process's interpreter. The outcome and its event
(`image.received` or, after the last failed attempt, `image.failed`) commit in one transaction,
so each instance is reported exactly once.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
from collections.abc import Callable
from typing import Any

import trio

from appliance.config import PipelineConfig
from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.pipeline.render import RenderError, Rendition
from appliance.pipeline.workers import PixelsBroken, PixelWorkers, WorkersUnavailable
from appliance.storage.files import write_durably
from appliance.storage.index import WHOLE, StoredInstance
from appliance.storage.store import InstanceStore
from appliance.supervisor import Criticality
from appliance.worklist.store import WorklistStore

log = get_logger("pipeline")

SWEEP_INTERVAL = 5.0
SWEEP_BATCH = 64


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ImagePipeline:
    name = "image-pipeline"
    criticality = Criticality.AUXILIARY

    def __init__(
        self,
        store: InstanceStore,
        worklist: WorklistStore,
        notices: trio.MemoryReceiveChannel[StoredInstance],
        config: PipelineConfig,
        workers: PixelWorkers,
        on_processed: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_processed = on_processed
        self._store = store
        self._worklist = worklist
        self._notices = notices
        self._config = config
        self._pixels = workers
        # As many images in hand as there are workers, and as many again queued for them.
        self._workers = workers.count
        self._in_flight: set[str] = set()
        self._renditions = [
            Rendition(config.thumbnail_height, config.thumbnail_quality),
            Rendition(config.preview_height, config.preview_quality),
        ]
        self.processed = 0
        #: Why recording outcomes currently fails, or None.
        self.failing: str | None = None

    def statistics(self) -> dict[str, Any]:
        return {
            "in_flight": len(self._in_flight),
            "processed": self.processed,
            "failing": self.failing,
            "workers": self._pixels.statistics(),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # A restart after a crash: what the last run held in its channel is not in flight any
        # more (it would be skipped for ever); the sweep offers it again.
        self._in_flight.clear()
        send, receive = trio.open_memory_channel[StoredInstance](self._workers * 2)
        async with trio.open_nursery() as nursery, send:
            for _ in range(self._workers):
                nursery.start_soon(self._work, receive.clone())
            nursery.start_soon(self._forward_notices, send.clone())
            nursery.start_soon(self._sweep, send.clone())
            task_status.started()

    async def _offer(
        self, work: trio.MemorySendChannel[StoredInstance], item: StoredInstance
    ) -> None:
        if item.sop_instance_uid in self._in_flight:
            return
        self._in_flight.add(item.sop_instance_uid)
        try:
            await work.send(item)
        except BaseException:
            self._in_flight.discard(item.sop_instance_uid)
            raise

    async def _forward_notices(self, work: trio.MemorySendChannel[StoredInstance]) -> None:
        async with work:
            async for notice in self._notices:
                await self._offer(work, notice)

    async def _sweep(self, work: trio.MemorySendChannel[StoredInstance]) -> None:
        async with work:
            deadline = trio.current_time()
            while True:
                now = _now().isoformat(timespec="seconds")
                due = await self._store.read(self._store.index.pending, now, SWEEP_BATCH)
                for item in due:
                    await self._offer(work, item)
                deadline += SWEEP_INTERVAL
                await trio.sleep_until(deadline)

    async def _work(self, work: trio.MemoryReceiveChannel[StoredInstance]) -> None:
        async with work:
            async for item in work:
                try:
                    await self._process(item)
                except Exception as exc:
                    # Reading or recording failed (pacs.db full, I/O error): the instance stays
                    # pending and the sweep offers it again; logged once until work succeeds.
                    if self.failing is None:
                        log.exception(
                            "pipeline.failing",
                            phase="process",
                            sop_instance_uid=item.sop_instance_uid,
                        )
                    self.failing = f"{type(exc).__name__}: {exc}"[:300]
                else:
                    if self.failing is not None:
                        log.info("pipeline.recovered")
                    self.failing = None
                finally:
                    self._in_flight.discard(item.sop_instance_uid)

    async def _process(self, item: StoredInstance) -> None:
        source = self._store.layout.absolute(item.storage_path)
        if item.accession_number:
            # The first image of a scheduled item moves it to IN PROGRESS (as the NHS gateway
            # does): here, not on the association's path; a no-op for later images.
            try:
                await self._worklist.write(self._worklist.image_arrived, item.accession_number)
            except Exception:  # the worklist's trouble must not stop thumbnails and events
                log.exception("worklist.in_progress_failed", phase="image-arrived")
        linked = (
            await trio.to_thread.run_sync(self._worklist.get, item.accession_number)
            if item.accession_number
            else None
        )
        source_message_id = linked.source_message_id if linked else None
        started = trio.current_time()
        try:
            outcome = await self._pixels.render(
                source,
                self._renditions,
                item.pixels_state != WHOLE,  # not yet proved, or broken last time: again
            )
        except WorkersUnavailable as exc:  # the pool's trouble (shown as pixel-workers degraded):
            log.debug("pipeline.waiting", phase="worker", error=exc.reason[:300])  # no attempt
            return
        except RenderError as exc:  # a lost worker: this attempt's failure
            await self._failed(item, exc, source_message_id)
            return
        if outcome.proof is not None:  # recorded whatever the rendering did
            await self._store.write(
                self._store.index.pixels_checked,
                [(item.sop_instance_uid, outcome.proof or None)],
            )
        if outcome.proof:
            log.error(
                "instance.pixels_broken",
                phase="decode",
                sop_instance_uid=item.sop_instance_uid,
                error=outcome.proof[:300],
            )
            await self._failed(item, PixelsBroken(outcome.proof), source_message_id)
            return
        if outcome.error is not None:
            await self._failed(item, outcome.error, source_message_id)
            return
        jpegs = outcome.jpegs
        payload = self._payload(item) | {"test": bool(linked and linked.is_test)}
        thumbnail_path = preview_path = None
        if jpegs is not None:
            stem = item.storage_path.removesuffix(".dcm")
            thumbnail_path, preview_path = f"{stem}.thumb.jpg", f"{stem}.preview.jpg"
            try:
                for relative, data in ((thumbnail_path, jpegs[0]), (preview_path, jpegs[1])):
                    await trio.to_thread.run_sync(
                        write_durably, self._store.layout.derived_file(relative), data
                    )
            except OSError as exc:  # derived/ full, read-only or failing: this image's outcome
                for relative in (thumbnail_path, preview_path):  # no half of a pair left behind
                    with contextlib.suppress(OSError):
                        self._store.layout.derived_file(relative).unlink(missing_ok=True)
                await self._failed(
                    item, RenderError("write", exc.strerror or str(exc)), source_message_id
                )
                return
            payload["thumbnail"] = base64.b64encode(jpegs[0]).decode("ascii")
        payload["thumbnail_media_type"] = "image/jpeg" if jpegs is not None else None
        await self._store.write(
            self._store.index.finish,
            item,
            "DONE",
            "image.received",
            payload,
            source_message_id,
            thumbnail_path=thumbnail_path,
            preview_path=preview_path,
        )
        self.processed += 1
        METRICS.inc("images_processed_total", outcome="thumbnail" if jpegs else "metadata-only")
        self._on_processed()
        log.info(
            "image.processed",
            sop_instance_uid=item.sop_instance_uid,
            thumbnail=jpegs is not None,
            ms=round((trio.current_time() - started) * 1000, 1),
        )

    async def _failed(
        self, item: StoredInstance, exc: Exception, source_message_id: str | None
    ) -> None:
        phase = exc.phase if isinstance(exc, RenderError) else "render"
        attempts = item.pipeline_attempts + 1
        error = (str(exc) if isinstance(exc, RenderError) else f"{phase}: {exc}")[:500]
        log.warning(
            "image.failed",
            phase=phase,
            sop_instance_uid=item.sop_instance_uid,
            attempt=attempts,
            error=str(exc)[:200],
        )
        final = isinstance(exc, RenderError) and exc.final  # trying again changes nothing
        if attempts < self._config.max_attempts and not final:
            next_at = _now() + datetime.timedelta(seconds=self._config.retry_after_s)
            await self._store.write(
                self._store.index.retry_later,
                item.sop_instance_uid,
                error,
                next_at.isoformat(timespec="seconds"),
            )
            return
        payload = self._payload(item) | {
            "phase": phase,
            "error": str(exc)[:500],
            "attempts": attempts,
        }
        await self._store.write(
            self._store.index.finish,
            item,
            "FAILED",
            "image.failed",
            payload,
            source_message_id,
            error=error,
        )
        METRICS.inc("images_processed_total", outcome="failed")
        self._on_processed()

    @staticmethod
    def _payload(item: StoredInstance) -> dict[str, Any]:
        return {
            "sop_instance_uid": item.sop_instance_uid,
            "study_instance_uid": item.study_instance_uid,
            "series_instance_uid": item.series_instance_uid,
            "sop_class_uid": item.sop_class_uid,
            "accession_number": item.accession_number,
            "laterality": item.image_laterality,
            "view_position": item.view_position,
            "number_of_frames": item.number_of_frames,
            "file_size": item.file_size,
            "sha256": item.storage_hash,
            "transfer_syntax_uid": item.transfer_syntax_uid,
        }
