"""`image.fetch`: the cloud pulls stored DICOM files over the rendezvous WebSocket.

Per instance: a JSON text frame `{"type": "image.header", sop_instance_uid, size, sha256,
offset, transfer_syntax_uid, index, count}`, the file's bytes from `offset` in binary frames,
then `{"type": "image.trailer", sop_instance_uid, bytes, sha256, intact}`, where `sha256` is
the whole file as read now (the skipped prefix is hashed too) and `intact` says whether it still
equals the hash recorded at storage. The action's reply closes the conversation.

Resumable: a fetch names where to start (`offset` for one instance, `resume_from: {sop_instance_uid,
offset}` within a study, whose instances always come in the same order). Every fetch shares one
bandwidth budget with the uploads to Manage (`relay.fetch_kbps`, so a clinic's uplink is not
saturated) and at most `relay.fetch_concurrency` run at once; the others wait their turn.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from attrs import frozen

from appliance import audit
from appliance.log import get_logger
from appliance.storage.store import InstanceStore

log = get_logger("relay")

CHUNK = 256 * 1024


class FetchError(Exception):
    """A fetch the appliance refuses; the message goes back as the reply."""


@frozen
class ResumeFrom:
    sop_instance_uid: str
    offset: int = 0


@frozen
class FetchRequest:
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    offset: int = 0
    resume_from: ResumeFrom | None = None


class Bandwidth:
    """The uplink's budget, shared by every fetch and upload: bytes per second, one second of
    burst."""

    def __init__(
        self, bytes_per_second: float, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self._rate = bytes_per_second
        self._clock = clock
        self._available = bytes_per_second
        self._updated: float | None = None
        self._lock = trio.Lock()

    async def take(self, count: int) -> None:
        if self._rate <= 0:
            return
        async with self._lock:  # first come, first served
            now = self._clock()
            if self._updated is not None:
                self._available = min(
                    self._rate, self._available + (now - self._updated) * self._rate
                )
            self._updated = now
            self._available -= count
            if self._available < 0:
                await trio.sleep(-self._available / self._rate)


class ImageFetch:
    #: Who the audit trail names as the fetching party.
    cloud_identity = "cloud"

    def __init__(
        self,
        store: InstanceStore,
        bandwidth: Bandwidth,
        concurrency: int,
    ) -> None:
        self._store = store
        self._index = store.reader
        self._bandwidth = bandwidth
        self._slots = trio.CapacityLimiter(concurrency)
        self.sent_bytes = 0

    def _plan(self, request: FetchRequest) -> list[tuple[sqlite3.Row, int]]:
        """The instances to send, each with the offset to start from."""
        if bool(request.sop_instance_uid) == bool(request.study_instance_uid):
            raise FetchError("give exactly one of sop_instance_uid and study_instance_uid")
        if request.offset < 0 or (request.resume_from and request.resume_from.offset < 0):
            raise FetchError("an offset is 0 or more")
        if request.sop_instance_uid:
            row = self._index.instance(request.sop_instance_uid)
            if row is None or row["status"] != "STORED":
                raise FetchError(f"no stored instance {request.sop_instance_uid}")
            if request.offset > row["file_size"]:
                raise FetchError(f"offset {request.offset} is past the end ({row['file_size']})")
            return [(row, request.offset)]
        rows = sorted(
            (r for r in self._index.study(request.study_instance_uid) if r["status"] == "STORED"),
            key=lambda r: (r["created_at"], r["sop_instance_uid"]),
        )
        if not rows:
            raise FetchError(f"no stored instances in study {request.study_instance_uid}")
        resume = request.resume_from
        if resume is None:
            return [(row, 0) for row in rows]
        uids = [r["sop_instance_uid"] for r in rows]
        if resume.sop_instance_uid not in uids:
            raise FetchError(f"{resume.sop_instance_uid} is not in this study")
        start = uids.index(resume.sop_instance_uid)
        return [(row, resume.offset if n == start else 0) for n, row in enumerate(rows)][start:]

    async def run(self, request: FetchRequest, channel: Any) -> dict[str, Any]:
        plan = await trio.to_thread.run_sync(self._plan, request)
        studies = audit.Transfers.of_rows(row for row, _ in plan).studies()
        sender = audit.appliance_participant()
        receiver = audit.Participant(self.cloud_identity, requestor=True)
        audit.record(audit.begin_transferring(source=sender, destination=receiver, studies=studies))
        sent: list[sqlite3.Row] = []
        total = 0
        try:
            async with self._slots:
                for index, (row, offset) in enumerate(plan):
                    total += await self._send_one(row, offset, index, len(plan), channel)
                    sent.append(row)
        finally:
            audit.record(
                audit.instances_transferred(
                    source=sender,
                    destination=receiver,
                    studies=audit.Transfers.of_rows(sent).studies() or studies,
                    received=False,
                    outcome=audit.SUCCESS if len(sent) == len(plan) else audit.MINOR_FAILURE,
                    description=f"image.fetch: {len(sent)} of {len(plan)} sent",
                )
            )
        log.info("fetch.done", instances=len(plan), bytes=total)
        return {"status": "done", "instances": len(plan), "bytes": total}

    async def _send_one(
        self, row: sqlite3.Row, offset: int, index: int, count: int, channel: Any
    ) -> int:
        path = self._index.path(row)
        header = {
            "type": "image.header",
            "sop_instance_uid": row["sop_instance_uid"],
            "study_instance_uid": row["study_instance_uid"],
            "size": row["file_size"],
            "sha256": row["storage_hash"],
            "offset": offset,
            "transfer_syntax_uid": row["transfer_syntax_uid"],
            "index": index,
            "count": count,
        }
        await channel.send_message(_json(header))
        digest = hashlib.sha256()
        sent = 0
        stream = await trio.to_thread.run_sync(Path.open, path, "rb")
        try:
            await trio.to_thread.run_sync(_hash_prefix, stream, digest, offset)
            while True:
                chunk = await trio.to_thread.run_sync(stream.read, CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                await self._bandwidth.take(len(chunk))
                await channel.send_message(chunk)
                sent += len(chunk)
                self.sent_bytes += len(chunk)
        finally:
            stream.close()
        intact = digest.hexdigest() == row["storage_hash"]
        if intact:
            await self._store.fetched([row["sop_instance_uid"]])
        if not intact:
            log.error(
                "fetch.instance_damaged", phase="read", sop_instance_uid=row["sop_instance_uid"]
            )
        await channel.send_message(
            _json(
                {
                    "type": "image.trailer",
                    "sop_instance_uid": row["sop_instance_uid"],
                    "bytes": sent,
                    "sha256": digest.hexdigest(),
                    "intact": intact,
                }
            )
        )
        return sent


def _hash_prefix(stream: Any, digest: Any, length: int) -> None:
    remaining = length
    while remaining:
        chunk = stream.read(min(CHUNK, remaining))
        if not chunk:
            break
        digest.update(chunk)
        remaining -= len(chunk)


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value)
