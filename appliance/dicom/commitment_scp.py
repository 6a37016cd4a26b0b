"""Storage Commitment Push Model SCP: a modality asks whether its images are safe to delete.

N-ACTION (Request Storage Commitment) is answered at once; each referenced instance is then
checked (indexed as STORED, same SOP class, and the file's SHA-256 still the one recorded at
storage) and the result goes back as an N-EVENT-REPORT on a new association to the requestor's
configured destination ([[dicom.destinations]], by calling AE title; a requestor without one is
refused at N-ACTION time, so it knows at once). Event type 1 when all are committed, 2 when any
failed, with a Failure Reason per failed reference (PS3.4 J.3.3).

Not on the same association: pynetdicom fires EVT_DIMSE_SENT before the N-ACTION response is
queued and its acceptor reactor competes for the report's response, so a report there could
overtake the response or lose its answer. Units are configured with a commitment port anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_primitives import N_ACTION

from appliance.config import DestinationConfig
from appliance.dicom.server import Handler, status
from appliance.log import get_logger
from appliance.storage.index import IndexReader
from appliance.storage.layout import StorageLayout, file_sha256

log = get_logger("commitment-scp")

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
COMMITMENT_CONTEXTS = [(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])]

# Failure Reasons (PS3.3 C.14.1.1) and N-ACTION statuses (PS3.7 C).
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION = 0x0123
INVALID_ARGUMENT = 0x0115


class StorageCommitmentSCP:
    def __init__(
        self,
        layout: StorageLayout,
        ae_title: str,
        destinations: tuple[DestinationConfig, ...],
        on_committed: Callable[[list[str]], None] = lambda uids: None,
    ) -> None:
        self._layout = layout
        self._index = IndexReader(layout)
        self._ae_title = ae_title
        self._destinations = {d.ae_title: d for d in destinations}
        self._on_committed = on_committed

    def handlers(self) -> list[Handler]:
        return [(evt.EVT_N_ACTION, self.handle_action)]

    def handle_action(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        request: N_ACTION = event.request
        calling_ae = event.assoc.requestor.ae_title
        if request.RequestedSOPClassUID != STORAGE_COMMITMENT or request.ActionTypeID != 1:
            return status(NO_SUCH_ACTION, "Only Request Storage Commitment (1)"), None
        try:
            info = event.action_information
            transaction = str(info.get("TransactionUID", "") or "")
            references = [
                (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                for item in info.get("ReferencedSOPSequence", [])
            ]
        except Exception as exc:
            log.warning("commitment.rejected", phase="decode", calling_ae=calling_ae)
            return status(INVALID_ARGUMENT, f"Cannot read the request: {exc}"), None
        if not transaction or not references:
            log.warning("commitment.rejected", phase="validate", calling_ae=calling_ae)
            return status(
                INVALID_ARGUMENT, "Transaction UID and Referenced SOP Sequence are required"
            ), None
        destination = self._destinations.get(calling_ae)
        if destination is None:
            log.warning("commitment.rejected", phase="destination", calling_ae=calling_ae)
            return status(
                PROCESSING_FAILURE, f"No report destination configured for {calling_ae}"
            ), None
        log.info(
            "commitment.requested",
            calling_ae=calling_ae,
            transaction_uid=transaction,
            instances=len(references),
        )
        threading.Thread(
            target=self._report,
            args=(destination, calling_ae, transaction, references),
            name="commitment-report",
            daemon=True,
        ).start()
        return 0x0000, None

    def verify(self, sop_class: str, sop_instance: str) -> int | None:
        """None when the instance is committed, else its Failure Reason."""
        row = self._index.instance(sop_instance)
        if row is None or row["status"] != "STORED":
            return NO_SUCH_OBJECT_INSTANCE
        if row["sop_class_uid"] != sop_class:
            return CLASS_INSTANCE_CONFLICT
        try:
            intact = file_sha256(self._index.path(row)) == row["storage_hash"]
        except OSError:
            intact = False
        if not intact:
            log.error("commitment.instance_damaged", phase="verify", sop_instance_uid=sop_instance)
            return PROCESSING_FAILURE
        return None

    def result(self, transaction: str, references: list[tuple[str, str]]) -> Dataset:
        report = Dataset()
        report.TransactionUID = transaction
        committed, failed = [], []
        for sop_class, sop_instance in references:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            reason = self.verify(sop_class, sop_instance)
            if reason is None:
                committed.append(item)
            else:
                item.FailureReason = reason
                failed.append(item)
        if committed:
            report.ReferencedSOPSequence = committed
        if failed:
            report.FailedSOPSequence = failed
        return report

    def _report(
        self,
        destination: DestinationConfig,
        calling_ae: str,
        transaction: str,
        references: list[tuple[str, str]],
    ) -> None:
        try:
            report = self.result(transaction, references)
            event_type = 2 if "FailedSOPSequence" in report else 1
            # Recorded before the modality hears it: retention may rely on what it was told.
            self._on_committed(
                [str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])]
            )
            self._send(destination, report, event_type)
        except Exception as exc:
            log.exception(
                "commitment.report_failed",
                phase="report",
                calling_ae=calling_ae,
                transaction_uid=transaction,
                error=str(exc),
            )
            return
        log.info(
            "commitment.reported",
            calling_ae=calling_ae,
            transaction_uid=transaction,
            committed=len(report.get("ReferencedSOPSequence", [])),
            failed=len(report.get("FailedSOPSequence", [])),
        )

    def _send(self, destination: DestinationConfig, report: Dataset, event_type: int) -> None:
        ae = AE(self._ae_title)
        ae.add_requested_context(STORAGE_COMMITMENT)
        # On its own association the appliance is the requestor but acts as the SCP.
        role = build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
        assoc = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title, ext_neg=[role]
        )
        if not assoc.is_established:
            raise ConnectionError(f"cannot associate with {destination.ae_title}")
        try:
            rsp, _ = assoc.send_n_event_report(
                report, event_type, STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE
            )
        finally:
            assoc.release()
        if rsp is None or rsp.get("Status") != 0x0000:
            raise ConnectionError(f"{destination.ae_title} did not accept the report")
