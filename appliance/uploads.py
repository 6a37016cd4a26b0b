"""Images to the NHS Manage service over HTTPS (cloud profile `manage`, docs/cloud.md).

Each stored image whose Accession Number belongs to a worklist item the cloud created is
uploaded as received (its bytes, its UIDs) with `PUT {api}/api/v1/dicom/{action_id}`, one
multipart part `file` named `<SOP Instance UID>.dcm`, streamed from disk, with this machine's
Entra bearer token for Manage's audience.

The queue is the index: every STORED instance is a candidate until `uploads` (in pacs.db,
beside it) records its outcome, so a restart, a crash or a day offline delays uploads and
never loses one. Images of one study go in the order they arrived, one at a time; studies go
concurrently up to `cloud.upload_concurrency`. Manage is idempotent (a re-upload answers 201),
so an upload cut by a crash is simply sent again.

Each answer is handled by what it means: 201 done; 401 a fresh token and one more try; 400,
403, 422 and the 500s Manage gives for a fault in the image or the exam (a laterality or view
that differs from the series', a study under another action, a PatientID over 10 characters)
are final: recorded, alarmed, not retried; any other 5xx, a timeout or a network error is
retried with capped, jittered backoff for `cloud.upload_retry_days`. Objects over 100 MiB and
classes Manage does not take (tomosynthesis) are not uploaded and say why. The failure report
(`PATCH .../failure`) is never sent by the appliance: Manage then refuses every later upload for
the appointment, which only a person should decide.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
import sqlite3
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import trio

from appliance.config import CloudConfig
from appliance.db import Database
from appliance.identity import EntraTokens, IdentityError
from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.relay.fetch import Bandwidth
from appliance.storage.index import StoredInstance
from appliance.storage.store import InstanceStore
from appliance.supervisor import Criticality
from appliance.worklist.store import WorklistStore

log = get_logger("uploads")


MAX_UPLOAD = 100 * 1024 * 1024
#: Breast tomosynthesis (and its projections): Manage does not take them.
NOT_ACCEPTED = {"1.2.840.10008.5.1.4.1.1.13.1.3", "1.2.840.10008.5.1.4.1.1.13.1.4"}
#: Manage's 500s that say the image or the exam is wrong, not the server: phrases of its
#: problem `detail` (never of an HTML error page, which says nothing of the image).
PERMANENT_500 = ("laterality", "view position", "another action", "patientid")
#: Action ids of items made here (the CLI, `appliance selftest`): Manage knows no such action.
LOCAL_ACTIONS = ("cli-", "selftest-")
BACKOFF_S = (5.0, 15.0, 60.0, 300.0, 900.0)
SWEEP_INTERVAL_S = 2.0
BATCH = 200
#: Bytes read from disk per step of an upload.
CHUNK = 256 * 1024


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _iso(moment: datetime.datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


#: An instance due for upload, its attempts so far, and when the first was made.
Due = tuple[StoredInstance, int, str | None]


class UploadQueue:
    """pacs.db's upload queue and outcomes (writer thread only, but for `listing`)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        #: Called (writer thread) once a transaction that queued an upload commits.
        self.queued: Callable[[], None] | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        return self._database.connection

    def enqueue(self, instance: StoredInstance) -> None:
        """In the transaction that indexes `instance`: its upload is due now."""
        now = _iso(_now())
        self._db.execute(
            "INSERT INTO uploads (sop_instance_uid, state, next_attempt_at, updated_at)"
            " VALUES (?, 'PENDING', ?, ?) ON CONFLICT (sop_instance_uid) DO UPDATE SET"
            # A row left by an image that is gone (a release before rows went with their
            # image): the image is new again, its upload too. Never a failed C-STORE.
            " state = 'PENDING', attempts = 0, next_attempt_at = excluded.next_attempt_at,"
            " last_status = NULL, error = NULL, first_tried_at = NULL,"
            " updated_at = excluded.updated_at",
            (instance.sop_instance_uid, now, now),
        )
        if self.queued is not None:
            self._database.after_commit(self.queued)

    def backfill(self, since: str, limit: int) -> int:
        """Queue STORED instances that have no upload row (indexed while uploads were off, or
        by a release before them): those stored since `since` as due, older ones as skipped
        (Manage takes only the images of actions it created today). Returns how many."""
        rows = self._db.execute(
            "SELECT sop_instance_uid, created_at FROM stored_instances s WHERE status = 'STORED'"
            " AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.sop_instance_uid ="
            " s.sop_instance_uid) LIMIT ?",
            (limit,),
        ).fetchall()
        now = _iso(_now())
        with self._database.transaction() as db:
            db.executemany(
                "INSERT INTO uploads (sop_instance_uid, state, next_attempt_at, error, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (uid, "PENDING", now, None, now)
                    if created >= since
                    else (uid, "SKIPPED", None, "stored before uploads to Manage began", now)
                    for uid, created in rows
                ],
            )
        return len(rows)

    def due(self, now: str, limit: int) -> list[Due]:
        """Queued uploads due now, oldest image first, with their attempts so far and when
        the first was made."""
        rows = self._db.execute(
            "SELECT s.*, u.attempts AS upload_attempts, u.first_tried_at AS upload_first_tried"
            " FROM uploads u JOIN stored_instances s ON s.sop_instance_uid = u.sop_instance_uid"
            " WHERE u.state = 'PENDING' AND u.next_attempt_at <= ? AND s.status = 'STORED'"
            # A study waiting out an image's backoff sends nothing later than it: its order holds.
            " AND s.study_instance_uid NOT IN (SELECT w.study_instance_uid FROM uploads b"
            " JOIN stored_instances w ON w.sop_instance_uid = b.sop_instance_uid"
            " WHERE b.state = 'PENDING' AND b.next_attempt_at > ?)"
            " ORDER BY s.created_at LIMIT ?",
            (now, now, limit),
        ).fetchall()
        found = []
        for row in rows:
            values = dict(row)
            attempts, first = values.pop("upload_attempts"), values.pop("upload_first_tried")
            found.append((StoredInstance(**values), int(attempts), first))
        return found

    def record(
        self,
        sop_instance_uid: str,
        state: str,
        *,
        action_id: str | None = None,
        attempts: int = 0,
        next_attempt_at: str | None = None,
        status: int | None = None,
        error: str | None = None,
        instance_id: str | None = None,
        first_tried_at: str | None = None,
    ) -> None:
        self._db.execute(
            # Only an existing row: an upload whose image was deleted meanwhile (retention,
            # a self-test's cleanup) leaves nothing behind.
            "UPDATE uploads SET state = ?, action_id = ?, attempts = ?, next_attempt_at = ?,"
            " last_status = ?, error = ?, instance_id = ?,"
            " first_tried_at = coalesce(first_tried_at, ?), updated_at = ?"
            " WHERE sop_instance_uid = ?",
            (
                state,
                action_id,
                attempts,
                next_attempt_at,
                status,
                error,
                instance_id,
                first_tried_at,
                _iso(_now()),
                sop_instance_uid,
            ),
        )

    def listing(self, include_done: bool) -> list[sqlite3.Row]:
        """For `appliance outbox list` (any thread): uploads not done, or all."""
        with self._database.reader() as db:
            try:
                return db.execute(
                    "SELECT * FROM uploads WHERE ? OR state != 'DONE' ORDER BY updated_at",
                    (include_done,),
                ).fetchall()
            except sqlite3.OperationalError:  # a database from before uploads
                return []

    def retry_failed(self) -> int:
        """`appliance outbox retry --all`: failed uploads are tried again now."""
        return self._db.execute(
            "UPDATE uploads SET state = 'PENDING', next_attempt_at = ?, updated_at = ?"
            " WHERE state = 'FAILED'",
            (_iso(_now()), _iso(_now())),
        ).rowcount


