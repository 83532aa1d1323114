"""What every part of the store talks to: one open database, whatever the backend.

The parts of the store write their SQL once, with ``?`` placeholders and the syntax SQLite
and PostgreSQL share; a backend runs it, serialises it per connection, and maps its driver's
errors to ``StoreError`` in exactly one place (``read``/``write``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from mailingest.errors import StoreError
from mailingest.model import Facts, StoreObserver

#: Raw messages are stored in rows of this many bytes: memory stays bounded at any size.
CHUNK = 1024 * 1024
#: Values bound in one IN (...) list: under SQLite's smallest limit on parameters (999
#: before 3.32), and small enough that a subquery re-run for every re-tag page stays cheap.
IN_LIST = 500

Row = tuple[Any, ...]
_T = TypeVar("_T")


# -- plans: a write transaction written once, run by each backend its way ---------------------
#
# A plan is a generator that yields its statements one at a time, gets each one's result
# back, and returns the transaction's result. PostgreSQL runs it from the event loop, a
# round trip a statement as any other write; SQLite runs it whole in its database thread,
# BEGIN to COMMIT in one trip (a trip to that thread costs about as much CPU as SQLite's
# own work to store a message).


class Fetch:
    """The rows of one statement (sent back as a list of tuples)."""

    __slots__ = ("args", "sql")

    def __init__(self, sql: str, args: Sequence[Any] = ()) -> None:
        self.sql, self.args = sql, args


class Many:
    """One statement a row; ``rows`` may be a generator, consumed where the plan runs."""

    __slots__ = ("rows", "sql")

    def __init__(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.sql, self.rows = sql, rows


class NewIds:
    """``count`` new message ids, ascending (sent back as a list)."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


class Chunks:
    """Raw message chunks (message, seq, data), one held in memory at a time."""

    __slots__ = ("rows",)

    def __init__(self, rows: Iterator[tuple[int, int, bytes]]) -> None:
        self.rows = rows


Step = Fetch | Many | NewIds | Chunks
Plan = Generator[Step, Any, _T]


def _one(sql: str, args: Sequence[Any]) -> Plan[list[Row]]:
    rows: list[Row] = yield Fetch(sql, args)
    return rows


def fetch_in(sql: str, values: Sequence[Any], *before: Any) -> Plan[list[Row]]:
    """A plan's ``Database.fetch_in``: ``sql`` with an ``IN ({marks})`` list, over
    ``values`` in parts of at most IN_LIST; ``before`` binds the parameters ahead of it."""
    rows: list[Row] = []
    for part in parts(values):
        marks = ",".join("?" * len(part))
        found: list[Row] = yield Fetch(sql.format(marks=marks), (*before, *part))
        rows.extend(found)
    return rows


@dataclass(frozen=True, slots=True)
class JsonSql:
    """How a backend writes JSON in SQL (``str.format`` templates). The API's listing
    leaves the database as JSON text: building and encoding a page of 50 messages in Python
    cost more than the rest of the request."""

    object: str  # the function that makes an object of key, value, ... pairs
    text: str  # {}: a JSON value, as text the driver returns as a str
    join: str  # {value}: JSON texts joined with commas, in {order} or the rows' own


class Reader(abc.ABC):
    """The statements of one ``Database.snapshot``: run at once in a reader thread, all in
    one read transaction."""

    json: JsonSql

    @abc.abstractmethod
    def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = self.fetchall(sql, args)
        return rows[0] if rows else None


def in_snapshot(
    conn: Any,
    begin: str,
    reader: Reader,
    read: Callable[[Reader], _T],
    errors: tuple[type[BaseException], ...],
) -> _T:
    """Reader-thread side of ``Database.snapshot``: ``read`` in one read transaction on
    ``conn`` (opened with ``begin``), rolled back if it fails; ``errors``: the driver's."""
    conn.execute(begin)
    try:
        result = read(reader)
    except BaseException:
        with contextlib.suppress(*errors):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


