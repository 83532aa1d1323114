"""The scale-out backend: PostgreSQL through psycopg 3 (async).

psycopg rather than asyncpg: it ships complete type hints (``mypy --strict`` needs no stubs),
runs ``executemany`` in pipeline mode (one round trip for a batch's rows) and binds with
plain placeholders, so the store's shared SQL needs only ``?`` turned into ``%s``.
Raw messages are rows of 1 MiB chunks as on SQLite, inserted one at a time so memory stays
bounded whatever the size. A write is ``synchronous_commit`` as the server has it (on by
default: a COMMIT is durable when it returns). Snapshot reads (the API's) run on a few
connections of their own, psycopg's synchronous ones in worker threads: a read's statements
go one after another in its thread, and the event loop hands it over once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mailingest.errors import ConfigError, StoreError
from mailingest.store._db import Database, JsonSql, Reader, Row, in_snapshot
from mailingest.store._readers import ReaderPool
from mailingest.store._schema import POSTGRES_MIGRATIONS, statements

if TYPE_CHECKING:
    import psycopg

#: One key for the migration lock: daemons starting together migrate one at a time.
_MIGRATION_LOCK = 0x6D61696C  # "mail"
CONNECT_TIMEOUT = 10
LOCK_TIMEOUT_MS = 10_000
#: While listening, what changed is also looked for this often (seconds; see changes).
LISTEN_CHECK = 30.0
#: Bytes of raw message chunks sent in one pipelined batch.
CHUNK_BATCH = 4 * 1024 * 1024
#: A snapshot: one committed state for all its statements, and nothing written.
_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
#: Snapshot reads at once, each a server connection: a read mostly waits on the network,
#: so more of them overlap than SQLite's.
READERS = 4
_T = TypeVar("_T")


def is_postgres_url(database: object) -> bool:
    return isinstance(database, str) and database.startswith(("postgresql://", "postgres://"))


def redacted(url: str) -> str:
    """The URL without any password in it (for messages and logs)."""
    head, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{head}{sep}{user}@{host}"


@functools.cache
def _placeholders(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


def _driver() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigError(
            "a postgresql:// database needs the PostgreSQL driver: "
            "pip install 'mailingest[postgresql]' (psycopg 3)",
            key_path="storage.database",
        ) from exc
    return psycopg


#: The advisory lock of tag decisions (``Database.tag_lock``): "mail" in ASCII.
_TAG_LOCK_KEY = 0x6D61696C


class PostgresDatabase(Database):
    recipients_sql = (
        "(SELECT string_agg(a.address, ' ') FROM message_addresses a"
        " WHERE a.message = m.id AND a.role IN ('to', 'cc'))"
    )
    address_order = "a.pos"
    atomic_statements = True  # autocommit, synchronous_commit on
    # A transaction-level advisory lock (released by COMMIT or ROLLBACK) on one key.
    tag_lock = (
        f"SELECT pg_advisory_xact_lock({_TAG_LOCK_KEY})",
        f"SELECT pg_advisory_xact_lock_shared({_TAG_LOCK_KEY})",
    )

    def __init__(self, url: str, password: str | None, spool_dir: Path) -> None:
        super().__init__()
        self.url = url
        self._password = password
        self.spool_dir = spool_dir
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._readers: ReaderPool[psycopg.Connection[Any]] = ReaderPool(
            self._connect_reader, _idle, size=READERS
        )

    def __repr__(self) -> str:
        return f"<PostgreSQL {redacted(self.url)}>"

    @classmethod
    async def open(cls, url: str, password: str | None, spool_dir: Path) -> PostgresDatabase:
        opened = cls(url, password, spool_dir)
        try:
            await opened._connection()
            await opened._migrate()
        except BaseException:
            await opened.close()
            raise
        return opened

    def _connect_args(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT}
        if self._password is not None:
            kwargs["password"] = self._password
        return kwargs

    def _cannot_connect(self, exc: BaseException) -> StoreError:
        return StoreError(f"cannot connect to {redacted(self.url)}: {_first_line(exc)}")

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        driver = _driver()
        try:
            conn: psycopg.AsyncConnection[Any] = await driver.AsyncConnection.connect(
                self.url, **self._connect_args()
            )
        except driver.Error as exc:
            raise self._cannot_connect(exc) from exc
        return conn

    def _connect_reader(self) -> psycopg.Connection[Any]:
        """A connection for snapshots (in a reader thread): waits for a lock as long as the
        shared connection does."""
        driver = _driver()
        try:
            conn: psycopg.Connection[Any] = driver.Connection.connect(
                self.url, **self._connect_args()
            )
        except driver.Error as exc:
            raise self._cannot_connect(exc) from exc
        try:
            conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        except BaseException:
            conn.close()
            raise
        return conn

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        """The open connection; a new one after the old broke (a server restart, a drop)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()
            self._conn = await self._connect()
            # As SQLite's busy timeout: a lock held elsewhere fails the write (temp_failed)
            # instead of hanging the account.
            with self.mapped("setting up the connection"):
                await self._conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
                # Mail is deleted from the server once its commit returns: the commit must
                # be durable whatever the server's default.
                await self._conn.execute("SET synchronous_commit = on")
        return self._conn

    async def _migrate(self) -> None:
        async with self.write(f"migrating {redacted(self.url)}"):
            await self.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            await self.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            row = await self.fetchone("SELECT max(version) FROM schema_version")
            version = int(row[0]) if row and row[0] is not None else 0
            for number, script in enumerate(POSTGRES_MIGRATIONS[version:], start=version + 1):
                for statement in statements(script):
                    await self.execute(statement)
                await self.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        conn = await self._connection()
        cursor = await conn.execute(_placeholders(sql), tuple(args))
        return cursor.rowcount

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        conn = await self._connection()
        cursor = await conn.execute(_placeholders(sql), tuple(args))
        if cursor.description is None:
            return []  # a write without RETURNING (a plan's step), as SQLite answers it
        return [tuple(r) for r in await cursor.fetchall()]

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = [tuple(r) for r in rows]
        if not batch:
            return
        conn = await self._connection()
        async with conn.cursor() as cursor:
            await cursor.executemany(_placeholders(sql), batch)

    async def notify(self, channel: str) -> None:
        await self.execute(f"NOTIFY {channel}")

    async def changes(self, channel: str, every: float) -> AsyncGenerator[None, None]:
        # LISTEN on a connection of its own: a NOTIFY committed by any process wakes us
        # at once. What changed before LISTEN took hold (at the start, or while this
        # connection was being replaced) is seen by the yield right after it; beyond that a
        # look every ``every`` s would find nothing, and it cost an idle daemon more than
        # anything else it did. A look every LISTEN_CHECK s stays, for a connection that
        # died without a word.
        while True:
            try:
                conn = await self._connect()
            except StoreError:
                await asyncio.sleep(every)
                yield
                continue
            try:
                await conn.execute(f"LISTEN {channel}")
                yield
                while True:
                    async for _ in conn.notifies(timeout=LISTEN_CHECK, stop_after=1):
                        pass
                    yield
            except _driver().Error:
                await asyncio.sleep(every)
                yield
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def next_ids(self, count: int) -> list[int]:
        rows = await self.fetchall(
            "SELECT nextval(pg_get_serial_sequence('messages', 'id')) FROM generate_series(1, ?)",
            (count,),
        )
        return sorted(int(r[0]) for r in rows)

    async def insert_chunks(self, rows: Iterator[tuple[int, int, bytes]]) -> None:
        # In pipelined batches of at most CHUNK_BATCH bytes: one batch for a few thousand
        # small messages, while a 200 MB message never queues whole in the pipeline.
        sql = "INSERT INTO message_chunks (message, seq, data) VALUES (?,?,?)"
        batch: list[tuple[int, int, bytes]] = []
        size = 0
        for row in rows:
            batch.append(row)
            size += len(row[2])
            if size >= CHUNK_BATCH:
                await self.executemany(sql, batch)
                batch, size = [], 0
        await self.executemany(sql, batch)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        # A session advisory lock on a connection of its own: every daemon and CLI on
        # the database honours it, and the server drops it when the holder's session ends.
        key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big", signed=True)
        conn = await self._connect()
        try:
            with self.mapped(f"waiting for the lock {name!r}"):
                await conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            yield
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def snapshot(self, what: str, read: Callable[[Reader], _T], *, quick: bool = True) -> _T:
        def run(conn: psycopg.Connection[Any]) -> _T:
            return in_snapshot(conn, _SNAPSHOT, _PostgresReader(conn), read, (_driver().Error,))

        with self.mapped(what):
            return await self._readers.run(run)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._readers.close()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _begin(self, write: bool, durable: bool = True) -> None:
        # Every COMMIT is flushed (synchronous_commit on): a SET LOCAL to skip it for
        # bookkeeping would cost the round trip it saves.
        await self.execute("BEGIN" if write else _SNAPSHOT)

    def _driver_errors(self) -> tuple[type[BaseException], ...]:
        return (_driver().Error,)


class _PostgresReader(Reader):
    json = JsonSql(
        object="json_build_object",
        text="({})::text",
        join="string_agg({value}, ',' ORDER BY {order})",
    )

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(_placeholders(sql), tuple(args)).fetchall()


def _idle(conn: psycopg.Connection[Any]) -> bool:
    """Usable for the next snapshot: open, not broken, in no transaction."""
    from psycopg import pq

    if conn.closed or conn.broken:
        return False
    return conn.info.transaction_status == pq.TransactionStatus.IDLE


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
