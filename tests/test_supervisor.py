"""Supervision in virtual time: restarts with backoff, escalation, siblings left alone."""

from __future__ import annotations

import pytest
import trio

from appliance.sdnotify import Notifier
from appliance.supervisor import RestartBudgetExceeded, RestartPolicy, Supervisor

POLICY = RestartPolicy(initial_backoff=1.0, max_backoff=4.0, max_restarts=3, window=60.0)


class FlakyService:
    """Crashes right after starting, `crashes` times, then serves forever."""

    def __init__(self, name: str, crashes: int) -> None:
        self.name = name
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
