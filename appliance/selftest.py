"""`appliance selftest`: health proven by traffic, on the live appliance.

A synthetic participant goes through the whole clinic path against the running appliance's own
ports: a test worklist item, its worklist query, MPPS IN PROGRESS, four synthetic views stored,
MPPS COMPLETED, thumbnails rendered, the study complete, and (when the relay is configured) every
event of it acknowledged by the cloud. Each phase is reported with its duration; the first
failure ends the run and is named. The item is marked as test (its events say "test": true) and
the test data is removed afterwards: the item, its MPPS, the stored files, their derived images
and index rows (delivered events stay in the outbox history; without the relay the test's
events are removed too, since nothing would ever send them).
"""

from __future__ import annotations

import datetime
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from attrs import define, field

from appliance import status as status_module
from appliance.config import Config
from appliance.modality import ModalitySimulator, SimulationError
from appliance.storage.layout import StorageLayout
from appliance.worklist.store import WorklistItem, WorklistStore

CALLING_AE = "SELFTEST"


class PhaseFailed(Exception):
    def __init__(self, phase: str, detail: str) -> None:
        super().__init__(f"{phase}: {detail}")
        self.phase = phase
        self.detail = detail


@define
class Report:
    phases: list[tuple[str, float, str]] = field(factory=list)
    failed: str | None = None
    detail: str = ""

    def as_dict(self) -> dict:
        return {
            "ok": self.failed is None,
            "failed_phase": self.failed,
            "detail": self.detail,
            "phases": [
                {"phase": name, "seconds": round(seconds, 3), "detail": detail}
                for name, seconds, detail in self.phases
            ],
        }


def _rows(db: Path, sql: str, *params: object) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        connection.row_factory = sqlite3.Row
        return connection.execute(sql, params).fetchall()


def _wait(phase: str, timeout: float, check: Callable[[], str | None], what: str) -> str:
    """Poll `check` until it returns a description of success, or fail the phase."""
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if done is not None:
            return done
        if time.monotonic() > deadline:
            raise PhaseFailed(phase, f"{what} not within {timeout:g} s")
        time.sleep(0.2)


