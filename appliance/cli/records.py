"""`appliance worklist ...` and `appliance outbox ...`: the worklist and the cloud's events.

Reads go through read-only readers whether or not the appliance runs. A worklist change while
it runs is sent to it over the control socket (it owns worklist.db); with it stopped, the
command writes under the state directory's lock. Outbox changes wait for it to stop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import zoneinfo
from collections.abc import Callable
from typing import Any

import attrs

from appliance import audit, control
from appliance import config as config_module
from appliance.cli.offline import load, offline
from appliance.config import ConfigError
from appliance.outbox import Outbox
from appliance.state import StatePaths, in_use
from appliance.storage.store import InstanceStore
from appliance.uploads import UploadQueue
from appliance.worklist.store import CANCELLED, WorklistError, WorklistItem, WorklistStore


def _scheduled(text: str, zone_name: str) -> datetime.datetime:
    """'2026-11-22 14:30' in the site's time zone, or with an explicit offset/Z."""
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError([f"worklist add: --scheduled {text!r} is not a date and time"]) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(zone_name))
    return moment.astimezone(datetime.UTC)


def _procedure_code(text: str) -> tuple[str, str, str]:
    if not text:
        return "", "", ""
    parts = text.split("^")
    if len(parts) != 3 or not all(parts):
        raise ConfigError([f"worklist add: --procedure-code {text!r} is not VALUE^SCHEME^MEANING"])
    return parts[0], parts[1], parts[2]


def _through_appliance(paths: StatePaths, action: dict[str, Any]) -> dict[str, Any]:
    reply = control.request(paths.control_socket, action, timeout=30)
    if reply.get("status") == "error":
        raise WorklistError(reply.get("message", "refused"))
    return reply


def cmd_worklist_add(args: argparse.Namespace) -> int:
    config = load(args)
    paths = StatePaths(config.state_dir)
    item = WorklistItem(
        accession_number=args.accession,
        patient_id=args.patient_id,
        patient_name=args.name,
        patient_birth_date=args.birth_date.replace("-", ""),
        patient_sex=args.sex,
        scheduled_at=_scheduled(args.scheduled, config.worklist.timezone),
        modality=args.modality,
        study_description=args.description,
        scheduled_station_ae=args.station_ae,
        scheduled_station_name=args.station_name,
    )
    value, scheme, meaning = _procedure_code(args.procedure_code)
    item = attrs.evolve(
        item,
        procedure_code_value=value,
        procedure_code_scheme=scheme,
        procedure_code_meaning=meaning,
    )
    try:
        if in_use(paths):
            reply = _through_appliance(
                paths,
                {
                    "action_type": "worklist.create_item",
                    "action_id": f"cli-{args.accession}",
                    "parameters": {
                        "worklist_item": {
                            "accession_number": item.accession_number,
                            "participant": {
                                "nhs_number": item.patient_id,
                                "name": item.patient_name,
                                "birth_date": args.birth_date,
                                "sex": item.patient_sex,
                            },
                            "scheduled": {
                                "date": item.scheduled_at.strftime("%Y-%m-%d"),
                                "time": item.scheduled_at.strftime("%H:%M:%S"),
                            },
                            "procedure": {
                                "modality": item.modality,
                                "study_description": item.study_description,
                                "station_ae_title": item.scheduled_station_ae,
                                "station_name": item.scheduled_station_name,
                                "code_value": item.procedure_code_value,
                                "code_scheme": item.procedure_code_scheme,
                                "code_meaning": item.procedure_code_meaning,
                            },
                        }
                    },
                },
            )
            result, study_uid = reply["status"], reply.get("study_instance_uid")
        else:
            with offline(paths, "worklist add"):
                store = WorklistStore(paths)
                store.open()
                try:
                    result, stored = store.database.run_sync(store.create, item)
                finally:
                    store.close()
            study_uid = stored.study_instance_uid
    except (WorklistError, control.ControlUnavailable, OSError) as exc:
        print(f"worklist add: {exc}", file=sys.stderr)
        return 1
    print(f"{result}: {item.accession_number} study {study_uid}")
    return 0


def cmd_worklist_list(args: argparse.Namespace) -> int:
    config = load(args)
    store = WorklistStore(StatePaths(config.state_dir))
    items = store.items(include_finished=args.all) if store.database.exists else []
    zone = zoneinfo.ZoneInfo(config.worklist.timezone)
    if args.json:
        for item in items:
            print(json.dumps(config_module.converter.unstructure(item), default=str))
        return 0
    print(
        f"{'accession':16} {'scheduled (' + config.worklist.timezone + ')':26} "
        f"{'mod':4} {'status':12} {'patient id':12} name"
    )
    for item in items:
        local = item.scheduled_at.astimezone(zone).strftime("%Y-%m-%d %H:%M")
        print(
            f"{item.accession_number:16} {local:26} {item.modality:4} {item.status:12} "
            f"{item.patient_id:12} {item.patient_name}"
        )
    return 0


