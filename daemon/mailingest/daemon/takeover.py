"""Taking over the accounts another daemon on the database stopped polling.

A runner whose account another process keeps polling goes dormant (runner.py): it no longer
wakes at each of that process's polls only to find the poll taken (each a wake-up and two
statements, for this daemon and for the database). Instead, while any runner is dormant, the
daemon asks the store every few seconds (one statement) which accounts' polls are overdue,
and wakes their dormant runners: the process that polled them died, or lags behind.

A dormant runner also wakes on its own after timing.DORMANT_INTERVALS intervals and contests the
account's next poll, so that work spreads again over daemons that joined later.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

from mailingest.daemon import timing
from mailingest.daemon.roster import Roster
from mailingest.errors import StoreError
from mailingest.lease import dead_here
from mailingest.logs import get_logger
from mailingest.store import Store

log = get_logger("mailingest.daemon")

#: How often (seconds) a daemon with dormant runners looks for overdue accounts, at most: a
#: tenth of the shortest poll interval if less.
SCAN_EVERY = 2.0
#: How far (seconds) a daemon may lag behind its polls before another takes them over.
LAG = 2.0
#: Overdue accounts read per look, at most (the rest come at the next).
SCAN_LIMIT = 1000
#: A store that keeps failing the look is logged this often (seconds), at most.
FAILURE_LOG_EVERY = 60.0


class TakeoverHost(Protocol):
    """What the watch needs of the daemon (scheduler.Daemon)."""

    @property
    def store(self) -> Store: ...

    @property
    def stopping(self) -> asyncio.Event: ...

    @property
    def runners(self) -> Roster: ...

    @property
    def shortest_interval(self) -> float:
        """The shortest poll interval of any account now."""
        ...


def period(shortest_interval: float) -> float:
    """The time between two looks."""
    return max(0.05, min(SCAN_EVERY, shortest_interval / 10))


def grace(shortest_interval: float) -> float:
    """How late a poll must be to count as overdue: the poller's claim spread, plus LAG for
    a daemon that lags behind a burst of polls or waits for a slot under max_concurrent (a
    tenth of the interval if less). The store keeps the next poll cut short to the second
    and the look compares whole seconds, which adds up to one more. Not a share of the
    interval: at 300 s a tenth would add 30 s to every takeover, and a daemon's lag does not
    grow with its interval."""
    spread = min(timing.CLAIM_SPREAD, 0.05 * shortest_interval)  # as timing.claim_spread
    return spread + min(LAG, timing.JITTER * shortest_interval)


async def watch(host: TakeoverHost) -> None:
    """Wake the dormant runners of overdue accounts, until the daemon stops. A failing
    store is logged once a minute at most (the look is tried again every period)."""
    logged = -FAILURE_LOG_EVERY
    while not host.stopping.is_set():
        await asyncio.sleep(period(host.shortest_interval))
        if not host.runners.dormant:
            continue
        try:
            await wake_overdue(host.store, host.runners, grace(host.shortest_interval))
        except StoreError as exc:
            if time.monotonic() - logged >= FAILURE_LOG_EVERY:
                logged = time.monotonic()
                log.warning("takeover_check_failed", error=str(exc))
        except Exception:  # a bug must not end the takeovers for good
            log.exception("task_failed", message="looking for overdue accounts")


async def wake_overdue(store: Store, runners: Roster, late: float) -> int:
    """Wake the dormant runners whose account's poll is more than ``late`` s overdue, or
    whose account is paused (the runner takes up the pause, or polls with another login),
    where the lease is free (none, an expired one, or one whose process died on this
    host); returns how many."""
    before = datetime.now(UTC) - timedelta(seconds=late)
    woken = 0
    for name, holder in await store.overdue(before, SCAN_LIMIT):
        runner = runners.get(name)
        if runner is None or runner not in runners.dormant:
            continue
        if holder is not None and not dead_here(holder):
            continue
        runner.wake()
        woken += 1
    return woken
