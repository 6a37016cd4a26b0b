"""`appliance status`: what the running appliance is doing, in one command.

The appliance writes `state_dir/status.json` atomically every couple of seconds (its services,
ports, associations, relay and pipeline); the command adds what the databases say (images today,
pipeline backlog, outbox depth and age, open studies, disk headroom). A status file older than
STALE_AFTER seconds, or whose process is gone, means the appliance is not running.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from appliance import __version__, metrics
from appliance.control import ControlUnavailable, request
from appliance.log import get_logger
from appliance.outbox import Outbox
from appliance.state import StatePaths, in_use
from appliance.storage.index import IndexReader
from appliance.storage.space import DiskFloor, Space, free_bytes
from appliance.storage.store import InstanceStore
from appliance.supervisor import Criticality
from appliance.worklist.store import WorklistStore

log = get_logger("status")

WRITE_INTERVAL = 2.0
STALE_AFTER = 15.0


class Reporting(Protocol):
    """A service whose state the status shows: a snapshot, safe to call from the Trio thread."""

    def statistics(self) -> Any: ...


def write(paths: StatePaths, snapshot: dict[str, Any]) -> None:
    target = paths.status_file
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(snapshot, default=str, sort_keys=True))
    os.replace(partial, target)


class StatusReporter:
    """Supervised: writes status.json and the metrics file every WRITE_INTERVAL from each
    service's `statistics()`, and answers the cloud's `health` action. A failed write (a full
    disk) is logged and tried again: status is a side-matter and never stops the clinic."""

    name = "status"
    criticality = Criticality.AUXILIARY

    def __init__(
        self,
        paths: StatePaths,
        metrics_file: Path,
        floor: DiskFloor,
        *,
        store: InstanceStore,
        outbox: Outbox,
        servers: Callable[[], dict[str, Any]],
        services: Callable[[], dict[str, Any]],
        pipeline: Reporting,
        studies: Reporting,
        relay: Callable[[], tuple[Reporting | None, Reporting | None]],
        dicom_host: str,
        cloud: Callable[[], dict[str, Reporting | None]] = dict,
    ) -> None:
        #: The cloud's side-matters reporting their own trouble: identity, image uploads.
        self._cloud = cloud
        self._paths = paths
        self._metrics_file = metrics_file
        self._floor = floor
        self._store = store
        self._outbox = outbox
        self._servers = servers
        self._services = services
        self._pipeline = pipeline
        self._studies = studies
        self._relay = relay
        self._host = "127.0.0.1" if dicom_host == "0.0.0.0" else dicom_host
        self.started_at = time.time()
        self._failing = False

    def _relay_statistics(self) -> dict[str, Any] | None:
        listener, sender = self._relay()
        if listener is None:
            return None
        return {
            "listener": listener.statistics(),
            "sender": sender.statistics() if sender else None,
        }

    def snapshot(self) -> dict[str, Any]:
        """What `appliance status` shows of this process."""
        servers = {name: server for name, server in self._servers().items() if server}
        return {
            "written_at": time.time(),
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "services": {name: attrs.asdict(state) for name, state in self._services().items()},
            "ports": {name: server.bound_port for name, server in servers.items()},
            "tls": {
                name: tls
                for name, server in servers.items()
                if (tls := server.statistics().get("tls"))
            },
            "associations": sum(server.active_associations() for server in servers.values()),
            "pipeline": self._pipeline.statistics(),
            "relay": self._relay_statistics(),
            "cloud": self._cloud_statistics(),
            "disk_refusals": self._floor.statistics(),
        }

    def _cloud_statistics(self) -> dict[str, Any]:
        return {name: part.statistics() for name, part in self._cloud().items() if part}

    async def health(self) -> dict[str, Any]:
        """Real checks, for the cloud's `health` action and operators."""
        checks: dict[str, Any] = {}
        for name, server in self._servers().items():
            port = server.bound_port if server else None
            checks[f"{name}_port"] = await _accepts(self._host, port)
        space = await trio.to_thread.run_sync(self._floor.measure)
        checks["disk"] = space.as_dict() | self._floor.statistics()
        undelivered, oldest = await trio.to_thread.run_sync(self._outbox.undelivered)
        checks["outbox"] = {"undelivered": undelivered, "oldest_undelivered": oldest}
        checks["last_image_received"] = await self._store.read(self._store.index.last_received)
        checks["relay"] = self._relay_statistics() or {"enabled": False}
        checks.update(self._cloud_statistics())
        checks["pipeline"] = self._pipeline.statistics()
        checks["studies"] = self._studies.statistics()
        services = {name: attrs.asdict(state) for name, state in self._services().items()}
        checks["services"] = services
        ports = [checks[f"{name}_port"] for name in self._servers()]
        healthy = ports and all(ports) and checks["disk"]["ok"]
        return {
            "healthy": bool(healthy),
            "pid": os.getpid(),
            # Side-matters failing while DICOM serves: the clinic images, someone should look.
            "degraded": self._degraded(services),
            "version": __version__,
            "uptime": round(time.time() - self.started_at),
            "checks": checks,
        }

    def _degraded(self, services: dict[str, Any]) -> list[str]:
        """Services that keep failing: those the supervisor restarts, and those that report
        their own trouble (a relay the cloud refuses, a pipeline that cannot record, status)."""
        names = {name for name, state in services.items() if state["degraded"]}
        listener, sender = self._relay()
        for client in (listener, sender):
            if client is not None and client.statistics().get("misconfigured"):
                names.add(getattr(client, "name", "relay"))
        if self._pipeline.statistics().get("failing"):
            names.add("image-pipeline")
        for name, statistics in self._cloud_statistics().items():
            if statistics.get("failing"):
                names.add(name)
        if self._failing:
            names.add(self.name)
        return sorted(names)

    def _write(self, snapshot: dict[str, Any]) -> None:
        write(self._paths, snapshot)
        live = read(self._paths, self._floor.floor_bytes, self._store, self._outbox)
        metrics.write_textfile(self._metrics_file, metrics.METRICS.render(metrics.gauges(live)))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        deadline = trio.current_time()
        while True:
            try:
                await trio.to_thread.run_sync(self._write, self.snapshot())
            except Exception as exc:  # a full disk, a database error: status is a side-matter
                metrics.METRICS.inc("status_write_failures_total")
                if not self._failing:
                    log.error(
                        "status.write_failed",
                        phase="status-write",
                        error=f"{type(exc).__name__}: {exc}",
                    )
                self._failing = True
            else:
                if self._failing:
                    log.info("status.write_recovered")
                self._failing = False
            deadline += WRITE_INTERVAL
            await trio.sleep_until(deadline)


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


