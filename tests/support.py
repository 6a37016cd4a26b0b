"""Test support: config files, and the real appliance as a subprocess watched via sd_notify."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

BASE_CONFIG: dict[str, Any] = {
    "dicom": {
        "host": "127.0.0.1",
        # The tests' peers query and retrieve too; the default (units' services only) and
        # listed peers are specified in tests/test_security.py.
        "unlisted_permissions": ["store", "commit", "worklist", "mpps", "query", "retrieve"],
        "storage": {"port": 0, "min_free_mb": 0},
        "worklist": {"port": 0},
    },
    "supervisor": {"shutdown_timeout_s": 5, "initial_backoff_s": 0.2, "max_backoff_s": 1},
    "log": {"level": "INFO"},
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and key in out else value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def to_toml(tree: dict[str, Any], prefix: str = "") -> str:
    lines, tables = [], []
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            tables.append(f"\n[{name}]\n" + to_toml(value, name))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.extend(f"\n[[{name}]]\n" + to_toml(item, name) for item in value)
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "".join(tables) + "\n"


def write_config(directory: Path, override: dict[str, Any] | None = None) -> Path:
    tree = merge({"state_dir": str(directory / "state"), **BASE_CONFIG}, override or {})
    path = directory / "appliance.toml"
    path.write_text(to_toml(tree))
    return path


class NotifySocket:
    """Stands in for systemd: receives the appliance's sd_notify datagrams."""

    def __init__(self) -> None:
        self.name = f"@appliance-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.received: list[dict[str, str]] = []

    def receive(self, timeout: float) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        message = dict(line.split("=", 1) for line in data.splitlines())
        self.received.append(message)
        return message

    def wait_for(self, key: str, timeout: float) -> dict[str, str]:
        """Read datagrams until one carries `key`; all are kept in `received`."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {key} within {timeout} s; got {self.received}")
            message = self.receive(remaining)
            if key in message:
                return message

    def close(self) -> None:
        self.sock.close()


class ApplianceProcess:
    """`appliance run` in a subprocess, as systemd would run it."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.notify = NotifySocket()
        self.log_path = config.parent / "appliance.log"
        self.env = {**os.environ, "NOTIFY_SOCKET": self.notify.name, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    def start(self) -> ApplianceProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
            env=self.env,
            stdout=self._log,
            stderr=self._log,
        )
        return self

    def wait_ready(self, timeout: float = 30) -> dict[str, int]:
        message = self.notify.wait_for("READY", timeout)
        self.ports = {
            name: int(port) for name, port in re.findall(r"(\w+)_port=(\d+)", message["STATUS"])
        }
        return self.ports

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self) -> ApplianceProcess:
        self.start()
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.notify.close()
        self._log.close()


# --- DICOM files and peers ----------------------------------------------------------------------


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta group: what travels in a C-STORE."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path} is not a DICOM Part 10 file"
    group_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL, explicit VR LE
    return data[144 + group_length :]


def encode(source: Path, target: Path, transfer_syntax: str) -> Path:
    """Re-encode a file with dcmtk's encoders or pydicom's (for those dcmtk lacks)."""
    import pydicom
    from pydicom import uid

    tools = {
        uid.JPEGLosslessSV1: ["dcmcjpeg"],
        uid.JPEGLSLossless: ["dcmcjpls"],
        uid.RLELossless: ["dcmcrle"],
    }
    if transfer_syntax in tools:
        subprocess.run([*tools[transfer_syntax], str(source), str(target)], check=True)
        return target
    ds = pydicom.dcmread(source)
    if transfer_syntax in (uid.JPEG2000Lossless,):
        ds.compress(transfer_syntax, generate_instance_uid=False)  # keep the object's identity
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(target, enforce_file_format=True)
    return target


def send_files(
    port: int,
    paths: list[Path],
    *,
    called: str = "SCREENING_PACS",
    calling: str = "MODALITY1",
) -> list[Any]:
    """C-STORE each file's bytes exactly as they are on disk (pynetdicom chunked send).

    Returns each response's status dataset (or None if the association failed).
    """
    import pydicom
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(calling)
    for path in paths:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        return [None for _ in paths]
    try:
        return [assoc.send_c_store(path) for path in paths]
    finally:
        assoc.release()


def storescu(port: int, *args: str, called: str = "SCREENING_PACS") -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aec", called, *args[:-1], "127.0.0.1", str(port), args[-1]],
        capture_output=True,
        text=True,
        timeout=120,
    )


