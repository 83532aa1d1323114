"""One account's fetch cycle: list -> diff -> retrieve -> store+commit -> DELE -> QUIT.

Invariant: DELE only for messages whose ledger row is committed (this cycle's or an
earlier one's), so a kill at any instant re-fetches and dedups rather than loses mail.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mailingest import lease, signin
from mailingest.config import Account
from mailingest.errors import (
    BusyError,
    LoginDelayError,
    MailIngestError,
    StoreError,
    TemporaryError,
)
from mailingest.logs import get_logger, mask_text
from mailingest.model import POLL_STATUSES, Claim, LedgerEntry, Status
from mailingest.pipeline import SessionTally, store_batches
from mailingest.pop3 import Pop3Session
from mailingest.progress import Progress, Tally
from mailingest.retrieval import batches
from mailingest.store import Store

log = get_logger("mailingest.fetch")


@dataclass
class FetchResult:
    """One account's cycle, as `fetch --json` reports it."""

    account: str
    status: Status = Status.OK
    new: int = 0
    bytes: int = 0
    deleted: int = 0
    duration_ms: int = 0
    error: str | None = None
    sessions: int = 0
    #: Another process held the account's lease: this run touched nothing.
    busy: bool = False
    #: The earliest next login the server's LOGIN-DELAY allows, as the store had it at the end.
    next_login: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "status": self.status,
            "new": self.new,
            "bytes": self.bytes,
            "deleted": self.deleted,
            "duration_ms": self.duration_ms,
            "error": self.error,
        }


#: Gmail lists "about 250 of the oldest messages not yet downloaded" per session (250
#: conversations, so at least 250 messages): a listing this long may have been capped.
LISTING_CAP = 250
#: Servers known to cap their listings.
_CAPPING_HOSTS = ("pop.gmail.com", "pop.googlemail.com")
#: Accounts whose last drain session found more mail (their listings are capped below
#: LISTING_CAP, a server we do not know): drained again while sessions bring new mail.
_DRAIN_FOUND: dict[str, bool] = {}


def _may_be_capped(account: Account, listed: int) -> bool:
    """Whether a session that stored new mail may have seen only part of the mailbox: only
    then does another session follow (it costs a login and ~7 round trips)."""
    return (
        listed >= LISTING_CAP
        or account.host.lower() in _CAPPING_HOSTS
        or account.recent_mode
        or _DRAIN_FOUND.get(account.name, False)
    )


def _deletes(account: Account) -> bool:
    """Whether any stored message of the account may be due for DELE: else a session that
    stored mail need not read the whole ledger again (it grows with what stays on the
    server) to find nothing."""
    return not account.leave_on_server or account.delete_after_days > 0


def _should_delete(account: Account, entry: LedgerEntry, now: datetime) -> bool:
    if entry.held:
        return False  # only its header is stored: it stays on the server until released
    if entry.deleted and not account.leave_on_server:
        return True  # DELEted before but still listed: the QUIT never came; delete again.
    if not account.leave_on_server:
        return True
    if account.delete_after_days > 0:
        first = datetime.fromisoformat(entry.first_seen)
        return now - first >= timedelta(days=account.delete_after_days)
    return False


async def _one_session(
    account: Account, store: Store, spool_dir: Path, tally: Tally | None, result: SessionTally
) -> int:
    """One POP3 session; adds what it did to ``result`` as it goes and returns the new count."""
    login, _ = await signin.pop3_login(account, store)  # OAuth2: a fresh token first
    session = Pop3Session(login)
    new_before = result.new
    # Read before the login where the last listing held mail (under the lease, only this
    # cycle changes it): a mailbox with nothing new is then listed, cleaned and closed in
    # one trip to a worker thread. An empty listing needs no ledger at all.
    ledger = await store.ledger(account.name) if _LISTED.get(account.name, True) else None
    try:
        try:
            seen = await asyncio.to_thread(_open, session, account, ledger)
        finally:
            await _pace_logins(account, store, session)
        _LISTED[account.name] = bool(seen.listing)
        result.listed = len(seen.listing)
        if seen.ledger_needed:
            ledger = await store.ledger(account.name)
            seen = _diff(account, seen.listing, seen.sizes, ledger)
        if seen.suspect:
            log.warning("duplicate_uidl", account=account.name, uidls=sorted(seen.suspect)[:10])
        refused = None
        doomed = seen.doomed
        if seen.new:
            limit = account.max_message_size
            big = {n: seen.sizes[n] for n, _ in seen.new if limit and seen.sizes.get(n, 0) > limit}
            work = [(n, u) for n, u in seen.new if n not in big]
            job = functools.partial(
                store_batches,
                account,
                store,
                session,
                spool_dir=spool_dir,
                suspect=seen.suspect,
                key_of=seen.key_of,
            )
            refused = await job(batches(work, seen.sizes), result=result, tally=tally)
            if big and not session.broken:
                held = batches([(n, u) for n, u in seen.new if n in big], {})
                refused = await job(held, result=result, tally=tally, held=big) or refused
            if _deletes(account):
                doomed = _doomed(account, seen.key_of, await store.ledger(account.name))
        if not seen.closed:
            # Every doomed number maps to a committed ledger row: DELE is safe now.
            await asyncio.to_thread(_close, session, [n for n, _ in doomed])
        if doomed:
            result.deleted += len(doomed)
            await store.mark_deleted(account.name, [k for _, k in doomed])
        if refused is not None:
            raise refused
    finally:
        session.close()
    return result.new - new_before


