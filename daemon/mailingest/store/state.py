"""Per-account state: leases, login pacing, poll results, the daemon's pause and schedule."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from mailingest.model import AccountState, Claim
from mailingest.store._db import Database, now_iso

_ENSURE = "INSERT INTO account_state (account) VALUES (?) ON CONFLICT DO NOTHING"


async def acquire_lease(
    db: Database, account: str, holder: str, ttl: float, *, stale: str | None = None
) -> tuple[str, float] | None:
    """Take the account's lease: None if taken, else (holder, expiry) of the one who has it.

    ``stale`` names a holder known to be dead: its lease is taken over even if unexpired.
    """
    now = time.time()
    async with db.write("taking the account lease"):
        await db.execute(_ENSURE, (account,))
        taken = await db.execute(
            "UPDATE account_state SET lease_holder = ?, lease_expires = ?"
            " WHERE account = ? AND (lease_holder IS NULL OR lease_holder IN (?, ?)"
            " OR lease_expires < ?)",
            (holder, now + ttl, account, holder, stale or holder, now),
        )
        if taken == 1:
            return None
        row = await db.fetchone(
            "SELECT lease_holder, lease_expires FROM account_state WHERE account = ?",
            (account,),
        )
    assert row is not None
    return str(row[0]), float(row[1])


async def claim_poll(
    db: Database, account: str, now: datetime, until: datetime, *, force: bool = False
) -> Claim:
    """Take the account's poll that is due at ``now``, for every process on the database.

    Taken, the next poll moves to ``until`` at once (the poller records the real one when it
    is done), so other daemons wake then: if this one dies mid-poll they take over within
    one interval. Not taken: another process took it (the next poll is in the future) or
    the account is paused. ``force`` takes a poll that is not due (the settings changed).
    """
    async with db.write("claiming the account's poll"):
        await db.execute(_ENSURE, (account,))
        taken = await db.execute(
            "UPDATE account_state SET next_poll = ? WHERE account = ? AND paused = 0"
            " AND (next_poll IS NULL OR next_poll <= ? OR ?)",
            (_iso(until), account, _iso(now), force),
        )
        if taken == 1:
            return Claim(taken=True)
        row = await db.fetchone(
            "SELECT next_poll, paused, pause_key FROM account_state WHERE account = ?",
            (account,),
        )
    assert row is not None
    return Claim(taken=False, next_poll=row[0], paused=bool(row[1]), pause_key=row[2])


def _iso(when: datetime) -> str:
    """As next_poll is stored: whole seconds, so that ISO strings compare as times."""
    return when.isoformat(timespec="seconds")


async def renew_lease(db: Database, account: str, holder: str, ttl: float) -> None:
    # Locked: typed, so the fetch reports temp_failed.
    async with db.write("renewing the account lease"):
        await db.execute(
            "UPDATE account_state SET lease_expires = ? WHERE account = ? AND lease_holder = ?",
            (time.time() + ttl, account, holder),
        )


async def release_lease(db: Database, account: str, holder: str) -> None:
    # Locked: the lease then expires on its own.
    async with db.write("releasing the account lease"):
        await db.execute(
            "UPDATE account_state SET lease_holder = NULL, lease_expires = NULL"
            " WHERE account = ? AND lease_holder = ?",
            (account, holder),
        )


async def next_login(db: Database, account: str) -> datetime | None:
    async with db.read("reading the next allowed login"):
        row = await db.fetchone(
            "SELECT next_login FROM account_state WHERE account = ?", (account,)
        )
    return datetime.fromisoformat(row[0]) if row and row[0] else None


async def set_next_login(db: Database, account: str, when: datetime | None) -> None:
    """Remember the earliest next login that the server's LOGIN-DELAY allows."""
    async with db.write("recording the next allowed login"):
        await db.execute(_ENSURE, (account,))
        await db.execute(
            "UPDATE account_state SET next_login = ? WHERE account = ?",
            (_to_second_up(when).isoformat() if when else None, account),
        )


