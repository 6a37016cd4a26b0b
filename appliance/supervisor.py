"""One Trio nursery supervising every long-running service, with restart policies.

A service is any object with a ``name`` and ``async def run(self, *, task_status)`` that calls
``task_status.started()`` once it is really serving and then runs until cancelled. A crash is
logged with its traceback and the service alone restarts after a backoff; siblings are untouched.
More crashes than the policy allows within its window re-raises ``RestartBudgetExceeded``, which
cancels everything: the process exits non-zero and systemd restarts it.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import attrs
import trio
from attrs import frozen

from appliance import errors
from appliance.log import get_logger
from appliance.sdnotify import Notifier

log = get_logger("supervisor")

#: How often STATUS= is refreshed when no watchdog is configured.
STATUS_INTERVAL = 5.0


class Service(Protocol):
    name: str

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


@attrs.define
class ServiceState:
    name: str
    state: Literal["starting", "up", "restarting"] = "starting"
    since: float = attrs.field(factory=time.time)
    restarts: int = 0
    last_error: str | None = None

    def enter(self, state: Literal["starting", "up", "restarting"]) -> None:
        self.state = state
        self.since = time.time()


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
        self._states = {service.name: ServiceState(service.name) for service, _ in services}
        self._ready = False

    def statistics(self) -> dict[str, ServiceState]:
        return dict(self._states)

    def summary(self) -> str:
        """One line for STATUS= and `appliance status`."""
        parts = []
        for state in self._states.values():
            note = f" x{state.restarts}" if state.restarts else ""
            parts.append(f"{state.name}={state.state}{note}")
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
        failures: collections.deque[float] = collections.deque()
        first_start = True
        while True:
            state.enter("starting")
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.run)
                    state.enter("up")
                    self._notifier.status(self.summary())
                    if first_start:
                        first_start = False
                        task_status.started()
                raise ServiceReturned(f"{service.name}.run() returned")
            except Exception as exc:
                now = trio.current_time()
                failures.append(now)
                while failures[0] <= now - policy.window:
                    failures.popleft()
                state.last_error = errors.describe(exc)
                if len(failures) > policy.max_restarts:
                    log.exception(
                        "service.gave_up", service_name=service.name, failures=len(failures)
                    )
                    raise RestartBudgetExceeded(service.name, len(failures), policy.window) from exc
                delay = policy.backoff(len(failures))
                log.exception("service.crashed", service_name=service.name, restart_in_s=delay)
                state.enter("restarting")
                self._notifier.status(self.summary())
                await trio.sleep(delay)
                state.restarts += 1
