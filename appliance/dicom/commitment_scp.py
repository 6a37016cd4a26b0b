"""Storage Commitment Push Model SCP: a modality asks whether its images are safe to delete.

N-ACTION (Request Storage Commitment) is answered at once and the request queued on a bounded
channel; the supervised `commitment-reports` service then checks each referenced instance
(indexed as STORED, same SOP class, and the file's SHA-256 still the one recorded at storage)
and the result goes back as an N-EVENT-REPORT on a new association to the requestor's
configured destination ([[dicom.destinations]], by calling AE title; a requestor without one is
refused at N-ACTION time, so it knows at once). Event type 1 when all are committed, 2 when any
failed, with a Failure Reason per failed reference (PS3.4 J.3.3).

Not on the same association: pynetdicom fires EVT_DIMSE_SENT before the N-ACTION response is
queued and its acceptor reactor competes for the report's response, so a report there could
overtake the response or lose its answer. Units are configured with a commitment port anyway.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import attrs
import trio
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.dimse_primitives import N_ACTION

from appliance.config import DestinationConfig, TlsConfig
from appliance.dicom.door import ApplianceStopping, TrioDoor
from appliance.dicom.server import Contexts, Handler
from appliance.dicom.statuses import (
    CLASS_INSTANCE_CONFLICT,
    INVALID_ARGUMENT_VALUE,
    NO_SUCH_ACTION,
    NO_SUCH_OBJECT_INSTANCE,
    PROCESSING_FAILURE,
    SUCCESS,
    status,
)
from appliance.dicom.tls import tls_args
from appliance.log import get_logger
from appliance.pipeline.workers import PixelWorkers
from appliance.storage.files import file_sha256
from appliance.storage.store import InstanceStore
from appliance.supervisor import Criticality

log = get_logger("commitment-scp")

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
COMMITMENT_CONTEXTS: Contexts = [
    (STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
]

#: Requests waiting for their report; a modality asking faster than reports go out waits.
QUEUED_REQUESTS = 16
#: Reports being verified and sent at once (one slow destination does not hold up the rest).
CONCURRENT_REPORTS = 4


@attrs.frozen(eq=False)  # each request is its own limiter borrower, even an identical resend
class CommitmentRequest:
    destination: DestinationConfig
    calling_ae: str
    transaction: str
    references: list[tuple[str, str]]


class StorageCommitmentSCP:
    """The N-ACTION handler (association threads) and the supervised service that reports."""

    name = "commitment-reports"
    criticality = Criticality.ESSENTIAL

    def __init__(
        self,
        store: InstanceStore,
        door: TrioDoor,
        ae_title: str,
        destinations: tuple[DestinationConfig, ...],
        workers: PixelWorkers,
        tls: TlsConfig | None = None,
    ) -> None:
        self._tls = tls or TlsConfig()
        self._workers = workers
        self._store = store
        self._index = store.reader
        self._door = door
        self._ae_title = ae_title
        self._destinations = {d.ae_title: d for d in destinations}
        self._requests, self._queued = trio.open_memory_channel[CommitmentRequest](QUEUED_REQUESTS)
        self.reported = 0

    def statistics(self) -> dict[str, int]:
        return {"queued": self._queued.statistics().current_buffer_used, "reported": self.reported}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(CONCURRENT_REPORTS)
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for request in self._queued:
                await limiter.acquire_on_behalf_of(request)
                nursery.start_soon(self._report, request, limiter)

    def handlers(self) -> list[Handler]:
        return [(evt.EVT_N_ACTION, self.handle_action)]

    def handle_action(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        request = cast(N_ACTION, event.request)
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
            return status(INVALID_ARGUMENT_VALUE, f"Cannot read the request: {exc}"), None
        if not transaction or not references:
            log.warning("commitment.rejected", phase="validate", calling_ae=calling_ae)
            return status(
                INVALID_ARGUMENT_VALUE, "Transaction UID and Referenced SOP Sequence are required"
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
        queued = CommitmentRequest(destination, calling_ae, transaction, references)
        try:
            self._door.run(self._requests.send, queued)
        except ApplianceStopping:
            return status(PROCESSING_FAILURE, "Gateway is restarting; ask again"), None
        return SUCCESS, None

    def verify(
        self, sop_class: str, sop_instance: str, proofs: dict[str, str | None]
    ) -> int | None:
        """None when the instance is committed, else its Failure Reason. Committed means
        indexed as STORED with that class, the file's SHA-256 still the one recorded, and its
        pixel data proved whole (native: at receive; encapsulated: every frame decoded, by the
        pipeline or, when it has not got there yet, just now: `proofs`)."""
        row = self._index.instance(sop_instance)
        if row is None or row["status"] != "STORED":
            return NO_SUCH_OBJECT_INSTANCE
        if row["sop_class_uid"] != sop_class:
            return CLASS_INSTANCE_CONFLICT
        path = self._index.path(row)
        try:
            intact = file_sha256(path) == row["storage_hash"]
        except OSError:
            intact = False
        if not intact:
            log.error("commitment.instance_damaged", phase="verify", sop_instance_uid=sop_instance)
            return PROCESSING_FAILURE
        pixels, error = row["pixels_state"], row["pixels_error"]
        if pixels is None:
            if sop_instance not in proofs:  # could not be checked this time (logged): ask again
                return PROCESSING_FAILURE
            error = proofs[sop_instance]
        if error is not None:
            log.error(
                "commitment.instance_unsound",
                phase="decode",
                sop_instance_uid=sop_instance,
                error=error[:300],
            )
            return PROCESSING_FAILURE
        return None

    def result(
        self, transaction: str, references: list[tuple[str, str]], proofs: dict[str, str | None]
    ) -> Dataset:
        report = Dataset()
        report.TransactionUID = transaction
        committed, failed = [], []
        for sop_class, sop_instance in references:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_instance
            reason = self.verify(sop_class, sop_instance, proofs)
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

    def _unproved(self, references: list[tuple[str, str]]) -> list[tuple[str, Path]]:
        """Stored instances whose pixel data nobody has proved whole yet."""
        found = []
        for _sop_class, sop_instance in references:
            row = self._index.instance(sop_instance)
            if row is not None and row["status"] == "STORED" and row["pixels_state"] is None:
                found.append((sop_instance, self._index.path(row)))
        return found

    async def _prove(self, references: list[tuple[str, str]]) -> dict[str, str | None]:
        """Proofs made now, in the pixel workers, for what the pipeline has not got to: why
        each instance's pixel data is broken, or None. An instance that could not be checked
        (memory, a lost worker) has no entry and is not committed this time."""
        proofs: dict[str, str | None] = {}
        for sop_instance, path in await trio.to_thread.run_sync(self._unproved, references):
            try:
                proofs[sop_instance] = await self._workers.prove(path)
            except Exception as exc:  # the pool's or the machine's trouble: not committed now
                log.error(
                    "commitment.instance_unchecked",
                    phase="decode",
                    sop_instance_uid=sop_instance,
                    error=str(exc)[:300],
                )
        return proofs

    async def _report(self, request: CommitmentRequest, limiter: trio.CapacityLimiter) -> None:
        try:
            proofs = await self._prove(request.references)
            if proofs:
                await self._store.write(self._store.index.pixels_checked, list(proofs.items()))
            report = await trio.to_thread.run_sync(
                self.result, request.transaction, request.references, proofs
            )
            event_type = 2 if "FailedSOPSequence" in report else 1
            # Recorded before the modality hears it: retention may rely on what it was told.
            await self._store.committed(
                [str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])]
            )
            await trio.to_thread.run_sync(self._send, request.destination, report, event_type)
        except Exception as exc:  # this report's failure, never the service's
            log.exception(
                "commitment.report_failed",
                phase="report",
                calling_ae=request.calling_ae,
                transaction_uid=request.transaction,
                error=str(exc),
            )
            return
        finally:
            limiter.release_on_behalf_of(request)
        self.reported += 1
        log.info(
            "commitment.reported",
            calling_ae=request.calling_ae,
            transaction_uid=request.transaction,
            committed=len(report.get("ReferencedSOPSequence", [])),
            failed=len(report.get("FailedSOPSequence", [])),
        )

    def _send(self, destination: DestinationConfig, report: Dataset, event_type: int) -> None:
        ae = AE(self._ae_title)
        ae.add_requested_context(STORAGE_COMMITMENT)
        # On its own association the appliance is the requestor but acts as the SCP.
        role = build_role(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            ext_neg=[role],
            tls_args=tls_args(self._tls, destination),
        )
        if not assoc.is_established:
            raise ConnectionError(f"cannot associate with {destination.ae_title}")
        try:
            rsp, _ = assoc.send_n_event_report(
                report, event_type, STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE
            )
        finally:
            assoc.release()
        if rsp is None or rsp.get("Status") != SUCCESS:
            raise ConnectionError(f"{destination.ae_title} did not accept the report")
