"""Uploads to Manage (profile manage): four modalities send a four-view FFDM study each at
once; how long from each image's C-STORE response (its index row) to Manage's 201, and the
upload throughput, against the Manage API emulator on this machine (one fresh appliance per
round). What a clinic session looks like to Manage is printed too: the requests it answered."""

from __future__ import annotations

import datetime
import re
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from appliance.state import StatePaths
from appliance.testing.entra import EntraEmulator
from appliance.testing.manage import ManageAction, ManageEmulator
from appliance.worklist.store import WorklistItem, WorklistStore
from tests.bench.storage import send, studies
from tests.support import ApplianceProcess, write_config

AUDIENCE = "api://manage-bench"


def _p(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _latencies(state: Path) -> list[float]:
    with sqlite3.connect(f"file:{state / 'pacs.db'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT s.created_at, u.updated_at FROM uploads u JOIN stored_instances s"
            " ON s.sop_instance_uid = u.sop_instance_uid WHERE u.state = 'DONE'"
        ).fetchall()
    parse = datetime.datetime.fromisoformat
    return [(parse(done) - parse(stored)).total_seconds() * 1000 for stored, done in rows]


def _put_ms(log: str) -> list[float]:
    """Each upload's own time (token, PUT, Manage's answer), from its upload.done line."""
    return [float(m) for m in re.findall(r"event=upload\.done ms=(\d+)", log)]


def one_round(
    all_studies: list[list[Path]], workdir: Path
) -> tuple[list[float], list[float], float, Counter]:
    directory = Path(tempfile.mkdtemp(dir=workdir))
    state = directory / "state"
    state.mkdir()
    with EntraEmulator().running() as entra:
        manage = ManageEmulator(entra.jwks(), entra.issuer, AUDIENCE)
        worklist = WorklistStore(StatePaths(state))
        worklist.open()
        now = datetime.datetime.now(datetime.UTC)
        for study in all_studies:
            accession = f"BENCH{int(study[0].parent.name.split('-')[1]):04d}"  # studies()' own
            action = f"action-{accession}"
            worklist.create(
                WorklistItem(accession, "9990000001", "BENCH^UP", now, source_message_id=action)
            )
            manage.actions[action] = ManageAction(gateway_oid=entra.oid)
        worklist.close()
        settings = {
            "cloud": {"profile": "manage", "api_url": manage.url, "api_audience": AUDIENCE},
            "relay": {"fetch_kbps": 0},  # the uplink budget off: the appliance's own speed
        }
        with (
            manage.running(),
            ApplianceProcess(write_config(directory, settings), env=entra.environment()) as app,
        ):
            started = time.perf_counter()
            send(app.ports["storage"], "SCREENING_PACS", all_studies)  # one association each
            expected = sum(map(len, all_studies))
            deadline = time.monotonic() + 300
            while len(manage.uploads(201)) < expected and time.monotonic() < deadline:
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            while len(latencies := _latencies(state)) < expected and time.monotonic() < deadline:
                time.sleep(0.05)  # the last outcomes are being recorded
            puts = _put_ms(app.log())
        seen = Counter(f"{method} {status}" for method, _action, status in manage.log)
    shutil.rmtree(directory, ignore_errors=True)
    megabytes = sum(p.stat().st_size for s in all_studies for p in s) / 1e6
    return latencies, puts, megabytes / seconds, seen


def queue_scale(workdir: Path, instances: int = 200_000) -> tuple[float, float]:
    """The upload queue with a large index (rows generated directly, not sent): the due query
    each sweep runs, and the start's scan for instances without a row (ms)."""
    from appliance.storage.store import InstanceStore
    from appliance.uploads import UploadQueue

    root = Path(tempfile.mkdtemp(dir=workdir))
    store = InstanceStore(StatePaths(root))
    store.open()
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    with sqlite3.connect(root / "pacs.db") as db:
        db.executemany(
            "INSERT INTO stored_instances (sop_instance_uid, storage_path, file_size,"
            " storage_hash, study_instance_uid, sop_class_uid, transfer_syntax_uid, created_at)"
            " VALUES (?, ?, 1, 'h', ?, '1.2.840.10008.5.1.4.1.1.1.2', '1.2.840.10008.1.2.1', ?)",
            [(f"1.2.{i}", f"p/{i}", f"9.{i // 4}", now) for i in range(instances)],
        )
        db.executemany(
            "INSERT INTO uploads (sop_instance_uid, state, next_attempt_at, updated_at)"
            " VALUES (?, ?, ?, ?)",
            [
                (f"1.2.{i}", "PENDING" if i >= instances - 8 else "DONE", now, now)
                for i in range(instances)
            ],
        )
    queue = UploadQueue(store.database)
    try:
        started = time.perf_counter()
        store.database.run_sync(queue.due, now, 200)
        due_ms = (time.perf_counter() - started) * 1000
        started = time.perf_counter()
        store.database.run_sync(queue.backfill, now, 2000)
        return due_ms, (time.perf_counter() - started) * 1000
    finally:
        store.close()


def main(rounds: int) -> None:
    root = Path.cwd() / "var"
    cache = root / "bench-data"
    cache.mkdir(parents=True, exist_ok=True)
    all_studies = studies(cache, 4)
    workdir = Path(tempfile.mkdtemp(dir=root, prefix="bench-uploads-"))
    latencies: list[float] = []
    puts: list[float] = []
    rates: list[float] = []
    seen: Counter = Counter()
    try:
        for _ in range(rounds):
            found, put, rate, answered = one_round(all_studies, workdir)
            latencies += found
            puts += put
            rates.append(rate)
            seen = answered
        due_ms, backfill_ms = queue_scale(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nuploads bench: 4 modalities x 4 FFDM (27 MB each) at once, {rounds} rounds,"
        f" Manage emulator on this machine, no uplink budget (relay.fetch_kbps = 0)"
        f"\n  stored -> 201: n={len(latencies)} p50 {_p(latencies, 50):.0f} ms,"
        f" p95 {_p(latencies, 95):.0f} ms"
        f"\n  of which the PUT itself (token, send, Manage's answer): p50 {_p(puts, 50):.0f} ms,"
        f" p95 {_p(puts, 95):.0f} ms; the rest waits for its turn (its study's earlier images,"
        f" the concurrency bound)"
        f"\n  C-STORE start -> last 201: {statistics.median(rates):.0f} MB/s (median of rounds)"
        f"\n  what Manage answered in the last round: {dict(seen)}"
        f"\n  queue at 200,000 indexed instances: due query {due_ms:.1f} ms per sweep,"
        f" start's scan for unqueued instances {backfill_ms:.0f} ms once"
    )
