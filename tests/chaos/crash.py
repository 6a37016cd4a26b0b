"""Crash during ingest: four dcmtk storescu senders, the appliance killed (-9) at random moments.

After every cycle the senders resend what they were not told was stored, as units do. At the
end: every instance that got Success is indexed and stored with a matching SHA-256 and the
bytes that were sent; the spool is empty and no stored file lacks its row; the pipeline
produced exactly one image.received event per instance.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from appliance.state import StatePaths
from appliance.testing import synthetic
from tests.chaos import Result
from tests.support import ApplianceProcess, dataset_bytes, write_config

SENDERS = 4


def _sender(port: int, files: list[Path], acked: set[Path], lock: threading.Lock) -> None:
    """storescu over one association; records the files whose response was Success."""
    result = subprocess.run(
        ["storescu", "-v", "-aec", "SCREENING_PACS", "-aet", "MODALITY1",
         "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    sent: list[int] = []
    for line in result.stderr.splitlines() + result.stdout.splitlines():
        request = re.search(r"Sending Store Request \(MsgID (\d+)", line)
        if request:
            sent.append(int(request[1]))
        elif "Received Store Response (Success)" in line and sent:
            with lock:
                acked.add(files[sent[-1] - 1])


def _senders(
    port: int, pending: list[Path], acked: set[Path], lock: threading.Lock
) -> list[threading.Thread]:
    """SENDERS storescu processes at once, each with its share of what is still unacked."""
    threads = [
        threading.Thread(target=_sender, args=(port, pending[i::SENDERS], acked, lock))
        for i in range(SENDERS)
    ]
    for thread in threads:
        thread.start()
    return threads


def _index(state: Path) -> dict[str, sqlite3.Row]:
    with sqlite3.connect(f"file:{state / 'pacs.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return {r["sop_instance_uid"]: r for r in db.execute("SELECT * FROM stored_instances")}


def _received_events(state: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{state / 'pacs.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT json_extract(payload, '$.sop_instance_uid'), count(*) FROM events"
            " WHERE event_type = 'image.received' GROUP BY 1"
        ).fetchall()
    return dict(rows)


def run(work: Path, cycles: int, studies: int) -> Result:
    """`studies` new four-view studies arrive in every cycle, beside what is still unacked."""
    data = work / "crash-data"
    files: list[Path] = []
    (work / "crash").mkdir(parents=True, exist_ok=True)
    config = write_config(work / "crash")
    state = work / "crash" / "state"
    acked: set[Path] = set()
    lock = threading.Lock()
    kills = unacked_at_kills = 0
    started = time.monotonic()
    rng = random.Random(11)
    for cycle in range(cycles):
        for number in range(studies):
            files += synthetic.screening_study(
                data / f"c{cycle}s{number}", shape=(512, 416), accession_number=f"C{cycle}S{number}"
            )
        app = ApplianceProcess(config).start()
        try:
            app.wait_ready()
            pending = [p for p in files if p not in acked]
            threads = _senders(app.ports["storage"], pending, acked, lock)
            time.sleep(rng.uniform(0.05, 0.6))  # mid-ingest (a cycle's batch takes ~0.5-1 s)
            app.proc.send_signal(signal.SIGKILL)
            app.proc.wait(10)
            kills += 1
            for thread in threads:
                thread.join(60)
            unacked_at_kills += sum(1 for p in pending if p not in acked)  # kill came first
        finally:
            app.__exit__()
    uid_of = {p: synthetic_uid(p) for p in files}
    # Last start: recovery, then every remaining file, then wait for the pipeline.
    with ApplianceProcess(config) as app:
        for thread in _senders(
            app.ports["storage"], [p for p in files if p not in acked], acked, lock
        ):
            thread.join(600)
        # The pipeline works through what the kills left behind: wait while it makes progress.
        drain_started = last_progress = time.monotonic()
        done = -1
        while time.monotonic() - last_progress < 60:
            finished = len(_received_events(state))
            if finished >= len(_index(state)):
                break
            if finished > done:
                done, last_progress = finished, time.monotonic()
            time.sleep(0.5)
        pipeline_drain_s = time.monotonic() - drain_started
        app.stop()
    index = _index(state)
    events = _received_events(state)
    layout = StatePaths(state)
    broken = []
    mismatched = missing = 0
    for path in acked:
        row = index.get(uid_of[path])
        if row is None or row["status"] != "STORED":
            missing += 1
            continue
        stored = layout.absolute(row["storage_path"])
        data_ok = stored.exists() and dataset_bytes(stored) == dataset_bytes(path)
        if not data_ok or hashlib.sha256(stored.read_bytes()).hexdigest() != row["storage_hash"]:
            mismatched += 1
    if missing:
        broken.append(f"{missing} acknowledged instances not in the index")
    if mismatched:
        broken.append(f"{mismatched} stored files differ from what was acknowledged")
    spool = list((state / "spool").iterdir())
    rows_by_path = {r["storage_path"] for r in index.values()}
    orphans = [
        p for p in layout.storage.rglob("*") if p.is_file()
        and str(p.relative_to(layout.storage)) not in rows_by_path
    ]  # fmt: skip
    if spool:
        broken.append(f"{len(spool)} spool files left after recovery")
    if orphans:
        broken.append(f"{len(orphans)} stored files without an index row")
    twice = [uid for uid, n in events.items() if n != 1]
    never = [uid for uid in index if uid not in events]
    if twice:
        broken.append(f"{len(twice)} instances with more than one image.received")
    if never:
        broken.append(f"{len(never)} instances the pipeline never finished")
    shutil.rmtree(data, ignore_errors=True)
    return Result(
        "crash during ingest",
        not broken,
        {
            "kills": kills,
            "unacked_at_kills": unacked_at_kills,
            "instances": len(files),
            "acknowledged": len(acked),
            "indexed": len(index),
            "events": sum(events.values()),
            "pipeline_drain_s": round(pipeline_drain_s, 1),
            "seconds": round(time.monotonic() - started, 1),
        },
        broken,
    )


def synthetic_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
