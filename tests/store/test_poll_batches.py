"""Batched claims and records (store/polls.py), on both backends: one statement for the
polls that come together, and the same decisions as each poll's own statement."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from mailingest.errors import StoreError
from mailingest.model import Claim, Status
from mailingest.store import Store, polls
from support import StoreAt

#: A bound on any one wait here (never a benchmark).
WAIT_S = 30.0
NOW = datetime.now(UTC).replace(microsecond=0)
LATER = NOW + timedelta(minutes=5)


@pytest.fixture
async def counted(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Store, list[tuple[str, int]]]]:
    """The store, and each batch statement it makes: (kind, rows)."""
    sent: list[tuple[str, int]] = []

    def counting(kind: str, send: Callable[..., Awaitable[list[polls.Done]]]) -> Any:
        async def wrapped(db: Any, rows: Sequence[Any]) -> list[polls.Done]:
            sent.append((kind, len(rows)))
            try:
                return await send(db, rows)
            except StoreError:
                sent.append((f"{kind} failed", len(rows)))
                raise

        return wrapped

    monkeypatch.setattr(polls, "take_polls", counting("claims", polls.take_polls))
    monkeypatch.setattr(polls, "record_polls", counting("records", polls.record_polls))
    yield store, sent


#: Every state a claim can meet: (row, paused, next poll, lease); the row's absence alone.
STATES = [(False, False, "none", "free")] + [
    (True, paused, next_poll, lease)
    for paused, next_poll, lease in itertools.product(
        (False, True), ("none", "past", "future"), ("free", "live", "expired")
    )
]


def _prepare(store_at: StoreAt, account: str, state: tuple[bool, bool, str, str]) -> None:
    row, paused, next_poll, lease = state
    if not row:
        return
    poll = {"none": None, "past": NOW - timedelta(minutes=1), "future": LATER}[next_poll]
    holder, expires = {
        "free": (None, None),
        "live": ("other", time.time() + 600),
        "expired": ("other", time.time() - 1),
    }[lease]
    store_at.query(
        "INSERT INTO account_state (account, paused, pause_key, next_poll, lease_holder,"
        " lease_expires) VALUES (?,?,?,?,?,?)",
        (
            account,
            int(paused),
            "key" if paused else None,
            poll.isoformat(timespec="seconds") if poll else None,
            holder,
            expires,
        ),
    )


def _decided(claim: Claim) -> tuple[Any, ...]:
    """What a claim decided, the holder's name left out (each path names its own)."""
    return (claim.taken, claim.busy, claim.paused, claim.pause_key, claim.next_poll)


def _rows(store_at: StoreAt, prefix: str) -> dict[str, tuple[Any, ...]]:
    rows = store_at.query(
        "SELECT account, paused, next_poll, lease_holder IS NULL, lease_holder = 'other'"
        " FROM account_state WHERE account LIKE ?",
        (f"{prefix}%",),
    )
    return {str(r[0]).removeprefix(prefix): tuple(r[1:]) for r in rows}


async def test_claims_that_come_together_decide_in_one_statement_as_each_would_alone(
    counted: tuple[Store, list[tuple[str, int]]], store_at: StoreAt
) -> None:
    """Every state a claim can meet, claimed once poll by poll and once in a batch: the
    same claims, and the same rows after; the batch takes what it can in one statement,
    and the rest falls back to the single statement, which tells why."""
    store, sent = counted
    for i, state in enumerate(STATES):
        _prepare(store_at, f"one-{i}", state)
        _prepare(store_at, f"all-{i}", state)
    alone = [
        await store.take_poll(f"one-{i}", f"h1-{i}", 60, due=(NOW, LATER))
        for i in range(len(STATES))
    ]
    assert sent == []
    store.batch_polls(0.2, 1000)
    together = await asyncio.wait_for(
        asyncio.gather(
            *(
                store.take_poll(f"all-{i}", f"h2-{i}", 60, due=(NOW, LATER))
                for i in range(len(STATES))
            )
        ),
        WAIT_S,
    )
    assert [_decided(c) for c in together] == [_decided(c) for c in alone]
    assert [c.took_over for c in together] == [c.took_over for c in alone]
    assert _rows(store_at, "all-") == _rows(store_at, "one-")
    taken = sum(c.taken for c in together)
    assert 0 < taken < len(STATES)  # both kinds are here
    assert sent == [("claims", len(STATES))]
    # Free, due, unpaused rows (and the new one) are what the batch itself took.
    assert [c.holder for c in together if c.taken and not c.took_over] == [
        f"h2-{i}"
        for i, (_, paused, next_poll, lease) in enumerate(STATES)
        if not paused and next_poll != "future" and lease == "free"
    ]


