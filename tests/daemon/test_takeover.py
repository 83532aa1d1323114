"""Accounts another daemon polls: left to it (dormant runners), taken over once overdue.

Two daemons on one store contest each account's polls until one of them has lost two in a
row; that one leaves the account to the other, without a claim at each of its polls, and
takes it over as soon as its polls fall overdue (takeover.py). Both backends; the scripted
POP3 server; in-process daemons with intervals of a second.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from builders import loopback_account, make_message
from daemon_support import until
from mailingest import lease
from mailingest.config import Account, load_config
from mailingest.daemon import Daemon, runner, timing
from mailingest.daemon.roster import Roster
from mailingest.daemon.takeover import grace, period, wake_overdue
from mailingest.fetch import FetchResult, fetch_account
from mailingest.lease import lease_host
from mailingest.model import AccountState, Claim
from mailingest.store import Store
from pop3d import Mailbox, Pop3TestServer
from support import StoreAt, write_config

PASSWORD = "Right-Horse-7"
ACCOUNTS = 6


class FakeRunner:
    def __init__(self, name: str) -> None:
        self.name = name
        self.woken = False

    def wake(self) -> None:
        self.woken = True


def _roster(names: list[str], dormant: list[str]) -> tuple[Roster, dict[str, FakeRunner]]:
    roster = Roster(cast(Any, None))
    fakes = {name: FakeRunner(name) for name in names}
    for name, fake in fakes.items():
        roster.active[name] = cast(Any, fake)
        if name in dormant:
            roster.dormant.add(cast(Any, fake))
    return roster, fakes


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_only_dormant_runners_of_overdue_accounts_free_to_take_are_woken(
    store: Store,
) -> None:
    now = datetime.now(UTC)
    past, future = now - timedelta(seconds=30), now + timedelta(seconds=300)
    here = lease_host()

    async def scheduled(
        name: str, when: datetime, holder: str, *, release: bool, ttl: float = 60
    ) -> None:
        claim = await store.take_poll(name, holder, ttl, due=(when, when), force=True)
        assert claim.taken
        if release:
            await store.release_lease(name, holder)

    await scheduled("free", past, f"{here}:1:a", release=True)
    await scheduled("expired", past, "elsewhere:7:b", release=False, ttl=-60)
    await scheduled("held", past, "elsewhere:7:c", release=False)
    await scheduled("dead", past, f"{here}:{_dead_pid()}:d", release=False)
    await scheduled("later", future, f"{here}:1:e", release=True)
    await scheduled("paused", past, f"{here}:1:f", release=True)
    await store.set_paused("paused", "auth_failed", "key")
    await scheduled("awake", past, f"{here}:1:g", release=True)
    names = ["free", "expired", "held", "dead", "later", "paused", "awake", "unknown"]
    roster, fakes = _roster(names, dormant=[n for n in names if n != "awake"])

    # A paused account too: a daemon whose config brings another login polls it.
    assert await wake_overdue(store, roster, 5.0) == 4
    assert sorted(n for n, f in fakes.items() if f.woken) == ["dead", "expired", "free", "paused"]


def test_the_watch_looks_often_and_waits_a_few_seconds_before_taking_over() -> None:
    # A claim's spread and 2 s of lag, at every interval from 20 s on; the look's whole
    # seconds add up to one more (store/state.py).
    assert period(300) == 2.0 and grace(300) == grace(3600) == grace(20) == 3.0
    assert period(4) == pytest.approx(0.4) and grace(4) == pytest.approx(0.6)
    assert period(0.1) == 0.05 and grace(0.1) == pytest.approx(0.015)


def test_a_restarted_daemon_wakes_at_a_random_point_of_the_second_the_store_keeps() -> None:
    """The store keeps the next poll in whole seconds, cut short: a daemon that restarts
    wakes somewhere in the second after it, as the other daemon's runner of the account
    does, so neither wins the first contest for sure; a backoff is kept, capped at an
    interval."""
    now = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
    state = AccountState("a1", next_poll=(now + timedelta(seconds=30)).isoformat())
    delays = [timing.first_delay(state, now, 300.0, paused=False) for _ in range(200)]
    assert all(30.0 <= d < 31.0 for d in delays), (min(delays), max(delays))
    assert max(delays) - min(delays) > 0.5  # spread over the second, not at its start
    assert timing.first_delay(state, now, 20.0, paused=False) == 20.0


async def test_two_daemons_leave_accounts_to_each_other_and_take_over_a_stopped_ones_accounts(
    store_at: StoreAt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dormant runner only wakes on its own after many intervals: any takeover below
    # is the watch's doing.
    monkeypatch.setattr(timing, "DORMANT_INTERVALS", 1000)
    refused: list[str] = []  # claims that found the poll taken, while counted
    counting = False

    async def take_poll(store: Store, account: str, *args: Any, **kwargs: Any) -> Claim:
        claim = await lease.take_poll(store, account, *args, **kwargs)
        if counting and not claim.taken:
            refused.append(account)
        return claim

    monkeypatch.setattr(runner, "take_poll", take_poll)
    boxes = [Mailbox(f"u{i}", PASSWORD, [make_message(i)]) for i in range(ACCOUNTS)]
    async with Pop3TestServer(boxes) as server:
        accounts = [
            loopback_account(server.port, name=f"a{i}", username=f"u{i}", password=PASSWORD)
            for i in range(ACCOUNTS)
        ]
        config = write_config(
            tmp_path,
            accounts,
            storage=store_at.storage(),
            daemon={"poll_interval": "2s", "shutdown_timeout": "5s"},
        )
        polls: dict[str, list[tuple[int, float]]] = {}

        def noting(who: int) -> Any:
            async def fetch(account: Account, store: Store, **kwargs: Any) -> FetchResult:
                result = await fetch_account(account, store, **kwargs)
                if not result.busy:
                    polls.setdefault(account.name, []).append((who, time.monotonic()))
                return result

            return fetch

        daemons = [Daemon(load_config(config), config, fetch=noting(n)) for n in range(2)]
        tasks: list[asyncio.Task[int]] = []
        try:
            for daemon in daemons:  # one after the other: both would create the SQLite file
                task = asyncio.create_task(daemon.async_run(signals=False))
                tasks.append(task)
                await until(lambda d=daemon, t=task: d.ready or t.done(), "the daemon to start")
            # Each account ends up with one daemon: the other's runner is dormant.
            await until(
                lambda: sum(len(d.dormant) for d in daemons) == ACCOUNTS,
                "every account left to one daemon",
                90,
            )
            # The daemon to stop: one that polls some accounts (most often both do).
            victim = 0 if daemons[1].dormant else 1
            heir = 1 - victim
            theirs = {r.name for r in daemons[heir].dormant}
            seen = {name: len(polls[name]) for name in theirs}
            counting = True
            await until(lambda: all(len(polls[n]) >= seen[n] + 2 for n in theirs), "more polls")
            counting = False
            # Left alone: those polls were all the victim's, and the heir claimed none.
            assert all(who == victim for n in theirs for who, _ in polls[n][seen[n] :])
            assert not set(refused) & theirs, refused
            daemons[victim].stop("test")
            assert await asyncio.wait_for(tasks[victim], 30) == 0
            stopped = time.monotonic()
            # The victim is gone: the heir takes its accounts over, woken by the watch (its
            # dormant runners would sleep a thousand intervals).
            await until(
                lambda: all(
                    any(who == heir and at > stopped for who, at in polls[n]) for n in theirs
                ),
                "the stopped daemon's accounts polled by the other",
                30,
            )
            assert not daemons[heir].dormant
        finally:
            for daemon, task in zip(daemons, tasks, strict=False):  # those started
                daemon.stop("test")
                assert await asyncio.wait_for(task, 30) == 0
