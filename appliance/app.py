"""The composition root: builds every service from the config and runs them under one supervisor.

Wiring only: which object gets which collaborator, in what order services start. Behaviour
lives in the services themselves.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import

from appliance import __version__, audit
from appliance.audit_forwarder import AuditForwarder
from appliance.config import Config, read_secret
from appliance.control import ControlSocket
from appliance.dicom import _pynetdicom
from appliance.dicom.commitment_scp import COMMITMENT_CONTEXTS, StorageCommitmentSCP
from appliance.dicom.door import TrioDoor
from appliance.dicom.qr_scp import FIND_CONTEXTS, RETRIEVE_CONTEXTS, QueryRetrieveSCP
from appliance.dicom.server import DicomServer, Handler, Services
from appliance.dicom.statuses import SUCCESS
from appliance.dicom.storage_scp import STORAGE_CONTEXTS, StorageSCP
from appliance.dicom.worklist_scp import MPPS_CONTEXTS, WORKLIST_CONTEXTS, WorklistSCP
from appliance.identity import RELAY_RESOURCE, EntraTokens, credential_for
from appliance.log import get_logger
from appliance.outbox import LocalRecord, Outbox
from appliance.pipeline.service import ImagePipeline
from appliance.pipeline.studies import StudyTracker
from appliance.pipeline.workers import PixelWorkers
from appliance.relay.actions import CloudActions, TestUnit, UnitSettings
from appliance.relay.endpoint import Liveness, RelayEndpoint
from appliance.relay.fetch import Bandwidth, ImageFetch
from appliance.relay.listener import RelayListener
from appliance.relay.sender import RelaySender
from appliance.sdnotify import Notifier
from appliance.state import StatePaths, exclusive
from appliance.status import StatusReporter
from appliance.storage.files import ensure_directory
from appliance.storage.index import StoredInstance
from appliance.storage.recovery import recover
from appliance.storage.retention import StorageHousekeeper
from appliance.storage.space import DiskFloor, Reserve
from appliance.storage.spool import SpoolSweeper
from appliance.storage.store import InstanceStore
from appliance.supervisor import RestartPolicy, Service, Supervisor
from appliance.uploads import ImageUploader
from appliance.worklist.housekeeping import WorklistHousekeeper
from appliance.worklist.store import WorklistStore

log = get_logger("appliance")

VERIFICATION = (Verification, DEFAULT_TRANSFER_SYNTAXES)
#: Stored-instance notices waiting for the image pipeline. When full, notices are dropped: the
#: pipeline also scans the index, so the association never waits on it.
PIPELINE_NOTICES = 64

#: Makes the test participant's simulated unit from its host, ports, AE titles and image shape
#: (keywords); injected by the entry point (appliance/testing/ is not production code).
TestUnitMaker = Callable[..., TestUnit]


def _echo(event: evt.Event) -> int:
    return SUCCESS


class Appliance:
    def __init__(
        self,
        config: Config,
        notifier: Notifier | None = None,
        *,
        test_unit: TestUnitMaker | None = None,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        self.paths = StatePaths(config.state_dir)
        supervision = config.supervisor
        self.policy = RestartPolicy(
            initial_backoff=supervision.initial_backoff_s,
            max_backoff=supervision.max_backoff_s,
            max_restarts=supervision.max_restarts,
            window=supervision.restart_window_s,
        )
        self.floor = DiskFloor(self.paths.state_dir, config.dicom.storage.min_free_mb * 1024 * 1024)
        send, self.stored_instances = trio.open_memory_channel[StoredInstance](PIPELINE_NOTICES)
        self.worklist = WorklistStore(self.paths)
        self.store = InstanceStore(self.paths, stored=send)
        self.outbox = Outbox({"worklist": self.worklist.database, "images": self.store.database})
        self.studies = StudyTracker(
            self.store, self.worklist, config.studies, ae_title=config.dicom.storage.ae_title
        )
        self.pixel_workers = PixelWorkers(config.pipeline)
        #: The clinic's uplink budget: image.fetch and uploads to Manage share it.
        self.uplink = Bandwidth(config.relay.fetch_kbps * 1000 / 8)
        self.identity = EntraTokens(
            credential_for(config.identity), refresh_margin_s=config.identity.refresh_margin_s
        )
        self.pipeline = ImagePipeline(
            self.store,
            self.worklist,
            self.stored_instances,
            config.pipeline,
            self.pixel_workers,
            on_processed=self.studies.notify,
        )
        self._test_unit = test_unit
        #: startup (state, databases, recovery, first start of the servers), run, or shutdown.
        self.phase = "startup"
        self.uploader: ImageUploader | None = None
        self.audit_forwarder: AuditForwarder | None = None
        self.relay_listener: RelayListener | None = None
        self.relay_sender: RelaySender | None = None
        #: The DICOM listeners by name: storage, worklist and their TLS twins (storage_tls...).
        self.listeners: dict[str, DicomServer] = {}
        self.supervisor: Supervisor | None = None
        self.status = StatusReporter(
            self.paths,
            Path(config.metrics.textfile)
            if config.metrics.textfile
            else self.paths.default_metrics_file,
            self.floor,
            store=self.store,
            outbox=self.outbox,
            servers=lambda: dict(self.listeners),
            services=lambda: self.supervisor.statistics() if self.supervisor else {},
            pipeline=self.pipeline,
            studies=self.studies,
            relay=lambda: (self.relay_listener, self.relay_sender),
            dicom_host=config.dicom.host,
            cloud=lambda: {
                "identity": self.identity if self._entra_in_use() else None,
                "image-uploads": self.uploader,
                "audit-forwarder": self.audit_forwarder,
            },
        )

    def _servers(
        self,
        name: str,
        ae_title: str,
        ports: tuple[int, int],
        services: Services,
        handlers: list[Handler],
    ) -> list[DicomServer]:
        """One AE's listeners: the plain port, its TLS twin (dicom.tls), or only the twin."""
        tls = self.config.dicom.tls
        plain, secure = ports
        listeners = [] if tls.only else [(f"{name}-scp", plain, False)]
        if tls.enabled:
            listeners.append((f"{name}-scp-tls", secure, True))
        return [
            DicomServer(
                name=listener,
                ae_title=ae_title,
                port=port,
                services=[(None, [VERIFICATION]), *services],
                handlers=[(evt.EVT_C_ECHO, _echo), *handlers],
                dicom=self.config.dicom,
                shutdown_timeout=self.config.supervisor.shutdown_timeout_s,
                tls=over_tls,
            )
            for listener, port, over_tls in listeners
        ]

    def _unit(self, settings: UnitSettings) -> TestUnit:
        """The injected simulated unit, aimed at this appliance's own ports."""
        assert self._test_unit is not None
        assert self.storage_server is not None
        assert self.worklist_server is not None
        dicom = self.config.dicom
        return self._test_unit(
            host="127.0.0.1" if dicom.host == "0.0.0.0" else dicom.host,
            worklist_port=self.worklist_server.bound_port,
            storage_port=self.storage_server.bound_port,
            worklist_ae=dicom.worklist.ae_title,
            storage_ae=dicom.storage.ae_title,
            calling_ae=settings.calling_ae,
            shape=(settings.rows, settings.columns),
        )

    def _actions(self) -> CloudActions:
        relay = self.config.relay
        fetch = ImageFetch(self.store, self.uplink, relay.fetch_concurrency)
        fetch.cloud_identity = f"relay:{relay.namespace}/{relay.actions_path}"
        return CloudActions(
            self.worklist,
            self.status.health,
            images=self.store,
            test_unit=self._unit if self._test_unit is not None else None,
            fetch=fetch,
            events_are_sent=relay.enabled and self.config.cloud.profile == "relay-events",
            profile=self.config.cloud.profile,
            scheduled_zone=self.config.cloud.scheduled_time_zone,
            listener_uptime=lambda: self.relay_listener.uptime() if self.relay_listener else 0.0,
            probe=self._probe_cloud if self.config.cloud.profile == "manage" else None,
            cloud_identity=fetch.cloud_identity,
        )

    async def _probe_cloud(self) -> dict[str, Any]:
        if self.uploader is None:
            raise RuntimeError("the uploader has not started")
        return await self.uploader.probe()

    def _relay(self, actions: CloudActions, key: bytes) -> list[Service]:
        relay = self.config.relay
        liveness = Liveness(relay.ping_interval_s, relay.ping_timeout_s)
        tokens = self.identity.bearer(RELAY_RESOURCE) if relay.auth == "entra" else None
        self.relay_listener = RelayListener(
            name="relay-listener",
            endpoint=RelayEndpoint.from_config(relay, relay.actions_path, key),
            handle=actions.handle,
            liveness=liveness,
            tokens=tokens,
        )
        if self.config.cloud.profile == "manage":
            # Manage sends actions and receives images over HTTPS; it listens on no relay.
            return [self.relay_listener]
        self.relay_sender = RelaySender(
            outbox=self.outbox,
            endpoint=RelayEndpoint.from_config(relay, relay.events_path, key),
            appliance_id=relay.appliance_id or socket.gethostname(),
            ack_timeout=relay.ack_timeout_s,
            retention_days=relay.delivered_retention_days,
            liveness=liveness,
            tokens=tokens,
        )
        return [self.relay_listener, self.relay_sender]

    def _entra_in_use(self) -> bool:
        return (
            self.config.relay.enabled and self.config.relay.auth == "entra"
        ) or self.config.cloud.profile == "manage"

    @property
    def storage_server(self) -> DicomServer | None:
        return self.listeners.get("storage") or self.listeners.get("storage_tls")

    @property
    def worklist_server(self) -> DicomServer | None:
        return self.listeners.get("worklist") or self.listeners.get("worklist_tls")

    def _describe(self) -> str:
        return " ".join(
            f"{name}_port={server.bound_port}" for name, server in self.listeners.items()
        )

    def _open_stores(self) -> None:
        if Reserve(self.paths.reserve).release_if_needed():
            log.warning("disk.reserve_released", phase="startup", **self.floor.measure().as_dict())
        audit.TRAIL.open(
            self.paths.audit,
            source_id=self.config.relay.appliance_id or socket.gethostname(),
            rotate_mb=self.config.audit.rotate_mb,
            keep_files=self.config.audit.keep_files,
        )
        audit.record(audit.application_activity(True, __version__))
        self.worklist.open()
        self.store.open()
        report = self.store.database.run_sync(
            lambda: recover(self.paths, list(self.store.index.instances()), self.store.index)
        )
        log.info("storage.recovered", **attrs.asdict(report))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        log.info("appliance.starting", version=__version__, state_dir=self.config.state_dir)
        await trio.to_thread.run_sync(ensure_directory, self.paths.state_dir)
        # A few seconds' grace: a command's brief look (`worklist add`, `status`) may hold it.
        held = contextlib.ExitStack()
        await trio.to_thread.run_sync(held.enter_context, exclusive(self.paths, wait=5.0))
        with held:
            try:
                _pynetdicom.configure(self.paths.spool, self.floor)
                await trio.to_thread.run_sync(self._open_stores)
                await self._serve(task_status)
            finally:
                # Servers have drained by now (their own shielded cleanup); the stores close last.
                self.store.close()
                self.worklist.close()
                if audit.TRAIL.directory is not None:
                    audit.record(audit.application_activity(False, __version__))
                    audit.TRAIL.close()

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        dicom = self.config.dicom
        door = TrioDoor.current()
        storage_scp = StorageSCP(self.store, door, self.floor)
        qr_scp = QueryRetrieveSCP(
            self.store.reader, dicom.destinations, dicom.storage.ae_title, dicom.tls
        )
        commitment = StorageCommitmentSCP(
            self.store,
            door,
            dicom.storage.ae_title,
            dicom.destinations,
            self.pixel_workers,
            dicom.tls,
        )
        storage_servers = self._servers(
            "storage",
            dicom.storage.ae_title,
            (dicom.storage.port, dicom.storage.tls_port),
            [
                ("store", STORAGE_CONTEXTS),
                ("query", FIND_CONTEXTS),
                ("retrieve", RETRIEVE_CONTEXTS),
                ("commit", COMMITMENT_CONTEXTS),
            ],
            [*storage_scp.handlers(), *qr_scp.handlers(), *commitment.handlers()],
        )
        worklist_scp = WorklistSCP(
            self.worklist,
            door,
            dicom.worklist,
            self.config.worklist.timezone,
            self.config.worklist.defaults,
        )
        worklist_servers = self._servers(
            "worklist",
            dicom.worklist.ae_title,
            (dicom.worklist.port, dicom.worklist.tls_port),
            [("worklist", WORKLIST_CONTEXTS), ("mpps", MPPS_CONTEXTS)],
            worklist_scp.handlers(),
        )
        self.listeners = {
            server.name.replace("-scp", "").replace("-", "_"): server
            for server in (*storage_servers, *worklist_servers)
        }
        # An active transfer touches its spool file continuously; an idle association is aborted
        # after network_timeout_s. Anything much older belongs to an association that is gone.
        sweeper = SpoolSweeper(self.paths.spool, older_than=max(300, 4 * dicom.network_timeout_s))
        housekeeper = StorageHousekeeper(
            self.store,
            self.config.retention,
            self.floor,
            worklist=self.worklist,
            require_upload=self.config.cloud.profile == "manage",
        )
        actions = self._actions()
        services: list[Service] = [
            self.status,
            ControlSocket(self.paths.control_socket, actions.handle_local),
            actions,
        ]
        if self.config.relay.enabled:
            relay = self.config.relay
            key = b""
            if relay.auth == "sas":
                key = await trio.to_thread.run_sync(read_secret, relay.key_file, "relay.key_file")
            services += self._relay(actions, key)
        if self.config.cloud.profile == "manage":
            # No cloud takes events: they are the local record (and retention waits on uploads).
            services.append(LocalRecord(self.outbox, self.config.relay.delivered_retention_days))
            self.uploader = ImageUploader(
                self.store, self.worklist, self.config.cloud, self.identity, self.uplink
            )
            services.append(self.uploader)
        if self.config.audit.remote:
            self.audit_forwarder = AuditForwarder(self.paths.audit, self.config.audit, dicom.tls)
            services.append(self.audit_forwarder)
        services += [
            commitment,
            *self.listeners.values(),
            sweeper,
            WorklistHousekeeper(self.worklist, self.config.worklist),
            housekeeper,
            self.pixel_workers,
            self.pipeline,
            self.studies,
        ]
        self.supervisor = Supervisor(
            [(service, self.policy) for service in services],
            self.notifier,
            describe=self._describe,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run)
            self.phase = "run"
            task_status.started()


async def cancel_on_signal(
    scope: trio.CancelScope,
    notifier: Notifier,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("appliance.stopping", phase="shutdown", signal=signal.Signals(signum).name)
            notifier.stopping()
            scope.cancel()
            return


async def serve(appliance: Appliance) -> None:
    """Run until SIGTERM/SIGINT (returns) or a service exhausts its restart budget (raises);
    `appliance.phase` says where a failure happened."""
    async with trio.open_nursery() as nursery:
        await nursery.start(cancel_on_signal, nursery.cancel_scope, appliance.notifier)
        nursery.start_soon(appliance.run)
    log.info("appliance.stopped")
