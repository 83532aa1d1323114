"""The only module with SQL: schema, migrations, transactions and queries (SQLite, WAL).

Raw messages live in the database itself, split into 1 MiB chunk rows. That keeps a
message, its chunks and its UIDL ledger row in one transaction (no orphan or missing
files after a crash, one fsync per commit for a whole batch), while memory stays bounded
whatever the size: chunks are streamed from the spool file into SQLite and back out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, TypeVar

import aiosqlite

from mailingest.errors import StoreError
from mailingest.parse import Headers, now_iso
from mailingest.sharing import Facts

CHUNK = 1024 * 1024
_PAGE = 5000
#: Values bound in one IN (...) list: under SQLite's smallest limit on parameters (999
#: before 3.32), and small enough that a subquery re-run for every re-tag page stays cheap.
_IN_LIST = 500
_T = TypeVar("_T")


def _linked_to(count: int) -> str:
    """SQL: the message is linked to one of ``count`` records (given as parameters)."""
    marks = ",".join("?" * count)
    return f"m.id IN (SELECT message FROM message_records WHERE record IN ({marks}))"


BUSY_TIMEOUT_MS = 10_000

_MIGRATIONS: tuple[str, ...] = (
    # 1: messages, raw chunks, UIDL ledger, account state
    """
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        account TEXT NOT NULL,
        owner TEXT NOT NULL,
        direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        from_addr TEXT,
        to_addrs TEXT NOT NULL DEFAULT '[]',
        cc_addrs TEXT NOT NULL DEFAULT '[]',
        subject TEXT,
        date TEXT,
        message_id TEXT,
        visibility TEXT NOT NULL CHECK (visibility IN ('private', 'shared')),
        reason TEXT NOT NULL,
        received_at TEXT NOT NULL,
        UNIQUE (account, sha256)
    );
    CREATE INDEX messages_owner ON messages (owner, id);
    CREATE TABLE message_chunks (
        message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (message, seq)
    );
    CREATE TABLE message_labels (
        message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        label TEXT NOT NULL,
        PRIMARY KEY (message, label)
    );
    CREATE TABLE ledger (
        account TEXT NOT NULL,
        uidl TEXT NOT NULL,
        message INTEGER REFERENCES messages (id),
        first_seen TEXT NOT NULL,
        deleted_at TEXT,
        PRIMARY KEY (account, uidl)
    );
    CREATE TABLE account_state (
        account TEXT PRIMARY KEY,
        owner TEXT,
        last_poll TEXT,
        result TEXT,
        error TEXT,
        new INTEGER NOT NULL DEFAULT 0,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        next_poll TEXT,
        paused INTEGER NOT NULL DEFAULT 0,
        pause_reason TEXT,
        lease_holder TEXT,
        lease_expires REAL,
        next_login TEXT
    );
    """,
    # 2: CRM records, their addresses, share flags, message links, settings snapshots
    """
    ALTER TABLE messages ADD COLUMN origin TEXT NOT NULL DEFAULT 'pop3';
    CREATE INDEX messages_visibility ON messages (visibility, id);
    CREATE INDEX messages_account ON messages (account, id);
    CREATE TABLE records (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('lead', 'contact')),
        name TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE record_emails (
        record TEXT NOT NULL REFERENCES records (id) ON DELETE CASCADE,
        email TEXT NOT NULL,
        PRIMARY KEY (record, email)
    );
    CREATE INDEX record_emails_email ON record_emails (email);
    CREATE TABLE shares (
        owner TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (owner, record)
    );
    CREATE TABLE message_records (
        message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        record TEXT NOT NULL,
        PRIMARY KEY (message, record)
    );
    CREATE INDEX message_records_record ON message_records (record, message);
    CREATE TABLE message_addresses (
        message INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('from', 'to', 'cc')),
        address TEXT NOT NULL,
        PRIMARY KEY (message, role, address)
    );
    CREATE INDEX message_addresses_address ON message_addresses (address, role);
    CREATE TABLE account_settings (
        account TEXT PRIMARY KEY,
        snapshot TEXT NOT NULL,
        magnet_label TEXT
    );
    """,
    # 3: the daemon's auth pause remembers which login was rejected (a salted scrypt hash)
    """
    ALTER TABLE account_state ADD COLUMN pause_key TEXT;
    """,
)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A retrieved message waiting in its spool file, with what the fetch decided about it."""

    uidl: str
    spool: IO[bytes]
    size: int
    sha256: str
    headers: Headers
    direction: str
    #: Normalised addresses by role, and the ones that link the message to records.
    senders: tuple[str, ...] = ()
    recipients_to: tuple[str, ...] = ()
    recipients_cc: tuple[str, ...] = ()
    link: tuple[str, ...] = ()
    origin: str = "pop3"  # pop3 (fetched) | crm (sent with `send`/`reply`)


