"""pynetdicom's process-wide switches, set in this one place.

pynetdicom keeps its behaviour in module globals (``pynetdicom._config``); setting them from many
modules makes the appliance's behaviour depend on import order. Everything is set here, once.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from pynetdicom import _config, dimse_messages

#: Spool file names start with this; recovery deletes any such file left by a crash.
SPOOL_PREFIX = "rx-"


def configure(spool_dir: Path) -> None:
    """Stream each C-STORE dataset to a spool file as it arrives instead of into memory.

    pynetdicom creates that file with ``tempfile.NamedTemporaryFile`` in the system temp dir; we
    point it at the appliance's spool (same filesystem as storage/, so the final rename is atomic)
    and give the files a recognisable prefix. Names stay unique across concurrent associations.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom's standard event logging narrates every PDU and dumps identifiers (patient
    # data); the appliance logs its own one-line events instead.
    _config.LOG_HANDLER_LEVEL = "none"
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[attr-defined]
        tempfile.NamedTemporaryFile, dir=spool_dir, prefix=SPOOL_PREFIX
    )
