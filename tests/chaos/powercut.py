"""Power cuts during a four-modality storm, on a filesystem that forgets what was not synced.

The appliance's whole state directory lives on tests/chaos/powercut_fs.py (FUSE). Four units
work through worklist items the cloud keeps creating (worklist query, MPPS N-CREATE, four
C-STOREs, MPPS N-SET) while events flow to the cloud. At a random moment the power is cut: the
appliance is killed, the filesystem keeps only what was fsynced (sometimes with the last
unsynced write torn), is remounted, and the appliance starts again. At the end:

- every instance that got Success is indexed, present and byte-identical to what was sent;
- no index row lacks its file, and no start's recovery found a row whose file had gone;
- both databases pass PRAGMA integrity_check after every cut;
- every MPPS acknowledged is there (in at least the acknowledged state), every worklist item
  the cloud was told was created is there;
- every event the cloud acknowledged still exists, and every other one is delivered after the
  restarts (nothing left undelivered).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import trio
from pynetdicom import AE, _config

from appliance.relay.endpoint import RelayEndpoint
from appliance.state import StatePaths
from appliance.storage.files import fsync_directory
from appliance.testing import synthetic
from appliance.testing.cloud import send_action
from appliance.testing.modality import ModalitySimulator
from appliance.testing.relay_emulator import RelayEmulator
from tests.chaos import Result
from tests.chaos.relay import KEY, KEY_NAME, _free_port, consumer
from tests.support import ApplianceProcess, dataset_bytes, write_config

UNITS = 4
SHAPE = (256, 208)
MPPS_ORDER = {"IN PROGRESS": 0, "COMPLETED": 1, "DISCONTINUED": 1}


class PowerCutDisk:
    """The FUSE daemon as a subprocess: mount, cut (keep what is durable), mount again."""

    def __init__(self, work: Path, tear: float, seed: int) -> None:
        self.mount = work / "powercut"
        self.image = work / "powercut.image"
        self.tear = tear
        self.rng = random.Random(seed)
        self.proc: subprocess.Popen[str] | None = None
        self.reports: list[dict[str, Any]] = []

    def start(self) -> None:
        self.mount.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.powercut_fs", str(self.mount), str(self.image),
             "--tear", str(self.tear), "--seed", str(self.rng.randrange(1 << 30))],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if '"mounted"' not in line:
            raise RuntimeError(f"the power-cut filesystem did not mount: {line!r}")

    def cut(self) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        report = json.loads(self.proc.stdout.readline())
        self.proc.wait(30)
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)
        self.reports.append(report)
        return report

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        subprocess.run(["umount", "-l", str(self.mount)], capture_output=True)


def _probe(disk: PowerCutDisk) -> list[str]:
    """The filesystem itself, before it is trusted: a cut keeps what was synced (file and
    directory) and forgets what was not, or every figure below would prove nothing."""
    synced, unsynced = disk.mount / "probe-synced", disk.mount / "probe-unsynced"
    with synced.open("wb") as stream:
        stream.write(b"kept")
        stream.flush()
        os.fsync(stream.fileno())
    fsync_directory(disk.mount)
    unsynced.write_bytes(b"forgotten")
    with synced.open("ab") as stream:
        stream.write(b" and not this")
    disk.cut()
    disk.start()
    problems = []
    if not synced.exists() or synced.read_bytes() != b"kept":
        problems.append("the power-cut filesystem lost or kept the wrong part of a synced file")
    if unsynced.exists():
        problems.append("the power-cut filesystem kept a file whose directory was never synced")
    synced.unlink()
    fsync_directory(disk.mount)
    return problems


class Ledger:
    """What the appliance acknowledged, as the units and the cloud saw it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.instances: dict[str, Path] = {}  # SOP Instance UID -> the file sent
        self.mpps: dict[str, str] = {}  # MPPS UID -> the furthest state acknowledged
        self.items: set[str] = set()  # accession numbers the cloud was told were created
        self.events: list[dict[str, Any]] = []  # envelopes the cloud acknowledged
        self.removed: set[str] = set()  # test participants whose removal was acknowledged
        self.ready: queue.SimpleQueue[str] = queue.SimpleQueue()  # items for the units