async def record_poll(
    db: Database,
    account: str,
    owner: str,
    *,
    result: str,
    error: str | None,
    new: int,
    next_poll: str | None = None,
) -> None:
    failed = result != "ok"
    async with db.write("recording the poll result"):
        await db.execute(
            "INSERT INTO account_state (account, owner, last_poll, result, error, new,"
            " consecutive_failures, next_poll) VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT (account) DO UPDATE SET owner = excluded.owner,"
            " last_poll = excluded.last_poll, result = excluded.result,"
            " error = excluded.error, new = excluded.new,"
            " consecutive_failures = CASE WHEN ? THEN account_state.consecutive_failures + 1"
            " ELSE 0 END,"
            # The daemon's schedule is its own (set_next_polls): a poll result
            # without one keeps it, so `status` never loses the next poll.
            " next_poll = coalesce(excluded.next_poll, account_state.next_poll)",
            (account, owner, now_iso(), str(result), error, new, int(failed), next_poll, failed),
        )


_STATE_COLUMNS = (
    "account, owner, last_poll, result, error, new, paused, pause_reason, pause_key,"
    " next_poll, next_login, consecutive_failures"
)


async def account_states(db: Database, *, counts: bool = True) -> dict[str, AccountState]:
    """Every account's state; ``counts``: with the number of messages stored for each."""
    stored = "(SELECT count(*) FROM messages m WHERE m.account = s.account)" if counts else "0"
    async with db.read("reading the account states"):
        rows = await db.fetchall(f"SELECT {_STATE_COLUMNS}, {stored} FROM account_state s")
    return {
        r[0]: AccountState(
            account=r[0],
            owner=r[1],
            last_poll=r[2],
            result=r[3],
            error=r[4],
            new=int(r[5] or 0),
            paused=bool(r[6]),
            pause_reason=r[7],
            pause_key=r[8],
            next_poll=r[9],
            next_login=r[10],
            consecutive_failures=int(r[11] or 0),
            stored=int(r[12]),
        )
        for r in rows
    }


async def count_sent_since(db: Database, account: str, since: str) -> int:
    """Messages sent from the CRM through this account since ``since`` (ISO 8601 UTC)."""
    async with db.read("counting sent mail"):
        row = await db.fetchone(
            "SELECT count(*) FROM messages WHERE account = ? AND origin = 'crm'"
            " AND received_at >= ?",
            (account, since),
        )
    return int(row[0]) if row else 0


async def stored_count(db: Database, account: str) -> int:
    async with db.read("counting stored mail"):
        row = await db.fetchone("SELECT count(*) FROM messages WHERE account = ?", (account,))
    return int(row[0]) if row else 0


# -- the daemon's state ----------------------------------------------------------------------
# Written by the scheduler only: the auth pause and the next poll, so that `status` shows
# them and a restarted daemon keeps them.


async def set_paused(db: Database, account: str, reason: str, key: str | None) -> None:
    """Pause polling: no next poll until ``clear_pause`` (the scheduler decides when)."""
    await _daemon_write(
        db,
        account,
        "UPDATE account_state SET paused = 1, pause_reason = ?, pause_key = ?,"
        " next_poll = NULL WHERE account = ?",
        (reason, key, account),
    )


async def clear_pause(db: Database, account: str) -> None:
    await _daemon_write(
        db,
        account,
        "UPDATE account_state SET paused = 0, pause_reason = NULL, pause_key = NULL"
        " WHERE account = ?",
        (account,),
    )


async def set_next_polls(db: Database, when: dict[str, datetime | None]) -> None:
    """The next poll of each account (ISO 8601 UTC, or none), in one transaction."""
    async with db.write("recording the next polls"):
        await db.executemany(_ENSURE, [(name,) for name in when])
        await db.executemany(
            "UPDATE account_state SET next_poll = ? WHERE account = ?",
            [(_iso(t) if t else None, name) for name, t in when.items()],
        )


async def _daemon_write(db: Database, account: str, sql: str, args: Sequence[Any]) -> None:
    async with db.write("recording the account's pause"):
        await db.execute(_ENSURE, (account,))
        await db.execute(sql, args)


def _to_second_up(when: datetime) -> datetime:
    """Whole seconds, rounded up: a login allowed at the stored time is never too early."""
    if when.microsecond:
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return when
