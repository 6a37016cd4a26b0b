"""Durable storage of received instances: spool -> fsync -> link into the hash path -> index.

The file work that can run in parallel (hashing, fsync, header parsing) happens in the caller's
thread, i.e. each association's own thread. The part that must not race — look up the UID,
place the file, insert the row — runs in one writer thread at a time via ``commit``.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import trio
from pydicom.errors import InvalidDicomError

from appliance import outbox
from appliance.log import get_logger
from appliance.state import StatePaths
from appliance.storage.files import (
    ensure_directory,
    file_sha256,
    fsync_directory,
    hash_and_sync,
    place,
    withdraw,
)
from appliance.storage.index import WHOLE, Index, IndexReader, StoredInstance, open_database
from appliance.storage.structure import (
    Unsound,
    check_inflated_size,
    check_structure,
    has_odd_lengths,
)

log = get_logger("storage")
T = TypeVar("T")


class Problem(enum.Enum):
    """Why a dataset cannot be stored (the storage SCP maps each to its DICOM status)."""

    MALFORMED = "malformed"  # cannot be parsed: lengths past the end, no File Meta
    INCONSISTENT = "inconsistent"  # parses, but contradicts the request or lacks what it needs


class InvalidInstance(Exception):
    """The dataset cannot be stored as it is, and why."""

    def __init__(self, problem: Problem, reason: str) -> None:
        super().__init__(reason)
        self.problem = problem
        self.reason = reason


class BeingDeleted(Exception):
    """A re-send of an instance whose deletion (retention, a test's removal) is in progress."""


class Outcome(enum.Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same bytes: nothing rewritten
    CONFLICT = "conflict"  # same UID, other bytes: first kept, newcomer kept aside


def _text(dataset: pydicom.Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def describe(
    path: Path,
    *,
    storage_hash: str,
    file_size: int,
    layout: StatePaths,
    expected_sop_instance_uid: str | None = None,
    expected_sop_class_uid: str | None = None,
    source_aet: str | None = None,
    source_address: str | None = None,
) -> StoredInstance:
    """Read a stored/spooled file's header (never its pixel data) into an index row."""
    try:
        check_inflated_size(path)  # before pydicom inflates a deflated dataset without a bound
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        odd_header = has_odd_lengths(dataset)  # first: raw elements still know their lengths
        transfer_syntax = dataset.file_meta.TransferSyntaxUID
        structure = check_structure(path, dataset)
        sop_instance_uid = _text(dataset, "SOPInstanceUID")
        sop_class_uid = _text(dataset, "SOPClassUID")
        study_instance_uid = _text(dataset, "StudyInstanceUID")
        frames = dataset.get("NumberOfFrames")
        number_of_frames = int(frames) if frames not in (None, "") else None
        fields = {
            key: _text(dataset, keyword)
            for key, keyword in [
                ("series_instance_uid", "SeriesInstanceUID"),
                ("patient_id", "PatientID"),
                ("patient_name", "PatientName"),
                ("accession_number", "AccessionNumber"),
                ("modality", "Modality"),
                ("view_position", "ViewPosition"),
            ]
        }
        laterality = _text(dataset, "ImageLaterality") or _text(dataset, "Laterality")
    except Unsound as exc:
        problem = Problem.MALFORMED if exc.malformed else Problem.INCONSISTENT
        raise InvalidInstance(problem, exc.reason) from None
    except (InvalidDicomError, ValueError, TypeError, KeyError, AttributeError, EOFError) as exc:
        raise InvalidInstance(Problem.MALFORMED, f"unreadable dataset: {exc}") from exc
    if not sop_instance_uid:
        raise InvalidInstance(Problem.INCONSISTENT, "SOP Instance UID missing")
    if expected_sop_instance_uid and sop_instance_uid != expected_sop_instance_uid:
        raise InvalidInstance(Problem.INCONSISTENT, "SOP Instance UID differs from the request")
    if not sop_class_uid or (expected_sop_class_uid and sop_class_uid != expected_sop_class_uid):
        raise InvalidInstance(Problem.INCONSISTENT, "SOP Class UID missing or differs from request")
    if not study_instance_uid:
        raise InvalidInstance(Problem.INCONSISTENT, "Study Instance UID missing")
    if "Rows" in dataset and not structure.has_pixels:
        raise InvalidInstance(Problem.INCONSISTENT, "Pixel Data missing from an image")
    try:
        storage_path = layout.relative_path(sop_instance_uid)
    except UnicodeEncodeError:
        raise InvalidInstance(Problem.INCONSISTENT, "SOP Instance UID is not ASCII") from None
    return StoredInstance(
        sop_instance_uid=sop_instance_uid,
        storage_path=storage_path,
        file_size=file_size,
        storage_hash=storage_hash,
        study_instance_uid=study_instance_uid,
        sop_class_uid=sop_class_uid,
        transfer_syntax_uid=str(transfer_syntax),
        created_at=now_utc(),
        image_laterality=laterality,
        number_of_frames=number_of_frames,
        source_aet=source_aet,
        source_address=source_address,
        series_instance_uid=fields["series_instance_uid"],
        patient_id=fields["patient_id"],
        patient_name=fields["patient_name"],
        accession_number=fields["accession_number"],
        modality=fields["modality"],
        view_position=fields["view_position"],
        pixels_state=WHOLE if structure.proved else None,
        odd_lengths=int(structure.odd_length or odd_header),
    )


def _drop(spooled: Path) -> None:
    """The spool name, once its bytes are placed (or not wanted). Failing to remove it must not
    turn a stored instance into a failure: pynetdicom and the spool sweeper try again."""
    with contextlib.suppress(OSError):
        spooled.unlink()


class InstanceStore:
    """The one owner of pacs.db (through its Database) and of the files under storage/,
    conflicts/ and derived/."""

    def __init__(
        self,
        paths: StatePaths,
        stored: trio.MemorySendChannel[StoredInstance] | None = None,
    ) -> None:
        self.layout = paths
        self.database = open_database(paths)
        self._stored = stored
        self.index = Index(self.database)
        #: Read-only queries for any thread.
        self.reader = IndexReader(self.database, paths)

    def open(self) -> None:
        for directory in (self.layout.spool, self.layout.storage, self.layout.conflicts):
            ensure_directory(directory)
        self.database.open()

    def close(self) -> None:
        self.database.close()

    def events(self, accession_number: str | None = None) -> list[dict[str, Any]]:
        """pacs.db's events (of one accession), oldest first, on a reader."""
        with self.database.reader() as db:
            return outbox.events_of(db, accession_number)

    async def write(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run an index write in the database's writer thread."""
        return await self.database.write(functools.partial(function, *args, **kwargs))

    async def read(self, function: Callable[..., T], *args: Any) -> T:
        """Index reads on the write connection queue behind the writes (a consistent view)."""
        return await self.database.write(function, *args)

    async def committed(self, sop_instance_uids: list[str]) -> None:
        """Storage commitment confirmed these to a modality."""
        await self.database.write(self.index.committed, sop_instance_uids)

    async def fetched(self, sop_instance_uids: list[str]) -> None:
        """The cloud fetched these whole."""
        await self.database.write(self.index.fetched, sop_instance_uids)

    def unlink_files(self, instance: StoredInstance) -> None:
        """Remove an instance's file and its derived images (retention, selftest cleanup). The
        stored file's removal is made durable (its directory fsynced) before the caller deletes
        the row: a file that came back after a power cut would be indexed again by recovery."""
        for relative in (instance.thumbnail_path, instance.preview_path):
            if relative:
                withdraw(self.layout.derived_file(relative))
        withdraw(self.layout.absolute(instance.storage_path))

    async def remove_test_study(
        self, accession_number: str, study_instance_uid: str, drop_unsent_events: bool
    ) -> int:
        """A self-test's images, files and study forgotten, by the owner: returns how many.
        Rows are marked DELETING first, files removed durably, then the rows deleted; recovery
        finishes what a crash interrupted (never re-indexes a file being deleted)."""
        removed = await self.database.write(
            self.index.remove_test_study, accession_number, study_instance_uid, drop_unsent_events
        )
        for instance in removed:
            await trio.to_thread.run_sync(self.unlink_files, instance)
            await self.database.write(self.index.delete, instance.sop_instance_uid)
        return len(removed)

    async def commit(self, spooled: Path, instance: StoredInstance) -> Outcome:
        """Place a hashed and fsynced spool file and index it; durable when this returns."""
        outcome = await self.database.write(self.commit_sync, spooled, instance)
        if outcome is Outcome.STORED and self._stored is not None:
            try:
                self._stored.send_nowait(instance)
            except trio.WouldBlock:
                # The index is the source of truth; the pipeline picks up what it did not hear of.
                log.debug("pipeline.busy", sop_instance_uid=instance.sop_instance_uid)
        return outcome

    def commit_sync(self, spooled: Path, instance: StoredInstance) -> Outcome:
        index = self.index
        existing = index.get(instance.sop_instance_uid)
        replaces = False
        if existing is not None:
            if existing.status == "DELETING":
                raise BeingDeleted(instance.sop_instance_uid)
            stored = self.layout.absolute(existing.storage_path)
            if existing.status in ("MISSING", "CORRUPT") or not stored.exists():
                # The file was lost or damaged (recovery flagged it, or it is gone now): a
                # re-send restores it; the row is replaced in the same transaction as the insert.
                replaces = True
            elif existing.storage_hash == instance.storage_hash:
                _drop(spooled)
                return Outcome.DUPLICATE
            else:
                return self._keep_aside(spooled, instance)
        target = self.layout.absolute(instance.storage_path)
        placed = place(spooled, target)
        if not placed and replaces:
            withdraw(target)  # the damaged copy goes; the re-sent one takes its place
            placed = place(spooled, target)
        if not placed:
            # A file is there without a row: a crash between placing and indexing, or another
            # UID sharing the 64-bit name prefix. Never overwrite; index it only if identical,
            # and only once it is known to be on disk.
            if file_sha256(target) != instance.storage_hash:
                return self._keep_aside(spooled, instance)
            hash_and_sync(target)
            fsync_directory(target.parent)
        try:
            index.store(instance, replaces=replaces)
        except BaseException:
            if placed:
                self._undo(target, instance)
            raise
        _drop(spooled)
        return Outcome.STORED

    @staticmethod
    def _undo(target: Path, instance: StoredInstance) -> None:
        """The modality is told this failed, so it must not become stored at the next start
        (recovery indexes files without rows): undo the link, durably, before answering."""
        try:
            withdraw(target)
        except OSError as exc:  # a second fault: recovery will find this file without a row
            log.error(
                "instance.undo_failed",
                phase="commit-undo",
                sop_instance_uid=instance.sop_instance_uid,
                error=f"{exc.strerror or exc}",
            )

    def _keep_aside(self, spooled: Path, instance: StoredInstance) -> Outcome:
        name = f"{Path(instance.storage_path).stem}-{instance.storage_hash[:16]}.dcm"
        target = self.layout.conflicts / name
        placed = place(spooled, target)  # False: this very copy is already kept aside
        try:
            self.index.add_conflict(instance, name)
        except BaseException:
            if placed:
                self._undo(target, instance)
            raise
        _drop(spooled)
        return Outcome.CONFLICT
