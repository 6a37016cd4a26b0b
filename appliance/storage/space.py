"""Free space, counted one way everywhere: the C-STORE refusal (before and while a dataset
arrives), the `disk.below_floor` alarm, `appliance status` and the cloud's `health`.

Free means what an unprivileged writer may still use (statvfs f_bavail), on the filesystem of
the state directory. The disk is below the floor when free < floor; a dataset is refused when
storing it would take free below the floor, which is checked while its bytes arrive, since a
C-STORE does not announce its size.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from attrs import frozen


@frozen
class Space:
    free_bytes: int
    floor_bytes: int
    total_bytes: int = 0

    @property
    def ok(self) -> bool:
        """Above (or at) the floor: C-STORE is accepted."""
        return self.free_bytes >= self.floor_bytes

    @property
    def headroom_bytes(self) -> int:
        """The largest object accepted now; anything bigger is refused with 0xA700."""
        return max(self.free_bytes - self.floor_bytes, 0)

    def admits(self, more_bytes: int) -> bool:
        return self.free_bytes - more_bytes >= self.floor_bytes

    def as_dict(self) -> dict[str, int | float | bool]:
        return {
            "free_bytes": self.free_bytes,
            "floor_bytes": self.floor_bytes,
            "headroom_bytes": self.headroom_bytes,
            "free_percent": round(100.0 * self.free_bytes / self.total_bytes, 1)
            if self.total_bytes
            else 0.0,
            "ok": self.ok,
        }


def free_bytes(path: Path) -> int:
    found = os.statvfs(path)
    return found.f_bavail * found.f_frsize


class DiskFloor:
    """The floor of one state directory's filesystem, and the refusals it caused (any thread)."""

    def __init__(self, path: Path, floor_bytes: int) -> None:
        self.path = path
        self.floor_bytes = floor_bytes
        self._lock = threading.Lock()
        self.refusals = 0
        self.last_refusal_at: float | None = None

    def measure(self) -> Space:
        found = os.statvfs(self.path)
        return Space(
            found.f_bavail * found.f_frsize, self.floor_bytes, found.f_blocks * found.f_frsize
        )

    def refused(self) -> None:
        """A C-STORE was answered 0xA700 for space."""
        with self._lock:
            self.refusals += 1
            self.last_refusal_at = time.time()

    def statistics(self) -> dict[str, float | int | None]:
        return {"refusals": self.refusals, "last_refusal_at": self.last_refusal_at}


#: Space kept back in `StatePaths.reserve` so the appliance can open its databases (SQLite
#: rebuilds each -shm file at the first open) after another writer filled the disk to 0 bytes.
RESERVE_BYTES = 16 * 1024 * 1024
#: Below this much free space a start releases the reserve before it opens the databases.
START_NEEDS_BYTES = 4 * 1024 * 1024


class Reserve:
    """A preallocated file the appliance gives back to itself when the disk is full at start."""

    def __init__(self, path: Path, size: int = RESERVE_BYTES) -> None:
        self.path = path
        self.size = size

    def release_if_needed(self) -> bool:
        """At start: free the reserve if the disk is too full to open the databases."""
        if free_bytes(self.path.parent) >= START_NEEDS_BYTES or not self.path.exists():
            return False
        self.path.unlink()
        return True

    def replenish(self, space: Space) -> bool:
        """Take the reserve back once the disk is above its floor by more than the reserve."""
        if self.path.exists() or space.free_bytes - self.size < max(space.floor_bytes, self.size):
            return False
        partial = self.path.with_suffix(".partial")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, self.path)
        except OSError:
            partial.unlink(missing_ok=True)
            return False
        return True
