"""The composition root: builds every service from the config and runs them under one supervisor."""

from __future__ import annotations

import signal

import trio
from pynetdicom import DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification

from appliance import __version__
from appliance.config import Config
from appliance.dicom.server import DicomServer
from appliance.log import get_logger
from appliance.sdnotify import Notifier
from appliance.supervisor import RestartPolicy, Supervisor

log = get_logger("appliance")

VERIFICATION = (Verification, DEFAULT_TRANSFER_SYNTAXES)


def _echo(event: evt.Event) -> int:
    return 0x0000


class Appliance:
    def __init__(self, config: Config, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier({})
        dicom, supervision = config.dicom, config.supervisor
        self.policy = RestartPolicy(
            initial_backoff=supervision.initial_backoff_s,
            max_backoff=supervision.max_backoff_s,
            max_restarts=supervision.max_restarts,
            window=supervision.restart_window_s,
        )
        self.storage_server = DicomServer(
            name="storage-scp",
            ae_title=dicom.storage.ae_title,
            port=dicom.storage.port,
            contexts=[VERIFICATION],
            handlers=[(evt.EVT_C_ECHO, _echo)],
            dicom=dicom,
            shutdown_timeout=supervision.shutdown_timeout_s,
        )
        self.worklist_server = DicomServer(
            name="worklist-scp",
            ae_title=dicom.worklist.ae_title,
            port=dicom.worklist.port,
            contexts=[VERIFICATION],
            handlers=[(evt.EVT_C_ECHO, _echo)],
            dicom=dicom,
            shutdown_timeout=supervision.shutdown_timeout_s,
        )
        self.supervisor = Supervisor(
            [(self.storage_server, self.policy), (self.worklist_server, self.policy)],
            self.notifier,
            describe=self._describe,
        )

    def _describe(self) -> str:
        ports = (self.storage_server.bound_port, self.worklist_server.bound_port)
        return f"storage_port={ports[0]} worklist_port={ports[1]}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        log.info("appliance.starting", version=__version__, state_dir=self.config.state_dir)
        await self.supervisor.run(task_status=task_status)


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
