"""Pixel work (decoding, proving, rendering) in worker processes, never in the DICOM process.

Codecs hold the interpreter lock for seconds per mammogram (JPEG Lossless, JPEG-LS, signed JPEG
2000), and the DICOM process's associations share that lock: in one interpreter, a C-ECHO waited
1.8 s behind a render. So every pixel decode runs in a worker process (trio-parallel: processes
for Trio, spawned, not forked from a threaded process):

- bounded in number (`pipeline.workers`, default one fewer than the cores) and niced, so the
  associations keep a core and win contention for the others;
- bounded in memory: each worker's address space is capped (`pipeline.worker_memory_mb`) and a
  worker whose peak resident size passed half of that is retired after its job, as is every
  worker after `pipeline.worker_max_images` jobs (codecs are C: leaks and fragmentation die with
  the process);
- a job that takes longer than `pipeline.render_timeout_s` is killed; a worker that dies (a
  codec's segfault, the kernel's OOM killer, an operator's kill) fails only its job. Both come
  back to the caller as a RenderError with phase ``worker``, which the pipeline retries and, after
  its last attempt, reports as ``image.failed``.

Jobs return plain outcomes, not exceptions, so that nothing a codec raises has to survive
pickling.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import trio
import trio_parallel  # type: ignore[import-untyped]  # no type information shipped

from appliance.config import PipelineConfig
from appliance.log import get_logger
from appliance.pipeline.render import RenderError, Rendition, render
from appliance.storage.structure import CannotCheck, Unsound, decode_all
from appliance.supervisor import Criticality

log = get_logger("pipeline")

#: Worker processes run at this nice level, below the DICOM process.
WORKER_NICENESS = 10
#: An idle worker exits after this long (a quiet site holds no decoder memory).
IDLE_TIMEOUT_S = 120.0


class PixelsBroken(RenderError):
    """A frame of the stored pixel data does not decode: the image can never be committed."""

    def __init__(self, reason: str) -> None:
        super().__init__("decode", reason)

    def __reduce__(self) -> tuple[type[PixelsBroken], tuple[str]]:  # type: ignore[override]
        return type(self), (self.reason,)


# -- in the worker ------------------------------------------------------------------------------

_jobs_done = 0


def _peak_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux


def _start_worker(memory_bytes: int) -> bool:
    os.nice(WORKER_NICENESS)
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    return True


def _retire_worker(max_jobs: int, retire_at_kb: int) -> bool:
    global _jobs_done
    _jobs_done += 1
    return _jobs_done >= max_jobs or (retire_at_kb > 0 and _peak_rss_kb() >= retire_at_kb)


Outcome = tuple[str, Any, int]  # ("ok", value, peak) | ("unsound"|"error", reason, peak)


def _outcome(job: Callable[[], Any]) -> Outcome:
    try:
        return "ok", job(), _peak_rss_kb()
    except Unsound as exc:
        return "unsound", exc.reason, _peak_rss_kb()
    except CannotCheck as exc:  # the machine's trouble (memory, I/O): retried
        return "error", ("decode", str(exc)), _peak_rss_kb()
    except RenderError as exc:
        return "error", (exc.phase, exc.reason), _peak_rss_kb()
    except MemoryError:
        return "error", ("worker", "out of memory (pipeline.worker_memory_mb)"), _peak_rss_kb()
    except Exception as exc:  # a codec's anything: this image's failure
        return "error", ("render", f"{type(exc).__name__}: {exc}"[:500]), _peak_rss_kb()


def prove_and_render_job(source: str, renditions: Sequence[Rendition], prove: bool) -> Outcome:
    """Every frame decoded first when the pixel data is not yet proved whole (storage
    commitment confirms an encapsulated image only after this), then the renditions."""

    def job() -> list[bytes] | None:
        if prove:
            decode_all(Path(source))
        return render(Path(source), renditions)

    return _outcome(job)


def prove_job(source: str) -> Outcome:
    return _outcome(lambda: decode_all(Path(source)))


# -- in the DICOM process -----------------------------------------------------------------------


class PixelWorkers:
    """The supervised pool of worker processes, shared by the image pipeline and storage
    commitment."""

    name = "pixel-workers"
    criticality = Criticality.AUXILIARY

    def __init__(self, config: PipelineConfig) -> None:
        self.count = config.workers or max((os.cpu_count() or 1) - 1, 1)
        self._limiter = trio.CapacityLimiter(self.count)
        self._timeout = config.render_timeout_s
        memory = config.worker_memory_mb * 1024 * 1024
        self._start = functools.partial(_start_worker, memory)
        self._retire = functools.partial(
            _retire_worker, config.worker_max_images, config.worker_memory_mb * 1024 // 2
        )
        self._context: trio_parallel.WorkerContext | None = None
        self._ready = trio.Event()
        self.jobs = 0
        self.lost = 0  # killed for time or died
        self.peak_rss_kb = 0

    def statistics(self) -> dict[str, Any]:
        return {
            "workers": self.count,
            "busy": self._limiter.borrowed_tokens,
            "waiting": self._limiter.statistics().tasks_waiting,
            "jobs": self.jobs,
            "lost": self.lost,
            "peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio_parallel.open_worker_context(
            idle_timeout=IDLE_TIMEOUT_S,
            init=self._start,
            retire=self._retire,
            grace_period=5.0,
        ) as context:
            self._context = context
            self._ready.set()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._context = None
                self._ready = trio.Event()

    async def render(
        self, source: Path, renditions: Sequence[Rendition], prove: bool
    ) -> list[bytes] | None:
        """JPEG bytes per rendition (None: no pixel data). Raises PixelsBroken when proving
        found the pixel data broken, RenderError for anything else."""
        jpegs: list[bytes] | None = await self._run(
            prove_and_render_job, str(source), list(renditions), prove
        )
        return jpegs

    async def prove(self, source: Path) -> str | None:
        """Why the pixel data is broken, or None when every frame decodes. Raises RenderError
        when this could not be found out (the machine's trouble, not the data's)."""
        try:
            await self._run(prove_job, str(source))
        except PixelsBroken as exc:
            return exc.reason
        return None

    async def _run(self, job: Callable[..., Outcome], *args: Any) -> Any:
        async with self._slot() as context:
            with trio.move_on_after(self._timeout) as deadline:
                try:
                    kind, value, peak = await context.run_sync(
                        job, *args, kill_on_cancel=True, limiter=_NO_LIMIT
                    )
                except trio_parallel.BrokenWorkerError as exc:
                    self.lost += 1
                    raise RenderError("worker", f"worker process died: {exc}") from None
            if deadline.cancelled_caught:
                self.lost += 1
                raise RenderError(
                    "worker",
                    f"no result after {self._timeout:g} s (pipeline.render_timeout_s): "
                    "worker killed",
                )
        self.jobs += 1
        self.peak_rss_kb = max(self.peak_rss_kb, peak)
        if kind == "ok":
            return value
        if kind == "unsound":
            raise PixelsBroken(value)
        raise RenderError(*value)

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[trio_parallel.WorkerContext]:
        """A worker's turn: waits for the pool to be up and for a free worker, not counted in
        the job's time limit."""
        async with self._limiter:
            await self._ready.wait()
            assert self._context is not None
            yield self._context


class _NoLimit:
    """trio-parallel's limiter slot when the caller already holds one of ours."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_: object) -> None:
        return None


_NO_LIMIT = _NoLimit()