class Database(abc.ABC):
    """One connection shared by the account tasks of one process, and a few read-only ones.

    Statements of one transaction must not interleave with another task's, and reads must
    not see a half-done batch: ``read`` and ``write`` hold a lock for their whole block.
    ``snapshot`` reads on a connection of its own instead (no lock, no queueing behind a
    write), in one trip to a reader thread.
    """

    #: SQL that lists one message's recipients (to and cc) as one space-separated string.
    recipients_sql: str
    #: The column that keeps a message's addresses in header order.
    address_order: str
    #: Where fetches spool messages before they are stored (same disk as the database
    #: where there is one).
    spool_dir: Path
    #: A single write statement outside BEGIN/COMMIT is atomic and durable, and cannot fail
    #: where a transaction would have waited (PostgreSQL in autocommit; not SQLite, whose
    #: deferred write can meet a stale snapshot and fail busy at once).
    atomic_statements = False
    #: A bulk change may drop an index and make it again in its transaction (SQLite; on
    #: PostgreSQL the DDL would hold every reader of the table until the COMMIT).
    rebuilds_indexes = False
    #: Where writers run at once (PostgreSQL): statements that make a transaction that
    #: decides tags from sharing facts wait for every other one, exclusive for a re-tag,
    #: shared for ingestion (records.py, ingest.py). None: writes are serial already.
    tag_lock: tuple[str, str] | None = None

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        #: Hears each COMMIT's duration (the daemon's metrics), if set.
        self.observer: StoreObserver | None = None

    # -- what a backend provides -------------------------------------------------------------

    @abc.abstractmethod
    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    @abc.abstractmethod
    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement per row; ``rows`` may be a generator, consumed one at a time."""

    @abc.abstractmethod
    async def next_ids(self, count: int) -> list[int]:
        """``count`` new message ids, in ascending order; inside a write transaction."""

    @abc.abstractmethod
    async def insert_chunks(self, rows: Iterator[tuple[int, int, bytes]]) -> None:
        """Insert (message, seq, data) rows into message_chunks, holding one in memory."""

    @abc.abstractmethod
    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Held by one process at a time, across machines where the backend can; dropped
        when the holder dies."""

    @abc.abstractmethod
    async def snapshot(self, what: str, read: Callable[[Reader], _T], *, quick: bool = True) -> _T:
        """``read`` run whole on a read-only connection, in one read transaction (one
        committed state), none of its statements waiting for a write of this process:
        in one of a few reader threads (one trip from the event loop however many
        statements it runs), or on SQLite first on the event loop itself where ``quick``
        (``read`` may then run twice: it must only read and decide). Errors are mapped as
        in ``read``. For the API's hot reads."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def changes(self, channel: str, every: float) -> AsyncGenerator[None, None]:
        """Yields when something may have changed on ``channel``: every ``every`` seconds
        (a backend with notifications instead at once, and once each time it starts to
        listen, for what changed before)."""
        while True:
            await asyncio.sleep(every)
            yield

    @abc.abstractmethod
    async def notify(self, channel: str) -> None:
        """Tell listeners on other connections, at commit, that something changed (a
        backend without notifications does nothing: they poll)."""

    @abc.abstractmethod
    async def _begin(self, write: bool, durable: bool = True) -> None:
        """BEGIN; a write that is not ``durable`` may skip the flush to disk at its COMMIT
        (a backend that always flushes ignores it)."""

    @abc.abstractmethod
    def _driver_errors(self) -> tuple[type[BaseException], ...]: ...

    # -- shared by every backend ---------------------------------------------------------------

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        rows = await self.fetchall(sql, args)
        return rows[0] if rows else None

    async def fetch_in(self, sql: str, values: Sequence[Any], *before: Any) -> list[Row]:
        """``sql`` with an ``IN ({marks})`` list, run over ``values`` in parts of at most
        IN_LIST; ``before`` binds the parameters ahead of it."""
        rows: list[Row] = []
        for part in parts(values):
            marks = ",".join("?" * len(part))
            rows.extend(await self.fetchall(sql.format(marks=marks), (*before, *part)))
        return rows

    async def write_one(
        self, what: str, sql: str, args: Sequence[Any] = (), *, durable: bool = True
    ) -> list[Row]:
        """One write statement, atomic on its own; its rows (RETURNING). The hot path of a
        poll (lease, result) is made of these: one round trip where the backend commits a
        lone statement atomically, else one plan (on SQLite one trip to its thread)."""
        if self.atomic_statements:  # flushed at once whatever ``durable`` allows
            async with self.statement(what, write=True):
                return await self.fetchall(sql, args)
        return await self.run_plan(what, _one(sql, args), durable=durable)

    async def run_plan(self, what: str, plan: Plan[_T], *, durable: bool = True) -> _T:
        """``plan`` as one write transaction (see ``write``); its result."""
        async with self.write(what, durable=durable):
            try:
                sent: Any = None
                while True:
                    try:
                        step = plan.send(sent)
                    except StopIteration as done:
                        return done.value  # type: ignore[no-any-return]
                    if isinstance(step, Fetch):
                        sent = await self.fetchall(step.sql, step.args)
                    elif isinstance(step, NewIds):
                        sent = await self.next_ids(step.count)
                    else:
                        sent = None
                        if isinstance(step, Many):
                            await self.executemany(step.sql, step.rows)
                        else:
                            await self.insert_chunks(step.rows)
            finally:
                plan.close()  # a step that failed leaves it suspended

    @contextlib.asynccontextmanager
    async def write(self, what: str, *, durable: bool = True) -> AsyncIterator[None]:
        """One write transaction, committed whole or rolled back whole.

        ``durable=False`` is for bookkeeping that a power cut may undo without harm (leases,
        poll results, the schedule): its COMMIT need not reach the disk before returning.
        It is never reordered after a later durable commit, which flushes it too; anything
        about mail (messages, the ledger, deletions) stays durable.
        """
        with self.mapped(what):
            async with self._lock:
                try:
                    # Inside the try: a cancel while BEGIN waits still gets its ROLLBACK
                    # queued behind it, so the connection never stays in a transaction;
                    # nor does a COMMIT that failed (SQLite may leave it open).
                    await self._begin(write=True, durable=durable)
                    yield
                    started = time.perf_counter()
                    await self.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(*self._driver_errors()):
                        await self.execute("ROLLBACK")
                    raise
                if self.observer is not None:
                    self.observer.committed(time.perf_counter() - started)

    @contextlib.asynccontextmanager
    async def read(self, what: str) -> AsyncIterator[None]:
        """A read transaction: its queries all see one committed state, so a re-tag or
        relink committed meanwhile by another process is seen whole or not at all."""
        with self.mapped(what):
            async with self._lock:
                try:
                    await self._begin(write=False)
                    yield
                finally:
                    with contextlib.suppress(*self._driver_errors()):
                        await self.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def statement(self, what: str, *, write: bool) -> AsyncIterator[None]:
        """A block that runs exactly one statement: without BEGIN and COMMIT where that is
        as safe (reads; writes where ``atomic_statements``), one round trip instead of three."""
        if write and not self.atomic_statements:
            async with self.write(what):
                yield
            return
        with self.mapped(what):
            async with self._lock:  # another task's transaction must not take it in
                yield

    @contextlib.contextmanager
    def mapped(self, what: str) -> Iterator[None]:
        """The driver's errors become ``StoreError`` that says what was being done."""
        try:
            yield
        except self._driver_errors() as exc:
            raise store_error(exc, what) from exc


