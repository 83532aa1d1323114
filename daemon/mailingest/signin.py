"""Access tokens for accounts that sign in with OAuth2 (POP3 and SMTP).

One token source per account and service lives as long as the process, so a daemon asks
the provider once an hour, not once a poll. Refresh tokens are kept in the store, sealed
with ``[storage] secret_key``: the one ``mailingest auth login`` got, and every one the
provider rotates in, saved before it is relied on, so a restart never loses it.
"""

from __future__ import annotations

import dataclasses

from mailingest.config import Account, SmtpSettings
from mailingest.config_auth import OAuth2Config
from mailingest.crypto import SecretBox
from mailingest.errors import AuthError
from mailingest.model import Pop3Login
from mailingest.oauth2 import TokenSource
from mailingest.store import Store

_SOURCES: dict[tuple[str, str], tuple[OAuth2Config, TokenSource]] = {}


async def access_token(
    name: str, service: str, conf: OAuth2Config, http_timeout: float, store: Store
) -> tuple[str, bool]:
    """A valid access token and whether it was just requested (else: cached)."""
    held = _SOURCES.get((name, service))
    if held is None or held[0] is not conf:  # a reloaded config brings its own source
        source = await _source(name, service, conf, http_timeout, store)
        _SOURCES[(name, service)] = (conf, source)
    else:
        source = held[1]
    token = await source.access_token()
    return token, source.refreshed


async def _source(
    name: str, service: str, conf: OAuth2Config, http_timeout: float, store: Store
) -> TokenSource:
    if conf.grant != "refresh_token":
        return TokenSource(name, conf.settings(http_timeout))
    assert conf.seal_key is not None  # the config requires it with this grant
    box = SecretBox(conf.seal_key.reveal())
    origin = conf.origin()
    what = f"account {name!r} ({service} refresh token)"

    async def rotated(token: str) -> None:
        await store.save_rotated_token(name, service, origin, box.seal(token))

    source = TokenSource(name, conf.settings(http_timeout), rotated=rotated)
    sealed = await store.rotated_token(name, service, origin)
    if sealed is not None:
        source.use_refresh_token(box.open(sealed, what))
    elif conf.refresh_token is None:
        raise AuthError(
            f"no {service} refresh token yet: sign in once with "
            f"`mailingest auth login --account {name}` (or set refresh_token)",
            account=name,
        )
    return source


async def pop3_login(account: Account, store: Store) -> tuple[Pop3Login, bool | None]:
    """The account's POP3 login values, with a fresh access token where it signs in with
    OAuth2; and whether the token was just requested (None: a password account)."""
    login = account.pop3_login()
    if account.auth is None:
        return login, None
    token, refreshed = await access_token(
        account.name, "pop3", account.auth, account.timeout, store
    )
    return dataclasses.replace(login, password=lambda: token), refreshed


async def smtp_token(settings: SmtpSettings, name: str, store: Store) -> str:
    assert settings.auth is not None
    token, _ = await access_token(name, "smtp", settings.auth, settings.timeout, store)
    return token


def forget(name: str) -> None:
    """Drop the account's cached tokens (after `auth login` stored a new refresh token)."""
    for service in ("pop3", "smtp"):
        _SOURCES.pop((name, service), None)
