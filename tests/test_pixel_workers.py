"""Decoding and rendering in worker processes: the DICOM service answers while a codec runs,
and a worker that dies or hangs costs one attempt at one image, never the appliance."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE

from appliance.testing import synthetic
from tests.support import ApplianceProcess, index_rows, send_files, write_config
from tests.test_pipeline import pacs_events, wait_for_events

pytestmark = [pytest.mark.system, pytest.mark.usefixtures("dcmtk")]

VERIFICATION = "1.2.840.10008.1.1"


def jpeg_ls_mammogram(directory: Path) -> Path:
    """A 27 MB FFDM encoded by dcmtk's JPEG-LS encoder: the slowest decode there is."""
    plain = directory / "plain.dcm"
    synthetic.mammogram().save_as(plain, enforce_file_format=True)
    encoded = directory / "jpeg-ls.dcm"
    subprocess.run(["dcmcjpls", str(plain), str(encoded)], check=True)
    return encoded


def workers_of(app: ApplianceProcess) -> list[int]:
    """The appliance's pixel worker processes (trio-parallel's, not multiprocessing's tracker)."""
    assert app.proc is not None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            command = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if parent == app.proc.pid and b"spawn_main" in command:
            found.append(int(entry))
    return found


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def busy_worker(app: ApplianceProcess, idle: dict[int, int], timeout: float = 30) -> int:
    """The worker that started working after `idle` (pid -> CPU ticks) was taken: its job has
    really been handed over, so killing it now kills a render, not a spare."""
    deadline = time.monotonic() + timeout
    while True:
        for pid in workers_of(app):
            try:
                if cpu_ticks(pid) >= idle.get(pid, 0) + 5:  # 50 ms of CPU since
                    return pid
            except OSError:
                continue
        assert time.monotonic() < deadline, "no worker started rendering"
        time.sleep(0.01)


def test_echo_is_answered_promptly_while_a_jpeg_ls_mammogram_renders(tmp_path: Path) -> None:
    image = jpeg_ls_mammogram(tmp_path)
    config = write_config(tmp_path, {"pipeline": {"workers": 1}})
    state = tmp_path / "state"
    with ApplianceProcess(config) as app:
        ae = AE("ECHOER")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", app.ports["storage"], ae_title="SCREENING_PACS")
        assert assoc.is_established
        latencies: list[float] = []
        stored = threading.Event()

        def store() -> None:
            assert send_files(app.ports["storage"], [image])[0].Status == 0
            stored.set()

        sender = threading.Thread(target=store)
        sender.start()
        try:
            stored.wait(60)
            # From the C-STORE response until its thumbnail is recorded: the render is running.
            deadline = time.monotonic() + 60
            while not pacs_events(state) and time.monotonic() < deadline:
                started = time.perf_counter()
                assert assoc.send_c_echo().Status == 0
                latencies.append(time.perf_counter() - started)
                time.sleep(0.01)
        finally:
            sender.join()
            assoc.release()
        [event] = wait_for_events(state, 1)
        log = app.log()
    assert event["event_type"] == "image.received"
    render_ms = max(
        float(line.split("ms=")[1].split()[0])
        for line in log.splitlines()
        if "event=image.processed" in line
    )
    assert render_ms > 300, f"the render took {render_ms} ms: too short to have been overlapped"
    assert len(latencies) >= 5, latencies
    # 1.8 s when rendering shared the DICOM process's interpreter; 100 ms is the bar.
    assert max(latencies) < 0.1, (
        f"C-ECHO took up to {max(latencies) * 1000:.0f} ms while rendering "
        f"(median {statistics.median(latencies) * 1000:.0f} ms over {len(latencies)})"
    )


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_worker_killed_or_hung_mid_render_is_retried_and_the_appliance_stays_up(
    tmp_path: Path, fault: str
) -> None:
    image = jpeg_ls_mammogram(tmp_path)
    override = {
        "pipeline": {"workers": 1, "retry_after_s": 0.5, "max_attempts": 3, "render_timeout_s": 3}
    }
    small = tmp_path / "small.dcm"
    synthetic.mammogram(shape=(256, 208)).save_as(small, enforce_file_format=True)
    state = tmp_path / "state"
    with ApplianceProcess(write_config(tmp_path, override)) as app:
        assert send_files(app.ports["storage"], [small])[0].Status == 0
        wait_for_events(state, 1)  # the worker is up, and idle
        idle = {pid: cpu_ticks(pid) for pid in workers_of(app)}
        assert send_files(app.ports["storage"], [image])[0].Status == 0
        worker = busy_worker(app, idle)
        os.kill(worker, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        _small, event = wait_for_events(state, 2, timeout=60)
        ae = AE("ECHOER")
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate("127.0.0.1", app.ports["storage"], ae_title="SCREENING_PACS")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert app.proc is not None
        assert app.proc.poll() is None
        log = app.log()
        if fault == "hung":  # killed: gone, or a zombie until reaped
            stat = Path(f"/proc/{worker}/stat")
            assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    assert event["event_type"] == "image.received", json.loads(event["payload"])
    assert {row["pipeline_state"] for row in index_rows(state)} == {"DONE"}
    failures = [line for line in log.splitlines() if "event=image.failed" in line]
    assert len(failures) == 1, failures
    assert "phase=worker" in failures[0]
    assert ("died" if fault == "killed" else "pipeline.render_timeout_s") in failures[0]
    assert "event=service.crashed" not in log


def test_a_pool_that_cannot_start_is_degraded_and_no_image_is_blamed(tmp_path: Path) -> None:
    """Worker processes that die as they start (a broken install, a sandbox that forbids
    them): the pixel-workers service shows degraded with the reason, images wait without
    losing attempts, and DICOM goes on."""
    breaker = tmp_path / "site"
    breaker.mkdir()
    (breaker / "sitecustomize.py").write_text(
        "import sys\n"
        "if 'spawn_main' in ' '.join(sys.orig_argv):\n"
        "    raise SystemExit(3)  # every worker process dies as it starts\n"
    )
    image = tmp_path / "small.dcm"
    synthetic.mammogram(shape=(256, 208)).save_as(image, enforce_file_format=True)
    config = write_config(tmp_path)
    env = {"PYTHONPATH": f"{breaker}:{os.environ.get('PYTHONPATH', '')}"}
    with ApplianceProcess(config, env=env) as app:
        assert send_files(app.ports["storage"], [image])[0].Status == 0
        deadline = time.monotonic() + 30
        while "event=service.degraded" not in app.log():
            assert time.monotonic() < deadline, app.log()[-2000:]
            time.sleep(0.1)
        time.sleep(2)
        status = subprocess.run(
            [sys.executable, "-m", "appliance", "status", "--config", str(config), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        log = app.log()
    services = json.loads(status.stdout)["services"]
    assert services["pixel-workers"]["degraded"]
    assert "cannot start" in services["pixel-workers"]["last_error"]
    [row] = index_rows(tmp_path / "state")
    assert row["pipeline_state"] == "PENDING"
    assert row["pipeline_attempts"] == 0
    assert "event=image.failed" not in log
