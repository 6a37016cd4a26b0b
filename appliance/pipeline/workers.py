"""Pixel work (decoding, proving, rendering) in worker processes, never in the DICOM process.

Codecs hold the interpreter lock for seconds per mammogram (JPEG Lossless, JPEG-LS, signed JPEG
2000), and the DICOM process's associations share that lock: in one interpreter, a C-ECHO waited
1.8 s behind a render. So every pixel decode runs in a worker process (trio-parallel: processes
for Trio, spawned, not forked from a threaded process):

- bounded in number: `pipeline.workers` for the image pipeline (default one fewer than the
  usable cores), plus one slot of its own for storage commitment's proofs, so that a modality
  waiting for its commitment report never queues behind a day's thumbnails; niced, so the
  associations win contention for the CPU;
- bounded in memory: a worker whose peak resident size passed `pipeline.worker_memory_mb` is
  replaced after its job, as is every worker after `pipeline.worker_max_images` jobs (codecs
  are C: leaks and fragmentation die with the process); workers volunteer to the kernel's OOM
  killer first (oom_score_adj 1000), so memory pressure costs an attempt at an image, not the
  DICOM process. (An address-space cap was tried and dropped: a codec that cannot allocate says
  "cannot decode", and sound pixel data was then recorded as broken.)
- bounded in time: a job is killed after `pipeline.render_timeout_s` plus a second per 4 MB of
  file (a 1 GB tomosynthesis object gets its four minutes more);
- a worker that dies (a codec's segfault, the OOM killer, an operator's kill) or is killed for
  time fails only its job: a RenderError with phase ``worker``, retried by the pipeline and,
  after its last attempt, reported as ``image.failed``.

A pool that cannot work at all (a worker that cannot start, three jobs lost in a row) is this
service's failure, not the images': the service fails (supervised: degraded in status and
health, restarted with backoff, first proving that a worker starts), and callers get
WorkersUnavailable, which costs an image no attempt.

Jobs return plain outcomes, not exceptions, so that nothing a codec raises has to survive
pickling.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
import trio_parallel  # type: ignore[import-untyped]  # no type information shipped

from appliance.config import PipelineConfig
from appliance.log import get_logger
from appliance.pipeline.render import RenderError, Rendition
from appliance.supervisor import Criticality

log = get_logger("pipeline")

#: Worker processes run at this nice level, below the DICOM process.
WORKER_NICENESS = 10
#: An idle worker exits after this long (a quiet site holds no decoder memory).
IDLE_TIMEOUT_S = 120.0
#: Callers wait this long for the pool to be (back) up before giving up for now.
READY_WAIT_S = 30.0
#: Jobs lost one after another (died, killed for time) before the pool is judged broken.
LOST_IN_A_ROW = 3
#: The time limit grows by a second for this many bytes of file.
BYTES_PER_SECOND = 4 << 20


class PixelsBroken(RenderError):
    """A frame of the stored pixel data does not decode: the image can never be committed."""

    def __init__(self, reason: str) -> None:
        super().__init__("decode", reason, final=True)

    def __reduce__(self) -> tuple[type[PixelsBroken], tuple[str]]:  # type: ignore[override]
        return type(self), (self.reason,)


class WorkersUnavailable(RenderError):
    """The pool is not running: nothing was tried, the image is not to blame."""

    def __init__(self, reason: str) -> None:
        super().__init__("worker", reason)


@attrs.frozen
class Rendered:
    """A job's outcome. `proof`: None when not asked, "" when every frame decoded, else why
    not; `jpegs`: the renditions (None: no pixel data, or `error` says why not)."""

    proof: str | None
    jpegs: list[bytes] | None
    error: RenderError | None = None


# -- in the worker ------------------------------------------------------------------------------

_jobs_done = 0


def _peak_rss_kb() -> int:
    """This process's own high-water mark (ru_maxrss would carry the spawning parent's)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _start_worker() -> bool:
    os.nice(WORKER_NICENESS)
    with contextlib.suppress(OSError):  # the kernel's OOM killer takes a worker first
        Path("/proc/self/oom_score_adj").write_text("1000")
    return True


def _retire_worker(max_jobs: int, retire_at_kb: int) -> bool:
    global _jobs_done
    _jobs_done += 1
    return _jobs_done >= max_jobs or _peak_rss_kb() >= retire_at_kb


def _probe() -> int:
    """A worker started and imported what jobs need."""
    from appliance.pipeline import render  # noqa: F401
    from appliance.storage import structure  # noqa: F401

    return os.getpid()


Outcome = tuple[str | None, Any, tuple[str, str, bool] | None, int]


def prove_and_render_job(
    source: str, renditions: Sequence[Rendition] | None, prove: bool
) -> Outcome:
    """(proof, jpegs, error, peak): every frame decoded first when asked (storage commitment
    confirms an encapsulated image only after this), then the renditions when asked. The
    proof is returned whatever the rendering does."""
    import pydicom

    from appliance.pipeline.render import central_frame, render
    from appliance.storage.structure import CannotCheck, Unsound, decode_all

    proof: str | None = None
    path = Path(source)
    kept: list[Any] = []  # the central frame, as the proof decoded it: not decoded twice
    try:
        if prove:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
                decode_all(path, kept if renditions else None, central_frame(header))
                proof = ""
            except Unsound as exc:
                return exc.reason, None, None, _peak_rss_kb()
            except CannotCheck as exc:  # the machine's trouble (memory, I/O): retried
                return None, None, ("decode", str(exc), False), _peak_rss_kb()
        jpegs = render(path, renditions, kept[0] if kept else None) if renditions else None
        return proof, jpegs, None, _peak_rss_kb()
    except RenderError as exc:
        return proof, None, (exc.phase, exc.reason, exc.final), _peak_rss_kb()
    except Exception as exc:  # a codec's anything: this image's failure
        return proof, None, ("render", f"{type(exc).__name__}: {exc}"[:500], False), _peak_rss_kb()


