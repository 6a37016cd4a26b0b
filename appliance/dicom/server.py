"""A pynetdicom server as a supervised Trio service.

pynetdicom accepts connections in one thread and runs each association in its own thread. This
service binds the port, serves until cancelled, then stops in two phases: stop accepting, give
in-flight associations up to the shutdown bound to finish, abort the rest.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import trio
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from appliance.config import DicomConfig
from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.supervisor import Criticality

log = get_logger("dicom")

Handler = tuple[evt.EventType, Callable[..., Any]]
#: Presentation contexts a server accepts: (abstract syntax, transfer syntaxes).
Contexts = list[tuple[str, Sequence[str]]]


class _AssociationServer(ThreadedAssociationServer):
    allowed_addresses: frozenset[str] = frozenset()
    service_name = "dicom"

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()
        # DIMSE responses are small writes; with Nagle on, each one waits for the peer's delayed
        # ACK (~40 ms per image or query).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = client_address[0]
        if not self.allowed_addresses or address in self.allowed_addresses:
            return True
        log.warning(
            "association.refused", server=self.service_name, phase="peer-address", address=address
        )
        return False


def _log_association(event_name: str) -> Callable[[evt.Event], None]:
    def handler(event: evt.Event) -> None:
        assoc = event.assoc
        METRICS.inc(
            "associations_total", server=assoc.ae.ae_title, outcome=event_name.split(".")[-1]
        )
        log.info(
            event_name,
            server=assoc.ae.ae_title,
            calling_ae=assoc.requestor.ae_title,
            address=assoc.requestor.address,
        )

    return handler


_ASSOCIATION_EVENTS: list[Handler] = [
    (evt.EVT_ACCEPTED, _log_association("association.accepted")),
    (evt.EVT_REJECTED, _log_association("association.rejected")),
    (evt.EVT_RELEASED, _log_association("association.released")),
    (evt.EVT_ABORTED, _log_association("association.aborted")),
]


class DicomServer:
    """Serves one AE title on one port; handlers decide what the services do."""

    criticality = Criticality.ESSENTIAL

    def __init__(
        self,
        *,
        name: str,
        ae_title: str,
        port: int,
        contexts: Sequence[tuple[str, Sequence[str]]],
        handlers: Sequence[Handler],
        dicom: DicomConfig,
        shutdown_timeout: float,
    ) -> None:
        self.name = name
        self._ae_title = ae_title
        self._address = (dicom.host, port)
        self._contexts = contexts
        self._handlers = [*_ASSOCIATION_EVENTS, *handlers]
        self._dicom = dicom
        self._shutdown_timeout = shutdown_timeout
        self._server: _AssociationServer | None = None
        #: The port actually bound (differs from the configured one when that is 0).
        self.bound_port: int | None = None

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def statistics(self) -> dict[str, int | None]:
        return {"port": self.bound_port, "associations": self.active_associations()}

    def _make_ae(self) -> AE:
        ae = AE(self._ae_title)
        ae.maximum_pdu_size = self._dicom.max_pdu_bytes
        ae.maximum_associations = self._dicom.max_associations
        ae.network_timeout = self._dicom.network_timeout_s
        ae.dimse_timeout = self._dicom.network_timeout_s
        ae.acse_timeout = 30
        # A modality configured with another gateway's AE title should hear so, not get data in.
        ae.require_called_aet = True
        ae.require_calling_aet = sorted({peer.ae_title for peer in self._dicom.peers})
        for abstract_syntax, transfer_syntaxes in self._contexts:
            # Accept the roles a requestor proposes: a C-GET requestor asks to be the storage
            # SCP on the same association, so that the appliance can send it the images.
            ae.add_supported_context(
                abstract_syntax, list(transfer_syntaxes), scu_role=True, scp_role=True
            )
        return ae

    def _bind(self) -> _AssociationServer:
        server = cast(
            _AssociationServer,
            self._make_ae().make_server(
                self._address,
                evt_handlers=list(self._handlers),
                server_class=_AssociationServer,
            ),
        )
        server.allowed_addresses = frozenset(peer.address for peer in self._dicom.peers)
        server.service_name = self.name
        return server

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        server = await trio.to_thread.run_sync(self._bind)
        acceptor = threading.Thread(
            target=server.serve_forever, name=f"{self.name}-acceptor", daemon=True
        )
        acceptor.start()
        self._server = server
        self.bound_port = server.server_address[1]
        log.info(
            "server.listening", server=self.name, ae_title=self._ae_title, port=self.bound_port
        )
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.move_on_after(self._shutdown_timeout + 1, shield=True):
                await trio.to_thread.run_sync(self._stop, server, abandon_on_cancel=True)
            self._server = None

    def _stop(self, server: _AssociationServer) -> None:
        # Phase 1: stop accepting. (Not server.shutdown(): that aborts in-flight associations.)
        socketserver.BaseServer.shutdown(server)
        server.server_close()
        # Phase 2: let in-flight associations finish within the bound, then abort the rest.
        deadline = time.monotonic() + self._shutdown_timeout
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            assoc.abort()
        log.info("server.stopped", server=self.name, aborted_associations=len(remaining))
