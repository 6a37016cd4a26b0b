"""What operators rely on, against the running appliance: `status --json` through a restart, a
backlog and a stopped relay; `selftest` passing, and failing with the phase named; the metrics
file as Prometheus parses it, moving with traffic."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from appliance.testing import synthetic
from appliance.testing.relay_emulator import RelayEmulator
from tests.support import ApplianceProcess, send_files, write_config
from tests.test_relay import KEY, KEY_NAME, events_consumer, relay_settings, wait_until

pytestmark = [pytest.mark.usefixtures("dcmtk"), pytest.mark.system]


def cli(config, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def status(config) -> dict:
    result = await trio.to_thread.run_sync(cli, config, "status", "--json")
    return json.loads(result.stdout)


async def status_until(config, condition, within: float = 30) -> dict:
    with trio.fail_after(within):
        while True:
            found = await status(config)
            if condition(found):
                return found
            await trio.sleep(0.3)


class StoppableRelay:
    """The relay emulator in its own cancel scope, so a test can take the relay away."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.emulator = RelayEmulator({KEY_NAME: KEY})

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            await self.emulator.run(task_status=task_status)


async def appliance_with_relay(tmp_path, nursery, override: dict | None = None):
    relay = StoppableRelay()
    await nursery.start(relay.run)
    config = write_config(
        tmp_path,
        {"relay": relay_settings(tmp_path, relay.emulator), "studies": {"check_interval_s": 0.5}}
        | (override or {}),
    )
    app = ApplianceProcess(config)
    app.start()
    await trio.to_thread.run_sync(app.wait_ready)
    return relay, config, app


async def test_status_json_follows_a_restart_a_backlog_and_a_stopped_relay(tmp_path, nursery):
    relay = StoppableRelay()
    await nursery.start(relay.run)
    relay.emulator.missing.add("actions")  # the listener's hybrid connection is not there (404)
    config = write_config(tmp_path, {"relay": relay_settings(tmp_path, relay.emulator)})
    app = ApplianceProcess(config)
    app.start()
    try:
        await trio.to_thread.run_sync(app.wait_ready)
        await wait_until(lambda: ("missing", "actions") in relay.emulator.refusals)
        # A deleted hybrid connection is a loud, lasting state, not an exit: DICOM stores on.
        broken = await status_until(config, lambda s: bool(s["relay"]["listener"]["misconfigured"]))
        assert "HTTP 404" in broken["relay"]["listener"]["misconfigured"]
        human = await trio.to_thread.run_sync(cli, config, "status")
        assert "relay listener MISCONFIGURED: HTTP 404" in human.stdout
        image = tmp_path / "one.dcm"
        synthetic.mammogram(shape=(96, 80)).save_as(image, enforce_file_format=True)
        [stored] = await trio.to_thread.run_sync(send_files, app.ports["storage"], [image])
        assert stored.Status == 0
        await trio.sleep(3)  # several listen attempts later: still one event, still no restart
        assert app.log().count("event=relay.misconfigured") == 1
        relay.emulator.missing.clear()  # an operator recreates the hybrid connection
        fixed = await status_until(
            config,
            lambda s: (
                s["relay"]["listener"]["connected"] and not s["relay"]["listener"]["misconfigured"]
            ),
            within=60,
        )
        assert fixed["services"]["relay-listener"]["restarts"] == 0
        assert "event=relay.configured" in app.log()
        # Nobody listens on the events connection: the image's event waits, and status says so.
        backlog = await status_until(config, lambda s: s["outbox"]["undelivered"] >= 1)
        assert backlog["outbox"]["oldest_undelivered"]

        relay.scope.cancel()  # the relay is gone altogether
        stopped = await status_until(config, lambda s: not s["relay"]["listener"]["connected"])
        assert stopped["running"] is True  # DICOM goes on without the cloud
        assert stopped["relay"]["listener"]["failures_by_phase"]
        human = await trio.to_thread.run_sync(cli, config, "status")
        assert "relay: listener DOWN" in human.stdout
    finally:
        app.__exit__()


async def test_selftest_passes_through_the_relay_and_cleans_up(tmp_path, nursery):
    relay, config, app = await appliance_with_relay(tmp_path, nursery)
    received: list[dict] = []
    await nursery.start(events_consumer(relay.emulator, received).run)
    try:
        result = await trio.to_thread.run_sync(cli, config, "selftest", "--json")
        report = json.loads(result.stdout)
        after = await trio.to_thread.run_sync(cli, config, "worklist", "list", "--all", "--json")
    finally:
        app.__exit__()
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["ok"] is True
    assert [p["phase"] for p in report["phases"]] == [
        "appliance", "worklist-item", "worklist-query", "mpps-start", "store", "mpps-complete",
        "thumbnails", "study-complete", "events-acked", "cleanup",
    ]  # fmt: skip
    workflow = [e for e in received if e["event_type"].startswith(("worklist.", "mpps."))]
    assert workflow  # the cloud heard the test participant's workflow, marked as test
    assert all(e["payload"]["test"] is True for e in workflow)
    assert "SELFTEST" not in after.stdout  # the test item is gone
    assert not list((tmp_path / "state" / "storage").rglob("*.dcm"))


