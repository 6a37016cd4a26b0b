"""The composition root: builds every service from the config and runs them under one supervisor."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import attrs
import trio
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification

from appliance import __version__, metrics, status
from appliance.config import Config, read_secret
from appliance.db import connect
from appliance.dicom import _pynetdicom
from appliance.dicom.commitment_scp import COMMITMENT_CONTEXTS, StorageCommitmentSCP
from appliance.dicom.qr_scp import QR_CONTEXTS, QueryRetrieveSCP
from appliance.dicom.server import DicomServer, TrioDoor
from appliance.dicom.storage_scp import STORAGE_CONTEXTS, StorageSCP
from appliance.dicom.worklist_scp import WORKLIST_CONTEXTS, WorklistSCP
from appliance.log import get_logger
from appliance.modality import ModalitySimulator
from appliance.pipeline.service import ImagePipeline
from appliance.relay.actions import CloudActions
from appliance.relay.fetch import ImageFetch
from appliance.relay.listener import RelayListener
from appliance.relay.outbox import Outbox
from appliance.relay.sender import RelaySender
from appliance.sdnotify import Notifier
from appliance.storage.index import StoredInstance
from appliance.storage.layout import StorageLayout, ensure_directory
from appliance.storage.recovery import recover
from appliance.storage.retention import StorageHousekeeper
from appliance.storage.spool import SpoolSweeper
from appliance.storage.store import InstanceStore
from appliance.studies import StudyTracker
from appliance.supervisor import RestartPolicy, Supervisor
from appliance.worklist.housekeeping import WorklistHousekeeper
from appliance.worklist.store import WorklistStore

log = get_logger("appliance")

VERIFICATION = (Verification, DEFAULT_TRANSFER_SYNTAXES)
#: Stored-instance notices waiting for the image pipeline. When full, notices are dropped: the
#: pipeline also scans the index, so the association never waits on it.
PIPELINE_NOTICES = 64


def _echo(event: evt.Event) -> int:
    return 0x0000


class Appliance:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        supervision = config.supervisor
        self.policy = RestartPolicy(
            initial_backoff=supervision.initial_backoff_s,
            max_backoff=supervision.max_backoff_s,
            max_restarts=supervision.max_restarts,
            window=supervision.restart_window_s,
        )
        self.layout = StorageLayout(config.state_dir)
        send, self.stored_instances = trio.open_memory_channel[StoredInstance](PIPELINE_NOTICES)
        self.worklist = WorklistStore(config.state_dir / "worklist.db")
        self.store = InstanceStore(self.layout, stored=send, on_stored=self._image_stored)
        self.studies = StudyTracker(self.store, self.worklist, config.studies)
        self.pipeline = ImagePipeline(
            self.store,
            self.worklist,
            self.stored_instances,
            config.pipeline,
            on_processed=self.studies.notify,
        )
        self.relay_listener: RelayListener | None = None
        self.relay_sender: RelaySender | None = None
        self.outbox = outbox_for(config)
        self.started_at = time.time()
        self.storage_server: DicomServer | None = None
        self.worklist_server: DicomServer | None = None
        self.supervisor: Supervisor | None = None

    def _server(self, name: str, ae_title: str, port: int, contexts, handlers) -> DicomServer:
        return DicomServer(
            name=name,
            ae_title=ae_title,
            port=port,
            contexts=[VERIFICATION, *contexts],
            handlers=[(evt.EVT_C_ECHO, _echo), *handlers],
            dicom=self.config.dicom,
            shutdown_timeout=self.config.supervisor.shutdown_timeout_s,
        )

    def _relay_listener(self, key: bytes) -> RelayListener:
        relay = self.config.relay
        fetch = ImageFetch(
            self.layout,
            relay.fetch_kbps,
            relay.fetch_concurrency,
            on_fetched=lambda uid: self.store.write(self.store.index.released, "fetched_at", [uid]),
        )
        actions = CloudActions(self.worklist, self.health, simulator=self._simulator, fetch=fetch)
        return RelayListener(
            name="relay-listener",
            endpoint=relay.url,
            namespace=relay.namespace,
            path=relay.actions_path,
            key_name=relay.key_name,
            key=key,
            handle=actions.handle,
            token_lifetime=relay.token_lifetime_s,
            ping_interval=relay.ping_interval_s,
            ping_timeout=relay.ping_timeout_s,
        )

    def _simulator(self) -> ModalitySimulator:
        """A simulated unit aimed at this appliance's own ports."""
        dicom = self.config.dicom
        return ModalitySimulator(
            host="127.0.0.1" if dicom.host == "0.0.0.0" else dicom.host,
            worklist_port=self.worklist_server.bound_port,
            storage_port=self.storage_server.bound_port,
            worklist_ae=dicom.worklist.ae_title,
            storage_ae=dicom.storage.ae_title,
        )

    def _relay_sender(self, key: bytes) -> RelaySender:
        relay = self.config.relay
        return RelaySender(
            outbox=self.outbox,
            endpoint=relay.url,
            namespace=relay.namespace,
            path=relay.events_path,
            key_name=relay.key_name,
            key=key,
            appliance_id=relay.appliance_id or socket.gethostname(),
            token_lifetime=relay.token_lifetime_s,
            ack_timeout=relay.ack_timeout_s,
            retention_days=relay.delivered_retention_days,
            ping_interval=relay.ping_interval_s,
        )

    async def health(self) -> dict:
        """Real checks, for the cloud's `health` action and operators."""
        host = "127.0.0.1" if self.config.dicom.host == "0.0.0.0" else self.config.dicom.host
        checks: dict = {}
        for name, server in (
            ("storage_port", self.storage_server),
            ("worklist_port", self.worklist_server),
        ):
            checks[name] = await _accepts(host, server.bound_port) if server else False
        free = await trio.to_thread.run_sync(self.store.free_bytes)
        floor = self.config.dicom.storage.min_free_mb * 1024 * 1024
        checks["disk"] = {"ok": free > floor, "free_bytes": free, "floor_bytes": floor}
        image_events = await self.store.read(self.store.index.undelivered_events)
        workflow_events = await trio.to_thread.run_sync(self.worklist.undelivered_events)
        oldest = [o for o in (image_events[1], workflow_events[1]) if o]
        checks["outbox"] = {
            "undelivered": image_events[0] + workflow_events[0],
            "oldest_undelivered": min(oldest) if oldest else None,
        }
        checks["last_image_received"] = await self.store.read(self.store.index.last_received)
        checks["relay"] = (
            {
                "listener": self.relay_listener.statistics(),
                "sender": self.relay_sender.statistics() if self.relay_sender else None,
            }
            if self.relay_listener
            else {"enabled": False}
        )
        checks["pipeline"] = self.pipeline.statistics()
        checks["studies"] = {"open": self.studies.open_studies}
        healthy = checks["storage_port"] and checks["worklist_port"] and checks["disk"]["ok"]
        return {
            "healthy": bool(healthy),
            "version": __version__,
            "uptime": round(time.time() - self.started_at),
            "checks": checks,
        }

    def snapshot(self) -> dict:
        """What `appliance status` shows of this process."""
        servers = {"storage": self.storage_server, "worklist": self.worklist_server}
        return {
            "written_at": time.time(),
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "services": {
                name: attrs.asdict(state) for name, state in self.supervisor.statistics().items()
            }
            if self.supervisor
            else {},
            "ports": {name: s.bound_port for name, s in servers.items() if s},
            "associations": sum(s.active_associations() for s in servers.values() if s),
            "pipeline": self.pipeline.statistics(),
            "relay": {
                "listener": self.relay_listener.statistics(),
                "sender": self.relay_sender.statistics() if self.relay_sender else None,
            }
            if self.relay_listener
            else None,
        }

    async def _write_status(self) -> None:
        deadline = trio.current_time()
        while True:
            await trio.to_thread.run_sync(status.write, self.config.state_dir, self.snapshot())
            await trio.to_thread.run_sync(self._write_metrics)
            deadline += status.WRITE_INTERVAL
            await trio.sleep_until(deadline)

    def _write_metrics(self) -> None:
        floor = self.config.dicom.storage.min_free_mb * 1024 * 1024
        live = status.read(self.config.state_dir, floor)
        path = Path(self.config.metrics.textfile or self.config.state_dir / "metrics.prom")
        metrics.write_textfile(path, metrics.METRICS.render(metrics.gauges(live)))

    def _describe(self) -> str:
        servers = (self.storage_server, self.worklist_server)
        ports = [server.bound_port if server else None for server in servers]
        return f"storage_port={ports[0]} worklist_port={ports[1]}"

    async def _image_stored(self, instance: StoredInstance) -> None:
        if instance.accession_number:
            await self.worklist.write(self.worklist.image_arrived, instance.accession_number)

    async def _open_stores(self) -> None:
        def open_and_recover() -> None:
            ensure_directory(self.config.state_dir)
            self.worklist.open()
            self.store.open()
            report = recover(self.layout, self.store.index)
            log.info("storage.recovered", **attrs.asdict(report))

        _pynetdicom.configure(self.layout.spool)
        await trio.to_thread.run_sync(open_and_recover)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dicom = self.config.dicom
        log.info("appliance.starting", version=__version__, state_dir=self.config.state_dir)
        await self._open_stores()
        door = TrioDoor.current()
        storage_scp = StorageSCP(self.store, door, dicom.storage.min_free_mb * 1024 * 1024)
        qr_scp = QueryRetrieveSCP(self.layout, dicom.destinations)
        commitment_scp = StorageCommitmentSCP(
            self.layout,
            dicom.storage.ae_title,
            dicom.destinations,
            on_committed=lambda uids: door.run(
                self.store.write, self.store.index.released, "committed_at", uids
            ),
        )
        self.storage_server = self._server(
            "storage-scp",
            dicom.storage.ae_title,
            dicom.storage.port,
            [*STORAGE_CONTEXTS, *QR_CONTEXTS, *COMMITMENT_CONTEXTS],
            [*storage_scp.handlers(), *qr_scp.handlers(), *commitment_scp.handlers()],
        )
        worklist_scp = WorklistSCP(
            self.worklist, door, dicom.worklist, self.config.worklist.timezone
        )
        self.worklist_server = self._server(
            "worklist-scp",
            dicom.worklist.ae_title,
            dicom.worklist.port,
            WORKLIST_CONTEXTS,
            worklist_scp.handlers(),
        )
        # An active transfer touches its spool file continuously; an idle association is aborted
        # after network_timeout_s. Anything much older belongs to an association that is gone.
        self.housekeeper = StorageHousekeeper(
            self.store,
            self.config.retention,
            dicom.storage.min_free_mb * 1024 * 1024,
            worklist=self.worklist,
        )
        sweeper = SpoolSweeper(self.layout.spool, older_than=max(300, 4 * dicom.network_timeout_s))
        services = []
        if self.config.relay.enabled:
            relay = self.config.relay
            key = await trio.to_thread.run_sync(read_secret, relay.key_file, "relay.key_file")
            self.relay_listener = self._relay_listener(key)
            self.relay_sender = self._relay_sender(key)
            services += [(self.relay_listener, self.policy), (self.relay_sender, self.policy)]
        self.supervisor = Supervisor(
            [
                *services,
                (self.storage_server, self.policy),
                (self.worklist_server, self.policy),
                (sweeper, self.policy),
                (WorklistHousekeeper(self.worklist, self.config.worklist), self.policy),
                (self.housekeeper, self.policy),
                (self.pipeline, self.policy),
                (self.studies, self.policy),
            ],
            self.notifier,
            describe=self._describe,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_status)
                await self.supervisor.run(task_status=task_status)
        finally:
            # Servers have drained by now (their own shielded cleanup); the stores close last.
            self.store.close()
            self.worklist.close()


def outbox_for(config: Config) -> Outbox:
    return Outbox(
        {
            "worklist": lambda: connect(config.state_dir / "worklist.db"),
            "images": lambda: connect(config.state_dir / "pacs.db"),
        }
    )


async def _accepts(host: str, port: int | None) -> bool:
    if port is None:
        return False
    try:
        with trio.fail_after(2):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError):
        return False
    await stream.aclose()
    return True


async def _cancel_on_signal(
    scope: trio.CancelScope,
    notifier: Notifier,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("appliance.stopping", signal=signal.Signals(signum).name)
            notifier.stopping()
            scope.cancel()
            return


async def serve(config: Config, notifier: Notifier) -> None:
    """Run until SIGTERM/SIGINT (returns) or a service exhausts its restart budget (raises)."""
    appliance = Appliance(config, notifier)
    async with trio.open_nursery() as nursery:
        await nursery.start(_cancel_on_signal, nursery.cancel_scope, notifier)
        nursery.start_soon(appliance.run)
    log.info("appliance.stopped")
