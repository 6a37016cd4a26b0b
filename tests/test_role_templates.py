"""The role's templates as Ansible renders them (its own templar, filters and all): the peers a
site lists become the appliance's [[dicom.peers]] and the nftables sets, TLS its credentials."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tests.test_security import make_ca, make_leaf

ROLE = Path(__file__).parent.parent / "ansible/roles/screening_gateway"

SITE = {
    "ansible_managed": "Ansible managed",
    "screening_gateway_modalities": [
        {"name": "Room 1", "ae_title": "NORTH_MG1", "address": "10.20.1.21", "port": 104},
        {"name": "Room 2", "ae_title": "NORTH_MG2", "addresses": ["10.20.1.22", "fd00::22"]},
    ],
    "screening_gateway_peers": [
        {
            "name": "Reporting workstation",
            "ae_title": "NORTH_WS1",
            "addresses": ["10.30.0.0/28", "ws1.north.nhs.example"],
            "permissions": ["query", "retrieve"],
            "move_to": ["NORTH_WS1"],
            "port": 11112,
            "tls": True,
            "client_certificate": "ca",
        }
    ],
    "screening_gateway_tls_enabled": True,
    "screening_gateway_tls_certificate": "PEM",
    "screening_gateway_tls_key": "PEM",
    "screening_gateway_tls_ca": "PEM",
    "screening_gateway_audit_remote": "audit.nhs.example:6514",
    "screening_gateway_audit_remote_ca": "PEM",
}


def render(name: str, **overrides: Any) -> str:
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    variables: dict[str, Any] = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    derived = yaml.safe_load((ROLE / "vars/main.yml").read_text())
    variables |= SITE | overrides
    templar = Templar(loader=DataLoader(), variables=variables)
    for key, value in derived.items():
        variables[key] = templar.template(trust_as_template(value))
    templar = Templar(loader=DataLoader(), variables=variables)
    return str(templar.template(trust_as_template((ROLE / "templates" / name).read_text())))


def test_the_sites_peers_become_pairs_with_permissions_and_tls(tmp_path):
    text = render("appliance.toml.j2")
    config = tomllib.loads(text)
    peers = {peer["ae_title"]: peer for peer in config["dicom"]["peers"]}
    assert peers["NORTH_MG2"]["addresses"] == ["10.20.1.22", "fd00::22"]
    assert "permissions" not in peers["NORTH_MG1"]  # a unit's defaults
    viewer = peers["NORTH_WS1"]
    assert viewer["permissions"] == ["query", "retrieve"]
    assert viewer["client_certificate"] == "ca"
    assert config["dicom"]["tls"]["certificate_file"] == "dicom-tls.crt"
    # A destination's host is one of its addresses, never a range.
    assert {
        "ae_title": "NORTH_WS1",
        "host": "ws1.north.nhs.example",
        "port": 11112,
        "tls": True,
    } in (config["dicom"]["destinations"])
    assert config["audit"] == {"remote": "audit.nhs.example:6514", "remote_ca_file": "audit-ca.crt"}
    # `appliance config check` (the role's validate step) loads the credentials as the unit will.
    path = tmp_path / "appliance.toml"
    path.write_text(text)
    credentials = tmp_path / "credentials"
    credentials.mkdir()

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "config", "check", "--config", str(path)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "CREDENTIALS_DIRECTORY": str(credentials)},
        )  # fmt: skip

    refused = check()
    assert refused.returncode == 2
    assert f"dicom.tls.certificate_file: {credentials / 'dicom-tls.crt'} does not exist" in (
        refused.stderr
    )
    ca = make_ca(credentials, "ca")
    key, cert = make_leaf(credentials, "gateway", ca)
    cert.rename(credentials / "dicom-tls.crt")
    key.rename(credentials / "dicom-tls.key")
    ca[1].rename(credentials / "dicom-tls-ca.crt")
    checked = check()
    assert checked.returncode == 0, checked.stderr


def test_nftables_opens_each_port_group_to_the_peers_that_use_it():
    rules = render("screening-gateway.nft.j2")
    storage = rules.split("set storage_v4 {")[1].split("}")[0]
    worklist = rules.split("set worklist_v4 {")[1].split("}")[0]
    assert "10.30.0.0/28" in storage
    assert "10.30.0.0/28" not in worklist  # the viewer neither reads the worklist nor sends MPPS
    assert "10.20.1.21" in worklist
    assert "ws1.north.nhs.example" not in rules  # host names are the appliance's to check
    assert "tcp dport { 4244, 2762 } ip saddr @storage_v4 accept" in rules
    assert "tcp dport { 4243, 2763 } ip6 saddr @worklist_v6 accept" in rules
    only = render("screening-gateway.nft.j2", screening_gateway_tls_only=True)
    assert "tcp dport { 2762 } ip saddr @storage_v4 accept" in only


def test_the_drop_in_loads_the_certificates_as_credentials():
    drop_in = render("site.conf.j2")
    loaded = [line for line in drop_in.splitlines() if line.startswith("LoadCredential=")]
    assert loaded == [
        f"LoadCredential={name}:/etc/screening-gateway/credentials/{name}"
        for name in ("dicom-tls.crt", "dicom-tls.key", "dicom-tls-ca.crt", "audit-ca.crt")
    ]
    plain = render(
        "site.conf.j2", screening_gateway_tls_enabled=False, screening_gateway_audit_remote=""
    )
    assert "LoadCredential" not in plain
