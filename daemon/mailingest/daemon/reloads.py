"""When the daemon reads its configuration again: on SIGHUP (the file, and the accounts kept
in the database), when the API changed accounts in the database, and when the store tells
that another process did (PostgreSQL notifies at once; else a look every ACCOUNTS_EVERY).

Reloads never overlap: one runs, one more may queue. A configuration that does not load is
logged and the current one stays; applying one that loads is the scheduler's (Daemon.apply).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Protocol

from mailingest import accounts
from mailingest.config import Config, load_config
from mailingest.errors import MailIngestError, StoreError
from mailingest.logs import get_logger
from mailingest.store import Store
from mailingest.systemd import Notifier

log = get_logger("mailingest.daemon")

#: How often the daemon looks for changes of the accounts kept in the database (seconds).
ACCOUNTS_EVERY = 2.0


class ReloadHost(Protocol):
    """What the reloads need of the daemon (scheduler.Daemon)."""

    @property
    def store(self) -> Store: ...

    @property
    def stopping(self) -> asyncio.Event: ...

    @property
    def notifier(self) -> Notifier: ...

    def summary(self) -> str:
        """The one-line STATUS= (sent with READY= after a reload of the file)."""
        ...

    async def apply(self, new: Config) -> None:
        """Switch to ``new``."""


class Reloads:
    """The reload that runs (and the one that may queue), and what they read."""

    def __init__(self, host: ReloadHost, config: Config, config_path: Path | None) -> None:
        self.host = host
        self.config_path = config_path
        #: The config file's own part of the configuration (the rest: accounts in the database).
        self.file_config = config
        #: The version of the accounts kept in the database that the daemon runs with.
        self.accounts_version = 0
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._reread_file = False

    def request(self, *, file: bool = True) -> None:
        """Re-read the config file (``file``) and the accounts in the database; reloads
        never overlap (one runs, one may queue)."""
        if self.host.stopping.is_set() or (file and self.config_path is None):
            return
        self._reread_file = self._reread_file or file
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._loop(), name="reload")

    async def now(self) -> None:
        """Re-read the accounts in the database, and return once that is applied."""
        self.request(file=False)
        if self._task is not None:
            await asyncio.shield(self._task)

    async def watch_accounts(self) -> None:
        """Apply changes of the accounts kept in the database: at once where the store
        notifies (PostgreSQL), else within ACCOUNTS_EVERY."""
        store = self.host.store
        async with contextlib.aclosing(store.account_changes(ACCOUNTS_EVERY)) as changes:
            async for _ in changes:
                if self.host.stopping.is_set():
                    return
                await self._accounts_changed()

    async def cancel(self) -> None:
        """The daemon stops: a reload under way is cancelled."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            self._again = False
            await self._once()
            if not self._again or self.host.stopping.is_set():
                return

    async def _once(self) -> None:
        file, self._reread_file = self._reread_file, False
        if file:
            self.host.notifier.reloading()
        try:
            if file:
                assert self.config_path is not None
                self.file_config = await asyncio.to_thread(load_config, self.config_path)
            version, new = await accounts.with_stored(self.host.store, self.file_config)
        except MailIngestError as exc:
            log.error("config_rejected", error=str(exc))
        else:
            self.accounts_version = version
            await self.host.apply(new)
        if file:
            self.host.notifier.ready(self.host.summary())

    async def _accounts_changed(self) -> None:
        """One look at the accounts version (see watch_accounts)."""
        try:
            version = await self.host.store.accounts_version()
        except StoreError:
            return  # the polls report the store; try again next time
        if version != self.accounts_version:
            # The reload records the version once applied: a failed one is retried.
            self.request(file=False)
