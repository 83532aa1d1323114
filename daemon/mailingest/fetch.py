"""One account's fetch cycle: list -> diff -> retrieve -> store+commit -> DELE -> QUIT.

Invariant: DELE only for messages whose ledger row is committed (this cycle's or an
earlier one's), so a kill at any instant re-fetches and dedups rather than loses mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import os
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from mailingest import signin
from mailingest.config import Account
from mailingest.crm import account_policy
from mailingest.errors import (
    BusyError,
    LoginDelayError,
    MailIngestError,
    StoreError,
    TemporaryError,
)
from mailingest.logs import mask_text
from mailingest.matching import direction_of, link_addresses, normalize_all
from mailingest.model import POLL_STATUSES, AccountPolicy, Claim, LedgerEntry, NewMessage, Status
from mailingest.parse import parse_headers, read_head
from mailingest.pop3 import Pop3Session
from mailingest.progress import Progress, Tally
from mailingest.store import Store

log = structlog.get_logger("mailingest.fetch")

#: Group commit: a batch is committed (one fsync) after this many messages or bytes.
BATCH_COUNT = 200
BATCH_BYTES = 32 * 1024 * 1024
#: Spool files keep at most this much of one message in memory before going to disk.
SPOOL_MEMORY = 256 * 1024
#: An account's lease outlives its holder by at most this long; renewed every third of it.
LEASE_TTL = 60.0


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


class _Spool:
    """One message on its way to the store: hashed and counted while it streams in."""

    def __init__(self, directory: Path) -> None:
        self.file = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY, dir=str(directory))
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
        self.file.write(data)

    def finish(self) -> None:
        """Write out what is still buffered: a full disk fails here, typed, not at a later
        seek or close, where it escaped as an internal error."""
        try:
            self.file.flush()
        except OSError as exc:
            raise StoreError(f"cannot spool the message: {exc.strerror or exc}") from exc

    def discard(self) -> None:
        """Close (the file goes away); data that cannot be written out (disk full) is dropped."""
        with contextlib.suppress(OSError):
            self.file.close()


@dataclass
class _Session:
    """What one POP3 session did."""

    new: int = 0
    bytes: int = 0
    deleted: int = 0
    listed: int = 0  # the last session's listing


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


def _batches(new: Sequence[tuple[int, str]], sizes: dict[int, int]) -> list[list[tuple[int, str]]]:
    """Cut the retrieval list into group-commit batches by count and listed bytes."""
    out: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []
    total = 0
    for num, uidl in new:
        size = sizes.get(num, 0)
        if current and (len(current) >= BATCH_COUNT or total + size > BATCH_BYTES):
            out.append(current)
            current, total = [], 0
        current.append((num, uidl))
        total += size
    if current:
        out.append(current)
    return out


def retrieve_spooled(
    session: Pop3Session,
    batch: list[tuple[int, str]],
    spool_dir: Path,
    suspect: set[str],
    header_only: bool = False,
    arrived: Callable[[int], None] | None = None,
) -> tuple[list[tuple[int, str, _Spool]], MailIngestError | None]:
    """Worker-thread side: RETR a batch into spool files (pipelined when offered).

    Returns (number, ledger key, spool) per message received whole; ``arrived`` hears the
    size of each as it comes (live progress: Tally.hook). The key is the UIDL,
    or, for a UIDL the listing holds more than once, the UIDL plus the content hash: such
    an id does not tell the messages apart, their content does. On a failure the messages
    received so far are returned with the error, so they are committed before it ends the
    session.
    """
    spools: dict[int, _Spool] = {}

    def open_sink(num: int) -> Callable[[bytes], None]:
        spool = spools[num] = _Spool(spool_dir)
        return spool.write

    uidl_of = dict(batch)
    done: list[tuple[int, str, _Spool]] = []
    error: MailIngestError | None = None
    stream = session.retrieve([n for n, _ in batch], open_sink, header_only=header_only)
    try:
        for num in stream:
            spool, uidl = spools[num], uidl_of[num]
            spool.finish()
            key = f"{uidl}/{spool.hash.hexdigest()}" if uidl in suspect else uidl
            done.append((num, key, spool))
            if arrived is not None:
                arrived(spool.size)
    except MailIngestError as exc:
        error = exc
    except BaseException:
        for spool in spools.values():
            spool.discard()
        raise
    finally:
        stream.close()  # stopped early: the session is discarded now, before any DELE
    kept = {id(s) for _, _, s in done}
    for spool in spools.values():
        if id(spool) not in kept:
            spool.discard()
    return done, error


_Retrieved = tuple[list[tuple[int, str, "_Spool"]], list[NewMessage], MailIngestError | None]


def _retrieve_prepared(
    account: Account,
    session: Pop3Session,
    batch: list[tuple[int, str]],
    spool_dir: Path,
    suspect: set[str],
    held: dict[int, int] | None,
    arrived: Callable[[int], None] | None,
) -> _Retrieved:
    """Worker-thread side: RETR a batch, then parse what came whole (see retrieve_spooled).

    ``held``: the batch is over the size limit; listed sizes by number. Only the headers
    are fetched (TOP), to be stored quarantined."""
    retrieved, failure = retrieve_spooled(
        session, batch, spool_dir, suspect, held is not None, arrived
    )
    try:
        items = _prepare(account, retrieved, held)
    except BaseException:
        for _, _, spool in retrieved:
            spool.discard()
        raise
    return retrieved, items, failure


def _prepare(
    account: Account, retrieved: list[tuple[int, str, _Spool]], held: dict[int, int] | None
) -> list[NewMessage]:
    """Worker-thread side: parse headers, decide direction and the addresses that link."""
    items: list[NewMessage] = []
    for num, uidl, spool in retrieved:
        spool.file.seek(0)
        headers = parse_headers(read_head(spool.file))
        direction = direction_of(headers, account.addresses)
        listed = held.get(num, spool.size) if held is not None else spool.size
        reason = (
            f"{listed} bytes over max_message_size {account.max_message_size}"
            if held is not None
            else None
        )
        items.append(
            NewMessage(
                uidl=uidl,
                spool=spool.file,
                size=listed,
                quarantine=reason,
                sha256=spool.hash.hexdigest(),
                headers=headers,
                direction=direction,
                senders=normalize_all(headers.from_addrs),
                recipients_to=normalize_all(headers.to),
                recipients_cc=normalize_all(headers.cc),
                link=link_addresses(headers, direction),
            )
        )
    return items


async def _one_session(
    account: Account, store: Store, spool_dir: Path, tally: Tally | None, result: _Session
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
                _store_batches, account, store, session, spool_dir=spool_dir, seen=seen
            )
            refused = await job(_batches(work, seen.sizes), result=result, tally=tally)
            if big and not session.broken:
                held = _batches([(n, u) for n, u in seen.new if n in big], {})
                refused = await job(held, result=result, tally=tally, held=big) or refused
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


async def _store_batches(
    account: Account,
    store: Store,
    session: Pop3Session,
    batches: list[list[tuple[int, str]]],
    *,
    spool_dir: Path,
    seen: _Seen,
    result: _Session,
    tally: Tally | None,
    held: dict[int, int] | None = None,
) -> MailIngestError | None:
    """RETR and commit batch after batch; returns a refused message's error, if any.

    The next batch is retrieved while this one commits, so network and SQLite work overlap.
    ``seen.key_of`` gains each committed message's ledger key: DELE only ever targets those.
    ``held``: oversized messages (listed sizes), whose headers alone are stored, quarantined.
    """
    suspect, key_of = seen.suspect, seen.key_of
    policy = account_policy(account)
    refused: MailIngestError | None = None  # a message the server would not serve
    arrived = tally.hook() if tally is not None else None

    def retrieve(index: int) -> asyncio.Future[_Retrieved] | None:
        if index >= len(batches):
            return None
        return asyncio.ensure_future(
            asyncio.to_thread(
                _retrieve_prepared,
                account,
                session,
                batches[index],
                spool_dir,
                suspect,
                held,
                arrived,
            )
        )

    fetching = retrieve(0)
    try:
        for index in range(len(batches)):
            assert fetching is not None
            # Shielded: a cancel must not leave the worker thread running unwatched; the
            # finally below closes the session, which ends it, and discards what it spooled.
            retrieved, items, failure = await asyncio.shield(fetching)
            # The next RETRs go out now unless this batch failed (then it decides below).
            fetching = retrieve(index + 1) if failure is None else None
            await _commit(account, store, policy, retrieved, items, result)
            for num, key, _ in retrieved:
                key_of[num] = key  # committed now, or by an earlier session
            if tally is not None:
                tally.committed(result.new, result.bytes, [s.size for _, _, s in retrieved])
            if failure is not None:
                if session.broken:
                    raise failure
                # One RETR refused with a whole -ERR line: the session is in step, so the
                # others are stored and DELEted as usual; the error ends the cycle later.
                refused = refused or failure
                fetching = retrieve(index + 1)
    finally:
        if fetching is not None:
            await _abandon(session, fetching)
        if tally is not None:
            tally.drop()
    return refused


async def _abandon(session: Pop3Session, fetching: asyncio.Future[_Retrieved]) -> None:
    """Leaving early (a failed commit, a cancel) with a retrieval in flight: abandon the
    session, which ends that retrieval too. Nothing it fetched is committed or DELEted, so
    it is fetched again next time."""
    session.close()
    # Its spools are discarded when it ends, even if another cancel cuts this wait short.
    fetching.add_done_callback(_discard_retrieved)
    await asyncio.wait({fetching})


def _discard_retrieved(fetching: asyncio.Future[_Retrieved]) -> None:
    if fetching.cancelled() or fetching.exception() is not None:
        return  # an exception is the worker's own cleanup having run (see retrieve_spooled)
    for _, _, spool in fetching.result()[0]:
        spool.discard()


async def _commit(
    account: Account,
    store: Store,
    policy: AccountPolicy,
    retrieved: list[tuple[int, str, _Spool]],
    items: list[NewMessage],
    result: _Session,
) -> None:
    """Commit one retrieved batch (one fsynced transaction) and count what was new."""
    try:
        # Shielded: once the commit is under way it completes even if we are cancelled,
        # and the spools it reads stay open until it has.
        commit = asyncio.ensure_future(store.add_batch(account.name, account.owner, items, policy))
        try:
            outcomes = await asyncio.shield(commit)
        except asyncio.CancelledError:
            await asyncio.wait({commit})
            raise
    finally:
        for _, _, spool in retrieved:
            spool.discard()
    # Bytes as fetched: a quarantined message's header, not the size the server listed.
    sizes_of = {key: spool.size for _, key, spool in retrieved}
    held = {item.uidl: item for item in items if item.quarantine is not None}
    for outcome in outcomes:
        if not outcome.duplicate:
            result.new += 1
            result.bytes += sizes_of[outcome.uidl]
            log.debug(
                "message_stored",
                account=account.name,
                uidl=outcome.uidl,
                size=sizes_of[outcome.uidl],
            )
            if outcome.uidl in held:
                log.warning(
                    "message_quarantined",
                    account=account.name,
                    message=outcome.message,
                    size=held[outcome.uidl].size,
                    max_message_size=account.max_message_size,
                )


async def _pace_logins(account: Account, store: Store, session: Pop3Session) -> None:
    """Remember when the server's LOGIN-DELAY next allows a login (CAPA before or after it)."""
    delay = session.capabilities.login_delay
    if delay:
        await store.set_next_login(account.name, datetime.now(UTC) + timedelta(seconds=delay))


