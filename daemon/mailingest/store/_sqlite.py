"""The embedded backend: one SQLite file in WAL mode, through aiosqlite.

Raw messages live in the database itself, in chunk rows: a message, its chunks and its UIDL
ledger row commit in one transaction (no orphan or missing files after a crash, one fsync
per commit for a whole batch) while memory stays bounded whatever the size.

Snapshot reads (the API's) use read-only connections of their own, through the plain
sqlite3 module in a few worker threads: WAL lets them read while the aiosqlite connection
writes, and a read transaction run whole in one thread needs no trip per statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from mailingest.errors import StoreError
from mailingest.store._db import (
    Database,
    Fetch,
    JsonSql,
    Many,
    NewIds,
    Plan,
    Reader,
    Row,
    Step,
    in_snapshot,
    store_error,
)
from mailingest.store._readers import ReaderPool
from mailingest.store._schema import SQLITE_MIGRATIONS, statements

BUSY_TIMEOUT_MS = 10_000
#: Snapshot reads map up to this much of the file instead of copying each page in with a
#: read(2): a page of the API visits about 100 rows scattered over the file, and mapped it
#: costs about half the CPU. Only the read-only connections map; a disk error under a
#: mapped read is a crash (SIGBUS) rather than a StoreError, which loses nothing committed.
READ_MMAP_BYTES = 1024 * 1024 * 1024
#: Snapshot reads at once. SQLite runs without the GIL, the rows it returns need it: a third
#: thread on a 2-core machine gained no throughput in bench/api_bench.py and lengthened the
#: tail, one alone queued every read behind the slowest.
READERS = 2
#: A snapshot read runs on the event loop's own thread when it is done within this long; one
#: that is not is rolled back and run again in a reader thread. A page of the API takes
#: about 0.2 ms, and a trip to a thread, with the GIL handed to and fro for each statement,
#: cost more than the read itself. The clock is read every 2,000 steps of SQLite: a step
#: that waits for the disk (a page of the file not in memory) holds the loop that long.
#: Reads of raw mail (megabyte chunks) always go to a thread.
QUICK_READ_SECONDS = 0.002
_T = TypeVar("_T")
#: New message ids are handed out as SQLite would (max + 1), under the write lock.
_MAX_ID = "SELECT coalesce(max(id), 0) FROM messages"
_CHUNKS = "INSERT INTO message_chunks (message, seq, data) VALUES (?,?,?)"


def prepare_path(path: Path) -> None:
    """Create the database's directory 0700 and the file 0600 before SQLite opens it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


