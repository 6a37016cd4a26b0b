"""Cloud actions: JSON on the rendezvous socket, one reply each (see docs/relay-protocol.md).

Payloads are structured with cattrs into attrs classes; a missing or mistyped field is
answered with a structured error naming it, never a crash. Unknown fields are ignored so the
cloud can add to its envelope (schema_version, timestamp, source_system, ...).
"""

from __future__ import annotations

import datetime
import json
import math
import zoneinfo
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import cattrs
import httpx
import trio
from attrs import frozen

from appliance import audit
from appliance.config import strict_converter
from appliance.identity import IdentityError
from appliance.log import get_logger
from appliance.relay.fetch import FetchError, FetchRequest, ImageFetch
from appliance.storage.store import InstanceStore
from appliance.supervisor import Criticality
from appliance.worklist.store import (
    CANCELLED,
    AccessionConflict,
    UnknownItem,
    WorklistError,
    WorklistItem,
    WorklistStore,
)

T = TypeVar("T")
log = get_logger("relay")

converter = strict_converter(forbid_extra_keys=False)


@frozen
class Participant:
    nhs_number: str
    name: str
    birth_date: str = ""
    sex: str = ""


@frozen
class Scheduled:
    date: str  # UTC, YYYY-MM-DD
    time: str  # UTC, HH:MM[:SS]


@frozen
class Procedure:
    modality: str = "MG"
    study_description: str = ""
    #: The unit that will perform it (Scheduled Station AE Title / Name); empty: site default.
    station_ae_title: str = ""
    station_name: str = ""
    #: Procedure (and protocol) code; all three or none; none: the site's default.
    code_value: str = ""
    code_scheme: str = ""
    code_meaning: str = ""


@frozen
class NewItem:
    accession_number: str
    participant: Participant
    scheduled: Scheduled
    procedure: Procedure = Procedure()


@frozen
class CreateItem:
    worklist_item: NewItem


@frozen
class ItemStatus:
    accession_number: str
    status: str = CANCELLED


@frozen
class UpdateStatus:
    worklist_item: ItemStatus


@frozen
class UnitSettings:
    """How the test participant's simulated unit presents itself (all optional)."""

    calling_ae: str = "SIMULATOR"
    rows: int = 1024
    columns: int = 832


@frozen
class CreateTestItem:
    worklist_item: NewItem
    unit: UnitSettings = UnitSettings()


@frozen
class TestItem:
    accession_number: str


class TestUnit(Protocol):
    """A simulated unit performing one worklist item against this appliance's ports; a
    failure raises an exception with a `phase` attribute naming the step."""

    def run(
        self,
        accession: str,
        progress: Callable[[str], None] = ...,
        phases: list[tuple[str, float]] | None = None,
    ) -> list[str]: ...


#: Builds the test unit aimed at this appliance (injected: the simulator is not production code).
UnitFactory = Callable[[UnitSettings], TestUnit]


class ActionError(Exception):
    """A request the appliance refuses; the message is sent back as is."""


def _problems(exc: Exception) -> str:
    lines = cattrs.transform_error(exc, path="parameters")
    return "; ".join(line.replace(" @ ", " at ") for line in lines)


