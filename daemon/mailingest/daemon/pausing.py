"""One account's auth pause as its runner keeps it: begun when the server rejects the login,
taken over from the store (from before a restart, or another process's), ended by other
credentials in a reload or, for an OAuth2 account, by `mailingest auth login`.

The rules themselves (the rejected login's key, saving and ending the pause) are pause.py's,
shared with the one-shot `fetch`; this is the daemon's state around them, apart from the
runner's schedule (runner.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from mailingest import pause, signin
from mailingest.config import Account
from mailingest.errors import StoreError
from mailingest.logs import get_logger
from mailingest.store import Store

log = get_logger("mailingest.daemon")


class PauseHost(Protocol):
    """What the pause needs of the daemon (runner.RunnerHost brings it)."""

    @property
    def store(self) -> Store: ...

    def status_changed(self) -> None:
        """Paused or not changed (for STATUS=)."""


class AccountPause:
    """Whether one account is paused, and the rejected login's key while it is."""

    def __init__(self, host: PauseHost, name: str) -> None:
        self.host = host
        self.name = name
        self.key: str | None = None  # set while paused: the rejected login's hash
        self.recorded = False  # the store holds the pause (another process may end it)

    @property
    def active(self) -> bool:
        return self.key is not None

    async def begin(self, rejected: Account, current: Callable[[], Account]) -> None:
        """The server rejected the login: no more attempts until other credentials come
        (see pause.py). The key is kept here too: the pause holds even if the store fails.
        ``current`` gives the account's settings now: a reload during that poll may already
        have brought the fix."""
        key = self.key = await pause.key_of(rejected)
        signin.forget(self.name)  # a cached access token the server refused is not reused
        self.recorded = await pause.record(self.host.store, self.name, key)
        self.host.status_changed()
        account = current()
        if account is not rejected and await pause.may_retry(key, account):
            await self.end(pause.CREDENTIALS_CHANGED)

    async def adopt(self, key: str | None, account: Account) -> bool:
        """A pause found in the store (from before a restart, or another process's): kept
        while ``account`` brings the rejected login, else ended. True if paused now."""
        if key is not None and not await pause.may_retry(key, account):
            self.key = key
            self.recorded = True  # it comes from the store
            return True
        await self.end(pause.CREDENTIALS_CHANGED)
        return False

    async def holds_for(self, account: Account) -> bool:
        """A reload brought ``account``: True while the pause holds (its login is still the
        rejected one); else a pause ends."""
        if self.key is None:
            return False
        if not await pause.may_retry(self.key, account):
            return True
        await self.end(pause.CREDENTIALS_CHANGED)
        return False

    async def check_lifted(self, account: Account) -> None:
        """End a pause that `mailingest auth login` ended in the store: the credential of
        an OAuth2 refresh-token account lives there, not in the config. (A password account
        resumes only with another login from its own config: a pause another daemon lifted
        with its config is no reason to retry this one's.) A pause the store never recorded
        (it failed) holds: no login is retried on a store error."""
        auth = account.auth
        if auth is None or auth.grant != "refresh_token":
            return
        try:
            key = await self.host.store.pause_key(self.name)
        except StoreError:
            return
        if key is None and self.recorded:
            self.key = None
            log.info("account_resumed", account=self.name, reason=pause.LIFTED)
            self.host.status_changed()

    async def end(self, reason: str) -> None:
        self.key = None
        await pause.resume(self.host.store, self.name, reason)
        self.host.status_changed()
