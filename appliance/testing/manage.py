"""An emulator of the NHS Manage API's image endpoint, for tests and the demo.

`PUT /api/v1/dicom/{action_id}` with one multipart part `file`, as Manage answers it
(../shared/MANAGE-CONTRACT.md): the bearer token verified against the test tenant's keys
(RS256, audience, issuer, `oid`); the action must be known, belong to this gateway's `oid`,
have been created today and be in state sent/confirmed, its appointment in progress; the file
at most 100 MiB, DICOM, with its UIDs. 201 with the UIDs and an instance id, also for an image
it already has; 400 / 401 / 403 / 422 / 500 otherwise, with Manage's error body. The failure
report (`PATCH .../failure`) marks the action image_failed, after which every upload for it is
403. Faults: `script` (statuses to answer next, e.g. a 503 storm).
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import pydicom
from attrs import define, field
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from appliance.testing.entra import verify

MAX_UPLOAD = 100 * 1024 * 1024


@define
class ManageAction:
    """What Manage holds about one worklist action."""

    gateway_oid: str
    created: datetime.date = field(factory=datetime.date.today)
    status: str = "sent"  # sent, confirmed, image_failed, ...
    appointment_in_progress: bool = True
    study_instance_uid: str | None = None


class ManageEmulator:
    def __init__(self, jwks: dict[str, Any], issuer: str, audience: str) -> None:
        self.jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self.actions: dict[str, ManageAction] = {}
        #: (action_id, SOP Instance UID) -> instance id: what Manage has.
        self.instances: dict[tuple[str, str], str] = {}
        #: The bytes of every file accepted, by SOP Instance UID.
        self.received: dict[str, bytes] = {}
        #: The part's filename of every file accepted, by SOP Instance UID.
        self.filenames: dict[str, str] = {}
        #: Every request answered: (method, action_id, status).
        self.log: list[tuple[str, str, int]] = []
        #: Statuses to answer next instead of judging (faults), first first.
        self.script: list[int] = []
        #: Retry-After (seconds) sent with a scripted 429 or 503.
        self.retry_after: int | None = None
        #: Tokens issued before this moment are refused as expired (token rotation).
        self.tokens_valid_from = 0
        #: Each upload is answered this much later (a slow link: uploads in flight).
        self.delay_s = 0.0
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def issuers(self) -> tuple[str, ...]:
        """What Manage's validator accepts: the v1 issuer managed-identity tokens carry, and
        the tenant's v2 form (listed with a trailing slash)."""
        tenant = self.issuer.rstrip("/").rsplit("/", 1)[-1]
        v2 = f"https://login.microsoftonline.com/{tenant}/v2.0"
        return (self.issuer, v2, v2 + "/")

    def uploads(self, status: int = 201) -> list[str]:
        return [action for method, action, code in self.log if method == "PUT" and code == status]

    # -- judging ----------------------------------------------------------------------------

    def _problem(self, status: int, title: str, detail: str) -> tuple[int, dict[str, Any]]:
        body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
        return status, body | {"instance": "/api/v1/dicom"}

    def _identity(self, headers: Any) -> str | tuple[int, dict[str, Any]]:
        authorization = headers.get("Authorization", "")
        if not authorization.startswith("Bearer "):
            return 401, {"detail": "Unauthorized"}
        try:
            claims = verify(
                authorization.removeprefix("Bearer "),
                self.jwks,
                audience=self.audience,
                issuers=self.issuers,
            )
        except jwt.InvalidTokenError:
            return 401, {"detail": "Unauthorized"}
        if int(claims.get("iat", 0)) < self.tokens_valid_from:
            return 401, {"detail": "Unauthorized"}
        oid = claims.get("oid")
        if not oid:
            return self._problem(403, "Forbidden", "token has no oid")
        return str(oid)

    def upload(self, action_id: str, headers: Any, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self.script:
                status = self.script.pop(0)
                code, problem = self._problem(status, "Scripted", f"scripted {status}")
                if status in (429, 503) and self.retry_after is not None:
                    problem["retry_after"] = self.retry_after  # sent as the header (_reply)
                return code, problem
        identity = self._identity(headers)
        if not isinstance(identity, str):
            return identity
        action = self.actions.get(action_id)
        if action is None or action.gateway_oid != identity:
            return self._problem(403, "Forbidden", "not this gateway's action")
        if action.created != datetime.date.today() or action.status not in ("sent", "confirmed"):
            return self._problem(403, "Forbidden", f"action is {action.status}, not today's")
        if len(body) > MAX_UPLOAD:
            return self._problem(400, "Bad Request", "file too large")
        found = _file_part(headers.get("Content-Type", ""), body)
        if found is None:
            return self._problem(422, "Unprocessable Entity", "no file part")
        filename, part = found
        try:
            ds = pydicom.dcmread(io.BytesIO(part), stop_before_pixels=True)
            uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        except Exception:
            return self._problem(400, "Bad Request", "not DICOM, or UIDs missing")
        if not action.appointment_in_progress:
            return self._problem(500, "Internal Server Error", "appointment not in progress")
        if action.study_instance_uid not in (None, uids[0]):
            return self._problem(500, "Internal Server Error", "study used by another action")
        if len(str(ds.get("PatientID", ""))) > 10:
            return self._problem(500, "Internal Server Error", "PatientID too long")
        with self._lock:
            action.study_instance_uid = uids[0]
            instance = self.instances.setdefault((action_id, uids[2]), str(uuid.uuid4()))
            self.received[uids[2]] = part
            self.filenames[uids[2]] = filename
        return 201, {
            "study_instance_uid": uids[0],
            "series_instance_uid": uids[1],
            "sop_instance_uid": uids[2],
            "instance_id": instance,
        }

    def failure(self, action_id: str, headers: Any) -> tuple[int, dict[str, Any]]:
        identity = self._identity(headers)
        if not isinstance(identity, str):
            return identity
        action = self.actions.get(action_id)
        if action is None:
            return self._problem(404, "Not Found", "unknown action")
        action.status = "image_failed"
        return 200, {"status": "failure recorded"}

    # -- HTTP -------------------------------------------------------------------------------

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        emulator = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: none left open

            def log_message(self, *_args: Any) -> None:
                return

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length)

            def _reply(self, method: str, action: str, status: int, body: Any) -> None:
                wait = body.pop("retry_after", None) if isinstance(body, dict) else None
                data = json.dumps(body).encode() if not isinstance(body, bytes) else body
                emulator.log.append((method, action, status))
                self.send_response(status)
                if wait is not None:
                    self.send_header("Retry-After", str(wait))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/healthcheck":
                    self._reply("GET", "", 200, b"OK")
                else:
                    self._reply("GET", "", 404, {"detail": "Not Found"})

            def do_PUT(self) -> None:
                body = self._body()
                time.sleep(emulator.delay_s)
                prefix = "/api/v1/dicom/"
                if not self.path.startswith(prefix):
                    self._reply("PUT", "", 404, {"detail": "Not Found"})
                    return
                action = self.path.removeprefix(prefix)
                self._reply("PUT", action, *emulator.upload(action, self.headers, body))

            def do_PATCH(self) -> None:
                self._body()
                action = self.path.removeprefix("/api/v1/dicom/").removesuffix("/failure")
                self._reply("PATCH", action, *emulator.failure(action, self.headers))

        return Handler

    @contextlib.contextmanager
    def running(self) -> Iterator[ManageEmulator]:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._server.shutdown()
            self._server.server_close()


def _file_part(content_type: str, body: bytes) -> tuple[str, bytes] | None:
    """The filename and bytes of the multipart part named `file`, or None. Parsed by
    python-multipart (the parser FastAPI and Starlette use), not by us."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return None
    parts: list[dict[str, Any]] = []
    header: list[bytes] = [b"", b""]

    def begin() -> None:
        parts.append({"headers": {}, "data": []})

    def field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def header_end() -> None:
        parts[-1]["headers"][header[0].lower()] = header[1]
        header[:] = [b"", b""]

    def data(chunk: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(chunk[start:end])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": begin,
            "on_header_field": field,
            "on_header_value": value,
            "on_header_end": header_end,
            "on_part_data": data,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError:
        return None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") == b"file":
            return disposition.get(b"filename", b"").decode(), b"".join(part["data"])
    return None