def index_rows(state_dir: Path, table: str = "stored_instances") -> list[dict[str, Any]]:
    import sqlite3

    with sqlite3.connect(f"file:{state_dir / 'pacs.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute(f"SELECT * FROM {table}")]


# --- real filesystems for fault tests (root: loop devices) --------------------------------------


class SmallDisk:
    """A loop-mounted ext4 image of `size_mb`, with no blocks reserved for root (so a filler
    can take it to 0 bytes free for every writer); removed on exit."""

    def __init__(self, directory: Path, size_mb: int) -> None:
        self.image = directory / "small-disk.img"
        self.mount = directory / "small-disk"
        self.size_mb = size_mb
        self._fillers: list[Path] = []

    def __enter__(self) -> SmallDisk:
        if os.geteuid() != 0:
            raise RuntimeError("a loop-mounted filesystem needs root (.ci/run runs as root)")
        self.image.parent.mkdir(parents=True, exist_ok=True)
        with self.image.open("wb") as image:
            image.truncate(self.size_mb * 1024 * 1024)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "4096", str(self.image)], check=True
        )
        self.mount.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mount)], check=True)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", "-l", str(self.mount)], check=False)
        self.image.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        found = os.statvfs(self.mount)
        return found.f_bavail * found.f_frsize

    def fill(self, leave_bytes: int = 0) -> None:
        """Another writer takes the space, leaving `leave_bytes` (0: until ENOSPC). ext4 gives
        back unused metadata reservations when a file is synced, so the 4 KiB pass repeats
        until a synced pass finds nothing more to take."""
        chunks = [1 << 20] + [1 << 12] * 4
        for chunk in chunks:
            if self.free_bytes() - chunk < leave_bytes and chunk > 4096:
                continue
            path = self.mount / f"filler-{len(self._fillers)}"
            self._fillers.append(path)
            with path.open("wb", buffering=0) as out:
                try:
                    while self.free_bytes() - chunk >= leave_bytes:
                        out.write(b"\xff" * chunk)
                except OSError:
                    pass  # ENOSPC: this chunk size is done
                with contextlib.suppress(OSError):
                    os.fsync(out.fileno())
            if self.free_bytes() <= leave_bytes:
                break

    def free(self) -> None:
        """The operator deletes the filler."""
        for path in self._fillers:
            path.unlink(missing_ok=True)
        self._fillers.clear()
        os.sync()


def large_object(path: Path, pixel_bytes: int) -> Path:
    """A breast tomosynthesis object with `pixel_bytes` of (sparse, zero) pixel data, written in
    seconds: the header from the synthetic generator, then Pixel Data's element header, then
    a hole. What matters to a receive is its size, not its pixels."""
    from appliance.testing import synthetic

    frame = 1024 * 1024 * 2
    frames = max(pixel_bytes // frame, 2)
    ds = synthetic.mammogram(shape=(1024, 1024), frames=frames)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    length = frames * frame
    with path.open("r+b") as out:
        out.seek(0, os.SEEK_END)
        out.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
        out.truncate(out.tell() + length)
    return path


class OrthancProcess:
    """Debian's Orthanc as a peer: its own process, JSON config and storage under `workdir`,
    DICOM and REST on free loopback ports. `modalities` maps a name to (AE, host, port)."""

    def __init__(
        self, workdir: Path, modalities: dict[str, tuple[str, str, int]], ae_title: str = "ORTHANC"
    ) -> None:
        import shutil

        if shutil.which("Orthanc") is None:
            raise RuntimeError("Orthanc is not installed: apt-get install orthanc (just deps)")
        self.ae_title = ae_title
        self.dicom_port, self.http_port = free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "peer",
            "StorageDirectory": str(workdir / "orthanc-storage"),
            "IndexDirectory": str(workdir / "orthanc-index"),
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "StorageCompression": False,
            "DicomModalities": {name: list(entry) for name, entry in modalities.items()},
            "DicomScuTimeout": 30,
            "Plugins": [],
        }
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps(config))
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OrthancProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            ["Orthanc", str(self.config_path)], stdout=self._log, stderr=self._log
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start: {self.log_path.read_text()[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        import urllib.request

        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read()
        if raw:
            return text
        return json.loads(text) if text else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        return self.request("POST", path, body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- storage commitment -------------------------------------------------------------------------

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"


def commitment_request(references: list[tuple[str, str]]) -> Any:
    """An N-ACTION Request Storage Commitment dataset for (SOP Class, SOP Instance) pairs."""
    import pydicom
    from pydicom import Dataset

    request = Dataset()
    request.TransactionUID = pydicom.uid.generate_uid()
    request.ReferencedSOPSequence = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        request.ReferencedSOPSequence.append(item)
    return request


def request_commitment(port: int, request: Any, calling: str = "COMMITTER") -> int:
    """N-ACTION (Request Storage Commitment); the association is released after the response."""
    from pynetdicom import AE

    ae = AE(calling)
    ae.add_requested_context(STORAGE_COMMITMENT)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCREENING_PACS")
    assert assoc.is_established
    try:
        rsp, _ = assoc.send_n_action(request, 1, STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE)
    finally:
        assoc.release()
    return int(rsp.Status)


def hear_commitment(
    port: int, listen_port: int, request: Any, calling: str = "COMMITTER", ssl_context: Any = None
) -> Any:
    """Request commitment as `calling`; the N-EVENT-REPORT heard on `listen_port`, where the
    appliance's [[dicom.destinations]] entry for `calling` points (over TLS with ssl_context)."""
    import threading

    from pynetdicom import AE, evt

    reports: list[Any] = []
    arrived = threading.Event()

    def on_report(event: Any) -> tuple[int, None]:
        reports.append(event.event_information)
        arrived.set()
        return 0x0000, None

    listener = AE(calling)
    listener.add_supported_context(STORAGE_COMMITMENT, scp_role=True, scu_role=False)
    server = listener.start_server(
        ("127.0.0.1", listen_port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        ssl_context=ssl_context,
    )
    try:
        assert request_commitment(port, request, calling) == 0x0000
        assert arrived.wait(30), "no N-EVENT-REPORT within 30 s"
    finally:
        server.shutdown()
    [report] = reports
    assert report.TransactionUID == request.TransactionUID
    return report
