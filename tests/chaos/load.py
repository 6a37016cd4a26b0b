"""Load: four modalities sending studies and ten worklist C-FIND queries per second for a while.

The units are pynetdicom AEs each sending a four-view FFDM-sized study (1024x832 here) every
STUDY_EVERY_S seconds, far faster than a clinic (a study every few minutes per room); the
queries are dcmtk findscu processes (a process and an association each, as units query), over a
worklist of 200 items, 50 of them today. No failed association, steady memory (RSS each minute,
peak RSS), latency percentiles for C-STORE (per image) and C-FIND (whole findscu run)."""

from __future__ import annotations

import copy
import datetime
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import DigitalMammographyXRayImageStorageForPresentation

from appliance.state import StatePaths
from appliance.testing import synthetic
from appliance.worklist.store import WorklistItem, WorklistStore
from tests.chaos import Result
from tests.support import ApplianceProcess, write_config

MODALITIES, QUERIES_PER_S, STUDY_EVERY_S = 4, 10, 2.0


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def run(work: Path, seconds: float) -> Result:
    config = write_config(work, {"dicom": {"max_associations": 64}})
    store = WorklistStore(StatePaths(work / "state"))
    (work / "state").mkdir(parents=True, exist_ok=True)
    store.open()
    now = datetime.datetime.now(datetime.UTC)
    for n in range(200):
        store.create(WorklistItem(
            accession_number=f"LOAD{n:05d}", patient_id=f"99900{n:05d}", patient_name=f"LOAD^P{n}",
            scheduled_at=now + datetime.timedelta(minutes=n if n < 50 else 24 * 60 + n),
            modality="MG",
        ))  # fmt: skip
    store.close()
    views = []
    for laterality, view in synthetic.SCREENING_VIEWS:
        ds = synthetic.mammogram(laterality=laterality, view=view, shape=(1024, 832))
        views.append(ds)
    store_ms: list[float] = []
    find_ms: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    images = 0

    with ApplianceProcess(config) as app:
        pid = app.proc.pid
        ports = app.ports

        def modality(number: int) -> None:
            nonlocal images
            ae = AE(f"LOAD_MG{number}")
            ae.add_requested_context(DigitalMammographyXRayImageStorageForPresentation)
            while not stop.is_set():
                assoc = ae.associate("127.0.0.1", ports["storage"], ae_title="SCREENING_PACS")
                if not assoc.is_established:
                    with lock:
                        failures.append("storage association")
                    continue
                study = generate_uid(synthetic.UID_ROOT)
                for template in views:
                    # deepcopy: Dataset.copy() shares its elements with the template (and so
                    # with the other units' threads); pixel bytes are immutable and not copied.
                    ds = copy.deepcopy(template)
                    ds.StudyInstanceUID = study
                    ds.SOPInstanceUID = generate_uid(synthetic.UID_ROOT)
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    started = time.perf_counter()
                    status = assoc.send_c_store(ds)
                    with lock:
                        store_ms.append((time.perf_counter() - started) * 1000)
                        if status is None or status.get("Status") != 0:
                            failures.append(f"C-STORE {status}")
                        else:
                            images += 1
                assoc.release()
                stop.wait(STUDY_EVERY_S)

        today = now.strftime("%Y%m%d")

        def one_query() -> None:
            started = time.perf_counter()
            result = subprocess.run(
                ["findscu", "-W", "-aet", "LOAD_MWL", "-aec", "SCREENING_MWL",
                 "-k", "PatientName", "-k", "AccessionNumber",
                 "-k", f"ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate={today}",
                 "-k", "ScheduledProcedureStepSequence[0].Modality=MG",
                 "127.0.0.1", str(ports["worklist"])],
                capture_output=True, timeout=60,
            )  # fmt: skip
            with lock:
                find_ms.append((time.perf_counter() - started) * 1000)
                if result.returncode:
                    failures.append(f"findscu exit {result.returncode}")

        def queries() -> None:
            """Ten a second on a fixed schedule, each from its own unit (thread) as they are."""
            with ThreadPoolExecutor(16) as pool:
                next_at = time.monotonic()
                while not stop.is_set():
                    pool.submit(one_query)
                    next_at += 1 / QUERIES_PER_S
                    time.sleep(max(0.0, next_at - time.monotonic()))

        threads = [threading.Thread(target=modality, args=(n,)) for n in range(MODALITIES)]
        threads.append(threading.Thread(target=queries))
        for thread in threads:
            thread.start()
        rss_by_minute: list[float] = []
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            time.sleep(min(60.0, seconds - (time.monotonic() - started)))
            rss_by_minute.append(round(_rss_mb(pid, "VmRSS:"), 0))
        stop.set()
        for thread in threads:
            thread.join(60)
        peak = _rss_mb(pid, "VmHWM:")
        log = app.log()
    broken = []
    if failures:
        broken.append(f"{len(failures)} failures, e.g. {failures[0]}")
    if "service.crashed" in log:
        broken.append("a service crashed")
    # Steady memory: the last minute's RSS no more than 1.5x the first minute's (plus slack).
    if len(rss_by_minute) >= 2 and rss_by_minute[-1] > 1.5 * rss_by_minute[0] + 50:
        broken.append(f"RSS grew from {rss_by_minute[0]} to {rss_by_minute[-1]} MB")
    return Result("load", not broken, {
        "seconds": round(seconds), "images": images, "queries": len(find_ms),
        "c_store_ms_p50/p95/p99": "/".join(f"{percentile(store_ms, p):.0f}" for p in (50, 95, 99)),
        "c_find_ms_p50/p95/p99": "/".join(f"{percentile(find_ms, p):.0f}" for p in (50, 95, 99)),
        "queries_per_s": round(len(find_ms) / seconds, 1),
        "rss_mb_by_minute": rss_by_minute, "peak_rss_mb": round(peak),
        "mean_c_store_ms": round(statistics.fmean(store_ms), 1) if store_ms else None,
    }, broken)  # fmt: skip
