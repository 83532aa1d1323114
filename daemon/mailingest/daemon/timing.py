"""When an account's next poll is due, and the wait until then: jitter and spread, so that
accounts (and daemons on one database) do not all fire at once; the server's LOGIN-DELAY as
a floor; the next poll recorded in the store, so that a restart keeps a backoff and `status`
shows it; and a sleep that a reload or a stop cuts short.

The schedule's arithmetic and clock, apart from the runner (runner.py) that decides which of
it applies when.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

from mailingest.errors import StoreError
from mailingest.logs import get_logger
from mailingest.model import AccountState
from mailingest.store import Store

log = get_logger("mailingest.daemon")

#: Fraction of an interval added or removed at random, so accounts do not fire together.
JITTER = 0.1
#: First polls after start are spread over this many seconds (or the interval, if shorter).
FIRST_SPREAD = 5.0
#: Who wakes first takes a due poll; every daemon adds up to this much (or 5 % of the
#: interval, if less) at random before it tries, so polls spread over the daemons.
CLAIM_SPREAD = 1.0
#: The claims and records of polls that come within this many seconds go out together,
#: one statement each (store/polls.py); at a 300 s interval, 5,000 accounts make about
#: 17 polls a second. Never more than this share of the shortest interval: a poll waits
#: for the window twice (its claim, its record), a short time for its schedule.
BATCH_WINDOW = 0.25
BATCH_SHARE = 1 / 250
#: A runner that left its account to another process contests it again after this many
#: intervals (unless woken sooner because the account fell overdue: takeover.py).
DORMANT_INTERVALS = 10


def jittered(interval: float) -> float:
    """``interval`` give or take JITTER: the time from one regular poll to the next."""
    return interval * (1 + random.uniform(-JITTER, JITTER))


def claim_spread(interval: float) -> float:
    """The random wait added before a runner tries to take a due poll (CLAIM_SPREAD)."""
    return random.uniform(0, min(CLAIM_SPREAD, 0.05 * interval))


def first_delay(state: AccountState | None, now: datetime, interval: float, paused: bool) -> float:
    """Seconds from the daemon's start (``now``) until an account's first poll: soon, spread,
    unless a persisted next poll (a backoff) or LOGIN-DELAY says later. ``state`` is what a
    previous run left; a paused account keeps no next poll."""
    delay = random.uniform(0, min(interval, FIRST_SPREAD))
    if state is not None and state.next_poll and not paused:
        persisted = (datetime.fromisoformat(state.next_poll) - now).total_seconds()
        if persisted > 0:
            # A restart keeps a backoff. The store keeps the time in whole seconds, cut
            # short: the poll is due at some point of the second after, where another
            # daemon's runner of the account wakes too (runner.py), so that neither wins it
            # for sure.
            delay = min(persisted + random.random(), interval)
    if state is not None and state.next_login:
        floor = seconds_until_login(datetime.fromisoformat(state.next_login))
        delay = max(delay, floor)
    return delay


def seconds_until_login(allowed: datetime | None) -> float:
    """Seconds until a login at ``allowed`` (as the store keeps it, rounded up) is allowed."""
    if allowed is None:
        return 0.0
    return max(0.0, (allowed - datetime.now(UTC)).total_seconds())


async def login_floor(store: Store, account: str) -> float:
    """Seconds until the server's LOGIN-DELAY allows the next login (0 if it does now)."""
    try:
        allowed = await store.next_login(account)
    except StoreError:
        return 0.0
    return seconds_until_login(allowed)


async def record_next_poll(store: Store, account: str, delay: float) -> None:
    """Save the next poll, ``delay`` s from now; a store error is logged (the runner keeps
    its own schedule)."""
    when = datetime.now(UTC) + timedelta(seconds=delay)
    try:
        await store.set_next_polls({account: when})
    except StoreError as exc:
        log.error("state_not_recorded", account=account, error=str(exc))


class Alarm:
    """A runner's sleep until its next poll, which ``wake`` ends early (a reload, a stop,
    "fetch now"); a wake between sleeps ends the next one at once."""

    def __init__(self) -> None:
        self._wake: asyncio.Future[None] | None = None
        self._woken = False

    def wake(self) -> None:
        """End the current sleep (or the next one)."""
        self._woken = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def sleep(self, seconds: float | None) -> None:
        """Sleep ``seconds`` (None: until woken), unless woken first."""
        if self._woken:
            self._woken = False
            return
        loop = asyncio.get_running_loop()
        waiter = self._wake = loop.create_future()
        handle = None
        if seconds is not None:
            handle = loop.call_later(max(0.0, seconds), _resolve, waiter)
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            self._wake = None
            self._woken = False


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