class _Renewer:
    """Renews the lease every third of its life while the cycle runs (if this process dies,
    it expires). A timer until the first renewal: most cycles end before it fires, and a
    timer costs less than a task per poll."""

    def __init__(self, store: Store, account: str, holder: str) -> None:
        self._job = (store, account, holder)
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(LEASE_TTL / 3, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        store, account, holder = self._job
        while True:
            with contextlib.suppress(StoreError):
                await store.renew_lease(account, holder, LEASE_TTL)
            await asyncio.sleep(LEASE_TTL / 3)

    def cancel(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


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
    total = _Session()
    busy = False
    try:
        if claim is None:
            claim = await take_poll(store, account.name)
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


async def take_poll(
    store: Store,
    account: str,
    due: tuple[datetime, datetime] | None = None,
    *,
    force: bool = False,
) -> Claim:
    """Take the account's lease (and, with ``due``, its scheduled poll: Store.take_poll)
    in a new holder's name; a lease left by a process of this host that died is taken over."""
    holder = f"{lease_host()}:{os.getpid()}:{_TOKEN}{next(_SERIAL)}"
    claim = await store.take_poll(account, holder, LEASE_TTL, due=due, force=force)
    if claim.busy and claim.holder is not None and _dead_here(claim.holder):
        claim = await store.take_poll(
            account, holder, LEASE_TTL, due=due, force=force, stale=claim.holder
        )
    if claim.busy:
        log.info("account_busy", account=account, holder=claim.holder)
    return claim


async def _cycle(
    account: Account,
    store: Store,
    max_sessions: int,
    progress: Progress | None,
    total: _Session,
    result: FetchResult,
    claim: Claim,
) -> None:
    """Sessions under the account's lease (``claim``, taken); the caller releases it."""
    holder = claim.holder
    assert claim.taken and holder is not None
    _RUNNING.add(holder)
    renewer = _Renewer(store, account.name, holder)
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
        _RUNNING.discard(holder)
        if tally is not None:
            tally.finish(total.new, total.bytes)


#: A lease holder is unique: host, process, this process's token and a serial number.
_TOKEN = uuid.uuid4().hex[:6]
_SERIAL = itertools.count(1)

#: Lease holders of the cycles running in this process. A lease in this process's name that
#: none of them holds was left by a cycle that could not release it (the store was locked):
#: without this, the daemon found its own leftover "busy" until the lease expired.
_RUNNING: set[str] = set()


@functools.cache
def lease_host() -> str:
    """Where a lease holder's PID means something: the host name, plus the boot and the PID
    namespace. Containers that share a host name (host networking) each number their own
    processes: a PID alive in one is no proof of death in another."""
    scope = []
    with contextlib.suppress(OSError):
        scope.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    with contextlib.suppress(OSError):
        scope.append(os.readlink("/proc/self/ns/pid").strip("pid:[]"))
    host = socket.gethostname().replace(":", "_")
    return f"{host}/{'-'.join(scope)}" if scope else host


def _dead_here(holder: str) -> bool:
    """A lease holder on this host whose process is gone (killed, crashed) holds nothing."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != lease_host() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return holder not in _RUNNING
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


async def _quietly(job: Awaitable[None]) -> None:
    try:
        await job
    except StoreError as exc:
        log.warning("state_not_recorded", error=str(exc))


__all__ = ["FetchResult", "TemporaryError", "fetch_account", "take_poll"]
