"""Spool files: hashed as written, and abandoned ones swept."""

from __future__ import annotations

import errno
import hashlib
import os
import time
from pathlib import Path

import pytest

from appliance.storage.spool import SpoolFile, sweep


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


def test_failed_write_leaves_no_spool_file(tmp_path, monkeypatch):
    spool = SpoolFile(tmp_path, "rx-")
    spool.write(b"partial")

    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        spool.write(b"more")
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_abandoned_spool_files(tmp_path):
    abandoned, active = tmp_path / "rx-old.dcm", tmp_path / "rx-new.dcm"
    abandoned.write_bytes(b"x")
    active.write_bytes(b"y")
    an_hour_ago = time.time() - 3600
    os.utime(abandoned, (an_hour_ago, an_hour_ago))
    assert sweep(tmp_path, older_than=600) == 1
    assert list(tmp_path.iterdir()) == [active]
