"""C-STORE handler: the received dataset is already in a spool file (chunked receive).

Success (0x0000) is returned only after the file is fsynced, linked into its hash path, the
directory fsynced and the index row committed. Every failure answers a DICOM status with an
Error Comment naming its phase (0xA700 for space: the floor, ENOSPC, a full database; 0x0110
for I/O errors); the spool file is then deleted, so nothing partial remains, and the
association stays usable.
"""

from __future__ import annotations

import sqlite3
import weakref
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset
from pynetdicom import AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from appliance import audit
from appliance.db import is_full
from appliance.dicom import statuses
from appliance.dicom._pynetdicom import received_spool_file
from appliance.dicom.door import ApplianceStopping, TrioDoor
from appliance.dicom.server import Contexts, Handler
from appliance.dicom.statuses import status
from appliance.dicom.syntaxes import accepted_for
from appliance.log import get_logger
from appliance.metrics import METRICS
from appliance.storage.space import DiskFloor
from appliance.storage.spool import NO_SPACE, Shortfall
from appliance.storage.store import (
    BeingDeleted,
    InstanceStore,
    InvalidInstance,
    Outcome,
    Problem,
    describe,
)

log = get_logger("storage-scp")

#: What each reason a dataset cannot be stored is answered with (PS3.4 B.2.3).
PROBLEM_STATUS = {
    Problem.MALFORMED: statuses.CANNOT_UNDERSTAND,
    Problem.INCONSISTENT: statuses.DATASET_MISMATCH,
}

STORAGE_CONTEXTS: Contexts = [
    (str(cx.abstract_syntax), accepted_for(str(cx.abstract_syntax)))
    for cx in AllStoragePresentationContexts
]


class StorageSCP:
    def __init__(self, store: InstanceStore, door: TrioDoor, floor: DiskFloor) -> None:
        self._store = store
        self._door = door
        self._floor = floor
        #: What each association has stored, audited by study when it ends.
        self._received: weakref.WeakKeyDictionary[Association, audit.Transfers] = (
            weakref.WeakKeyDictionary()
        )

    def handlers(self) -> list[Handler]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_RELEASED, self._association_ended),
            (evt.EVT_ABORTED, self._association_ended),
        ]

    def _association_ended(self, event: evt.Event) -> None:
        received = self._received.pop(event.assoc, None)
        if not received:
            return
        requestor, acceptor = event.assoc.requestor, event.assoc.acceptor
        audit.record(
            audit.instances_transferred(
                source=audit.peer_participant(requestor.ae_title, requestor.address),
                destination=audit.appliance_participant(acceptor.ae_title),
                studies=received.studies(),
                received=True,
                description="" if event.event is evt.EVT_RELEASED else "association aborted",
            )
        )

    def handle_store(self, event: evt.Event) -> int | Dataset:
        result = self._store_one(event)
        METRICS.inc("c_store_total", status=f"0x{statuses.code_of(result):04X}")
        return result

    def _no_space(
        self, phase: str, context: dict[str, Any], comment: str = "", **fields: Any
    ) -> Dataset:
        self._floor.refused()
        log.warning("instance.refused", phase=phase, **fields, **context)
        floor_mb = self._floor.floor_bytes // (1024 * 1024)
        return status(
            statuses.OUT_OF_RESOURCES, comment or f"Out of disk space (floor {floor_mb} MB)"
        )

    def _store_one(self, event: evt.Event) -> int | Dataset:
        spool = received_spool_file(event)
        spooled = Path(event.dataset_path)
        requestor = event.assoc.requestor
        request = cast(C_STORE, event.request)
        context = {
            "sop_instance_uid": request.AffectedSOPInstanceUID,
            "calling_ae": requestor.ae_title,
            "address": requestor.address,
        }
        if spool.failure is not None:  # the dataset was not kept while it arrived
            failure = spool.failure
            if failure.kind is Shortfall.SPACE:
                return self._no_space(failure.phase, context, error=failure.reason)
            log.error("instance.failed", phase=failure.phase, error=failure.reason, **context)
            return status(
                statuses.PROCESSING_FAILURE, f"I/O error ({failure.phase}): {failure.reason}"
            )
        phase = "disk-floor"
        try:
            space = self._floor.measure()
            if not space.ok:
                return self._no_space(phase, context, free_bytes=space.free_bytes)
            phase = "spool-fsync"
            storage_hash, size = spool.sync()
            phase = "validate"
            instance = describe(
                spooled,
                storage_hash=storage_hash,
                file_size=size,
                layout=self._store.layout,
                expected_sop_instance_uid=request.AffectedSOPInstanceUID,
                expected_sop_class_uid=request.AffectedSOPClassUID,
                source_aet=requestor.ae_title,
                source_address=requestor.address,
            )
            phase = "commit"
            outcome = self._door.run(self._store.commit, spooled, instance)
        except InvalidInstance as exc:
            log.warning("instance.rejected", phase="validate", reason=exc.reason, **context)
            return status(PROBLEM_STATUS[exc.problem], exc.reason)
        except BeingDeleted:
            log.warning("instance.refused", phase="being-deleted", **context)
            return status(statuses.OUT_OF_RESOURCES, "Instance being deleted here; send again")
        except ApplianceStopping:
            log.warning("instance.refused", phase="shutdown", **context)
            return status(statuses.OUT_OF_RESOURCES, "Gateway is restarting; send again")
        except OSError as exc:
            if exc.errno in NO_SPACE:
                return self._no_space(phase, context, error=exc.strerror)
            log.error("instance.failed", phase=phase, error=f"{exc.strerror or exc}", **context)
            return status(statuses.PROCESSING_FAILURE, f"I/O error ({phase}): {exc.strerror}")
        except sqlite3.Error as exc:
            if is_full(exc):
                comment = "Index database full; send again later"
                return self._no_space("index-write", context, comment, error=str(exc))
            log.error("instance.failed", phase="index-write", error=str(exc), **context)
            return status(statuses.PROCESSING_FAILURE, f"Index write failed: {exc}")
        except Exception:
            log.exception("instance.failed", phase=phase, **context)
            return status(statuses.PROCESSING_FAILURE, f"Internal error ({phase})")
        log.info(
            "instance.stored",
            outcome=outcome.value,
            bytes=size,
            transfer_syntax=instance.transfer_syntax_uid,
            study_instance_uid=instance.study_instance_uid,
            **context,
        )
        METRICS.inc("c_store_bytes_total", size)
        self._received.setdefault(event.assoc, audit.Transfers()).add(
            instance.study_instance_uid,
            instance.patient_id or "",
            instance.accession_number or "",
            instance.sop_class_uid,
            instance.sop_instance_uid,
        )
        if outcome is Outcome.CONFLICT:
            return status(
                statuses.DUPLICATE_CONFLICT, "UID already stored with other content; kept aside"
            )
        return statuses.SUCCESS
