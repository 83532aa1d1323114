"""Storing fetched and sent mail: the UIDL ledger, batches, deletions."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any

from mailingest.model import AccountPolicy, LedgerEntry, NewMessage, StoreOutcome
from mailingest.store._db import (
    CHUNK,
    Chunks,
    Database,
    Fetch,
    Many,
    NewIds,
    Plan,
    facts,
    fetch_in,
    now_iso,
)


async def ledger(db: Database, account: str) -> dict[str, LedgerEntry]:
    async with db.statement("reading the ledger", write=False):
        rows = await db.fetchall(
            "SELECT l.uidl, l.message, l.first_seen, l.deleted_at, m.quarantined FROM ledger l"
            " LEFT JOIN messages m ON m.id = l.message WHERE l.account = ?",
            (account,),
        )
    return {r[0]: LedgerEntry(r[1], r[2], r[3] is not None, bool(r[4])) for r in rows}


async def add_batch(
    db: Database, account: str, owner: str, items: Sequence[NewMessage], policy: AccountPolicy
) -> list[StoreOutcome]:
    """Store messages, their links, tags and ledger rows in one durable transaction.

    A UIDL already in the ledger (another process got there first) is skipped; content
    already stored for the account gets only a ledger row (servers that renumber UIDLs).
    The batch costs a fixed number of statements, not a number per message, and is one
    plan (``Database.run_plan``): on SQLite a single trip to its thread.
    """
    lock = db.tag_lock[1] if db.tag_lock is not None else None
    plan = _batch(account, owner, items, policy, lock)
    return await db.run_plan(f"storing mail of account {account!r}", plan)


def _batch(
    account: str,
    owner: str,
    items: Sequence[NewMessage],
    policy: AccountPolicy,
    lock: str | None,
) -> Plan[list[StoreOutcome]]:
    outcomes: list[StoreOutcome] = []
    if lock is not None:  # tags are decided from sharing facts no re-tag is changing
        yield Fetch(lock)
    received = now_iso()
    known = {
        str(r[0])
        for r in (
            yield from fetch_in(
                "SELECT uidl FROM ledger WHERE account = ? AND uidl IN ({marks})",
                [item.uidl for item in items],
                account,
            )
        )
    }
    by_sha = {
        str(r[0]): int(r[1])
        for r in (
            yield from fetch_in(
                "SELECT sha256, id FROM messages WHERE account = ? AND sha256 IN ({marks})",
                [item.sha256 for item in items],
                account,
            )
        )
    }
    # The owner's sent mail that the server returns (Gmail recent: mode) is a copy of what
    # the CRM sent and stored, with other bytes: the same message, stored once.
    by_mid = {
        str(r[0]): int(r[1])
        for r in (
            yield from fetch_in(
                "SELECT message_id, id FROM messages WHERE account = ? AND origin = 'crm'"
                " AND message_id IN ({marks})",
                sorted({i.headers.message_id for i in items if _sent_copy(i)}),
                account,
            )
        )
    }
    # New content gets a provisional id -n (its place in ``fresh``) until the ids are
    # handed out; a UIDL twice in one batch is stored once.
    fresh: list[NewMessage] = []
    planned: list[tuple[str, int, bool]] = []
    for item in items:
        if item.uidl in known:
            continue
        known.add(item.uidl)
        message_id = by_sha.get(item.sha256)
        if message_id is None and _sent_copy(item):
            message_id = by_mid.get(item.headers.message_id or "")
        if message_id is None:
            fresh.append(item)
            message_id = by_sha[item.sha256] = -len(fresh)
            planned.append((item.uidl, message_id, False))
        else:
            planned.append((item.uidl, message_id, True))
    new_ids: list[int] = (yield NewIds(len(fresh))) if fresh else []

    def real(message_id: int) -> int:
        return new_ids[-1 - message_id] if message_id < 0 else message_id

    for uidl, message_id, duplicate in planned:
        outcomes.append(StoreOutcome(uidl, real(message_id), duplicate))
    if fresh:
        numbered = list(zip(fresh, new_ids, strict=True))
        yield from _insert(account, owner, numbered, received, policy)
    yield Many(
        "INSERT INTO ledger (account, uidl, message, first_seen) VALUES (?,?,?,?)",
        [(account, o.uidl, o.message, received) for o in outcomes],
    )
    return outcomes


def _sent_copy(item: NewMessage) -> bool:
    """Fetched mail the owner sent, which may be a copy of mail the CRM sent."""
    return item.origin != "crm" and item.direction == "out" and bool(item.headers.message_id)


def _insert(
    account: str,
    owner: str,
    fresh: Sequence[tuple[NewMessage, int]],
    received: str,
    policy: AccountPolicy,
) -> Plan[None]:
    """Insert new messages with their raw chunks, addresses, links, tags and labels."""
    records_of: dict[str, set[str]] = {}
    # A mass mailing may list thousands of recipients: fetch_in splits the list.
    for email, record in (
        yield from fetch_in(
            "SELECT email, record FROM record_emails WHERE email IN ({marks})",
            sorted({a for item, _ in fresh for a in item.link}),
        )
    ):
        records_of.setdefault(str(email), set()).add(str(record))
    shared = {
        str(r[0])
        for r in (
            yield from fetch_in(
                "SELECT record FROM shares WHERE owner = ? AND record IN ({marks})",
                sorted({r for rs in records_of.values() for r in rs}),
                owner,
            )
        )
    }
    rows: list[tuple[Any, ...]] = []
    addresses: list[tuple[int, str, str]] = []
    links: list[tuple[int, str, str]] = []  # message, record, its listing key
    labels: list[tuple[int, str]] = []
    for item, message_id in fresh:
        records = sorted({r for a in item.link for r in records_of.get(a, ())})
        visibility, reason = policy.tagger(
            facts(
                item.direction,
                item.origin,
                bool(records),
                any(r in shared for r in records),
                item.senders[0] if item.senders else None,
                (*item.recipients_to, *item.recipients_cc),
            )
        )
        h = item.headers
        rows.append(
            (
                message_id,
                account,
                owner,
                item.direction,
                item.size,
                item.sha256,
                h.sender,
                json.dumps(list(h.to)),
                json.dumps(list(h.cc)),
                h.subject,
                h.date,
                h.message_id,
                visibility,
                reason,
                received,
                item.origin,
                int(item.quarantine is not None),
                item.quarantine,
            )
        )
        roles = (("from", item.senders), ("to", item.recipients_to), ("cc", item.recipients_cc))
        addresses.extend(_unique((message_id, role, a) for role, found in roles for a in found))
        key = item.headers.date if item.headers.date is not None else received
        links.extend((message_id, r, key) for r in records)
        if records and policy.magnet_label and item.direction == "in":  # customer mail
            labels.append((message_id, policy.magnet_label))
    yield Many(
        "INSERT INTO messages (id, account, owner, direction, size, sha256, from_addr,"
        " to_addrs, cc_addrs, subject, date, message_id, visibility, reason, received_at,"
        " origin, quarantined, quarantine_reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    yield Chunks(_all_chunks(fresh))
    yield Many("INSERT INTO message_addresses (message, role, address) VALUES (?,?,?)", addresses)
    yield Many("INSERT INTO message_records (message, record, sort_key) VALUES (?,?,?)", links)
    yield Many("INSERT INTO message_labels (message, label) VALUES (?,?)", labels)


def _unique(rows: Iterable[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Rows in their first order, each once (an address repeated in one header)."""
    return list(dict.fromkeys(rows))


