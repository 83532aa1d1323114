"""Per-account state: leases, login pacing, poll results, the daemon's pause and schedule.

Leases, login pacing, poll results and the schedule are written without waiting for the
disk (``durable=False``): a power cut may take back the last of them, which costs at most
a poll's status or one login too early, never mail. The auth pause stays durable: losing
it would try a refused password again.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from mailingest.errors import StoreError
from mailingest.model import AccountState, Claim, Status
from mailingest.store._db import Database, now_iso

_ENSURE = "INSERT INTO account_state (account) VALUES (?) ON CONFLICT DO NOTHING"


async def take_poll(
    db: Database,
    account: str,
    holder: str,
    ttl: float,
    *,
    due: tuple[datetime, datetime] | None = None,
    force: bool = False,
    stale: str | None = None,
) -> Claim:
    """Take the account's lease for ``ttl`` s, in one statement (the hot path of every poll).

    ``due`` = (now, until) also claims the scheduled poll for every process on the database:
    only if it is due at ``now`` (or ``force``: the settings changed) and the account is not
    paused; its next poll moves to ``until`` at once, so other daemons wake then, and take
    over within one interval if this one dies mid-poll. ``stale`` names a holder known to be
    dead: its lease is taken over even if unexpired.

    Another holder's expired lease (its process died elsewhere, or stopped renewing) is
    taken only by a second statement naming that holder, after the refusal was read: so the
    claim knows it took one over (``took_over``, counted as a takeover), at no cost to the
    usual claim of a free lease.
    """
    now = time.time()
    until = iso(due[1]) if due else None
    at = iso(due[0]) if due else ""
    expired: str | None = None  # a holder seen with its lease expired: taken if still so
    for _ in range(3):  # a refusal explained by nothing any more: the row changed between
        rows = await db.write_one(
            "taking the account lease",
            "INSERT INTO account_state (account, next_poll, lease_holder, lease_expires)"
            " VALUES (?,?,?,?) ON CONFLICT (account) DO UPDATE SET"
            " next_poll = coalesce(excluded.next_poll, account_state.next_poll),"
            " lease_holder = excluded.lease_holder, lease_expires = excluded.lease_expires"
            " WHERE (? OR (account_state.paused = 0 AND (account_state.next_poll IS NULL"
            " OR account_state.next_poll <= ? OR ?)))"
            " AND (account_state.lease_holder IS NULL"
            " OR account_state.lease_holder IN (?, ?)"
            " OR (account_state.lease_holder = ? AND account_state.lease_expires < ?))"
            " RETURNING next_login",
            (
                *(account, until, holder, now + ttl),
                *(due is None, at, force),
                *(holder, stale or holder, expired or holder, now),
            ),
            durable=False,
        )
        if rows:
            took_over = stale is not None or expired is not None
            return Claim(taken=True, holder=holder, next_login=rows[0][0], took_over=took_over)
        async with db.statement("reading why the account lease was refused", write=False):
            row = await db.fetchone(
                "SELECT next_poll, paused, pause_key, lease_holder, lease_expires"
                " FROM account_state WHERE account = ?",
                (account,),
            )
        if row is None:
            continue
        next_poll, paused, pause_key, lease_holder, expires = row
        if due is not None and (paused or not (force or next_poll is None or next_poll <= at)):
            return Claim(taken=False, next_poll=next_poll, paused=bool(paused), pause_key=pause_key)
        if lease_holder is not None and lease_holder not in (holder, stale):
            if expires is not None and float(expires) >= now:
                return Claim(taken=False, holder=str(lease_holder))
            expired = str(lease_holder)
    raise StoreError(f"account {account!r}: its lease row keeps changing; try again")


def iso(when: datetime) -> str:
    """As next_poll is stored: whole seconds, so that ISO strings compare as times."""
    return when.isoformat(timespec="seconds")


async def overdue(db: Database, before: datetime, limit: int) -> list[tuple[str, str | None]]:
    """Accounts whose scheduled poll is older than ``before`` (their poller died or lags),
    the most recent first, then paused ones (a daemon whose config brings another login
    polls those); each with the holder of its lease if that is still live (else None).
    Rows nobody polls any more (accounts removed, or only fetched by hand) come last."""
    async with db.statement("reading the overdue accounts", write=False):
        rows = await db.fetchall(
            "SELECT account, CASE WHEN lease_expires >= ? THEN lease_holder END"
            " FROM account_state WHERE paused = 1 OR next_poll IS NULL OR next_poll < ?"
            " ORDER BY next_poll IS NULL, next_poll DESC LIMIT ?",
            (time.time(), iso(before), limit),
        )
    return [(str(name), None if holder is None else str(holder)) for name, holder in rows]


async def renew_lease(db: Database, account: str, holder: str, ttl: float) -> None:
    # Locked: typed, so the fetch reports temp_failed.
    await db.write_one(
        "renewing the account lease",
        "UPDATE account_state SET lease_expires = ? WHERE account = ? AND lease_holder = ?",
        (time.time() + ttl, account, holder),
        durable=False,
    )


async def release_lease(db: Database, account: str, holder: str) -> None:
    # Locked: the lease then expires on its own.
    await db.write_one(
        "releasing the account lease",
        "UPDATE account_state SET lease_holder = NULL, lease_expires = NULL"
        " WHERE account = ? AND lease_holder = ?",
        (account, holder),
        durable=False,
    )


async def next_login(db: Database, account: str) -> datetime | None:
    async with db.statement("reading the next allowed login", write=False):
        row = await db.fetchone(
            "SELECT next_login FROM account_state WHERE account = ?", (account,)
        )
    return datetime.fromisoformat(row[0]) if row and row[0] else None


async def set_next_login(db: Database, account: str, when: datetime | None) -> None:
    """Remember the earliest next login that the server's LOGIN-DELAY allows."""
    async with db.write("recording the next allowed login", durable=False):
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
    result: Status,
    error: str | None,
    new: int,
    holder: str | None = None,
) -> str | None:
    """Record a poll's result and release ``holder``'s lease, in one statement; the next
    login LOGIN-DELAY allows (ISO UTC), read in the same breath."""
    failed = result is not Status.OK
    rows = await db.write_one(
        "recording the poll result",
        "INSERT INTO account_state (account, owner, last_poll, result, error, new,"
        " consecutive_failures) VALUES (?,?,?,?,?,?,?)"
        " ON CONFLICT (account) DO UPDATE SET owner = excluded.owner,"
        " last_poll = excluded.last_poll, result = excluded.result,"
        " error = excluded.error, new = excluded.new,"
        " consecutive_failures = CASE WHEN ? THEN account_state.consecutive_failures + 1"
        " ELSE 0 END,"
        # SET sees the row as it was: both test the holder before either clears it.
        " lease_expires = CASE WHEN account_state.lease_holder = ? THEN NULL"
        " ELSE account_state.lease_expires END,"
        " lease_holder = CASE WHEN account_state.lease_holder = ? THEN NULL"
        " ELSE account_state.lease_holder END"
        " RETURNING next_login",
        (
            *(account, owner, now_iso(), str(result), error, new, int(failed)),
            *(failed, holder, holder),
        ),
        durable=False,
    )
    return rows[0][0] if rows else None


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
            result=Status(r[3]) if r[3] is not None else None,
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