class SelfTest:
    def __init__(
        self, config: Config, *, timeout: float = 60.0, say: Callable[[str], None] = print
    ) -> None:
        self._config = config
        self._state = config.state_dir
        self._timeout = timeout
        self._say = say
        self.report = Report()
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
        self.accession = f"SELFTEST{stamp[-8:]}"  # SH: at most 16 characters
        self._stored: list[str] = []
        self._study_uid = ""

    @contextmanager
    def _phase(self, name: str) -> Iterator[list[str]]:
        started = time.monotonic()
        detail: list[str] = []
        try:
            yield detail
        except SimulationError as exc:
            raise PhaseFailed(name, str(exc).split(": ", 1)[-1]) from None
        except PhaseFailed:
            raise
        except Exception as exc:
            raise PhaseFailed(name, f"{type(exc).__name__}: {exc}") from None
        seconds = time.monotonic() - started
        self.report.phases.append((name, seconds, " ".join(detail)))
        self._say(f"  {name:16} ok  {seconds * 1000:8.0f} ms  {' '.join(detail)}")

    def run(self) -> Report:
        try:
            self._run()
        except PhaseFailed as exc:
            self.report.failed, self.report.detail = exc.phase, exc.detail
            self._say(f"  {exc.phase:16} FAILED: {exc.detail}")
        finally:
            if self.report.failed != "appliance":
                self._cleanup()
        return self.report

    def _run(self) -> None:
        with self._phase("appliance") as detail:

            def listening() -> str | None:
                live = status_module.read(self._state, 0)
                if not live["running"]:
                    raise PhaseFailed("appliance", "not running (no fresh status.json)")
                ports = live.get("ports", {})
                if all(isinstance(ports.get(k), int) for k in ("storage", "worklist")):
                    return f"pid {live['pid']}"
                return None  # just started: the ports are in the next status write

            detail.append(_wait("appliance", 10, listening, "both DICOM ports"))
            ports = status_module.read(self._state, 0)["ports"]
            detail.append(f"ports {ports['storage']}/{ports['worklist']}")
        dicom = self._config.dicom
        host = "127.0.0.1" if dicom.host == "0.0.0.0" else dicom.host
        unit = ModalitySimulator(
            host=host,
            worklist_port=ports["worklist"],
            storage_port=ports["storage"],
            worklist_ae=dicom.worklist.ae_title,
            storage_ae=dicom.storage.ae_title,
            calling_ae=CALLING_AE,
            shape=(512, 416),
        )
        with self._phase("worklist-item") as detail:
            store = WorklistStore(self._state / "worklist.db")
            store.open()
            try:
                store.create(
                    WorklistItem(
                        accession_number=self.accession,
                        patient_id="SELFTEST",
                        patient_name="SELFTEST^APPLIANCE",
                        scheduled_at=datetime.datetime.now(datetime.UTC),
                        modality="MG",
                        study_description="Appliance self-test",
                        is_test=True,
                    )
                )
            finally:
                store.close()
            detail.append(self.accession)
        with self._phase("worklist-query"):
            item = unit.query(self.accession)
            self._study_uid = str(item.StudyInstanceUID)
        mpps_uid = unit.new_mpps_uid()
        with unit.mpps_association() as assoc:
            with self._phase("mpps-start"):
                unit.mpps_start(assoc, item, mpps_uid)
            with self._phase("store") as detail:
                self._stored = unit.store(item)
                detail.append(f"{len(self._stored)} views")
            with self._phase("mpps-complete"):
                unit.mpps_complete(assoc, mpps_uid, self._stored)
        pacs = self._state / "pacs.db"
        with self._phase("thumbnails") as detail:
            marks = ",".join("?" * len(self._stored))

            def rendered() -> str | None:
                rows = _rows(
                    pacs,
                    f"SELECT pipeline_state, thumbnail_path FROM stored_instances"
                    f" WHERE sop_instance_uid IN ({marks})",
                    *self._stored,
                )
                if any(r["pipeline_state"] == "FAILED" for r in rows):
                    raise PhaseFailed("thumbnails", "the pipeline gave up on an image")
                done = [r for r in rows if r["pipeline_state"] == "DONE" and r["thumbnail_path"]]
                return f"{len(done)} rendered" if len(done) == len(self._stored) else None

            detail.append(_wait("thumbnails", self._timeout, rendered, "four thumbnails"))
        with self._phase("study-complete") as detail:

            def complete() -> str | None:
                rows = _rows(
                    pacs,
                    "SELECT state, rule FROM studies WHERE accession_number = ?",
                    self.accession,
                )
                return (
                    f"rule {rows[0]['rule']}" if rows and rows[0]["state"] == "COMPLETE" else None
                )

            detail.append(_wait("study-complete", self._timeout, complete, "study.complete"))
        if not self._config.relay.enabled:
            self.report.phases.append(("events-acked", 0.0, "skipped: relay not configured"))
            self._say(f"  {'events-acked':16} --  skipped: relay not configured")
            return
        with self._phase("events-acked") as detail:

            def acked() -> str | None:
                total = pending = 0
                for db in (pacs, self._state / "worklist.db"):
                    for row in _rows(
                        db,
                        "SELECT delivered_at FROM events WHERE accession_number = ?",
                        self.accession,
                    ):
                        total += 1
                        pending += row["delivered_at"] is None
                return f"{total} events acknowledged" if total and not pending else None

            detail.append(_wait("events-acked", self._timeout, acked, "every event acknowledged"))

    def _drop_unsendable_events(self, db: sqlite3.Connection) -> None:
        """Without the relay the test's events could only ever wait in the outbox (or reach the
        cloud one day about a participant who never was): they go with the rest."""
        if not self._config.relay.enabled:
            db.execute(
                "DELETE FROM events WHERE accession_number = ? AND delivered_at IS NULL",
                (self.accession,),
            )

    def _cleanup(self) -> None:
        started = time.monotonic()
        layout = StorageLayout(self._state)
        removed = 0
        with sqlite3.connect(self._state / "pacs.db", timeout=10) as db:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT * FROM stored_instances WHERE accession_number = ?", (self.accession,)
            ).fetchall()
            for row in rows:
                for relative in (row["thumbnail_path"], row["preview_path"]):
                    if relative:
                        (self._state / "derived" / relative).unlink(missing_ok=True)
                layout.absolute(row["storage_path"]).unlink(missing_ok=True)
                removed += 1
            db.execute("DELETE FROM stored_instances WHERE accession_number = ?", (self.accession,))
            db.execute("DELETE FROM studies WHERE accession_number = ?", (self.accession,))
            self._drop_unsendable_events(db)
        with sqlite3.connect(self._state / "worklist.db", timeout=10) as db:
            for table in ("worklist_items", "worklist_archive"):
                db.execute(
                    f"DELETE FROM {table} WHERE accession_number = ? AND is_test = 1",
                    (self.accession,),
                )
            db.execute("DELETE FROM mpps_instances WHERE accession_number = ?", (self.accession,))
            self._drop_unsendable_events(db)
        seconds = time.monotonic() - started
        self.report.phases.append(("cleanup", seconds, f"{removed} test images removed"))
        self._say(f"  {'cleanup':16} ok  {seconds * 1000:8.0f} ms  {removed} test images removed")