async def mark_deleted(db: Database, account: str, uidls: Iterable[str]) -> None:
    when = now_iso()
    async with db.write("recording deletions"):
        await db.executemany(
            "UPDATE ledger SET deleted_at = ? WHERE account = ? AND uidl = ?",
            [(when, account, u) for u in uidls],
        )


def _all_chunks(fresh: Sequence[tuple[NewMessage, int]]) -> Iterator[tuple[int, int, bytes]]:
    for item, message_id in fresh:
        item.spool.seek(0)
        yield from _chunks(message_id, item.spool)


def _chunks(message_id: int, spool: IO[bytes]) -> Iterator[tuple[int, int, bytes]]:
    seq = 0
    while True:
        data = spool.read(CHUNK)
        if not data and seq > 0:
            return
        yield message_id, seq, data
        seq += 1
        if not data:
            return


async def held_keys(db: Database, account: str, message: int) -> list[str]:
    """The ledger keys of a quarantined message still on the server."""
    async with db.statement("reading the ledger", write=False):
        rows = await db.fetchall(
            "SELECT l.uidl FROM ledger l JOIN messages m ON m.id = l.message"
            " WHERE l.account = ? AND l.message = ? AND m.quarantined = 1"
            " AND l.deleted_at IS NULL ORDER BY l.uidl",
            (account, message),
        )
    return [str(r[0]) for r in rows]


async def release(
    db: Database, account: str, message: int, spool: IO[bytes], size: int, sha256: str
) -> int:
    """Replace a quarantined message's header with the whole message, atomically; its id
    (or, where the same content is already stored for the account, that message's: the
    ledger then points there and the header-only copy goes)."""
    async with db.write(f"releasing message {message}"):
        row = await db.fetchone(
            "SELECT id FROM messages WHERE account = ? AND sha256 = ? AND id <> ?",
            (account, sha256, message),
        )
        if row is not None:
            await db.execute(
                "UPDATE ledger SET message = ? WHERE account = ? AND message = ?",
                (row[0], account, message),
            )
            await db.execute("DELETE FROM messages WHERE id = ?", (message,))
            return int(row[0])
        await db.execute("DELETE FROM message_chunks WHERE message = ?", (message,))
        spool.seek(0)
        await db.insert_chunks(_chunks(message, spool))
        await db.execute(
            "UPDATE messages SET size = ?, sha256 = ?, quarantined = 0, quarantine_reason = NULL"
            " WHERE id = ?",
            (size, sha256, message),
        )
    return message
