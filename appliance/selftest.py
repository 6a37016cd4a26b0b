"""`appliance selftest`: health proven by traffic, on the live appliance.

A synthetic participant goes through the whole clinic path against the running appliance's own
ports. The command asks the appliance, over its control socket, to run its test participant (a
test worklist item, its worklist query, MPPS IN PROGRESS, four synthetic views stored, MPPS
COMPLETED), then watches through read-only readers for the thumbnails, the study's completion
and (when the relay is configured) every event of it acknowledged by the cloud. Each phase is
reported with its duration; the first failure ends the run and is named. Afterwards it asks the
appliance to remove the test participant: the appliance deletes its own rows and files (the
item, its MPPS, the stored files, their derived images and index rows; delivered events stay
in the outbox history, and without the relay the test's events go too, since nothing would ever
send them). This command never writes to the appliance's databases.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from attrs import define, field

from appliance import control
from appliance import status as status_module
from appliance.config import Config
from appliance.state import StatePaths
from appliance.storage.store import InstanceStore
from appliance.worklist.store import WorklistStore

CALLING_AE = "SELFTEST"
SHAPE = (512, 416)
#: The appliance's test participant's steps, in order: each is a phase of the self-test.
UNIT_PHASES = ("worklist-query", "mpps-start", "store", "mpps-complete")


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.failed is None,
            "failed_phase": self.failed,
            "detail": self.detail,
            "phases": [
                {"phase": name, "seconds": round(seconds, 3), "detail": detail}
                for name, seconds, detail in self.phases
            ],
        }


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
        self._paths = StatePaths(config.state_dir)
        self._timeout = timeout
        self._say = say
        self.report = Report()
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d%H%M%S")
        self.accession = f"SELFTEST{stamp[-8:]}"  # SH: at most 16 characters
        self._stored: list[str] = []
        self._created = False
        self._images = InstanceStore(self._paths)
        self._worklist = WorklistStore(self._paths)

    def _passed(self, name: str, seconds: float, detail: str) -> None:
        self.report.phases.append((name, seconds, detail))
        self._say(f"  {name:16} ok  {seconds * 1000:8.0f} ms  {detail}")

    @contextmanager
    def _phase(self, name: str) -> Iterator[list[str]]:
        started = time.monotonic()
        detail: list[str] = []
        try:
            yield detail
        except PhaseFailed:
            raise
        except Exception as exc:
            raise PhaseFailed(name, f"{type(exc).__name__}: {exc}") from None
        self._passed(name, time.monotonic() - started, " ".join(detail))

    def _ask(self, action: dict[str, Any], timeout: float) -> dict[str, Any]:
        return control.request(self._paths.control_socket, action, timeout=timeout)

    def run(self) -> Report:
        try:
            self._run()
        except PhaseFailed as exc:
            self.report.failed, self.report.detail = exc.phase, exc.detail
            self._say(f"  {exc.phase:16} FAILED: {exc.detail}")
        finally:
            if self._created:
                self._cleanup()
        return self.report

    def _run(self) -> None:
        with self._phase("appliance") as detail:

            def listening() -> str | None:
                live = status_module.read(self._paths, 0)
                if not live["running"]:
                    raise PhaseFailed("appliance", "not running (no fresh status.json)")
                ports = live.get("ports", {})
                if all(isinstance(ports.get(k), int) for k in ("storage", "worklist")):
                    return f"pid {live['pid']} ports {ports['storage']}/{ports['worklist']}"
                return None  # just started: the ports are in the next status write

            detail.append(_wait("appliance", 10, listening, "both DICOM ports"))
            try:
                self._ask({"action_type": "echo", "action_id": "selftest", "payload": 1}, 10)
            except control.ControlUnavailable as exc:
                raise PhaseFailed("appliance", str(exc)) from None
        self._participant()
        with self._phase("thumbnails") as detail:

            def rendered() -> str | None:
                rows = self._images.reader.instances(self._stored)
                if any(r.pipeline_state == "FAILED" for r in rows):
                    raise PhaseFailed("thumbnails", "the pipeline gave up on an image")
                done = [r for r in rows if r.pipeline_state == "DONE" and r.thumbnail_path]
                return f"{len(done)} rendered" if len(done) == len(self._stored) else None

            detail.append(_wait("thumbnails", self._timeout, rendered, "four thumbnails"))
        with self._phase("study-complete") as detail:

            def complete() -> str | None:
                study = self._images.reader.study_state(self.accession)
                return f"rule {study.rule}" if study and study.state == "COMPLETE" else None

            detail.append(_wait("study-complete", self._timeout, complete, "study.complete"))
        if self._config.cloud.profile == "manage":
            self._manage()
            return
        if not self._config.relay.enabled:
            self.report.phases.append(("events-acked", 0.0, "skipped: relay not configured"))
            self._say(f"  {'events-acked':16} --  skipped: relay not configured")
            return
        with self._phase("events-acked") as detail:

            def acked() -> str | None:
                found = self._worklist.events(self.accession) + self._images.events(self.accession)
                pending = [e for e in found if e["delivered_at"] is None]
                return f"{len(found)} events acknowledged" if found and not pending else None

            detail.append(_wait("events-acked", self._timeout, acked, "every event acknowledged"))

    def _manage(self) -> None:
        """Under the manage profile no event goes to a cloud: the test's images pass through the
        upload queue (and are kept from Manage, which knows no self-test action), and the
        appliance proves its way to Manage: a token for its audience, its health check."""
        with self._phase("upload-queue") as detail:

            def settled() -> str | None:
                outcomes = self._images.reader.upload_outcomes(self._stored)
                if len(outcomes) == len(self._stored) and "PENDING" not in outcomes.values():
                    return f"{len(outcomes)} {'/'.join(sorted(set(outcomes.values())))}"
                return None

            detail.append(_wait("upload-queue", self._timeout, settled, "upload outcomes"))
        with self._phase("manage-reachable") as detail:
            try:
                reply = self._ask({"action_type": "cloud.probe"}, 40)
            except (control.ControlUnavailable, OSError) as exc:
                raise PhaseFailed("manage-reachable", str(exc) or type(exc).__name__) from None
            if reply.get("status") != "ok":
                where = reply.get("phase", "upload")
                raise PhaseFailed("manage-reachable", f"{where}: {reply.get('message')}")
            if reply.get("healthcheck") != 200:
                raise PhaseFailed(
                    "manage-reachable", f"GET /healthcheck answered {reply.get('healthcheck')}"
                )
            detail.append(
                f"token valid {reply['token_valid_s']} s, healthcheck 200,"
                f" {reply['uploaded']} uploaded since start"
            )

    def _participant(self) -> None:
        """The appliance's test participant: its item, then the simulated unit's steps."""
        now = datetime.datetime.now(datetime.UTC)
        started = time.monotonic()
        action = {
            "action_type": "worklist.create_test_item",
            "action_id": f"selftest-{self.accession}",
            "parameters": {
                "worklist_item": {
                    "accession_number": self.accession,
                    "participant": {"nhs_number": "SELFTEST", "name": "SELFTEST^APPLIANCE"},
                    "scheduled": {
                        "date": now.strftime("%Y-%m-%d"),
                        "time": now.strftime("%H:%M:%S"),
                    },
                    "procedure": {"modality": "MG", "study_description": "Appliance self-test"},
                },
                "unit": {"calling_ae": CALLING_AE, "rows": SHAPE[0], "columns": SHAPE[1]},
            },
        }
        # Cleaned up whatever the answer: a timeout or Ctrl-C here may leave the appliance
        # creating the item (removing one that never was is a harmless error reply).
        self._created = True
        try:
            reply = self._ask(action, timeout=max(self._timeout, 30))
        except (control.ControlUnavailable, OSError) as exc:
            raise PhaseFailed("worklist-item", str(exc) or type(exc).__name__) from None
        unit_phases = [(name, seconds) for name, seconds in reply.get("phases", [])]
        if not reply.get("test") and reply.get("status") == "error":
            raise PhaseFailed("worklist-item", reply.get("message", "refused"))
        spent = sum(seconds for _, seconds in unit_phases)
        self._passed("worklist-item", max(time.monotonic() - started - spent, 0), self.accession)
        for name, seconds in unit_phases:
            detail = f"{len(reply.get('stored_instances', []))} views" if name == "store" else ""
            self._passed(name, seconds, detail)
        if reply.get("status") == "error":
            phase = reply.get("phase", "simulator")
            message = str(reply.get("message", "")).split(": ", 1)[-1]
            raise PhaseFailed(phase, message)
        self._stored = list(reply.get("stored_instances", []))

    def _cleanup(self) -> None:
        started = time.monotonic()
        try:
            reply = self._ask(
                {
                    "action_type": "worklist.remove_test_item",
                    "action_id": f"selftest-cleanup-{self.accession}",
                    "parameters": {"accession_number": self.accession},
                },
                timeout=30,
            )
        except (control.ControlUnavailable, OSError) as exc:
            reply = {"status": "error", "message": str(exc)}
        seconds = time.monotonic() - started
        if reply.get("status") != "removed" and not self._stored and self.report.failed:
            # Nothing was created (the item was refused): nothing to remove.
            self._say(f"  {'cleanup':16} --  nothing to remove")
            return
        if reply.get("status") != "removed":
            detail = f"not removed: {reply.get('message')}"
            self.report.phases.append(("cleanup", seconds, detail))
            self._say(f"  {'cleanup':16} FAILED: {detail}")
            return
        self._passed("cleanup", seconds, f"{reply.get('images', 0)} test images removed")
