"""OAuth2 grants against a loopback token endpoint (issue 15): the three grants' requests,
caching and refresh before expiry, refresh-token rotation stored before use, a refused
grant as an authentication failure, an endpoint that is down as a transient one, and the
SASL client responses."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailingest import masking
from mailingest.errors import AuthError, ProtocolError, TemporaryError
from mailingest.oauth2 import (
    OAuth2Settings,
    TokenSource,
    preset_scopes,
    preset_token_url,
    request_token,
)
from mailingest.sasl import oauthbearer, xoauth2
from token_endpoint import Reply, TokenEndpoint, token_endpoint

SECRET = "client-secret-Zx81"
REFRESH = "refresh-token-Qw77"


@pytest.fixture(autouse=True)
def _own_mask() -> Iterator[None]:
    """The tokens these tests get are masked in a registry of their own, so that short ones
    ("at-1") are not masked in the lines of later tests of this worker."""
    saved, masking.registered = masking.registered, masking.Secrets()
    try:
        yield
    finally:
        masking.registered = saved


def _settings(endpoint: TokenEndpoint, grant: str = "refresh_token", **over: Any) -> OAuth2Settings:
    fields: dict[str, Any] = {
        "provider": "custom",
        "grant": grant,
        "token_url": endpoint.url,
        "scopes": ("https://mail.example/pop", "offline_access"),
        "client_id": "app-1",
        "client_secret": lambda: SECRET,
        "refresh_token": (lambda: REFRESH) if grant == "refresh_token" else None,
        "timeout": 5.0,
    }
    return OAuth2Settings(**(fields | over))


async def test_a_refresh_token_grant_is_cached_until_shortly_before_expiry() -> None:
    with token_endpoint() as endpoint:
        endpoint.replies = [endpoint.token("at-1"), endpoint.token("at-2", expires_in=60)]
        source = TokenSource("a", _settings(endpoint))
        assert await source.access_token() == "at-1" and source.refreshed
        assert await source.access_token() == "at-1" and not source.refreshed
        assert len(endpoint.requests) == 1
        assert endpoint.requests[0] == {
            "grant_type": "refresh_token",
            "refresh_token": REFRESH,
            "client_id": "app-1",
            "client_secret": SECRET,
            "scope": "https://mail.example/pop offline_access",
        }
        source._token.expires_at = 0  # type: ignore[union-attr]  # as an hour later
        assert await source.access_token() == "at-2"
        # expires_in 60 s is within the early margin: every use asks again
        assert await source.access_token() == "at-2" and source.refreshed
        assert len(endpoint.requests) == 3


async def test_the_tokens_in_use_are_masked_in_every_log_line_and_replace_the_last() -> None:
    """An access token (and a rotated refresh token) is a secret from the moment it
    arrives; the next one takes its place in the mask, so an hourly refresh of thousands
    of accounts does not pile them up."""
    with token_endpoint() as endpoint:
        endpoint.replies = [
            endpoint.token("at-first-Qx1", refresh_token="rt-second-Qx2"),
            endpoint.token("at-second-Qx3"),
        ]
        source = TokenSource("a", _settings(endpoint), slot="a pop3")
        await source.access_token()
        assert masking.mask_text("at-first-Qx1 rt-second-Qx2") == "*** ***"
        source.forget()
        await source.access_token()
        assert masking.mask_text("at-second-Qx3 rt-second-Qx2") == "*** ***"
        assert masking.mask_text("at-first-Qx1") == "at-first-Qx1"  # replaced, not kept


async def test_a_rotated_refresh_token_is_stored_before_it_is_used() -> None:
    saved: list[str] = []

    async def store(token: str) -> None:
        saved.append(token)

    with token_endpoint() as endpoint:
        endpoint.replies = [
            endpoint.token("at-1", expires_in=1, refresh_token="r2"),
            endpoint.token("at-2", expires_in=1, refresh_token="r2"),
            endpoint.token("at-3", expires_in=1),
        ]
        source = TokenSource("a", _settings(endpoint), rotated=store)
        await source.access_token()
        assert saved == ["r2"]
        await source.access_token()
        await source.access_token()
        assert [r["refresh_token"] for r in endpoint.requests] == [REFRESH, "r2", "r2"]
        assert saved == ["r2"]  # the same token again is no rotation
    stored_later = TokenSource("a", _settings(endpoint))
    stored_later.use_refresh_token("r9")
    with token_endpoint() as endpoint:
        stored_later.settings = _settings(endpoint)
        await stored_later.access_token()
        assert endpoint.requests[0]["refresh_token"] == "r9"


@pytest.mark.parametrize("code", ["invalid_grant", "invalid_client", "unauthorized_client"])
async def test_a_refused_grant_is_an_authentication_failure_naming_no_secret(code: str) -> None:
    with token_endpoint(Reply(400, {"error": code, "error_description": "revoked"})) as endpoint:
        with pytest.raises(AuthError) as caught:
            await request_token("acct", _settings(endpoint))
    text = str(caught.value)
    assert code in text and "acct" in text and endpoint.url in text
    assert SECRET not in text and REFRESH not in text


@pytest.mark.parametrize(
    "reply",
    [
        Reply(503, {"error": "temporarily_unavailable"}),
        Reply(502, b"<html>bad gateway</html>"),
        Reply(429, b""),
    ],
)
async def test_an_endpoint_that_is_down_or_busy_is_transient(reply: Reply) -> None:
    with token_endpoint(reply) as endpoint, pytest.raises(TemporaryError):
        await request_token("acct", _settings(endpoint))


async def test_an_unreachable_endpoint_is_transient_and_garbage_is_a_protocol_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with token_endpoint() as endpoint:
        closed = _settings(endpoint, token_url=f"http://127.0.0.1:{port}/token")
    with pytest.raises(TemporaryError, match="unreachable"):
        await request_token("acct", closed)
    with token_endpoint(Reply(200, {"token_type": "Bearer"})) as endpoint:
        with pytest.raises(ProtocolError, match="no access_token"):
            await request_token("acct", _settings(endpoint))


async def test_client_credentials_and_jwt_bearer_grants() -> None:
    with token_endpoint() as endpoint:
        app = _settings(
            endpoint, "client_credentials", scopes=("https://outlook.office365.com/.default",)
        )
        await request_token("acct", app)
        assert endpoint.requests[-1] == {
            "grant_type": "client_credentials",
            "client_id": "app-1",
            "client_secret": SECRET,
            "scope": "https://outlook.office365.com/.default",
        }
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        service = _settings(
            endpoint,
            "jwt_bearer",
            client_id="svc@project.iam.example",
            client_secret=None,
            private_key=lambda: pem,
            subject="alice@corp.example",
            scopes=("https://mail.google.com/",),
        )
        await request_token("acct", service)
        form = endpoint.requests[-1]
    assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    claims = jwt.decode(
        form["assertion"], key.public_key(), algorithms=["RS256"], audience=endpoint.url
    )
    assert claims["iss"] == "svc@project.iam.example" and claims["sub"] == "alice@corp.example"
    assert claims["scope"] == "https://mail.google.com/" and claims["exp"] > claims["iat"]


def test_presets_and_sasl_client_responses() -> None:
    assert preset_token_url("microsoft", "contoso.example") == (
        "https://login.microsoftonline.com/contoso.example/oauth2/v2.0/token"
    )
    assert preset_token_url("google", "-") == "https://oauth2.googleapis.com/token"
    assert preset_scopes("google", "pop3", "refresh_token") == ("https://mail.google.com/",)
    assert "offline_access" in preset_scopes("microsoft", "pop3", "refresh_token")
    assert (
        base64.b64decode(xoauth2("a@b.example", "T"))
        == b"user=a@b.example\x01auth=Bearer T\x01\x01"
    )
    assert base64.b64decode(oauthbearer("a,=b@x", "T", "pop.x", 995)) == (
        b"n,a=a=2C=3Db@x,\x01host=pop.x\x01port=995\x01auth=Bearer T\x01\x01"
    )


async def test_a_newer_stored_refresh_token_is_used_before_each_refresh() -> None:
    """Another process (or `auth login`) may have stored a newer one since this source was
    made: it is read before every refresh, and a rotation is kept even if storing it fails."""
    with token_endpoint() as endpoint:
        endpoint.replies = [
            endpoint.token("at-1", expires_in=1),
            endpoint.token("at-2", expires_in=1, refresh_token="rt-4"),
            endpoint.token("at-3", expires_in=1),
        ]
        newest = ["rt-2"]

        async def stored() -> str | None:
            return newest[0]

        async def rotated(token: str) -> None:
            raise RuntimeError("the store is down")

        source = TokenSource("a", _settings(endpoint), rotated=rotated, stored=stored)
        assert await source.access_token() == "at-1"
        newest[0] = "rt-3"  # a sign-in elsewhere
        with pytest.raises(RuntimeError):
            await source.access_token()  # the rotated rt-4 could not be stored...
        newest[0] = None  # type: ignore[call-overload]
        assert await source.access_token() == "at-3"  # ...but is kept and used
    assert [r["refresh_token"] for r in endpoint.requests] == ["rt-2", "rt-3", "rt-4"]


@pytest.mark.parametrize("lifetime", [b"Infinity", b"NaN", b"-5", b'"soon"', b"9e99"])
async def test_an_odd_expires_in_is_trusted_for_an_hour_at_most(lifetime: bytes) -> None:
    body = b'{"access_token": "at", "expires_in": ' + lifetime + b"}"
    with token_endpoint(Reply(200, body)) as endpoint:
        token = await request_token("a", _settings(endpoint))
    assert 0 < token.expires_at - time.time() <= 24 * 3600
