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
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"
WRITE_INTERVAL = 2.0
STALE_AFTER = 15.0


def write(state_dir: Path, snapshot: dict[str, Any]) -> None:
    target = state_dir / STATUS_FILE
    partial = target.with_suffix(".json.partial")
    partial.write_text(json.dumps(snapshot, default=str, sort_keys=True))
    os.replace(partial, target)


def _query(path: Path, sql: str, *params: Any) -> Any:
    if not path.exists():
        return None
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return db.execute(sql, params).fetchone()
        except sqlite3.OperationalError:  # a table not created yet
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read(state_dir: Path, min_free_bytes: int) -> dict[str, Any]:
    snapshot: dict[str, Any] = {}
    path = state_dir / STATUS_FILE
    if path.exists():
        snapshot = json.loads(path.read_text())
    age = time.time() - snapshot.get("written_at", 0)
    running = bool(snapshot) and age < STALE_AFTER and _alive(int(snapshot.get("pid", 0)))
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT00:00:00")
    pacs, worklist = state_dir / "pacs.db", state_dir / "worklist.db"
    images = _query(pacs, "SELECT count(*) FROM stored_instances WHERE created_at >= ?", today)
    backlog = _query(pacs, "SELECT count(*) FROM stored_instances WHERE pipeline_state='PENDING'")
    open_studies = _query(pacs, "SELECT count(*) FROM studies WHERE state = 'OPEN'")
    undelivered, oldest = 0, []
    for db in (pacs, worklist):
        row = _query(db, "SELECT count(*), min(occurred_at) FROM events WHERE delivered_at IS NULL")
        if row:
            undelivered += row[0]
            oldest += [row[1]] if row[1] else []
    free = shutil.disk_usage(state_dir).free if state_dir.exists() else 0
    return {
        "running": running,
        "status_age_s": round(age, 1) if snapshot else None,
        **{k: v for k, v in snapshot.items() if k not in ("written_at",)},
        "images_today": images[0] if images else 0,
        "pipeline_backlog": backlog[0] if backlog else 0,
        "open_studies": open_studies[0] if open_studies else 0,
        "outbox": {
            "undelivered": undelivered,
            "oldest_undelivered": min(oldest) if oldest else None,
        },
        "disk": {"free_bytes": free, "floor_bytes": min_free_bytes, "ok": free > min_free_bytes},
    }


def render(status: dict[str, Any]) -> str:
    lines = [
        f"appliance: {'running' if status['running'] else 'NOT RUNNING'}"
        + (
            f" (version {status.get('version')}, pid {status.get('pid')})"
            if status.get("pid")
            else ""
        )
    ]
    if not status["running"] and status.get("status_age_s") is not None:
        lines.append(f"  (services as last reported, {status['status_age_s']:.0f} s ago)")
    for name, service in sorted(status.get("services", {}).items()):
        restarts = f", {service['restarts']} restarts" if service.get("restarts") else ""
        error = f" - last error: {service['last_error']}" if service.get("last_error") else ""
        lines.append(f"  {name:22} {service['state']}{restarts}{error}")
    ports = status.get("ports", {})
    if ports:
        lines.append("ports: " + ", ".join(f"{k} {v}" for k, v in sorted(ports.items())))
    lines.append(f"associations in progress: {status.get('associations', 0)}")
    lines.append(
        f"images today: {status['images_today']}, pipeline backlog: "
        f"{status['pipeline_backlog']}, open studies: {status['open_studies']}"
    )
    outbox = status["outbox"]
    lines.append(
        f"outbox: {outbox['undelivered']} undelivered"
        + (f", oldest {outbox['oldest_undelivered']}" if outbox["oldest_undelivered"] else "")
    )
    relay = status.get("relay")
    if relay:
        listener, sender = relay.get("listener") or {}, relay.get("sender") or {}
        failures = listener.get("failures_by_phase", {}) | sender.get("failures_by_phase", {})
        lines.append(
            f"relay: listener {'connected' if listener.get('connected') else 'DOWN'}, "
            f"sender {'connected' if sender.get('connected') else 'idle/down'}, "
            f"failures by phase {failures}"
        )
    disk = status["disk"]
    lines.append(
        f"disk: {disk['free_bytes'] / 1e9:.1f} GB free"
        + ("" if disk["ok"] else " - BELOW THE FLOOR: C-STORE is refused")
    )
    return "\n".join(lines)
