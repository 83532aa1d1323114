"""OAuth2 access tokens for POP3 and SMTP sign-in (XOAUTH2 / OAUTHBEARER: sasl.py).

Three grants a daemon can use unattended: a refresh token (a user signed in once), client
credentials (Microsoft 365 app-only access) and a JWT bearer assertion (a Google Workspace
service account with domain-wide delegation). Tokens are cached until shortly before they
expire. A grant the provider refuses is an authentication failure (the account pauses as
for a wrong password); a token endpoint that is down is transient.

HTTP goes through httpx (async, timeouts, TLS verified); the JWT is signed with PyJWT.
Both are imported only by accounts that use OAuth2.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mailingest.errors import AuthError, ConfigError, ProtocolError, TemporaryError
from mailingest.masking import hold_secrets

PROVIDERS = ("microsoft", "google", "custom")
GRANTS = ("refresh_token", "client_credentials", "jwt_bearer")

#: Token endpoints and scopes the presets fill in ({tenant}: Microsoft's directory).
_PRESETS: dict[str, dict[str, Any]] = {
    "microsoft": {
        "token_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "scopes": {
            ("pop3", "refresh_token"): (
                "https://outlook.office.com/POP.AccessAsUser.All",
                "offline_access",
            ),
            ("smtp", "refresh_token"): ("https://outlook.office.com/SMTP.Send", "offline_access"),
            ("pop3", "client_credentials"): ("https://outlook.office365.com/.default",),
            ("smtp", "client_credentials"): ("https://outlook.office365.com/.default",),
        },
        "device_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
        "auth_url": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize",
    },
    "google": {
        "token_url": "https://oauth2.googleapis.com/token",
        "scopes": {},  # the one scope that allows POP3 and SMTP
        "default_scopes": ("https://mail.google.com/",),
        "auth_url": "https://accounts.google.com/o/oauth2/v2/auth",
    },
}
_JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Refresh this long before the provider says a token expires (clock skew, slow links).
EARLY = 120.0


def preset_token_url(provider: str, tenant: str) -> str | None:
    return preset_url(provider, "token_url", tenant)


def preset_url(provider: str, kind: str, tenant: str) -> str | None:
    """The provider's ``token_url``, ``device_url`` (device-code sign-in) or ``auth_url``
    (browser sign-in), if it has one."""
    url = _PRESETS.get(provider, {}).get(kind)
    return str(url).format(tenant=tenant) if url else None


def preset_scopes(provider: str, service: str, grant: str) -> tuple[str, ...]:
    preset = _PRESETS.get(provider, {})
    found = preset.get("scopes", {}).get((service, grant))
    return tuple(found or preset.get("default_scopes", ()))


@dataclass(frozen=True, slots=True)
class OAuth2Settings:
    """One account's (POP3 or SMTP) OAuth2 sign-in; secrets are revealed only when a token
    is requested."""

    provider: str
    grant: str
    token_url: str
    scopes: tuple[str, ...]
    client_id: str
    client_secret: Callable[[], str] | None = None
    refresh_token: Callable[[], str] | None = None
    private_key: Callable[[], str] | None = None  # PEM of a Google service account
    subject: str | None = None  # jwt_bearer: the mailbox the service account acts for
    timeout: float = 30.0


@dataclass(slots=True)
class Token:
    access_token: str = field(repr=False)
    expires_at: float  # time.time()
    refresh_token: str | None = field(default=None, repr=False)  # a rotated one, if sent

    def fresh(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) < self.expires_at - EARLY


#: Called with a rotated refresh token: it must be stored durably before the next use.
Rotated = Callable[[str], Awaitable[None]]
#: Reads the newest stored refresh token (another process, or `auth login`, may have put a
#: newer one there since): asked before every refresh.
Stored = Callable[[], Awaitable[str | None]]
#: The longest an access token is trusted, whatever ``expires_in`` says.
MAX_LIFETIME = 24 * 3600.0


class TokenSource:
    """Access tokens for one account: cached, refreshed before they expire, one request
    at a time (concurrent callers wait for the same answer)."""

    def __init__(
        self,
        name: str,
        settings: OAuth2Settings,
        *,
        rotated: Rotated | None = None,
        stored: Stored | None = None,
        slot: str | None = None,
    ) -> None:
        self.name = name
        self.slot = slot or name  # the log mask's slot of its tokens (masking.hold_secrets)
        self.settings = settings
        self._rotated = rotated
        self._stored = stored
        self._refresh_token: str | None = None  # the latest, once one was rotated
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self.refreshed = False  # the last access_token() asked the provider

    def use_refresh_token(self, token: str) -> None:
        """A refresh token stored after an earlier rotation: newer than the configured one."""
        self._refresh_token = token

    def forget(self) -> None:
        """Drop the cached access token (the server refused it, or a sign-in replaced it)."""
        self._token = None

    async def access_token(self) -> str:
        async with self._lock:
            if self._token is not None and self._token.fresh():
                self.refreshed = False
                return self._token.access_token
            if self._stored is not None:
                newest = await self._stored()
                if newest is not None:
                    self._refresh_token = newest
            token = await request_token(self.name, self.settings, self._refresh_token)
            refresh = token.refresh_token or self._current_refresh()
            # Masked before anything can log them; the next tokens replace these.
            hold_secrets(self.slot, [token.access_token, *([refresh] if refresh else [])])
            self._token = token
            if token.refresh_token and token.refresh_token != self._current_refresh():
                # Kept here first: the provider may have revoked the previous one already,
                # so a failed save must not lose it for this process.
                self._refresh_token = token.refresh_token
                if self._rotated is not None:
                    await self._rotated(token.refresh_token)  # durable before it is relied on
            self.refreshed = True
            return token.access_token

    def _current_refresh(self) -> str | None:
        if self._refresh_token is not None:
            return self._refresh_token
        return self.settings.refresh_token() if self.settings.refresh_token else None


async def request_token(
    name: str, settings: OAuth2Settings, refresh_token: str | None = None
) -> Token:
    """One token request (RFC 6749 section 5); errors name the account, never a secret."""
    try:
        form = _grant_form(settings, refresh_token)
    except ValueError as exc:  # PyJWT's and cryptography's errors for a key that is no key
        raise ConfigError(
            f"account {name!r}: private_key is not a PEM private key for RS256 ({exc})",
            key_path="auth.oauth2.private_key",
        ) from None
    status, body = await _post(name, settings.token_url, form, settings.timeout)
    return _token_from(name, settings, status, body)


async def _post(
    name: str, url: str, form: dict[str, str], http_timeout: float
) -> tuple[int, bytes]:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=http_timeout) as client:
            reply = await client.post(url, data=form, headers={"Accept": "application/json"})
    except httpx.HTTPError as exc:
        raise TemporaryError(f"{url} unreachable: {type(exc).__name__}", account=name) from None
    return reply.status_code, reply.content


async def http_form(
    name: str, url: str, form: dict[str, str], http_timeout: float
) -> tuple[int, dict[str, Any]]:
    """POST a form to an OAuth2 endpoint: its status and JSON object; down or 5xx/429 is
    transient, an answer that is no JSON object a protocol error."""
    import json

    status, body = await _post(name, url, form, http_timeout)
    if status >= 500 or status == 429:
        raise TemporaryError(f"{url} answered HTTP {status}", account=name)
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ProtocolError(f"{url} answered HTTP {status} without JSON", account=name)
    return status, data


def _grant_form(settings: OAuth2Settings, refresh_token: str | None) -> dict[str, str]:
    form = {"client_id": settings.client_id}
    if settings.scopes:
        form["scope"] = " ".join(settings.scopes)
    if settings.client_secret is not None:
        form["client_secret"] = settings.client_secret()
    if settings.grant == "refresh_token":
        form["grant_type"] = "refresh_token"
        if refresh_token is None:
            assert settings.refresh_token is not None  # signin.py checks there is one
            refresh_token = settings.refresh_token()
        form["refresh_token"] = refresh_token
    elif settings.grant == "client_credentials":
        form["grant_type"] = "client_credentials"
    else:
        form = {"grant_type": _JWT_BEARER, "assertion": _assertion(settings)}
    return form


def _assertion(settings: OAuth2Settings) -> str:
    """RFC 7523: a JWT signed with the service account's key, for the mailbox ``subject``."""
    import jwt

    assert settings.private_key is not None
    now = int(time.time())
    claims = {
        "iss": settings.client_id,
        "scope": " ".join(settings.scopes),
        "aud": settings.token_url,
        "iat": now,
        "exp": now + 3600,
    }
    if settings.subject:
        claims["sub"] = settings.subject
    try:
        return jwt.encode(claims, settings.private_key(), algorithm="RS256")
    except (jwt.PyJWTError, TypeError) as exc:  # never the key's text in the message
        raise ValueError(type(exc).__name__) from None


