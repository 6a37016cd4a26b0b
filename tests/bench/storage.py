"""C-STORE ingest: the appliance (fsync on) against dcmtk's storescp, same files, same run.

dcmtk's storescu sends synthetic FFDM studies (4096x3328, 16-bit, 4 views each) over one
association and over four at once; a 1 GB tomosynthesis object measures the appliance's peak
memory while receiving. Machines here are shared and noisy: compare the ratios, not the MB/s.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import attrs

from appliance.testing import synthetic
from tests.support import ApplianceProcess, write_config


@attrs.frozen
class Run:
    server: str
    associations: int
    seconds: float
    megabytes: float
    images: int
    peak_rss_mb: float | None

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds


def studies(cache: Path, count: int) -> list[list[Path]]:
    """`count` four-view studies, generated once and kept in `cache`."""
    found = []
    for number in range(count):
        directory = cache / f"study-{number}"
        if len(list(directory.glob("*.dcm"))) != 4:
            shutil.rmtree(directory, ignore_errors=True)
            synthetic.screening_study(directory, accession_number=f"BENCH{number:04d}")
        found.append(sorted(directory.glob("*.dcm")))
    return found


def tomosynthesis(cache: Path) -> Path:
    path = cache / "tomo-1gb.dcm"
    if not path.exists():
        ds = synthetic.mammogram(shape=(2048, 2048), frames=128)  # 1.07 GB of pixel data
        ds.save_as(path, enforce_file_format=True)
    return path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def send(port: int, ae_title: str, batches: list[list[Path]]) -> float:
    """Each batch on its own association, all at once; returns wall seconds."""

    def one(batch: list[Path]) -> None:
        subprocess.run(
            ["storescu", "-R", "-aec", ae_title, "127.0.0.1", str(port), *map(str, batch)],
            check=True,
            capture_output=True,
        )

    started = time.perf_counter()
    with ThreadPoolExecutor(len(batches)) as pool:
        list(pool.map(one, batches))
    return time.perf_counter() - started


def _size_mb(batches: list[list[Path]]) -> float:
    return sum(p.stat().st_size for batch in batches for p in batch) / 1e6


def _workloads(all_studies: list[list[Path]]) -> dict[int, list[list[Path]]]:
    flat = [path for study in all_studies for path in study]
    return {1: [flat], 4: [flat[i::4] for i in range(4)]}


def bench_storescp(name: str, all_studies, env: dict[str, str], flags: list[str]) -> list[Run]:
    runs = []
    for associations, batches in _workloads(all_studies).items():
        with tempfile.TemporaryDirectory(dir=Path.cwd() / "var") as out:
            port = free_port()
            server = subprocess.Popen(
                ["storescp", *flags, "--max-pdu", "131072", "-od", out, str(port)],
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                _wait_for_echo(port, "ANY-SCP")
                seconds = send(port, "ANY-SCP", batches)
                rss = peak_rss_mb(server.pid)
            finally:
                server.terminate()
                server.wait(10)
        images = sum(map(len, batches))
        runs.append(Run(name, associations, seconds, _size_mb(batches), images, rss))
    return runs


def bench_appliance(all_studies, workdir: Path) -> list[Run]:
    runs = []
    for associations, batches in _workloads(all_studies).items():
        directory = Path(tempfile.mkdtemp(dir=workdir))
        with ApplianceProcess(write_config(directory)) as app:
            seconds = send(app.ports["storage"], "SCREENING_PACS", batches)
            rss = peak_rss_mb(app.proc.pid)
        shutil.rmtree(directory)
        images = sum(map(len, batches))
        runs.append(Run("appliance (fsync)", associations, seconds, _size_mb(batches), images, rss))
    return runs


def bench_large_object(tomo: Path, workdir: Path) -> Run:
    directory = Path(tempfile.mkdtemp(dir=workdir))
    with ApplianceProcess(write_config(directory)) as app:
        seconds = send(app.ports["storage"], "SCREENING_PACS", [[tomo]])
        rss = peak_rss_mb(app.proc.pid)
    shutil.rmtree(directory)
    return Run("appliance, 1 GB DBT", 1, seconds, tomo.stat().st_size / 1e6, 1, rss)


def _wait_for_echo(port: int, ae_title: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        echo = subprocess.run(
            ["echoscu", "-aec", ae_title, "127.0.0.1", str(port)], capture_output=True
        )
        if echo.returncode == 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing answered C-ECHO on port {port}")


def main(study_count: int, rounds: int) -> list[Run]:
    root = Path.cwd() / "var"
    cache = root / "bench-data"
    cache.mkdir(parents=True, exist_ok=True)
    print(f"storage bench: generating {study_count} FFDM studies and a 1 GB DBT object in {cache}")
    all_studies = studies(cache, study_count)
    tomo = tomosynthesis(cache)
    workdir = Path(tempfile.mkdtemp(dir=root, prefix="bench-"))
    runs: list[Run] = []
    try:
        for _ in range(rounds):  # interleaved, so background noise hits every server alike
            runs += bench_storescp("storescp (Debian default)", all_studies, {}, [])
            runs += bench_storescp(
                "storescp +B TCP_NODELAY=1", all_studies, {"TCP_NODELAY": "1"}, ["+B"]
            )
            runs += bench_appliance(all_studies, workdir)
        runs.append(bench_large_object(tomo, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(runs)
    return runs


def best(runs: list[Run], server: str, associations: int) -> Run:
    return max(
        (r for r in runs if r.server == server and r.associations == associations),
        key=lambda r: r.mb_per_s,
    )


def report(runs: list[Run]) -> None:
    print(
        f"\n{'server':28} {'assocs':>6} {'images':>6} {'MB':>8} {'s':>7} {'MB/s':>8}"
        f" {'img/s':>6} {'peak RSS MB':>11}"
    )
    for r in runs:
        rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb is not None else "-"
        print(
            f"{r.server:28} {r.associations:>6} {r.images:>6} {r.megabytes:>8.0f} {r.seconds:>7.2f}"
            f" {r.mb_per_s:>8.0f} {r.images / r.seconds:>6.1f} {rss:>11}"
        )
    print("\nratios (best of the rounds; appliance fsyncs every image, storescp does not):")
    for associations in (1, 4):
        ours = best(runs, "appliance (fsync)", associations)
        for peer in ("storescp (Debian default)", "storescp +B TCP_NODELAY=1"):
            theirs = best(runs, peer, associations)
            print(
                f"  {associations} assoc: appliance/{peer} = {ours.mb_per_s / theirs.mb_per_s:.2f}"
                f" ({ours.mb_per_s:.0f} vs {theirs.mb_per_s:.0f} MB/s)"
            )
    large = next(r for r in runs if r.server == "appliance, 1 GB DBT")
    print(f"  1 GB DBT object: peak RSS {large.peak_rss_mb:.0f} MB, {large.mb_per_s:.0f} MB/s")
