"""The systemd notify protocol (sd_notify(3)) in a few lines: no dependency, never blocks.

Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        environ = dict(os.environ) if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # abstract namespace socket
            address = "\0" + address[1:]
        self._address = address
        self._socket: socket.socket | None = None
        if address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        usec = int(environ.get("WATCHDOG_USEC", "0") or 0)
        pid = environ.get("WATCHDOG_PID")
        # The watchdog belongs to whichever process systemd names; a child must not feed it.
        mine = pid is None or pid == str(os.getpid())
        #: Seconds between WATCHDOG=1 pings (half the timeout, as sd_watchdog_enabled advises).
        self.watchdog_interval: float | None = usec / 2e6 if usec > 0 and mine else None

    def _send(self, *assignments: str) -> None:
        if self._socket is None:
            return
        # systemd gone or its queue full: notification is advisory, the service goes on.
        with contextlib.suppress(OSError):
            self._socket.sendto("\n".join(assignments).encode(), self._address)

    def ready(self, status: str) -> None:
        self._send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> None:
        self._send("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
