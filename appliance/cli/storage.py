"""`appliance fsck` and `appliance retention`: the stored files and their index, by hand."""

from __future__ import annotations

import argparse
from functools import partial

import trio

from appliance.cli.offline import Refused, load, offline, say
from appliance.state import StatePaths, in_use
from appliance.storage.recovery import ProgressPrinter, RecoveryReport, recover
from appliance.storage.retention import RetentionReport, StorageHousekeeper
from appliance.storage.space import DiskFloor
from appliance.storage.store import InstanceStore


def _summary(report: RecoveryReport, indexed: int, verify_hashes: bool, verb: str) -> str:
    return (
        f"fsck: {indexed} indexed instances; spool files {verb}removed "
        f"{report.spool_files_removed}, re-indexed {report.files_reindexed}, deletions finished "
        f"{report.deletions_finished}, missing "
        f"{report.rows_missing}, corrupt {report.rows_corrupt}, restored {report.rows_restored}, "
        f"unrecognised files {len(report.files_unrecognised)}"
        + (f", hashes verified {report.files_checked}" if verify_hashes else "")
    )


def cmd_fsck(args: argparse.Namespace) -> int:
    """Reconcile files and index. Beside a running appliance it only checks (never the spool,
    whose files belong to associations in progress) and refuses to repair."""
    paths = StatePaths(load(args).state_dir)
    progress = ProgressPrinter(say)
    store = InstanceStore(paths)
    if in_use(paths):
        rows = store.reader.all_instances() if store.database.exists else []
        report = recover(paths, rows, None, verify_hashes=args.verify_hashes, progress=progress)
        print(_summary(report, len(rows), args.verify_hashes, "(not checked) "))
        for path in report.files_unrecognised:
            print(f"fsck: unrecognised file storage/{path}")
        if report.needs_repair:
            raise Refused(
                "fsck: repairs are needed, and the appliance is running:"
                " stop it (systemctl stop screening-gateway) and run fsck again"
            )
        return 0
    with offline(paths, "fsck"):
        store.open()
        try:
            report = store.database.run_sync(
                lambda: recover(
                    paths,
                    list(store.index.instances()),
                    store.index,
                    verify_hashes=args.verify_hashes,
                    progress=progress,
                )
            )
            indexed = store.database.run_sync(store.index.count)
        finally:
            store.close()
    print(_summary(report, indexed, args.verify_hashes, ""))
    for path in report.files_unrecognised:
        print(f"fsck: unrecognised file storage/{path}")
    # Non-zero when something was wrong, so scripts and runbooks notice; repairs are done.
    return 0 if report.clean else 1


def cmd_retention(args: argparse.Namespace) -> int:
    """One retention pass with progress: a dry run any time, a real one only while the
    appliance is stopped (it runs retention itself)."""
    config = load(args)
    paths = StatePaths(config.state_dir)
    if config.retention.keep_days <= 0:
        print("retention: retention.keep_days is 0 (keep everything): nothing to do")
        return 0
    if not args.dry_run and in_use(paths):
        raise Refused(
            "retention: the appliance is running and deletes on its own schedule;"
            " use --dry-run to see what it would delete"
        )
    store = InstanceStore(paths)
    floor = DiskFloor(paths.state_dir, config.dicom.storage.min_free_mb * 1024 * 1024)
    housekeeper = StorageHousekeeper(
        store, config.retention, floor, require_upload=config.cloud.profile == "manage"
    )
    printer = ProgressPrinter(lambda line: say(line.replace("fsck: ", "")))
    run_pass = partial(housekeeper.retention_pass, args.dry_run, printer)
    if args.dry_run:
        report = trio.run(run_pass) if store.database.exists else RetentionReport()
    else:
        with offline(paths, "retention"):
            store.open()
            try:
                report = trio.run(run_pass)
            finally:
                store.close()
    verb = "would delete" if args.dry_run else "deleted"
    count = report.candidates if args.dry_run else report.deleted
    print(
        f"retention: {verb} {count} images ({report.bytes_freed / 1e6:.1f} MB) stored before"
        f" {housekeeper.cutoff()[:10]}, in {report.seconds:.1f} s"
    )
    return 0