def _structure(parameters: Any, cls: type) -> Any:
    try:
        return converter.structure(parameters, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        detail = _problems(exc) if isinstance(exc, cattrs.BaseValidationError) else str(exc)
        raise ActionError(f"invalid parameters: {detail}") from None


def _scheduled_at(scheduled: Scheduled, zone: datetime.tzinfo) -> datetime.datetime:
    """The scheduled moment: YYYY-MM-DD or YYYYMMDD, HH:MM[:SS] or HHMMSS, in `zone` (the
    cloud sends no zone; cloud.scheduled_time_zone says which it means), as UTC."""
    try:
        moment = datetime.datetime.fromisoformat(f"{scheduled.date}T{scheduled.time}")
    except ValueError:
        raise ActionError(
            f"invalid parameters: scheduled {scheduled.date} {scheduled.time} is not a date/time"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(datetime.UTC)


def _sex(value: str) -> str:
    return {"female": "F", "male": "M", "other": "O"}.get(value.lower(), value.upper()[:1])


#: Manage records an action as failed when no reply came within 30 s: answer before.
DEADLINE_S = 25.0
#: Actions that take as long as they take (they stream, or run a simulated exam).
UNBOUNDED = {"image.fetch", "worklist.create_test_item"}


def manage_health(health: dict[str, Any], listener_uptime_s: float) -> dict[str, Any]:
    """Our health in the shape Manage reads: `healthy` is the AND of every check's `ok`."""
    checks = health["checks"]
    disk = checks["disk"]
    shaped = {
        "mwl_port": {"ok": bool(checks.get("worklist_port"))},
        "pacs_port": {"ok": bool(checks.get("storage_port"))},
        "disk": {
            "ok": bool(disk.get("ok")),
            "free_bytes": disk.get("free_bytes"),
            "free_percent": disk.get("free_percent"),
        },
        # Ours: side-matters that keep failing while DICOM serves (someone should look).
        "services": {"ok": not health.get("degraded"), "degraded": health.get("degraded", [])},
    }
    return {
        "healthy": all(check["ok"] for check in shaped.values()),
        "version": health.get("version"),
        "listener_uptime_seconds": round(listener_uptime_s),
        "checks": shaped,
    }


#: Actions that create (C), update (U) or delete (D) a woman's worklist record.
PATIENT_RECORD_ACTIONS = {
    "worklist.create_item": "C",
    "worklist.create_test_item": "C",
    "worklist.update_status": "U",
    "worklist.cancel_item": "D",
    "worklist.remove_test_item": "D",
}


def action_id_of(message: Any) -> str:
    return str(message.get("action_id") or "") if isinstance(message, dict) else ""


class CloudActions:
    """The cloud's actions (over the relay) and the operator's (over the control socket).

    As a service it holds what runs after its reply: under `manage`, a test participant's
    simulated exam (Manage wants the reply "as create", within its 30 s)."""

    name = "cloud-actions"
    criticality = Criticality.AUXILIARY

    def __init__(
        self,
        worklist: WorklistStore,
        health: Callable[[], Awaitable[dict[str, Any]]],
        *,
        images: InstanceStore | None = None,
        test_unit: UnitFactory | None = None,
        fetch: ImageFetch | None = None,
        events_are_sent: bool = True,
        profile: str = "relay-events",
        scheduled_zone: str = "UTC",
        listener_uptime: Callable[[], float] = lambda: 0.0,
        deadline_s: float = DEADLINE_S,
        probe: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        cloud_identity: str = "cloud",
    ) -> None:
        #: Who the audit trail names for a relay action (the hybrid connection it came on).
        self._cloud_identity = cloud_identity
        #: "manage": every reply in the NHS Manage contract's exact shape (docs/cloud.md).
        self._manage = profile == "manage"
        self._zone = zoneinfo.ZoneInfo(scheduled_zone)
        self._listener_uptime = listener_uptime
        self._deadline = deadline_s
        self._worklist = worklist
        self._images = images
        self._health = health
        self._test_unit = test_unit
        self._fetch = fetch
        self._events_are_sent = events_are_sent
        self._background: trio.Nursery | None = None
        self._exams: set[str] = set()  # accessions whose background exam is running
        #: The uploader's check of Manage (`cloud.probe`, an operator's action only).
        self._probe = probe
        self._handlers = {
            "worklist.create_item": self._create_item,
            "worklist.create_test_item": self._create_test_item,
            "worklist.remove_test_item": self._remove_test_item,
            "worklist.update_status": self._update_status,
            "worklist.cancel_item": self._cancel_item,
            "health": self._report_health,
            "echo": self._echo,
        }

    async def _write(self, function: Callable[..., T], *args: Any) -> T:
        """A worklist write the action's deadline may stop waiting for (a stalled disk): the
        reply then says it may still take effect, which is true, and asking again is safe."""
        return await self._worklist.database.write_or_stop_waiting(function, *args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._background = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._background = None

    async def handle_local(self, text: str) -> str:
        """An operator's action over the control socket (`appliance selftest`): a test
        participant's reply waits for its exam, whatever the profile, to report its phases."""
        return await self.handle(text, local=True)

    async def handle(self, text: str, channel: Any = None, *, local: bool = False) -> str:
        """One action in, one reply out; never raises. `channel` is the rendezvous WebSocket,
        for actions that stream before their reply (image.fetch)."""
        action_id = None
        action_type: Any = None
        message: Any = {}
        about = ("", "")
        received = datetime.datetime.now(datetime.UTC)
        try:
            message = json.loads(text)
            if not isinstance(message, dict):
                raise ActionError("an action is a JSON object")
            action_id = message.get("action_id")
            action_type = message.get("action_type")
            if action_type == "cloud.probe" and local:
                return json.dumps(await self._probe_cloud())
            if action_type not in self._handlers and action_type != "image.fetch":
                if self._manage:
                    raise ActionError(f"Unsupported action: {action_type}")
                raise ActionError(f"unknown action_type {action_type!r}")
            # Under manage a test participant's exam runs after the reply (when it can).
            after_reply = (
                action_type == "worklist.create_test_item"
                and self._manage
                and not local
                and self._background is not None
            )
            if action_type in PATIENT_RECORD_ACTIONS:
                about = await self._patient_of(message)
            unbounded = action_type in UNBOUNDED and not after_reply
            limit = math.inf if unbounded else self._deadline
            with trio.move_on_after(limit) as deadline:
                parameters = message.get("parameters") or {}
                if action_type == "image.fetch":
                    reply = await self._image_fetch(parameters, channel)
                elif after_reply:
                    reply = await self._create_test_item(parameters, message, exam_after_reply=True)
                else:
                    reply = await self._handlers[action_type](parameters, message)
            if deadline.cancelled_caught:  # an answer before the cloud gives up on us
                raise ActionError(
                    f"{action_type} did not finish within {limit:g} s; it may still take "
                    "effect: ask again"
                )
            log.info(
                "action.done",
                action_type=action_type,
                action_id=action_id,
                status=reply.get("status"),
            )
        except (json.JSONDecodeError, RecursionError) as exc:
            # RecursionError: nesting deeper than the parser goes ({{{{...).
            reason = exc if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            reply = {"status": "error", "message": f"malformed JSON: {reason}"}
            log.warning("action.refused", phase="action", reason="malformed JSON")
        except (ActionError, WorklistError, FetchError) as exc:
            reply = {"status": "error", "message": str(exc)}
            if isinstance(exc, WorklistError) and not self._manage:
                reply["code"] = exc.code
            log.warning("action.refused", phase="action", action_id=action_id, reason=str(exc))
        except Exception as exc:  # a store or disk error: a structured reply, not a dead channel
            log.exception("action.failed", phase="action", action_id=action_id)
            reply = {"status": "error", "message": f"internal error: {type(exc).__name__}: {exc}"}
        if action_type in PATIENT_RECORD_ACTIONS:
            who = "control-socket" if local else self._cloud_identity
            self._audit(action_type, message, reply, about, who, received)
        if self._manage:
            # The contract's shapes exactly: action_id only where Manage's gateway puts it.
            if reply.get("status") in ("created", "exists", "ok"):  # in the NHS gateway's order
                reply = {"status": reply["status"], "action_id": action_id} | reply
            return json.dumps(reply)
        return json.dumps({**reply, "action_id": action_id})

    async def _patient_of(self, message: Any) -> tuple[str, str]:
        """The (patient ID, accession) a worklist action is about, looked up before the action
        changes or removes the item."""
        parameters = message.get("parameters") if isinstance(message, dict) else None
        parameters = parameters if isinstance(parameters, dict) else {}
        item = parameters.get("worklist_item")
        item = item if isinstance(item, dict) else {}
        participant = item.get("participant")
        participant = participant if isinstance(participant, dict) else {}
        accession = str(item.get("accession_number") or parameters.get("accession_number") or "")
        patient = str(participant.get("nhs_number") or "")
        if not patient and accession:
            try:
                known = await trio.to_thread.run_sync(self._worklist.get, accession)
                patient = known.patient_id if known else ""
            except Exception:  # the audit names what it can; the action goes ahead
                patient = ""
        return patient, accession

    def _audit(
        self,
        action_type: str,
        message: Any,
        reply: dict[str, Any],
        about: tuple[str, str],
        who: str,
        received: datetime.datetime,
    ) -> None:
        """A worklist item's Patient Record audit message (PS3.15 A.5.3.8), whatever became
        of the action."""
        failed = reply.get("status") == "error"
        audit.record(
            audit.patient_record(
                action=PATIENT_RECORD_ACTIONS[action_type],
                patient_id=about[0],
                accession=about[1],
                cloud=who,
                when=received,
                outcome=audit.MINOR_FAILURE if failed else audit.SUCCESS,
                description=f"{action_type} {action_id_of(message)}: {reply.get('status')}"
                + (f" ({reply.get('message')})" if failed else ""),
            )
        )

    async def _create_item(
        self, parameters: Any, message: dict[str, Any], test: bool = False
    ) -> dict[str, Any]:
        new = _structure(parameters, CreateItem).worklist_item
        code = (new.procedure.code_value, new.procedure.code_scheme, new.procedure.code_meaning)
        if any(code) and not all(code):
            raise ActionError("procedure code needs code_value, code_scheme and code_meaning")
        item = WorklistItem(
            accession_number=new.accession_number,
            patient_id=new.participant.nhs_number,
            patient_name=new.participant.name,
            patient_birth_date=new.participant.birth_date.replace("-", ""),
            patient_sex=_sex(new.participant.sex),
            scheduled_at=_scheduled_at(new.scheduled, self._zone),
            modality=new.procedure.modality,
            study_description=new.procedure.study_description,
            scheduled_station_ae=new.procedure.station_ae_title,
            scheduled_station_name=new.procedure.station_name,
            procedure_code_value=new.procedure.code_value,
            procedure_code_scheme=new.procedure.code_scheme,
            procedure_code_meaning=new.procedure.code_meaning,
            source_message_id=message.get("action_id"),
            is_test=test,
        )
        try:
            result, stored = await self._write(self._worklist.create, item)
        except AccessionConflict as exc:
            if not self._manage:
                raise
            # Manage's gateway answers "exists" for any accession it holds; the difference is
            # ours to record, not a failure for the cloud to retry.
            log.warning(
                "worklist.create_conflict", action_id=message.get("action_id"), error=str(exc)
            )
            return {"status": "exists"}
        if self._manage:
            return {"status": result}
        return {"status": result, "study_instance_uid": stored.study_instance_uid}

    async def _create_test_item(
        self, parameters: Any, message: dict[str, Any], *, exam_after_reply: bool = False
    ) -> dict[str, Any]:
        """The end-to-end test participant: the item, then a simulated unit performing it;
        with `exam_after_reply` (Manage's), the reply is create's and the exam runs afterwards
        in the background (its outcome logged), once per accession."""
        if self._test_unit is None or (exam_after_reply and self._background is None):
            raise ActionError("the modality simulator is not available here")
        settings = _structure(parameters, CreateTestItem).unit
        reply = await self._create_item(
            {"worklist_item": parameters["worklist_item"]}, message, test=True
        )
        accession = parameters["worklist_item"]["accession_number"]
        if exam_after_reply:
            assert self._background is not None
            if await self._exam_wanted(reply, accession):
                self._exams.add(accession)
                self._background.start_soon(
                    self._exam, settings, accession, message.get("action_id")
                )
            return reply
        phases: list[tuple[str, float]] = []
        try:
            stored = await self._perform(settings, accession, phases)
        except Exception as exc:  # the unit's failure is the reply, never the listener's
            return {
                "status": "error",
                "phase": getattr(exc, "phase", "simulator"),
                "message": str(exc),
                "test": True,
                "phases": phases,
            }
        return reply | {"test": True, "stored_instances": stored, "phases": phases}

    async def _exam_wanted(self, reply: dict[str, Any], accession: str) -> bool:
        """A new item is examined; a retried one (`exists`) only if no exam is running for it
        and none stored images (the first attempt's reply may have been cut by the deadline)."""
        if accession in self._exams:
            return False
        if reply.get("status") == "created":
            return True
        if self._images is None:
            return False
        study = await trio.to_thread.run_sync(self._images.reader.study_state, accession)
        return study is None

    async def _probe_cloud(self) -> dict[str, Any]:
        if self._probe is None:
            return {"status": "error", "message": "no HTTPS cloud configured (profile manage)"}
        try:
            with trio.fail_after(self._deadline):
                return {"status": "ok"} | await self._probe()
        except IdentityError as exc:
            return {"status": "error", "phase": "identity", "message": exc.reason}
        except trio.TooSlowError:
            return {"status": "error", "phase": "upload", "message": "no answer in time"}
        except httpx.HTTPError as exc:
            return {"status": "error", "phase": "upload", "message": f"{type(exc).__name__}: {exc}"}

    async def _perform(
        self, settings: UnitSettings, accession: str, phases: list[tuple[str, float]]
    ) -> list[str]:
        """The simulated unit performs the test item's exam: the SOP Instance UIDs it stored."""
        assert self._test_unit is not None
        unit = self._test_unit(settings)
        return await trio.to_thread.run_sync(lambda: unit.run(accession, phases=phases))

    async def _exam(self, settings: UnitSettings, accession: str, action_id: Any) -> None:
        phases: list[tuple[str, float]] = []
        try:
            stored = await self._perform(settings, accession, phases)
        except Exception as exc:  # the unit's failure is logged, never the service's
            log.warning(
                "test_item.exam_failed",
                phase=getattr(exc, "phase", "simulator"),
                action_id=action_id,
                error=str(exc),
            )
            return
        finally:
            self._exams.discard(accession)
        log.info("test_item.exam_done", action_id=action_id, images=len(stored), phases=phases)

    async def _remove_test_item(self, parameters: Any, message: dict[str, Any]) -> dict[str, Any]:
        """Forget a test participant: its item, MPPS, images and their files, its study; and
        its events if nothing will ever send them. Real participants are never touched."""
        accession = _structure(parameters, TestItem).accession_number
        drop = not self._events_are_sent
        study = await self._write(self._worklist.remove_test_item, accession, drop)
        if study is None:
            raise ActionError(f"no test item with accession {accession}")
        images = 0
        if self._images is not None:
            images = await self._images.remove_test_study(accession, study, drop)
        return {"status": "removed", "images": images}

    async def _update_status(self, parameters: Any, message: dict[str, Any]) -> dict[str, Any]:
        change = _structure(parameters, UpdateStatus).worklist_item
        status = change.status.upper() if self._manage else change.status  # 'completed' too
        try:
            await self._write(self._worklist.set_status, change.accession_number, status)
        except UnknownItem:
            if not self._manage:
                raise
            raise ActionError(f"Worklist item '{change.accession_number}' not found") from None
        if self._manage:
            return {"accession_number": change.accession_number, "status": "updated"}
        return {"status": "updated"}

    async def _cancel_item(self, parameters: Any, message: dict[str, Any]) -> dict[str, Any]:
        change = _structure(parameters, UpdateStatus).worklist_item
        await self._write(self._worklist.set_status, change.accession_number, CANCELLED)
        return {"status": "cancelled"}

    async def _report_health(self, parameters: Any, message: dict[str, Any]) -> dict[str, Any]:
        health = await self._health()
        if self._manage:
            health = manage_health(health, self._listener_uptime())
        return {"status": "ok", "health": health}

    async def _image_fetch(self, parameters: Any, channel: Any) -> dict[str, Any]:
        if self._fetch is None:
            raise ActionError("image.fetch is not available here")
        if channel is None:
            raise ActionError("image.fetch streams: send it on a connection, not as a request")
        return await self._fetch.run(_structure(parameters, FetchRequest), channel)

    async def _echo(self, parameters: Any, message: dict[str, Any]) -> dict[str, Any]:
        if self._manage:  # Manage's gateway echoes the whole request
            return {"status": "echo", "payload": message}
        return {"status": "echo", "payload": message.get("payload", parameters)}
