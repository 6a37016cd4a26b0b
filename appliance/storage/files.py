"""Durable file operations: directories made durable in their parents, fsync, hashing, and
placing a file without ever replacing one (where the files live: appliance/state.py)."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

CHUNK = 1024 * 1024


def fsync_directory(directory: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_directory(directory: Path) -> None:
    """mkdir -p, with each newly created level made durable in its parent."""
    if directory.is_dir():
        return
    ensure_directory(directory.parent)
    try:
        directory.mkdir(mode=0o750)
    except FileExistsError:
        return
    fsync_directory(directory.parent)


def hash_and_sync(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a file, and fsync it: after this its bytes are on disk."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(stream.fileno())
    return digest.hexdigest(), size


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def place(source: Path, target: Path) -> bool:
    """Link `source` at `target` durably, never replacing an existing file; False when
    `target` already exists. A hard link fails if the target exists (no check-then-rename
    race). `source` stays: the caller drops it once the placed file is indexed."""
    ensure_directory(target.parent)
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    try:
        fsync_directory(target.parent)
    except OSError:
        # Not known to be durable, so not placed: the caller answers a failure, and a name left
        # behind would be indexed by recovery as if it had been stored.
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    return True


def withdraw(target: Path) -> None:
    """Remove a placed file durably (undo a `place`, or delete): the name is gone from disk,
    not only from the page cache, when this returns."""
    target.unlink(missing_ok=True)
    if target.parent.is_dir():  # an absence not yet durable is made so too
        fsync_directory(target.parent)


def write_durably(path: Path, data: bytes) -> None:
    """Replace `path` with `data`, on disk before this returns (file, then directory): what the
    index records as written must survive a power cut. A failure leaves no partial file."""
    ensure_directory(path.parent)
    partial = path.with_suffix(path.suffix + ".partial")
    try:
        with partial.open("wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