# -- in the DICOM process -----------------------------------------------------------------------


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours CPU affinity (systemd CPUAffinity=)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class PixelWorkers:
    """The supervised pool of worker processes, shared by the image pipeline and storage
    commitment."""

    name = "pixel-workers"
    criticality = Criticality.AUXILIARY

    def __init__(self, config: PipelineConfig) -> None:
        self.count = config.workers or max(usable_cores() - 1, 1)
        self._pipeline = trio.CapacityLimiter(self.count)
        self._commitment = trio.CapacityLimiter(1)
        self._timeout = config.render_timeout_s
        self._retire = _RetirePolicy(config.worker_max_images, config.worker_memory_mb * 1024)
        self._context: Any = None
        self._ready = trio.Event()
        self._broken = trio.Event()
        self._lost_in_a_row = 0
        self.jobs = 0
        self.lost = 0  # killed for time or died
        self.peak_rss_kb = 0
        #: Why the pool is not working (status shows it), or None.
        self.failing: str | None = None

    def statistics(self) -> dict[str, Any]:
        return {
            "workers": self.count,
            "busy": self._pipeline.borrowed_tokens + self._commitment.borrowed_tokens,
            "waiting": self._pipeline.statistics().tasks_waiting
            + self._commitment.statistics().tasks_waiting,
            "jobs": self.jobs,
            "lost": self.lost,
            "peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
            "failing": self.failing,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._broken = trio.Event()
        self._lost_in_a_row = 0
        async with trio_parallel.open_worker_context(
            idle_timeout=IDLE_TIMEOUT_S,
            init=_start_worker,
            retire=self._retire,
            grace_period=5.0,
        ) as context:
            task_status.started()  # the appliance does not wait for a worker to spawn
            try:
                with trio.fail_after(READY_WAIT_S):
                    await context.run_sync(_probe, kill_on_cancel=True)
            except (trio_parallel.BrokenWorkerError, trio.TooSlowError) as exc:
                self.failing = f"a worker process cannot start: {exc}"[:300]
                raise RuntimeError(self.failing) from None
            self.failing = None
            self._context = context
            self._ready.set()
            try:
                await self._broken.wait()
                raise RuntimeError(self.failing or "worker processes lost")
            finally:
                self._context = None
                self._ready = trio.Event()

    async def render(self, source: Path, renditions: Sequence[Rendition], prove: bool) -> Rendered:
        """The proof (when asked) and the renditions of one stored image. Raises RenderError
        (phase worker) when the worker was lost, WorkersUnavailable when there is no pool."""
        return await self._run(self._pipeline, source, list(renditions), prove)

    async def prove(self, source: Path) -> str | None:
        """Why the pixel data is broken, or None when every frame decodes. Raises RenderError
        when this could not be found out (the machine's trouble, not the data's)."""
        outcome = await self._run(self._commitment, source, None, True)
        if outcome.error is not None:
            raise outcome.error
        return outcome.proof or None

    async def _run(
        self,
        limiter: trio.CapacityLimiter,
        source: Path,
        renditions: list[Rendition] | None,
        prove: bool,
    ) -> Rendered:
        try:
            size = await trio.to_thread.run_sync(os.path.getsize, source)
        except OSError:
            size = 0
        limit = self._timeout + size / BYTES_PER_SECOND
        async with self._slot(limiter) as context:
            with trio.move_on_after(limit) as deadline:
                try:
                    proof, jpegs, error, peak = await context.run_sync(
                        prove_and_render_job,
                        str(source),
                        renditions,
                        prove,
                        kill_on_cancel=True,
                        limiter=_NO_LIMIT,
                    )
                except trio_parallel.BrokenWorkerError as exc:
                    self._lose(f"worker process died: {exc}")
                    raise RenderError("worker", f"worker process died: {exc}") from None
            if deadline.cancelled_caught:
                why = f"no result after {limit:.0f} s (pipeline.render_timeout_s): worker killed"
                self._lose(why)
                raise RenderError("worker", why)
        self._lost_in_a_row = 0
        self.jobs += 1
        self.peak_rss_kb = max(self.peak_rss_kb, peak)
        return Rendered(proof, jpegs, RenderError(*error) if error else None)

    def _lose(self, why: str) -> None:
        self.lost += 1
        self._lost_in_a_row += 1
        if self._lost_in_a_row >= LOST_IN_A_ROW:
            self.failing = f"{self._lost_in_a_row} jobs lost in a row, the last: {why}"[:300]
            self._broken.set()

    @contextlib.asynccontextmanager
    async def _slot(self, limiter: trio.CapacityLimiter) -> AsyncIterator[Any]:
        """A worker's turn: waits for a free slot and for the pool to be up (not counted in
        the job's time limit)."""
        async with limiter:
            with trio.move_on_after(READY_WAIT_S):
                await self._ready.wait()
            if self._context is None:
                raise WorkersUnavailable(f"pixel workers not running: {self.failing or 'starting'}")
            yield self._context


@attrs.frozen
class _RetirePolicy:
    """trio-parallel's retire hook (pickled into each worker): replace a worker after
    `max_jobs`, or once its peak RSS passed `retire_at_kb`."""

    max_jobs: int
    retire_at_kb: int

    def __call__(self) -> bool:
        return _retire_worker(self.max_jobs, self.retire_at_kb)


class _NoLimit:
    """trio-parallel's limiter slot when the caller already holds one of ours."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_: object) -> None:
        return None


_NO_LIMIT = _NoLimit()
