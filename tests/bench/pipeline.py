"""Image pipeline: render time per transfer syntax against dcmtk's renderer of the same file
(OpenJPEG's decoder for JPEG 2000, which dcmtk lacks), and what rendering costs the DICOM
service: the DICOM process's peak RSS and C-STORE response times during a four-association
FFDM ingest plus one 1 GB tomosynthesis object, with rendering running and with it held, in the
same run. Ratios, because these machines are shared and noisy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import trio
from pydicom.uid import JPEG2000Lossless

from appliance.config import PipelineConfig
from appliance.pipeline.render import Rendition
from appliance.pipeline.workers import PixelWorkers
from appliance.testing import synthetic
from tests.bench.storage import peak_rss_mb, studies, tomosynthesis
from tests.support import ApplianceProcess, write_config

BOTH = [Rendition(188, 25), Rendition(1024, 80)]


def _p(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def _timed(function: Callable[[], object], rounds: int) -> list[float]:
    function()  # warm-up: codec libraries load on first use
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return times


def encodings(raw: Path, cache: Path) -> dict[str, tuple[Path, list[str]]]:
    """The same FFDM in each syntax (dcmtk's encoders; JPEG 2000 by pydicom/OpenJPEG), with the
    peer's command that renders (or, for JPEG 2000, decodes) it."""
    found: dict[str, tuple[Path, list[str]]] = {"uncompressed": (raw, ["dcm2pnm"])}
    for name, encoder, renderer in (
        ("JPEG Lossless", "dcmcjpeg", "dcmj2pnm"),
        ("JPEG-LS", "dcmcjpls", "dcml2pnm"),
        ("RLE", "dcmcrle", "dcm2pnm"),
    ):
        target = cache / f"ffdm-{encoder}.dcm"
        if not target.exists():
            subprocess.run([encoder, str(raw), str(target)], check=True)
        found[name] = (target, [renderer])
    j2k = cache / "ffdm-j2k.dcm"
    if not j2k.exists():
        ds = pydicom.dcmread(raw)
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(j2k, enforce_file_format=True)
    codestream = cache / "ffdm.j2k"
    if not codestream.exists():
        frame = next(
            pydicom.encaps.generate_frames(pydicom.dcmread(j2k).PixelData, number_of_frames=1)
        )
        codestream.write_bytes(frame)
    found["JPEG 2000"] = (j2k, ["opj_decompress", "-i", str(codestream)])
    return found


def render_times(raw: Path, cache: Path, rounds: int, out: Path) -> dict[str, tuple[float, float]]:
    """p50 ms of the peer's whole process and of the appliance's first pass in a worker
    process, as in production: file path in, every frame decoded to prove encapsulated pixel
    data whole, then both JPEGs out."""
    peers: dict[str, list[float]] = {}
    for name, (path, command) in encodings(raw, cache).items():
        if command[0] == "opj_decompress":
            argv = [*command, "-o", str(out / "peer.pgm")]
        else:
            argv = [*command, "--scale-y-size", "188", str(path), str(out / "peer.pgm")]
        peers[name] = _timed(
            lambda argv=argv: subprocess.run(argv, check=True, capture_output=True), rounds
        )

    ours: dict[str, list[float]] = {}

    async def main() -> None:
        workers = PixelWorkers(PipelineConfig(workers=1))
        async with trio.open_nursery() as nursery:
            await nursery.start(workers.run)
            for name, (path, _command) in encodings(raw, cache).items():
                await workers.render(path, BOTH, True)  # warm-up
                times = []
                for _ in range(rounds):
                    started = time.perf_counter()
                    await workers.render(path, BOTH, True)
                    times.append((time.perf_counter() - started) * 1000)
                ours[name] = times
            nursery.cancel_scope.cancel()

    trio.run(main)
    return {name: (_p(peers[name], 50), _p(ours[name], 50)) for name in peers}


def _workers_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except (OSError, IndexError):
                continue
            if parent == pid and b"spawn_main" in command:
                found.append(int(entry))
    return found


def _events(db_path: Path) -> int:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM events WHERE event_type LIKE 'image.%'").fetchone()[
            0
        ]


