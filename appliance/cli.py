"""The `appliance` command. Exit codes: 0 success, 1 failure at run time, 2 bad usage or config."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import trio

from appliance import config as config_module
from appliance import errors, log
from appliance.config import Config, ConfigError


def _config_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "config", config_module.DEFAULT_PATH))


def _load(args: argparse.Namespace) -> Config:
    return config_module.load(_config_path(args))


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.app import serve
    from appliance.sdnotify import Notifier
    from appliance.supervisor import RestartBudgetExceeded

    config = _load(args)
    config_module.effective(config)  # secrets readable now, or exit 2 naming the key
    log.configure(config.log.level, config.log.format)
    notifier = Notifier()
    status = 0
    try:
        trio.run(serve, config, notifier)
    except* RestartBudgetExceeded as group:
        for exc in errors.leaves(group):
            log.get_logger("appliance").error(
                "appliance.failed", phase="supervision", service_name=exc.service, error=str(exc)
            )
        status = 1
    except* Exception as group:
        # Anything else escaping the supervisor is a startup failure (state dir, index, ...).
        log.get_logger("appliance").exception(
            "appliance.failed", phase="startup", error=errors.describe(group)
        )
        status = 1
    finally:
        notifier.close()
    return status


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(json.dumps(config_module.effective(config), indent=2))
    print(f"config ok: {_config_path(args)}", file=sys.stderr)
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from appliance.storage.layout import StorageLayout
    from appliance.storage.recovery import ProgressPrinter, recover
    from appliance.storage.store import InstanceStore

    config = _load(args)
    store = InstanceStore(StorageLayout(config.state_dir))
    store.open()
    try:
        report = recover(
            store.layout,
            store.index,
            verify_hashes=args.verify_hashes,
            progress=ProgressPrinter(lambda line: print(line, file=sys.stderr)),
        )
        indexed = store.index.count()
    finally:
        store.close()
    print(
        f"fsck: {indexed} indexed instances; spool files removed {report.spool_files_removed}, "
        f"re-indexed {report.files_reindexed}, missing {report.rows_missing}, "
        f"corrupt {report.rows_corrupt}, restored {report.rows_restored}, "
        f"unrecognised files {len(report.files_unrecognised)}"
        + (f", hashes verified {report.files_checked}" if args.verify_hashes else "")
    )
    for path in report.files_unrecognised:
        print(f"fsck: unrecognised file storage/{path}")
    # Non-zero when something was wrong, so scripts and runbooks notice; repairs are done.
    return 0 if report.clean else 1


def _worklist(args: argparse.Namespace):
    from appliance.worklist.store import WorklistStore

    config = _load(args)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    store = WorklistStore(config.state_dir / "worklist.db")
    store.open()
    return config, store


def _scheduled(text: str, zone_name: str):
    """'2026-11-22 14:30' in the site's time zone, or with an explicit offset/Z."""
    import datetime
    import zoneinfo

    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError([f"worklist add: --scheduled {text!r} is not a date and time"]) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zoneinfo.ZoneInfo(zone_name))
    return moment.astimezone(datetime.UTC)


