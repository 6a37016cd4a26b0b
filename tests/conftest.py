from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def dcmtk() -> None:
    """Tests that drive the appliance with dcmtk's clients (CI installs the Debian package)."""
    if shutil.which("echoscu") is None:
        pytest.fail("dcmtk is not installed: apt-get install dcmtk (CI does this in .ci/run)")
