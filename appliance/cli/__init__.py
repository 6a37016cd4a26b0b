"""The `appliance` command. Exit codes: 0 success, 1 failure at run time, 2 bad usage or config,
or a command refused because the appliance is running."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from collections.abc import Callable
from typing import Any

import trio

from appliance import config as config_module
from appliance import errors, log
from appliance.cli.offline import CommandTree, config_path, load, run
from appliance.cli.records import (
    cmd_audit,
    cmd_outbox_list,
    cmd_outbox_purge,
    cmd_outbox_retry,
    cmd_worklist_add,
    cmd_worklist_cancel,
    cmd_worklist_list,
)
from appliance.cli.storage import cmd_fsck, cmd_retention
from appliance.state import StatePaths

#: Where the test participant's simulated unit comes from: a package entry point, so the
#: appliance never imports appliance/testing/ (a build without it answers that it has none).
TEST_UNIT_ENTRY_POINTS = "screening_gateway.test_unit"


def _test_unit() -> Callable[..., Any] | None:
    for entry in importlib.metadata.entry_points(group=TEST_UNIT_ENTRY_POINTS):
        try:
            unit: Callable[..., Any] = entry.load()
        except Exception as exc:  # a broken simulator must not stop the clinic's DICOM service
            log.get_logger("appliance").warning(
                "test_unit.unavailable", phase="startup", error=f"{type(exc).__name__}: {exc}"
            )
            return None
        return unit
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.app import Appliance, serve
    from appliance.sdnotify import Notifier
    from appliance.supervisor import RestartBudgetExceeded

    config = load(args)
    config_module.effective(config)  # secrets readable now, or exit 2 naming the key
    log.configure(config.log.level, config.log.format)
    notifier = Notifier()
    appliance = Appliance(config, notifier, test_unit=_test_unit())
    status = 0
    try:
        trio.run(serve, appliance)
    except* RestartBudgetExceeded as group:
        for exc in errors.leaves(group):
            service = exc.service if isinstance(exc, RestartBudgetExceeded) else None
            log.get_logger("appliance").error(
                "appliance.failed", phase="supervision", service_name=service, error=str(exc)
            )
        status = 1
    except* Exception as group:
        # Startup (state dir, databases, recovery, binding the ports) or anything at run time
        # that escaped the supervisor: the phase says which.
        log.get_logger("appliance").exception(
            "appliance.failed", phase=appliance.phase, error=errors.describe(group)
        )
        status = 1
    finally:
        notifier.close()
    return status


def cmd_config_check(args: argparse.Namespace) -> int:
    from appliance.dicom.peers import PeerPolicy
    from appliance.dicom.tls import ServerTls, TlsError

    config = load(args)
    try:  # the files a listener would load: a certificate that cannot be used fails here
        policy = PeerPolicy(config.dicom)
        if config.dicom.tls.enabled:
            ServerTls(config.dicom.tls, policy.pinned_certificates())
    except (TlsError, ValueError) as exc:
        print(f"config: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(config_module.effective(config), indent=2))
    print(f"config ok: {config_path(args)}", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from appliance import status

    config = load(args)
    found = status.read(
        StatePaths(config.state_dir), config.dicom.storage.min_free_mb * 1024 * 1024
    )
    print(json.dumps(found, indent=2, default=str) if args.json else status.render(found))
    return 0 if found["running"] else 1


def cmd_selftest(args: argparse.Namespace) -> int:
    from appliance.selftest import SelfTest

    config = load(args)
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


def _parser() -> CommandTree:
    tree = CommandTree("appliance", __doc__, "COMMAND")
    commands, command = tree.commands, tree.command

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
    add.add_argument("--station-ae", default="", help="Scheduled Station AE Title (the unit)")
    add.add_argument("--station-name", default="", help="Scheduled Station Name")
    add.add_argument(
        "--procedure-code",
        default="",
        metavar="VALUE^SCHEME^MEANING",
        help="procedure/protocol code, e.g. 24623002^SCT^Screening mammography",
    )
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
    fsck = command(commands, "fsck", "reconcile stored files with the index, repairing", cmd_fsck)
    fsck.add_argument(
        "--verify-hashes", action="store_true", help="re-read every file and check its SHA-256"
    )
    audit_cmd = command(
        commands, "audit", "who saw, sent or changed whose data (the audit trail)", cmd_audit
    )
    audit_cmd.add_argument("--patient", default="", help="only messages naming this patient ID")
    audit_cmd.add_argument("--since", default="", help="YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)")
    audit_cmd.add_argument("--event", default="", help="e.g. query, transferred, security")
    audit_cmd.add_argument("--json", action="store_true", help="one JSON object per line")
    audit_cmd.add_argument("--xml", action="store_true", help="with --json: the message itself")
    return tree


def main(argv: list[str] | None = None) -> int:
    return run(_parser(), argv)
