"""Spool files: hashed as written, and abandoned ones swept."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest

from appliance.storage.space import DiskFloor, Space
from appliance.storage.spool import Shortfall, SpoolFile, sweep


def test_spool_file_hashes_what_was_written_across_writeback_boundaries(tmp_path):
    spool = SpoolFile(tmp_path, "rx-")
    chunks = [os.urandom(3 * 1024 * 1024) for _ in range(5)]  # crosses the 8 MiB writeback kick
    for chunk in chunks:
        spool.write(chunk)
    spool.file.flush()
    digest, size = spool.sync()
    spool.close()
    data = b"".join(chunks)
    assert (digest, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert Path(spool.name).read_bytes() == data


@pytest.mark.parametrize(
    ("error", "kind"), [(errno.ENOSPC, Shortfall.SPACE), (errno.EIO, Shortfall.IO)]
)
def test_a_failed_write_keeps_nothing_and_never_raises_into_the_receive(
    tmp_path, monkeypatch, error, kind
):
    spool = SpoolFile(tmp_path, "rx-")
    spool.write(b"partial")

    def failing(fd: int, data: bytes) -> int:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "write", failing)
    assert spool.write(b"more") == 4  # pynetdicom's reader thread must not die of it
    assert spool.write(b"the rest of the dataset") == 23
    assert spool.failure is not None
    assert (spool.failure.kind, spool.failure.phase) == (kind, "spool-write")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="discarded"):
        spool.sync()  # nothing to acknowledge


class FixedDisk(DiskFloor):
    """A disk whose free space is exactly what the spool has not yet written of `free`."""

    def __init__(self, directory, free: int, floor: int) -> None:
        super().__init__(directory, floor)
        self.free = free
        self.spool: SpoolFile | None = None

    def measure(self) -> Space:
        written = self.spool._size if self.spool else 0
        return Space(self.free - written, self.floor_bytes)


def test_the_floor_stops_a_receive_before_free_space_falls_below_it(tmp_path):
    mib = 1024 * 1024
    disk = FixedDisk(tmp_path, free=30 * mib, floor=20 * mib)  # room for 10 MiB
    spool = SpoolFile(tmp_path, "rx-", floor=disk)
    disk.spool = spool
    written = 0
    while spool.failure is None and written < 64:
        spool.write(b"\0" * mib)
        written += 1
    assert spool.failure is not None
    assert (spool.failure.kind, spool.failure.phase) == (Shortfall.SPACE, "disk-floor")
    assert written == 11  # the 11th MiB would have crossed the floor: refused, not written
    assert list(tmp_path.iterdir()) == []


def test_a_spool_that_cannot_be_created_is_a_failure_not_an_exception(tmp_path):
    missing = tmp_path / "gone"
    spool = SpoolFile(missing, "rx-")
    assert spool.failure is not None
    assert spool.failure.phase == "spool-create"
    assert spool.write(b"data") == 4
    spool.close()


def test_sweep_removes_only_abandoned_spool_files(tmp_path):
    abandoned, active = tmp_path / "rx-old.dcm", tmp_path / "rx-new.dcm"
    abandoned.write_bytes(b"x")
    active.write_bytes(b"y")
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    assert sweep(tmp_path, older_than=600) == 1
    assert list(tmp_path.iterdir()) == [active]
