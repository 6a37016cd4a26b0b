"""Who may associate and what each may ask for: the configured peers, judged as pairs.

A peer is an AE title bound to the addresses it connects from, with permissions by service
(store, commit, worklist, mpps, query, retrieve) and the move destinations it may send to. The
listener closes a connection from an address no peer has; the association is judged on the
pair (and, over TLS, on the client certificate) when its A-ASSOCIATE-RQ arrives; what the pair
may not ask for is left out of the contexts it can be given (docs/security.md).
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from attrs import frozen

from appliance.config import ISSUED_BY_CA, DicomConfig, PeerConfig, secret_path
from appliance.log import get_logger

log = get_logger("dicom")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
#: A host name's addresses are looked up again after this long, when a connection matches none.
RESOLVE_AGAIN_S = 60.0


def normalised(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as a peer's networks hold it (an IPv4-mapped IPv6 address as IPv4)."""
    parsed = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
        return parsed.ipv4_mapped
    return parsed


@frozen
class Grant:
    """What one association may ask for."""

    #: The configured peer's AE title, or None while no peers are listed (open set-up).
    peer: str | None
    permissions: frozenset[str]
    #: Move destinations it may send to; None: any configured destination.
    move_to: frozenset[str] | None

    def may_move_to(self, destination: str) -> bool:
        return self.move_to is None or destination in self.move_to


@frozen
class Refusal:
    """Why an association is refused: a phase for the log and a reason for people."""

    phase: str
    reason: str


class _Peer:
    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._networks: tuple[Network, ...] = ()
        self._names = [a for a in config.addresses if not _is_network(a)]
        self._resolved_at = float("-inf")
        self._fixed = tuple(
            ipaddress.ip_network(a, strict=False) for a in config.addresses if _is_network(a)
        )
        self.resolve()
        pinned = config.client_certificate
        self.pinned_sha256 = (
            _certificate_sha256(secret_path(pinned)) if pinned and pinned != ISSUED_BY_CA else None
        )

    def resolve(self) -> None:
        """Look the host names up (at start, and when a connection matches none)."""
        found: list[Network] = []
        for name in self._names:
            try:
                infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
            except OSError as exc:
                log.warning(
                    "peer.unresolved",
                    phase="resolve",
                    peer=self.config.ae_title,
                    host=name,
                    error=str(exc),
                )
                continue
            for info in infos:
                found.append(ipaddress.ip_network(normalised(str(info[4][0]))))
        with self._lock:
            self._networks = (*self._fixed, *found)
            self._resolved_at = time.monotonic()

    def has(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if any(address in network for network in self._networks):
            return True
        if self._names and time.monotonic() - self._resolved_at > RESOLVE_AGAIN_S:
            self.resolve()
            return any(address in network for network in self._networks)
        return False


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
        return True
    except ValueError:
        return False


def _certificate_sha256(path: Path) -> bytes:
    """The SHA-256 of a PEM certificate's DER form (what a pinned peer must present)."""
    try:
        pem = path.read_text(encoding="ascii")
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).digest()
    except (OSError, ValueError) as exc:
        raise ValueError(f"dicom.peers: client certificate {path}: {exc}") from None


class PeerPolicy:
    """The configured peers; thread-safe (association threads judge concurrently)."""

    def __init__(self, dicom: DicomConfig) -> None:
        self._peers = [_Peer(peer) for peer in dicom.peers]
        self._unlisted = frozenset(dicom.unlisted_permissions)

    @property
    def open(self) -> bool:
        """No peers listed: any AE title from any address gets the unlisted permissions."""
        return not self._peers

    def address_known(self, address: str) -> bool:
        """Whether any peer connects from this address (checked before any PDU is read).
        Loopback is the box itself (its health checks, selftest): judged on the pair only."""
        if self.open:
            return True
        try:
            parsed = normalised(address)
        except ValueError:
            return False
        return parsed.is_loopback or any(peer.has(parsed) for peer in self._peers)

    def judge(
        self, ae_title: str, address: str, *, tls: bool, certificate: bytes | None
    ) -> Grant | Refusal:
        """What the pair (ae_title, address) may do, given how it connected."""
        if self.open:
            return Grant(peer=None, permissions=self._unlisted, move_to=None)
        parsed = normalised(address)
        peer = next(
            (p for p in self._peers if p.config.ae_title == ae_title and p.has(parsed)), None
        )
        if peer is None:
            return Refusal("peer", f"{ae_title} from {address} is not a configured peer")
        config = peer.config
        if (config.require_tls or config.client_certificate) and not tls:
            return Refusal("tls", f"{ae_title} may associate only over TLS")
        if config.client_certificate:
            if certificate is None:
                return Refusal("certificate", f"{ae_title} presented no client certificate")
            if peer.pinned_sha256 and hashlib.sha256(certificate).digest() != peer.pinned_sha256:
                return Refusal("certificate", f"{ae_title}'s certificate is not the pinned one")
        return Grant(
            peer=ae_title,
            permissions=frozenset(config.permissions),
            move_to=frozenset(config.move_to or (ae_title,)),
        )

    def pinned_certificates(self) -> Iterable[Path]:
        """Pinned client certificates: each is also a trust anchor for the TLS handshake."""
        for peer in self._peers:
            pinned = peer.config.client_certificate
            if pinned and pinned != ISSUED_BY_CA:
                yield secret_path(pinned)