class SqliteDatabase(Database):
    recipients_sql = (
        "(SELECT group_concat(a.address, ' ') FROM message_addresses a"
        " WHERE a.message = m.id AND a.role IN ('to', 'cc'))"
    )
    address_order = "a.rowid"  # rows keep header order by rowid
    rebuilds_indexes = True  # readers keep their snapshot (WAL), the old index with it

    def __init__(self, db: aiosqlite.Connection, path: Path) -> None:
        super().__init__()
        self._db = db
        self.path = path
        self.spool_dir = path.parent
        self._readers = ReaderPool(self._connect_reader, _out_of_transaction, size=READERS)
        #: The connection's synchronous level as last set; None: not known.
        self._synchronous: str | None = None
        #: How plans run whole in aiosqlite's thread; None: a statement a trip.
        self._runner = thread_runner(db)
        #: The read-only connection of reads on the event loop (opened on first need).
        self._quick: sqlite3.Connection | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<SQLite {self.path}>"

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        try:
            prepare_path(path)
            db = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        opened = cls(db, path)
        try:
            await opened._setup()
        except sqlite3.Error as exc:
            await db.close()
            raise store_error(exc, f"opening {path}") from exc
        except BaseException:
            await db.close()
            raise
        return opened

    async def _setup(self) -> None:
        await self.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await self._switch_to_wal()
        # FULL: a COMMIT is fsynced, so a committed message survives power loss too;
        # bookkeeping writes switch to NORMAL for their transaction (``_begin``).
        await self.execute("PRAGMA synchronous = FULL")
        self._synchronous = "FULL"
        await self.execute("PRAGMA foreign_keys = ON")
        # One plan: a new store's schema is some 40 statements, one trip.
        await self.run_plan(f"migrating {self.path}", _migrations())

    async def _switch_to_wal(self) -> None:
        """Two connections switching a new file to WAL at once: SQLite refuses one at once
        ("locked"; waiting would deadlock them), so it tries again within the busy timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                await self.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(random.uniform(0.005, 0.05))

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cursor = await self._db.execute(sql, args)
        return cursor.rowcount

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in await self._db.execute_fetchall(sql, args)]

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if isinstance(rows, Sequence) and not rows:
            return  # a trip to SQLite's thread for nothing (a batch without links, labels...)
        # A generator is consumed in SQLite's thread: one row in memory at a time.
        await self._db.executemany(sql, rows)

    async def next_ids(self, count: int) -> list[int]:
        return _ids_after(await self.fetchone(_MAX_ID), count)

    async def insert_chunks(self, rows: Iterator[tuple[int, int, bytes]]) -> None:
        await self.executemany(_CHUNKS, rows)

    async def run_plan(self, what: str, plan: Plan[_T], *, durable: bool = True) -> _T:
        # Whole in aiosqlite's thread, BEGIN to COMMIT: one trip instead of one a statement;
        # without a way to run it there, a statement a trip as on any backend.
        if self._runner is None:
            return await super().run_plan(what, plan, durable=durable)
        run, conn = self._runner
        with self.mapped(what):
            async with self._lock:
                abandoned = threading.Event()
                job = asyncio.ensure_future(run(self._run_plan, conn, plan, durable, abandoned))
                try:
                    result, commit_s = await asyncio.shield(job)
                except asyncio.CancelledError:
                    # The caller is gone: rolled back unless COMMIT already ran. The lock is
                    # held until the thread is done with the connection, so nothing else
                    # (a BEGIN choosing its synchronous level) runs on it before that.
                    abandoned.set()
                    while not job.done():
                        with contextlib.suppress(asyncio.CancelledError):
                            await asyncio.wait([job])
                    if not job.cancelled():
                        job.exception()  # seen: the caller gets its cancel, not this
                    raise
        if self.observer is not None:
            self.observer.committed(commit_s)
        return result  # type: ignore[no-any-return]

    def _run_plan(
        self, conn: sqlite3.Connection, plan: Plan[_T], durable: bool, abandoned: threading.Event
    ) -> tuple[_T, float]:
        """In the database thread: ``plan`` in one write transaction; its result and how
        long its COMMIT took. Rolled back if ``abandoned`` is set before the COMMIT."""
        try:
            if (level := self._level_change(durable)) is not None:
                conn.execute(f"PRAGMA synchronous = {level}")
                self._synchronous = level
            conn.execute("BEGIN IMMEDIATE")
            sent: Any = None
            while True:
                try:
                    step = plan.send(sent)
                except StopIteration as done:
                    result: _T = done.value
                    break
                sent = _step(conn, step)
            if abandoned.is_set():
                raise _Abandoned
            started = time.perf_counter()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        finally:
            plan.close()  # its spool files are read no more
        return result, time.perf_counter() - started

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        # A lock file next to the database: the kernel drops it if the process dies.
        # "send:acct" -> mail.db.send-<hash of acct>.lock, the name earlier versions used.
        kind, _, key = name.rpartition(":")
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
        lock = self.path.with_name(f"{self.path.name}.{kind or 'lock'}-{digest}.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    async def notify(self, channel: str) -> None:
        return None  # daemons poll the version row

    async def snapshot(self, what: str, read: Callable[[Reader], _T], *, quick: bool = True) -> _T:
        def run(conn: sqlite3.Connection) -> _T:
            # BEGIN is deferred: the snapshot is taken by the first read.
            return in_snapshot(conn, "BEGIN", _SqliteReader(conn), read, (sqlite3.Error,))

        if self._closed:
            raise StoreError("the store is closed")
        with self.mapped(what):
            if quick:
                if self._quick is None:
                    self._quick = self._connect_reader(busy_timeout=0)  # busy: a thread waits
                with contextlib.suppress(_TooSlow):
                    found = _within(QUICK_READ_SECONDS, self._quick, run)
                    await asyncio.sleep(0)  # as a read in a thread would, let others run
                    return found
            return await self._readers.run(run)

    def _connect_reader(self, busy_timeout: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
        # mode=ro: this connection can never write, whatever runs on it. The aiosqlite
        # connection opened (and recovered) the database and its WAL first.
        conn = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=ro",
            uri=True,
            isolation_level=None,
            check_same_thread=False,  # one thread at a time, not always the same one
            timeout=busy_timeout / 1000,
        )
        try:
            conn.execute(f"PRAGMA mmap_size = {READ_MMAP_BYTES}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def close(self) -> None:
        self._closed = True
        try:
            if self._quick is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._quick.close()
                self._quick = None
            await self._readers.close()
        finally:
            await self._db.close()

    async def _begin(self, write: bool, durable: bool = True) -> None:
        # IMMEDIATE: the write lock up front, so no upgrade deadlock between processes.
        if not write:
            await self.execute("BEGIN")
            return
        # A trip of its own when the level changes (executescript would save it, but it
        # first COMMITs a transaction a failed COMMIT may have left open).
        if (level := self._level_change(durable)) is not None:
            await self.execute(f"PRAGMA synchronous = {level}")
            self._synchronous = level
        await self.execute("BEGIN IMMEDIATE")

    def _level_change(self, durable: bool) -> str | None:
        """The synchronous level a write needs, if the connection is not at it (then the
        level is unknown until the caller has set it). WAL with NORMAL: the COMMIT is not
        fsynced, but never lost ahead of an earlier one, and the next FULL commit (or a
        checkpoint) syncs it too."""
        level = "FULL" if durable else "NORMAL"
        if level == self._synchronous:
            return None
        self._synchronous = None
        return level

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)


class _SqliteReader(Reader):
    json = JsonSql(
        object="json_object",
        text="{}",
        join="group_concat({value}, ',')",
    )

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, args).fetchall()


class _TooSlow(Exception):
    """A read on the event loop was stopped at its time limit, or found the database busy."""


def _within(
    seconds: float, conn: sqlite3.Connection, run: Callable[[sqlite3.Connection], _T]
) -> _T:
    """``run(conn)`` if it is done within ``seconds``; else ``_TooSlow``, its read
    transaction rolled back."""
    deadline = time.perf_counter() + seconds
    conn.set_progress_handler(lambda: time.perf_counter() > deadline, 2000)
    try:
        return run(conn)
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_INTERRUPT, sqlite3.SQLITE_BUSY):
            raise _TooSlow from exc
        raise
    finally:
        conn.set_progress_handler(None, 0)
        if conn.in_transaction:  # never left open, whatever stopped in_snapshot
            conn.execute("ROLLBACK")


class _Abandoned(Exception):
    """The caller of a plan was cancelled before its COMMIT."""


def thread_runner(
    db: aiosqlite.Connection,
) -> tuple[Callable[..., Awaitable[Any]], sqlite3.Connection] | None:
    """How to run a function in ``db``'s thread, on its sqlite3 connection, if this aiosqlite
    has a way: only through private names (``_execute``, the method every call of its own
    goes through, and ``_conn``)."""
    run = getattr(db, "_execute", None)
    conn = getattr(db, "_conn", None)
    if not callable(run) or not isinstance(conn, sqlite3.Connection):
        return None
    return run, conn


def _migrations() -> Plan[None]:
    """The migrations the file has not had yet, each recorded in ``user_version``."""
    rows: list[Row] = yield Fetch("PRAGMA user_version")
    version = int(rows[0][0]) if rows else 0
    for number, script in enumerate(SQLITE_MIGRATIONS[version:], start=version + 1):
        for statement in statements(script):
            yield Fetch(statement)
        yield Fetch(f"PRAGMA user_version = {number}")


def _step(conn: sqlite3.Connection, step: Step) -> Any:
    """One statement of a plan, in the database thread; what the plan gets back."""
    if isinstance(step, Fetch):
        return conn.execute(step.sql, step.args).fetchall()
    if isinstance(step, NewIds):
        return _ids_after(conn.execute(_MAX_ID).fetchone(), step.count)
    if isinstance(step, Many):
        if not isinstance(step.rows, Sequence) or step.rows:
            conn.executemany(step.sql, step.rows)
        return None
    conn.executemany(_CHUNKS, step.rows)
    return None


def _ids_after(row: Row | None, count: int) -> list[int]:
    first = int(row[0] if row else 0) + 1
    return list(range(first, first + count))


def _out_of_transaction(conn: sqlite3.Connection) -> bool:
    return not conn.in_transaction
