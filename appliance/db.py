"""One owner per SQLite file: its write connection, its single writer thread, transactions,
read-only readers for any thread, and WAL checkpoints.

A store (the instance store for pacs.db, the worklist store for worklist.db) owns one
`Database` and is the only module that executes SQL on that file's tables; other services ask
the store. Writes run in the database's own writer thread, one at a time, so the Trio thread
never blocks on SQLite and no two writers ever race for the file. Offline commands (the CLI
with the appliance stopped) call the same functions through `run_sync`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec, TypeVar

import trio

from appliance.log import get_logger

log = get_logger("db")
T = TypeVar("T")
P = ParamSpec("P")


#: SQLite's primary result code for "database or disk is full".
SQLITE_FULL = 13


def is_full(exc: BaseException) -> bool:
    """SQLITE_FULL: no room for the write (answered as out of resources, not as a failure)."""
    code = getattr(exc, "sqlite_errorcode", 0)
    return isinstance(exc, sqlite3.Error) and isinstance(code, int) and code & 0xFF == SQLITE_FULL


def _configure(connection: sqlite3.Connection) -> sqlite3.Connection:
    connection.execute("PRAGMA busy_timeout=10000")
    connection.row_factory = sqlite3.Row
    return connection


class Database:
    def __init__(
        self,
        path: Path,
        schema: str,
        *,
        migrate: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = path
        self._schema = schema
        self._migrate = migrate
        self._connection: sqlite3.Connection | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._after_commit: list[Callable[[], None]] | None = None
        #: Called (in the writer thread) after a transaction that recorded an outbox event.
        self.event_listeners: list[Callable[[], None]] = []

    # --- lifecycle --------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the file and its tables if needed, and start the writer thread."""
        self._writer = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"db-{self.path.stem}"
        )
        self._writer.submit(self._open_connection).result()

    def _open_connection(self) -> None:
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns; answers to modalities depend on it.
        connection.execute("PRAGMA synchronous=FULL")
        _configure(connection)
        connection.executescript(self._schema)
        if self._migrate is not None:
            self._migrate(connection)
        self._connection = connection

    def close(self) -> None:
        if self._writer is not None:
            if self._connection is not None:
                self._writer.submit(self._connection.close).result()
            self._writer.shutdown(wait=True)
            self._writer = None
            self._connection = None
        while not self._readers.empty():
            self._readers.get_nowait().close()

    @property
    def is_open(self) -> bool:
        return self._connection is not None

    # --- writes: only in the writer thread --------------------------------------------------------

    @property
    def connection(self) -> sqlite3.Connection:
        """The write connection: for the owner's functions, which run in the writer thread."""
        if self._connection is None:
            raise RuntimeError(f"{self.path.name} is not open")
        return self._connection

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception), on the write connection."""
        db = self.connection
        db.execute("BEGIN IMMEDIATE")
        self._after_commit = []
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            self._after_commit = None
            # A failed COMMIT (disk full, I/O error) may leave the transaction open: end it, or
            # every later statement on this one connection would join it and never commit.
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        hooks, self._after_commit = self._after_commit, None
        for hook in hooks:
            try:
                hook()
            except Exception:  # the transaction is committed; a hook must not say otherwise
                log.exception("database.after_commit_failed", database=self.path.name)

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Run `hook` once the current transaction has committed (never if it rolls back)."""
        if self._after_commit is None:
            raise RuntimeError("after_commit outside a transaction")
        if hook not in self._after_commit:
            self._after_commit.append(hook)

    def _submit(
        self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        if self._writer is None:
            raise RuntimeError(f"{self.path.name} is not open")
        return self._writer.submit(function, *args, **kwargs)

    async def write(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `function` in the writer thread and wait for it. Not cancellable once queued, like
        a thread call: a write that started is finished and its result not lost to the caller's
        cancellation (the caller is cancelled right after)."""
        return await self._outcome(self._submit(function, *args, **kwargs), shield=True)

    async def write_or_stop_waiting(
        self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """The same, for a caller with a deadline (a cloud action's 30 s): cancelled, it stops
        waiting while the write still runs to its end, in order, and a failure is logged."""
        future = self._submit(function, *args, **kwargs)
        try:
            return await self._outcome(future, shield=False)
        except trio.Cancelled:
            future.add_done_callback(self._log_abandoned)
            raise

    def _log_abandoned(self, future: concurrent.futures.Future[T]) -> None:
        if (exc := future.exception()) is not None:
            log.error(
                "database.write_failed_unwatched",
                phase="write",
                database=self.path.name,
                error=f"{type(exc).__name__}: {exc}",
            )

    async def _outcome(self, future: concurrent.futures.Future[T], *, shield: bool) -> T:
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        with trio.CancelScope(shield=shield):
            await done.wait()
        return future.result()

    def run_sync(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """The same, from a plain thread (offline commands, pynetdicom threads without Trio)."""
        return self._submit(function, *args, **kwargs).result()

    def checkpoint(self) -> tuple[int, int, int]:
        """Fold the WAL back into the database (writer thread): (busy, wal pages, moved)."""
        busy, pages, moved = self.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return int(busy), int(pages), int(moved)

    # --- reads: any thread ------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        return self.path.exists()

    @contextlib.contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        """A read-only connection for any thread or process (C-FIND, status, fsck's checks):
        it cannot write, so a reader never becomes a second writer."""
        try:
            db = self._readers.get_nowait()
        except queue.Empty:
            db = _configure(
                sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            )
        try:
            yield db
        finally:
            if db.in_transaction:
                db.rollback()
            self._readers.put(db)
