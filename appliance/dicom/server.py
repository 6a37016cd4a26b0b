"""A pynetdicom server as a supervised Trio service.

pynetdicom accepts connections in one thread and runs each association in its own thread. This
service binds the port, serves until cancelled, then stops in two phases: stop accepting, give
in-flight associations up to the shutdown bound to finish, abort the rest.

Who may associate and what each may ask for is the PeerPolicy's (appliance.dicom.peers): the
acceptor thread closes connections from unknown addresses; a TLS handshake runs in the
association's own thread (a slow client holds up nobody else); the association is judged on
its pair of AE title and address when its request arrives, and offered only the contexts its
permissions cover.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import trio
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from appliance import audit
from appliance.config import DicomConfig
from appliance.dicom.peers import Grant, PeerPolicy, Refusal
from appliance.dicom.tls import ServerTls, TlsError
from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.supervisor import Criticality

log = get_logger("dicom")

Handler = tuple[evt.EventType, Callable[..., Any]]
#: Presentation contexts a server accepts: (abstract syntax, transfer syntaxes).
Contexts = list[tuple[str, Sequence[str]]]
#: The permission each group of contexts needs (None: any association, e.g. Verification).
Services = Sequence[tuple[str | None, Contexts]]
#: A TLS client gets this long to finish its handshake.
HANDSHAKE_TIMEOUT_S = 10.0

#: What each live association was granted (its peer, its permissions, its move destinations).
GRANTS: weakref.WeakKeyDictionary[Association, Grant] = weakref.WeakKeyDictionary()


def grant_of(assoc: Association) -> Grant | None:
    return GRANTS.get(assoc)


def security_event(server: str, refusal: Refusal, **where: Any) -> None:
    """A refused connection or association: logged, counted and audited."""
    METRICS.inc("association_refusals_total", server=server, phase=refusal.phase)
    log.warning(
        "security.association_refused",
        server=server,
        phase=refusal.phase,
        reason=refusal.reason,
        **where,
    )
    audit.record(
        audit.security_alert(
            refusal.reason,
            calling_ae=where.get("calling_ae", ""),
            address=where.get("address", ""),
            called_ae=where.get("called_ae", ""),
            authentication=refusal.phase in ("tls", "certificate"),
        )
    )


class AuditedQuery:
    """A C-FIND's audit message (PS3.15 A.5.3.10): the query, who asked, whom it answered with."""

    def __init__(self, event: evt.Event) -> None:
        self._event = event
        self._patients: set[str] = set()
        self._outcome = audit.SUCCESS

    def answered(self, answer: object) -> None:
        patient_id = answer.get("PatientID") if isinstance(answer, Dataset) else None
        if patient_id:
            self._patients.add(str(patient_id))

    def saw(self, result: int | Dataset, answer: object) -> None:
        code = result if isinstance(result, int) else int(result.get("Status", 0))
        if code not in (0x0000, 0xFF00, 0xFF01):
            self._outcome = audit.MINOR_FAILURE
        self.answered(answer)

    def close(self) -> None:
        try:
            self._record()
        except Exception:  # the audit is a side-matter: the query's answers stand
            METRICS.inc("audit_failures_total")
            log.exception("audit.write_failed", phase="query")

    def _record(self) -> None:
        request, assoc = self._event.request, self._event.assoc
        stream = getattr(request, "Identifier", None)
        audit.record(
            audit.query(
                calling_ae=assoc.requestor.ae_title,
                address=assoc.requestor.address,
                called_ae=assoc.acceptor.ae_title,
                sop_class=str(getattr(request, "AffectedSOPClassUID", "") or ""),
                identifier=stream.getvalue() if stream is not None else b"",
                patients=self._patients,
                outcome=self._outcome,
            )
        )


