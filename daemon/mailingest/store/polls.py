"""The claims and records of many accounts' polls, each kind in one statement.

A daemon with thousands of accounts makes two statements a poll, the claim and the record
(state.py), and each costs its event loop about as much as the rest of an empty poll
(bench/README.md, "Where a poll's CPU goes"). Those that arrive within ``window`` seconds of
the first go out together. Only what a batch can decide alone is batched: a claim that is
due, neither forced nor taking over, and a record whose row exists. Whatever a batch did
not do (a claim refused, a record with no row yet) comes back undone, and its caller makes
the single statement of state.py, which tells why: a batch changes how many round trips
the polls take, never what a poll decides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, NamedTuple, TypeVar

from mailingest.store._db import Database

#: The most rows one statement carries (a batch that fills up goes at once).
LIMIT = 64

_Item = TypeVar("_Item")


class Done(NamedTuple):
    """What a batch did for one row: ``done`` (taken, recorded), and the row's next_login."""

    done: bool
    next_login: str | None


class ClaimRow(NamedTuple):
    account: str
    holder: str
    ttl: float
    at: str  # the claim's now, as next_poll is stored (whole seconds)
    until: str  # the next poll it records


class RecordRow(NamedTuple):
    account: str
    owner: str
    last_poll: str
    result: str
    error: str | None
    new: int
    failed: bool
    holder: str | None


class Batch(Generic[_Item]):
    """Rows of one kind keyed by account, sent in one statement when its PollBatches says."""

    def __init__(self, send: Callable[[Sequence[_Item]], Awaitable[list[Done]]]) -> None:
        self._send = send
        self.pending: dict[str, tuple[_Item, asyncio.Future[Done]]] = {}
        self._sent: dict[asyncio.Task[None], list[asyncio.Future[Done]]] = {}

    def add(self, key: str, item: _Item) -> asyncio.Future[Done] | None:
        """The future answer for ``item``; None if a row of ``key`` is pending already (one
        statement must not change a row twice)."""
        if key in self.pending:
            return None
        future: asyncio.Future[Done] = asyncio.get_running_loop().create_future()
        self.pending[key] = (item, future)
        return future

    @property
    def sending(self) -> set[asyncio.Task[None]]:
        """The statements under way."""
        return set(self._sent)

    def start(self) -> None:
        """Send what is pending, if anything is."""
        if not self.pending:
            return
        batch, self.pending = list(self.pending.values()), {}
        task = asyncio.ensure_future(self._answer(batch))
        self._sent[task] = [future for _, future in batch]
        task.add_done_callback(self._sent.pop)

    def forget(self, key: str, future: asyncio.Future[Done]) -> None:
        """Its caller was cancelled: a row not sent yet is dropped, and a statement that
        every caller gave up is cancelled (rolled back, as a single statement would be)."""
        if self.pending.get(key, (None, None))[1] is future:
            del self.pending[key]
            return
        for task, futures in self._sent.items():
            if future in futures and all(f.cancelled() for f in futures):
                task.cancel()

    async def _answer(self, batch: list[tuple[_Item, asyncio.Future[Done]]]) -> None:
        try:
            answers = await self._send([item for item, _ in batch])
        except Exception:
            # Each row then goes alone, and meets the error itself if it lasts (a database
            # gone), or not (a deadlock with another daemon's batch, a row that failed).
            answers = [Done(False, None)] * len(batch)
        for (_, future), answer in zip(batch, answers, strict=True):
            if not future.done():  # else its caller was cancelled
                future.set_result(answer)


