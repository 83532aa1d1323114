"""The ``auth`` key of an account and of its ``[accounts.smtp]``: a password (the default)
or ``{ oauth2 = { ... } }``, OAuth2 sign-in with the provider's presets filled in."""

from __future__ import annotations

import hashlib
import ipaddress
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mailingest.config_values import Context, Secret, Table, secret, type_name
from mailingest.model import RECENT_PREFIX

if TYPE_CHECKING:
    from mailingest.oauth2 import OAuth2Settings

MECHANISMS = ("auto", "xoauth2", "oauthbearer")
_OAUTH2_KEYS = (
    *"provider grant tenant client_id client_secret refresh_token private_key".split(),
    *"subject token_url auth_url device_url scopes mechanism".split(),
)
#: Microsoft's directory for users of any organisation (a refresh token says which one).
_ANY_TENANT = "organizations"


@dataclass(frozen=True, slots=True)
class OAuth2Config:
    """One account's (POP3 or SMTP) OAuth2 sign-in, as configured; secrets described only."""

    provider: str
    grant: str
    client_id: str
    token_url: str
    scopes: tuple[str, ...]
    tenant: str | None = None
    client_secret: Secret | None = None
    refresh_token: Secret | None = None
    private_key: Secret | None = None
    subject: str | None = None
    mechanism: str = "auto"
    #: Where `mailingest auth login` sends the user: the browser (authorization code with
    #: PKCE) or a device code; None: that flow is not offered.
    auth_url: str | None = None
    device_url: str | None = None
    #: ``[storage] secret_key``: seals the refresh tokens kept in the database.
    seal_key: Secret | None = None

    def settings(self, timeout: float) -> OAuth2Settings:
        from mailingest.oauth2 import OAuth2Settings

        return OAuth2Settings(
            provider=self.provider,
            grant=self.grant,
            token_url=self.token_url,
            scopes=self.scopes,
            client_id=self.client_id,
            client_secret=self.client_secret.reveal if self.client_secret is not None else None,
            refresh_token=self.refresh_token.reveal if self.refresh_token is not None else None,
            private_key=self.private_key.reveal if self.private_key is not None else None,
            subject=self.subject,
            timeout=timeout,
        )

    def origin(self, identity: str) -> str:
        """Fingerprint of whose token this is: the mailbox, the client and the configured
        refresh token. A refresh token is stored under it (rotated, or from `auth login`),
        so another mailbox, client or configured token never uses it."""
        configured = self.refresh_token.reveal() if self.refresh_token is not None else ""
        parts = (identity, self.client_id, self.token_url, self.tenant or "", configured)
        return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()[:16]

    def login_bytes(self) -> bytes:
        """What makes this sign-in another attempt than a rejected one (the pause key)."""
        parts = [self.provider, self.grant, self.client_id, self.token_url, *self.scopes]
        parts += [self.tenant or "", self.subject or "", self.mechanism]
        for value in (self.client_secret, self.refresh_token, self.private_key):
            parts.append(value.reveal() if value is not None else "")
        return "\0".join(parts).encode("utf-8")

    def secrets(self) -> list[Secret | None]:
        return [self.client_secret, self.refresh_token, self.private_key]


