"""The daemon's runners, one per account: started with what a previous run left in the
store, updated when a reload changes their account, retired when it removes it.

A retired runner finishes the poll it is in, then its task ends and it is forgotten; until
then it still counts for the bounded stop (process.py) and for re-tagging (retag.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from mailingest.config import Account
from mailingest.daemon.runner import AccountRunner, RunnerHost
from mailingest.errors import StoreError
from mailingest.logs import get_logger
from mailingest.model import AccountState

log = get_logger("mailingest.daemon")


class Roster:
    """The runners of the accounts configured now, and the retired ones still polling."""

    def __init__(self, host: RunnerHost) -> None:
        self.host = host
        self.active: dict[str, AccountRunner] = {}
        self.retiring: set[AccountRunner] = set()  # removed by a reload, finishing their poll
        #: Runners leaving their account to another process until it falls overdue
        #: (takeover.py).
        self.dormant: set[AccountRunner] = set()

    def __len__(self) -> int:
        return len(self.active)

    def get(self, account: str) -> AccountRunner | None:
        return self.active.get(account)

    def all(self) -> list[AccountRunner]:
        return [*self.active.values(), *self.retiring]

    def paused_count(self) -> int:
        return sum(r.paused for r in self.active.values())

    def polling_count(self) -> int:
        return sum(r.in_flight for r in self.all())

    def lags(self) -> dict[str, float]:
        """How late (seconds) each account's last poll started after it was due."""
        return {name: r.lag for name, r in self.active.items() if r.lag is not None}

    def forget(self, runner: AccountRunner) -> None:
        """A runner's task ended (removed by a reload, or stopped)."""
        self.retiring.discard(runner)
        self.dormant.discard(runner)

    async def states(self) -> dict[str, AccountState]:
        """What the store holds of every account (an empty start if it fails)."""
        try:
            return await self.host.store.account_states(counts=False)
        except StoreError as exc:
            log.error("state_not_recorded", error=str(exc))
            return {}

    async def start(self, accounts: list[Account], states: dict[str, AccountState]) -> None:
        """Create the accounts' runners: restore a pause, honour a persisted next poll."""
        first: dict[str, datetime | None] = {}
        now = datetime.now(UTC)
        for account in accounts:
            runner = AccountRunner(self.host, account)
            delay = await runner.restore(states.get(account.name), now)
            first[account.name] = None if runner.paused else now + timedelta(seconds=delay)
            self.active[account.name] = runner
            runner.start(delay)
        # Only where no other daemon claimed a poll since ``states`` was read.
        seen = {name: (states[name].next_poll if name in states else None) for name in first}
        with contextlib.suppress(StoreError):
            await self.host.store.set_next_polls(first, seen=seen)

    async def apply(
        self, accounts: Sequence[Account]
    ) -> tuple[list[Account], list[str], list[str]]:
        """Runners for a reload's ``accounts``: retire the removed, update the others, start
        the added; returns (added, removed names, changed names). In-flight polls go on."""
        wanted = {a.name: a for a in accounts}
        removed = [name for name in self.active if name not in wanted]
        for name in removed:
            runner = self.active.pop(name)
            runner.retired = True
            self.retiring.add(runner)
            runner.wake()
        added = [a for a in accounts if a.name not in self.active]
        changed = []
        for account in accounts:
            current = self.active.get(account.name)
            if current is not None and await current.update(account):
                changed.append(account.name)
        if added:
            await self.start(added, await self.states())
        return added, removed, changed
