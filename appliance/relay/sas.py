"""Shared Access Signature tokens, as Azure Relay issues and checks them.

    SharedAccessSignature sr=<url-encoded resource>&sig=<url-encoded base64 HMAC-SHA256>
                          &se=<expiry, unix seconds>&skn=<key name>

The HMAC key is the key *string* as Azure shows it (UTF-8), not its base64 decoding; the
signature covers the url-encoded resource exactly as written in the token plus "\\n" plus the
expiry; and `sr` is a prefix: a namespace-wide token covers every hybrid connection in it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse

import attrs


class TokenError(Exception):
    """A token the service would refuse; the reason says why (phase "sas-token")."""


def resource_uri(namespace: str, path: str) -> str:
    return f"http://{namespace}/{path}"


def _signature(key: bytes, encoded_resource: str, expiry: int) -> str:
    digest = hmac.new(key, f"{encoded_resource}\n{expiry}".encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def make_token(resource: str, key_name: str, key: bytes, expiry: int) -> str:
    encoded = urllib.parse.quote_plus(resource)
    signature = urllib.parse.quote_plus(_signature(key, encoded, expiry))
    return f"SharedAccessSignature sr={encoded}&sig={signature}&se={expiry}&skn={key_name}"


@attrs.frozen
class Token:
    resource: str  # decoded
    encoded_resource: str  # as written
    signature: str
    expiry: int
    key_name: str


def parse(token: str) -> Token:
    prefix = "SharedAccessSignature "
    if not token.startswith(prefix):
        raise TokenError("not a SharedAccessSignature token")
    fields: dict[str, str] = {}
    for part in token.removeprefix(prefix).split("&"):
        name, _, value = part.partition("=")
        fields[name] = value
    missing = {"sr", "sig", "se", "skn"} - fields.keys()
    if missing:
        raise TokenError(f"token lacks {', '.join(sorted(missing))}")
    try:
        expiry = int(fields["se"])
    except ValueError:
        raise TokenError(f"token expiry {fields['se']!r} is not a number") from None
    return Token(
        resource=urllib.parse.unquote_plus(fields["sr"]),
        encoded_resource=fields["sr"],
        signature=urllib.parse.unquote_plus(fields["sig"]),
        expiry=expiry,
        key_name=fields["skn"],
    )


def _without_scheme(uri: str) -> str:
    return uri.split("://", 1)[-1].rstrip("/").lower()


def verify(token: str, resource: str, keys: dict[str, bytes], now: float | None = None) -> Token:
    """Check a token for `resource` as the service does. Raises TokenError."""
    parsed = parse(token)
    key = keys.get(parsed.key_name)
    if key is None:
        raise TokenError(f"unknown key name {parsed.key_name!r}")
    expected = _signature(key, parsed.encoded_resource, parsed.expiry)
    if not hmac.compare_digest(expected, parsed.signature):
        raise TokenError("signature does not match")
    if parsed.expiry <= (time.time() if now is None else now):
        raise TokenError("ExpiredToken")
    granted, wanted = _without_scheme(parsed.resource), _without_scheme(resource)
    if wanted != granted and not wanted.startswith(granted + "/"):
        raise TokenError(f"token for {parsed.resource} does not cover {resource}")
    return parsed
