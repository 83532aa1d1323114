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
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import aiosqlite

from mailingest.errors import StoreError
from mailingest.parse import Headers, now_iso

CHUNK = 1024 * 1024
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
    visibility: str
    reason: str
    labels: tuple[str, ...] = ()


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
            await self._db.execute("BEGIN IMMEDIATE")
            try:
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
        self, account: str, owner: str, items: Sequence[NewMessage]
    ) -> list[StoreOutcome]:
        """Store messages and their ledger rows in one fsynced transaction.

        A UIDL already in the ledger (another process got there first) is skipped; content
        already stored for the account gets only a ledger row (servers that renumber UIDLs).
        """
        outcomes: list[StoreOutcome] = []
        db = self._db
        received = now_iso()
        try:
            async with self._transaction():
                for item in items:
                    known = await (
                        await db.execute(
                            "SELECT 1 FROM ledger WHERE account = ? AND uidl = ?",
                            (account, item.uidl),
                        )
                    ).fetchone()
                    if known:
                        continue
                    row = await (
                        await db.execute(
                            "SELECT id FROM messages WHERE account = ? AND sha256 = ?",
                            (account, item.sha256),
                        )
                    ).fetchone()
                    if row:
                        message_id, duplicate = int(row[0]), True
                    else:
                        message_id, duplicate = await self._insert(account, owner, item, received)
                    await db.execute(
                        "INSERT INTO ledger (account, uidl, message, first_seen) VALUES (?,?,?,?)",
                        (account, item.uidl, message_id, received),
                    )
                    outcomes.append(StoreOutcome(item.uidl, message_id, duplicate))
        except sqlite3.Error as exc:
            raise _store_error(exc, f"storing mail of account {account!r}") from exc
        return outcomes

    async def _insert(
        self, account: str, owner: str, item: NewMessage, received: str
    ) -> tuple[int, bool]:
        h = item.headers
        cursor = await self._db.execute(
            "INSERT INTO messages (account, owner, direction, size, sha256, from_addr, to_addrs,"
            " cc_addrs, subject, date, message_id, visibility, reason, received_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
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
                item.visibility,
                item.reason,
                received,
            ),
        )
        message_id = cursor.lastrowid
        assert message_id is not None
        item.spool.seek(0)
        # The generator is consumed in SQLite's thread: one chunk in memory at a time.
        await self._db.executemany(
            "INSERT INTO message_chunks (message, seq, data) VALUES (?,?,?)",
            _chunks(message_id, item.spool),
        )
        await self._db.executemany(
            "INSERT OR IGNORE INTO message_labels (message, label) VALUES (?,?)",
            [(message_id, label) for label in item.labels],
        )
        return message_id, False

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
        async with self._transaction():
            await self._db.execute(
                "UPDATE account_state SET lease_expires = ? WHERE account = ? AND lease_holder = ?",
                (time.time() + ttl, account, holder),
            )

    async def release_lease(self, account: str, holder: str) -> None:
        async with self._transaction():
            await self._db.execute(
                "UPDATE account_state SET lease_holder = NULL, lease_expires = NULL"
                " WHERE account = ? AND lease_holder = ?",
                (account, holder),
            )

    async def next_login(self, account: str) -> datetime | None:
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT next_login FROM account_state WHERE account = ?", (account,)
            )
            row = await cursor.fetchone()
        return datetime.fromisoformat(row[0]) if row and row[0] else None

    async def set_next_login(self, account: str, when: datetime | None) -> None:
        """Remember the earliest next login that the server's LOGIN-DELAY allows."""
        async with self._transaction():
            await self._db.execute(
                "INSERT OR IGNORE INTO account_state (account) VALUES (?)", (account,)
            )
            await self._db.execute(
                "UPDATE account_state SET next_login = ? WHERE account = ?",
                (when.isoformat(timespec="seconds") if when else None, account),
            )

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
                    " next_poll = excluded.next_poll",
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

    async def stored_count(self, account: str) -> int:
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT count(*) FROM messages WHERE account = ?", (account,)
            )
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    # -- reading -----------------------------------------------------------------------------

    async def messages(
        self, viewer: str, *, account: str | None = None, label: str | None = None
    ) -> list[StoredMessage]:
        """What ``viewer`` may see, newest first: their own mail and mail shared with all."""
        sql = "SELECT * FROM messages m WHERE (m.owner = ? OR m.visibility = 'shared')"
        args: list[Any] = [viewer]
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
        async with self._lock:
            rows = await self._db.execute_fetchall(sql, args)
            return [await self._row(r) for r in rows]

    async def message(self, message_id: int) -> StoredMessage | None:
        async with self._lock:
            cursor = await self._db.execute("SELECT * FROM messages WHERE id = ?", (message_id,))
            row = await cursor.fetchone()
            return await self._row(row) if row else None

    async def _row(self, r: sqlite3.Row) -> StoredMessage:
        labels = await self._db.execute_fetchall(
            "SELECT label FROM message_labels WHERE message = ? ORDER BY label", (r["id"],)
        )
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
            labels=[x[0] for x in labels],
        )

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