def parse_auth(
    t: Table, ctx: Context, *, service: str, username: str, seal_key: Secret | None
) -> OAuth2Config | None:
    """``auth`` of the table ``t`` (an account: ``service`` "pop3"; its smtp: "smtp")."""
    if "auth" not in t.data or t.data["auth"] == "password":
        return None
    raw = t.data["auth"]
    if not isinstance(raw, dict) or list(raw) != ["oauth2"]:
        got = repr(raw) if isinstance(raw, str) else type_name(raw)
        raise t.error("auth", f'expected "password" or {{ oauth2 = {{ ... }} }}, got {got}')
    # oauth2.py only where an account signs in with it.
    from mailingest.oauth2 import GRANTS, PROVIDERS, preset_url

    o = t.table("auth").table("oauth2")
    o.check_keys(_OAUTH2_KEYS)
    provider = o.string("provider")
    if provider not in PROVIDERS:
        raise o.error("provider", f"expected one of {', '.join(PROVIDERS)}, got {provider!r}")
    grant = o.choice("grant", "jwt_bearer" if "private_key" in o.data else "refresh_token", GRANTS)
    tenant = _tenant(o, provider, grant)
    token_url = _url(o, "token_url", preset_url(provider, "token_url", tenant or ""))
    assert token_url is not None
    auth_url = _url(o, "auth_url", preset_url(provider, "auth_url", tenant or ""), needed=False)
    device_url = _url(o, "device_url", preset_url(provider, "device_url", tenant or ""), False)
    scopes = _scopes(o, provider, service, grant)
    client_secret = (
        secret(o, "client_secret", ctx, lazy=True) if "client_secret" in o.data else None
    )
    if grant == "client_credentials" and client_secret is None:
        raise o.missing("client_secret")
    refresh_token = None
    if "refresh_token" in o.data:
        if grant != "refresh_token":
            raise o.error("refresh_token", f"not used by the {grant} grant; remove it")
        refresh_token = secret(o, "refresh_token", ctx, lazy=True)
    if grant == "refresh_token" and seal_key is None:
        raise o.error(
            "grant",
            "the refresh_token grant keeps the refresh token the provider hands out (and "
            "the one `mailingest auth login` gets) sealed in the database: set [storage] "
            'secret_key = { credential = "..." } (or env, file)',
        )
    private_key = None
    if grant == "jwt_bearer":
        private_key = secret(o, "private_key", ctx, lazy=True, multiline=True)
    elif "private_key" in o.data:
        raise o.error("private_key", f"not used by the {grant} grant; remove it")
    subject = o.optional_string("subject")
    if grant == "jwt_bearer" and subject is None:
        # Domain-wide delegation acts for the mailbox itself (not "recent:" + it).
        subject = username.removeprefix(RECENT_PREFIX)
    return OAuth2Config(
        provider=provider,
        grant=grant,
        client_id=o.string("client_id"),
        token_url=token_url,
        scopes=scopes,
        tenant=tenant,
        client_secret=client_secret,
        refresh_token=refresh_token,
        private_key=private_key,
        subject=subject,
        mechanism=o.choice("mechanism", "auto", MECHANISMS),
        auth_url=auth_url,
        device_url=device_url,
        seal_key=seal_key if grant == "refresh_token" else None,
    )


def _url(o: Table, key: str, preset: str | None, needed: bool = True) -> str | None:
    if key not in o.data and (preset is not None or not needed):
        return preset
    url = o.string(key)
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or not (parts.scheme == "https" or _loopback(parts)):
        raise o.error(key, f"expected an https:// URL, got {url!r}")
    return url


def _loopback(parts: urllib.parse.SplitResult) -> bool:
    """Plain http only to this machine (a test's or a local proxy's endpoint)."""
    if parts.scheme != "http" or parts.hostname is None:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def _tenant(o: Table, provider: str, grant: str) -> str | None:
    if provider != "microsoft":
        if "tenant" in o.data:
            raise o.error("tenant", "only the microsoft provider has a tenant; remove it")
        return None
    if grant == "client_credentials":
        tenant = o.string("tenant")
        if tenant in ("common", "organizations", "consumers"):
            raise o.error(
                "tenant", "app-only access needs your directory (contoso.onmicrosoft.com or its id)"
            )
        return tenant
    return o.string("tenant", _ANY_TENANT)


def _scopes(o: Table, provider: str, service: str, grant: str) -> tuple[str, ...]:
    if "scopes" not in o.data:
        from mailingest.oauth2 import preset_scopes

        found = preset_scopes(provider, service, grant)
        if not found:
            raise o.missing("scopes")
        return found
    raw = o.data["scopes"]
    if not isinstance(raw, list) or not raw or not all(isinstance(s, str) and s for s in raw):
        raise o.error("scopes", "expected a non-empty array of scope strings")
    return tuple(raw)
