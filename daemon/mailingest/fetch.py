"""One account's fetch cycle: list -> diff -> retrieve -> store+commit -> DELE -> QUIT.

Invariant: DELE only for messages whose ledger row is committed (this cycle's or an
earlier one's), so a kill at any instant re-fetches and dedups rather than loses mail.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from mailingest.config import Account
from mailingest.errors import MailIngestError, ProtocolError, StoreError, TemporaryError
from mailingest.parse import parse_headers, read_head
from mailingest.pop3 import Pop3Session
from mailingest.store import LedgerEntry, NewMessage, Store

log = structlog.get_logger("mailingest.fetch")

#: Group commit: a batch is committed (one fsync) after this many messages or bytes.
BATCH_COUNT = 200
BATCH_BYTES = 32 * 1024 * 1024
#: Spool files keep at most this much of one message in memory before going to disk.
SPOOL_MEMORY = 256 * 1024

Progress = Callable[[str, int, int], None]


@dataclass
class FetchResult:
    """One account's cycle, as `fetch --json` reports it."""

    account: str
    status: str = "ok"
    new: int = 0
    bytes: int = 0
    deleted: int = 0
    duration_ms: int = 0
    error: str | None = None
    sessions: int = 0

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


@dataclass
class _Session:
    """What one POP3 session did."""

    new: int = 0
    bytes: int = 0
    deleted: int = 0
    uidls_deleted: list[str] = field(default_factory=list)


def _should_delete(account: Account, entry: LedgerEntry, now: datetime) -> bool:
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


def _retrieve(
    session: Pop3Session, batch: list[tuple[int, str]], spool_dir: Path
) -> tuple[list[tuple[str, _Spool]], MailIngestError | None]:
    """Worker-thread side: RETR a batch into spool files (pipelined when offered).

    On a failure the messages received whole so far are returned with the error, so they
    are committed before the error ends the session.
    """
    spools: dict[int, _Spool] = {}

    def open_sink(num: int) -> Callable[[bytes], None]:
        spool = spools[num] = _Spool(spool_dir)
        return spool.write

    uidl_of = dict(batch)
    done: list[tuple[str, _Spool]] = []
    error: MailIngestError | None = None
    try:
        for num in session.retrieve([n for n, _ in batch], open_sink):
            done.append((uidl_of[num], spools[num]))
    except MailIngestError as exc:
        error = exc
    except BaseException:
        for spool in spools.values():
            spool.file.close()
        raise
    kept = {id(s) for _, s in done}
    for spool in spools.values():
        if id(spool) not in kept:
            spool.file.close()
    return done, error


def _prepare(account: Account, retrieved: list[tuple[str, _Spool]]) -> list[NewMessage]:
    """Worker-thread side: parse headers and decide direction for each spooled message."""
    items: list[NewMessage] = []
    for uidl, spool in retrieved:
        spool.file.seek(0)
        headers = parse_headers(read_head(spool.file))
        sender = (headers.sender or "").lower()
        direction = "out" if sender and sender == account.identity else "in"
        items.append(
            NewMessage(
                uidl=uidl,
                spool=spool.file,
                size=spool.size,
                sha256=spool.hash.hexdigest(),
                headers=headers,
                direction=direction,
                visibility="private",
                reason="unmatched",
            )
        )
    return items


async def _one_session(
    account: Account, store: Store, spool_dir: Path, progress: Progress | None, seen: _Session
) -> _Session:
    session = Pop3Session(account)
    result = _Session()
    try:
        await asyncio.to_thread(session.connect)
        try:
            listing = await asyncio.to_thread(session.uidl)
        except ProtocolError as exc:
            raise ProtocolError(
                f"server refused UIDL ({exc.message}); without UIDL there is no safe dedup",
                account=account.name,
            ) from exc
        sizes = await asyncio.to_thread(session.sizes)
        ledger = await store.ledger(account.name)
        new: list[tuple[int, str]] = []
        listed: set[str] = set()
        for num, uidl in listing:
            if uidl in listed:
                log.warning("duplicate_uidl", account=account.name, uidl=uidl, number=num)
                continue  # the same id twice in one listing: fetch it once
            listed.add(uidl)
            if uidl not in ledger:
                new.append((num, uidl))
        for batch in _batches(new, sizes):
            retrieved, failure = await asyncio.to_thread(_retrieve, session, batch, spool_dir)
            try:
                items = await asyncio.to_thread(_prepare, account, retrieved)
                # Shielded: once the commit is under way it completes even if we are cancelled.
                outcomes = await asyncio.shield(store.add_batch(account.name, account.owner, items))
            finally:
                for _, spool in retrieved:
                    spool.file.close()
            for item, outcome in zip(items, outcomes, strict=False):
                if not outcome.duplicate:
                    result.new += 1
                    result.bytes += item.size
                    log.debug(
                        "message_stored", account=account.name, uidl=item.uidl, size=item.size
                    )
            if progress is not None:
                progress(account.name, seen.new + result.new, seen.bytes + result.bytes)
            if failure is not None:
                raise failure
        ledger = await store.ledger(account.name)
        now = datetime.now(UTC)
        doomed = [
            (num, uidl)
            for num, uidl in listing
            if uidl in ledger and _should_delete(account, ledger[uidl], now)
        ]
        doomed = list(dict(doomed).items())
        if doomed:
            # Every doomed UIDL has a committed ledger row: DELE is safe now.
            await asyncio.to_thread(session.delete, [n for n, _ in doomed])
        await asyncio.to_thread(session.quit)
        if doomed:
            result.deleted = len(doomed)
            result.uidls_deleted = [u for _, u in doomed]
            await store.mark_deleted(account.name, result.uidls_deleted)
    finally:
        session.close()
    return result


async def fetch_account(
    account: Account,
    store: Store,
    *,
    max_sessions: int = 10,
    progress: Progress | None = None,
) -> FetchResult:
    """Run one cycle for one account; never raises for account-level failures."""
    started = time.monotonic()
    log.debug("poll_started", account=account.name)
    result = FetchResult(account=account.name)
    total = _Session()
    spool_dir = store.path.parent
    try:
        for _ in range(max_sessions):
            done = await _one_session(account, store, spool_dir, progress, total)
            result.sessions += 1
            total.new += done.new
            total.bytes += done.bytes
            total.deleted += done.deleted
            if done.new == 0:
                break  # the listing held nothing new: the mailbox is drained
    except MailIngestError as exc:
        if exc.account is None:
            exc.account = account.name
        result.status = exc.status if exc.status in _STATUSES else "error"
        result.error = str(exc)
    except Exception as exc:  # a bug must not take down the other accounts' cycles
        log.exception("poll_crashed", account=account.name)
        result.status = "error"
        result.error = f"account {account.name!r}: internal error: {type(exc).__name__}: {exc}"
    result.new, result.bytes, result.deleted = total.new, total.bytes, total.deleted
    result.duration_ms = int((time.monotonic() - started) * 1000)
    if result.status == "ok":
        log.info(
            "poll_completed",
            account=account.name,
            new=result.new,
            bytes=result.bytes,
            deleted=result.deleted,
            duration_ms=result.duration_ms,
        )
    else:
        log.error("poll_failed", account=account.name, error_kind=result.status, error=result.error)
    try:
        await store.record_poll(
            account.name, account.owner, result=result.status, error=result.error, new=result.new
        )
    except StoreError as exc:
        log.error("state_not_recorded", account=account.name, error=str(exc))
    return result


_STATUSES = {"ok", "auth_failed", "tls_failed", "unavailable", "temp_failed", "error"}

__all__ = ["FetchResult", "TemporaryError", "fetch_account"]
