"""An Entra ID tenant in a box, for tests and the demo: Azure Arc's local HIMDS token endpoint
(the challenge flow the real azure-identity client speaks) and the tenant's signing keys.

The endpoint answers GET {IDENTITY_ENDPOINT}?api-version=2020-06-01&resource=R as HIMDS does:
without credentials, 401 with `WWW-Authenticate: Basic realm=<key file>` (a fresh secret in
/var/opt/azcmagent/tokens/<n>.key, the only place azure-identity will read it from); with
`Authorization: Basic <secret>`, an RS256 access token for R with the claims Manage checks (aud,
iss https://sts.windows.net/<tenant>/, oid, tid, exp). The tenant's public keys are served as a
JWKS at /discovery/keys, for the relay and Manage emulators to verify tokens against.

Faults for tests: `reject_resources` (400 invalid_resource, AADSTS500011, as Entra answers for an
unknown audience) and `lifetime_s` (short-lived tokens to exercise renewal).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import secrets
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

#: azure-identity reads the challenge key only from here (Linux), and only files named *.key.
ARC_TOKENS_DIRECTORY = Path("/var/opt/azcmagent/tokens")


class EntraEmulator:
    def __init__(
        self,
        *,
        tenant_id: str | None = None,
        oid: str | None = None,
        lifetime_s: float = 3600.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.tenant_id = tenant_id or str(uuid.uuid4())
        self.oid = oid or str(uuid.uuid4())
        self.lifetime_s = lifetime_s
        self.reject_resources: set[str] = set()
        self.issued: list[dict[str, Any]] = []
        self.challenges = 0
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.key_id = secrets.token_hex(8)
        self._secrets: dict[str, Path] = {}
        self._server = http.server.ThreadingHTTPServer((host, 0), self._handler())
        self._thread: threading.Thread | None = None

    # -- what the other emulators need ------------------------------------------------------

    @property
    def issuer(self) -> str:
        return f"https://sts.windows.net/{self.tenant_id}/"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def identity_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/metadata/identity/oauth2/token"

    @property
    def imds_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """What the Arc agent sets for services on an Arc-enabled machine."""
        return {"IDENTITY_ENDPOINT": self.identity_endpoint, "IMDS_ENDPOINT": self.imds_endpoint}

    def jwks(self) -> dict[str, Any]:
        public = json.loads(RSAAlgorithm.to_jwk(self._key.public_key()))
        return {"keys": [public | {"kid": self.key_id, "use": "sig", "alg": "RS256"}]}

    def token(self, resource: str, *, lifetime_s: float | None = None, **claims: Any) -> str:
        """An access token as Entra would issue to this machine's identity."""
        now = int(time.time())
        body = {
            "aud": resource,
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime_s if lifetime_s is not None else self.lifetime_s),
            "oid": self.oid,
            "sub": self.oid,
            "tid": self.tenant_id,
            "appidacr": "2",
            "idtyp": "app",
        } | claims
        return jwt.encode(body, self._key, algorithm="RS256", headers={"kid": self.key_id})

    # -- the HTTP side ----------------------------------------------------------------------

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        emulator = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:  # quiet: tests read the outcome
                return

            def _reply(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/discovery/keys":
                    self._reply(200, emulator.jwks(), {})
                    return
                if url.path != "/metadata/identity/oauth2/token":
                    self._reply(404, {"error": "not_found"}, {})
                    return
                query = dict(urllib.parse.parse_qsl(url.query))
                self._reply(*emulator._token_response(query, self.headers))

        return Handler

    def _token_response(
        self, query: dict[str, str], headers: Any
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        if headers.get("Metadata") != "true":
            return 400, {"error": "invalid_request", "error_description": "Metadata header"}, {}
        resource = query.get("resource", "")
        authorization = headers.get("Authorization", "")
        if not authorization.startswith("Basic "):
            self.challenges += 1
            path = ARC_TOKENS_DIRECTORY / f"{secrets.token_hex(8)}.key"
            ARC_TOKENS_DIRECTORY.mkdir(parents=True, exist_ok=True)
            secret = secrets.token_urlsafe(32)
            path.write_text(secret)
            os.chmod(path, 0o640)
            self._secrets[secret] = path
            return 401, {"error": "unauthorized"}, {"WWW-Authenticate": f"Basic realm={path}"}
        secret = authorization.removeprefix("Basic ").strip()
        if secret not in self._secrets:
            return 401, {"error": "invalid_client", "error_description": "bad secret"}, {}
        self._secrets.pop(secret).unlink(missing_ok=True)  # one use, as HIMDS does
        if resource in self.reject_resources or not resource:
            return (
                400,
                {
                    "error": "invalid_resource",
                    "error_description": f"AADSTS500011: The resource principal named {resource}"
                    " was not found in the tenant",
                },
                {},
            )
        token = self.token(resource)
        expires_on = int(time.time() + self.lifetime_s)
        self.issued.append({"resource": resource, "expires_on": expires_on})
        body = {
            "access_token": token,
            "expires_in": str(int(self.lifetime_s)),
            "expires_on": str(expires_on),
            "not_before": str(int(time.time())),
            "resource": resource,
            "token_type": "Bearer",
        }
        return 200, body, {}

    # -- lifetime ---------------------------------------------------------------------------

    def start(self) -> EntraEmulator:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        for path in self._secrets.values():
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[EntraEmulator]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def verify(
    token: str, jwks: dict[str, Any], *, audience: str, issuers: tuple[str, ...]
) -> dict[str, Any]:
    """The claims of an RS256 bearer token checked as Manage and Azure Relay check it: a key of
    the tenant, the audience, an accepted issuer, not expired. Raises jwt.InvalidTokenError."""
    header = jwt.get_unverified_header(token)
    keys = {k.get("kid"): k for k in jwks.get("keys", [])}
    key = keys.get(header.get("kid"))
    if key is None or header.get("alg") != "RS256":
        raise jwt.InvalidTokenError("not signed by a key of the tenant")
    claims: dict[str, Any] = jwt.decode(
        token,
        RSAAlgorithm.from_jwk(json.dumps(key)),  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience=audience,
        options={"require": ["exp", "iss", "aud"]},
    )
    if claims["iss"] not in issuers:
        raise jwt.InvalidIssuerError(f"issuer {claims['iss']} not accepted")
    return claims
