"""The audit trail, sent on to a remote audit repository: RFC 5424 syslog over TLS (RFC 5425).

The local trail is the spool: a cursor (`audit/forwarded.json`: file and byte offset) says how
far the repository has been sent, and moves only after a batch was written to the connection.
While the repository is away nothing is lost and, when it returns, sending resumes at the
cursor. Syslog over TLS has no acknowledgement, so the one window is a connection that dies
with a batch in flight; a connection the repository closed is noticed before the next batch
(a reader watches it), so a restart of the repository loses and repeats nothing.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
from pathlib import Path
from typing import Any

import trio

from appliance import audit
from appliance.config import AuditConfig, TlsConfig
from appliance.dicom.tls import TlsError, client_context
from appliance.log import get_logger
from appliance.supervisor import Criticality

log = get_logger("audit")

#: <85>: facility 10 (security/authorization), severity 5 (notice), as IHE ATNA sends them.
PRIORITY = "<85>"
APP_NAME = "screening-gateway"
#: MSGID for DICOM audit messages (IHE ITI TF-2 3.20.7.1).
MSGID = "IHE+RFC-3881"
BATCH = 500
POLL_S = 0.5
CONNECT_TIMEOUT_S = 10.0
_WHEN = re.compile(r'EventDateTime="([^"]+)"')


class RepositoryClosed(Exception):
    """The repository closed the connection."""


def frame(line: str, host: str, pid: int) -> bytes:
    """One audit message as RFC 5425 octet-counted RFC 5424 syslog."""
    found = _WHEN.search(line)
    when = found.group(1) if found else "-"
    message = f"{PRIORITY}1 {when} {host} {APP_NAME} {pid} {MSGID} - ".encode() + (
        b"\xef\xbb\xbf" + line.encode("utf-8")
    )
    return str(len(message)).encode() + b" " + message


class Cursor:
    """How far the trail has been sent: (file name, byte offset), kept beside the trail."""

    def __init__(self, directory: Path) -> None:
        self._path = directory / "forwarded.json"
        self._directory = directory

    def load(self) -> tuple[str, int]:
        try:
            saved = json.loads(self._path.read_text())
            return str(saved["file"]), int(saved["offset"])
        except (OSError, ValueError, KeyError):
            return "", 0

    def save(self, name: str, offset: int) -> None:
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"file": name, "offset": offset}))
        with temporary.open("rb") as written:
            os.fsync(written.fileno())
        temporary.replace(self._path)

    def pending(self, name: str, offset: int) -> tuple[list[str], str, int]:
        """Whole lines after the cursor (at most BATCH), and the cursor after them."""
        trail = audit.files(self._directory)
        names = [path.name for path in trail]
        if name not in names:  # first start, or rotated away: from the oldest kept
            name, offset = (names[0], 0) if names else ("", 0)
        found: list[str] = []
        for path in trail[names.index(name) :] if name else []:
            if path.name != name:
                name, offset = path.name, 0
            with path.open("rb") as trail_file:
                trail_file.seek(offset)
                for raw in trail_file:
                    if not raw.endswith(b"\n"):
                        break  # being written: next time
                    offset += len(raw)
                    if raw.strip():
                        found.append(raw.decode("utf-8").rstrip("\n"))
                    if len(found) >= BATCH:
                        return found, name, offset
        return found, name, offset

    def behind(self, name: str, offset: int) -> int:
        """Bytes of the trail not yet sent."""
        total = 0
        for path in audit.files(self._directory):
            size = path.stat().st_size
            if path.name < name:
                continue
            total += size - offset if path.name == name else size
        return total


class AuditForwarder:
    """A supervised side-matter: the repository being away never touches DICOM service."""

    name = "audit-forwarder"
    criticality = Criticality.AUXILIARY

    def __init__(self, directory: Path, config: AuditConfig, tls: TlsConfig) -> None:
        self._config = config
        self._tls = tls
        host, _, port = config.remote.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._cursor = Cursor(directory)
        self._hostname = socket.gethostname()
        self.connected = False
        self.sent = 0
        self.last_error: str | None = None

    def statistics(self) -> dict[str, Any]:
        name, offset = self._cursor.load()
        try:
            behind = self._cursor.behind(name, offset)
        except OSError:
            behind = None
        return {
            "remote": self._config.remote,
            "connected": self.connected,
            "sent": self.sent,
            "bytes_waiting": behind,
            "last_error": self.last_error,
            "failing": None if self.connected else self.last_error,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        backoff = 1.0
        while True:
            try:
                await self._session()
            except (
                OSError,
                ssl.SSLError,
                trio.BrokenResourceError,
                trio.TooSlowError,
                RepositoryClosed,
                TlsError,
            ) as exc:
                reason = str(exc) or type(exc).__name__
                if self.connected or self.last_error != reason:
                    log.warning(
                        "audit.remote_unavailable",
                        phase="forward",
                        remote=self._config.remote,
                        error=reason,
                        retry_in_s=backoff,
                    )
                self.connected, self.last_error = False, reason
            await trio.sleep(backoff)
            backoff = 1.0 if self.connected else min(backoff * 2, 30.0)

    async def _session(self) -> None:
        context = await trio.to_thread.run_sync(
            lambda: client_context(self._tls, self._config.remote_ca_file, "audit.remote_ca_file")
        )
        with trio.fail_after(CONNECT_TIMEOUT_S):
            tcp = await trio.open_tcp_stream(self._host, self._port)
            stream = trio.SSLStream(
                tcp,
                context,
                server_hostname=self._config.remote_server_name or self._host,
                https_compatible=True,
            )
            await stream.do_handshake()
        async with stream:
            self.connected, self.last_error = True, None
            log.info("audit.remote_connected", remote=self._config.remote)
            closed = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, stream, closed)
                await self._send_pending(stream, closed)

    @staticmethod
    async def _watch(stream: trio.SSLStream[trio.SocketStream], closed: trio.Event) -> None:
        try:
            while await stream.receive_some(4096):
                pass  # a repository says nothing; whatever it sends is ignored
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError):
            pass
        closed.set()

    async def _send_pending(
        self, stream: trio.SSLStream[trio.SocketStream], closed: trio.Event
    ) -> None:
        pid = os.getpid()
        while True:
            name, offset = await trio.to_thread.run_sync(self._cursor.load)
            found, name, offset = await trio.to_thread.run_sync(self._cursor.pending, name, offset)
            if closed.is_set():
                raise RepositoryClosed("the repository closed the connection")
            if found:
                await stream.send_all(b"".join(frame(line, self._hostname, pid) for line in found))
                await trio.to_thread.run_sync(self._cursor.save, name, offset)
                self.sent += len(found)
                continue
            with trio.move_on_after(POLL_S):
                await closed.wait()
