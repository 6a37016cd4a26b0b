"""Who may do what, over what: peers as pairs with permissions, DICOM TLS, the audit trail.

Driven with dcmtk's clients (plain and `+tls`, Debian's dcmtk is built with OpenSSL), a TLS
storescp as a move destination, certificates made by the openssl command line, and rsyslog as
the remote audit repository (RFC 5425 over its OpenSSL stream driver).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import ssl
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom
import pytest

from appliance import audit
from appliance.testing import synthetic
from tests.conftest import require
from tests.support import (
    ApplianceProcess,
    commitment_request,
    free_port,
    hear_commitment,
    index_rows,
    write_config,
)

SMALL = (64, 48)
UNIT_ONLY = ["store", "commit", "worklist", "mpps"]


def image(directory: Path, name: str = "image.dcm", **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    synthetic.mammogram(shape=SMALL, **fields).save_as(path, enforce_file_format=True)
    return path


def tool(name: str, port: int, *args: str, calling: str, called: str = "SCREENING_PACS"):
    """A dcmtk client: options, then host and port, then (storescu) the files."""
    options = [a for a in args if not a.endswith(".dcm")]
    files = [a for a in args if a.endswith(".dcm")]
    return subprocess.run(
        [name, "-aet", calling, "-aec", called, *options, "127.0.0.1", str(port), *files],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def trail(app: ApplianceProcess) -> list[audit.Entry]:
    state = Path(re.search(r'state_dir = "([^"]+)"', app.config.read_text()).group(1))
    return [audit.parse(line) for line in audit.lines(state / "audit")]


def security_alerts(app: ApplianceProcess) -> list[audit.Entry]:
    return [e for e in trail(app) if e.event in ("Security Alert", "User Authentication")]


# --- permissions -------------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path, dcmtk):
    """A unit (store, worklist, ...), a viewer that may query and move to one destination only,
    and a unit whose listed address is not this one."""
    destination_port, other_port = free_port(), free_port()
    config = write_config(
        tmp_path,
        {
            "dicom": {
                "peers": [
                    {"ae_title": "UNIT1", "addresses": ["127.0.0.0/8"]},
                    {"ae_title": "FARUNIT", "addresses": ["10.20.1.21"]},
                    {
                        "ae_title": "VIEWER",
                        "addresses": ["localhost"],
                        "permissions": ["query", "retrieve"],
                        "move_to": ["DEST"],
                    },
                ],
                "destinations": [
                    {"ae_title": "DEST", "host": "127.0.0.1", "port": destination_port},
                    {"ae_title": "OTHER", "host": "127.0.0.1", "port": other_port},
                ],
            }
        },
    )
    with ApplianceProcess(config) as app:
        yield {"app": app, "dest_port": destination_port, "root": tmp_path}


def test_a_units_ae_title_from_another_address_is_refused_and_alerted(site, tmp_path):
    app = site["app"]
    refused = tool("storescu", app.ports["storage"], str(image(tmp_path)), calling="FARUNIT")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr
    assert index_rows(site["root"] / "state") == []
    assert "event=security.association_refused" in app.log()
    [alert] = [a for a in security_alerts(app) if "FARUNIT" in a.description]
    assert alert.outcome == audit.MINOR_FAILURE
    assert alert.type == "Node Authentication"
    assert alert.who[0]["UserID"] == "FARUNIT"
    assert alert.who[0]["NetworkAccessPointID"] == "127.0.0.1"


def test_a_unit_stores_but_may_not_query_or_retrieve(site, tmp_path):
    app = site["app"]
    stored = tool("storescu", app.ports["storage"], str(image(tmp_path)), calling="UNIT1")
    assert stored.returncode == 0, stored.stderr
    assert len(index_rows(site["root"] / "state")) == 1
    query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    found = tool("findscu", app.ports["storage"], *query, calling="UNIT1")
    assert found.returncode != 0
    assert "No Acceptable Presentation Contexts" in found.stderr
    assert "event=security.service_refused" in app.log()
    assert "services=query" in app.log()
    [alert] = [a for a in security_alerts(app) if a.type == "Use of Restricted Function"]
    assert alert.who[0]["UserID"] == "UNIT1"
    metrics = (site["root"] / "state" / "metrics.prom").read_text
    deadline = time.monotonic() + 10
    while 'context_refusals_total{server="storage-scp",service="query"}' not in metrics():
        assert time.monotonic() < deadline, "refusal not counted"
        time.sleep(0.2)


def test_a_listed_viewer_moves_to_its_destination_only(site, tmp_path):
    app = site["app"]
    ds = synthetic.mammogram(shape=SMALL, patient_id="9434765919")
    sent = tmp_path / "in" / "one.dcm"
    sent.parent.mkdir()
    ds.save_as(sent, enforce_file_format=True)
    assert tool("storescu", app.ports["storage"], str(sent), calling="UNIT1").returncode == 0
    received = tmp_path / "received"
    received.mkdir()
    with subprocess.Popen(
        ["storescp", "-aet", "DEST", "-od", str(received), str(site["dest_port"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) as storescp:  # fmt: skip
        try:
            time.sleep(0.5)
            study = f"StudyInstanceUID={ds.StudyInstanceUID}"
            keys = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", study]
            moved = tool("movescu", app.ports["storage"], "-aem", "DEST", *keys, calling="VIEWER")
            assert moved.returncode == 0, moved.stderr
            assert [pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()] == [
                ds.SOPInstanceUID
            ]
            elsewhere = tool(
                "movescu", app.ports["storage"], "-aem", "OTHER", *keys, calling="VIEWER"
            )
            assert elsewhere.returncode != 0
            assert "Refused: MoveDestinationUnknown" in elsewhere.stderr, elsewhere.stderr
        finally:
            storescp.terminate()
    assert "event=security.move_refused" in app.log()
    # The viewer may not store, and its refused C-STORE is alerted too.
    stored = tool("storescu", app.ports["storage"], str(image(tmp_path / "v")), calling="VIEWER")
    assert stored.returncode != 0
    # Who saw this woman's images: the move to DEST, by the viewer.
    moves = [e for e in trail(app) if e.event == "DICOM Instances Transferred" and e.action == "R"]
    [move] = [e for e in moves if "9434765919" in e.patients]
    assert move.studies == {ds.StudyInstanceUID: 1}
    assert {"DEST", "SCREENING_PACS"} <= {w["UserID"] for w in move.who}
    assert "VIEWER" in move.description


def test_by_default_units_may_store_and_nobody_may_query(tmp_path, dcmtk):
    config = write_config(tmp_path, {"dicom": {"unlisted_permissions": UNIT_ONLY}})
    with ApplianceProcess(config) as app:
        stored = tool("storescu", app.ports["storage"], str(image(tmp_path)), calling="ANYUNIT")
        assert stored.returncode == 0, stored.stderr
        query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
        found = tool("findscu", app.ports["storage"], *query, calling="ANYUNIT")
        assert found.returncode != 0
        assert "No Acceptable Presentation Contexts" in found.stderr


def test_peer_config_errors_name_the_key(tmp_path):
    from appliance import config

    bad = {
        "dicom": {
            "peers": [
                {"ae_title": "V", "addresses": ["10.0.0.1"], "permissions": ["read"]},
                {"ae_title": "W", "addresses": ["not an address!"]},
                {"ae_title": "X", "addresses": ["10.0.0.2"], "move_to": ["NOWHERE"]},
            ]
        }
    }
    with pytest.raises(config.ConfigError) as caught:
        config.structure(bad)
    text = str(caught.value)
    assert "dicom.peers[0].permissions: 'read' is not one of" in text
    bad["dicom"]["peers"] = bad["dicom"]["peers"][1:]
    with pytest.raises(config.ConfigError) as caught:
        config.structure(bad)
    assert "dicom.peers[0].addresses: 'not an address!'" in str(caught.value)
    bad["dicom"]["peers"] = bad["dicom"]["peers"][1:]
    with pytest.raises(config.ConfigError) as caught:
        config.structure(bad)
    assert "move_to: NOWHERE is not a dicom.destinations entry" in str(caught.value)


# --- TLS ---------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def make_leaf(
    directory: Path, name: str, ca: tuple[Path, Path], days: int = 20
) -> tuple[Path, Path]:
    key, request, cert = (directory / f"{name}.{s}" for s in ("key", "csr", "crt"))
    extensions = directory / f"{name}.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
             "-keyout", str(key), "-out", str(request))  # fmt: skip
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[1]), "-CAkey", str(ca[0]),
             "-CAcreateserial", "-days", str(days), "-extfile", str(extensions),
             "-out", str(cert))  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    require("openssl", "openssl")
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "site-ca")
    rogue = make_ca(directory, "rogue-ca")
    return {
        "dir": directory,
        "ca": ca[1],
        "rogue_ca": rogue[1],
        "server": make_leaf(directory, "gateway", ca),
        "unit": make_leaf(directory, "unit", ca),
        "other_unit": make_leaf(directory, "other-unit", ca),
        "rogue": make_leaf(directory, "rogue", rogue),
        "dest": make_leaf(directory, "dest", ca),
    }


@pytest.fixture
def tls_site(tmp_path, pki, dcmtk):
    destination_port, committer_port = free_port(), free_port()
    key, cert = pki["server"]
    config = write_config(
        tmp_path,
        {
            "dicom": {
                "tls": {
                    "enabled": True,
                    "certificate_file": str(cert),
                    "key_file": str(key),
                    "ca_file": str(pki["ca"]),
                },
                "storage": {"tls_port": 0},
                "worklist": {"tls_port": 0},
                "peers": [
                    {"ae_title": "UNIT1", "addresses": ["127.0.0.1"]},
                    {"ae_title": "TLSUNIT", "addresses": ["127.0.0.1"], "require_tls": True},
                    {
                        "ae_title": "MTLSUNIT",
                        "addresses": ["127.0.0.1"],
                        "client_certificate": "ca",
                    },
                    {
                        "ae_title": "PINNED",
                        "addresses": ["127.0.0.1"],
                        "client_certificate": str(pki["unit"][1]),
                    },
                    {
                        "ae_title": "VIEWER",
                        "addresses": ["127.0.0.1"],
                        "permissions": ["query", "retrieve"],
                        "move_to": ["DEST"],
                    },
                    {"ae_title": "COMMITTER", "addresses": ["127.0.0.1"]},
                ],
                "destinations": [
                    {
                        "ae_title": "DEST",
                        "host": "127.0.0.1",
                        "port": destination_port,
                        "tls": True,
                    },
                    {
                        "ae_title": "COMMITTER",
                        "host": "localhost",
                        "port": committer_port,
                        "tls": True,
                    },
                ],
            }
        },
    )
    with ApplianceProcess(config) as app:
        yield {
            "app": app,
            "dest_port": destination_port,
            "committer_port": committer_port,
            "root": tmp_path,
        }


def with_cert(pki, name: str) -> list[str]:
    key, cert = pki[name]
    return ["+tls", str(key), str(cert), "+cf", str(pki["ca"])]


def test_tls_echo_store_and_find_with_the_sites_ca(tls_site, pki, tmp_path):
    app = tls_site["app"]
    port = app.ports["storage_tls"]
    assert tool("echoscu", port, *with_cert(pki, "unit"), calling="TLSUNIT").returncode == 0
    anonymous = ["+tla", "+cf", str(pki["ca"])]
    assert tool("echoscu", port, *anonymous, calling="TLSUNIT").returncode == 0
    stored = tool(
        "storescu", port, *with_cert(pki, "unit"), str(image(tmp_path)), calling="TLSUNIT"
    )
    assert stored.returncode == 0, stored.stderr
    query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    found = tool("findscu", port, *anonymous, *query, calling="VIEWER")
    assert found.returncode == 0, found.stderr
    worklist = tool(
        "echoscu", app.ports["worklist_tls"], *anonymous, calling="TLSUNIT", called="SCREENING_MWL"
    )
    assert worklist.returncode == 0, worklist.stderr
    # The plain port still serves units that may use it, not those bound to TLS.
    plain = app.ports["storage"]
    assert tool("echoscu", plain, calling="UNIT1").returncode == 0
    refused = tool("echoscu", plain, calling="TLSUNIT")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr


def test_tls_refuses_untrusted_certificates_both_ways(tls_site, pki):
    app = tls_site["app"]
    port = app.ports["storage_tls"]
    # The client does not trust the gateway's CA.
    wrong_ca = ["+tla", "+cf", str(pki["rogue_ca"])]
    assert tool("echoscu", port, *wrong_ca, calling="TLSUNIT").returncode != 0
    # The gateway does not trust the client's certificate.
    key, cert = pki["rogue"]
    rogue = ["+tls", str(key), str(cert), "+cf", str(pki["ca"])]
    assert tool("echoscu", port, *rogue, calling="TLSUNIT").returncode != 0
    deadline = time.monotonic() + 10
    while "phase=tls" not in app.log():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert any("TLS handshake failed" in a.description for a in security_alerts(app))


def test_mutual_tls_refuses_a_client_without_its_certificate(tls_site, pki):
    app = tls_site["app"]
    port = app.ports["storage_tls"]
    anonymous = ["+tla", "+cf", str(pki["ca"])]
    without = tool("echoscu", port, *anonymous, calling="MTLSUNIT")
    assert without.returncode != 0
    assert "Calling AE Title Not Recognized" in without.stderr
    assert tool("echoscu", port, *with_cert(pki, "unit"), calling="MTLSUNIT").returncode == 0
    # Pinned: only that certificate, not another the CA issued.
    assert tool("echoscu", port, *with_cert(pki, "unit"), calling="PINNED").returncode == 0
    other = tool("echoscu", port, *with_cert(pki, "other_unit"), calling="PINNED")
    assert other.returncode != 0
    reasons = [a.description for a in security_alerts(app)]
    assert any("presented no client certificate" in r for r in reasons)
    assert any("not the pinned one" in r for r in reasons)


def test_a_move_to_a_tls_destination_goes_over_tls(tls_site, pki, tmp_path):
    app = tls_site["app"]
    ds = synthetic.mammogram(shape=SMALL)
    path = tmp_path / "in" / "one.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    assert tool("storescu", app.ports["storage"], str(path), calling="UNIT1").returncode == 0
    received = tmp_path / "received"
    received.mkdir()
    key, cert = pki["dest"]
    tls = ["+tls", str(key), str(cert), "+cf", str(pki["ca"])]
    with subprocess.Popen(
        ["storescp", *tls, "-aet", "DEST", "-od", str(received), str(tls_site["dest_port"])],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    ) as storescp:  # fmt: skip
        try:
            time.sleep(0.5)
            study = f"StudyInstanceUID={ds.StudyInstanceUID}"
            keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", study]
            moved = tool(
                "movescu", app.ports["storage"], "-S", "-aem", "DEST", *keys, calling="VIEWER"
            )
            assert moved.returncode == 0, moved.stderr
            assert [pydicom.dcmread(p).SOPInstanceUID for p in received.iterdir()] == [
                ds.SOPInstanceUID
            ]
        finally:
            storescp.terminate()


def test_a_commitment_report_goes_over_mutual_tls_to_a_tls_destination(tls_site, pki, tmp_path):
    app = tls_site["app"]
    ds = synthetic.mammogram(shape=SMALL)
    path = tmp_path / "in" / "one.dcm"
    path.parent.mkdir()
    ds.save_as(path, enforce_file_format=True)
    assert tool("storescu", app.ports["storage"], str(path), calling="UNIT1").returncode == 0
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    context.load_cert_chain(pki["dest"][1], pki["dest"][0])
    context.verify_mode = ssl.CERT_REQUIRED  # the appliance must present its certificate
    request = commitment_request([(ds.SOPClassUID, ds.SOPInstanceUID)])
    report = hear_commitment(
        app.ports["storage"], tls_site["committer_port"], request, ssl_context=context
    )
    [committed] = report.ReferencedSOPSequence
    assert committed.ReferencedSOPInstanceUID == ds.SOPInstanceUID


def test_certificate_expiry_in_status_and_metrics(tls_site, pki):
    app, root = tls_site["app"], tls_site["root"]
    state = root / "state"
    deadline = time.monotonic() + 15
    while True:
        status = json.loads(cli(app.config, "status", "--json").stdout)
        if status.get("tls"):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    assert set(status["tls"]) == {"storage_tls", "worklist_tls"}
    assert 19 <= status["tls"]["storage_tls"]["days_left"] <= 20
    metrics = (state / "metrics.prom").read_text()
    [value] = re.findall(
        r'screening_gateway_tls_certificate_expiry_seconds\{listener="storage_tls"\} (\d+)', metrics
    )
    assert 19 * 86400 <= int(value) <= 20 * 86400


def test_a_tls_listener_whose_certificate_is_missing_names_the_file(tmp_path, pki, dcmtk):
    config = write_config(
        tmp_path,
        {
            "dicom": {
                "tls": {
                    "enabled": True,
                    "certificate_file": str(tmp_path / "missing.crt"),
                    "key_file": str(pki["server"][0]),
                },
                "storage": {"tls_port": 0},
                "worklist": {"tls_port": 0},
            }
        },
    )
    with ApplianceProcess(config) as app:
        # The plain ports serve; the TLS listeners keep failing with the file named.
        assert tool("echoscu", app.ports["storage"], calling="UNIT1").returncode == 0
        deadline = time.monotonic() + 15
        while f"{tmp_path / 'missing.crt'} does not exist" not in app.log():
            assert time.monotonic() < deadline, app.log()[-2000:]
            time.sleep(0.2)


# --- the audit trail -----------------------------------------------------------------------------


def test_a_query_and_a_store_are_audited_with_who_and_what(tmp_path, dcmtk):
    with ApplianceProcess(write_config(tmp_path)) as app:
        ds = synthetic.mammogram(shape=SMALL, patient_id="9000000009")
        path = tmp_path / "in" / "one.dcm"
        path.parent.mkdir()
        ds.save_as(path, enforce_file_format=True)
        assert tool("storescu", app.ports["storage"], str(path), calling="UNIT1").returncode == 0
        query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=9000000009"]
        query += ["-k", "StudyInstanceUID"]
        assert tool("findscu", app.ports["storage"], *query, calling="READER").returncode == 0
        deadline = time.monotonic() + 10
        while not any(e.event == "Query" for e in trail(app)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert app.stop() == 0
    entries = trail(app)
    assert entries[0].type == "Application Start"
    assert entries[-1].type == "Application Stop"
    [stored] = [e for e in entries if e.event == "DICOM Instances Transferred"]
    assert stored.action == "C"
    assert stored.patients == ["9000000009"]
    assert stored.studies == {ds.StudyInstanceUID: 1}
    source = next(w for w in stored.who if w["UserID"] == "UNIT1")
    assert source["NetworkAccessPointID"] == "127.0.0.1"
    message = ET.fromstring(stored.xml)
    [sop_class] = message.iter("SOPClass")
    assert sop_class.get("UID") == ds.SOPClassUID
    assert [i.get("UID") for i in sop_class] == [ds.SOPInstanceUID]
    [found] = [e for e in entries if e.event == "Query"]
    assert found.patients == ["9000000009"]
    query_object = ET.fromstring(found.xml).find("ParticipantObjectIdentification")
    assert query_object.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.1.2.2.1"
    assert b"9000000009" in base64.b64decode(query_object.findtext("ParticipantObjectQuery"))
    # The trail is its own file, readable by its owner only, and the log names no patient.
    state = tmp_path / "state"
    [log_file] = audit.files(state / "audit")
    assert log_file.stat().st_mode & 0o777 == 0o600
    assert "9000000009" not in app.log()
    listed = cli(app.config, "audit", "--patient", "9000000009")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert len(lines) == 2
    assert "DICOM Instances Transferred" in lines[0]
    assert "UNIT1@127.0.0.1" in lines[0]
    assert "Query" in lines[1]
    assert "READER@127.0.0.1" in lines[1]


class Rsyslog:
    """rsyslogd receiving RFC 5425 (syslog over TLS, its OpenSSL driver, client certificates
    checked against the site's CA), writing each message's text to a file."""

    def __init__(self, directory: Path, port: int, pki) -> None:
        self.directory, self.port = directory, port
        self.received = directory / "received.log"
        key, cert = pki["dest"]
        self.conf = directory / "rsyslog.conf"
        self.conf.write_text(
            f"""
global(
  workDirectory="{directory}"
  maxMessageSize="1m"
  DefaultNetstreamDriver="ossl"
  DefaultNetstreamDriverCAFile="{pki["ca"]}"
  DefaultNetstreamDriverCertFile="{cert}"
  DefaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" StreamDriver.Name="ossl" StreamDriver.Mode="1"
       StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" port="{port}")
template(name="text" type="string" string="%msgid% %msg%\\n")
action(type="omfile" file="{self.received}" template="text")
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        self.proc = subprocess.Popen(
            ["rsyslogd", "-n", "-f", str(self.conf), "-i", str(self.directory / "pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert time.monotonic() < deadline, "rsyslogd did not listen"
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def messages(self) -> list[str]:
        if not self.received.exists():
            return []
        found = []
        for line in self.received.read_text(encoding="utf-8").splitlines():
            msgid, _, text = line.partition(" ")
            assert msgid == "IHE+RFC-3881"
            found.append(text.lstrip("\ufeff").strip())
        return found


def test_the_remote_repository_gets_every_message_once_across_its_outage(tmp_path, pki, dcmtk):
    require("rsyslogd", "rsyslog rsyslog-openssl")
    repository = tmp_path / "repository"
    repository.mkdir()
    rsyslog = Rsyslog(repository, free_port(), pki).start()
    key, cert = pki["server"]
    config = write_config(
        tmp_path,
        {
            "dicom": {
                "tls": {"enabled": True, "certificate_file": str(cert), "key_file": str(key)},
                "storage": {"tls_port": 0},
                "worklist": {"tls_port": 0},
            },
            "audit": {
                "remote": f"127.0.0.1:{rsyslog.port}",
                "remote_ca_file": str(pki["ca"]),
                "remote_server_name": "localhost",
            },
        },
    )
    query = ["-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]

    def wait_for(patient: str) -> None:
        deadline = time.monotonic() + 20
        while not any(f'ParticipantObjectID="{patient}"' in m for m in rsyslog.messages()):
            assert time.monotonic() < deadline, f"{patient} never reached the repository"
            time.sleep(0.2)

    try:
        with ApplianceProcess(config) as app:
            port = app.ports["storage"]
            path = image(tmp_path / "a", patient_id="1111111111")
            assert tool("storescu", port, str(path), calling="UNIT1").returncode == 0
            wait_for("1111111111")
            rsyslog.stop()
            time.sleep(1.0)  # the forwarder notices the closed connection
            down = image(tmp_path / "b", patient_id="2222222222")
            assert tool("storescu", port, str(down), calling="UNIT1").returncode == 0
            tool("findscu", port, *query, "-k", "PatientID=2222222222", calling="READER")
            status = json.loads(cli(app.config, "status", "--json").stdout)
            assert status["cloud"]["audit-forwarder"]["connected"] is False
            rsyslog.start()
            wait_for("2222222222")
            time.sleep(1.5)  # anything else in flight
            local = [line for line in audit.lines(tmp_path / "state" / "audit")]
            remote = rsyslog.messages()
            assert sorted(remote) == sorted(local)
            assert len(set(remote)) == len(remote)
    finally:
        rsyslog.stop()


def test_one_selftest_leaves_its_trail_with_participants_and_identifiers(tmp_path):
    config = write_config(tmp_path, {"studies": {"check_interval_s": 0.5}})
    with ApplianceProcess(config) as app:
        result = cli(config, "selftest")
        assert result.returncode == 0, result.stdout
        assert app.stop() == 0
    entries = trail(app)
    kinds = [(e.event, e.action) for e in entries]
    assert kinds[0] == ("Application Activity", "E")
    assert kinds[-1] == ("Application Activity", "E")
    created = [e for e in entries if (e.event, e.action) == ("Patient Record", "C")]
    removed = [e for e in entries if (e.event, e.action) == ("Patient Record", "D")]
    queries = [e for e in entries if e.event == "Query"]
    stored = [e for e in entries if (e.event, e.action) == ("DICOM Instances Transferred", "C")]
    assert len(created) == len(removed) == 1
    assert created[0].patients == removed[0].patients == ["SELFTEST"]
    assert created[0].who[0]["UserID"] == "control-socket"
    assert "worklist.create_test_item" in created[0].description
    [worklist_query] = [q for q in queries if q.who[0]["UserID"] == "SELFTEST"]
    assert worklist_query.patients == ["SELFTEST"]
    assert worklist_query.who[0]["NetworkAccessPointID"] == "127.0.0.1"
    assert {w["UserID"] for w in worklist_query.who} == {"SELFTEST", "SCREENING_MWL"}
    [images] = stored
    assert images.patients == ["SELFTEST"]
    assert sum(images.studies.values()) >= 1
    assert {w["UserID"] for w in images.who} == {"SELFTEST", "SCREENING_PACS"}
    assert created[0].when < worklist_query.when < images.when < removed[0].when


def test_the_policy_judges_pairs_ranges_names_and_mapped_addresses():
    from appliance import config
    from appliance.dicom.peers import Grant, PeerPolicy, Refusal

    dicom = config.structure(
        {
            "dicom": {
                "peers": [
                    {"ae_title": "MG1", "addresses": ["10.20.1.16/28", "fd00::/64"]},
                    {"ae_title": "WS1", "addresses": ["localhost"], "permissions": ["query"]},
                ]
            }
        }
    ).dicom
    policy = PeerPolicy(dicom)
    judged = policy.judge("MG1", "::ffff:10.20.1.20", tls=False, certificate=None)
    assert isinstance(judged, Grant)
    assert judged.permissions == {"store", "commit", "worklist", "mpps"}
    assert judged.may_move_to("MG1")
    assert not judged.may_move_to("WS1")
    assert isinstance(policy.judge("MG1", "fd00::7", tls=False, certificate=None), Grant)
    # The pair, not the sets: WS1's address with MG1's title, MG1's title from outside its range.
    assert isinstance(policy.judge("MG1", "127.0.0.1", tls=False, certificate=None), Refusal)
    assert isinstance(policy.judge("MG1", "10.20.1.32", tls=False, certificate=None), Refusal)
    ws1 = policy.judge("WS1", "127.0.0.1", tls=False, certificate=None)
    assert isinstance(ws1, Grant)
    assert ws1.permissions == {"query"}
    assert policy.address_known("10.20.1.17")
    assert not policy.address_known("10.20.1.32")
    assert not policy.address_known("not-an-address")


def test_a_connection_from_an_address_no_peer_has_is_closed_before_any_pdu(tmp_path, dcmtk):
    addresses = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    outside = next((a for a in addresses if "." in a and not a.startswith("127.")), None)
    if outside is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    config = write_config(
        tmp_path,
        {"dicom": {"host": "0.0.0.0", "peers": [{"ae_title": "MG1", "addresses": ["10.9.9.9"]}]}},
    )
    with ApplianceProcess(config) as app:
        refused = subprocess.run(
            ["echoscu", "-aet", "MG1", "-aec", "SCREENING_PACS", outside,
             str(app.ports["storage"])],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert refused.returncode != 0
        deadline = time.monotonic() + 10
        while f'phase=peer-address reason="{outside} is not' not in app.log():
            assert time.monotonic() < deadline, app.log()[-1500:]
            time.sleep(0.1)
    [alert] = security_alerts(app)
    assert alert.who[0]["NetworkAccessPointID"] == outside


def test_the_trail_rotates_keeps_its_newest_files_and_the_cursor_follows(tmp_path):
    from appliance.audit_forwarder import Cursor, frame

    trail_ = audit.AuditTrail()
    directory = tmp_path / "audit"
    trail_.open(directory, source_id="sgw-test", rotate_mb=0.004, keep_files=3)  # ~4 KB files
    cursor = Cursor(directory)
    sent: list[str] = []
    for n in range(60):
        trail_.record(audit.authentication_failed(f"entra:test{n}", f"reason {n}"))
        if n % 7 == 0:  # the forwarder catches up now and then, across rotations
            found, name, offset = cursor.pending(*cursor.load())
            sent += found
            cursor.save(name, offset)
    trail_.close()
    found, name, offset = cursor.pending(*cursor.load())
    sent += found
    kept = audit.files(directory)
    assert len(kept) == 3
    assert all(path.stat().st_mode & 0o777 == 0o600 for path in kept)
    assert directory.stat().st_mode & 0o777 == 0o700
    on_disk = list(audit.lines(directory))
    assert sent[-len(on_disk) :] == on_disk  # every kept message sent, in order, once
    assert len(sent) == len(set(sent))
    assert sent[-1].count("entra:test59") == 1
    framed = frame(on_disk[0], "sgw-test", 42)
    length, _, message = framed.partition(b" ")
    assert int(length) == len(message)
    assert message.startswith(b"<85>1 ")
    assert b" sgw-test screening-gateway 42 IHE+RFC-3881 - \xef\xbb\xbf<AuditMessage>" in message


def test_a_message_is_the_schemas_shape():
    event = audit.instances_transferred(
        source=audit.peer_participant("MG1", "10.0.0.1"),
        destination=audit.appliance_participant("PACS"),
        studies=[
            audit.StudyTransfer(
                "1.2.3", "9434765919", ("ACC1",), {"1.2.840.10008.5.1.4.1.1.1.2": ("1.2.3.4",)}
            )
        ],
        received=True,
    )
    message = ET.fromstring(audit.to_xml(event, "sgw"))
    identification = message.find("EventIdentification")
    assert identification.get("EventActionCode") == "C"
    assert identification.find("EventID").attrib == {
        "csd-code": "110104", "codeSystemName": "DCM", "originalText": "DICOM Instances Transferred"
    }  # fmt: skip
    source, destination = message.findall("ActiveParticipant")
    assert source.get("UserIsRequestor") == "true"
    assert source.get("NetworkAccessPointTypeCode") == "2"
    assert source.find("RoleIDCode").get("csd-code") == "110153"
    assert destination.find("RoleIDCode").get("csd-code") == "110152"
    assert message.find("AuditSourceIdentification").get("AuditSourceID") == "sgw"
    study, patient = message.findall("ParticipantObjectIdentification")
    assert (study.get("ParticipantObjectTypeCode"), study.get("ParticipantObjectTypeCodeRole")) == (
        "2",
        "3",
    )
    assert study.find("ParticipantObjectIDTypeCode").get("csd-code") == "110180"
    assert study.find("SOPClass").get("NumberOfInstances") == "1"
    assert study.find("Accession").get("Number") == "ACC1"
    assert (
        patient.get("ParticipantObjectTypeCode"),
        patient.get("ParticipantObjectTypeCodeRole"),
    ) == ("1", "1")
    assert patient.get("ParticipantObjectID") == "9434765919"
