"""The Manage profile's action replies, byte for byte as the NHS gateway gives them
(../shared/MANAGE-CONTRACT.md), and the 30 s deadline."""

from __future__ import annotations

import datetime
import json

import pytest
import trio

from appliance.relay.actions import CloudActions
from appliance.state import StatePaths
from appliance.worklist.store import WorklistStore

ACTION_ID = "5f0c3f3e-7d55-4b8e-9a53-0c7e1d1f2a10"


def create(accession: str = "ACC202612030001", action_id: str = ACTION_ID, **item) -> str:
    """A create_item exactly as Manage sends it: YYYYMMDD / HHMMSS, no zone."""
    worklist_item = {
        "accession_number": accession,
        "participant": {
            "nhs_number": "9990001234",
            "name": "SMITH^JANE",
            "birth_date": "19700101",
            "sex": "F",
        },
        "scheduled": {"date": "20261203", "time": "093000"},
        "procedure": {"modality": "MG", "study_description": "Breast screening"},
    } | item
    return json.dumps(
        {
            "schema_version": 1,
            "action_id": action_id,
            "action_type": "worklist.create_item",
            "timestamp": "2026-12-03T08:00:00Z",
            "source_system": "manage-breast-screening",
            "source_reference": {"appointment_id": "a-1", "participant_id": "p-1"},
            "parameters": {"worklist_item": worklist_item},
        }
    )


async def health() -> dict:
    return {
        "healthy": True,
        "version": "0.1.0",
        "degraded": [],
        "checks": {
            "storage_port": True,
            "worklist_port": True,
            "disk": {"ok": True, "free_bytes": 10_000, "free_percent": 42.5, "floor_bytes": 1},
        },
    }


@pytest.fixture
def worklist(tmp_path):
    store = WorklistStore(StatePaths(tmp_path))
    store.open()
    yield store
    store.close()


def manage(worklist: WorklistStore, **options) -> CloudActions:
    return CloudActions(
        worklist,
        health,
        profile="manage",
        scheduled_zone=options.pop("zone", "UTC"),
        listener_uptime=lambda: 3600.4,
        **options,
    )


async def test_create_item_replies_created_then_exists(worklist):
    actions = manage(worklist)
    assert json.loads(await actions.handle(create())) == {
        "status": "created",
        "action_id": ACTION_ID,
    }
    again = json.loads(await actions.handle(create(action_id="another")))
    assert again == {"status": "exists", "action_id": "another"}
    # Any accession already held is "exists", as Manage's gateway answers (the difference is
    # logged, the item unchanged).
    changed = create(participant={"nhs_number": "9990009999", "name": "OTHER^ONE"})
    assert json.loads(await actions.handle(changed))["status"] == "exists"
    assert worklist.get("ACC202612030001").patient_id == "9990001234"


@pytest.mark.parametrize(
    ("zone", "expected"),
    [("UTC", "09:30"), ("Europe/London", "09:30"), ("America/New_York", "14:30")],
)
async def test_the_scheduled_time_is_read_in_the_configured_zone(worklist, zone, expected):
    await manage(worklist, zone=zone).handle(create())
    at = worklist.get("ACC202612030001").scheduled_at.astimezone(datetime.UTC)
    assert at.strftime("%H:%M") == expected  # December: London is UTC


async def test_update_status_replies_and_not_found(worklist):
    actions = manage(worklist)
    await actions.handle(create())
    update = {
        "action_id": "u-1",
        "action_type": "worklist.update_status",
        "parameters": {"worklist_item": {"accession_number": "ACC202612030001",
                                         "status": "in progress"}},
    }  # fmt: skip
    assert json.loads(await actions.handle(json.dumps(update))) == {
        "accession_number": "ACC202612030001",
        "status": "updated",
    }
    update["parameters"]["worklist_item"]["accession_number"] = "ACC-NOPE"
    assert json.loads(await actions.handle(json.dumps(update))) == {
        "status": "error",
        "message": "Worklist item 'ACC-NOPE' not found",
    }


async def test_health_has_manage_s_shape(worklist):
    reply = json.loads(
        await manage(worklist).handle(json.dumps({"action_id": "h-1", "action_type": "health"}))
    )
    assert reply == {
        "status": "ok",
        "action_id": "h-1",
        "health": {
            "healthy": True,
            "version": "0.1.0",
            "listener_uptime_seconds": 3600,
            "checks": {
                "mwl_port": {"ok": True},
                "pacs_port": {"ok": True},
                "disk": {"ok": True, "free_bytes": 10_000, "free_percent": 42.5},
                "services": {"ok": True, "degraded": []},
            },
        },
    }


