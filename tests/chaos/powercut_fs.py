"""A FUSE filesystem that models a power cut (pyfuse3, which runs on Trio).

Every write is kept in memory and becomes durable only when its file is fsynced (fsync or
fdatasync); a create, mkdir, rename, link, unlink or rmdir becomes durable only when its
directory is fsynced. `kill -9` cannot show that data reached the disk (the page cache
survives it); this can. On SIGUSR1 ("cut the power") the daemon keeps only what is durable,
optionally tears the last unsynced write (a random, sector-aligned prefix of it reaches the
disk), saves that image, unmounts and exits; started again on the image, it is the disk after
the power came back. The model is the strict POSIX one: stricter than ext4's journal, which
is the point.

    python -m tests.chaos.powercut_fs MOUNTPOINT IMAGE [--tear PROBABILITY] [--seed N]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import random
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pyfuse3
import trio

SECTOR = 512
CAPACITY = 64 * 1024**3


class Node:
    def __init__(self, inode: int, mode: int, parent: int) -> None:
        self.inode = inode
        self.mode = mode
        self.parent = parent
        self.nlink = 1
        self.mtime_ns = time.time_ns()
        self.data = bytearray()  # files: what readers see now
        self.durable = b""  # files: as of the last fsync
        self.entries: dict[bytes, int] = {}  # directories: now
        self.durable_entries: dict[bytes, int] = {}  # directories: as of the last fsyncdir

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class PowerCutFS(pyfuse3.Operations):
    def __init__(self, nodes: dict[int, Node] | None = None) -> None:
        super().__init__()
        if nodes is None:
            root = Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, pyfuse3.ROOT_INODE)
            nodes = {root.inode: root}
        self.nodes = nodes
        self.next_inode = max(nodes) + 1
        self.handles: dict[int, int] = {}
        self.next_handle = 1
        #: The most recent write not yet made durable: (inode, offset, bytes).
        self.last_write: tuple[int, int, bytes] | None = None
        self.stats = {"fsyncs": 0, "dir_fsyncs": 0, "writes": 0}

    # --- the power cut -----------------------------------------------------------------------

    def durable_image(self, rng: random.Random, tear: float) -> tuple[dict[int, Node], dict]:
        """Only what was synced, reachable through synced directory entries (plus a torn tail
        of the last unsynced write, with probability `tear`)."""
        kept: dict[int, Node] = {}
        pending = [pyfuse3.ROOT_INODE]
        while pending:
            node = self.nodes[pending.pop()]
            if node.inode in kept:
                kept[node.inode].nlink += 1
                continue
            copy = Node(node.inode, node.mode, node.parent)
            copy.mtime_ns = node.mtime_ns
            copy.durable = node.durable
            copy.data = bytearray(node.durable)
            copy.entries = dict(node.durable_entries)
            copy.durable_entries = dict(node.durable_entries)
            kept[node.inode] = copy
            pending.extend(node.durable_entries.values())
        report: dict[str, Any] = {"torn": None, "nodes": len(kept)}
        if self.last_write and self.last_write[0] in kept and rng.random() < tear:
            inode, offset, data = self.last_write
            sectors = max(len(data) // SECTOR, 1)
            cut = SECTOR * rng.randrange(0, sectors)  # some sectors made it, the rest did not
            if 0 < cut < len(data):
                node = kept[inode]
                image = bytearray(node.durable)
                if len(image) < offset:
                    image.extend(b"\0" * (offset - len(image)))
                image[offset : offset + cut] = data[:cut]
                node.durable = bytes(image)
                node.data = bytearray(image)
                report["torn"] = {"inode": inode, "offset": offset, "kept": cut, "of": len(data)}
        return kept, report

    # --- helpers -------------------------------------------------------------------------------

    def _node(self, inode: int) -> Node:
        try:
            return self.nodes[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.inode
        entry.generation = 0
        entry.entry_timeout = 1
        entry.attr_timeout = 1
        entry.st_mode = node.mode
        entry.st_nlink = node.nlink if not node.is_dir else 2
        entry.st_uid = os.getuid()
        entry.st_gid = os.getgid()
        entry.st_rdev = 0
        entry.st_size = len(node.data) if not node.is_dir else 4096
        entry.st_blksize = 4096
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = node.mtime_ns
        return entry

    def _child(self, parent: Node, name: bytes) -> Node:
        if name not in parent.entries:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.nodes[parent.entries[name]]

    def _new(self, parent_inode: int, name: bytes, mode: int) -> Node:
        parent = self._node(parent_inode)
        if name in parent.entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = Node(self.next_inode, mode, parent_inode)
        self.next_inode += 1
        self.nodes[node.inode] = node
        parent.entries[name] = node.inode
        parent.mtime_ns = time.time_ns()
        return node

    def _drop_link(self, node: Node) -> None:
        node.nlink -= 1

    def _handle(self, inode: int) -> int:
        handle = self.next_handle
        self.next_handle += 1
        self.handles[handle] = inode
        return handle

    # --- operations ----------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        parent = self._node(parent_inode)
        if name == b".":
            return self._attrs(parent)
        if name == b"..":
            return self._attrs(self._node(parent.parent))
        return self._attrs(self._child(parent, name))

    async def getattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        return self._attrs(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):  # type: ignore[no-untyped-def]
        node = self._node(inode)
        if fields.update_size:
            size = attr.st_size
            if size < len(node.data):
                del node.data[size:]
            else:
                node.data.extend(b"\0" * (size - len(node.data)))
            self.last_write = None  # a truncate is not a write that can tear
        if fields.update_mode:
            node.mode = (node.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        return self._attrs(node)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):  # type: ignore[no-untyped-def]
        return self._attrs(self._new(parent_inode, name, mode))

    async def mkdir(self, parent_inode, name, mode, ctx):  # type: ignore[no-untyped-def]
        return self._attrs(self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777)))

    async def create(self, parent_inode, name, mode, flags, ctx):  # type: ignore[no-untyped-def]
        node = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777))
        return pyfuse3.FileInfo(fh=self._handle(node.inode)), self._attrs(node)

    async def unlink(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        parent = self._node(parent_inode)
        node = self._child(parent, name)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        del parent.entries[name]
        self._drop_link(node)

    async def rmdir(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        parent = self._node(parent_inode)
        node = self._child(parent, name)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if node.entries:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del parent.entries[name]

    async def rename(self, old_parent, old_name, new_parent, new_name, flags, ctx):  # type: ignore[no-untyped-def]
        source_dir, target_dir = self._node(old_parent), self._node(new_parent)
        node = self._child(source_dir, old_name)
        if new_name in target_dir.entries:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            replaced = self.nodes[target_dir.entries[new_name]]
            if replaced.is_dir and replaced.entries:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            if replaced.inode != node.inode:
                self._drop_link(replaced)
        del source_dir.entries[old_name]
        target_dir.entries[new_name] = node.inode
        if node.is_dir:
            node.parent = new_parent

    async def link(self, inode, new_parent_inode, new_name, ctx):  # type: ignore[no-untyped-def]
        node = self._node(inode)
        parent = self._node(new_parent_inode)
        if new_name in parent.entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        parent.entries[new_name] = inode
        node.nlink += 1
        return self._attrs(node)

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        node = self._node(inode)
        if flags & os.O_TRUNC:
            node.data.clear()
        return pyfuse3.FileInfo(fh=self._handle(inode))

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        return bytes(self._node(self.handles[fh]).data[off : off + size])

    async def write(self, fh, off, buf):  # type: ignore[no-untyped-def]
        node = self._node(self.handles[fh])
        if len(node.data) < off:
            node.data.extend(b"\0" * (off - len(node.data)))
        node.data[off : off + len(buf)] = buf
        node.mtime_ns = time.time_ns()
        self.last_write = (node.inode, off, bytes(buf))
        self.stats["writes"] += 1
        return len(buf)

    async def flush(self, fh):  # type: ignore[no-untyped-def]
        pass

    async def release(self, fh):  # type: ignore[no-untyped-def]
        self.handles.pop(fh, None)

    async def fsync(self, fh, datasync):  # type: ignore[no-untyped-def]
        node = self._node(self.handles[fh])
        node.durable = bytes(node.data)
        self.stats["fsyncs"] += 1
        if self.last_write and self.last_write[0] == node.inode:
            self.last_write = None

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        self._node(inode)
        return self._handle(inode)

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        node = self._node(self.handles[fh])
        names = sorted(node.entries)
        for index in range(start_id, len(names)):
            child = self.nodes[node.entries[names[index]]]
            if not pyfuse3.readdir_reply(token, names[index], self._attrs(child), index + 1):
                break

    async def releasedir(self, fh):  # type: ignore[no-untyped-def]
        self.handles.pop(fh, None)

    async def fsyncdir(self, fh, datasync):  # type: ignore[no-untyped-def]
        node = self._node(self.handles[fh])
        node.durable_entries = dict(node.entries)
        self.stats["dir_fsyncs"] += 1

    async def statfs(self, ctx):  # type: ignore[no-untyped-def]
        used = sum(len(node.data) for node in self.nodes.values()) // 4096
        found = pyfuse3.StatvfsData()
        found.f_bsize = found.f_frsize = 4096
        found.f_blocks = CAPACITY // 4096
        found.f_bfree = found.f_bavail = found.f_blocks - used
        found.f_files = found.f_ffree = found.f_favail = 10**6
        found.f_namemax = 255
        return found

    async def access(self, inode, mode, ctx):  # type: ignore[no-untyped-def]
        return True

    async def getxattr(self, inode, name, ctx):  # type: ignore[no-untyped-def]
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        return []

    async def forget(self, inode_list):  # type: ignore[no-untyped-def]
        pass


def _load(image: Path) -> dict[int, Node] | None:
    if not image.exists():
        return None
    with image.open("rb") as stream:
        nodes: dict[int, Node] = pickle.load(stream)
    return nodes


async def _serve(fs: PowerCutFS, image: Path, rng: random.Random, tear: float) -> None:
    with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            print(json.dumps({"mounted": True}), flush=True)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    kept, report = fs.durable_image(rng, tear)
                    partial = image.with_suffix(".partial")
                    with partial.open("wb") as stream:
                        pickle.dump(kept, stream, protocol=pickle.HIGHEST_PROTOCOL)
                    os.replace(partial, image)
                    print(json.dumps({"cut": report, **fs.stats}), flush=True)
                nursery.cancel_scope.cancel()
                return


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("image", type=Path, help="the durable state, loaded and saved on a cut")
    parser.add_argument("--tear", type=float, default=0.0, help="probability of a torn write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fs = PowerCutFS(_load(args.image))
    options = set(pyfuse3.default_options) | {"fsname=powercut", "default_permissions"}
    options.discard("default_permissions") if os.getuid() == 0 else None
    pyfuse3.init(fs, str(args.mountpoint), options)
    try:
        trio.run(_serve, fs, args.image, random.Random(args.seed), args.tear)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