async def test_records_that_come_together_release_their_leases_in_one_statement(
    counted: tuple[Store, list[tuple[str, int]]],
) -> None:
    store, sent = counted
    store.batch_polls(0.2, 1000)
    names = [f"acct-{i}" for i in range(5)]
    claims = await asyncio.gather(
        *(store.take_poll(n, f"h-{n}", 60, due=(NOW, LATER)) for n in names)
    )
    assert all(c.taken for c in claims)
    await store.set_next_login("acct-0", datetime(2030, 1, 1, tzinfo=UTC))
    results = ["ok", "ok", "auth_failed", "temp_failed", "ok"]
    allowed = await asyncio.gather(
        *(
            store.record_poll(
                n,
                "alice",
                result=Status(r),
                error=None if r == "ok" else "why",
                new=i,
                holder=f"h-{n}" if n != "acct-4" else "someone-else",
            )
            for i, (n, r) in enumerate(zip(names, results, strict=True))
        ),
        # An account with no row yet: its record falls back to the single statement.
        store.record_poll("fresh", "bob", result=Status.OK, error=None, new=1, holder=None),
    )
    assert allowed == ["2030-01-01T00:00:00+00:00", None, None, None, None, None]
    assert sent == [("claims", 5), ("records", 6)]
    states = await store.account_states(counts=False)
    assert [(states[n].result, states[n].new, states[n].owner) for n in names] == [
        (r, i, "alice") for i, r in enumerate(results)
    ]
    assert [states[n].consecutive_failures for n in names] == [0, 0, 1, 1, 0]
    assert (states["fresh"].result, states["fresh"].owner) == ("ok", "bob")
    # Released by its holder's record; acct-4's record named another holder: still held.
    free = [(await store.take_poll(n, "next", 60)).taken for n in names]
    assert free == [True, True, True, True, False]


async def test_a_batch_goes_at_once_when_as_many_rows_wait_as_polls_may_run(
    counted: tuple[Store, list[tuple[str, int]]],
) -> None:
    store, sent = counted
    store.batch_polls(3600, 3)  # the window alone would outlast the test
    claims = await asyncio.wait_for(
        asyncio.gather(
            *(store.take_poll(f"a{i}", f"h{i}", 60, due=(NOW, LATER)) for i in range(3))
        ),
        WAIT_S,
    )
    assert all(c.taken for c in claims)
    assert sent == [("claims", 3)]
    # Two claims of one account in one window: the second goes alone (one statement must
    # not change a row twice); one of them takes the poll, and the other finds it taken.
    store.batch_polls(0.2, 1000)
    both = await asyncio.gather(
        store.take_poll("b", "h1", 60, due=(NOW, LATER)),
        store.take_poll("b", "h2", 60, due=(NOW, LATER)),
    )
    later = LATER.isoformat(timespec="seconds")
    assert sorted((c.taken, c.next_poll) for c in both) == [(False, later), (True, None)]


async def test_closing_the_store_sends_what_waits(store_at: StoreAt) -> None:
    store = await store_at.open()
    store.batch_polls(3600, 1000)
    claim = asyncio.create_task(store.take_poll("acct", "h1", 60, due=(NOW, LATER)))
    await asyncio.sleep(0.05)
    assert not claim.done()
    await asyncio.wait_for(store.close(), WAIT_S)
    assert (await claim).taken
    assert store_at.query("SELECT lease_holder FROM account_state") == [("h1",)]


