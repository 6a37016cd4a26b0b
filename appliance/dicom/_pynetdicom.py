"""pynetdicom's process-wide switches and the internals we rely on, in this one place.

pynetdicom keeps its behaviour in module globals (``pynetdicom._config``); setting them from many
modules makes the appliance's behaviour depend on import order. Everything is set here, once,
and the two private attributes the storage SCP needs are read here too (pynetdicom is pinned to
3.0.x in pyproject.toml for this reason; tests/test_storage.py would catch a change).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import encode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.transport import AssociationSocket

from appliance.dicom.statuses import PENDING
from appliance.storage.space import DiskFloor
from appliance.storage.spool import SpoolFile

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
    if not getattr(AssociationSocket._create_socket, "no_delay", False):
        AssociationSocket._create_socket = _create_socket  # type: ignore[method-assign]


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
    if isinstance(dataset, StoredFile):
        dataset = dataset.for_association(self)
    return _send_c_store_original(self, dataset, *args, **kwargs)


_send_c_store.sends_stored_files = True  # type: ignore[attr-defined]


class StoredFile(Dataset):
    """A stored instance for a C-GET or C-MOVE handler to yield in place of a decoded dataset.

    pynetdicom's retrieve service classes hand what the handler yields to
    Association.send_c_store, which accepts a file path and then sends the file's dataset bytes
    as they are, in chunks. configure() wraps send_c_store so that a StoredFile becomes its path
    when the peer accepted the stored transfer syntax, and a decoded dataset (pixel data
    decompressed, so an uncompressed context can carry it) only when it did not.
    """

    def __init__(
        self, path: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str
    ) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        object.__setattr__(self, "_stored", (path, transfer_syntax_uid))

    def for_association(self, assoc: Association) -> Path | Dataset:
        path: Path
        transfer_syntax: str
        path, transfer_syntax = object.__getattribute__(self, "_stored")
        try:
            assoc._get_valid_context(self.SOPClassUID, transfer_syntax, "scu")
            return path
        except ValueError:
            pass
        dataset = pydicom.dcmread(path)
        if dataset.file_meta.TransferSyntaxUID.is_compressed:
            dataset.decompress(generate_instance_uid=False)
        return dataset

    @staticmethod
    def contexts_for(pairs: set[tuple[str, str]]) -> list[PresentationContext]:
        """What a C-MOVE sub-association proposes: each stored transfer syntax as it is, and
        each SOP class uncompressed, up to the 128 contexts an association can carry."""
        contexts = []
        for sop_class, transfer_syntax in sorted(pairs):
            contexts.append(build_context(sop_class, transfer_syntax))
        for sop_class in sorted({sop_class for sop_class, _ in pairs}):
            contexts.append(
                build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
            )
        return contexts[:128]


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
        return transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

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
