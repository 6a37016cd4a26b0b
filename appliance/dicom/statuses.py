"""Every DICOM status the appliance answers, and the response datasets that carry them.

Domain errors (storage, worklist, MPPS) carry reasons, never codes; the SCP handlers map them
here. PS3.4 Annex B (storage), C (query/retrieve), F.7 (MPPS), J (storage commitment), K
(worklist) and PS3.7 Annex C (the general statuses).
"""

from __future__ import annotations

from pydicom import Dataset

SUCCESS = 0x0000
PENDING = 0xFF00
#: C-FIND pending when the identifier had optional keys the SCP does not support (PS3.4 C.4.1).
PENDING_WITH_UNSUPPORTED_KEYS = 0xFF01
CANCELLED = 0xFE00

# General (PS3.7 C): N-CREATE, N-SET, N-ACTION; also Failure Reasons in commitment reports.
PROCESSING_FAILURE = 0x0110
#: DIMSE-N (PS3.7 C.4.2): the SCP lacks the resources, e.g. its database is full.
RESOURCE_LIMITATION = 0x0213
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_OBJECT_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115
CLASS_INSTANCE_CONFLICT = 0x0119
INVALID_ATTRIBUTE_VALUE = 0x0106
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
NO_SUCH_ACTION = 0x0123
#: Error ID with 0x0110: "Performed Procedure Step object may no longer be updated" (F.7.2.2).
ERROR_ID_NO_LONGER_UPDATABLE = 0xA710

# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
#: Warning for "already stored with other content; this copy kept aside". PS3.4 defines no
#: dedicated code; B000 (coercion) is the warning modalities log and carry on from.
DUPLICATE_CONFLICT = 0xB000

# C-FIND / C-GET / C-MOVE (PS3.4 C.4)
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
MOVE_DESTINATION_UNKNOWN = 0xA801
#: "Out of resources - unable to perform sub-operations": e.g. the destination cannot be reached.
SUBOPERATIONS_IMPOSSIBLE = 0xA702


def status(code: int, comment: str, error_id: int | None = None) -> Dataset:
    """A response status with its Error Comment (and Error ID where the standard names one)."""
    response = Dataset()
    response.Status = code
    response.ErrorComment = comment[:64]  # LO
    if error_id is not None:
        response.ErrorID = error_id
    return response


def code_of(result: int | Dataset) -> int:
    """The status code of a handler's answer, for metrics."""
    return result if isinstance(result, int) else int(result.Status)
