"""C-GET and C-MOVE of one 4-view FFDM study: the appliance against Orthanc, same run.

Both servers get the same study over C-STORE, then serve it: dcmtk getscu pulls it (C-GET,
received but not stored: --ignore), and movescu sends it to a dcmtk storescp that also ignores
what it receives (C-MOVE), so the figures are the servers' read-and-send speed. Orthanc
(Debian's package) runs on loopback with its own storage in a temporary folder. Rounds are
interleaved; compare the ratios, not the MB/s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.bench.storage import _wait_for_echo, free_port, send, studies
from tests.support import ApplianceProcess, write_config

DEST = "BENCH_DEST"


def orthanc(workdir: Path, port: int, dest_port: int) -> subprocess.Popen:
    if shutil.which("Orthanc") is None:
        raise SystemExit("retrieve bench: Orthanc is not installed (apt-get install orthanc)")
    config = {
        "Name": "bench",
        "StorageDirectory": str(workdir / "orthanc-storage"),
        "IndexDirectory": str(workdir / "orthanc-index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpServerEnabled": False,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {"dest": [DEST, "127.0.0.1", dest_port]},
    }
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config))
    return subprocess.Popen(
        ["Orthanc", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def get(port: int, ae_title: str, study_uid: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        ["getscu", "-S", "--ignore", "-aec", ae_title, "-k", "QueryRetrieveLevel=STUDY",
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


def main(rounds: int) -> dict[tuple[str, str], float]:
    import pydicom

    root = Path.cwd() / "var"
    cache = root / "bench-data"
    cache.mkdir(parents=True, exist_ok=True)
    [study] = studies(cache, 1)
    study_uid = pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
    megabytes = sum(p.stat().st_size for p in study) / 1e6
    workdir = Path(tempfile.mkdtemp(dir=root, prefix="bench-retrieve-"))
    dest_port, orthanc_port = free_port(), free_port()
    config = write_config(
        workdir,
        {"dicom": {"destinations": [{"ae_title": DEST, "host": "127.0.0.1", "port": dest_port}]}},
    )
    destination = subprocess.Popen(
        ["storescp", "--ignore", "-aet", DEST, str(dest_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    peer = orthanc(workdir, orthanc_port, dest_port)
    best: dict[tuple[str, str], float] = {}
    try:
        with ApplianceProcess(config) as app:
            ours = app.ports["storage"]
            _wait_for_echo(orthanc_port, "ORTHANC")
            send(ours, "SCREENING_PACS", [study])
            send(orthanc_port, "ORTHANC", [study])
            print(f"retrieve bench: one FFDM study, {len(study)} images, {megabytes:.0f} MB")
            for _ in range(rounds):  # interleaved, so background noise hits both alike
                for server, port, ae in (
                    ("appliance", ours, "SCREENING_PACS"),
                    ("orthanc", orthanc_port, "ORTHANC"),
                ):
                    for verb, run in (("C-GET", get), ("C-MOVE", move)):
                        seconds = run(port, ae, study_uid)
                        key = (server, verb)
                        best[key] = min(best.get(key, seconds), seconds)
    finally:
        peer.terminate()
        destination.terminate()
        peer.wait(20)
        destination.wait(20)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'server':12} {'verb':7} {'best s':>8} {'MB/s':>8}")
    for (server, verb), seconds in best.items():
        print(f"{server:12} {verb:7} {seconds:>8.3f} {megabytes / seconds:>8.0f}")
    print("\nratios (throughput, best of the rounds):")
    for verb in ("C-GET", "C-MOVE"):
        ratio = best[("orthanc", verb)] / best[("appliance", verb)]
        print(f"  {verb}: appliance/orthanc = {ratio:.2f}")
    return best
