"""The running appliance's local control socket: the same actions the cloud sends, from this box.

`state_dir/control.sock` (mode 0600, so root and the service user only) takes one JSON action
per connection, newline-terminated, and answers one JSON reply, exactly as over the relay
(appliance/relay/actions.py). The CLI uses it to ask the appliance to do what only the owner of
the databases may do while it runs: `appliance selftest` runs its test participant and then
asks the appliance to remove what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from appliance.log import get_logger
from appliance.supervisor import Criticality

log = get_logger("control")

MAX_REQUEST = 1024 * 1024


@contextlib.contextmanager
def _addressable(path: Path) -> Iterator[str]:
    """A socket address for `path` within AF_UNIX's 108 bytes however deep the state directory
    is: through an open descriptor of its directory (Linux's /proc/self/fd)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlUnavailable(Exception):
    """No appliance answers on the control socket."""


class ControlSocket:
    name = "control-socket"
    criticality = Criticality.AUXILIARY

    def __init__(self, path: Path, handle: Callable[[str], Awaitable[str]]) -> None:
        self._path = path
        self._handle = handle
        self.requests = 0

    def statistics(self) -> dict[str, int]:
        return {"requests": self.requests}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # A socket file left by a killed appliance: we hold the state directory's lock.
        self._path.unlink(missing_ok=True)
        listening = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _addressable(self._path) as address:
            await listening.bind(address)
        os.chmod(self._path, 0o600)
        listening.listen(8)
        try:
            task_status.started()
            await trio.serve_listeners(self._serve, [trio.SocketListener(listening)])
        finally:
            self._path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(30):
                while b"\n" not in request and len(request) <= MAX_REQUEST:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    request += chunk
            self.requests += 1
            try:
                reply = await self._handle(request.decode("utf-8", "replace"))
            except Exception as exc:  # one request's failure, never the service's
                log.exception("control.request_failed", phase="control", error=str(exc))
                reply = json.dumps({"status": "error", "message": f"internal error: {exc}"})
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(reply.encode() + b"\n")


def request(path: Path, action: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """From another process (the CLI): send one action, return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(timeout)
        try:
            with _addressable(path) as address:
                client.connect(address)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(f"no appliance answers on {path}") from exc
        client.sendall(json.dumps(action).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = client.recv(65536)
            if not chunk:
                break
            reply += chunk
    try:
        answer = json.loads(reply)
    except ValueError as exc:
        raise ControlUnavailable(f"the appliance gave no reply on {path}") from exc
    if not isinstance(answer, dict):
        raise ControlUnavailable(f"the appliance gave no reply on {path}")
    return answer
