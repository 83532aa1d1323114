"""Access tokens for accounts that sign in with OAuth2 (POP3 and SMTP).

One token source per account and service lives as long as the process, so a daemon asks
the provider once an hour, not once a poll. Refresh tokens are kept in the store, sealed
with ``[storage] secret_key``: the one ``mailingest auth login`` got, and every one the
provider rotates in, saved before it is relied on, so a restart never loses it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING

from mailingest.config import Account, SmtpSettings
from mailingest.crypto import SecretBox
from mailingest.errors import AuthError
from mailingest.model import Pop3Login
from mailingest.store import Store

if TYPE_CHECKING:
    from mailingest.config_auth import OAuth2Config
    from mailingest.oauth2 import TokenSource

#: (account, service) -> (its settings, the event loop, the source): a new loop (a test, a
#: second asyncio.run) or other settings (a reload) bring a new source.
_SOURCES: dict[tuple[str, str], tuple[OAuth2Config, object, TokenSource]] = {}


async def access_token(
    name: str,
    service: str,
    conf: OAuth2Config,
    http_timeout: float,
    store: Store,
    username: str,
) -> tuple[str, bool]:
    """A valid access token and whether it was just requested (else: cached)."""
    loop = asyncio.get_running_loop()
    held = _SOURCES.get((name, service))
    if held is not None and held[0] == conf and held[1] is loop:
        source = held[2]
    else:  # made and kept before any await: concurrent callers share it (and its lock)
        source = _source(name, service, conf, http_timeout, store, username)
        _SOURCES[(name, service)] = (conf, loop, source)
    token = await source.access_token()
    return token, source.refreshed


def _source(
    name: str,
    service: str,
    conf: OAuth2Config,
    http_timeout: float,
    store: Store,
    username: str,
) -> TokenSource:
    from mailingest.oauth2 import TokenSource  # only accounts that sign in with OAuth2

    if conf.grant != "refresh_token":
        return TokenSource(name, conf.settings(http_timeout), slot=f"{name} {service}")
    assert conf.seal_key is not None  # the config requires it with this grant
    box = SecretBox(conf.seal_key.reveal())
    origin = conf.origin(username)
    what = f"account {name!r} ({service} refresh token)"

    async def rotated(token: str) -> None:
        await store.save_rotated_token(name, service, origin, box.seal(token))

    async def stored() -> str | None:
        """The newest refresh token in the store: a sign-in or another process's rotation
        since this source was made is used, never an older one."""
        sealed = await store.rotated_token(name, service, origin)
        if sealed is not None:
            return box.open(sealed, what)
        if conf.refresh_token is None:
            raise AuthError(
                f"no {service} refresh token yet: sign in once with "
                f"`mailingest auth login --account {name}` (or set refresh_token; an account "
                "being added: `accounts add ... --no-test` first)",
                account=name,
            )
        return None

    return TokenSource(
        name, conf.settings(http_timeout), rotated=rotated, stored=stored, slot=f"{name} {service}"
    )


async def pop3_login(account: Account, store: Store) -> tuple[Pop3Login, bool | None]:
    """The account's POP3 login values, with a fresh access token where it signs in with
    OAuth2; and whether the token was just requested (None: a password account)."""
    login = account.pop3_login()
    if account.auth is None:
        return login, None
    token, refreshed = await access_token(
        account.name, "pop3", account.auth, account.timeout, store, account.identity
    )
    return dataclasses.replace(login, password=lambda: token), refreshed


async def smtp_token(settings: SmtpSettings, name: str, store: Store) -> str:
    assert settings.auth is not None
    identity = settings.username.lower()
    token, _ = await access_token(name, "smtp", settings.auth, settings.timeout, store, identity)
    return token


def forget(name: str, service: str | None = None) -> None:
    """Drop the account's cached access tokens (the server refused one, the account paused,
    or a sign-in put a new refresh token in the store)."""
    for each in (service,) if service else ("pop3", "smtp"):
        held = _SOURCES.get((name, each))
        if held is not None:
            held[2].forget()