def cmd_worklist_cancel(args: argparse.Namespace) -> int:
    paths = StatePaths(load(args).state_dir)
    try:
        if in_use(paths):
            _through_appliance(
                paths,
                {
                    "action_type": "worklist.cancel_item",
                    "action_id": f"cli-cancel-{args.accession}",
                    "parameters": {"worklist_item": {"accession_number": args.accession}},
                },
            )
        else:
            with offline(paths, "worklist cancel"):
                store = WorklistStore(paths)
                store.open()
                try:
                    store.database.run_sync(store.set_status, args.accession, CANCELLED)
                finally:
                    store.close()
    except (WorklistError, control.ControlUnavailable, OSError) as exc:
        print(f"worklist cancel: {exc}", file=sys.stderr)
        return 1
    print(f"cancelled: {args.accession}")
    return 0


def _outbox(paths: StatePaths) -> tuple[Outbox, WorklistStore, InstanceStore]:
    worklist, store = WorklistStore(paths), InstanceStore(paths)
    return Outbox({"worklist": worklist.database, "images": store.database}), worklist, store


def cmd_outbox_list(args: argparse.Namespace) -> int:
    outbox, worklist, store = _outbox(StatePaths(load(args).state_dir))
    if not (worklist.database.exists and store.database.exists):
        return 0
    for row in outbox.listing(include_delivered=args.all):
        delivered = row["delivered_at"] or "pending"
        print(
            f"{row['occurred_at']}  {row['event_type']:24} {row['event_id']}  "
            f"{row['accession_number'] or '-':16} {delivered}"
        )
    # Image uploads to Manage (cloud profile manage).
    for upload in UploadQueue(store.database).listing(include_done=args.all):
        status = upload["last_status"] or "-"
        print(
            f"{upload['updated_at']}  upload {upload['state']:17} {upload['sop_instance_uid']}  "
            f"HTTP {status} {upload['error'] or ''}".rstrip()
        )
    return 0


def _change_outbox(args: argparse.Namespace, command: str, change: Callable[[Outbox], int]) -> int:
    paths = StatePaths(load(args).state_dir)
    outbox, worklist, store = _outbox(paths)
    with offline(paths, command):
        worklist.open()
        store.open()
        try:
            return change(outbox)
        finally:
            store.close()
            worklist.close()


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    if not args.event_id and not args.all:
        print("outbox retry: name an EVENT_ID or pass --all", file=sys.stderr)
        return 2
    count = _change_outbox(
        args, "outbox retry", lambda outbox: outbox.retry(None if args.all else args.event_id)
    )
    print(f"outbox retry: {count} event(s) will be sent again")
    uploads = 0
    if args.all:
        paths = StatePaths(load(args).state_dir)
        store = InstanceStore(paths)
        with offline(paths, "outbox retry"):
            store.open()
            try:
                uploads = store.database.run_sync(UploadQueue(store.database).retry_failed)
            finally:
                store.close()
        print(f"outbox retry: {uploads} failed upload(s) will be tried again")
    return 0 if count or uploads else 1


def cmd_outbox_purge(args: argparse.Namespace) -> int:
    before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=args.older_than_days)
    count = _change_outbox(
        args, "outbox purge", lambda outbox: outbox.purge(before.isoformat(timespec="milliseconds"))
    )
    print(
        f"outbox purge: {count} delivered event(s) older than {args.older_than_days} days removed"
    )
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Who saw, sent or changed this woman's data: the audit trail, oldest first."""
    paths = StatePaths(load(args).state_dir)
    since = args.since
    if since and not re.fullmatch(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2})?)?Z?", since):
        print(f"audit: --since {since!r} is not YYYY-MM-DD or YYYY-MM-DDTHH:MM", file=sys.stderr)
        return 2
    shown = 0
    for line in audit.lines(paths.audit):
        try:
            entry = audit.parse(line)
        except (ValueError, AssertionError):  # ET.ParseError is a ValueError
            print(f"audit: unreadable line skipped: {line[:80]}", file=sys.stderr)
            continue
        if args.patient and args.patient not in entry.patients:
            continue
        if since and entry.when < since.replace(" ", "T"):
            continue
        if args.event and args.event.lower() not in entry.event.lower():
            continue
        shown += 1
        if args.json:
            print(json.dumps(attrs.asdict(entry, filter=lambda a, _v: a.name != "xml" or args.xml)))
            continue
        who = ", ".join(
            w.get("UserID", "?")
            + (f"@{w['NetworkAccessPointID']}" if w.get("NetworkAccessPointID") else "")
            for w in entry.who
        )
        outcome = "ok" if entry.outcome == 0 else f"FAILED({entry.outcome})"
        what = " ".join(f"study {uid} ({n})" for uid, n in entry.studies.items())
        patients = ",".join(entry.patients)
        print(
            f"{entry.when}  {entry.event:36} {entry.action} {outcome:10} {who}"
            + (f"  patient {patients}" if patients else "")
            + (f"  {what}" if what else "")
            + (f"  {entry.description}" if entry.description else "")
        )
    if not shown and not args.json:
        print("audit: no matching messages", file=sys.stderr)
    return 0
