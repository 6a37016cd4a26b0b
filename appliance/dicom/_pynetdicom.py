"""pynetdicom's process-wide switches and the internals we rely on, in this one place.

pynetdicom keeps its behaviour in module globals (``pynetdicom._config``); setting them from many
modules makes the appliance's behaviour depend on import order. Everything is set here, once,
and the two private attributes the storage SCP needs are read here too (pynetdicom is pinned to
3.0.x in pyproject.toml for this reason; tests/test_storage.py would catch a change).
"""

from __future__ import annotations

import socket
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import _config, acse, dimse_messages, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.service_class import QueryRetrieveServiceClass
from pynetdicom.transport import AssociationSocket

from appliance.dicom import syntaxes
from appliance.dicom.statuses import PENDING
from appliance.log import get_logger
from appliance.storage.space import DiskFloor
from appliance.storage.spool import SpoolFile
from appliance.storage.structure import check_structure, has_odd_lengths

log = get_logger("qr-scp")

#: Spool file names start with this; recovery deletes any such file left by a crash.
SPOOL_PREFIX = "rx-"


def configure(spool_dir: Path, floor: DiskFloor | None = None) -> None:
    """Stream each C-STORE dataset into a SpoolFile in `spool_dir` as it arrives.

    pynetdicom would create a NamedTemporaryFile in the system temp dir; we substitute a
    SpoolFile in the appliance's spool (same filesystem as storage/, so the final link is
    atomic) that hashes, starts writeback and watches the disk floor while the dataset is
    still arriving.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    # A path handed to send_c_store (retrieval) is sent from the file in chunks, as stored;
    # otherwise pynetdicom reads it whole and re-encodes it (1.3 GB for a 409 MB object, and
    # group length elements dropped).
    _config.STORE_SEND_CHUNKED_DATASET = True
    # pynetdicom's standard event logging narrates every PDU and dumps identifiers (patient
    # data); the appliance logs its own one-line events instead.
    _config.LOG_HANDLER_LEVEL = "none"
    # Otherwise every C-FIND identifier is decoded (and answers pretty-printed) just for logging.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False

    def spool_file(*, delete: bool, mode: str, suffix: str) -> SpoolFile:
        return SpoolFile(spool_dir, SPOOL_PREFIX, suffix, floor)

    dimse_messages.NamedTemporaryFile = spool_file  # type: ignore[attr-defined,assignment]
    if not getattr(Association.send_c_store, "sends_stored_files", False):
        Association.send_c_store = _send_c_store  # type: ignore[method-assign]
        Association.release = _release  # type: ignore[method-assign]
    if not getattr(AssociationSocket._create_socket, "no_delay", False):
        AssociationSocket._create_socket = _create_socket  # type: ignore[method-assign]
    if acse.negotiate_as_acceptor is not _negotiate_as_acceptor:  # type: ignore[attr-defined]
        acse.negotiate_as_acceptor = _negotiate_as_acceptor  # type: ignore[attr-defined]
    if ACSE._negotiate_as_acceptor is not _judged_negotiation:
        ACSE._negotiate_as_acceptor = _judged_negotiation  # type: ignore[method-assign]
    if not getattr(QueryRetrieveServiceClass._move_scp, "checks_first", False):
        QueryRetrieveServiceClass._move_scp = _move_scp  # type: ignore[method-assign]


_move_scp_original = QueryRetrieveServiceClass._move_scp


def _move_scp(self: QueryRetrieveServiceClass, req: C_MOVE, context: PresentationContext) -> None:
    """C-MOVE, checked before pynetdicom opens the sub-association.

    pynetdicom associates with the destination as soon as the handler has named it and said
    how many instances follow, before it looks at any status: an identifier the handler
    refuses got 0xC515 with no comment, and an unreachable destination the same 0xA801 as an
    unknown one. The EVT_C_MOVE handler's owner may offer ``check_move(assoc, request,
    identifier)``, returning a status dataset to answer at once (nothing is opened) or None.
    """
    handler, _args = self.assoc.get_handlers(evt.EVT_C_MOVE) or (None, None)
    check = getattr(getattr(handler, "__self__", None), "check_move", None)
    if check is not None:
        syntax = context.transfer_syntax[0]
        identifier_stream = cast(BytesIO, req.Identifier)
        try:
            identifier = decode(
                identifier_stream,
                syntax.is_implicit_VR,
                syntax.is_little_endian,
                syntax.is_deflated,
            )
        except Exception:
            identifier = None  # pynetdicom answers an undecodable identifier itself
        finally:
            identifier_stream.seek(0)
        refusal = check(self.assoc, req, identifier) if identifier is not None else None
        if refusal is not None:
            rsp = C_MOVE()
            rsp.MessageIDBeingRespondedTo = req.MessageID
            rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
            self.dimse.send_msg(self.validate_status(refusal, rsp), cast(int, context.context_id))
            return
    _move_scp_original(self, req, context)


_move_scp.checks_first = True  # type: ignore[attr-defined]


_create_socket_original = AssociationSocket._create_socket


def _create_socket(self: AssociationSocket, address: Any) -> socket.socket:
    """Outgoing associations (C-MOVE sub-operations, commitment reports) without Nagle, as the
    servers' accepted sockets: each DIMSE message ends in a small write that would otherwise
    wait for the peer's delayed ACK."""
    sock = _create_socket_original(self, address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


_create_socket.no_delay = True  # type: ignore[attr-defined]


_send_c_store_original = Association.send_c_store


def _send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    """A retrieve's sub-operation. On a C-MOVE sub-association (the appliance the requestor)
    whose destination dropped it, the remaining instances go on a new association (once):
    otherwise each would wait out the DIMSE timeout on the dead one and fail in turn."""
    if not isinstance(dataset, StoredFile):
        return _send_c_store_original(self, dataset, *args, **kwargs)
    assoc = _live(self) if self.is_requestor else self
    try:
        payload = dataset.for_association(assoc)
    except Exception as exc:  # this sub-operation fails; pynetdicom goes on to the next
        log.warning(
            "qr.instance_not_sent",
            phase="transfer-syntax" if isinstance(exc, NoSendableSyntax) else "encode",
            sop_instance_uid=str(dataset.SOPInstanceUID),
            error=str(exc)[:300],
        )
        raise
    status = _send_c_store_original(assoc, payload, *args, **kwargs)
    if "Status" not in status and assoc.is_requestor:  # no answer: the destination is gone
        assoc._appliance_dead = True  # type: ignore[attr-defined]
        log.warning(
            "qr.destination_dropped",
            phase="sub-operation",
            destination=str(assoc.acceptor.ae_title),
            sop_instance_uid=str(dataset.SOPInstanceUID),
        )
    return status


def _live(assoc: Association) -> Association:
    """The association to send on: `assoc`, or the one that replaced it when it died."""
    replacement: Association | None = getattr(assoc, "_appliance_replacement", None)
    current = replacement or assoc
    if current.is_established and not getattr(current, "_appliance_dead", False):
        return current
    if replacement is not None:  # one replacement per sub-association, then give up
        raise ConnectionError(f"{assoc.acceptor.ae_title} dropped the association again")
    fresh = assoc.ae.associate(
        assoc.acceptor.address,
        assoc.acceptor.port,
        contexts=assoc.requestor.requested_contexts,
        ae_title=assoc.acceptor.ae_title,
    )
    assoc._appliance_replacement = fresh  # type: ignore[attr-defined]
    if not fresh.is_established:
        raise ConnectionError(f"cannot associate with {assoc.acceptor.ae_title} again")
    log.info("qr.destination_reassociated", destination=str(assoc.acceptor.ae_title))
    return fresh


_release_original = Association.release


def _release(self: Association) -> None:
    """Releasing a C-MOVE sub-association releases what replaced it too."""
    replacement: Association | None = getattr(self, "_appliance_replacement", None)
    if replacement is not None and replacement.is_established:
        replacement.release()
    _release_original(self)


_send_c_store.sends_stored_files = True  # type: ignore[attr-defined]


#: Bytes per word of the values pydicom keeps as read (PS3.5 7.3: swapped per word in Big Endian).
WORD_BYTES = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_words(dataset: Dataset) -> None:
    """Big Endian (stored before it was refused) to Little Endian: pydicom re-encodes every
    value it decoded (US, UL, FL ...) but keeps OW/OF/OL/OD/OV bytes as they were read (Pixel
    Data, Overlay Data, LUT Data, Float Pixel Data), which would arrive byte-swapped."""
    for element in dataset.iterall():
        size = WORD_BYTES.get(str(element.VR))
        if size and isinstance(element.value, bytes) and len(element.value) % size == 0:
            words = np.frombuffer(element.value, dtype=f">u{size}")
            element.value = words.astype(f"<u{size}").tobytes()


def _has_odd_lengths(path: Path) -> bool:
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        return has_odd_lengths(header) or check_structure(path, header).odd_length
    except Exception:  # unreadable here: the send itself will say so
        return False


def _in_syntax(path: Path, target: str, odd_lengths: bool) -> Dataset:
    """The stored file as a dataset in `target`: decoded, transcoded losslessly, Big Endian
    made Little, odd lengths padded (pydicom pads every value it converted)."""
    dataset = pydicom.dcmread(path)
    if odd_lengths:
        # pydicom writes a value it never converted as it read it, odd length and all.
        for _element in dataset.iterall():
            pass
    current = UID(dataset.file_meta.TransferSyntaxUID)
    if target != current:
        if not current.is_little_endian:
            _swap_words(dataset)
        if current.is_encapsulated:
            dataset.decompress(generate_instance_uid=False)
        if UID(target).is_encapsulated:
            dataset.compress(target, generate_instance_uid=False)
        else:
            dataset.file_meta.TransferSyntaxUID = UID(target)
    return dataset


class NoSendableSyntax(Exception):
    """The peer accepted no transfer syntax the appliance can produce for this instance."""


class StoredFile(Dataset):
    """A stored instance for a C-GET or C-MOVE handler to yield in place of a decoded dataset.

    pynetdicom's retrieve service classes hand what the handler yields to
    Association.send_c_store. configure() wraps send_c_store so that a StoredFile becomes its
    path when the peer accepted the stored transfer syntax (pynetdicom then sends the file's
    dataset bytes as they are, in chunks: flat memory, byte-identical, group lengths
    included). Otherwise it becomes a dataset in a syntax the peer accepted and the appliance
    can produce (appliance.dicom.syntaxes.sendable): decoded to uncompressed, or transcoded
    losslessly; and a stored object with odd-length elements is re-encoded (padded) on the way
    out, its stored original untouched.
    """

    def __init__(
        self,
        path: Path,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        *,
        odd_lengths: bool | None = False,
    ) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        object.__setattr__(self, "_stored", (path, transfer_syntax_uid, odd_lengths))

    def for_association(self, assoc: Association) -> Path | Dataset:
        path: Path
        stored: str
        odd_lengths: bool | None
        path, stored, odd_lengths = object.__getattribute__(self, "_stored")
        if odd_lengths is None:  # stored before the index recorded it: look
            odd_lengths = _has_odd_lengths(path)
        sop_class = str(self.SOPClassUID)
        offered = [
            str(cx.transfer_syntax[0])
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == sop_class and cx.as_scu
        ]
        if stored in offered and not odd_lengths:
            return path
        candidates = [stored] if stored in offered else []
        candidates += [ts for ts in syntaxes.sendable(sop_class) if ts in offered]
        if not candidates:
            raise NoSendableSyntax(
                f"{assoc.requestor.ae_title if assoc.is_acceptor else assoc.acceptor.ae_title}"
                f" accepted none of the transfer syntaxes the appliance can send for"
                f" {sop_class} (stored as {stored}): {', '.join(offered) or 'no context'}"
            )
        failures = []
        for target in candidates:  # an encoder may refuse this image (1-bit, 32-bit, YBR_422)
            try:
                return _in_syntax(path, target, odd_lengths)
            except Exception as exc:
                failures.append(f"{target}: {type(exc).__name__}: {exc}"[:200])
        raise NoSendableSyntax("; ".join(failures))

    @staticmethod
    def contexts_for(pairs: set[tuple[str, str]]) -> list[PresentationContext]:
        """What a C-MOVE sub-association proposes: each stored transfer syntax as it is, and
        each SOP class uncompressed, up to the 128 contexts an association can carry."""
        contexts = []
        for sop_class, transfer_syntax in sorted(pairs):
            contexts.append(build_context(sop_class, transfer_syntax))
        for sop_class in sorted({sop_class for sop_class, _ in pairs}):
            contexts.append(build_context(sop_class, list(syntaxes.UNCOMPRESSED)))
        return contexts[:128]


_acse_negotiate_original = ACSE._negotiate_as_acceptor


def _judged_negotiation(self: ACSE) -> None:
    """An association judged before pynetdicom negotiates it: the listener's ``judge`` (see
    appliance.dicom.server) answers the contexts this pair may be given, or None to refuse it
    with A-ASSOCIATE-RJ (rejected permanent, service user, calling AE title not recognised)."""
    judge = getattr(getattr(self.assoc, "_server", None), "judge", None)
    if judge is not None:
        try:
            contexts = judge(self.assoc)
        except Exception:  # fail closed: an association nobody could judge is refused
            log.exception("association.judge_failed", phase="peer")
            contexts = None
        if contexts is None:
            self.requestor.ae_title = self.requestor.primitive.calling_ae_title  # type: ignore[union-attr]
            self.send_reject(0x01, 0x01, 0x03)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        self.acceptor.supported_contexts = contexts
    _acse_negotiate_original(self)


_negotiate_original = acse.negotiate_as_acceptor  # type: ignore[attr-defined]


def _negotiate_as_acceptor(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: Any = None,
) -> tuple[list[PresentationContext], list[Any]]:
    """pynetdicom's negotiation, then the appliance's policy on what it accepted.

    - A context on which the appliance may send (a C-GET requestor's role-reversed storage
      contexts, whether or not it also keeps its own SCU role) takes the requestor's first
      proposed syntax the appliance can always produce (appliance.dicom.syntaxes.sendable),
      or is rejected: pynetdicom would take the receive list's compressed-first order and
      accept what it then cannot send.
    - A lossy context is rejected when a lossless one of the same class is accepted for
      receiving: "lossy only when nothing else is proposed" holds across contexts too.
    - A context on which the appliance would receive is rejected (abstract syntax not
      supported) when the association may not store: its supported context's scu_role is off
      (appliance.dicom.server narrows it for a peer that may retrieve but not store).
    """
    result, reply_roles = _negotiate_original(rq_contexts, ac_contexts, roles)
    no_store = {str(cx.abstract_syntax) for cx in ac_contexts if cx.scu_role is False}
    for context in result:
        if context.result == 0x00 and context.as_scp and str(context.abstract_syntax) in no_store:
            context.result = 0x03
    proposed = {cx.context_id: cx.transfer_syntax for cx in rq_contexts}
    for context in result:
        if context.result != 0x00 or not context.as_scu:
            continue
        choices = syntaxes.sendable(str(context.abstract_syntax))
        choice = next((ts for ts in proposed[context.context_id] if ts in choices), None)
        if choice is None:
            context.result = 0x04  # transfer syntaxes not supported
        else:
            context.transfer_syntax = [UID(choice)]
    receiving = [cx for cx in result if cx.result == 0x00 and cx.as_scp]
    lossless = {
        cx.abstract_syntax for cx in receiving if not syntaxes.is_lossy(cx.transfer_syntax[0])
    }
    for context in receiving:
        if syntaxes.is_lossy(context.transfer_syntax[0]) and context.abstract_syntax in lossless:
            context.result = 0x04
    return result, reply_roles


def received_spool_file(event: evt.Event) -> SpoolFile:
    """The SpoolFile holding an EVT_C_STORE's dataset."""
    spool_file: object = event.request._dataset_file
    if not isinstance(spool_file, SpoolFile):
        raise RuntimeError("C-STORE dataset was not received into a SpoolFile")
    return spool_file


class PendingFindWriter:
    """Writes C-FIND Pending responses straight onto an association's socket.

    pynetdicom builds, encodes and queues every response through its DUL thread, ~0.4 ms each;
    a worklist answer of 100 items spent most of its time there. While the association's own
    thread is inside the C-FIND handler nothing else writes to the socket (the DUL thread only
    sends what that thread queues), so the handler can send pre-encoded P-DATA-TF PDUs itself
    through pynetdicom's socket wrapper and yield only the final status. A query uses this
    path for all its answers or for none, so the two writers never interleave.
    """

    def __init__(self, event: evt.Event) -> None:
        assoc = event.assoc
        if assoc.dul.socket is None:
            raise RuntimeError("the association has no socket")
        self._socket = assoc.dul.socket
        self._context_id = event.context.context_id
        # The peer's largest PDU; 0 means no limit. Counted after the 6-byte PDU header.
        self._max_pdu = assoc.requestor.maximum_length or 0
        command = Dataset()
        command.AffectedSOPClassUID = event.request.AffectedSOPClassUID
        command.CommandField = 0x8020  # C-FIND-RSP
        command.MessageIDBeingRespondedTo = event.request.MessageID
        command.CommandDataSetType = 0x0001  # an identifier follows
        command.Status = PENDING
        body = encode(command, True, True)  # command sets are always implicit VR LE
        if body is None:
            raise RuntimeError("cannot encode the C-FIND response command")
        group_length = b"\x00\x00\x00\x00\x04\x00\x00\x00" + len(body).to_bytes(4, "little")
        self._command_pdv = self._pdv(group_length + body, 0x03)  # command, last fragment

    @staticmethod
    def supports(transfer_syntax: str) -> bool:
        return transfer_syntax in syntaxes.UNCOMPRESSED

    def _pdv(self, data: bytes, control: int) -> bytes:
        return (len(data) + 2).to_bytes(4, "big") + bytes((self._context_id, control)) + data

    @staticmethod
    def _pdu(pdvs: bytes) -> bytes:
        return b"\x04\x00" + len(pdvs).to_bytes(4, "big") + pdvs

    def send(self, identifier: bytes) -> None:
        # 6 bytes of PDV item header per fragment; the command goes in the first PDU.
        room = (self._max_pdu or (1 << 31)) - 6
        if len(self._command_pdv) + 6 + len(identifier) <= room + 6:
            self._socket.send(self._pdu(self._command_pdv + self._pdv(identifier, 0x02)))
            return
        self._socket.send(self._pdu(self._command_pdv))
        for start in range(0, len(identifier), room):
            last = start + room >= len(identifier)
            fragment = self._pdv(identifier[start : start + room], 0x02 if last else 0x00)
            self._socket.send(self._pdu(fragment))
