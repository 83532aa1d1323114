"""Re-tagging stored mail when a reload changes an account's sharing settings, without
racing the account's polls.

A poll tags what it stores with the settings it started with, so an account being polled
under other settings is re-tagged only once that poll ends (its runner asks then), and the
account stays pending until the re-tag has committed: whoever waits for the pending set to
empty then reads the new tags. A re-tag that fails is retried after the account's next poll.
Who asked for the change (an API caller) is actors.py's; the re-tag itself, crm.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection
from typing import Protocol

from mailingest import crm
from mailingest.config import Config
from mailingest.daemon.actors import ChangedBy
from mailingest.daemon.roster import Roster
from mailingest.errors import StoreError
from mailingest.logs import get_logger
from mailingest.store import Store

log = get_logger("mailingest.daemon")


class RetagHost(Protocol):
    """What the re-tags need of the daemon (scheduler.Daemon)."""

    @property
    def store(self) -> Store: ...

    @property
    def config(self) -> Config:
        """The configuration now (a reload may change it)."""
        ...


class Retags:
    """Which accounts' stored mail still waits for a re-tag, and doing it."""

    def __init__(self, host: RetagHost, roster: Roster) -> None:
        self.host = host
        self.roster = roster
        #: Accounts whose stored mail may still carry tags of older sharing settings: a poll
        #: under those settings is still storing, or the re-tag failed (retried after a poll).
        self.pending: set[str] = set()
        #: Accounts whose tagging this daemon changed on a reload: re-tagged even if the
        #: saved snapshot already matches, as a CLI command may have saved the new settings
        #: while this daemon still stored mail under the old ones.
        self.forced: set[str] = set()
        #: Who changed which account's settings through the API (the audit log's actor).
        self.changed_by = ChangedBy()
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()  # set, and replaced, when ``pending`` changes

    def reloaded(self, old: Config, new: Config) -> None:
        """A reload replaced ``old`` with ``new``: note the accounts whose tagging changed."""
        before = {a.name: crm.tagging(a) for a in old.accounts}
        self.forced = {n for n in self.forced if n in before} | {
            a.name for a in new.accounts if a.name in before and before[a.name] != crm.tagging(a)
        }

    async def sync(self, names: Collection[str] | None = None) -> None:
        """Re-tag the stored mail of accounts (default: all) whose sharing settings changed,
        in one transaction: the code path of every CLI command's start.

        An account being polled under other settings is left until that poll ends (its runner
        calls this again then): a poll tags what it stores with the settings it started with,
        so re-tagging before it ends would leave that mail tagged the old way for good. A store
        error is logged, and the account's next poll tries again.
        """
        async with self._lock:  # one at a time, each with the config current by then
            config = self.host.config
            current = {a.name: a for a in config.accounts}
            wanted = set(current) if names is None else set(names) & set(current)
            polling = {
                r.name
                for r in self.roster.all()
                if r.in_flight
                and r.name in wanted
                and crm.tagging(r.polled) != crm.tagging(current[r.name])
            }
            todo = wanted - polling
            left = {n for n in self.pending if n in current and n not in wanted}
            # Pending until the re-tag has committed: whoever waits for the set to empty
            # then reads the new tags.
            self.pending = left | polling | todo
            self._note()
            self.changed_by.put_off(polling)
            if not todo:
                return
            forced = todo & self.forced
            actors = self.changed_by.of(todo)
            try:
                changed = await crm.sync_settings(
                    self.host.store, config, todo, force=forced, actor="daemon", actors=actors
                )
            except StoreError as exc:
                log.error("state_not_recorded", error=str(exc))
                self.changed_by.put_off(todo)
                return
            self.changed_by.done(todo)
            self.pending -= todo
            self._note()
            self.forced -= forced
            if changed:
                log.info("mail_retagged", accounts=changed)

    async def settled(self, known: set[str], within: float) -> None:
        """Return once no account but ``known`` waits for its re-tag, or after ``within`` s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.pending - known:
                    await self._changed.wait()

    def _note(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def after_poll(self, account: str) -> None:
        """A poll of ``account`` ended: re-tag it if a reload changed its sharing settings
        while it polled, or if its last re-tag failed (see sync)."""
        if account in self.pending:
            await self.sync([account])
