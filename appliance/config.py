"""The appliance's configuration: one frozen attrs tree, read from TOML, overridable by environment.

Every key is documented in docs/configuration.md. Errors name the key, the value and what was
expected, one line per bad key, so an operator can fix a file without reading code.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import attrs
import cattrs
from attrs import field, frozen
from cattrs.errors import ForbiddenExtraKeysError

DEFAULT_PATH = Path("/etc/screening-gateway/appliance.toml")
#: APPLIANCE__DICOM__STORAGE__PORT=11112 overrides [dicom.storage] port.
ENV_PREFIX = "APPLIANCE__"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per bad key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- validators: each message carries the offending value -------------------------------------


class FieldError(ValueError):
    """A validator's complaint about one key (attrs validators run after cattrs has moved on)."""

    def __init__(self, attribute: attrs.Attribute[Any], message: str) -> None:
        super().__init__(message)
        self.field = attribute.name


_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


def _ae_title(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not _AE_TITLE.match(value) or not value.strip():
        raise FieldError(
            attribute, f'"{value}" is not an AE title (1-16 printable ASCII characters, no "\\")'
        )


def _port(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    # 0 asks the OS for a free port: tests and the demo use it, the bound port is reported.
    if not 0 <= value <= 65535:
        raise FieldError(attribute, f"{value} is not a TCP port (0-65535)")


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise FieldError(attribute, f"{value} must be greater than 0")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise FieldError(attribute, f"{value} must be 0 or more")


def _ip_address(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise FieldError(attribute, f"{value!r} is not an IP address") from None


# --- the tree ------------------------------------------------------------------------------------


#: What a configured peer may ask for, by service (docs/security.md).
PERMISSIONS = ("store", "commit", "worklist", "mpps", "query", "retrieve")
#: A mammography unit's: it stores, asks for commitment, reads the worklist and reports MPPS.
#: Query and retrieve belong to named viewers only.
UNIT_PERMISSIONS = ("store", "commit", "worklist", "mpps")
#: A peer's client certificate checked against the CA in [dicom.tls] (otherwise: a pinned file).
ISSUED_BY_CA = "ca"


def _host_or_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
        return True
    except ValueError:
        labels = value.rstrip(".").split(".")
        return bool(value) and all(
            re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) for label in labels
        )


def _addresses(_inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value:
        raise FieldError(attribute, "at least one address, CIDR range or host name")
    for address in value:
        if not _host_or_network(address):
            raise FieldError(
                attribute, f"{address!r} is not an IP address, a CIDR range or a host name"
            )


def _permissions(_inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for permission in value:
        if permission not in PERMISSIONS:
            raise FieldError(attribute, f"{permission!r} is not one of {', '.join(PERMISSIONS)}")


def _ae_titles(_inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for ae_title in value:
        _ae_title(_inst, attribute, ae_title)


@frozen
class PeerConfig:
    """A peer allowed to associate: an AE title bound to where it connects from, and what it
    may ask for. An association is judged on the pair (docs/security.md)."""

    ae_title: str = field(validator=_ae_title)
    #: IP addresses, CIDR ranges (10.20.1.16/28) or host names (resolved when the listener
    #: starts, and again when a connection matches none of them).
    addresses: tuple[str, ...] = field(validator=_addresses)
    permissions: tuple[str, ...] = field(default=UNIT_PERMISSIONS, validator=_permissions)
    #: C-MOVE destinations ([[dicom.destinations]] AE titles) this peer may send images to;
    #: empty: its own AE title only.
    move_to: tuple[str, ...] = field(default=(), validator=_ae_titles)
    #: Only over the TLS ports.
    require_tls: bool = False
    #: Mutual TLS: "ca" (a client certificate issued by dicom.tls.ca_file), or a PEM file (or
    #: credential name) holding the one certificate this peer must present (pinned). Implies
    #: require_tls.
    client_certificate: str = ""


@frozen
class DestinationConfig:
    """Where the appliance sends to: a C-MOVE destination, or a storage commitment requestor
    that wants its N-EVENT-REPORT on a new association."""

    ae_title: str = field(validator=_ae_title)
    host: str = field(validator=attrs.validators.min_len(1))
    port: int = field(validator=_port)
    #: Associate over TLS, checking the destination's certificate against dicom.tls.ca_file
    #: (and presenting the appliance's own for mutual TLS).
    tls: bool = False
    #: The name its certificate carries; empty: host.
    server_name: str = ""


@frozen
class TlsConfig:
    """DICOM TLS (PS3.15 B.9, the BCP 195 non-downgrading profile): listeners on their own
    ports beside the plain ones, or instead of them."""

    enabled: bool = False
    #: PEM files, or systemd credential names ($CREDENTIALS_DIRECTORY, LoadCredential=).
    certificate_file: str = ""
    key_file: str = ""
    #: The CA (PEM bundle) that issues peers' client certificates and TLS destinations'
    #: server certificates.
    ca_file: str = ""
    #: true: the plain ports are not opened at all.
    only: bool = False

    def __attrs_post_init__(self) -> None:
        if self.enabled:
            for name in ("certificate_file", "key_file"):
                if not getattr(self, name):
                    raise FieldError(
                        getattr(attrs.fields(TlsConfig), name), "required when tls is enabled"
                    )
        elif self.only:
            raise FieldError(attrs.fields(TlsConfig).only, "needs dicom.tls.enabled = true")


@frozen
class StorageScpConfig:
    ae_title: str = field(default="SCREENING_PACS", validator=_ae_title)
    port: int = field(default=4244, validator=_port)
    #: The storage port's TLS twin (2762 is DICOM's registered TLS port), when dicom.tls is on.
    tls_port: int = field(default=2762, validator=_port)
    #: C-STORE is refused with 0xA700 (out of resources) below this much free space.
    min_free_mb: int = field(default=2048, validator=_non_negative)


def _character_set(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    from appliance.dicom.charsets import codecs_for  # the DICOM terms pydicom can encode

    if not codecs_for(value):
        raise FieldError(attribute, f"{value!r} is not a DICOM Specific Character Set we support")


def _character_sets(_inst: object, attribute: attrs.Attribute[Any], value: dict[str, str]) -> None:
    for ae_title, term in value.items():
        if not _AE_TITLE.match(ae_title):
            raise FieldError(attribute, f'"{ae_title}" is not an AE title')
        _character_set(_inst, attribute, term)


@frozen
class WorklistScpConfig:
    ae_title: str = field(default="SCREENING_MWL", validator=_ae_title)
    port: int = field(default=4243, validator=_port)
    #: The worklist port's TLS twin, when dicom.tls is on.
    tls_port: int = field(default=2763, validator=_port)
    #: Answers to a query that names no Specific Character Set (and whose calling AE has no
    #: entry below) are in this one. ISO_IR 6, the default repertoire, is what such a query
    #: declares it understands (PS3.4 K.4.1.1.3.1): other letters are transliterated.
    character_set: str = field(default="ISO_IR 6", validator=_character_set)
    #: Per calling AE title, for units that understand only one (e.g. "ISO_IR 100").
    character_sets: dict[str, str] = field(factory=dict, validator=_character_sets)


def _time_zone(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise FieldError(attribute, f"{value!r} is not a time zone (e.g. Europe/London)") from None


def _local_time(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
        raise FieldError(attribute, f"{value!r} is not a time of day (HH:MM)")


def _code(_inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if value and (len(value) != 3 or not all(value)):
        raise FieldError(attribute, "a code is [value, coding scheme, meaning], all three given")
    for part, limit in zip(value, (16, 16, 64), strict=False):  # SH, SH, LO (PS3.5 6.2)
        if len(part) > limit or "\\" in part:
            raise FieldError(attribute, f'"{part}" is longer than {limit} characters or has "\\"')


def _optional_ae_title(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value:
        _ae_title(_inst, attribute, value)


def _text_of(limit: int) -> Callable[[object, attrs.Attribute[Any], str], None]:
    """A DICOM SH (16) or LO (64) value: one value, at most `limit` characters."""

    def check(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
        if len(value) > limit or "\\" in value:
            raise FieldError(attribute, f"at most {limit} characters and no backslash")

    return check


def _by_modality(value: dict[str, StepDefaults]) -> dict[str, StepDefaults]:
    """Modality keys as DICOM writes them ('mg' is MG); MG keeps its built-in defaults unless
    the site configures MG itself."""
    return {"MG": StepDefaults()} | {key.upper(): item for key, item in value.items()}


@frozen
class StepDefaults:
    """What a worklist item of one modality says when the cloud or the CLI did not say it:
    strict units drop items whose Type 1 keys are empty (PS3.4 K.6)."""

    #: Scheduled Station AE Title; empty: the querying unit's own AE title.
    station_ae_title: str = field(default="", validator=_optional_ae_title)
    station_name: str = field(default="", validator=_text_of(16))
    #: Scheduled Procedure Step Description and Requested Procedure Description.
    description: str = field(default="Screening mammography", validator=_text_of(64))
    #: Scheduled Protocol Code and Requested Procedure Code: [value, scheme, meaning].
    procedure_code: tuple[str, ...] = field(
        default=("24623002", "SCT", "Screening mammography"), validator=_code
    )


@frozen
class WorklistConfig:
    #: Per modality (e.g. "MG"): defaults for what an item did not say.
    defaults: dict[str, StepDefaults] = field(
        factory=lambda: {"MG": StepDefaults()}, converter=_by_modality
    )
    #: The site's time zone: the cloud schedules in UTC, modalities show and query local time.
    timezone: str = field(default="Europe/London", validator=_time_zone)
    #: Daily housekeeping, local time: finished items of past days are archived.
    archive_at: str = field(default="02:00", validator=_local_time)
    #: Items still SCHEDULED/IN PROGRESS this many days after their date are archived as stale.
    stale_after_days: int = field(default=7, validator=_positive)


@frozen
class DicomConfig:
    host: str = field(default="0.0.0.0", validator=_ip_address)
    #: Largest PDU we accept; modalities send PDUs up to this size (pynetdicom's default is 16 KiB).
    #: A peer may send PDUs this large; each association holds one in memory while it arrives.
    max_pdu_bytes: int = field(default=1024 * 1024, validator=_positive)
    max_associations: int = field(default=32, validator=_positive)
    #: Seconds without traffic before an association is aborted.
    network_timeout_s: float = field(default=60.0, validator=_positive)
    #: Who may associate, and what each may ask for. Once one is listed, any other pair of AE
    #: title and address is refused.
    peers: tuple[PeerConfig, ...] = ()
    #: While no peer is listed (a site being set up, the demo): what any AE from any address
    #: may ask for.
    unlisted_permissions: tuple[str, ...] = field(default=UNIT_PERMISSIONS, validator=_permissions)
    #: C-MOVE destinations and storage commitment callbacks, by AE title.
    destinations: tuple[DestinationConfig, ...] = ()
    storage: StorageScpConfig = StorageScpConfig()
    worklist: WorklistScpConfig = WorklistScpConfig()
    tls: TlsConfig = TlsConfig()

    def __attrs_post_init__(self) -> None:
        peers = attrs.fields(DicomConfig).peers
        known = {destination.ae_title for destination in self.destinations}
        for index, peer in enumerate(self.peers):
            where = f"[{index}] ({peer.ae_title})"
            for target in peer.move_to:
                if target not in known:
                    raise FieldError(
                        peers, f"{where}.move_to: {target} is not a dicom.destinations entry"
                    )
            if (peer.require_tls or peer.client_certificate) and not self.tls.enabled:
                raise FieldError(peers, f"{where} needs TLS: dicom.tls.enabled = true")
            if peer.client_certificate == ISSUED_BY_CA and not self.tls.ca_file:
                raise FieldError(
                    peers, f'{where}.client_certificate = "ca" needs dicom.tls.ca_file'
                )
        for index, destination in enumerate(self.destinations):
            if destination.tls and not self.tls.enabled:
                raise FieldError(
                    attrs.fields(DicomConfig).destinations,
                    f"[{index}] ({destination.ae_title}).tls needs dicom.tls.enabled = true",
                )


@frozen
class PipelineConfig:
    thumbnail_height: int = field(default=188, validator=_positive)
    thumbnail_quality: int = field(default=25, validator=_positive)
    preview_height: int = field(default=1024, validator=_positive)
    preview_quality: int = field(default=80, validator=_positive)
    #: Worker processes that decode and render; 0 means one fewer than the cores (at least 1).
    workers: int = field(default=0, validator=_non_negative)
    #: A worker whose peak resident size passed this is replaced after its image.
    worker_memory_mb: int = field(default=1024, validator=_positive)
    #: A worker is replaced after this many images.
    worker_max_images: int = field(default=200, validator=_positive)
    #: A decode + render taking longer (plus a second per 4 MB of file) is killed and retried
    #: (a hung codec, a stopped worker).
    render_timeout_s: float = field(default=300.0, validator=_positive)
    #: Attempts before an instance is reported as image.failed.
    max_attempts: int = field(default=3, validator=_positive)
    retry_after_s: float = field(default=30.0, validator=_positive)


def _views(_inst: object, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for view in value:
        if not re.fullmatch(r"[RLB][A-Z]{2,4}", view):
            raise FieldError(attribute, f"{view!r} is not a view like RCC or LMLO")


@frozen
class StudiesConfig:
    #: A screening study without MPPS is complete once these views are in and it has been quiet.
    expected_views: tuple[str, ...] = field(
        default=("RCC", "LCC", "RMLO", "LMLO"), validator=_views
    )
    #: Expected views per procedure code (Scheduled Protocol code value), overriding the default.
    views_by_procedure: dict[str, tuple[str, ...]] = field(factory=dict)
    quiet_period_s: float = field(default=60.0, validator=_positive)
    #: Last resort: a study with no new image for this long is complete whatever it holds.
    timeout_s: float = field(default=1800.0, validator=_positive)
    check_interval_s: float = field(default=2.0, validator=_positive)


def _at_least_one(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 1:
        raise FieldError(attribute, f"{value} must be at least 1 (day)")


@frozen
class RetentionConfig:
    #: Stored images older than this (days) are deleted once safe; 0 keeps everything.
    keep_days: float = field(default=0.0, validator=_non_negative)
    #: Never delete anything younger than this, whatever keep_days says.
    safety_days: float = field(default=7.0, validator=_at_least_one)
    #: Also require a storage commitment or a cloud image.fetch of the image before deleting it.
    require_commit_or_fetch: bool = False
    interval_s: float = field(default=3600.0, validator=_positive)


@frozen
class MetricsConfig:
    #: Prometheus text file for node_exporter's textfile collector; empty: state_dir/metrics.prom
    textfile: str = ""


@frozen
class LogConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["logfmt", "json"] = "logfmt"


@frozen
class SupervisorConfig:
    #: Bound on a graceful stop (SIGTERM): in-flight associations get this long to finish.
    shutdown_timeout_s: float = field(default=10.0, validator=_positive)
    initial_backoff_s: float = field(default=0.5, validator=_positive)
    max_backoff_s: float = field(default=30.0, validator=_positive)
    #: More restarts than this within restart_window_s and the process exits non-zero.
    max_restarts: int = field(default=5, validator=_non_negative)
    restart_window_s: float = field(default=60.0, validator=_positive)


@frozen
class RelayConfig:
    enabled: bool = False
    #: The Relay namespace, e.g. "site1.servicebus.windows.net" (the token's resource).
    namespace: str = ""
    #: Where to connect; empty means wss://{namespace}. E.g. ws://127.0.0.1:9400 for the emulator.
    endpoint: str = ""
    actions_path: str = "actions"
    events_path: str = "events"
    key_name: str = "RootManageSharedAccessKey"
    #: How the listener and sender authenticate: sas (a key from key_file) or entra (a bearer
    #: token of this machine's identity, `[identity]`; what production namespaces require).
    auth: Literal["sas", "entra"] = "sas"
    #: A file holding the SAS key, or the name of a systemd credential ($CREDENTIALS_DIRECTORY).
    #: Never the key itself: keys do not belong in a config file.
    key_file: str = ""
    token_lifetime_s: float = field(default=3600.0, validator=_positive)
    #: Sent with every event; empty means this machine's host name.
    appliance_id: str = ""
    #: An event not acknowledged by the cloud within this is sent again on a new connection.
    ack_timeout_s: float = field(default=30.0, validator=_positive)
    #: Delivered events are kept this long (for `appliance outbox list --all`), then deleted.
    delivered_retention_days: float = field(default=30.0, validator=_positive)
    ping_interval_s: float = field(default=30.0, validator=_positive)
    ping_timeout_s: float = field(default=10.0, validator=_positive)
    #: image.fetch: bandwidth shared by all fetches, in kbit/s (0: no limit); how many at once.
    fetch_kbps: int = field(default=20_000, validator=_non_negative)
    fetch_concurrency: int = field(default=2, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.enabled and not self.namespace:
            raise FieldError(
                attrs.fields(RelayConfig).namespace, "required when the relay is enabled"
            )
        if self.ping_timeout_s >= self.ping_interval_s:
            raise FieldError(
                attrs.fields(RelayConfig).ping_timeout_s,
                f"{self.ping_timeout_s} must be shorter than ping_interval_s",
            )

    @property
    def url(self) -> str:
        return self.endpoint or f"wss://{self.namespace}"


@frozen
class IdentityConfig:
    """This machine's Microsoft Entra ID identity (docs/cloud.md)."""

    #: managed-identity: the Azure Arc system-assigned identity (IDENTITY_ENDPOINT and
    #: IMDS_ENDPOINT set by the Arc agent); certificate: an app registration's client
    #: certificate, for sites without Arc.
    credential: Literal["managed-identity", "certificate"] = "managed-identity"
    tenant_id: str = ""
    client_id: str = ""
    #: PEM with the private key: a file, or a systemd credential's name.
    certificate_file: str = ""
    #: A token is renewed this long before it expires.
    refresh_margin_s: float = field(default=300.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.credential == "certificate":
            for name in ("tenant_id", "client_id", "certificate_file"):
                if not getattr(self, name):
                    raise FieldError(
                        getattr(attrs.fields(IdentityConfig), name),
                        "required when identity.credential is certificate",
                    )


@frozen
class CloudConfig:
    """What the appliance speaks to the cloud (docs/cloud.md)."""

    #: relay-events: actions in and events out over two hybrid connections (the seeds' design);
    #: manage: the NHS's Manage service (its action replies, images uploaded over HTTPS).
    profile: Literal["relay-events", "manage"] = "relay-events"
    #: The zone of a create_item's scheduled date and time, which carry none. The NHS gateway
    #: documents them as UTC.
    scheduled_time_zone: str = field(default="UTC", validator=_time_zone)
    #: Manage's API (profile manage): its base URL and its app registration's audience
    #: (e.g. api://<app id>), for which this machine's Entra token is asked.
    api_url: str = ""
    api_audience: str = ""
    #: Studies uploaded at once (images of one study go one after another).
    upload_concurrency: int = field(default=4, validator=_positive)
    #: An image that keeps failing for reasons that may pass is retried this long.
    upload_retry_days: float = field(default=7.0, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.profile == "manage":
            for name in ("api_url", "api_audience"):
                if not getattr(self, name):
                    raise FieldError(
                        getattr(attrs.fields(CloudConfig), name),
                        "required when cloud.profile is manage",
                    )


def _remote(_inst: object, attribute: attrs.Attribute[Any], value: str) -> None:
    host, _, port = value.rpartition(":")
    if value and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise FieldError(attribute, f"{value!r} is not host:port (e.g. audit.example.nhs.uk:6514)")


@frozen
class AuditConfig:
    """The audit trail of patient-data access and security events (docs/security.md)."""

    #: The local trail starts a new file past this size, and deletes the oldest past keep_files.
    rotate_mb: float = field(default=16.0, validator=_positive)
    keep_files: int = field(default=64, validator=_positive)
    #: A remote audit repository, syslog over TLS (RFC 5425): host:port; empty: local only.
    remote: str = field(default="", validator=_remote)
    #: The CA (PEM) that issued the repository's certificate; empty: the system's store.
    remote_ca_file: str = ""
    #: The name the repository's certificate carries; empty: the host of remote.
    remote_server_name: str = ""


@frozen
class Config:
    state_dir: Path = Path("/var/lib/screening-gateway")
    dicom: DicomConfig = DicomConfig()
    worklist: WorklistConfig = WorklistConfig()
    pipeline: PipelineConfig = PipelineConfig()
    studies: StudiesConfig = StudiesConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    retention: RetentionConfig = RetentionConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    relay: RelayConfig = RelayConfig()
    identity: IdentityConfig = IdentityConfig()
    cloud: CloudConfig = CloudConfig()
    audit: AuditConfig = AuditConfig()


# --- structuring ---------------------------------------------------------------------------------


def _strict(kind: type, accepts: tuple[type, ...], name: str) -> Callable[[Any, type], Any]:
    def structure(value: Any, _type: type) -> Any:
        # bool is an int in Python; a config value of `true` for a port is still a mistake.
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepts):
            raise ValueError(f"expected {name}, got {value!r}")
        return kind(value)

    return structure


def strict_converter(forbid_extra_keys: bool) -> cattrs.Converter:
    """A converter that never coerces: `"4244"` is not an int, `true` is not a port."""
    converter = cattrs.Converter(forbid_extra_keys=forbid_extra_keys)
    converter.register_structure_hook(int, _strict(int, (int,), "an integer"))
    converter.register_structure_hook(float, _strict(float, (int, float), "a number"))
    converter.register_structure_hook(str, _strict(str, (str,), "a string"))
    converter.register_structure_hook(bool, _strict(bool, (bool,), "true or false"))
    converter.register_structure_hook(Path, _strict(Path, (str,), "a path"))
    converter.register_unstructure_hook(Path, str)
    converter.register_structure_hook_func(
        lambda t: bool(get_origin(t) is Literal),  # type: ignore[comparison-overlap]
        _structure_choice,
    )
    return converter


def _structure_choice(value: Any, type_: Any) -> Any:
    choices = get_args(type_)
    if value not in choices:
        raise ValueError(f"expected one of {', '.join(map(str, choices))}, got {value!r}")
    return value


converter = strict_converter(forbid_extra_keys=True)


_FIELD_MARK = "\x1f"


def _describe(exc: BaseException, _type: Any) -> str:
    if isinstance(exc, FieldError):
        return f"{exc.field}{_FIELD_MARK}{exc}"
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"unknown key(s): {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    return str(exc)


def _problems(exc: Exception) -> list[str]:
    lines = []
    for line in cattrs.transform_error(exc, path="$", format_exception=_describe):
        message, _, path = line.rpartition(" @ ")
        if _FIELD_MARK in message:
            field_name, message = message.split(_FIELD_MARK)
            path = f"{path}.{field_name}"
        key = path.removeprefix("$").removeprefix(".") or "(top level)"
        lines.append(f"config: {key}: {message}")
    return lines


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        keys = name.removeprefix(ENV_PREFIX).lower().split("__")
        try:  # a TOML value (4244, true, ["a"]); anything else is taken as a plain string
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def structure(raw: dict[str, Any]) -> Config:
    try:
        return converter.structure(raw, Config)
    except (cattrs.BaseValidationError, ValueError, TypeError) as exc:
        if isinstance(exc, cattrs.BaseValidationError):
            raise ConfigError(_problems(exc)) from None
        raise ConfigError([f"config: {exc}"]) from None


def load(path: Path, environ: dict[str, str] | None = None) -> Config:
    """Read, merge environment overrides, validate. Raises ConfigError."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"config: cannot read {path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config: {path} is not valid TOML: {exc}"]) from None
    raw = _merge(raw, _env_overrides(dict(os.environ) if environ is None else environ))
    config = structure(raw)
    if not config.state_dir.is_absolute():
        # Relative state dirs are relative to the config file, so `just run` works from anywhere.
        config = attrs.evolve(config, state_dir=(path.parent / config.state_dir).resolve())
    return config


def secret_path(reference: str, environ: dict[str, str] | None = None) -> Path:
    """Where a secret named by a config value is: a systemd credential's name (a bare name,
    under $CREDENTIALS_DIRECTORY) or a file path."""
    environ = dict(os.environ) if environ is None else environ
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    return (
        Path(credentials) / reference if credentials and "/" not in reference else Path(reference)
    )


def read_secret(reference: str, key: str, environ: dict[str, str] | None = None) -> bytes:
    """Read a secret named by a config value: a systemd credential name or a file path."""
    if not reference:
        raise ConfigError([f"config: {key}: required when the relay is enabled"])
    path = secret_path(reference, environ)
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError([f"config: {key}: cannot read {path}: {exc.strerror}"]) from None
    if not secret:
        raise ConfigError([f"config: {key}: {path} is empty"])
    return secret


def effective(config: Config, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The config as it will be used, with secrets replaced by a note of where they come from."""
    tree: dict[str, Any] = converter.unstructure(config)
    if config.relay.enabled and config.relay.auth == "sas":
        secret = read_secret(config.relay.key_file, "relay.key_file", environ)
        tree["relay"]["key"] = f"<redacted: {len(secret)} bytes>"
    return tree
