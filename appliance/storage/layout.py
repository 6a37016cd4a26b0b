"""Where things live under the state directory, and the durable file operations on them.

state_dir/
  pacs.db                     the index (SQLite, WAL)
  spool/rx-*.dcm              C-STORE datasets being received; deleted at startup
  storage/ab/cd/abcd....dcm   stored instances: SHA-256 of the SOP Instance UID, first 16 hex
  conflicts/                  a second, different object under an already stored UID
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from attrs import frozen

CHUNK = 1024 * 1024


@frozen
class StorageLayout:
    state_dir: Path

    @property
    def index_path(self) -> Path:
        return self.state_dir / "pacs.db"

    @property
    def spool(self) -> Path:
        return self.state_dir / "spool"

    @property
    def storage(self) -> Path:
        return self.state_dir / "storage"

    @property
    def conflicts(self) -> Path:
        return self.state_dir / "conflicts"

    def create(self) -> None:
        for directory in (self.spool, self.storage, self.conflicts):
            ensure_directory(directory)

    def relative_path(self, sop_instance_uid: str) -> str:
        """`ab/cd/abcdef0123456789.dcm`: spreads files evenly, never uses peer text as a path."""
        digest = hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest()
        return f"{digest[:2]}/{digest[2:4]}/{digest[:16]}.dcm"

    def absolute(self, relative_path: str) -> Path:
        return self.storage / relative_path


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
    """Move `source` to `target` durably, never replacing an existing file.

    A hard link fails if the target exists (no check-then-rename race); the spool name is then
    dropped. Returns False, leaving `source` in place, when `target` already exists.
    """
    ensure_directory(target.parent)
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    fsync_directory(target.parent)
    source.unlink()
    return True