#: Decides (visibility, reason) from a message's facts: sharing.decide with the account's
#: policy bound. The store applies it inside its transactions but never decides itself.
Tagger = Callable[[Facts], tuple[str, str]]


@dataclass(frozen=True, slots=True)
class AccountPolicy:
    """What the store needs of an account's settings to tag and label its messages."""

    tagger: Tagger
    magnet_label: str | None = None


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    kind: str
    name: str
    emails: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "name": self.name, "emails": list(self.emails)}


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    message: int | None
    first_seen: str
    deleted: bool


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    account: str
    owner: str
    direction: str
    sender: str | None
    to: list[str]
    cc: list[str]
    subject: str | None
    date: str | None
    message_id: str | None
    visibility: str
    reason: str
    size: int
    sha256: str
    received_at: str
    labels: list[str] = field(default_factory=list)
    records: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "account": self.account,
            "owner": self.owner,
            "direction": self.direction,
            "from": self.sender,
            "to": self.to,
            "cc": self.cc,
            "subject": self.subject,
            "date": self.date,
            "message_id": self.message_id,
            "records": self.records,
            "visibility": self.visibility,
            "reason": self.reason,
            "labels": self.labels,
            "size": self.size,
            "sha256": self.sha256,
            "received_at": self.received_at,
        }


@dataclass(frozen=True, slots=True)
class AccountState:
    account: str
    owner: str | None
    last_poll: str | None
    result: str | None
    error: str | None
    new: int
    stored: int
    paused: bool
    pause_reason: str | None
    next_poll: str | None
    consecutive_failures: int
    next_login: str | None = None


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    uidl: str
    message: int | None
    duplicate: bool  # same content already stored for this account (renumbered UIDL)


def _store_error(exc: sqlite3.Error, what: str) -> StoreError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return StoreError(f"database is locked by another process while {what}; try again")
    if "full" in text:
        return StoreError(f"disk full while {what}: {text}")
    return StoreError(f"database error while {what}: {text}")


