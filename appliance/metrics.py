"""Counters and gauges in the Prometheus text format, written to a file for node_exporter's
textfile collector: no port to open on a clinic network.

Counters count from the process start (Prometheus handles the reset a restart causes); gauges
are taken when the file is written. The file is replaced atomically, so the collector never
reads half of it.
"""

from __future__ import annotations

import datetime
import os
import threading
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PREFIX = "screening_gateway_"

#: Every counter, with its help text: what is not here cannot be counted (a typo fails loudly).
COUNTERS = {
    "associations_total": "DICOM associations, by server and outcome",
    "association_refusals_total": "Connections and associations refused, by server and phase",
    "context_refusals_total": "Services asked for without permission, by server and service",
    "move_refusals_total": "C-MOVEs to a destination the peer may not use, by destination",
    "audit_messages_total": "Audit messages recorded, by event",
    "audit_failures_total": "Audit messages that could not be written to the local trail",
    "c_store_total": "C-STORE requests, by outcome",
    "c_store_bytes_total": "Bytes of C-STORE datasets stored",
    "c_find_total": "C-FIND requests, by service",
    "retrieve_total": "C-GET and C-MOVE requests, by verb",
    "mpps_total": "MPPS requests, by operation (n-create, n-set) and outcome",
    "images_processed_total": "Images through the pipeline, by outcome (thumbnail, failed)",
    "uploads_total": "Image uploads to Manage, by outcome (done, failed, skipped, pending)",
    "events_sent_total": "Events sent to the cloud (including resends)",
    "events_acked_total": "Events acknowledged by the cloud",
    "relay_failures_total": "Relay failures, by client and phase",
    "relay_connects_total": "Relay connections established, by client",
    "service_failures_total": "Supervised service failures (each a restart), by service",
    "status_write_failures_total": "status.json / metrics file refreshes that failed",
}


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)

    def inc(self, name: str, amount: float = 1, **labels: object) -> None:
        if name not in COUNTERS:
            raise KeyError(f"unknown counter {name}")
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        with self._lock:
            self._counters[key] += amount

    def value(self, name: str, **labels: object) -> float:
        key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
        with self._lock:
            return self._counters.get(key, 0.0)

    def render(self, gauges: dict[str, tuple[str, list[tuple[dict[str, object], float]]]]) -> str:
        """The exposition text: every counter (zero until counted) and the given gauges,
        {name: (help, [(labels, value), ...])}."""
        with self._lock:
            counters = dict(self._counters)
        lines = []
        for name, help_text in COUNTERS.items():
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} counter"]
            counted: list[tuple[Mapping[str, object], float]] = [
                (dict(labels), v) for (n, labels), v in counters.items() if n == name
            ]
            ordered = sorted(counted, key=lambda s: sorted(s[0].items()))
            for labels, value in ordered or [({}, 0)]:
                lines.append(_sample(name, labels, value))
        for name, (help_text, samples) in gauges.items():
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} gauge"]
            lines += [_sample(name, labels, value) for labels, value in samples]
        return "\n".join(lines) + "\n"


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: Mapping[str, object], value: float) -> str:
    text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    number = int(value) if float(value).is_integer() else value
    return f"{PREFIX}{name}{{{text}}} {number}" if text else f"{PREFIX}{name} {number}"


def _seconds_until(moment: str) -> float:
    when = datetime.datetime.fromisoformat(moment)
    return round((when - datetime.datetime.now(datetime.UTC)).total_seconds())


def gauges(status: dict[str, Any]) -> dict[str, tuple[str, list[tuple[dict[str, object], float]]]]:
    """Gauges from what `appliance status` reads (appliance.status.read)."""
    outbox, disk = status["outbox"], status["disk"]
    oldest = outbox["oldest_undelivered"]
    age = 0.0
    if oldest:
        moment = datetime.datetime.fromisoformat(oldest)
        age = (datetime.datetime.now(datetime.UTC) - moment).total_seconds()
    services = status.get("services", {})
    relay = status.get("relay") or {}
    return {
        "up": ("1 while the appliance is running", [({}, int(status["running"]))]),
        "service_up": (
            "1 per supervised service that is up",
            [({"service": n}, int(s["state"] == "up")) for n, s in sorted(services.items())],
        ),
        "service_degraded": (
            "1 per supervised service that keeps failing (auxiliary ones restart for ever)",
            [({"service": n}, int(bool(s.get("degraded")))) for n, s in sorted(services.items())],
        ),
        "service_restarts": (
            "Restarts of each supervised service since the process started",
            [({"service": n}, s["restarts"]) for n, s in sorted(services.items())],
        ),
        "tls_certificate_expiry_seconds": (
            "Seconds until each TLS listener's certificate expires",
            [
                ({"listener": name}, _seconds_until(tls["certificate_not_after"]))
                for name, tls in sorted((status.get("tls") or {}).items())
            ],
        ),
        "associations_active": (
            "DICOM associations in progress",
            [({}, status.get("associations", 0))],
        ),
        "images_today": ("Images stored today (UTC)", [({}, status["images_today"])]),
        "pipeline_backlog": (
            "Stored images waiting for the pipeline",
            [({}, status["pipeline_backlog"])],
        ),
        "open_studies": ("Studies not yet complete", [({}, status["open_studies"])]),
        "outbox_undelivered": (
            "Events not yet acknowledged by the cloud",
            [({}, outbox["undelivered"])],
        ),
        "outbox_oldest_age_seconds": (
            "Age of the oldest unacknowledged event",
            [({}, round(age, 1))],
        ),
        "relay_connected": (
            "1 while a relay channel is connected",
            [
                ({"client": name}, int(bool((relay.get(name) or {}).get("connected"))))
                for name in ("listener", "sender")
                if relay
            ],
        ),
        "disk_free_bytes": (
            "Free bytes on the state directory's filesystem",
            [({}, disk["free_bytes"])],
        ),
        "disk_floor_bytes": ("C-STORE is refused below this", [({}, disk["floor_bytes"])]),
    }


def write_textfile(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


#: The process's registry: the DICOM handlers run in pynetdicom's threads, the rest in Trio.
METRICS = Metrics()