@dataclass
class _Seen:
    """A session's listing against the ledger."""

    listing: list[tuple[int, str]]
    sizes: dict[int, int]
    suspect: set[str] = field(default_factory=set)  # listed more than once: compared by content
    key_of: dict[int, str] = field(default_factory=dict)  # numbers known stored: DELE targets
    new: list[tuple[int, str]] = field(default_factory=list)
    doomed: list[tuple[int, str]] = field(default_factory=list)  # (number, key) deleted at once
    closed: bool = False  # nothing new: the session already ended (DELE doomed, QUIT)
    ledger_needed: bool = False  # listed without the ledger at hand: compare it now


#: Accounts whose last listing held messages (a hint: their next session reads the ledger
#: before it logs in).
_LISTED: dict[str, bool] = {}


def _open(session: Pop3Session, account: Account, ledger: dict[str, LedgerEntry] | None) -> _Seen:
    """Log in and list; with nothing new, also delete what is due and QUIT: one trip to a
    worker thread for the whole session (each trip costs more CPU than an empty mailbox's
    session itself)."""
    session.connect()
    listing, sizes = session.listing()
    if ledger is None and listing:
        return _Seen(listing, sizes, ledger_needed=True)
    seen = _diff(account, listing, sizes, ledger or {})
    if not seen.new:
        _close(session, [n for n, _ in seen.doomed])
        seen.closed = True
    return seen


def _diff(
    account: Account,
    listing: list[tuple[int, str]],
    sizes: dict[int, int],
    ledger: dict[str, LedgerEntry],
) -> _Seen:
    counts = Counter(uidl for _, uidl in listing)
    suspect = {uidl for uidl, count in counts.items() if count > 1}
    key_of = {num: uidl for num, uidl in listing if uidl in ledger and uidl not in suspect}
    new = [(num, uidl) for num, uidl in listing if uidl in suspect or uidl not in ledger]
    # Nothing new: what is due for deletion goes now (each key has a committed ledger row).
    doomed = [] if new else _doomed(account, key_of, ledger)
    return _Seen(listing, sizes, suspect, key_of, new, doomed)


def _doomed(
    account: Account, key_of: dict[int, str], ledger: dict[str, LedgerEntry]
) -> list[tuple[int, str]]:
    now = datetime.now(UTC)
    return [
        (num, key)
        for num, key in sorted(key_of.items())
        if key in ledger and _should_delete(account, ledger[key], now)
    ]


def _close(session: Pop3Session, doomed: list[int]) -> None:
    if doomed:
        session.delete(doomed)
    session.quit()


async def _pace_logins(account: Account, store: Store, session: Pop3Session) -> None:
    """Remember when the server's LOGIN-DELAY next allows a login (CAPA before or after it)."""
    delay = session.capabilities.login_delay
    if delay:
        await store.set_next_login(account.name, datetime.now(UTC) + timedelta(seconds=delay))


