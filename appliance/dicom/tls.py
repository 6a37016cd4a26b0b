"""DICOM TLS: the BCP 195 non-downgrading profile (PS3.15 B.9) for listeners and destinations.

TLS 1.2 with the ECDHE AES-GCM suites the profile names, or TLS 1.3; no compression, no
renegotiation. The server context is rebuilt when its certificate or key file changes, so a
rotated certificate is served from the next connection on (docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import ssl
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509

from appliance.config import DestinationConfig, TlsConfig, secret_path

#: TLS 1.2 suites of the non-downgrading BCP 195 profile (TLS 1.3's are all acceptable).
BCP195_CIPHERS = "ECDHE+AESGCM"
#: How often a listener looks at its certificate files for a rotation.
RELOAD_CHECK_S = 10.0


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def _profile(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def _load_chain(context: ssl.SSLContext, tls: TlsConfig) -> None:
    certificate, key = secret_path(tls.certificate_file), secret_path(tls.key_file)
    for key_name, path in (("certificate_file", certificate), ("key_file", key)):
        if not path.is_file():
            raise TlsError(f"dicom.tls.{key_name}: {path} does not exist")
    try:
        context.load_cert_chain(certificate, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(
            f"dicom.tls: cannot load certificate {certificate} with key {key}: {exc}"
        ) from None


def _load_trust(context: ssl.SSLContext, key: str, path: Path) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{key}: cannot load {path}: {exc}") from None


def server_context(tls: TlsConfig, pinned: Iterable[Path] = ()) -> ssl.SSLContext:
    """A listener's context: the appliance's certificate; a client certificate is asked for
    (verified against the CA and the pinned certificates) but required only per peer."""
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_chain(context, tls)
    anchors = [("dicom.tls.ca_file", secret_path(tls.ca_file))] if tls.ca_file else []
    anchors += [("dicom.peers.client_certificate", path) for path in pinned]
    for key, path in anchors:
        _load_trust(context, key, path)
    context.verify_mode = ssl.CERT_OPTIONAL if anchors else ssl.CERT_NONE
    return context


def client_context(
    tls: TlsConfig, ca_file: str | None = None, key: str = "dicom.tls.ca_file"
) -> ssl.SSLContext:
    """An outgoing connection's context: the server's certificate checked against the CA
    (dicom.tls.ca_file unless another is named; empty: the system's store), the appliance's
    own certificate presented for mutual TLS when it has one."""
    context = _profile(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    trusted = tls.ca_file if ca_file is None else ca_file
    if trusted:
        _load_trust(context, key, secret_path(trusted))
    else:
        context.load_default_certs()
    if tls.certificate_file and tls.key_file:
        _load_chain(context, tls)
    return context


def tls_args(tls: TlsConfig, destination: DestinationConfig) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for an association to `destination` (None: plain TCP)."""
    if not destination.tls:
        return None
    return client_context(tls), destination.server_name or destination.host


def expiry(path: Path) -> dt.datetime:
    """When a PEM certificate stops being valid (UTC)."""
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise TlsError(f"dicom.tls.certificate_file: cannot read {path}: {exc}") from None
    return certificate.not_valid_after_utc


class ServerTls:
    """A listener's TLS context, rebuilt when its files change (certificate rotation)."""

    def __init__(self, tls: TlsConfig, pinned: Iterable[Path] = ()) -> None:
        self._tls = tls
        self._pinned = list(pinned)
        self._files = [secret_path(tls.certificate_file), secret_path(tls.key_file)]
        self._lock = threading.Lock()
        self._stamp = self._stamps()
        self._checked = time.monotonic()
        self._context = server_context(tls, self._pinned)
        self.not_after = expiry(self._files[0])

    def _stamps(self) -> tuple[float, ...]:
        return tuple(path.stat().st_mtime if path.exists() else 0.0 for path in self._files)

    def context(self) -> ssl.SSLContext:
        """The current context; a rotated certificate that cannot be loaded keeps the old one
        (and raises, for the caller to log, once per change)."""
        with self._lock:
            if time.monotonic() - self._checked < RELOAD_CHECK_S:
                return self._context
            self._checked = time.monotonic()
            stamp = self._stamps()
            if stamp == self._stamp:
                return self._context
            self._stamp = stamp
            context = server_context(self._tls, self._pinned)
            self.not_after = expiry(self._files[0])
            self._context = context
            return context

    def seconds_left(self) -> float:
        return (self.not_after - dt.datetime.now(dt.UTC)).total_seconds()
