"""C-GET and C-MOVE: the appliance against Orthanc, same data, same run, fresh servers per round.

Two workloads: one 4-view FFDM study (109 MB) and one 410 MB breast tomosynthesis object. Each
round starts a new appliance and a new Orthanc (Debian's package, its own config and storage
under a temporary folder), stores the data into both with dcmtk's storescu, then dcmtk's getscu
pulls it (C-GET, received and discarded: --ignore) and movescu sends it to a dcmtk storescp
that discards it too (C-MOVE): the figures are each server's read-and-send speed. While the
tomosynthesis object is retrieved, the appliance's resident memory is sampled every 10 ms.
The last round also retrieves everything to disk (getscu +B, bit-preserving) and compares it
with what was sent. Compare the ratios, not the MB/s.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.bench.storage import _wait_for_echo, free_port, send, studies
from tests.support import (
    ApplianceProcess,
    OrthancProcess,
    dataset_bytes,
    large_object,
    write_config,
)

DEST = "BENCH_DEST"
TOMO_BYTES = 410 * 1024 * 1024


def tomosynthesis(cache: Path) -> Path:
    path = cache / "tomo-410mb.dcm"
    if not path.exists():
        large_object(path, TOMO_BYTES)
    return path


def get(port: int, ae_title: str, study_uid: str, out: Path | None = None) -> float:
    keep = ["+B", "-od", str(out)] if out else ["--ignore"]
    started = time.perf_counter()
    subprocess.run(
        ["getscu", "-S", *keep, "-aec", ae_title, "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


def move(port: int, ae_title: str, study_uid: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["movescu", "-S", "-aec", ae_title, "-aem", DEST, "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(port)],
        check=True, capture_output=True,
    )  # fmt: skip
    return time.perf_counter() - started


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class RssSampler:
    """The highest resident set size of `pid` while the block runs, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.before = pid, 0.0, rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _digest(path: Path) -> str:
    return hashlib.sha256(dataset_bytes(path)).hexdigest()


def identical(sent: list[Path], received_dir: Path) -> bool:
    import pydicom

    want = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: _digest(p) for p in sent}
    got = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: _digest(p)
        for p in received_dir.iterdir()
    }
    return want == got


def main(rounds: int) -> dict[tuple[str, str, str], float]:
    import pydicom

    root = Path.cwd() / "var"
    cache = root / "bench-data"
    cache.mkdir(parents=True, exist_ok=True)
    [study] = studies(cache, 1)
    tomo = tomosynthesis(cache)
    workloads = {"ffdm study": study, "tomo 410 MB": [tomo]}
    uids = {
        name: pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        for name, files in workloads.items()
    }
    sizes = {name: sum(p.stat().st_size for p in files) / 1e6 for name, files in workloads.items()}
    best: dict[tuple[str, str, str], float] = {}
    peaks: list[tuple[float, float]] = []
    checks: dict[str, bool] = {}
    print(f"retrieve bench: {rounds} rounds, fresh servers each; "
          + ", ".join(f"{name} {size:.0f} MB" for name, size in sizes.items()))  # fmt: skip
    for number in range(rounds):
        workdir = Path(tempfile.mkdtemp(dir=root, prefix="bench-retrieve-"))
        dest_port = free_port()
        config = write_config(
            workdir,
            {"dicom": {"destinations": [{"ae_title": DEST, "host": "127.0.0.1",
                                         "port": dest_port}]}},
        )  # fmt: skip
        destination = subprocess.Popen(
            ["storescp", "--ignore", "-aet", DEST, str(dest_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        peer = OrthancProcess(workdir / "orthanc", {"dest": (DEST, "127.0.0.1", dest_port)})
        try:
            with ApplianceProcess(config) as app, peer:
                ours, theirs = app.ports["storage"], peer.dicom_port
                _wait_for_echo(theirs, "ORTHANC")
                for files in workloads.values():
                    send(ours, "SCREENING_PACS", [files])
                    send(theirs, "ORTHANC", [files])
                time.sleep(2)  # the appliance's pipeline renders what arrived; let it settle
                for name, study_uid in uids.items():
                    for server, port, ae in (
                        ("appliance", ours, "SCREENING_PACS"),
                        ("orthanc", theirs, "ORTHANC"),
                    ):
                        for verb, run in (("C-GET", get), ("C-MOVE", move)):
                            if server == "appliance" and name.startswith("tomo"):
                                with RssSampler(app.proc.pid) as sampler:
                                    seconds = run(port, ae, study_uid)
                                peaks.append((sampler.before, sampler.peak))
                            else:
                                seconds = run(port, ae, study_uid)
                            key = (name, server, verb)
                            best[key] = min(best.get(key, seconds), seconds)
                if number == rounds - 1:
                    for name, files in workloads.items():
                        out = workdir / f"got-{name.split()[0]}"
                        out.mkdir()
                        get(ours, "SCREENING_PACS", uids[name], out)
                        checks[name] = identical(files, out)
        finally:
            destination.terminate()
            destination.wait(20)
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'workload':12} {'server':10} {'verb':7} {'best s':>8} {'MB/s':>8}")
    for (name, server, verb), seconds in best.items():
        print(f"{name:12} {server:10} {verb:7} {seconds:>8.3f} {sizes[name] / seconds:>8.0f}")
    print("\nratios (throughput, best of the rounds; above 1 the appliance is faster):")
    for name in workloads:
        for verb in ("C-GET", "C-MOVE"):
            ratio = best[(name, "orthanc", verb)] / best[(name, "appliance", verb)]
            print(f"  {name:12} {verb}: appliance/orthanc = {ratio:.2f}")
    before = max(b for b, _ in peaks)
    peak = max(p for _, p in peaks)
    print(f"\nappliance RSS while retrieving the tomosynthesis object: {before:.0f} MB before, "
          f"peak {peak:.0f} MB")  # fmt: skip
    for name, same in checks.items():
        print(f"byte-identical C-GET ({name}): {'yes' if same else 'NO'}")
    return best