async def fetch_account(
    account: Account,
    store: Store,
    *,
    max_sessions: int = 10,
    progress: Progress | None = None,
    log_failure: bool = True,
    claim: Claim | None = None,
) -> FetchResult:
    """Run one cycle for one account; never raises for account-level failures.

    ``log_failure=False`` leaves the `poll_failed` line to the caller: the daemon logs it
    with the wait it chose before the next attempt. ``claim``: the lease the caller took
    (see ``take_poll``); this cycle releases it. Without one, the cycle takes the lease.
    ``progress`` hears the cycle's figures as each message arrives (progress.Progress).
    """
    started = time.monotonic()
    log.debug("poll_started", account=account.name)
    result = FetchResult(account=account.name)
    total = SessionTally()
    busy = False
    try:
        if claim is None:
            claim = await lease.take_poll(store, account.name)
            busy = claim.busy
        if not busy:
            await _cycle(account, store, max_sessions, progress, total, result, claim)
    except MailIngestError as exc:
        if exc.account is None:
            exc.account = account.name
        result.status = exc.status if exc.status in POLL_STATUSES else Status.ERROR
        result.error = mask_text(str(exc))
        if isinstance(exc, LoginDelayError):
            await _quietly(store.set_next_login(account.name, datetime.fromisoformat(exc.retry_at)))
    except Exception as exc:  # a bug must not take down the other accounts' cycles
        log.exception("poll_crashed", account=account.name)
        result.status = Status.ERROR
        # Masked like the logs: this text reaches stdout (`fetch --json`) and the store.
        crash = f"account {account.name!r}: internal error: {type(exc).__name__}: {exc}"
        result.error = mask_text(crash)
    if busy:
        result.busy = True
        result.status = Status.TEMP_FAILED
        result.error = str(BusyError(_BUSY, account=account.name))
    result.new, result.bytes, result.deleted = total.new, total.bytes, total.deleted
    result.duration_ms = int((time.monotonic() - started) * 1000)
    if result.status is Status.OK:
        log.info(
            "poll_completed",
            account=account.name,
            new=result.new,
            bytes=result.bytes,
            deleted=result.deleted,
            duration_ms=result.duration_ms,
        )
    elif log_failure:
        log_poll_failed(account.name, result.status, result.error, None)  # no retry here
    if not busy:  # the lease holder's record stays: this run did nothing
        holder = claim.holder if claim is not None and claim.taken else None
        try:
            allowed = await store.record_poll(
                account.name,
                account.owner,
                result=result.status,
                error=result.error,
                new=result.new,
                holder=holder,  # released with the record: one statement
            )
            result.next_login = datetime.fromisoformat(allowed) if allowed else None
        except StoreError as exc:  # the lease then expires on its own
            log.error("state_not_recorded", account=account.name, error=str(exc))
    return result


def log_poll_failed(
    account: str, status: Status, error: str | None, retry_in: float | None
) -> None:
    """`poll_failed`, with the wait before the next attempt (None: none comes: a one-shot
    fetch, a paused account, a stopping daemon). Transient failures are warnings."""
    if status.transient:
        log.warning(
            "poll_failed", account=account, error_kind=status, error=error, retry_in_s=retry_in
        )
    else:
        log.error(
            "poll_failed", account=account, error_kind=status, error=error, retry_in_s=retry_in
        )


_BUSY = "busy: another process is fetching this account; nothing was touched"


async def _cycle(
    account: Account,
    store: Store,
    max_sessions: int,
    progress: Progress | None,
    total: SessionTally,
    result: FetchResult,
    claim: Claim,
) -> None:
    """Sessions under the account's lease (``claim``, taken); the caller releases it."""
    holder = claim.holder
    assert claim.taken and holder is not None
    lease.RUNNING.add(holder)
    renewer = lease.Renewer(store, account.name, holder)
    tally = Tally(account.name, progress) if progress is not None else None
    try:
        # Read with the lease: the first session needs no read of its own.
        allowed = datetime.fromisoformat(claim.next_login) if claim.next_login else None
        for number in range(max_sessions):
            if number:
                allowed = await store.next_login(account.name)
            if allowed is not None and allowed > datetime.now(UTC):
                if number == 0:
                    raise LoginDelayError(
                        f"the server's LOGIN-DELAY allows the next login at "
                        f"{allowed.isoformat(timespec='seconds')}",
                        account=account.name,
                        retry_at=allowed.isoformat(),
                    )
                break  # more mail may wait, but the next login must wait for the next poll
            result.sessions += 1
            new = await _one_session(account, store, store.spool_dir, tally, total)
            if number:
                _DRAIN_FOUND[account.name] = new > 0
            if new == 0 or not _may_be_capped(account, total.listed):
                break  # nothing new, or all of it listed: the mailbox is drained
    except BaseException as exc:
        # An Exception reaches fetch_account, whose record of the failure releases the
        # lease; a cancel does not: release it here.
        if not isinstance(exc, Exception):
            await _quietly(store.release_lease(account.name, holder))
        raise
    finally:
        renewer.cancel()
        lease.RUNNING.discard(holder)
        if tally is not None:
            tally.finish(total.new, total.bytes)


async def _quietly(job: Awaitable[None]) -> None:
    try:
        await job
    except StoreError as exc:
        log.warning("state_not_recorded", error=str(exc))


__all__ = ["FetchResult", "TemporaryError", "fetch_account", "log_poll_failed"]
