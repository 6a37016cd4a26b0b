"""Image pipeline: thumbnail time per FFDM against dcmtk's dcmj2pnm on the same file, and
C-STORE response -> image event recorded with four modalities sending at once."""

from __future__ import annotations

import datetime
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.uid import JPEG2000Lossless

from appliance.pipeline.render import Rendition, render
from tests.bench.storage import send, studies
from tests.support import ApplianceProcess, write_config

THUMBNAIL = [Rendition(188, 25)]
BOTH = [Rendition(188, 25), Rendition(1024, 80)]


def _p(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _timed(function, rounds: int) -> list[float]:
    function()  # warm-up: codec libraries load on first use
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return times


def jpeg2000_copy(source: Path, cache: Path) -> Path:
    target = cache / "ffdm-j2k.dcm"
    if not target.exists():
        ds = pydicom.dcmread(source)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(target, enforce_file_format=True)
    return target


def end_to_end(all_studies: list[list[Path]], workdir: Path) -> list[float]:
    directory = Path(tempfile.mkdtemp(dir=workdir))
    with ApplianceProcess(write_config(directory)) as app:
        send(app.ports["storage"], "SCREENING_PACS", all_studies[:4])
        expected = sum(len(s) for s in all_studies[:4])
        db_path = directory / "state" / "pacs.db"
        deadline = time.monotonic() + 120
        while True:
            with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
                rows = db.execute(
                    "SELECT s.created_at, e.occurred_at FROM events e JOIN stored_instances s"
                    " ON s.sop_instance_uid = json_extract(e.payload, '$.sop_instance_uid')"
                ).fetchall()
            if len(rows) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    shutil.rmtree(directory)
    parse = datetime.datetime.fromisoformat
    return [(parse(done) - parse(stored)).total_seconds() * 1000 for stored, done in rows]


def main(rounds: int) -> None:
    root = Path.cwd() / "var"
    cache = root / "bench-data"
    cache.mkdir(parents=True, exist_ok=True)
    all_studies = studies(cache, 4)
    raw = all_studies[0][0]
    j2k = jpeg2000_copy(raw, cache)
    print(f"pipeline bench: {raw.stat().st_size / 1e6:.0f} MB FFDM, {rounds} timed renders each")
    pgm = Path(tempfile.mkdtemp(dir=root)) / "thumb.pgm"
    results = {
        "dcmj2pnm --scale-y-size 188 (process)": _timed(
            lambda: subprocess.run(
                ["dcmj2pnm", "--scale-y-size", "188", str(raw), str(pgm)], check=True
            ),
            rounds,
        ),
        "appliance thumbnail, uncompressed": _timed(lambda: render(raw, THUMBNAIL), rounds),
        "appliance thumbnail+preview, uncompressed": _timed(lambda: render(raw, BOTH), rounds),
        "appliance thumbnail, JPEG 2000": _timed(lambda: render(j2k, THUMBNAIL), rounds),
        "appliance thumbnail+preview, JPEG 2000": _timed(lambda: render(j2k, BOTH), rounds),
    }
    shutil.rmtree(pgm.parent)
    workdir = Path(tempfile.mkdtemp(dir=root, prefix="bench-pipeline-"))
    try:
        latencies = end_to_end(all_studies, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{'render':44} {'p50 ms':>8} {'p95 ms':>8}")
    for name, times in results.items():
        print(f"{name:44} {_p(times, 50):>8.1f} {_p(times, 95):>8.1f}")
    peer = _p(results["dcmj2pnm --scale-y-size 188 (process)"], 50)
    print("\nratios (p50; the issue's bars: uncompressed <= 1.5x dcmj2pnm, JPEG 2000 <= 100 ms):")
    for name in ("appliance thumbnail, uncompressed", "appliance thumbnail+preview, uncompressed"):
        print(f"  {name} / dcmj2pnm = {_p(results[name], 50) / peer:.2f}")
    print(
        f"\nC-STORE response -> image.received recorded, 4 associations x 4 FFDM views: "
        f"n={len(latencies)} p50 {_p(latencies, 50):.0f} ms, p95 {_p(latencies, 95):.0f} ms"
        " (bar: p95 <= 1000 ms)"
    )