#: RFC 6749 error codes that mean the grant itself is no good: retrying cannot help.
_REFUSED = {"invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope"}


def _token_from(name: str, settings: OAuth2Settings, status: int, body: bytes) -> Token:
    import json

    try:
        data = json.loads(body)
    except ValueError:
        data = None
    where = f"token endpoint {settings.token_url}"
    if not isinstance(data, dict):
        if status >= 500 or status == 429:
            raise TemporaryError(f"{where} answered HTTP {status}", account=name)
        raise ProtocolError(f"{where} answered HTTP {status} without JSON", account=name)
    error = data.get("error")
    if status >= 500 or status == 429 or error == "temporarily_unavailable":
        raise TemporaryError(
            f"{where} answered HTTP {status} ({error or 'no error code'})", account=name
        )
    if error or status != 200:
        code = str(error or f"HTTP {status}")
        if code in _REFUSED or status in (400, 401):
            raise AuthError(
                f"{where} refused the {settings.grant} grant: {code}; sign in again "
                "(mailingest auth login) or fix the client settings",
                account=name,
            )
        raise ProtocolError(f"{where} answered {code}", account=name)
    access = data.get("access_token")
    if not isinstance(access, str) or not access:
        raise ProtocolError(f"{where} sent no access_token", account=name)
    try:
        lifetime = float(data.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    if not math.isfinite(lifetime) or lifetime <= 0:
        lifetime = 3600.0
    lifetime = min(lifetime, MAX_LIFETIME)
    rotated = data.get("refresh_token")
    return Token(access, time.time() + lifetime, rotated if isinstance(rotated, str) else None)