class PollBatches:
    """A store's batched claims and records (Store.batch_polls). Both kinds go out
    ``window`` s after the first row came, or at once when ``most`` rows wait: the daemon's
    polls claim and record while holding one of its ``max_concurrent`` slots, so with that
    many waiting, no other poll could add a row before the window ends."""

    def __init__(self, db: Database, window: float, most: int) -> None:
        self.window, self.most = window, most
        self.claims = Batch[ClaimRow](lambda rows: take_polls(db, rows))
        self.records = Batch[RecordRow](lambda rows: record_polls(db, rows))
        self._timer: asyncio.TimerHandle | None = None

    async def claim(self, row: ClaimRow) -> Done:
        return await self._submit(self.claims, row.account, row)

    async def record(self, row: RecordRow) -> Done:
        return await self._submit(self.records, row.account, row)

    async def _submit(self, batch: Batch[_Item], key: str, row: _Item) -> Done:
        future = batch.add(key, row)
        if future is None:
            return Done(False, None)
        if len(self.claims.pending) + len(self.records.pending) >= min(self.most, LIMIT):
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.window, self.flush)
        try:
            return await future
        except asyncio.CancelledError:
            batch.forget(key, future)
            raise

    def flush(self) -> None:
        """Send what is pending now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.claims.start()
        self.records.start()

    async def drain(self) -> None:
        """Send every row at once from now on, and wait for what is under way (before the
        store closes)."""
        self.most = 0
        self.flush()
        while sending := self.claims.sending | self.records.sending:
            await asyncio.wait(sending)


async def take_polls(db: Database, rows: Sequence[ClaimRow]) -> list[Done]:
    """State.take_poll's statement for many due claims at once: each row's lease and next
    poll, where its account is due, not paused and its lease free (or new)."""
    now = time.time()
    ordered = sorted(rows)  # every daemon locks rows in one order: no deadlock between them
    taken = await db.write_one(
        "taking the account leases",
        "INSERT INTO account_state (account, next_poll, lease_holder, lease_expires) VALUES "
        + ",".join(["(?,?,?,?)"] * len(rows))
        + " ON CONFLICT (account) DO UPDATE SET next_poll = excluded.next_poll,"
        " lease_holder = excluded.lease_holder, lease_expires = excluded.lease_expires"
        " WHERE account_state.paused = 0"
        " AND (account_state.next_poll IS NULL OR account_state.next_poll <= ?)"
        " AND (account_state.lease_holder IS NULL"
        " OR account_state.lease_holder = excluded.lease_holder)"
        " RETURNING account, next_login",
        # A row claimed later than it asked is still due: the latest "now" of the batch
        # refuses only what every one of them would.
        [v for r in ordered for v in (r.account, r.until, r.holder, now + r.ttl)]
        + [max(r.at for r in rows)],
        durable=False,
    )
    return _answers([r.account for r in rows], taken)


async def record_polls(db: Database, rows: Sequence[RecordRow]) -> list[Done]:
    """State.record_poll's statement for many polls at once, where each row exists."""
    ordered = sorted(rows)  # as in take_polls
    recorded = await db.write_one(
        "recording the poll results",
        "UPDATE account_state SET owner = v.column2, last_poll = v.column3,"
        " result = v.column4, error = v.column5, new = v.column6,"
        " consecutive_failures = CASE WHEN v.column7 = 1"
        " THEN account_state.consecutive_failures + 1 ELSE 0 END,"
        # SET sees the row as it was: both test the holder before either clears it.
        " lease_expires = CASE WHEN account_state.lease_holder = v.column8 THEN NULL"
        " ELSE account_state.lease_expires END,"
        " lease_holder = CASE WHEN account_state.lease_holder = v.column8 THEN NULL"
        " ELSE account_state.lease_holder END"
        " FROM (VALUES "
        + ",".join(["(?,?,?,?,?,?,?,?)"] * len(rows))
        + ") AS v WHERE account_state.account = v.column1"
        " RETURNING account_state.account, account_state.next_login",
        [v for r in ordered for v in (*r[:6], int(r.failed), r.holder)],
        durable=False,
    )
    return _answers([r.account for r in rows], recorded)


def _answers(accounts: list[str], rows: list[tuple[object, ...]]) -> list[Done]:
    done = {str(account): next_login for account, next_login in rows}
    return [
        Done(True, None if done[a] is None else str(done[a])) if a in done else Done(False, None)
        for a in accounts
    ]
