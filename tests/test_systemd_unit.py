"""The unit file, gated as systemd itself judges it: verify with no complaints, exposure <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "systemd" / "screening-gateway.service"


SITE_DROP_IN = (
    Path(__file__).parent.parent / "ansible/roles/screening_gateway/templates/site.conf.j2"
)


TLS_CREDENTIALS = ["dicom-tls.crt", "dicom-tls.key", "dicom-tls-ca.crt", "audit-ca.crt"]


def site_settings(
    storage_port: int, worklist_port: int, arc: bool = False, credentials: list[str] | None = None
) -> str:
    """The role's drop-in for a site, rendered as Ansible renders it."""
    import jinja2

    template = jinja2.Template(SITE_DROP_IN.read_text(), keep_trailing_newline=True)
    return template.render(
        ansible_managed="Ansible managed",
        screening_gateway_storage_port=storage_port,
        screening_gateway_worklist_port=worklist_port,
        screening_gateway_arc_identity=arc,
        screening_gateway_arc_endpoint="http://localhost:40342",
        screening_gateway_tls_enabled=bool(credentials),
        screening_gateway_storage_tls_port=2762,
        screening_gateway_worklist_tls_port=2763,
        screening_gateway_tls_credentials=credentials or [],
    )


def test_the_arc_identity_adds_its_endpoint_and_group_and_nothing_else():
    plain, arc = site_settings(4244, 4243), site_settings(4244, 4243, arc=True)
    added = [line for line in arc.splitlines() if line not in plain.splitlines()]
    settings = [line for line in added if line and not line.startswith("#")]
    assert settings == [
        "Environment=IDENTITY_ENDPOINT=http://localhost:40342/metadata/identity/oauth2/token",
        "Environment=IMDS_ENDPOINT=http://localhost:40342",
        "SupplementaryGroups=himds",
    ]


@pytest.fixture(
    params=[(4244, 4243), (104, 4243), (4244, 4243, True), (4244, 4243, False, TLS_CREDENTIALS)],
    ids=["unprivileged-ports", "port-104", "arc-identity", "tls-credentials"],
)
def unit(request, tmp_path) -> Path:
    """The unit as a site runs it: the reviewed file plus the role's drop-in (appended: later
    assignments win, as with a drop-in), ExecStart pointing at this checkout's appliance (verify
    checks that the program exists)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is not installed: apt-get install systemd (CI does this)")
    installed = tmp_path / UNIT.name
    appliance = Path(sys.executable).parent / "appliance"
    text = UNIT.read_text().replace("/opt/screening-gateway/bin/appliance", str(appliance))
    installed.write_text(text + "\n" + site_settings(*request.param))
    return installed


def test_port_104_gets_cap_net_bind_service_and_nothing_else():
    assert "CAP_NET_BIND_SERVICE" not in site_settings(4244, 4243)
    privileged = site_settings(104, 4243)
    assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in privileged
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE\n" in privileged


def test_unit_verifies_without_a_single_complaint(unit):
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for broken units: its stderr is the verdict.
    assert (result.returncode, result.stderr) == (0, "")


def test_unit_exposure_is_at_most_2(unit):
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout[-2000:]
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)[1])
    assert exposure <= 2.0


def test_unit_runs_the_documented_config_with_the_relay_key_as_a_credential():
    text = UNIT.read_text()
    assert "Type=notify" in text
    assert (
        "ExecStart=/opt/screening-gateway/bin/appliance run --config "
        "/etc/screening-gateway/appliance.toml" in text
    )
    assert "LoadCredential=relay-key:/etc/screening-gateway/credentials/relay-key" in text
    # TimeoutStopSec must cover the appliance's own shutdown bound (10 s by default).
    assert int(re.search(r"TimeoutStopSec=(\d+)s", text)[1]) > 10
