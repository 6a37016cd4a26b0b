"""Spool files: where C-STORE datasets land while they arrive.

A SpoolFile hashes bytes as they are written and asks the kernel to start writing them back
every few MiB, so when the last fragment arrives the SHA-256 is known and fsync has only the
tail left: the network receive and the disk write overlap instead of running one after the
other, and a 1 GB object is never read back just to hash it.

A SpoolFile never raises into pynetdicom's reader thread (that would drop the association). When
the disk would fall below the floor, or a write fails (ENOSPC, EIO, EROFS), it stops writing,
deletes what it had, swallows the rest of the dataset and keeps the reason in `failure`; the
C-STORE handler answers with it (0xA700 for space, 0x0110 otherwise) and the association goes on.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio
from attrs import frozen

from appliance.log import get_logger
from appliance.storage.space import DiskFloor
from appliance.supervisor import Criticality

log = get_logger("storage")

WRITEBACK_EVERY = 8 * 1024 * 1024
#: Free space is measured again after this many bytes (in between it is estimated).
SPACE_CHECK_EVERY = 4 * 1024 * 1024
#: Errors that mean "no room", answered 0xA700 (out of resources) rather than 0x0110.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range; do not wait


def _load_sync_file_range() -> Any:
    try:
        # Imported here: ctypes builds a callback at import, which a sandbox with
        # MemoryDenyWriteExecute may refuse on an old libffi. The hint is optional.
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (ImportError, OSError, AttributeError, MemoryError):
        return None  # not Linux, or no ctypes: the final fsync does all the work
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


class Shortfall(enum.Enum):
    SPACE = "space"  # the floor, ENOSPC, EDQUOT: 0xA700
    IO = "io"  # EIO, EROFS, EACCES...: 0x0110


@frozen
class SpoolFailure:
    kind: Shortfall
    phase: str  # spool-create, spool-write, disk-floor
    reason: str  # for the Error Comment and the log


class SpoolFile:
    """Stands in for the NamedTemporaryFile pynetdicom writes a C-STORE dataset to."""

    def __init__(
        self,
        directory: Path,
        prefix: str,
        suffix: str = ".dcm",
        floor: DiskFloor | None = None,
    ) -> None:
        self.file = self  # pynetdicom calls .file.flush() after each fragment
        self.failure: SpoolFailure | None = None
        self._floor = floor
        self._digest = hashlib.sha256()
        self._size = 0
        self._written_back = 0
        self._measured_at = -SPACE_CHECK_EVERY  # bytes written when free space was last measured
        self._free_then = 0
        try:
            self._fd, self.name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
        except OSError as exc:
            # pynetdicom only needs a name; nothing is ever written under this one.
            self._fd = -1
            self.name = str(directory / f"{prefix}unavailable-{uuid.uuid4().hex}{suffix}")
            self._fail("spool-create", exc)

    def _fail(self, phase: str, cause: OSError | str) -> None:
        if isinstance(cause, OSError):
            kind = Shortfall.SPACE if cause.errno in NO_SPACE else Shortfall.IO
            reason = f"{cause.strerror or cause}"
        else:
            kind, reason = Shortfall.SPACE, cause
        self.failure = SpoolFailure(kind, phase, reason)
        # This dataset can never be acknowledged: leave no trace, and take no more of it.
        self.discard()

    def _room_for(self, more: int) -> bool:
        if self._floor is None:
            return True
        if self._size - self._measured_at >= SPACE_CHECK_EVERY:
            try:
                self._free_then = self._floor.measure().free_bytes
            except OSError as exc:
                self._fail("disk-floor", exc)
                return False
            self._measured_at = self._size
        estimate = self._free_then - (self._size - self._measured_at) - more
        return estimate >= self._floor.floor_bytes

    def write(self, data: bytes) -> int:
        if self.failure is not None:
            return len(data)  # the rest of a dataset that will be answered with the failure
        if not self._room_for(len(data)):
            self._fail("disk-floor", "Disk space below the configured floor")
            return len(data)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._fail("spool-write", exc)
            return len(data)
        self._digest.update(data)
        self._size += len(data)
        if _sync_file_range and self._size - self._written_back >= WRITEBACK_EVERY:
            _sync_file_range(
                self._fd,
                self._written_back,
                self._size - self._written_back,
                _SYNC_FILE_RANGE_WRITE,
            )
            self._written_back = self._size
        return len(data)

    def flush(self) -> None:
        """Writes go straight to the kernel; nothing is buffered here."""

    def sync(self) -> tuple[str, int]:
        """fsync; returns the SHA-256 and size of everything written (OSError if it failed:
        the bytes are then not known to be on disk, and the caller must not acknowledge)."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "spool file already discarded")
        os.fsync(self._fd)
        return self._digest.hexdigest(), self._size

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):  # EIO on close: the data is not ours to keep
                os.close(fd)

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(OSError):  # gone already; or EIO/EROFS: the sweeper retries
            os.unlink(self.name)

    def __del__(self) -> None:
        # An association aborted mid-dataset drops its SpoolFile without closing it.
        self.close()


def sweep(spool: Path, older_than: float) -> int:
    """Delete spool files untouched for `older_than` seconds: their association is gone
    (an active transfer writes continuously, and idle associations time out sooner)."""
    removed = 0
    cutoff = time.time() - older_than
    for path in spool.iterdir():
        with contextlib.suppress(OSError):  # gone already, or failing: the next sweep retries
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    if removed:
        log.info("spool.swept", files=removed)
    return removed


class SpoolSweeper:
    """Supervised service: removes spool files abandoned by aborted associations."""

    name = "spool-sweeper"
    criticality = Criticality.AUXILIARY

    def __init__(self, spool: Path, older_than: float, interval: float = 60.0) -> None:
        self._spool = spool
        self._older_than = older_than
        self._interval = interval

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        deadline = trio.current_time()
        while True:
            deadline += self._interval
            await trio.sleep_until(deadline)
            await trio.to_thread.run_sync(sweep, self._spool, self._older_than)