def _for(age: float | None) -> str:
    return f" for {age:.0f} s" if age is not None else ""


def _ask(paths: StatePaths) -> dict[str, Any] | None:
    """The running appliance's own health, over its control socket; None if it answers not."""
    try:
        reply = request(paths.control_socket, {"action_type": "health"}, timeout=5.0)
    except (ControlUnavailable, OSError):
        return None
    health = reply.get("health")
    return health if isinstance(health, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(
    paths: StatePaths,
    min_free_bytes: int,
    store: InstanceStore | None = None,
    outbox: Outbox | None = None,
) -> dict[str, Any]:
    """The status file plus what the databases say, through read-only readers (the running
    appliance passes its own store and outbox, whose readers are pooled)."""
    snapshot: dict[str, Any] = {}
    if paths.status_file.exists():
        try:
            snapshot = json.loads(paths.status_file.read_text())
        except ValueError:  # being replaced as we read: treat as absent
            snapshot = {}
    age = time.time() - snapshot.get("written_at", 0)
    fresh = bool(snapshot) and age < STALE_AFTER and _alive(int(snapshot.get("pid", 0)))
    held = not fresh and in_use(paths)
    live = _ask(paths) if held else None
    if live is not None:
        # Running, but its status file cannot be refreshed (a full disk, a restart on one):
        # what the process itself says, over the control socket, not a stale file.
        checks = live.get("checks", {})
        snapshot |= {
            "version": live.get("version"),
            "pid": live.get("pid"),
            "services": checks.get("services", {}),
            "relay": checks.get("relay") if checks.get("relay", {}).get("listener") else None,
            "pipeline": checks.get("pipeline"),
        }
    running = fresh or live is not None
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT00:00:00")
    if store is None or outbox is None:
        store = InstanceStore(paths)
        outbox = Outbox({"worklist": WorklistStore(paths).database, "images": store.database})
    summary = store.reader.summary(today) if store.database.exists else IndexReader.empty_summary()
    undelivered, oldest = outbox.undelivered()
    space = Space(free_bytes(paths.state_dir) if paths.state_dir.exists() else 0, min_free_bytes)
    return {
        "running": running,
        "status_age_s": round(age, 1) if snapshot else None,
        "status_stale": bool(snapshot) and not fresh,
        "asked_live": live is not None,
        # Holds the state directory yet answers nothing: wedged (systemd's watchdog acts).
        "responding": running or not held,
        **{k: v for k, v in snapshot.items() if k not in ("written_at",)},
        "images_today": summary["images_today"],
        "pipeline_backlog": summary["pipeline_backlog"],
        "open_studies": summary["open_studies"],
        "uploads": summary["uploads"],
        "outbox": {"undelivered": undelivered, "oldest_undelivered": oldest},
        "disk": space.as_dict(),
    }


def render(status: dict[str, Any]) -> str:
    state = "running" if status["running"] else "NOT RUNNING"
    if not status.get("responding", True):
        state = "NOT RESPONDING (holds its state directory, answers nothing)"
    lines = [
        f"appliance: {state}"
        + (
            f" (version {status.get('version')}, pid {status.get('pid')})"
            if status.get("pid")
            else ""
        )
    ]
    if status.get("asked_live"):
        lines.append(
            f"  (status.json not refreshed{_for(status['status_age_s'])}: its write fails,"
            " see status.write_failed; services below as the process reports them now)"
        )
    elif status.get("status_stale") and status.get("status_age_s") is not None:
        lines.append(f"  (services as last reported, {status['status_age_s']:.0f} s ago)")
    for name, service in sorted(status.get("services", {}).items()):
        restarts = f", {service['restarts']} restarts" if service.get("restarts") else ""
        error = ""
        if service.get("last_error"):
            error = f" - last error ({service.get('last_phase') or 'run'}): {service['last_error']}"
        shown = "DEGRADED" if service.get("degraded") else service["state"]
        lines.append(f"  {name:22} {shown}{restarts}{error}")
    ports = status.get("ports", {})
    if ports:
        lines.append("ports: " + ", ".join(f"{k} {v}" for k, v in sorted(ports.items())))
    for name, tls in sorted((status.get("tls") or {}).items()):
        warning = " - RENEW IT" if tls["days_left"] < 21 else ""
        lines.append(
            f"tls {name}: certificate valid until {tls['certificate_not_after']}"
            f" ({tls['days_left']} days){warning}"
        )
    lines.append(f"associations in progress: {status.get('associations', 0)}")
    lines.append(
        f"images today: {status['images_today']}, pipeline backlog: "
        f"{status['pipeline_backlog']}, open studies: {status['open_studies']}"
    )
    uploads = status.get("uploads") or {}
    if uploads:
        lines.append(
            "uploads to Manage: "
            + ", ".join(f"{count} {state}" for state, count in sorted(uploads.items()))
        )
    outbox = status["outbox"]
    lines.append(
        f"outbox: {outbox['undelivered']} undelivered"
        + (f", oldest {outbox['oldest_undelivered']}" if outbox["oldest_undelivered"] else "")
    )
    workers = (status.get("pipeline") or {}).get("workers")
    if workers:
        lines.append(
            f"pixel workers: {workers['busy']} of {workers['workers']} busy, "
            f"{workers['waiting']} waiting, {workers['jobs']} images, {workers['lost']} lost "
            f"(killed or died), peak {workers['peak_rss_mb']} MB each"
        )
    for name, statistics in (status.get("cloud") or {}).items():
        if statistics.get("failing"):
            lines.append(f"{name}: FAILING: {statistics['failing']}")
    failing = (status.get("pipeline") or {}).get("failing")
    if failing:
        lines.append(f"pipeline: FAILING to record outcomes (images wait): {failing}")
    relay = status.get("relay")
    if relay:
        listener, sender = relay.get("listener") or {}, relay.get("sender") or {}
        failures = listener.get("failures_by_phase", {}) | sender.get("failures_by_phase", {})
        lines.append(
            f"relay: listener {'connected' if listener.get('connected') else 'DOWN'}, "
            f"sender {'connected' if sender.get('connected') else 'idle/down'}, "
            f"failures by phase {failures}"
        )
        for client, stats in (("listener", listener), ("sender", sender)):
            if stats.get("misconfigured"):
                lines.append(f"relay {client} MISCONFIGURED: {stats['misconfigured']}")
    disk = status["disk"]
    refusals = status.get("disk_refusals") or {}
    lines.append(
        f"disk: {disk['free_bytes'] / 1e9:.2f} GB free, floor {disk['floor_bytes'] / 1e9:.2f} GB"
        + (
            f": objects over {disk['headroom_bytes'] / 1e6:.0f} MB are refused"
            if disk["ok"]
            else " - BELOW THE FLOOR: every C-STORE is refused (0xA700)"
        )
        + (f"; {refusals['refusals']} refused for space" if refusals.get("refusals") else "")
    )
    return "\n".join(lines)