def test_selftest_without_the_relay_leaves_nothing_behind(tmp_path):
    config = write_config(tmp_path, {"studies": {"check_interval_s": 0.5}})
    with ApplianceProcess(config):
        result = cli(config, "selftest")
        after = json.loads(cli(config, "status", "--json").stdout)
    assert result.returncode == 0, result.stdout
    assert "events-acked     --  skipped: relay not configured" in result.stdout
    assert after["outbox"]["undelivered"] == 0
    assert not list((tmp_path / "state" / "storage").rglob("*.dcm"))
    assert not list((tmp_path / "state" / "derived").rglob("*.jpg"))
    # The appliance removed its own rows: none of the participant's is left in either database.
    for database, tables in (
        ("pacs.db", ("stored_instances", "studies", "events")),
        ("worklist.db", ("worklist_items", "worklist_archive", "mpps_instances", "events")),
    ):
        with sqlite3.connect(tmp_path / "state" / database) as db:
            counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
        assert set(counts.values()) == {0}, (database, counts)
    assert "event=action.done action_type=worklist.remove_test_item" in app_log(tmp_path)


def test_retention_by_hand_is_a_dry_run_while_the_appliance_runs(tmp_path):
    config = write_config(tmp_path, {"retention": {"keep_days": 30}})
    with ApplianceProcess(config):
        refused = cli(config, "retention")
        dry = cli(config, "retention", "--dry-run")
    assert refused.returncode == 2
    assert "use --dry-run" in refused.stderr
    assert dry.returncode == 0
    assert dry.stdout.startswith("retention: would delete 0 images")
    stopped = cli(config, "retention")  # the appliance is stopped now: a real pass runs
    assert (stopped.returncode, stopped.stdout[:25]) == (0, "retention: deleted 0 imag")


async def test_selftest_names_the_events_phase_when_the_cloud_never_acknowledges(tmp_path, nursery):
    _, config, app = await appliance_with_relay(tmp_path, nursery)
    try:  # no consumer on the events connection: nothing is ever acknowledged
        result = await trio.to_thread.run_sync(cli, config, "selftest", "--timeout", "4")
    finally:
        app.__exit__()
    assert result.returncode == 1
    assert "selftest FAILED in phase events-acked" in result.stdout
    assert "thumbnails" in result.stdout  # the phases before it passed and were reported


async def test_selftest_names_the_store_phase_when_storage_refuses(tmp_path, nursery):
    override = {"dicom": {"storage": {"port": 0, "min_free_mb": 10**9}}}  # below the floor
    _, config, app = await appliance_with_relay(tmp_path, nursery, override)
    try:
        result = await trio.to_thread.run_sync(cli, config, "selftest", "--json")
    finally:
        app.__exit__()
    report = json.loads(result.stdout)
    assert (result.returncode, report["failed_phase"]) == (1, "store")
    assert "0xa700" in report["detail"].lower() or "A700" in report["detail"]


def samples(path) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_file_parses_and_counters_move_with_traffic(tmp_path):
    config = write_config(tmp_path)
    images = []
    for n in range(3):
        images.append(tmp_path / f"{n}.dcm")
        synthetic.mammogram(shape=(96, 80)).save_as(images[-1], enforce_file_format=True)
    metrics = tmp_path / "state" / "metrics.prom"
    with ApplianceProcess(config) as app:
        await wait_until(metrics.exists)
        before = samples(metrics)
        statuses = await trio.to_thread.run_sync(send_files, app.ports["storage"], images)
        assert [s.Status for s in statuses] == [0, 0, 0]
        await trio.to_thread.run_sync(
            lambda: subprocess.run(
                ["findscu", "-W", "-aec", "SCREENING_MWL", "-k", "PatientName",
                 "127.0.0.1", str(app.ports["worklist"])],
                check=True, capture_output=True, timeout=30,
            )
        )  # fmt: skip

        thumbnails = ("screening_gateway_images_processed_total", (("outcome", "thumbnail"),))
        with trio.fail_after(20):
            while samples(metrics).get(thumbnails, 0) < 3:  # noqa: ASYNC110 (a file, not an event)
                await trio.sleep(0.3)
        after = samples(metrics)
    stored = ("screening_gateway_c_store_total", (("status", "0x0000"),))
    assert before.get(stored, 0) == 0
    assert after[stored] == 3
    assert (
        after[("screening_gateway_c_store_bytes_total", ())]
        >= sum(p.stat().st_size for p in images) * 0.9
    )
    assert after[("screening_gateway_c_find_total", (("service", "worklist"),))] == 1
    accepted = ("screening_gateway_associations_total",
                (("outcome", "accepted"), ("server", "SCREENING_PACS")))  # fmt: skip
    assert after[accepted] == before.get(accepted, 0) + 1
    assert after[("screening_gateway_up", ())] == 1
    assert after[("screening_gateway_disk_free_bytes", ())] > 0


def app_log(tmp_path) -> str:
    return (tmp_path / "appliance.log").read_text()
