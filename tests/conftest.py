from __future__ import annotations

import shutil

import pytest


def require(command: str, package: str) -> None:
    """A peer tool the project did not write; CI installs its Debian package in .ci/run."""
    if shutil.which(command) is None:
        pytest.fail(f"{command} is not installed: apt-get install {package} (.ci/run does this)")


@pytest.fixture
def dcmtk() -> None:
    """Tests that drive the appliance with dcmtk's clients and encoders."""
    require("echoscu", "dcmtk")


@pytest.fixture
def openjpeg() -> None:
    """Tests that encode JPEG 2000 with OpenJPEG's own encoder."""
    require("opj_compress", "libopenjp2-tools")


@pytest.fixture
def dicom3tools() -> None:
    """Tests that validate objects against their IOD with dciodvfy."""
    require("dciodvfy", "dicom3tools")
