"""image.fetch: the cloud pulls stored files through the relay emulator, resumes after a dropped
connection, checks every file's SHA-256; a shared token bucket limits the bandwidth."""

from __future__ import annotations

import json

import pydicom
import pytest
import trio

from appliance import audit
from appliance.relay.endpoint import RelayEndpoint
from appliance.relay.fetch import Bandwidth
from appliance.state import StatePaths
from appliance.testing import synthetic
from appliance.testing.cloud import FetchFailed, fetch, send_action
from tests.support import send_files
from tests.test_relay import KEY, KEY_NAME, cloud_and_appliance
from tests.test_security import trail

pytestmark = pytest.mark.usefixtures("dcmtk")


async def fetch_from(emulator, target, directory, **options):
    return await fetch(
        RelayEndpoint(emulator.endpoint, emulator.namespace, "actions", KEY_NAME, KEY),
        target,
        directory,
        **options,
    )


async def stored_study(tmp_path, app) -> list:
    paths = synthetic.screening_study(tmp_path / "study", shape=(700, 560))  # ~780 kB each
    statuses = await trio.to_thread.run_sync(send_files, app.ports["storage"], paths)
    assert [s.Status for s in statuses] == [0] * 4
    return paths


def on_disk(app, sop_instance_uid: str) -> bytes:
    layout = StatePaths(app.config.parent / "state")
    return layout.absolute(layout.relative_path(sop_instance_uid)).read_bytes()


@pytest.mark.system
async def test_a_study_fetch_resumes_after_a_dropped_connection(tmp_path, nursery):
    emulator, _, app = await cloud_and_appliance(tmp_path, nursery)
    try:
        paths = await stored_study(tmp_path, app)
        study = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
        dropped = []

        def drop_once_inside_the_second_file(uid: str, received: int) -> None:
            if len(list(out.glob("*.dcm"))) == 1 and received > 300_000 and not dropped:
                dropped.append((uid, received))
                emulator.drop()  # every TCP connection through the relay is cut

        out = tmp_path / "fetched"
        out.mkdir()
        with trio.fail_after(60):
            files = await fetch_from(
                emulator,
                {"study_instance_uid": study},
                out,
                on_chunk=drop_once_inside_the_second_file,
            )
    finally:
        app.stop()
        app.__exit__()
    assert dropped, "the connection was never dropped"
    assert len(files) == 4
    for file in files:
        assert file.read_bytes() == on_disk(app, file.stem)
    assert not list(out.glob("*.part"))
    log = app.log()
    assert "phase=control-channel" in log  # the listener saw the cut too, and came back
    assert log.count("fetch.done") == 1  # the resumed one
    # The audit trail: what the cloud was sent, the cut fetch as a partial transfer.
    sent = [e for e in trail(app) if e.event == "DICOM Instances Transferred"]
    assert [e.action for e in sent] == ["C", "R", "R"]  # stored, then the cut and the resumed
    cut, resumed = sent[1:]
    assert (cut.outcome, resumed.outcome) == (audit.MINOR_FAILURE, audit.SUCCESS)
    assert set(resumed.studies) == {study}
    source, receiver = (w["UserID"] for w in resumed.who)
    assert source == "SCREENING_GATEWAY"
    assert receiver.startswith("relay:")
    assert receiver.endswith("/actions")
    assert "image.fetch" in resumed.description


@pytest.mark.system
async def test_fetch_errors_are_structured_replies(tmp_path, nursery):
    emulator, _, app = await cloud_and_appliance(tmp_path, nursery)
    try:
        paths = await stored_study(tmp_path, app)
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)

        async def ask(parameters):
            text = json.dumps(
                {"action_type": "image.fetch", "action_id": "f", "parameters": parameters}
            )
            return json.loads(
                await send_action(
                    RelayEndpoint(emulator.endpoint, emulator.namespace, "actions", KEY_NAME, KEY),
                    text,
                )
            )

        with trio.fail_after(30):
            unknown = await ask({"sop_instance_uid": "1.2.3.4"})
            both = await ask({"sop_instance_uid": ds.SOPInstanceUID, "study_instance_uid": "1.2"})
            past = await ask({"sop_instance_uid": ds.SOPInstanceUID, "offset": 10**9})
            typed = await ask({"sop_instance_uid": ds.SOPInstanceUID, "offset": "ten"})
            with pytest.raises(FetchFailed, match="no stored instance"):
                await fetch_from(emulator, {"sop_instance_uid": "1.2.3.4"}, tmp_path)
            # After all that, a good fetch still works: nothing was taken down.
            [one] = await fetch_from(emulator, {"sop_instance_uid": ds.SOPInstanceUID}, tmp_path)
    finally:
        app.stop()
        app.__exit__()
    assert unknown == {"status": "error", "message": "no stored instance 1.2.3.4", "action_id": "f"}
    assert "exactly one" in both["message"]
    assert "past the end" in past["message"]
    assert "offset" in typed["message"]
    assert one.read_bytes() == on_disk(app, ds.SOPInstanceUID)


async def test_bandwidth_is_shared_and_bounded(autojump_clock):
    bucket = Bandwidth(1000)  # bytes per second, one second of burst

    async def send(count: int, chunks: int) -> None:
        for _ in range(chunks):
            await bucket.take(count)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, 500, 6)
        nursery.start_soon(send, 500, 6)
    # 6000 bytes at 1000 B/s with a 1000-byte burst: 5 seconds, however many senders.
    assert trio.current_time() - start == pytest.approx(5.0)
