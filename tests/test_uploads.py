"""Images to Manage over HTTPS, against an emulator of its API that verifies the gateway's
Entra tokens and applies its authorisation rules (appliance/testing/manage.py)."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import attrs
import pytest
import trio
from azure.core.credentials import AccessToken

from appliance import uploads
from appliance.config import CloudConfig
from appliance.identity import EntraTokens
from appliance.state import StatePaths
from appliance.storage.index import StoredInstance
from appliance.storage.store import InstanceStore
from appliance.testing import synthetic
from appliance.testing.entra import EntraEmulator
from appliance.testing.manage import ManageAction, ManageEmulator
from appliance.uploads import ImageUploader
from appliance.worklist.store import WorklistItem, WorklistStore

AUDIENCE = "api://manage-test"
ACTION = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


class Tenant:
    """Tokens signed by the test tenant, as azure-identity would return them."""

    def __init__(self, entra: EntraEmulator) -> None:
        self.entra = entra
        self.issued = 0
        #: Requests made past the library's token cache (a claims challenge).
        self.past_the_cache = 0

    def get_token(self, *scopes: str, claims: str | None = None) -> AccessToken:
        self.issued += 1
        self.past_the_cache += claims is not None
        resource = scopes[0].removesuffix("/.default")
        return AccessToken(self.entra.token(resource), int(time.time()) + 3600)


class Site:
    def __init__(self, root: Path, entra: EntraEmulator, manage: ManageEmulator) -> None:
        state = root / "state"
        state.mkdir()
        self.paths = StatePaths(state)
        self.worklist = WorklistStore(self.paths)
        self.worklist.open()
        self.store = InstanceStore(self.paths)
        self.store.open()
        self.tenant = Tenant(entra)
        self.tokens = EntraTokens(lambda: self.tenant)
        self.manage = manage
        config = CloudConfig(profile="manage", api_url=manage.url, api_audience=AUDIENCE)
        self.uploader = ImageUploader(self.store, self.worklist, config, self.tokens)
        self.root = root
        self._n = 0

    def item(self, accession: str, action_id: str = ACTION) -> None:
        at = datetime.datetime.now(datetime.UTC)
        self.worklist.create(
            WorklistItem(accession, "9990001234", "UP^LOAD", at, source_message_id=action_id)
        )

    def image(
        self, accession: str, study: str = "1.2.3", queued: bool = True, **row
    ) -> StoredInstance:
        self._n += 1
        ds = synthetic.mammogram(
            shape=(64, 52), accession_number=accession, study_instance_uid=study
        )
        relative = f"{self._n:02d}/image.dcm"
        path = self.paths.storage / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        instance = StoredInstance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            storage_path=relative,
            file_size=path.stat().st_size,
            storage_hash="h",
            study_instance_uid=study,
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            created_at=f"2026-12-03T10:00:{self._n:02d}.000+00:00",
            accession_number=accession,
        )
        instance = attrs.evolve(instance, **row)
        if queued:  # indexed as a C-STORE indexes it: its upload queued in that transaction
            self.store.database.run_sync(self.store.index.store, instance)
        else:  # as recovery reindexes a file, or a release before uploads
            self.store.database.run_sync(self.store.index.insert, instance)
        return instance

    def settled(self) -> int:
        """Uploads with an outcome (done, failed, skipped)."""
        return sum(row["state"] != "PENDING" for row in self.rows().values())

    def rows(self) -> dict[str, dict]:
        with self.store.database.reader() as db:
            rows = db.execute("SELECT * FROM uploads").fetchall()
        return {row["sop_instance_uid"]: dict(row) for row in rows}

    async def until(self, done, within: float = 20) -> None:
        with trio.fail_after(within):
            while not done():  # noqa: ASYNC110 (the database, not an event)
                await trio.sleep(0.05)


@pytest.fixture
def entra():
    with EntraEmulator().running() as tenant:  # its sockets closed after the test
        yield tenant


@pytest.fixture
def manage(entra):
    emulator = ManageEmulator(entra.jwks(), entra.issuer, AUDIENCE)
    emulator.actions[ACTION] = ManageAction(gateway_oid=entra.oid)
    with emulator.running():
        yield emulator


@pytest.fixture
def site(tmp_path, entra, manage, monkeypatch):
    monkeypatch.setattr(uploads, "SWEEP_INTERVAL_S", 0.05)
    monkeypatch.setattr(uploads, "BACKOFF_S", (0.05, 0.1))
    found = Site(tmp_path, entra, manage)
    yield found
    found.store.close()
    found.worklist.close()


async def test_an_image_is_uploaded_as_received_once(site, nursery):
    site.item("ACC1")
    images = [site.image("ACC1") for _ in range(3)]
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.settled() == 3)
    rows = site.rows()
    assert {row["state"] for row in rows.values()} == {"DONE"}
    assert all(row["instance_id"] for row in rows.values())
    # As received: its UIDs kept; in the order they arrived (one study, one at a time).
    assert [sop for _action, sop in site.manage.instances] == [i.sop_instance_uid for i in images]
    assert site.manage.uploads(201) == [ACTION] * 3
    names = {i.sop_instance_uid: f"{i.sop_instance_uid}.dcm" for i in images}
    assert site.manage.filenames == names
    for image in images:  # byte for byte the stored file
        stored = (site.paths.storage / image.storage_path).read_bytes()
        assert site.manage.received[image.sop_instance_uid] == stored
    nursery.cancel_scope.cancel()


async def test_a_re_upload_is_idempotent(site, nursery):
    site.item("ACC1")
    image = site.image("ACC1")
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.rows().get(image.sop_instance_uid, {}).get("state") == "DONE")
    first = site.rows()[image.sop_instance_uid]["instance_id"]
    # As after a crash between Manage's 201 and our record: the image is sent again.
    await site.store.write(site.uploader.queue.record, image.sop_instance_uid, "PENDING",
                           next_attempt_at="2000-01-01T00:00:00.000+00:00")  # fmt: skip
    await site.until(lambda: len(site.manage.uploads(201)) == 2)
    await site.until(lambda: site.rows()[image.sop_instance_uid]["state"] == "DONE")
    assert site.rows()[image.sop_instance_uid]["instance_id"] == first
    assert len(site.manage.instances) == 1
    nursery.cancel_scope.cancel()


async def test_a_refused_token_is_renewed_and_the_upload_goes_through(site, nursery):
    site.item("ACC1")
    image = site.image("ACC1")
    await site.tokens.get(AUDIENCE)  # cached, then revoked on Manage's side
    site.manage.tokens_valid_from = int(time.time()) + 1
    await trio.sleep(1.1)
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.rows().get(image.sop_instance_uid, {}).get("state") == "DONE")
    assert [status for method, _a, status in site.manage.log if method == "PUT"] == [401, 201]
    assert site.tenant.issued == 2
    assert site.tenant.past_the_cache == 1  # the refused token is not handed back from cache
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "arrange",
    [
        lambda manage: manage.actions.update({ACTION: ManageAction("another-gateway")}),
        lambda manage: setattr(manage.actions[ACTION], "status", "image_failed"),
    ],
    ids=["not-this-gateway", "after-a-failure-report"],
)
async def test_a_refusal_retrying_cannot_fix_is_recorded_once(site, nursery, arrange):
    site.item("ACC1")
    image = site.image("ACC1")
    arrange(site.manage)
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.rows().get(image.sop_instance_uid, {}).get("state") == "FAILED")
    await trio.sleep(0.3)
    assert [code for method, _a, code in site.manage.log if method == "PUT"] == [403]
    row = site.rows()[image.sop_instance_uid]
    assert (row["attempts"], row["last_status"]) == (1, 403)
    nursery.cancel_scope.cancel()


async def test_a_500_that_may_pass_is_retried_until_it_does(site, nursery):
    """The appointment not yet in progress (the cloud has not caught up): retried."""
    site.item("ACC1")
    image = site.image("ACC1")
    site.manage.actions[ACTION].appointment_in_progress = False
    await nursery.start(site.uploader.run)
    await site.until(lambda: len(site.manage.uploads(500)) >= 2)
    site.manage.actions[ACTION].appointment_in_progress = True
    await site.until(lambda: site.rows()[image.sop_instance_uid]["state"] == "DONE")
    assert site.rows()[image.sop_instance_uid]["attempts"] >= 3
    nursery.cancel_scope.cancel()


async def test_a_500_naming_a_fault_in_the_image_is_final(site, nursery):
    site.item("ACC1")
    image = site.image("ACC1")
    site.manage.actions[ACTION].study_instance_uid = "9.9.9"  # the study is another action's
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.rows().get(image.sop_instance_uid, {}).get("state") == "FAILED")
    assert "another action" in site.rows()[image.sop_instance_uid]["error"]
    nursery.cancel_scope.cancel()


async def test_a_503_storm_then_recovery_loses_nothing_and_duplicates_nothing(site, nursery):
    for study, accession in (("1.2.3", "ACC1"), ("1.2.4", "ACC2")):
        site.item(accession, action_id=f"{ACTION}-{accession}")
        site.manage.actions[f"{ACTION}-{accession}"] = ManageAction(site.tenant.entra.oid)
        for _ in range(3):
            site.image(accession, study=study)
    site.manage.script = [503] * 8
    await nursery.start(site.uploader.run)
    await site.until(lambda: [r["state"] for r in site.rows().values()].count("DONE") == 6)
    assert len(site.manage.instances) == 6
    assert len(site.manage.uploads(201)) == 6
    assert len(site.manage.uploads(503)) == 8
    nursery.cancel_scope.cancel()


async def test_what_manage_does_not_take_is_not_uploaded_and_says_why(site, nursery):
    site.item("ACC1")
    tomo = site.image("ACC1", sop_class_uid=synthetic.BREAST_TOMOSYNTHESIS)
    large = site.image("ACC1", file_size=101 * 1024 * 1024)
    local = site.image("ACC9")  # no cloud-created item
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.settled() == 3)
    rows = site.rows()
    assert {rows[i.sop_instance_uid]["state"] for i in (tomo, large, local)} == {"SKIPPED"}
    assert "not accepted by Manage" in rows[tomo.sop_instance_uid]["error"]
    assert "100 MiB" in rows[large.sop_instance_uid]["error"]
    assert "not created by the cloud" in rows[local.sop_instance_uid]["error"]
    assert site.manage.log == []
    nursery.cancel_scope.cancel()


async def test_operators_see_and_retry_failed_uploads(site, nursery, tmp_path):
    import subprocess
    import sys

    from tests.support import write_config

    site.item("ACC1")
    image = site.image("ACC1")
    site.manage.actions[ACTION] = ManageAction("another-gateway")
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.rows().get(image.sop_instance_uid, {}).get("state") == "FAILED")
    nursery.cancel_scope.cancel()
    config = write_config(tmp_path)  # state_dir = tmp_path / "state", the site's

    def appliance(*args: str) -> str:
        command = [sys.executable, "-m", "appliance", "--config", str(config), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    listing = await trio.to_thread.run_sync(appliance, "outbox", "list")
    assert f"upload FAILED            {image.sop_instance_uid}  HTTP 403" in listing
    retried = await trio.to_thread.run_sync(appliance, "outbox", "retry", "--all")
    assert "1 failed upload(s) will be tried again" in retried
    assert site.rows()[image.sop_instance_uid]["state"] == "PENDING"


async def test_a_study_keeps_its_order_while_one_image_backs_off(site, nursery):
    site.item("ACC1")
    images = [site.image("ACC1") for _ in range(3)]
    site.manage.script = [503]  # the first image's first try
    await nursery.start(site.uploader.run)
    await site.until(lambda: [r["state"] for r in site.rows().values()].count("DONE") == 3)
    assert [sop for _action, sop in site.manage.instances] == [i.sop_instance_uid for i in images]
    nursery.cancel_scope.cancel()


async def test_retention_under_manage_takes_only_what_has_a_final_upload_outcome(site):
    from appliance.outbox import Outbox

    site.item("ACC1")
    never = site.image("ACC1", queued=False)
    waiting, done = (site.image("ACC1") for _ in range(2))
    for image in (never, waiting, done):
        await site.store.write(site.store.index.finish, image, "DONE", "image.received", {}, None)
    outbox = Outbox({"images": site.store.database})
    for event in await trio.to_thread.run_sync(outbox.pending, 10):  # as LocalRecord does
        await trio.to_thread.run_sync(outbox.delivered, event)
    later = "2100-01-01T00:00:00.000+00:00"
    await site.store.write(
        site.uploader.queue.record, waiting.sop_instance_uid, "PENDING", next_attempt_at=later
    )
    await site.store.write(site.uploader.queue.record, done.sop_instance_uid, "DONE")

    def candidates(require_upload: bool) -> list[str]:
        found = site.store.reader.retention_candidates(later, False, 10, require_upload)
        return sorted(c.sop_instance_uid for c in found)

    assert candidates(True) == [done.sop_instance_uid]
    # Without uploads in play, only the waiting upload is kept back.
    assert candidates(False) == sorted([never.sop_instance_uid, done.sop_instance_uid])


async def test_instances_indexed_without_an_upload_are_queued_at_start(site, nursery):
    """Recovery's reindexed files and a database from before uploads: recent images are
    queued when the uploader starts, older ones recorded as skipped (Manage would refuse them,
    and retention under manage waits for an outcome)."""
    site.item("ACC1")
    now = datetime.datetime.now(datetime.UTC)
    recent = site.image("ACC1", queued=False, created_at=now.isoformat(timespec="milliseconds"))
    old = site.image(
        "ACC1",
        study="1.2.4",
        queued=False,
        created_at=(now - datetime.timedelta(days=30)).isoformat(timespec="milliseconds"),
    )
    assert site.rows() == {}
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.settled() == 2)
    rows = site.rows()
    assert rows[recent.sop_instance_uid]["state"] == "DONE"
    assert rows[old.sop_instance_uid]["state"] == "SKIPPED"
    assert "before uploads" in rows[old.sop_instance_uid]["error"]
    assert [sop for _action, sop in site.manage.instances] == [recent.sop_instance_uid]
    nursery.cancel_scope.cancel()


async def test_an_image_stored_while_running_is_uploaded_without_waiting_for_a_sweep(
    site, nursery, monkeypatch
):
    """The commit that indexes an image wakes the uploader: no poll between them."""
    monkeypatch.setattr(uploads, "SWEEP_INTERVAL_S", 3600)
    site.item("ACC1")
    await nursery.start(site.uploader.run)
    await trio.sleep(0.2)  # the start's sweep has found nothing
    image = await trio.to_thread.run_sync(site.image, "ACC1")
    await site.until(lambda: site.settled() == 1, within=10)
    assert site.rows()[image.sop_instance_uid]["state"] == "DONE"
    nursery.cancel_scope.cancel()


async def test_a_server_asking_to_wait_is_given_the_time_it_asked(site, nursery, monkeypatch):
    """429/503 with Retry-After: the next try no sooner than asked (within our cap)."""
    monkeypatch.setattr(uploads, "BACKOFF_S", (0.05, 60.0))
    site.item("ACC1")
    image = site.image("ACC1")
    site.manage.script = [429]
    site.manage.retry_after = 30
    await nursery.start(site.uploader.run)
    await site.until(lambda: len(site.manage.uploads(429)) == 1)
    await site.until(lambda: site.rows()[image.sop_instance_uid]["attempts"] == 1)
    row = site.rows()[image.sop_instance_uid]
    wait = datetime.datetime.fromisoformat(row["next_attempt_at"]) - datetime.datetime.now(
        datetime.UTC
    )
    assert 25 < wait.total_seconds() <= 31, wait
    assert row["state"] == "PENDING"
    assert row["last_status"] == 429
    nursery.cancel_scope.cancel()


async def test_uploads_draw_on_the_uplink_budget_image_fetch_uses(site, nursery):
    """One budget for the clinic's uplink: an upload takes its bytes from the same bucket as
    image.fetch (app.py gives both the one Bandwidth), so together they stay under it."""
    from appliance.relay.fetch import Bandwidth

    rate = 2_000_000  # bytes per second, one second of burst
    site.uploader._bandwidth = Bandwidth(rate)
    site.item("ACC1")
    image = site.image("ACC1")
    path = site.paths.storage / image.storage_path
    with path.open("ab") as grown:  # 5 MB: Manage reads only the header and UIDs
        grown.write(b"\0" * 5_000_000)
    started = trio.current_time()
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.settled() == 1)
    elapsed = trio.current_time() - started
    assert site.rows()[image.sop_instance_uid]["state"] == "DONE"
    assert elapsed >= (path.stat().st_size - rate) / rate, elapsed
    nursery.cancel_scope.cancel()


async def test_an_image_stored_again_after_its_row_went_is_stored_and_uploaded_again(site, nursery):
    """An upload row left behind by a deleted image never fails the image's next C-STORE."""
    site.item("ACC1")
    image = site.image("ACC1")
    await site.store.write(site.store.index.delete, image.sop_instance_uid)
    await site.store.write(site.uploader.queue.record, image.sop_instance_uid, "DONE")
    assert site.rows() == {}  # an outcome for a gone image leaves nothing

    def stale_row() -> None:  # as releases before rows went with their image left
        with site.store.database.transaction():
            site.uploader.queue.enqueue(image)

    await site.store.write(stale_row)
    await site.store.write(site.uploader.queue.record, image.sop_instance_uid, "DONE")
    await site.store.write(site.store.index.store, image)  # the unit sends it again
    assert site.rows()[image.sop_instance_uid]["state"] == "PENDING"
    await nursery.start(site.uploader.run)
    await site.until(lambda: site.settled() == 1)
    assert site.rows()[image.sop_instance_uid]["state"] == "DONE"
    nursery.cancel_scope.cancel()
