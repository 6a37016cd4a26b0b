"""Spool files: where C-STORE datasets land while they arrive.

A SpoolFile hashes bytes as they are written and asks the kernel to start writing them back
every few MiB, so when the last fragment arrives the SHA-256 is known and fsync has only the
tail left: the network receive and the disk write overlap instead of running one after the
other, and a 1 GB object is never read back just to hash it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from appliance.log import get_logger

log = get_logger("storage")

WRITEBACK_EVERY = 8 * 1024 * 1024
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


class SpoolFile:
    """Stands in for the NamedTemporaryFile pynetdicom writes a C-STORE dataset to."""

    def __init__(self, directory: Path, prefix: str, suffix: str = ".dcm") -> None:
        fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
        self.name = name
        self.file = self  # pynetdicom calls .file.flush() after each fragment
        self._fd = fd
        self._digest = hashlib.sha256()
        self._size = 0
        self._written_back = 0

    def write(self, data: bytes) -> int:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            # Disk full or I/O error: this dataset can never be acknowledged; leave no trace.
            self.discard()
            raise
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
        """fsync; returns the SHA-256 and size of everything written."""
        os.fsync(self._fd)
        return self._digest.hexdigest(), self._size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
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
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    if removed:
        log.info("spool.swept", files=removed)
    return removed


class SpoolSweeper:
    """Supervised service: removes spool files abandoned by aborted associations."""

    name = "spool-sweeper"

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