def _unit(
    number: int, ports: dict[str, int], ledger: Ledger, data: Path, stop: threading.Event
) -> None:
    """One mammography unit: item after item, retrying while the appliance is away."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    while not stop.is_set():
        try:
            accession = ledger.ready.get(timeout=0.5)
        except queue.Empty:
            continue
        sim = ModalitySimulator("127.0.0.1", ports["worklist"], ports["storage"],
                                calling_ae=f"UNIT{number}", shape=SHAPE)  # fmt: skip
        try:
            item = sim.query(accession)
            mpps_uid = sim.new_mpps_uid()
            with sim.mpps_association() as mpps:
                sim.mpps_start(mpps, item, mpps_uid)
                with ledger.lock:
                    ledger.mpps[mpps_uid] = "IN PROGRESS"
                stored = _store(ports["storage"], item, ledger, data / accession)
                sim.mpps_complete(mpps, mpps_uid, item, stored)
                with ledger.lock:
                    ledger.mpps[mpps_uid] = "COMPLETED"
        except Exception:  # the power went: this item is done again later, as a unit would
            ledger.ready.put(accession)
            time.sleep(0.3)


def _store(port: int, item: pydicom.Dataset, ledger: Ledger, folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for laterality, view in synthetic.SCREENING_VIEWS:
        ds = synthetic.mammogram(
            laterality=laterality, view=view, shape=SHAPE,
            patient_id=str(item.PatientID), patient_name=str(item.PatientName),
            accession_number=str(item.AccessionNumber),
            study_instance_uid=str(item.StudyInstanceUID),
            series_instance_uid=ModalitySimulator.series_uid(item),
        )  # fmt: skip
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append((str(ds.SOPInstanceUID), path))
    ae = AE("STORM")
    ae.add_requested_context(synthetic.MG_FOR_PRESENTATION, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="SCREENING_PACS")
    if not assoc.is_established:
        raise ConnectionError("no association")
    stored = []
    try:
        for uid, path in files:
            status = assoc.send_c_store(path)
            if not status or status.Status != 0:
                raise ConnectionError(f"C-STORE {status}")
            with ledger.lock:
                ledger.instances[uid] = path
            stored.append(uid)
    finally:
        assoc.release()
    return stored


def _create_item(accession: str, number: int, action: str = "worklist.create_item",
                 **extra: Any) -> str:  # fmt: skip
    return json.dumps({
        "schema_version": 1, "action_type": action,
        "action_id": f"create-{accession}", "timestamp": "2026-12-02T09:00:00Z",
        "source_system": "manage-breast-screening",
        "parameters": {"worklist_item": {
            "accession_number": accession,
            "participant": {"nhs_number": f"999{number:07d}", "name": "POWER^CUT",
                            "birth_date": "1970-01-01", "sex": "female"},
            "scheduled": {"date": "2026-12-02", "time": "09:30"},
            "procedure": {"modality": "MG", "study_description": "Screening"},
        }, **extra},
    })  # fmt: skip


async def _cloud(emulator: RelayEmulator, ledger: Ledger, stop: trio.Event) -> None:
    """Creates worklist items through the relay; an item counts once its reply said so."""
    endpoint = RelayEndpoint(emulator.endpoint, emulator.namespace, "actions", KEY_NAME, KEY)
    number = 0
    backlog: list[str] = []
    while not stop.is_set():
        if ledger.ready.qsize() < UNITS * 2:
            number += 1
            backlog.append(f"PC{number:05d}")
        for accession in list(backlog):
            try:
                with trio.fail_after(5):
                    reply = json.loads(await send_action(endpoint, _create_item(accession, number)))
            except Exception:
                break  # the appliance is away: try again
            if reply.get("status") != "error":
                with ledger.lock:
                    ledger.items.add(accession)
                ledger.ready.put(accession)
                backlog.remove(accession)
        await trio.sleep(0.2)


async def _test_participants(emulator: RelayEmulator, ledger: Ledger, stop: trio.Event) -> None:
    """The cloud's end-to-end test participant, over and over: created (a simulated unit stores
    four images), then removed. A removal acknowledged must stay done after any power cut."""
    endpoint = RelayEndpoint(emulator.endpoint, emulator.namespace, "actions", KEY_NAME, KEY)
    number = 0
    to_remove: list[str] = []

    async def ask(text: str) -> dict[str, Any]:
        with trio.fail_after(30):
            reply: dict[str, Any] = json.loads(await send_action(endpoint, text))
        return reply

    while not stop.is_set():
        try:
            for accession in list(to_remove):
                removal = json.dumps({
                    "schema_version": 1, "action_type": "worklist.remove_test_item",
                    "action_id": f"remove-{accession}",
                    "parameters": {"accession_number": accession},
                })  # fmt: skip
                reply = await ask(removal)
                if reply.get("status") == "removed":
                    with ledger.lock:
                        ledger.removed.add(accession)
                    to_remove.remove(accession)
                elif "no test item" in str(reply.get("message")):
                    to_remove.remove(accession)  # its creation was never acknowledged
            number += 1
            accession = f"PT{number:05d}"
            unit = {"calling_ae": "TESTUNIT", "rows": 128, "columns": 104}
            to_remove.append(accession)
            await ask(_create_item(accession, 50000 + number, "worklist.create_test_item",
                                   unit=unit))  # fmt: skip
        except Exception:
            pass  # the appliance is away: the next round tries again
        await trio.sleep(0.5)


def _integrity(state: Path) -> list[str]:
    problems = []
    for name in ("pacs.db", "worklist.db"):
        path = state / name
        if not path.exists():
            problems.append(f"{name} missing")
            continue
        with contextlib.closing(sqlite3.connect(path)) as db:
            found = db.execute("PRAGMA integrity_check").fetchall()
        if found != [("ok",)]:
            problems.append(f"{name}: {found[:3]}")
    return problems


def _rows(state: Path, db: str, sql: str) -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(f"file:{state / db}?mode=ro", uri=True)) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql).fetchall()


def _recoveries(log: str) -> list[dict[str, int]]:
    found = []
    for line in log.splitlines():
        if "event=storage.recovered" in line:
            fields = dict(re.findall(r"(\w+)=(\d+)", line))
            found.append({k: int(v) for k, v in fields.items()})
    return found


async def _scenario(work: Path, cuts: int, seed: int) -> Result:
    rng = random.Random(seed)
    ledger = Ledger()
    disk = PowerCutDisk(work, tear=0.5, seed=seed)
    broken: list[str] = []
    integrity_failures: list[str] = []
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        emulator = await nursery.start(RelayEmulator({KEY_NAME: KEY}).run)
        await nursery.start(consumer(emulator.endpoint, emulator.namespace, ledger.events).run)
        (work / "relay.key").write_bytes(KEY + b"\n")
        # Fixed ports: the units keep dialling the same address across restarts.
        ports = {"storage": _free_port(), "worklist": _free_port()}
        config = write_config(work, {
            "state_dir": str(disk.mount / "state"),
            "dicom": {"storage": {"port": ports["storage"]},
                      "worklist": {"port": ports["worklist"]}},
            "relay": {"enabled": True, "namespace": emulator.namespace,
                      "endpoint": emulator.endpoint, "key_file": str(work / "relay.key"),
                      "ping_interval_s": 2, "ping_timeout_s": 1},
            "pipeline": {"retry_after_s": 1},
        })  # fmt: skip
        stop_cloud = trio.Event()
        nursery.start_soon(_cloud, emulator, ledger, stop_cloud)
        nursery.start_soon(_test_participants, emulator, ledger, stop_cloud)
        stop_units = threading.Event()
        units: list[threading.Thread] = []
        logs: list[str] = []
        disk.start()
        broken += await trio.to_thread.run_sync(_probe, disk)
        disk.reports.clear()
        app: ApplianceProcess | None = None
        try:
            for cut in range(cuts + 1):
                app = ApplianceProcess(config).start()
                await trio.to_thread.run_sync(app.wait_ready, 60)
                if not units:
                    units = [
                        threading.Thread(target=_unit, daemon=True,
                                         args=(n, ports, ledger, work / "sent", stop_units))
                        for n in range(1, UNITS + 1)
                    ]  # fmt: skip
                    for thread in units:
                        thread.start()
                if cut == cuts:
                    break  # the last start: let everything settle
                await trio.sleep(rng.uniform(1.0, 4.0))
                app.proc.kill()  # the power goes: the process and everything not synced
                await trio.to_thread.run_sync(app.proc.wait, 10)
                app.__exit__()
                logs.append(app.log())
                await trio.to_thread.run_sync(disk.cut)
                await trio.to_thread.run_sync(disk.start)
                integrity_failures += [
                    f"cut {cut + 1}: {p}" for p in _integrity(disk.mount / "state")
                ]
                app.log_path.unlink()
            # Settle: no new items, units finish what they hold, pipeline and outbox drain.
            stop_cloud.set()
            await trio.sleep(5)
            stop_units.set()
            for thread in units:
                await trio.to_thread.run_sync(thread.join, 60)
            state = disk.mount / "state"
            drained = False
            deadline = trio.current_time() + 120
            while trio.current_time() < deadline:
                pending = _rows(state, "pacs.db", "SELECT count(*) FROM stored_instances WHERE"
                                " pipeline_state NOT IN ('DONE', 'FAILED')")[0][0]  # fmt: skip
                undelivered = sum(
                    _rows(state, db, "SELECT count(*) FROM events WHERE delivered_at IS NULL")[0][0]
                    for db in ("pacs.db", "worklist.db")
                )
                if pending == 0 and undelivered == 0:
                    drained = True
                    break
                await trio.sleep(1)
            assert app is not None
            app.stop()
            logs.append(app.log())
            app.__exit__()
            if not drained:
                broken.append(f"not drained: {pending} pipeline, {undelivered} events undelivered")
            figures = _verify(state, ledger, logs, broken)
        finally:
            stop_units.set()
            if app is not None:
                app.__exit__()
            disk.stop()
            nursery.cancel_scope.cancel()
    broken += integrity_failures
    torn = sum(1 for r in disk.reports if r["cut"]["torn"])
    figures = {"cuts": cuts, "torn_writes": torn, **figures,
               "integrity_failures": len(integrity_failures),
               "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
    return Result("power cut", not broken, figures, broken)


def _verify(state: Path, ledger: Ledger, logs: list[str], broken: list[str]) -> dict[str, Any]:
    layout = StatePaths(state)
    index = {
        r["sop_instance_uid"]: r for r in _rows(state, "pacs.db", "SELECT * FROM stored_instances")
    }
    lost = differ = 0
    for uid, sent in ledger.instances.items():
        row = index.get(uid)
        if row is None or row["status"] != "STORED":
            lost += 1
            continue
        stored = layout.absolute(row["storage_path"])
        if (
            not stored.exists()
            or dataset_bytes(stored) != dataset_bytes(sent)
            or hashlib.sha256(stored.read_bytes()).hexdigest() != row["storage_hash"]
        ):
            differ += 1
    if lost:
        broken.append(f"{lost} acknowledged instances lost")
    if differ:
        broken.append(f"{differ} acknowledged instances differ from what was sent")
    without_file = [u for u, r in index.items() if not layout.absolute(r["storage_path"]).exists()]
    if without_file:
        broken.append(f"{len(without_file)} index rows without their file")
    recoveries = [r for log in logs for r in _recoveries(log)]
    rows_missing = sum(r.get("rows_missing", 0) for r in recoveries)
    rows_corrupt = sum(r.get("rows_corrupt", 0) for r in recoveries)
    if rows_missing or rows_corrupt:
        broken.append(f"recovery found {rows_missing} rows without a file, {rows_corrupt} corrupt")
    mpps = {
        r["sop_instance_uid"]: r["status"]
        for r in _rows(state, "worklist.db", "SELECT * FROM mpps_instances")
    }
    mpps_lost = [
        u for u, s in ledger.mpps.items() if MPPS_ORDER.get(mpps.get(u, ""), -1) < MPPS_ORDER[s]
    ]
    if mpps_lost:
        broken.append(f"{len(mpps_lost)} acknowledged MPPS states lost")
    items = {
        r[0] for r in _rows(state, "worklist.db", "SELECT accession_number FROM worklist_items")
    }
    items_lost = ledger.items - items
    if items_lost:
        broken.append(f"{len(items_lost)} acknowledged worklist items lost")
    broken_derived = 0
    for row in index.values():
        for relative in (row["thumbnail_path"], row["preview_path"]):
            if not relative:
                continue
            jpeg = layout.derived_file(relative)
            data = jpeg.read_bytes() if jpeg.exists() else b""
            if not (data.startswith(b"\xff\xd8") and data.rstrip(b"\0").endswith(b"\xff\xd9")):
                broken_derived += 1
    if broken_derived:
        broken.append(f"{broken_derived} thumbnails/previews the index records are missing or torn")
    resurrected = [r for r in index.values() if r["accession_number"] in ledger.removed]
    if resurrected:
        broken.append(f"{len(resurrected)} images of removed test participants came back")
    events = {
        r[0]
        for db in ("pacs.db", "worklist.db")
        for r in _rows(state, db, "SELECT event_id FROM events")
    }
    acked = [e["event_id"] for e in ledger.events]
    vanished = set(acked) - events
    if vanished:
        broken.append(f"{len(vanished)} events the cloud acknowledged no longer exist")
    never = events - set(acked)
    if never:
        broken.append(f"{len(never)} events never delivered")
    return {
        "instances_acknowledged": len(ledger.instances), "lost": lost, "differ": differ,
        "orphans_reindexed": sum(r.get("files_reindexed", 0) for r in recoveries),
        "spool_files_removed": sum(r.get("spool_files_removed", 0) for r in recoveries),
        "mpps_acknowledged": len(ledger.mpps), "worklist_items": len(ledger.items),
        "test_participants_removed": len(ledger.removed), "derived_broken": broken_derived,
        "deletions_finished": sum(r.get("deletions_finished", 0) for r in recoveries),
        "events": len(events), "events_redelivered": len(acked) - len(set(acked)),
    }  # fmt: skip


def run(work: Path, cuts: int, seed: int = 7) -> Result:
    return trio.run(_scenario, work.resolve(), cuts, seed)