def prepare_path(path: Path) -> None:
    """Create the database's directory 0700 and the file 0600 before SQLite opens it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


class Store:
    """An open store. Writes that must be atomic are single methods, one transaction each."""

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        self._db = db
        self.path = path
        # One connection shared by many account tasks: statements of one transaction must
        # not interleave with another task's, and reads must not see a half-done batch.
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<Store {self.path}>"

    @classmethod
    async def open(cls, path: Path) -> Store:
        try:
            prepare_path(path)
            db = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        store = cls(db, path)
        try:
            await store._setup()
        except sqlite3.Error as exc:
            await db.close()
            raise _store_error(exc, f"opening {path}") from exc
        return store

    async def _setup(self) -> None:
        db = self._db
        db.row_factory = sqlite3.Row
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await db.execute("PRAGMA journal_mode = WAL")
        # FULL: every COMMIT is fsynced, so a committed message survives power loss too.
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
        async with self._transaction():
            row = await (await db.execute("PRAGMA user_version")).fetchone()
            version = int(row[0]) if row else 0
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        await db.execute(statement)
                await db.execute(f"PRAGMA user_version = {number}")

    async def close(self) -> None:
        await self._db.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE ... COMMIT: the write lock up front, so no upgrade deadlock."""
        async with self._lock:
            try:
                # Inside the try: a cancel while BEGIN waits in SQLite's queue still gets
                # its ROLLBACK queued behind it, so the connection never stays in a
                # transaction (and ROLLBACK without one is an error that is ignored).
                await self._db.execute("BEGIN IMMEDIATE")
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    # -- ingestion ---------------------------------------------------------------------------

    async def ledger(self, account: str) -> dict[str, LedgerEntry]:
        try:
            async with self._lock:
                rows = await self._db.execute_fetchall(
                    "SELECT uidl, message, first_seen, deleted_at FROM ledger WHERE account = ?",
                    (account,),
                )
        except sqlite3.Error as exc:
            raise _store_error(exc, "reading the ledger") from exc
        return {r[0]: LedgerEntry(r[1], r[2], r[3] is not None) for r in rows}

    async def add_batch(
        self, account: str, owner: str, items: Sequence[NewMessage], policy: AccountPolicy
    ) -> list[StoreOutcome]:
        """Store messages, their links, tags and ledger rows in one fsynced transaction.

        A UIDL already in the ledger (another process got there first) is skipped; content
        already stored for the account gets only a ledger row (servers that renumber UIDLs).
        The batch costs a fixed number of statements, not a number per message: each one is
        a hop to SQLite's thread, and per-message hops cost more than the writes themselves.
        """
        outcomes: list[StoreOutcome] = []
        received = now_iso()
        try:
            async with self._transaction():
                known = await self._in_ledger(account, [item.uidl for item in items])
                by_sha = await self._ids_by_sha(account, [item.sha256 for item in items])
                # Ids are handed out here, under the write lock BEGIN IMMEDIATE took, exactly
                # as SQLite would (max + 1), so the rows below can go in with executemany.
                next_id = await self._max_message_id() + 1
                fresh: list[tuple[NewMessage, int]] = []
                ledger_rows: list[tuple[str, str, int, str]] = []
                for item in items:
                    if item.uidl in known:
                        continue
                    known.add(item.uidl)  # a UIDL twice in one batch is stored once
                    message_id = by_sha.get(item.sha256)
                    duplicate = message_id is not None
                    if message_id is None:
                        message_id = by_sha[item.sha256] = next_id
                        next_id += 1
                        fresh.append((item, message_id))
                    ledger_rows.append((account, item.uidl, message_id, received))
                    outcomes.append(StoreOutcome(item.uidl, message_id, duplicate))
                if fresh:
                    await self._insert(account, owner, fresh, received, policy)
                await self._db.executemany(
                    "INSERT INTO ledger (account, uidl, message, first_seen) VALUES (?,?,?,?)",
                    ledger_rows,
                )
        except sqlite3.Error as exc:
            raise _store_error(exc, f"storing mail of account {account!r}") from exc
        return outcomes

    async def _in_ledger(self, account: str, uidls: Sequence[str]) -> set[str]:
        sql = "SELECT uidl FROM ledger WHERE account = ? AND uidl IN ({marks})"
        return {str(r[0]) for r in await self._rows_in(sql, uidls, account)}

    async def _ids_by_sha(self, account: str, hashes: Sequence[str]) -> dict[str, int]:
        sql = "SELECT sha256, id FROM messages WHERE account = ? AND sha256 IN ({marks})"
        return {str(r[0]): int(r[1]) for r in await self._rows_in(sql, hashes, account)}

    async def _rows_in(self, sql: str, values: Sequence[Any], *before: Any) -> list[sqlite3.Row]:
        """``sql`` with an ``IN ({marks})`` list, run over ``values`` in parts of at most
        _IN_LIST (SQLite's parameter limit); ``before`` binds the parameters ahead of it."""
        rows: list[sqlite3.Row] = []
        for part in _parts(values):
            marks = ",".join("?" * len(part))
            rows.extend(await self._db.execute_fetchall(sql.format(marks=marks), (*before, *part)))
        return rows

    async def _max_message_id(self) -> int:
        rows = await self._db.execute_fetchall("SELECT coalesce(max(id), 0) FROM messages")
        return int(next(iter(rows))[0])

    async def _insert(
        self,
        account: str,
        owner: str,
        fresh: Sequence[tuple[NewMessage, int]],
        received: str,
        policy: AccountPolicy,
    ) -> None:
        """Insert new messages with their raw chunks, addresses, links, tags and labels."""
        db = self._db
        records_of = await self._records_by_address(
            sorted({a for item, _ in fresh for a in item.link})
        )
        shared = await self._shared_records(
            owner, sorted({r for rs in records_of.values() for r in rs})
        )
        rows: list[tuple[Any, ...]] = []
        addresses: list[tuple[int, str, str]] = []
        links: list[tuple[int, str]] = []
        labels: list[tuple[int, str]] = []
        for item, message_id in fresh:
            records = sorted({r for a in item.link for r in records_of.get(a, ())})
            visibility, reason = policy.tagger(
                Facts(
                    direction=item.direction,
                    crm_sent=item.origin == "crm",
                    linked=bool(records),
                    owner_shared=any(r in shared for r in records),
                    sender_domain=_domain(item.senders[0]) if item.senders else None,
                    recipient_domains=tuple(
                        _domain(a) for a in (*item.recipients_to, *item.recipients_cc)
                    ),
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
                )
            )
            roles = (
                ("from", item.senders),
                ("to", item.recipients_to),
                ("cc", item.recipients_cc),
            )
            addresses.extend((message_id, role, a) for role, found in roles for a in found)
            links.extend((message_id, r) for r in records)
            if records and policy.magnet_label:
                labels.append((message_id, policy.magnet_label))
        await db.executemany(
            "INSERT INTO messages (id, account, owner, direction, size, sha256, from_addr,"
            " to_addrs, cc_addrs, subject, date, message_id, visibility, reason, received_at,"
            " origin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        # The generator is consumed in SQLite's thread: one chunk in memory at a time.
        await db.executemany(
            "INSERT INTO message_chunks (message, seq, data) VALUES (?,?,?)",
            _all_chunks(fresh),
        )
        await db.executemany(
            "INSERT OR IGNORE INTO message_addresses (message, role, address) VALUES (?,?,?)",
            addresses,
        )
        await db.executemany(
            "INSERT OR IGNORE INTO message_records (message, record) VALUES (?,?)", links
        )
        await db.executemany(
            "INSERT OR IGNORE INTO message_labels (message, label) VALUES (?,?)", labels
        )

    async def _records_by_address(self, addresses: Sequence[str]) -> dict[str, set[str]]:
        # A mass mailing may list thousands of recipients: _rows_in splits the list.
        sql = "SELECT email, record FROM record_emails WHERE email IN ({marks})"
        found: dict[str, set[str]] = {}
        for email, record in await self._rows_in(sql, addresses):
            found.setdefault(str(email), set()).add(str(record))
        return found

    async def _shared_records(self, owner: str, records: Sequence[str]) -> set[str]:
        sql = "SELECT record FROM shares WHERE owner = ? AND record IN ({marks})"
        return {str(r[0]) for r in await self._rows_in(sql, records, owner)}

    async def mark_deleted(self, account: str, uidls: Iterable[str]) -> None:
        when = now_iso()
        try:
            async with self._transaction():
                await self._db.executemany(
                    "UPDATE ledger SET deleted_at = ? WHERE account = ? AND uidl = ?",
                    [(when, account, u) for u in uidls],
                )
        except sqlite3.Error as exc:
            raise _store_error(exc, "recording deletions") from exc

    # -- CRM records, links and re-tagging ----------------------------------------------------

    async def records(self) -> list[Record]:
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT r.id, r.kind, r.name, (SELECT group_concat(e.email, ' ') FROM"
                " (SELECT email FROM record_emails WHERE record = r.id ORDER BY email) e)"
                " FROM records r ORDER BY r.id"
            )
        return [Record(r[0], r[1], r[2], tuple((r[3] or "").split())) for r in rows]

    async def import_records(
        self, records: Sequence[Record], policies: dict[str, AccountPolicy]
    ) -> int:
        """Upsert records (their address sets replaced) and link stored mail, atomically."""
        try:
            async with self._transaction():
                for record in records:
                    await self._db.execute(
                        "INSERT INTO records (id, kind, name) VALUES (?,?,?) ON CONFLICT (id)"
                        " DO UPDATE SET kind = excluded.kind, name = excluded.name",
                        (record.id, record.kind, record.name),
                    )
                    await self._replace_emails(record.id, record.emails, policies)
                # In parts: one IN list of every id would be re-evaluated for each re-tag
                # page (100,000 records: 93 s instead of 13 s) and can pass SQLite's limit.
                for part in _parts([r.id for r in records]):
                    await self._retag(_linked_to(len(part)), part, policies)
        except sqlite3.Error as exc:
            raise _store_error(exc, "importing records") from exc
        return len(records)

    async def set_record_emails(
        self, record: str, emails: Sequence[str], policies: dict[str, AccountPolicy]
    ) -> bool:
        """Address change: links stay, stored mail from the new addresses links now."""
        try:
            async with self._transaction():
                cursor = await self._db.execute("SELECT 1 FROM records WHERE id = ?", (record,))
                if await cursor.fetchone() is None:
                    return False
                await self._replace_emails(record, emails, policies)
                await self._retag(_linked_to(1), [record], policies)
        except sqlite3.Error as exc:
            raise _store_error(exc, "changing record addresses") from exc
        return True

    async def set_share(
        self, owner: str, record: str, on: bool, policies: dict[str, AccountPolicy]
    ) -> bool:
        """Toggle the owner's custom-mode share flag and re-tag that mail, atomically."""
        try:
            async with self._transaction():
                cursor = await self._db.execute("SELECT 1 FROM records WHERE id = ?", (record,))
                if await cursor.fetchone() is None:
                    return False
                if on:
                    await self._db.execute(
                        "INSERT OR IGNORE INTO shares (owner, record) VALUES (?,?)", (owner, record)
                    )
                else:
                    await self._db.execute(
                        "DELETE FROM shares WHERE owner = ? AND record = ?", (owner, record)
                    )
                await self._retag(
                    "m.owner = ? AND m.id IN"
                    " (SELECT message FROM message_records WHERE record = ?)",
                    [owner, record],
                    policies,
                )
        except sqlite3.Error as exc:
            raise _store_error(exc, "changing a share flag") from exc
        return True

    async def sync_settings(
        self,
        snapshots: dict[str, str],
        policies: dict[str, AccountPolicy],
        force: Collection[str] = (),
    ) -> list[str]:
        """Re-tag (and re-label) the mail of accounts whose sharing settings changed.

        ``force``: accounts re-tagged and re-labelled even if the snapshot matches, because
        mail was stored under other settings after the snapshot was saved (a daemon still
        running with its old config while a CLI command already saved the new one).
        """
        changed: list[str] = []
        try:
            async with self._lock:
                rows = await self._db.execute_fetchall(
                    "SELECT account, snapshot, magnet_label FROM account_settings"
                )
            known = {r[0]: (r[1], r[2]) for r in rows}
            todo = {
                name: snap
                for name, snap in snapshots.items()
                if known.get(name) != (snap, policies[name].magnet_label) or name in force
            }
            if not todo:
                return changed
            async with self._transaction():
                for name, snap in todo.items():
                    label = policies[name].magnet_label
                    old_label = known.get(name, (None, None))[1]
                    if name in force:  # whatever label the mail got: only this one stays
                        await self._db.execute(
                            "DELETE FROM message_labels WHERE label IS NOT ? AND message IN"
                            " (SELECT id FROM messages WHERE account = ?)",
                            (label, name),
                        )
                    elif old_label and old_label != label:
                        await self._db.execute(
                            "DELETE FROM message_labels WHERE label = ? AND message IN"
                            " (SELECT id FROM messages WHERE account = ?)",
                            (old_label, name),
                        )
                    if label:
                        await self._db.execute(
                            "INSERT OR IGNORE INTO message_labels (message, label)"
                            " SELECT DISTINCT r.message, ? FROM message_records r"
                            " JOIN messages m ON m.id = r.message WHERE m.account = ?",
                            (label, name),
                        )
                    if name in force or known.get(name, (None,))[0] != snap:
                        await self._retag("m.account = ?", [name], policies)
                    await self._db.execute(
                        "INSERT INTO account_settings (account, snapshot, magnet_label)"
                        " VALUES (?,?,?) ON CONFLICT (account) DO UPDATE SET"
                        " snapshot = excluded.snapshot, magnet_label = excluded.magnet_label",
                        (name, snap, label),
                    )
                    changed.append(name)
        except sqlite3.Error as exc:
            raise _store_error(exc, "re-tagging after a settings change") from exc
        return changed

    async def _replace_emails(
        self, record: str, emails: Sequence[str], policies: dict[str, AccountPolicy]
    ) -> None:
        db = self._db
        await db.execute("DELETE FROM record_emails WHERE record = ?", (record,))
        await db.executemany(
            "INSERT OR IGNORE INTO record_emails (record, email) VALUES (?,?)",
            [(record, e) for e in emails],
        )
        if not emails:
            return
        marks = ",".join("?" * len(emails))
        # Incoming mail links on its sender, the owner's outgoing mail on its recipients.
        await db.execute(
            "INSERT OR IGNORE INTO message_records (message, record)"
            " SELECT DISTINCT a.message, ? FROM message_addresses a"
            " JOIN messages m ON m.id = a.message"
            f" WHERE a.address IN ({marks}) AND ((a.role = 'from' AND m.direction = 'in')"
            " OR (a.role != 'from' AND m.direction = 'out'))",
            (record, *emails),
        )
        for account, policy in policies.items():
            if policy.magnet_label:
                await db.execute(
                    "INSERT OR IGNORE INTO message_labels (message, label)"
                    " SELECT r.message, ? FROM message_records r JOIN messages m"
                    " ON m.id = r.message WHERE r.record = ? AND m.account = ?",
                    (policy.magnet_label, record, account),
                )

    async def _retag(
        self, where: str, args: Sequence[Any], policies: dict[str, AccountPolicy]
    ) -> int:
        """Apply each account's tagger to the messages matching ``where``; inside a transaction.

        Pages through the messages by id so memory stays bounded for large accounts.
        """
        db = self._db
        last, changed = 0, 0
        decided: dict[tuple[Any, ...], tuple[str, str]] = {}
        while True:
            if len(decided) > 100_000:
                decided.clear()  # bounded memory, whatever the variety of the mail
            rows = list(
                await db.execute_fetchall(
                    "SELECT m.id, m.account, m.direction, m.origin, m.visibility, m.reason,"
                    " EXISTS (SELECT 1 FROM message_records r WHERE r.message = m.id),"
                    " EXISTS (SELECT 1 FROM message_records r JOIN shares s ON s.record = r.record"
                    "   AND s.owner = m.owner WHERE r.message = m.id),"
                    # The first From, as _insert uses it: rows keep header order by rowid.
                    " (SELECT a.address FROM message_addresses a"
                    "   WHERE a.message = m.id AND a.role = 'from' ORDER BY a.rowid LIMIT 1),"
                    " (SELECT group_concat(a.address, ' ') FROM message_addresses a"
                    "   WHERE a.message = m.id AND a.role IN ('to', 'cc'))"
                    f" FROM messages m WHERE m.id > ? AND ({where}) ORDER BY m.id LIMIT {_PAGE}",
                    (last, *args),
                )
            )
            if not rows:
                return changed
            updates = []
            for r in rows:
                policy = policies.get(r[1])
                if policy is None:
                    continue  # an account no longer configured keeps its tags
                # Most messages share their facts with many others: decide each set once.
                sender = _domain(r[8]) if r[8] else None
                key = (r[1], r[2], r[3], bool(r[6]), bool(r[7]), sender, r[9])
                tag = decided.get(key)
                if tag is None:
                    tag = decided[key] = policy.tagger(
                        Facts(
                            direction=r[2],
                            crm_sent=r[3] == "crm",
                            linked=bool(r[6]),
                            owner_shared=bool(r[7]),
                            sender_domain=sender,
                            recipient_domains=tuple(_domain(a) for a in (r[9] or "").split()),
                        )
                    )
                if tag != (r[4], r[5]):
                    updates.append((*tag, r[0]))
            await db.executemany(
                "UPDATE messages SET visibility = ?, reason = ? WHERE id = ?", updates
            )
            changed += len(updates)
            last = rows[-1][0]

    # -- leases and login pacing ----------------------------------------------------------

    async def acquire_lease(
        self, account: str, holder: str, ttl: float, *, stale: str | None = None
    ) -> tuple[str, float] | None:
        """Take the account's lease: None if taken, else (holder, expiry) of the one who has it.

        ``stale`` names a holder known to be dead: its lease is taken over even if unexpired.
        """
        now = time.time()
        try:
            async with self._transaction():
                await self._db.execute(
                    "INSERT OR IGNORE INTO account_state (account) VALUES (?)", (account,)
                )
                cursor = await self._db.execute(
                    "UPDATE account_state SET lease_holder = ?, lease_expires = ?"
                    " WHERE account = ? AND (lease_holder IS NULL OR lease_holder IN (?, ?)"
                    " OR lease_expires < ?)",
                    (holder, now + ttl, account, holder, stale or holder, now),
                )
                if cursor.rowcount == 1:
                    return None
                cursor = await self._db.execute(
                    "SELECT lease_holder, lease_expires FROM account_state WHERE account = ?",
                    (account,),
                )
                row = await cursor.fetchone()
        except sqlite3.Error as exc:
            raise _store_error(exc, "taking the account lease") from exc
        assert row is not None
        return str(row[0]), float(row[1])

    async def renew_lease(self, account: str, holder: str, ttl: float) -> None:
        try:
            async with self._transaction():
                await self._db.execute(
                    "UPDATE account_state SET lease_expires = ?"
                    " WHERE account = ? AND lease_holder = ?",
                    (time.time() + ttl, account, holder),
                )
        except sqlite3.Error as exc:  # locked: typed, so the fetch reports temp_failed
            raise _store_error(exc, "renewing the account lease") from exc

    async def release_lease(self, account: str, holder: str) -> None:
        try:
            async with self._transaction():
                await self._db.execute(
                    "UPDATE account_state SET lease_holder = NULL, lease_expires = NULL"
                    " WHERE account = ? AND lease_holder = ?",
                    (account, holder),
                )
        except sqlite3.Error as exc:  # locked: the lease then expires on its own
            raise _store_error(exc, "releasing the account lease") from exc

    async def next_login(self, account: str) -> datetime | None:
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT next_login FROM account_state WHERE account = ?", (account,)
            )
            row = await cursor.fetchone()
        return datetime.fromisoformat(row[0]) if row and row[0] else None

    async def set_next_login(self, account: str, when: datetime | None) -> None:
        """Remember the earliest next login that the server's LOGIN-DELAY allows."""
        try:
            async with self._transaction():
                await self._db.execute(
                    "INSERT OR IGNORE INTO account_state (account) VALUES (?)", (account,)
                )
                await self._db.execute(
                    "UPDATE account_state SET next_login = ? WHERE account = ?",
                    (_to_second_up(when).isoformat() if when else None, account),
                )
        except sqlite3.Error as exc:
            raise _store_error(exc, "recording the next allowed login") from exc

    # -- account state -----------------------------------------------------------------------

    async def record_poll(
        self,
        account: str,
        owner: str,
        *,
        result: str,
        error: str | None,
        new: int,
        next_poll: str | None = None,
    ) -> None:
        failed = result != "ok"
        try:
            async with self._transaction():
                await self._db.execute(
                    "INSERT INTO account_state (account, owner, last_poll, result, error, new,"
                    " consecutive_failures, next_poll) VALUES (?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (account) DO UPDATE SET owner = excluded.owner,"
                    " last_poll = excluded.last_poll, result = excluded.result,"
                    " error = excluded.error, new = excluded.new,"
                    " consecutive_failures = CASE WHEN ? THEN consecutive_failures + 1 ELSE 0 END,"
                    # The daemon's schedule is its own (set_next_polls): a poll result
                    # without one keeps it, so `status` never loses the next poll.
                    " next_poll = coalesce(excluded.next_poll, account_state.next_poll)",
                    (account, owner, now_iso(), result, error, new, int(failed), next_poll, failed),
                )
        except sqlite3.Error as exc:
            raise _store_error(exc, "recording the poll result") from exc

    async def account_states(self) -> dict[str, AccountState]:
        async with self._lock:
            rows = await self._db.execute_fetchall(
                "SELECT s.*, (SELECT count(*) FROM messages m WHERE m.account = s.account)"
                " AS stored FROM account_state s"
            )
        return {
            r["account"]: AccountState(
                account=r["account"],
                owner=r["owner"],
                last_poll=r["last_poll"],
                result=r["result"],
                error=r["error"],
                new=r["new"],
                stored=r["stored"],
                paused=bool(r["paused"]),
                pause_reason=r["pause_reason"],
                next_poll=r["next_poll"],
                consecutive_failures=r["consecutive_failures"],
                next_login=r["next_login"],
            )
            for r in rows
        }

    async def count_sent_since(self, account: str, since: str) -> int:
        """Messages sent from the CRM through this account since ``since`` (ISO 8601 UTC)."""
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT count(*) FROM messages WHERE account = ? AND origin = 'crm'"
                " AND received_at >= ?",
                (account, since),
            )
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def stored_count(self, account: str) -> int:
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT count(*) FROM messages WHERE account = ?", (account,)
            )
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    # -- reading -----------------------------------------------------------------------------

    async def messages(
        self,
        viewer: str,
        *,
        account: str | None = None,
        label: str | None = None,
        record: str | None = None,
        limit: int | None = None,
    ) -> list[StoredMessage]:
        """What ``viewer`` may see, newest first: their own mail and mail shared with all."""
        sql = "SELECT m.* FROM messages m WHERE (m.owner = ? OR m.visibility = 'shared')"
        args: list[Any] = [viewer]
        if record is not None:
            # Start from the record's few links. Left to itself SQLite starts from the
            # owner and visibility indexes and visits every shared message (~100 ms at a
            # million); CROSS JOIN fixes the loop order.
            sql = (
                "SELECT m.* FROM message_records r CROSS JOIN messages m"
                " WHERE r.record = ? AND m.id = r.message"
                " AND (m.owner = ? OR m.visibility = 'shared')"
            )
            args = [record, viewer]
        if account is not None:
            sql += " AND m.account = ?"
            args.append(account)
        if label is not None:
            sql += (
                " AND EXISTS (SELECT 1 FROM message_labels l"
                " WHERE l.message = m.id AND l.label = ?)"
            )
            args.append(label)
        sql += " ORDER BY coalesce(m.date, m.received_at) DESC, m.id DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        async with self._snapshot():
            return await self._rows(await self._db.execute_fetchall(sql, args))

    async def message(self, message_id: int) -> StoredMessage | None:
        async with self._snapshot():
            rows = await self._db.execute_fetchall(
                "SELECT * FROM messages WHERE id = ?", (message_id,)
            )
            found = await self._rows(rows)
        return found[0] if found else None

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[None]:
        """A read transaction: its queries all see one committed state (WAL), so a re-tag
        or relink committed meanwhile by another process is seen whole or not at all."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN")  # in the try: as in _transaction
                yield
            finally:
                with contextlib.suppress(sqlite3.Error):
                    await self._db.execute("COMMIT")

    async def _rows(self, rows: Iterable[sqlite3.Row]) -> list[StoredMessage]:
        found = list(rows)
        ids = [int(r["id"]) for r in found]
        labels = await self._by_message("SELECT message, label FROM message_labels", ids)
        records = await self._by_message("SELECT message, record FROM message_records", ids)
        return [_stored(r, labels.get(r["id"], []), records.get(r["id"], [])) for r in found]

    async def _by_message(self, select: str, ids: Sequence[int]) -> dict[int, list[str]]:
        """``select`` (message, value) for these messages: their values, sorted."""
        out: dict[int, list[str]] = {}
        for message, value in await self._rows_in(select + " WHERE message IN ({marks})", ids):
            out.setdefault(int(message), []).append(str(value))
        for values in out.values():
            values.sort()
        return out

    async def raw_chunks(self, message_id: int) -> AsyncIterator[bytes]:
        """The stored bytes of one message, a chunk at a time."""
        seq = 0
        while True:
            async with self._lock:
                cursor = await self._db.execute(
                    "SELECT data FROM message_chunks WHERE message = ? AND seq = ?",
                    (message_id, seq),
                )
                row = await cursor.fetchone()
            if row is None:
                return
            yield bytes(row[0])
            seq += 1

    # -- daemon state ------------------------------------------------------------------------
    # Written by the scheduler only: the auth pause and the next poll, so that `status`
    # shows them and a restarted daemon keeps them.

    async def daemon_states(self) -> dict[str, DaemonState]:
        try:
            async with self._lock:
                rows = await self._db.execute_fetchall(
                    "SELECT account, paused, pause_reason, pause_key, next_poll, next_login,"
                    " consecutive_failures FROM account_state"
                )
        except sqlite3.Error as exc:
            raise _store_error(exc, "reading the daemon state") from exc
        return {r[0]: DaemonState(bool(r[1]), r[2], r[3], r[4], r[5], int(r[6] or 0)) for r in rows}

    async def set_paused(self, account: str, reason: str, key: str | None) -> None:
        """Pause polling: no next poll until ``clear_pause`` (the scheduler decides when)."""
        await self._daemon_write(
            account,
            "UPDATE account_state SET paused = 1, pause_reason = ?, pause_key = ?,"
            " next_poll = NULL WHERE account = ?",
            (reason, key, account),
        )

    async def clear_pause(self, account: str) -> None:
        await self._daemon_write(
            account,
            "UPDATE account_state SET paused = 0, pause_reason = NULL, pause_key = NULL"
            " WHERE account = ?",
            (account,),
        )

    async def set_next_polls(self, when: dict[str, datetime | None]) -> None:
        """The next poll of each account (ISO 8601 UTC, or none), in one transaction."""
        try:
            async with self._transaction():
                await self._db.executemany(
                    "INSERT OR IGNORE INTO account_state (account) VALUES (?)",
                    [(name,) for name in when],
                )
                await self._db.executemany(
                    "UPDATE account_state SET next_poll = ? WHERE account = ?",
                    [
                        (t.isoformat(timespec="seconds") if t else None, name)
                        for name, t in when.items()
                    ],
                )
        except sqlite3.Error as exc:
            raise _store_error(exc, "recording the next polls") from exc

    async def _daemon_write(self, account: str, sql: str, args: tuple[Any, ...]) -> None:
        try:
            async with self._transaction():
                await self._db.execute(
                    "INSERT OR IGNORE INTO account_state (account) VALUES (?)", (account,)
                )
                await self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise _store_error(exc, "recording the account's pause") from exc


@dataclass(frozen=True, slots=True)
class DaemonState:
    """One account's scheduler state as persisted (times are ISO 8601 UTC strings)."""

    paused: bool
    pause_reason: str | None
    pause_key: str | None
    next_poll: str | None
    next_login: str | None
    consecutive_failures: int


def _stored(r: sqlite3.Row, labels: list[str], records: list[str]) -> StoredMessage:
    return StoredMessage(
        id=r["id"],
        account=r["account"],
        owner=r["owner"],
        direction=r["direction"],
        sender=r["from_addr"],
        to=json.loads(r["to_addrs"]),
        cc=json.loads(r["cc_addrs"]),
        subject=r["subject"],
        date=r["date"],
        message_id=r["message_id"],
        visibility=r["visibility"],
        reason=r["reason"],
        size=r["size"],
        sha256=r["sha256"],
        received_at=r["received_at"],
        labels=labels,
        records=records,
    )


def _to_second_up(when: datetime) -> datetime:
    """Whole seconds, rounded up: a login allowed at the stored time is never too early."""
    if when.microsecond:
        when = when.replace(microsecond=0) + timedelta(seconds=1)
    return when


def _domain(address: str) -> str:
    return address.rpartition("@")[2]


def _parts(values: Sequence[_T]) -> Iterator[Sequence[_T]]:
    """``values`` in slices of at most _IN_LIST, for IN (...) lists."""
    for start in range(0, len(values), _IN_LIST):
        yield values[start : start + _IN_LIST]


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
