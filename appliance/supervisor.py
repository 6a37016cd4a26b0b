"""One Trio nursery supervising every long-running service, with restart policies.

A service is any object with a ``name``, a ``criticality`` and ``async def run(self, *,
task_status)`` that calls ``task_status.started()`` once it is really serving and then runs until
cancelled. A crash restarts the service alone after a backoff; siblings are untouched. What more
crashes mean is the service's declared criticality:

- ESSENTIAL (the DICOM servers and what they cannot work without): more crashes than the policy
  allows within its window re-raise ``RestartBudgetExceeded``, which cancels everything: the
  process exits non-zero and systemd restarts it (a fresh process may cure what a restart did not).
- AUXILIARY (relay, image pipeline, housekeepers, status, control socket): restarts for ever with
  the capped backoff and never takes the process down. While it keeps failing it is *degraded*:
  `appliance status` and `health` show it with its last error and phase, the
  service_failures_total metric counts each failure, and the log has one event per change of
  state (``service.degraded``, ``service.recovered``), not one per retry.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import attrs
import trio
from attrs import frozen

from appliance import errors
from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.sdnotify import Notifier

log = get_logger("supervisor")

#: How often STATUS= is refreshed when no watchdog is configured.
STATUS_INTERVAL = 5.0


class Criticality(enum.Enum):
    ESSENTIAL = "essential"  # the clinic cannot image without it: escalates past its budget
    AUXILIARY = "auxiliary"  # a side-matter: restarts for ever, shown degraded meanwhile


class Service(Protocol):
    name: str
    criticality: Criticality

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None: ...


@frozen
class RestartPolicy:
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    #: Crashes tolerated within ``window`` seconds; one more escalates.
    max_restarts: int = 5
    window: float = 60.0

    def backoff(self, recent_failures: int) -> float:
        """Delay before the next start, doubling with each failure still inside the window."""
        doubled: float = self.initial_backoff * 2 ** max(recent_failures - 1, 0)
        return min(doubled, self.max_backoff)


class RestartBudgetExceeded(Exception):
    def __init__(self, service: str, failures: int, window: float) -> None:
        super().__init__(f"{service} failed {failures} times within {window:g} s")
        self.service = service


class ServiceReturned(Exception):
    """A service's run() returned although services run until cancelled."""


State = Literal["starting", "up", "restarting"]


@attrs.define
class ServiceState:
    name: str
    criticality: str
    state: State = "starting"
    since: float = attrs.field(factory=time.time)
    restarts: int = 0
    failures: int = 0
    last_error: str | None = None
    #: Where the last failure happened: the exception's ``phase`` attribute, or "run".
    last_phase: str | None = None
    #: Failing and not yet stable again (up for a whole window since the last failure).
    degraded: bool = False

    def enter(self, state: State) -> None:
        self.state = state
        self.since = time.time()


def phase_of(exc: BaseException) -> str:
    for leaf in errors.leaves(exc):
        phase = getattr(leaf, "phase", None)
        if isinstance(phase, str):
            return phase
    return "run"


class Supervisor:
    def __init__(
        self,
        services: Sequence[tuple[Service, RestartPolicy]],
        notifier: Notifier,
        describe: Callable[[], str] = lambda: "",
    ) -> None:
        self._services = services
        self._notifier = notifier
        self._describe = describe
        self._states = {
            service.name: ServiceState(service.name, service.criticality.value)
            for service, _ in services
        }
        self._ready = False

    def statistics(self) -> dict[str, ServiceState]:
        return dict(self._states)

    def summary(self) -> str:
        """One line for STATUS= and `appliance status`."""
        parts = []
        for state in self._states.values():
            note = f" x{state.restarts}" if state.restarts else ""
            degraded = "/degraded" if state.degraded else ""
            parts.append(f"{state.name}={state.state}{degraded}{note}")
        extra = self._describe()
        head = "ready" if self._ready else "starting"
        return f"{head}: {' '.join(parts)}" + (f"; {extra}" if extra else "")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeat)
            for service, policy in self._services:
                await nursery.start(self._supervise, service, policy)
            self._ready = True
            self._notifier.ready(self.summary())
            log.info("supervisor.ready", services=len(self._services))
            task_status.started()

    async def _heartbeat(self) -> None:
        # Pings come from the event loop itself: a wedged loop stops them and systemd's watchdog
        # fires, which is the point. Startup is bounded by TimeoutStartSec, so pings begin at READY.
        interval = self._notifier.watchdog_interval or STATUS_INTERVAL
        deadline = trio.current_time()
        while True:
            if self._notifier.watchdog_interval and self._ready:
                self._notifier.watchdog()
            self._notifier.status(self.summary())
            deadline += interval
            await trio.sleep_until(deadline)

    async def _supervise(
        self,
        service: Service,
        policy: RestartPolicy,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        state = self._states[service.name]
        essential = service.criticality is Criticality.ESSENTIAL
        failures: collections.deque[float] = collections.deque()
        first_start = True
        while True:
            state.enter("starting")
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._serve, service)
                    state.enter("up")
                    self._notifier.status(self.summary())
                    if first_start:
                        first_start = False
                        task_status.started()
                    if state.degraded:
                        nursery.start_soon(self._settle, state, policy.window)
            except Exception as exc:
                now = trio.current_time()
                failures.append(now)
                while failures[0] <= now - policy.window:
                    failures.popleft()
                state.failures += 1
                state.last_error = errors.describe(exc)[:500]
                state.last_phase = phase_of(exc)
                METRICS.inc("service_failures_total", service=service.name)
                fields = {"service_name": service.name, "phase": state.last_phase}
                if essential and len(failures) > policy.max_restarts:
                    log.exception("service.gave_up", failures=len(failures), **fields)
                    raise RestartBudgetExceeded(service.name, len(failures), policy.window) from exc
                delay = policy.backoff(len(failures))
                if essential:
                    log.exception("service.crashed", restart_in_s=delay, **fields)
                elif not state.degraded:
                    log.exception("service.degraded", restart_in_s=delay, **fields)
                else:  # still failing: counted, shown in status, not logged again
                    log.debug("service.crashed", restart_in_s=delay, **fields)
                state.degraded = True
                state.enter("restarting")
                self._notifier.status(self.summary())
                if first_start and not essential:
                    # A side-matter that cannot start does not hold the clinic's service back.
                    first_start = False
                    task_status.started()
                await trio.sleep(delay)
                state.restarts += 1

    @staticmethod
    async def _serve(
        service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await service.run(task_status=task_status)
        raise ServiceReturned(f"{service.name}.run() returned")

    async def _settle(self, state: ServiceState, window: float) -> None:
        """Up for a whole window after failing: no longer degraded."""
        await trio.sleep(window)
        state.degraded = False
        log.info("service.recovered", service_name=state.name, failures=state.failures)
        self._notifier.status(self.summary())