async def test_a_failed_batch_leaves_each_row_to_its_own_statement(
    counted: tuple[Store, list[tuple[str, int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails (a deadlock with another daemon's, a row that cannot be written)
    fails no poll: each row goes alone, and meets the error itself if it lasts."""
    store, sent = counted

    async def failing(db: Any, rows: Sequence[Any]) -> list[polls.Done]:
        sent.append(("failed", len(rows)))
        raise StoreError("deadlock detected")

    monkeypatch.setattr(polls, "take_polls", failing)
    monkeypatch.setattr(polls, "record_polls", failing)
    store.batch_polls(0.05, 1000)
    claims = await asyncio.gather(
        *(store.take_poll(f"a{i}", f"h{i}", 60, due=(NOW, LATER)) for i in range(3))
    )
    assert [c.taken for c in claims] == [True] * 3
    await asyncio.gather(
        *(
            store.record_poll(f"a{i}", "o", result=Status.OK, error=None, new=0, holder=f"h{i}")
            for i in range(3)
        )
    )
    assert sent == [("failed", 3), ("failed", 3)]
    assert [(await store.take_poll(f"a{i}", "next", 60)).taken for i in range(3)] == [True] * 3


async def test_two_daemons_batching_the_same_accounts_each_take_a_poll_once(
    counted: tuple[Store, list[tuple[str, int]]], store_at: StoreAt
) -> None:
    """Two stores (two daemons) claim and record the same accounts in batches, in
    opposite orders, round after round: every poll is taken by exactly one of them, and
    nothing fails (their batches lock rows in one order)."""
    store, sent = counted
    other = await store_at.open()
    try:
        for s in (store, other):
            s.batch_polls(0.05, 1000)
        names = [f"acct-{i:02}" for i in range(12)]

        async def poll(s: Store, name: str, holder: str, due: tuple[datetime, datetime]) -> int:
            claim = await s.take_poll(name, holder, 60, due=due)
            if claim.taken:
                await s.record_poll(
                    name, "o", result=Status.OK, error=None, new=0, holder=claim.holder
                )
            return int(claim.taken)

        for round_ in range(4):
            due = (NOW + timedelta(minutes=10 * round_), LATER + timedelta(minutes=10 * round_))
            taken = await asyncio.wait_for(
                asyncio.gather(
                    *(poll(store, n, f"a-{n}-{round_}", due) for n in names),
                    *(poll(other, n, f"b-{n}-{round_}", due) for n in reversed(names)),
                ),
                WAIT_S,
            )
            by_name = [taken[i] + taken[2 * len(names) - 1 - i] for i in range(len(names))]
            assert by_name == [1] * len(names), round_
        assert [kind for kind, _ in sent if "failed" in kind] == []  # no deadlock, say
        assert store_at.query("SELECT count(*) FROM account_state WHERE lease_holder IS NULL") == [
            (len(names),)
        ]
    finally:
        await other.close()


async def test_a_cancelled_claim_leaves_nothing_whether_sent_or_not(
    store: Store, store_at: StoreAt
) -> None:
    """As with a single statement (test_store.py): a claim cancelled before it commits
    leaves no lease and no moved poll, whether its batch was sent or still waited."""
    store.batch_polls(3600, 1000)
    waiting = asyncio.create_task(store.take_poll("unsent", "h1", 60, due=(NOW, LATER)))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with store_at.write_locked():  # another process writes: the batch's statement waits
        store.batch_polls(0.01, 1000)
        sent = [
            asyncio.create_task(store.take_poll(f"sent{i}", "h", 60, due=(NOW, LATER)))
            for i in range(2)
        ]
        await asyncio.sleep(0.3)
        for task in sent:
            task.cancel()
        await asyncio.sleep(0.2)  # the cancel is seen while the statement still waits
    for task in (waiting, *sent):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert store_at.query("SELECT account FROM account_state") == []
    assert (await store.take_poll("sent0", "h2", 60, due=(NOW, LATER))).taken
