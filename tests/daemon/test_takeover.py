"""Accounts another daemon polls: left to it (dormant runners), taken over once overdue.

Two daemons on one store contest each account's polls until one of them has lost two in a
row; that one leaves the account to the other, without a claim at each of its polls, and
takes it over as soon as its polls fall overdue (takeover.py). Both backends; the scripted
POP3 server; in-process daemons with intervals of a second.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from builders import loopback_account, make_message
from daemon_support import running, until
from mailingest.config import Account, load_config
from mailingest.daemon import Daemon, timing
from mailingest.daemon.roster import Roster
from mailingest.daemon.takeover import grace, period, wake_overdue
from mailingest.fetch import FetchResult, fetch_account
from mailingest.lease import lease_host
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

    assert await wake_overdue(store, roster, 5.0) == 3
    assert sorted(n for n, f in fakes.items() if f.woken) == ["dead", "expired", "free"]


def test_the_watch_looks_often_and_waits_a_jitter_before_taking_over() -> None:
    assert period(300) == 2.0 and grace(300) == pytest.approx(300 * timing.JITTER)
    assert period(4) == pytest.approx(0.4) and grace(4) == 1.0  # the store keeps seconds
    assert period(0.1) == 0.05


async def test_two_daemons_leave_accounts_to_each_other_and_take_over_a_stopped_ones(
    store_at: StoreAt, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A dormant runner only wakes on its own after many intervals: any takeover below
    # is the watch's doing.
    monkeypatch.setattr(timing, "DORMANT_INTERVALS", 1000)
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
            daemon={"poll_interval": "1s", "shutdown_timeout": "5s"},
        )
        polls: dict[str, list[tuple[str, float]]] = {}

        def noting(who: str) -> Any:
            async def fetch(account: Account, store: Store, **kwargs: Any) -> FetchResult:
                result = await fetch_account(account, store, **kwargs)
                if not result.busy:
                    polls.setdefault(account.name, []).append((who, time.monotonic()))
                return result

            return fetch

        first = Daemon(load_config(config), config, fetch=noting("first"))
        second = Daemon(load_config(config), config, fetch=noting("second"))
        async with running(second):
            async with running(first):
                # Each account ends up with one daemon: the other's runner is dormant.
                await until(
                    lambda: len(first.dormant) + len(second.dormant) == ACCOUNTS,
                    "every account left to one daemon",
                    60,
                )
                assert first.dormant and second.dormant  # the work is spread
                mine = {r.name for r in second.dormant}  # the accounts the first polls
                idle = {name: len(polls[name]) for name in mine}
                await until(
                    lambda: all(len(polls[n]) >= idle[n] + 2 for n in mine), "two more polls"
                )
                # Left alone: those polls were all the first daemon's.
                assert all(who == "first" for n in mine for who, _ in polls[n][idle[n] :])
            stopped = time.monotonic()
            # The first daemon is gone: the second takes its accounts over, woken by the
            # watch (its dormant runners would sleep a thousand intervals).
            await until(
                lambda: all(
                    any(who == "second" and at > stopped for who, at in polls[n]) for n in mine
                ),
                "the stopped daemon's accounts polled by the other",
                30,
            )
            assert not second.dormant