def store_error(exc: BaseException, what: str) -> StoreError:
    text = str(exc).strip()
    low = text.lower()
    if "locked" in low or "busy" in low or "lock timeout" in low or "could not obtain lock" in low:
        return StoreError(f"database is locked by another process while {what}; try again")
    if "full" in low or "no space" in low:
        return StoreError(f"disk full while {what}: {text}")
    return StoreError(f"database error while {what}: {text}")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def domain(address: str) -> str:
    return address.rpartition("@")[2]


def facts(
    direction: str,
    origin: str,
    linked: bool,
    owner_shared: bool,
    sender: str | None,
    recipients: Iterable[str],
) -> Facts:
    """A message's facts from what the store keeps of it (new and re-tagged alike)."""
    return Facts(
        direction=direction,
        crm_sent=origin == "crm",
        linked=linked,
        owner_shared=owner_shared,
        sender_domain=domain(sender) if sender else None,
        # Sorted: the SQL that lists them for a re-tag keeps no order.
        recipient_domains=tuple(sorted(domain(a) for a in recipients)),
    )


def parts(values: Sequence[_T]) -> Iterator[Sequence[_T]]:
    """``values`` in slices of at most IN_LIST, for IN (...) lists."""
    for start in range(0, len(values), IN_LIST):
        yield values[start : start + IN_LIST]


def linked_to(count: int) -> str:
    """SQL: the message is linked to one of ``count`` records (given as parameters)."""
    marks = ",".join("?" * count)
    return f"m.id IN (SELECT message FROM message_records WHERE record IN ({marks}))"
