"""SAS tokens: what the service accepts and what it refuses."""

from __future__ import annotations

import pytest

from appliance.relay.sas import TokenError, make_token, resource_uri, verify

KEYS = {"RootManageSharedAccessKey": b"c2VjcmV0LWtleS1hcy1zaG93bi1ieS1henVyZQ=="}
ACTIONS = resource_uri("site1.servicebus.windows.net", "actions")


def token(resource: str = ACTIONS, expiry: int = 2_000, key_name="RootManageSharedAccessKey"):
    return make_token(resource, key_name, KEYS["RootManageSharedAccessKey"], expiry)


def test_a_fresh_token_for_the_hybrid_connection_verifies():
    parsed = verify(token(), ACTIONS, KEYS, now=1_000)
    assert (parsed.resource, parsed.expiry) == (ACTIONS, 2_000)


def test_namespace_token_covers_every_hybrid_connection():
    namespace_wide = token(resource_uri("site1.servicebus.windows.net", "").rstrip("/"))
    verify(namespace_wide, ACTIONS, KEYS, now=1_000)
    with pytest.raises(TokenError, match="does not cover"):
        verify(token(resource_uri("site1.servicebus.windows.net", "act")), ACTIONS, KEYS, now=1)


def test_key_is_the_string_as_shown_not_its_base64_decoding():
    import base64

    decoded_key = base64.b64decode(KEYS["RootManageSharedAccessKey"])
    wrong = make_token(ACTIONS, "RootManageSharedAccessKey", decoded_key, 2_000)
    with pytest.raises(TokenError, match="signature does not match"):
        verify(wrong, ACTIONS, KEYS, now=1_000)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (token(expiry=999), "ExpiredToken"),
        (token(key_name="Other"), "unknown key name"),
        (token().replace("se=2000", "se=2001"), "signature does not match"),
        ("Bearer abc", "not a SharedAccessSignature"),
        ("SharedAccessSignature sr=x&sig=y", "token lacks se, skn"),
    ],
)
def test_refusals_say_why(bad, reason):
    with pytest.raises(TokenError, match=reason):
        verify(bad, ACTIONS, KEYS, now=1_000)
