"""Supervision in virtual time: restarts with backoff, escalation of essential services only,
side-matters degraded and restarted for ever, siblings left alone."""

from __future__ import annotations

import pytest
import trio

from appliance.metrics import METRICS
from appliance.sdnotify import Notifier
from appliance.supervisor import Criticality, RestartBudgetExceeded, RestartPolicy, Supervisor

POLICY = RestartPolicy(initial_backoff=1.0, max_backoff=4.0, max_restarts=3, window=60.0)


class FlakyService:
    """Crashes right after starting, `crashes` times, then serves forever."""

    def __init__(
        self, name: str, crashes: int, criticality: Criticality = Criticality.ESSENTIAL
    ) -> None:
        self.name = name
        self.criticality = criticality
        self.crashes = crashes
        self.started_at: list[float] = []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.started_at.append(trio.current_time())
        task_status.started()
        if len(self.started_at) <= self.crashes:
            raise RuntimeError(f"{self.name} crash {len(self.started_at)}")
        await trio.sleep_forever()


class NeverStarts:
    name = "never-starts"
    criticality = Criticality.ESSENTIAL

    def __init__(self) -> None:
        self.attempts: list[float] = []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.attempts.append(trio.current_time())
        raise OSError("address already in use")


async def test_crashing_service_restarts_with_doubling_backoff(autojump_clock):
    flaky = FlakyService("flaky", crashes=3)
    supervisor = Supervisor([(flaky, POLICY)], Notifier({}))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    # start at 0; crashes at 0, 1, 3 -> restarts after 1, 2, 4 s
    assert flaky.started_at == [0.0, 1.0, 3.0, 7.0]
    state = supervisor.statistics()["flaky"]
    assert (state.state, state.restarts) == ("up", 3)
    assert "flaky crash 3" in state.last_error


async def test_sibling_is_untouched_while_a_service_crashes(autojump_clock):
    flaky = FlakyService("flaky", crashes=3)
    steady = FlakyService("steady", crashes=0)
    supervisor = Supervisor([(flaky, POLICY), (steady, POLICY)], Notifier({}))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert len(flaky.started_at) == 4
    assert steady.started_at == [0.0]
    assert supervisor.statistics()["steady"].restarts == 0


async def test_budget_exceeded_escalates_and_cancels_siblings(autojump_clock):
    broken = FlakyService("broken", crashes=1000)
    steady = FlakyService("steady", crashes=0)
    supervisor = Supervisor([(steady, POLICY), (broken, POLICY)], Notifier({}))
    with pytest.RaisesGroup(pytest.RaisesExc(RestartBudgetExceeded, match="broken failed 4 times")):
        await supervisor.run()
    # 3 restarts allowed (after 1, 2, 4 s); the 4th crash inside the window escalates.
    assert broken.started_at == [0.0, 1.0, 3.0, 7.0]
    assert trio.current_time() == 7.0


async def test_failures_outside_the_window_do_not_count(autojump_clock):
    policy = RestartPolicy(initial_backoff=10.0, max_backoff=40.0, max_restarts=1, window=15.0)

    class CrashesEvery30s:
        name = "slow-crasher"
        criticality = Criticality.ESSENTIAL
        starts = 0

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
            self.starts += 1
            task_status.started()
            await trio.sleep(30)
            raise RuntimeError("periodic")

    service = CrashesEvery30s()
    supervisor = Supervisor([(service, policy)], Notifier({}))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(500)
        nursery.cancel_scope.cancel()
    # Each crash is alone in its 15 s window, so the budget of one is never exceeded.
    assert service.starts > 10


async def test_ready_is_reported_only_after_every_service_started(autojump_clock):
    never = NeverStarts()
    supervisor = Supervisor([(never, POLICY)], Notifier({}))
    with pytest.RaisesGroup(pytest.RaisesExc(RestartBudgetExceeded)):
        await supervisor.run()
    assert never.attempts == [0.0, 1.0, 3.0, 7.0]
    assert supervisor.summary().startswith("starting:")


class PhasedFailure(Exception):
    phase = "status-write"


class FailsUntil:
    """An auxiliary service that crashes (with a phase) until `healthy_at`, then serves."""

    name = "side"
    criticality = Criticality.AUXILIARY

    def __init__(self, healthy_at: float, fails_before_started: bool = False) -> None:
        self.healthy_at = healthy_at
        self.fails_before_started = fails_before_started
        self.starts = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.starts += 1
        if not self.fails_before_started:
            task_status.started()
        if trio.current_time() < self.healthy_at:
            raise PhasedFailure("disk full")
        if self.fails_before_started:
            task_status.started()
        await trio.sleep_forever()


async def test_an_auxiliary_service_never_escalates_and_is_degraded_then_recovered(
    autojump_clock, caplog
):
    caplog.set_level("DEBUG", logger="appliance")
    side = FailsUntil(healthy_at=600.0)
    steady = FlakyService("dicom", crashes=0)
    before = METRICS.value("service_failures_total", service="side")
    supervisor = Supervisor([(steady, POLICY), (side, POLICY)], Notifier({}))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await trio.sleep(300)
        state = supervisor.statistics()["side"]
        # Far past the budget of 3 in 60 s, backoff capped at 4 s: still restarting, degraded.
        assert side.starts > 60
        assert state.degraded
        assert state.last_phase == "status-write"
        assert "disk full" in state.last_error
        assert "side=restarting/degraded" in supervisor.summary()
        assert METRICS.value("service_failures_total", service="side") - before == side.starts
        await trio.sleep(600)  # healthy from t=600, stable for a window by t=~665
        assert not supervisor.statistics()["side"].degraded
        nursery.cancel_scope.cancel()
    assert steady.started_at == [0.0]  # the essential sibling never noticed
    events = [r.getMessage() for r in caplog.records if r.levelname != "DEBUG"]
    assert events.count("service.degraded") == 1  # once per change of state, not per retry
    assert events.count("service.recovered") == 1
    assert "service.gave_up" not in events


async def test_an_auxiliary_service_that_cannot_start_does_not_hold_back_ready(autojump_clock):
    side = FailsUntil(healthy_at=10**9, fails_before_started=True)
    dicom = FlakyService("dicom", crashes=0)
    supervisor = Supervisor([(side, POLICY), (dicom, POLICY)], Notifier({}))
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        assert trio.current_time() == 0.0
        assert supervisor.summary().startswith("ready:")
        assert dicom.started_at == [0.0]
        await trio.sleep(100)
        assert side.starts > 20
        assert supervisor.statistics()["side"].state == "restarting"
        nursery.cancel_scope.cancel()
