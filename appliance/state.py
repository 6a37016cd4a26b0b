"""Every path under the state directory, named once.

state_dir/
  pacs.db                     the instance index and study states (SQLite, WAL): storage's
  worklist.db                 worklist items and MPPS (SQLite, WAL): the worklist store's
  spool/rx-*.dcm              C-STORE datasets being received
  storage/ab/cd/abcd....dcm   stored instances: SHA-256 of the SOP Instance UID, first 16 hex
  conflicts/                  a second, different object under an already stored UID
  derived/                    thumbnails and previews, beside their instance's hash path
  status.json                 what the running appliance reports of itself (every 2 s)
  metrics.prom                Prometheus text (unless metrics.textfile names another place)
  appliance.lock              held (flock) by the running appliance and by offline commands
  control.sock                the running appliance's local control socket (selftest, CLI)
  reserve                     space kept back to open the databases on a disk filled to 0
  audit/audit-NNNNNN.log      the audit trail (DICOM audit messages, one per line, mode 0600)
  audit/forwarded.json        how far the remote audit repository has been sent the trail
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from attrs import frozen


class StateInUse(Exception):
    """Another process (the running appliance, or an offline command) holds the state directory."""


@frozen
class StatePaths:
    state_dir: Path

    @property
    def pacs_db(self) -> Path:
        return self.state_dir / "pacs.db"

    @property
    def worklist_db(self) -> Path:
        return self.state_dir / "worklist.db"

    @property
    def spool(self) -> Path:
        return self.state_dir / "spool"

    @property
    def audit(self) -> Path:
        return self.state_dir / "audit"

    @property
    def storage(self) -> Path:
        return self.state_dir / "storage"

    @property
    def conflicts(self) -> Path:
        return self.state_dir / "conflicts"

    @property
    def derived(self) -> Path:
        return self.state_dir / "derived"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def default_metrics_file(self) -> Path:
        return self.state_dir / "metrics.prom"

    @property
    def lock(self) -> Path:
        return self.state_dir / "appliance.lock"

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def reserve(self) -> Path:
        return self.state_dir / "reserve"

    def relative_path(self, sop_instance_uid: str) -> str:
        """`ab/cd/abcdef0123456789.dcm`: spreads files evenly, never uses peer text as a path."""
        digest = hashlib.sha256(sop_instance_uid.encode("ascii")).hexdigest()
        return f"{digest[:2]}/{digest[2:4]}/{digest[:16]}.dcm"

    def absolute(self, relative_path: str) -> Path:
        """A stored instance's file, from its index row's `storage_path`."""
        return self.storage / relative_path

    def derived_file(self, relative_path: str) -> Path:
        """A thumbnail or preview, from its index row's `thumbnail_path` / `preview_path`."""
        return self.derived / relative_path


@contextlib.contextmanager
def exclusive(paths: StatePaths, wait: float = 0.0) -> Iterator[None]:
    """Hold the state directory for as long as the block runs: the appliance for its lifetime,
    and every command that must not run beside it (fsck repairs, retention, offline writes).
    An flock, so a killed holder never leaves a stale lock behind."""
    # Read-only and readable by all: a lock file root's command created must not stop the
    # service's own user from locking it (the file holds nothing).
    fd = os.open(paths.lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o644)  # whatever the creator's umask
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StateInUse(
                        f"{paths.state_dir} is in use (lock {paths.lock.name})"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def in_use(paths: StatePaths) -> bool:
    """True while the appliance (or an offline command) holds the state directory."""
    if not paths.lock.exists():
        return False
    try:
        with exclusive(paths):
            return False
    except StateInUse:
        return True
    except OSError:  # a read-only or failing state dir: the lock cannot be tried, so not known
        return False
