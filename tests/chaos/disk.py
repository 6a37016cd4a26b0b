"""Disk full: the state directory on a small loop-mounted ext4 image. C-STORE answers 0xA700 at
the floor, nothing partial is left, C-ECHO and C-FIND keep working, and ingest resumes when space
is freed."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from appliance.testing import synthetic
from tests.chaos import Result
from tests.support import ApplianceProcess, SmallDisk, send_files, write_config

SIZE_MB, FLOOR_MB = 64, 16


def run(work: Path) -> Result:
    disk = SmallDisk(work, SIZE_MB).__enter__()
    mount = disk.mount
    broken: list[str] = []
    figures: dict[str, object] = {"filesystem_mb": SIZE_MB, "floor_mb": FLOOR_MB}
    try:
        config = write_config(
            work, {"state_dir": str(mount / "state"),
                   "dicom": {"storage": {"port": 0, "min_free_mb": FLOOR_MB}}},
        )  # fmt: skip
        filler = mount / "filler"
        filler.write_bytes(b"\0" * 8 * 1024 * 1024)
        images = synthetic.screening_study(work / "disk-images", shape=(512, 416))  # ~0.4 MB each
        with ApplianceProcess(config) as app:
            port = app.ports["storage"]
            stored = refused = 0
            for number in range(200):
                ds_path = work / "disk-images" / f"extra{number}.dcm"
                synthetic.mammogram(shape=(512, 416)).save_as(ds_path, enforce_file_format=True)
                [answer] = send_files(port, [ds_path])
                if answer is not None and answer.Status == 0:
                    stored += 1
                elif answer is not None and answer.Status == 0xA700:
                    refused += 1
                    if refused >= 3:
                        break
                else:
                    broken.append(f"C-STORE answered {answer} before/at the floor, not 0xA700")
                    break
            figures |= {"stored_before_floor": stored, "refused_0xA700": refused}
            if not refused:
                broken.append("the floor was never reached")
            spool = list((mount / "state" / "spool").iterdir())
            if spool:
                broken.append(f"{len(spool)} partial files left in the spool")
            echo = subprocess.run(["echoscu", "-aec", "SCREENING_PACS", "127.0.0.1", str(port)],
                                  capture_output=True)  # fmt: skip
            find = subprocess.run(
                ["findscu", "-W", "-aec", "SCREENING_MWL", "-k", "PatientName",
                 "127.0.0.1", str(app.ports["worklist"])], capture_output=True,
            )  # fmt: skip
            if echo.returncode or find.returncode:
                broken.append("C-ECHO or C-FIND failed while the disk was full")
            filler.unlink()  # the operator frees space
            time.sleep(0.2)
            answers = send_files(port, images)
            resumed = sum(1 for a in answers if a is not None and a.Status == 0)
            figures["stored_after_freeing"] = resumed
            if resumed != len(images):
                broken.append("ingest did not resume after space was freed")
    finally:
        disk.__exit__()
    return Result("disk full", not broken, figures, broken)