class Outcome(Exception):
    """How one upload ended: `state` (DONE, FAILED, SKIPPED, PENDING to retry)."""

    def __init__(self, state: str, error: str | None = None, status: int | None = None) -> None:
        super().__init__(error or state)
        self.state, self.error, self.status = state, error, status
        self.instance_id: str | None = None
        #: The server's Retry-After (seconds), for a retry no sooner than it asked.
        self.retry_after: float | None = None


class ImageUploader:
    name = "image-uploads"
    criticality = Criticality.AUXILIARY

    def __init__(
        self,
        store: InstanceStore,
        worklist: WorklistStore,
        config: CloudConfig,
        tokens: EntraTokens,
        bandwidth: Bandwidth | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._store = store
        self._worklist = worklist
        self._config = config
        self._tokens = tokens
        self._transport = transport
        self._bandwidth = bandwidth or Bandwidth(0)  # shared with image.fetch (app.py)
        self.queue = UploadQueue(store.database)
        # Each new instance's upload is queued in the transaction that indexes it, and wakes us.
        store.index.on_stored = self.queue.enqueue
        self.queue.queued = self._queued
        self._token: trio.lowlevel.TrioToken | None = None
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(config.upload_concurrency)
        self._busy: set[str] = set()  # studies being uploaded now
        self.uploaded = 0
        self.failing: str | None = None

    def statistics(self) -> dict[str, Any]:
        return {
            "uploaded": self.uploaded,
            "studies_in_flight": len(self._busy),
            "failing": self.failing,
        }

    async def probe(self) -> dict[str, Any]:
        """`appliance selftest` under manage: a token for Manage's audience and its
        unauthenticated `GET /healthcheck`, answered by this process (which holds the identity).
        Raises IdentityError or httpx.HTTPError, named by the caller."""
        token = await self._tokens.get(self._config.api_audience)
        url = f"{self._config.api_url.rstrip('/')}/healthcheck"
        async with httpx.AsyncClient(transport=self._transport, timeout=10.0) as client:
            response = await client.get(url)
        return {
            "token_valid_s": round(token.expires_on - time.time()),
            "healthcheck": response.status_code,
            "uploaded": self.uploaded,
            "failing": self.failing,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        since = _iso(_now() - datetime.timedelta(days=self._config.upload_retry_days))
        while (queued := await self._store.write(self.queue.backfill, since, BATCH * 10)) > 0:
            log.info("upload.backfilled", instances=queued)
        timeout = httpx.Timeout(60.0, connect=10.0)
        client = httpx.AsyncClient(transport=self._transport, timeout=timeout)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._sweep(client, nursery)
        finally:
            with trio.CancelScope(shield=True):  # its connections closed, even when cancelled
                await client.aclose()

    def _queued(self) -> None:
        """An upload was queued (the writer thread, after its commit): sweep now."""
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(lambda: self._wake.set())

    async def _sweep(self, client: httpx.AsyncClient, nursery: trio.Nursery) -> None:
        """Every study with images due gets one task, which uploads them in order; a sweep
        when an image is queued, when a study's task ends, and every few seconds for retries."""
        while True:
            self._wake = trio.Event()
            # Studies busy when the read began: the read may predate their last outcome (their
            # task ending wakes the next sweep, which sees it).
            busy = set(self._busy)
            due = await self._store.read(self.queue.due, _iso(_now()), BATCH)
            by_study: dict[str, list[Due]] = defaultdict(list)
            for entry in due:
                by_study[entry[0].study_instance_uid].append(entry)
            for study, entries in by_study.items():
                if study not in busy and study not in self._busy:
                    self._busy.add(study)
                    nursery.start_soon(self._upload_study, client, study, entries)
            with trio.move_on_after(SWEEP_INTERVAL_S):
                await self._wake.wait()

    async def _upload_study(
        self,
        client: httpx.AsyncClient,
        study: str,
        entries: list[Due],
    ) -> None:
        try:
            async with self._limiter:
                for instance, attempts, first_tried in entries:  # in the order they arrived
                    if not await self._upload_one(client, instance, attempts, first_tried):
                        return  # a retry later: the study's later images wait behind it
        finally:
            self._busy.discard(study)
            self._wake.set()  # its images that arrived meanwhile are due

    async def _upload_one(
        self,
        client: httpx.AsyncClient,
        instance: StoredInstance,
        attempts: int,
        first_tried: str | None,
    ) -> bool:
        """One image's attempt, recorded; False when it is to be retried later."""
        started = _now()
        action_id: str | None = None
        try:
            action_id = await self._action_of(instance)
            outcome = await self._send(client, instance, action_id)
        except Outcome as ended:
            outcome = ended
        attempts += 1
        first = first_tried or _iso(started)
        if outcome.state == "PENDING":
            age = (_now() - datetime.datetime.fromisoformat(first)).total_seconds()
            if age > self._config.upload_retry_days * 86400:
                outcome = Outcome("FAILED", f"gave up after {attempts} attempts: {outcome.error}")
        next_at = None
        if outcome.state == "PENDING":
            delay = BACKOFF_S[min(attempts - 1, len(BACKOFF_S) - 1)] * random.uniform(0.8, 1.2)
            if outcome.retry_after is not None:  # 429/503 saying when: then, within our cap
                delay = min(max(delay, outcome.retry_after), BACKOFF_S[-1])
            next_at = _iso(_now() + datetime.timedelta(seconds=delay))
        await self._store.write(
            self.queue.record,
            instance.sop_instance_uid,
            outcome.state,
            action_id=action_id,
            attempts=attempts,
            next_attempt_at=next_at,
            status=outcome.status,
            error=outcome.error,
            instance_id=outcome.instance_id,
            first_tried_at=first,
        )
        METRICS.inc("uploads_total", outcome=outcome.state.lower())
        fields = {
            "sop_instance_uid": instance.sop_instance_uid,
            "action_id": action_id,
            "status": outcome.status,
            "attempt": attempts,
        }
        if outcome.state == "DONE":
            self.uploaded += 1
            self.failing = None
            ms = round((_now() - started).total_seconds() * 1000)
            log.info("upload.done", ms=ms, **fields)
        elif outcome.state == "FAILED":
            log.error("upload.failed", phase="upload", error=outcome.error, **fields)
        elif outcome.state == "SKIPPED":
            log.info("upload.skipped", reason=outcome.error, **fields)
        else:
            self.failing = outcome.error
            log.warning(
                "upload.retrying", phase="upload", error=outcome.error, next_at=next_at, **fields
            )
        return outcome.state != "PENDING"

    async def _action_of(self, instance: StoredInstance) -> str:
        if not instance.accession_number:
            raise Outcome("SKIPPED", "no Accession Number: no Manage action to upload under")
        item = await trio.to_thread.run_sync(self._worklist.get, instance.accession_number)
        action_id = item.source_message_id if item else None
        if not action_id or action_id.startswith(LOCAL_ACTIONS):
            raise Outcome("SKIPPED", "the worklist item was not created by the cloud")
        if instance.sop_class_uid in NOT_ACCEPTED:
            raise Outcome(
                "SKIPPED", f"SOP class {instance.sop_class_uid} is not accepted by Manage"
            )
        if instance.file_size > MAX_UPLOAD:
            raise Outcome("SKIPPED", f"{instance.file_size} bytes: over Manage's 100 MiB")
        return action_id

    async def _send(
        self, client: httpx.AsyncClient, instance: StoredInstance, action_id: str
    ) -> Outcome:
        url = f"{self._config.api_url.rstrip('/')}/api/v1/dicom/{action_id}"
        for fresh in (False, True):
            try:
                if fresh:
                    self._tokens.forget(self._config.api_audience)
                token = await self._tokens.get(self._config.api_audience)
            except IdentityError as exc:
                return Outcome("PENDING", f"identity: {exc.reason}")
            try:
                response = await self._put(client, url, token.token, instance)
            except OSError as exc:  # the file: missing or unreadable (a scrub will say)
                return Outcome("PENDING", f"reading the image: {exc}")
            except httpx.HTTPError as exc:  # timeouts, refused connections, resets
                return Outcome("PENDING", f"{type(exc).__name__}: {exc}")
            if response.status_code != 401:
                break
        return self._meaning(response)

    async def _put(
        self, client: httpx.AsyncClient, url: str, token: str, instance: StoredInstance
    ) -> httpx.Response:
        """One multipart PUT, the file streamed from disk in chunks read in a worker thread
        (a disk read never blocks the Trio thread; memory stays flat whatever the size)."""
        boundary = uuid.uuid4().hex
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file";'
            f' filename="{instance.sop_instance_uid}.dcm"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        data = await trio.open_file(self._store.layout.absolute(instance.storage_path), "rb")
        async with data:
            size = (await trio.to_thread.run_sync(os.fstat, data.fileno())).st_size

            async def body() -> AsyncIterator[bytes]:
                yield head
                while chunk := await data.read(CHUNK):
                    await self._bandwidth.take(len(chunk))
                    yield chunk
                yield tail

            return await client.put(
                url,
                content=body(),
                headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(len(head) + size + len(tail)),
                },
            )

    @staticmethod
    def _meaning(response: httpx.Response) -> Outcome:
        status = response.status_code
        body: Any = None
        with contextlib.suppress(ValueError):
            body = response.json()
        problem = str(body.get("detail", "")) if isinstance(body, dict) else ""
        text = (problem or response.text)[:300]
        if 200 <= status < 300:  # 201 is Manage's; any success is one
            outcome = Outcome("DONE", status=status)
            if isinstance(body, dict) and body.get("instance_id"):
                outcome.instance_id = str(body["instance_id"])
            return outcome
        if status in (400, 403, 413, 422):
            return Outcome("FAILED", f"HTTP {status}: {text}", status)
        if status == 401:
            return Outcome("PENDING", f"HTTP 401 with a fresh token: {text}", status)
        if status == 500 and any(phrase in problem.lower() for phrase in PERMANENT_500):
            return Outcome("FAILED", f"HTTP 500: {text}", status)
        outcome = Outcome("PENDING", f"HTTP {status}: {text}", status)
        with contextlib.suppress(ValueError):  # seconds; an HTTP-date is rare and ignored
            outcome.retry_after = float(response.headers.get("retry-after", ""))
        return outcome
