"""pynetdicom's process-wide switches and the internals we rely on, in this one place.

pynetdicom keeps its behaviour in module globals (``pynetdicom._config``); setting them from many
modules makes the appliance's behaviour depend on import order. Everything is set here, once,
and the two private attributes the storage SCP needs are read here too (pynetdicom is pinned to
3.0.x in pyproject.toml for this reason; tests/test_storage.py would catch a change).
"""

from __future__ import annotations

from pathlib import Path

from pynetdicom import _config, dimse_messages, evt

from appliance.storage.spool import SpoolFile

#: Spool file names start with this; recovery deletes any such file left by a crash.
SPOOL_PREFIX = "rx-"


def configure(spool_dir: Path) -> None:
    """Stream each C-STORE dataset into a SpoolFile in `spool_dir` as it arrives.

    pynetdicom would create a NamedTemporaryFile in the system temp dir; we substitute a
    SpoolFile in the appliance's spool (same filesystem as storage/, so the final link is
    atomic) that hashes and starts writeback while the dataset is still arriving.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom's standard event logging narrates every PDU and dumps identifiers (patient
    # data); the appliance logs its own one-line events instead.
    _config.LOG_HANDLER_LEVEL = "none"
    # Otherwise every C-FIND identifier is decoded (and answers pretty-printed) just for logging.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False

    def spool_file(*, delete: bool, mode: str, suffix: str) -> SpoolFile:
        return SpoolFile(spool_dir, SPOOL_PREFIX, suffix)

    dimse_messages.NamedTemporaryFile = spool_file  # type: ignore[attr-defined]


def received_spool_file(event: evt.Event) -> SpoolFile:
    """The SpoolFile holding an EVT_C_STORE's dataset."""
    spool_file = event.request._dataset_file
    if not isinstance(spool_file, SpoolFile):
        raise RuntimeError("C-STORE dataset was not received into a SpoolFile")
    return spool_file