def cmd_worklist_add(args: argparse.Namespace) -> int:
    from appliance.worklist.store import WorklistError, WorklistItem

    config, store = _worklist(args)
    try:
        item = WorklistItem(
            accession_number=args.accession,
            patient_id=args.patient_id,
            patient_name=args.name,
            patient_birth_date=args.birth_date.replace("-", ""),
            patient_sex=args.sex,
            scheduled_at=_scheduled(args.scheduled, config.worklist.timezone),
            modality=args.modality,
            study_description=args.description,
        )
        result, stored = store.create(item)
    except WorklistError as exc:
        print(f"worklist add: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"{result}: {stored.accession_number} study {stored.study_instance_uid}")
    return 0


def cmd_worklist_list(args: argparse.Namespace) -> int:
    import zoneinfo

    config, store = _worklist(args)
    try:
        items = store.items(include_finished=args.all)
    finally:
        store.close()
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
    from appliance.worklist.store import CANCELLED, WorklistError

    _config, store = _worklist(args)
    try:
        store.set_status(args.accession, CANCELLED)
    except WorklistError as exc:
        print(f"worklist cancel: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"cancelled: {args.accession}")
    return 0


def cmd_dev_relay_emulator(args: argparse.Namespace) -> int:
    from appliance.app import _cancel_on_signal
    from appliance.relay.emulator import RelayEmulator
    from appliance.sdnotify import Notifier

    log.configure("INFO")
    key = config_module.read_secret(args.key_file, "--key-file")

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(_cancel_on_signal, nursery.cancel_scope, Notifier({}))
            emulator = RelayEmulator({args.key_name: key}, namespace=args.namespace)
            await nursery.start(emulator.run, args.host, args.port)
            print(
                f"relay emulator on {emulator.endpoint}, namespace {emulator.namespace}",
                file=sys.stderr,
            )

    trio.run(serve)
    return 0


def cmd_dev_cloud_fetch(args: argparse.Namespace) -> int:
    """The cloud fetching stored images (image.fetch): files land in --out, hash-checked."""
    from appliance.relay.cloud import FetchFailed, fetch

    relay = _load(args).relay
    key = config_module.read_secret(relay.key_file, "relay.key_file")
    target = {"study_instance_uid": args.study} if args.study else {"sop_instance_uid": args.sop}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def progress(uid: str, offset: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{uid}: {offset} bytes", end="", file=sys.stderr, flush=True)

    try:
        files = trio.run(
            partial(
                fetch,
                relay.url,
                relay.namespace,
                relay.actions_path,
                relay.key_name,
                key,
                target,
                out,
                on_chunk=progress,
            )
        )
    except FetchFailed as exc:
        print(f"cloud fetch: {exc}", file=sys.stderr)
        return 1
    for file in files:
        print(f"{file}  {file.stat().st_size} bytes  sha256 ok")
    return 0


def cmd_dev_cloud_send(args: argparse.Namespace) -> int:
    """The cloud in the sender role: one action to the appliance, its reply printed."""
    from trio_websocket import ConnectionRejected

    from appliance.relay.cloud import send_action

    relay = _load(args).relay
    text = sys.stdin.read() if args.action == "-" else Path(args.action).read_text()
    key = config_module.read_secret(relay.key_file, "relay.key_file")
    try:
        print(
            trio.run(
                send_action,
                relay.url,
                relay.namespace,
                relay.actions_path,
                relay.key_name,
                key,
                text,
            )
        )
    except ConnectionRejected as exc:
        print(f"cloud send: relay refused with HTTP {exc.status_code}", file=sys.stderr)
        return 1
    return 0


def cmd_dev_modality(args: argparse.Namespace) -> int:
    """A simulated mammography unit performing one worklist item against the configured ports."""
    from appliance.modality import ModalitySimulator, SimulationError

    dicom = _load(args).dicom
    unit = ModalitySimulator(
        host=args.host or ("127.0.0.1" if dicom.host == "0.0.0.0" else dicom.host),
        worklist_port=dicom.worklist.port,
        storage_port=dicom.storage.port,
        worklist_ae=dicom.worklist.ae_title,
        storage_ae=dicom.storage.ae_title,
        calling_ae=args.calling_ae,
    )
    try:
        stored = unit.run(args.accession, progress=print)
    except SimulationError as exc:
        print(f"modality: failed at phase {exc.phase}: {exc}", file=sys.stderr)
        return 1
    print(f"modality: done, {len(stored)} instances stored")
    return 0


def cmd_dev_cloud_events(args: argparse.Namespace) -> int:
    """The cloud in the listener role on the events path: acknowledge and print each event."""
    from appliance.app import _cancel_on_signal
    from appliance.relay.cloud import acknowledge
    from appliance.relay.listener import RelayListener
    from appliance.sdnotify import Notifier

    relay = _load(args).relay
    key = config_module.read_secret(relay.key_file, "relay.key_file")
    log.configure("WARNING")

    def show(envelope: dict) -> None:
        if envelope.get("payload", {}).get("thumbnail"):
            envelope["payload"]["thumbnail"] = f"<{len(envelope['payload']['thumbnail'])} b64>"
        print(json.dumps(envelope), flush=True)

    consumer = RelayListener(
        name="cloud-events",
        endpoint=relay.url,
        namespace=relay.namespace,
        path=relay.events_path,
        key_name=relay.key_name,
        key=key,
        conversation=acknowledge(show),
    )

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(_cancel_on_signal, nursery.cancel_scope, Notifier({}))
            await nursery.start(consumer.run)

    trio.run(serve)
    return 0


def _outbox(args: argparse.Namespace):
    from appliance.app import outbox_for

    config = _load(args)
    # The stores create the tables; opening them once makes the CLI work on a fresh state dir.
    _config, store = _worklist(args)
    store.close()
    from appliance.storage.index import Index

    Index(config.state_dir / "pacs.db").close()
    return outbox_for(config)


def cmd_outbox_list(args: argparse.Namespace) -> int:
    for row in _outbox(args).listing(include_delivered=args.all):
        delivered = row["delivered_at"] or "pending"
        print(
            f"{row['occurred_at']}  {row['event_type']:24} {row['event_id']}  "
            f"{row['accession_number'] or '-':16} {delivered}"
        )
    return 0


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    if not args.event_id and not args.all:
        print("outbox retry: name an EVENT_ID or pass --all", file=sys.stderr)
        return 2
    count = _outbox(args).retry(None if args.all else args.event_id)
    print(f"outbox retry: {count} event(s) will be sent again")
    return 0 if count else 1


def cmd_outbox_purge(args: argparse.Namespace) -> int:
    import datetime

    before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=args.older_than_days)
    count = _outbox(args).purge(before.isoformat(timespec="milliseconds"))
    print(
        f"outbox purge: {count} delivered event(s) older than {args.older_than_days} days removed"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from appliance import status

    config = _load(args)
    found = status.read(config.state_dir, config.dicom.storage.min_free_mb * 1024 * 1024)
    print(json.dumps(found, indent=2, default=str) if args.json else status.render(found))
    return 0 if found["running"] else 1


def cmd_retention(args: argparse.Namespace) -> int:
    """One retention pass with progress: a dry run any time, a real one only while the
    appliance is stopped (it runs retention itself)."""
    from appliance import status
    from appliance.storage.layout import StorageLayout
    from appliance.storage.recovery import ProgressPrinter
    from appliance.storage.retention import StorageHousekeeper
    from appliance.storage.store import InstanceStore

    config = _load(args)
    if not args.dry_run and status.read(config.state_dir, 0)["running"]:
        print(
            "retention: the appliance is running and deletes on its own schedule;"
            " use --dry-run to see what it would delete",
            file=sys.stderr,
        )
        return 2
    if config.retention.keep_days <= 0:
        print("retention: retention.keep_days is 0 (keep everything): nothing to do")
        return 0
    store = InstanceStore(StorageLayout(config.state_dir))
    store.open()
    housekeeper = StorageHousekeeper(store, config.retention, 0)
    printer = ProgressPrinter(lambda line: print(line.replace("fsck: ", ""), file=sys.stderr))
    try:
        report = trio.run(partial(housekeeper.retention_pass, args.dry_run, printer))
    finally:
        store.close()
    verb = "would delete" if args.dry_run else "deleted"
    count = report.candidates if args.dry_run else report.deleted
    print(
        f"retention: {verb} {count} images ({report.bytes_freed / 1e6:.1f} MB) stored before"
        f" {housekeeper.cutoff()[:10]}, in {report.seconds:.1f} s"
    )
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    from appliance.selftest import SelfTest

    config = _load(args)
    say = (lambda line: None) if args.json else print
    say(f"selftest of the appliance in {config.state_dir}:")
    report = SelfTest(config, timeout=args.timeout, say=say).run().as_dict()
    if args.json:
        print(json.dumps(report, indent=2))
    elif report["ok"]:
        print("selftest passed")
    else:
        print(f"selftest FAILED in phase {report['failed_phase']}: {report['detail']}")
    return 0 if report["ok"] else 1


def _parser() -> argparse.ArgumentParser:
    # `--config` may come before or after the sub-command: operators type both.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help=f"TOML config file (default {config_module.DEFAULT_PATH})",
    )
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__, parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, help: str, func=None) -> argparse.ArgumentParser:
        sub = parent.add_parser(name, help=help, parents=[common])
        if func is not None:
            sub.set_defaults(func=func)
        return sub

    command(commands, "run", "run the appliance until SIGTERM", cmd_run)
    config_cmd = command(commands, "config", "configuration tools")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    command(config_sub, "check", "validate and print the effective config", cmd_config_check)
    status_cmd = command(commands, "status", "what the running appliance is doing", cmd_status)
    retention = command(
        commands, "retention", "delete images past retention (safe ones only)", cmd_retention
    )
    retention.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    selftest = command(
        commands, "selftest", "a synthetic participant through the live appliance", cmd_selftest
    )
    selftest.add_argument("--timeout", type=float, default=60.0, help="per waiting phase, s")
    selftest.add_argument("--json", action="store_true", help="the report as JSON")
    status_cmd.add_argument("--json", action="store_true", help="machine-readable, stable keys")
    worklist = command(commands, "worklist", "the modality worklist")
    worklist_sub = worklist.add_subparsers(dest="worklist_command", required=True, metavar="ACTION")
    add = command(worklist_sub, "add", "schedule a participant", cmd_worklist_add)
    add.add_argument("accession")
    add.add_argument("patient_id", help="NHS number")
    add.add_argument("name", help="DICOM person name, FAMILY^GIVEN")
    add.add_argument("--birth-date", default="", help="YYYY-MM-DD")
    add.add_argument("--sex", default="F", choices=["F", "M", "O", ""])
    add.add_argument(
        "--scheduled",
        required=True,
        help="'YYYY-MM-DD HH:MM' in the site's time zone (or with Z / an offset)",
    )
    add.add_argument("--modality", default="MG")
    add.add_argument("--description", default="Screening mammography")
    listing = command(worklist_sub, "list", "items offered to modalities", cmd_worklist_list)
    listing.add_argument("--all", action="store_true", help="include finished items")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    cancel = command(worklist_sub, "cancel", "withdraw an item", cmd_worklist_cancel)
    cancel.add_argument("accession")
    outbox = command(commands, "outbox", "events waiting for, or delivered to, the cloud")
    outbox_sub = outbox.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    listing_outbox = command(
        outbox_sub, "list", "undelivered events, oldest first", cmd_outbox_list
    )
    listing_outbox.add_argument("--all", action="store_true", help="include delivered events")
    retry = command(outbox_sub, "retry", "send delivered events again", cmd_outbox_retry)
    retry.add_argument("event_id", nargs="?")
    retry.add_argument("--all", action="store_true")
    purge = command(outbox_sub, "purge", "delete delivered events", cmd_outbox_purge)
    purge.add_argument("--older-than-days", type=float, default=30.0)
    dev = command(commands, "dev", "development tools: relay emulator, cloud simulator")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="TOOL")
    emulator = command(dev_sub, "relay-emulator", "a local Azure Relay", cmd_dev_relay_emulator)
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=9400)
    emulator.add_argument("--namespace", default="", help="default: HOST:PORT")
    emulator.add_argument("--key-name", default="RootManageSharedAccessKey")
    emulator.add_argument("--key-file", required=True)
    modality = command(
        dev_sub, "modality", "a simulated unit performs one worklist item", cmd_dev_modality
    )
    modality.add_argument("accession")
    modality.add_argument("--host", default="", help="default: the configured dicom.host")
    modality.add_argument("--calling-ae", default="SIMULATOR")
    cloud = command(dev_sub, "cloud", "the cloud's side of the relay")
    cloud_sub = cloud.add_subparsers(dest="cloud_command", required=True, metavar="ACTION")
    send = command(
        cloud_sub, "send", "send one action (a JSON file, or - for stdin)", cmd_dev_cloud_send
    )
    send.add_argument("action")
    command(
        cloud_sub, "events", "acknowledge and print the appliance's events", cmd_dev_cloud_events
    )
    fetch = command(
        cloud_sub, "fetch", "fetch stored images (image.fetch), resuming", cmd_dev_cloud_fetch
    )
    which = fetch.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="Study Instance UID: every stored instance")
    which.add_argument("--sop", help="SOP Instance UID: one instance")
    fetch.add_argument("--out", default=".", help="where the files go (default: here)")
    fsck = command(commands, "fsck", "reconcile stored files with the index, repairing", cmd_fsck)
    fsck.add_argument(
        "--verify-hashes", action="store_true", help="re-read every file and check its SHA-256"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