def _store_all(port: int, batches: list[list[Path]]) -> list[float]:
    """Each batch on its own association (pynetdicom, chunked from the file), all at once;
    the time of each C-STORE from its first byte to its response, in ms, FFDM only (the 1 GB
    object's own transfer would dominate any percentile)."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    latencies: list[float] = []
    lock = threading.Lock()

    def one(batch: list[Path]) -> None:
        ae = AE("BENCH")
        for path in batch:
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
            ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", port, ae_title="SCREENING_PACS", max_pdu=131072)
        assert assoc.is_established
        try:
            for path in batch:
                started = time.perf_counter()
                assert assoc.send_c_store(path).Status == 0
                if path.stat().st_size < 100 << 20:
                    with lock:
                        latencies.append((time.perf_counter() - started) * 1000)
        finally:
            assoc.release()

    threads = [threading.Thread(target=one, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def ingest(
    ffdm: list[Path], tomo: Path, small: Path, workdir: Path, rendering: bool
) -> dict[str, float]:
    """Four associations of FFDM and a fifth with the 1 GB tomosynthesis object, on a fresh
    appliance. `rendering` False holds the worker (SIGSTOP) for the ingest: the same process,
    the same code, no pixel work while the images arrive."""
    directory = Path(tempfile.mkdtemp(dir=workdir))
    config = write_config(directory, {"pipeline": {"workers": 1}})
    db_path = directory / "state" / "pacs.db"
    batches = [ffdm[i::4] for i in range(4)] + [[tomo]]
    with ApplianceProcess(config) as app:
        assert app.proc is not None
        _store_all(app.ports["storage"], [[small]])  # starts the worker; its event comes back
        deadline = time.monotonic() + 60
        while _events(db_path) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        held = [] if rendering else _workers_of(app.proc.pid)
        assert rendering or held, "no worker process found to hold"
        for pid in held:
            os.kill(pid, signal.SIGSTOP)
        try:
            latencies = _store_all(app.ports["storage"], batches)
        finally:
            for pid in held:
                os.kill(pid, signal.SIGCONT)
        expected = 1 + sum(map(len, batches))
        deadline = time.monotonic() + 300
        while _events(db_path) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        rss = peak_rss_mb(app.proc.pid)  # after the pipeline's tail (the DBT's render) too
        status = subprocess.run(
            [sys.executable, "-m", "appliance", "status", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
        )
        workers = (json.loads(status.stdout).get("pipeline") or {}).get("workers") or {}
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "latencies": latencies,
        "rss": rss,
        "workers_peak": float(workers.get("peak_rss_mb") or 0.0),
    }


def main(rounds: int) -> None:
    root = Path.cwd() / "var"
    cache = root / "bench-data"
    cache.mkdir(parents=True, exist_ok=True)
    all_studies = studies(cache, 4)
    raw = all_studies[0][0]
    tomo = tomosynthesis(cache)
    small = cache / "small.dcm"
    if not small.exists():
        synthetic.mammogram(shape=(256, 208)).save_as(small, enforce_file_format=True)
    print(f"pipeline bench: {raw.stat().st_size / 1e6:.0f} MB FFDM, {rounds} timed renders each")
    out = Path(tempfile.mkdtemp(dir=root, prefix="bench-pipeline-"))
    try:
        times = render_times(raw, cache, rounds, out)
        ffdm = [path for study in all_studies for path in study]
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for _round in range(2):  # interleaved, fresh appliance each time
            for rendering in (True, False):
                runs[rendering].append(ingest(ffdm, tomo, small, out, rendering=rendering))
        with_rendering, held = (
            {
                "latencies": [ms for run in runs[mode] for ms in run["latencies"]],
                "rss": max(run["rss"] for run in runs[mode]),
                "workers_peak": max(run["workers_peak"] for run in runs[mode]),
            }
            for mode in (True, False)
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)

    header = f"{'render (thumbnail + preview)':28} {'peer p50 ms':>12} {'ours p50 ms':>12}"
    print(f"\n{header} {'ratio':>6}")
    for name, (peer, ours) in times.items():
        peer_name = "opj_decompress" if name == "JPEG 2000" else "dcmtk"
        print(f"{name:28} {peer:>12.0f} {ours:>12.0f} {ours / peer:>6.2f}  (peer: {peer_name})")
    print(
        "\nours: the production first pass in a worker process (every frame decoded to prove the"
        "\npixel data, then thumbnail and preview JPEGs); peer: dcmtk's renderer to one 188 px PGM"
        "\n(whole process), or OpenJPEG's full decode for JPEG 2000 (dcmtk has no J2K codec)."
    )
    print(
        "\ningest: 4 associations x 4 FFDM + 1 association with a 1 GB tomosynthesis object"
        f"\n  {'':24} {'C-STORE p50 ms':>15} {'p95 ms':>8} {'DICOM process peak RSS MB':>26}"
    )
    for name, run in (("rendering", with_rendering), ("rendering held", held)):
        p50, p95 = _p(run["latencies"], 50), _p(run["latencies"], 95)
        print(f"  {name:24} {p50:>15.0f} {p95:>8.0f} {run['rss']:>26.0f}")
    ratio = _p(with_rendering["latencies"], 95) / _p(held["latencies"], 95)
    print(
        f"  FFDM C-STORE p95 ratio, rendering / held ({len(held['latencies'])} each): {ratio:.2f}"
        f"\n  DICOM process peak RSS with rendering: {with_rendering['rss']:.0f} MB (goal <= 120)"
        f"\n  pixel workers' peak RSS (each): {with_rendering['workers_peak']:.0f} MB"
    )