async def pause_key(db: Database, account: str) -> str | None:
    """The key of the account's recorded pause; None if it is not paused (any more)."""
    async with db.statement("reading the auth pause", write=False):
        row = await db.fetchone(
            "SELECT pause_key FROM account_state WHERE account = ? AND paused = 1", (account,)
        )
    return str(row[0]) if row is not None and row[0] is not None else None


async def set_next_polls(
    db: Database, when: dict[str, datetime | None], *, seen: dict[str, str | None] | None = None
) -> None:
    """The next poll of each account (ISO 8601 UTC, or none), in one transaction.

    ``seen``: the next polls as read when the plan was made; an account's is then changed
    only if it still holds that value. A daemon starting reads every account's state, plans
    its first polls and writes them: meanwhile another daemon may have claimed a poll,
    which moved the next one an interval ahead, and must not be moved back (the account
    would be polled twice within seconds).
    """
    async with db.write("recording the next polls", durable=False):
        await db.executemany(_ENSURE, [(name,) for name in when])
        await db.executemany(
            "UPDATE account_state SET next_poll = ?"
            " WHERE account = ? AND (? OR coalesce(next_poll, '') = ?)",
            [
                (iso(t) if t else None, name, seen is None, (seen or {}).get(name) or "")
                for name, t in when.items()
            ],
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