def audited(
    find: Callable[[evt.Event, AuditedQuery], Iterator[tuple[int | Dataset, Dataset | None]]],
) -> Callable[[evt.Event], Iterator[tuple[int | Dataset, Dataset | None]]]:
    """A C-FIND handler whose every query is audited, however it ends."""

    def handle_find(event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        query = AuditedQuery(event)
        try:
            for result, answer in find(event, query):
                query.saw(result, answer)
                yield result, answer
        finally:
            query.close()

    return handle_find


class _AssociationServer(ThreadedAssociationServer):
    policy: PeerPolicy
    tls: ServerTls | None = None
    service_name = "dicom"
    #: Set by DicomServer: judges an association when its request arrives.
    judge: Callable[[Association], list[PresentationContext] | None]

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        # DIMSE responses are small writes; with Nagle on, each one waits for the peer's delayed
        # ACK (~40 ms per image or query).
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            try:
                context = self.tls.context()
            except TlsError as exc:  # a rotated certificate that cannot be used: keep the old
                log.error(
                    "tls.reload_failed", server=self.service_name, phase="tls", error=str(exc)
                )
                context = self.tls.context()
            # The handshake runs in the association's thread (process_request_thread).
            client = context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = client_address[0]
        if self.policy.address_known(address):
            return True
        refusal = Refusal("peer-address", f"{address} is not a configured peer's address")
        security_event(self.service_name, refusal, address=address)
        return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            timeout = request.gettimeout()
            try:
                request.settimeout(HANDSHAKE_TIMEOUT_S)
                request.do_handshake()
                request.settimeout(timeout)
            except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
                # Closed before a ClientHello: a port probe (the appliance's own health check).
                log.debug("tls.closed_before_handshake", server=self.service_name)
                self.shutdown_request(request)
                return
            except (OSError, ssl.SSLError) as exc:
                reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
                refusal = Refusal("tls", f"TLS handshake failed: {reason}")
                security_event(self.service_name, refusal, address=client_address[0])
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


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
        services: Services,
        handlers: Sequence[Handler],
        dicom: DicomConfig,
        shutdown_timeout: float,
        tls: bool = False,
    ) -> None:
        self.name = name
        self._ae_title = ae_title
        self._address = (dicom.host, port)
        self._services = services
        self._permission = {
            abstract_syntax: permission
            for permission, contexts in services
            for abstract_syntax, _ in contexts
        }
        self._tls = tls
        #: The listener's TLS context (its certificate's expiry is in status and metrics).
        self.server_tls: ServerTls | None = None
        self.policy: PeerPolicy | None = None
        if tls and dicom.tls.only:
            self.criticality = Criticality.ESSENTIAL
        elif tls:
            # Beside the plain port, a TLS listener that cannot start leaves the clinic working.
            self.criticality = Criticality.AUXILIARY
        self._handlers = [*_ASSOCIATION_EVENTS, *handlers]
        self._dicom = dicom
        self._shutdown_timeout = shutdown_timeout
        self._server: _AssociationServer | None = None
        #: The port actually bound (differs from the configured one when that is 0).
        self.bound_port: int | None = None

    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def statistics(self) -> dict[str, Any]:
        statistics: dict[str, Any] = {
            "port": self.bound_port,
            "associations": self.active_associations(),
        }
        if self.server_tls is not None:
            statistics["tls"] = {
                "certificate_not_after": self.server_tls.not_after.isoformat(),
                "days_left": round(self.server_tls.seconds_left() / 86400, 1),
            }
        return statistics

    def _make_ae(self) -> AE:
        ae = AE(self._ae_title)
        ae.maximum_pdu_size = self._dicom.max_pdu_bytes
        ae.maximum_associations = self._dicom.max_associations
        ae.network_timeout = self._dicom.network_timeout_s
        ae.dimse_timeout = self._dicom.network_timeout_s
        ae.acse_timeout = 30
        # A modality configured with another gateway's AE title should hear so, not get data in.
        ae.require_called_aet = True
        for _permission, contexts in self._services:
            for abstract_syntax, transfer_syntaxes in contexts:
                # Accept the roles a requestor proposes: a C-GET requestor asks to be the
                # storage SCP on the same association, so that the appliance can send it the
                # images. judge() narrows this per association.
                ae.add_supported_context(
                    abstract_syntax, list(transfer_syntaxes), scu_role=True, scp_role=True
                )
        return ae

    def judge(self, assoc: Association) -> list[PresentationContext] | None:
        """The contexts this association may be given, or None: refused (A-ASSOCIATE-RJ,
        calling AE title not recognised), logged, counted and audited."""
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling_ae = str(request.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        raw = assoc.dul.socket.socket if assoc.dul.socket else None
        over_tls = isinstance(raw, ssl.SSLSocket)
        certificate = raw.getpeercert(binary_form=True) if isinstance(raw, ssl.SSLSocket) else None
        where = {"calling_ae": calling_ae, "address": address, "called_ae": self._ae_title}
        assert self.policy is not None  # judged only once bound
        judged = self.policy.judge(calling_ae, address, tls=over_tls, certificate=certificate)
        if isinstance(judged, Refusal):
            security_event(self.name, judged, **where)
            return None
        GRANTS[assoc] = judged
        refused = sorted(
            {
                permission
                for cx in request.presentation_context_definition_list
                if not self._permitted(judged, str(cx.abstract_syntax))
                and (permission := self._permission[str(cx.abstract_syntax)])
            }
        )
        if refused:
            self._refuse_services(refused, judged, where)
        return [
            self._narrowed(cx, judged)
            for cx in assoc.acceptor.supported_contexts
            if self._permitted(judged, str(cx.abstract_syntax))
        ]

    def _permitted(self, grant: Grant, abstract_syntax: str) -> bool:
        """Whether the grant covers a context (storage also serves a C-GET's own stores)."""
        if abstract_syntax not in self._permission:
            return True  # not ours: negotiation rejects it as unsupported anyway
        permission = self._permission[abstract_syntax]
        if permission is None or permission in grant.permissions:
            return True
        return permission == "store" and "retrieve" in grant.permissions

    def _narrowed(self, context: PresentationContext, grant: Grant) -> PresentationContext:
        if self._permission.get(str(context.abstract_syntax)) == "store":
            # scu_role: the requestor may store to us; scp_role: we may store to it (C-GET).
            # appliance.dicom._pynetdicom rejects a receiving context whose scu_role is off.
            context.scu_role = "store" in grant.permissions
            context.scp_role = "retrieve" in grant.permissions
        return context

    def _refuse_services(self, services: list[str], grant: Grant, where: dict[str, str]) -> None:
        for service in services:
            METRICS.inc("context_refusals_total", server=self.name, service=service)
        log.warning(
            "security.service_refused",
            server=self.name,
            phase="permissions",
            services=",".join(services),
            **where,
        )
        audit.record(
            audit.security_alert(
                f"{where['calling_ae']} asked for {', '.join(services)} without permission",
                calling_ae=where["calling_ae"],
                address=where["address"],
                called_ae=where["called_ae"],
                restricted=True,
            )
        )

    def _bind(self) -> _AssociationServer:
        policy = PeerPolicy(self._dicom)
        server_tls = ServerTls(self._dicom.tls, policy.pinned_certificates()) if self._tls else None
        server = cast(
            _AssociationServer,
            self._make_ae().make_server(
                self._address,
                evt_handlers=list(self._handlers),
                server_class=_AssociationServer,
            ),
        )
        server.policy = policy
        self.policy = policy
        server.tls = server_tls
        server.judge = self.judge
        server.service_name = self.name
        self.server_tls = server_tls
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
            "server.listening",
            server=self.name,
            ae_title=self._ae_title,
            port=self.bound_port,
            tls=self._tls,
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
