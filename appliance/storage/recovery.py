"""Reconcile files and index after a crash (at every startup) and on demand (`appliance fsck`).

With an `index` it repairs (in pacs.db's writer, with the appliance's lock held); without one
it only counts what a repair would do, and leaves the spool alone (its files may belong to
associations in progress): that is `appliance fsck` beside a running appliance.

- spool/: every file there belongs to an association that no longer exists: deleted.
- storage/ files without an index row (a crash between placing and indexing): indexed again.
- index rows whose file is gone: flagged MISSING (a re-send from the modality restores them).
- with verify_hashes: rows whose file no longer matches its SHA-256 are flagged CORRUPT.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from appliance.log import get_logger
from appliance.state import StatePaths
from appliance.storage.files import file_sha256, hash_and_sync, withdraw
from appliance.storage.index import Index, StoredInstance
from appliance.storage.store import InvalidInstance, describe

log = get_logger("storage")

Progress = Callable[[str, int, int], None]


@attrs.define
class RecoveryReport:
    spool_files_removed: int = 0
    files_reindexed: int = 0
    deletions_finished: int = 0
    #: Repairs that failed (a full or failing disk): logged, retried at the next start.
    failures: int = 0
    files_unrecognised: list[str] = attrs.Factory(list)
    rows_missing: int = 0
    rows_corrupt: int = 0
    rows_restored: int = 0
    files_checked: int = 0

    @property
    def needs_repair(self) -> bool:
        """A repairing run would change something (a check-only run's question)."""
        return not self.clean or bool(self.rows_restored)

    @property
    def clean(self) -> bool:
        problems = (
            self.files_unrecognised or self.rows_missing or self.rows_corrupt or self.failures
        )
        repaired = self.files_reindexed or self.spool_files_removed or self.deletions_finished
        return not (problems or repaired)


def _stored_files(storage: Path) -> list[str]:
    found = []
    for directory, _dirs, files in os.walk(storage):
        for name in files:
            found.append(os.path.relpath(os.path.join(directory, name), storage))
    return sorted(found)


def _failed(report: RecoveryReport, step: str, what: str, exc: Exception) -> None:
    """One item recovery could not repair: logged and counted; startup goes on (DICOM must
    start even on a failing disk) and the next start tries again."""
    log.error("recovery.step_failed", phase=f"recovery-{step}", path=what, error=str(exc))
    report.failures += 1


def _set_status(index: Index, row: StoredInstance, status: str, report: RecoveryReport) -> bool:
    try:
        index.set_status(row.sop_instance_uid, status)
    except sqlite3.Error as exc:
        _failed(report, "status", row.storage_path, exc)
        return False
    return True


def recover(
    layout: StatePaths,
    instances: list[StoredInstance],
    index: Index | None,
    *,
    verify_hashes: bool = False,
    progress: Progress | None = None,
) -> RecoveryReport:
    report = RecoveryReport()
    if index is not None:
        for leftover in layout.spool.iterdir():
            try:
                leftover.unlink()
            except OSError as exc:  # the spool sweeper tries again
                _failed(report, "spool", leftover.name, exc)
                continue
            report.spool_files_removed += 1

    rows = {row.storage_path: row for row in instances}
    files = _stored_files(layout.storage)
    for relative in files:
        if relative in rows:
            continue
        path = layout.absolute(relative)
        try:
            storage_hash, size = hash_and_sync(path)
            instance = describe(path, storage_hash=storage_hash, file_size=size, layout=layout)
        except (InvalidInstance, OSError) as exc:
            log.warning("recovery.unrecognised_file", path=relative, reason=str(exc))
            report.files_unrecognised.append(relative)
            continue
        if instance.storage_path != relative:
            log.warning("recovery.unrecognised_file", path=relative, reason="not at its hash path")
            report.files_unrecognised.append(relative)
            continue
        if index is not None:
            try:
                index.insert(instance)
            except sqlite3.Error as exc:  # pacs.db full or failing: found again next start
                _failed(report, "reindex", relative, exc)
                continue
        report.files_reindexed += 1

    present = set(files)
    total = len(rows)
    for done, (relative, row) in enumerate(rows.items(), start=1):
        if row.status == "DELETING":
            # A deletion (retention, a test participant's removal) a crash interrupted: finish
            # it (derived images too), never re-index or flag the file it was removing.
            if index is not None:
                try:
                    for derived in (row.thumbnail_path, row.preview_path):
                        if derived:
                            withdraw(layout.derived_file(derived))
                    withdraw(layout.absolute(relative))
                    index.delete(row.sop_instance_uid)
                except (OSError, sqlite3.Error) as exc:  # retried at the next start
                    _failed(report, "deletion", relative, exc)
                    continue
            report.deletions_finished += 1
        elif relative not in present:
            if row.status != "MISSING":
                if index is not None and not _set_status(index, row, "MISSING", report):
                    continue
                report.rows_missing += 1
        else:
            healthy = True
            if verify_hashes:
                report.files_checked += 1
                healthy = file_sha256(layout.absolute(relative)) == row.storage_hash
            if not healthy and row.status != "CORRUPT":
                if index is not None and not _set_status(index, row, "CORRUPT", report):
                    continue
                report.rows_corrupt += 1
            elif healthy and row.status != "STORED" and (verify_hashes or row.status == "MISSING"):
                if index is not None and not _set_status(index, row, "STORED", report):
                    continue
                report.rows_restored += 1
        if progress is not None:
            progress("verify" if verify_hashes else "check", done, total)
    return report


class ProgressPrinter:
    """Prints `fsck: verify 1200/5000 (24%)` at most once a second, and at the end."""

    def __init__(self, write: Callable[[str], None], interval: float = 1.0) -> None:
        self._write = write
        self._interval = interval
        self._last = 0.0

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self._last >= self._interval:
            self._last = now
            percent = 100 * done // total if total else 100
            self._write(f"fsck: {phase} {done}/{total} ({percent}%)")