async def test_echo_and_unsupported(worklist):
    actions = manage(worklist)
    request = {"action_type": "echo", "anything": [1, 2]}
    assert json.loads(await actions.handle(json.dumps(request))) == {
        "status": "echo",
        "payload": request,
    }
    assert json.loads(await actions.handle(json.dumps({"action_type": "image.delete"}))) == {
        "status": "error",
        "message": "Unsupported action: image.delete",
    }


async def test_a_slow_handler_answers_an_error_before_the_deadline(worklist, autojump_clock):
    async def stuck() -> dict:
        await trio.sleep(3600)
        return {}

    actions = CloudActions(worklist, stuck, profile="manage", deadline_s=25.0)
    started = trio.current_time()
    reply = json.loads(await actions.handle(json.dumps({"action_type": "health"})))
    assert trio.current_time() - started == pytest.approx(25.0)
    assert reply["status"] == "error"
    assert "did not finish within 25 s" in reply["message"]


async def test_a_stalled_database_write_is_answered_before_the_deadline(worklist):
    """A disk that stalls the worklist's writer thread (fsync stuck): the cloud still gets an
    answer within the deadline, the write still lands afterwards, and asking again is safe."""
    import threading

    stalled = threading.Event()
    blocker = worklist.database._submit(stalled.wait, 30)  # the writer thread, held
    actions = CloudActions(worklist, health, profile="manage", deadline_s=0.5)
    started = trio.current_time()
    reply = json.loads(await actions.handle(create()))
    assert trio.current_time() - started < 2
    assert reply["status"] == "error"
    assert "did not finish within 0.5 s; it may still take effect" in reply["message"]
    stalled.set()
    await trio.to_thread.run_sync(blocker.result)
    await trio.to_thread.run_sync(worklist.database.run_sync, lambda: None)  # its queue drained
    assert worklist.get("ACC202612030001") is not None  # the write landed after all
    again = json.loads(await actions.handle(create()))
    assert again == {"status": "exists", "action_id": ACTION_ID}


async def test_a_test_participant_is_answered_as_create_and_examined_afterwards(worklist, nursery):
    """Manage's create_test_item: the reply is create's, at once; the simulated unit then runs
    in the background. Over the control socket (selftest) the reply waits for the exam."""
    import threading

    release = threading.Event()
    performed: list[str] = []

    class Unit:
        def run(self, accession: str, phases: list) -> list[str]:
            release.wait(10)
            phases.append(("store", 0.1))
            performed.append(accession)
            return ["1.2.3.4"]

    actions = CloudActions(worklist, health, profile="manage", test_unit=lambda _s: Unit())
    await nursery.start(actions.run)
    message = json.loads(create("TEST123456789001"))
    message["action_type"] = "worklist.create_test_item"
    with trio.fail_after(5):
        reply = json.loads(await actions.handle(json.dumps(message)))
    assert reply == {"status": "created", "action_id": ACTION_ID}
    assert performed == []  # the exam is still to come
    release.set()
    with trio.fail_after(10):
        while not performed:  # noqa: ASYNC110 (a thread's list)
            await trio.sleep(0.05)
    assert performed == ["TEST123456789001"]
    # Manage sends it again (a retry): the item exists, and no second exam is run.
    with trio.fail_after(5):
        again = json.loads(await actions.handle(json.dumps(message)))
    assert again == {"status": "exists", "action_id": ACTION_ID}
    await trio.sleep(0.2)
    assert performed == ["TEST123456789001"]
    # The operator's self-test waits for the exam and gets its phases.
    message["parameters"]["worklist_item"]["accession_number"] = "TEST123456789002"
    message["action_id"] = "selftest-TEST123456789002"
    local = json.loads(await actions.handle_local(json.dumps(message)))
    assert local["stored_instances"] == ["1.2.3.4"]
    assert local["test"] is True
    assert performed[-1] == "TEST123456789002"
    nursery.cancel_scope.cancel()


async def test_replies_keep_the_nhs_gateways_key_order(worklist):
    """Manage parses JSON, so order is not meaning; but the bytes are the NHS gateway's."""
    actions = manage(worklist)
    created = await actions.handle(create())
    assert created == json.dumps({"status": "created", "action_id": ACTION_ID})
    reply = await actions.handle(json.dumps({"action_type": "health", "action_id": "h-1"}))
    assert list(json.loads(reply)) == ["status", "action_id", "health"]
