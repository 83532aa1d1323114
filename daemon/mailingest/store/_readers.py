"""A few read-only connections, each used by one worker thread at a time: where
``Database.snapshot`` runs its reads.

One read is one function run in one thread, so a page of the API (its listing, labels,
records, the caller's token) costs one hand-over between the event loop and a thread, where
statement by statement through the shared connection it cost five, each queued behind the
writes of every account. The connections are opened on first need: a daemon that serves no
API opens none, and no thread is started until a read comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, Protocol, TypeVar

from mailingest.errors import StoreError


class Closable(Protocol):
    def close(self) -> None: ...


_C = TypeVar("_C", bound=Closable)
_T = TypeVar("_T")


class ReaderPool(Generic[_C]):
    """At most ``size`` connections made by ``connect`` (in a worker thread); one that is
    not ``usable`` after a read (broken, left in a transaction) is closed, and the next read
    opens a new one."""

    def __init__(
        self,
        connect: Callable[[], _C],
        usable: Callable[[_C], bool],
        *,
        size: int,
    ) -> None:
        self._connect = connect
        self._usable = usable
        self._idle: list[_C] = []
        self._lock = threading.Lock()
        self._closed = False
        self._started = False  # a read was ever submitted (so a thread may exist)
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="mailingest-read")

    async def run(self, read: Callable[[_C], _T]) -> _T:
        """``read`` on a connection of the pool, in a worker thread. Cancelled before it
        started, it never runs; after, the thread finishes it and keeps the connection."""
        if self._closed:
            raise StoreError("the store is closed")
        self._started = True
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, read)

    def _call(self, read: Callable[[_C], _T]) -> _T:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            return read(conn)
        finally:
            if not self._closed and self._usable(conn):
                with self._lock:
                    self._idle.append(conn)
            else:
                _close(conn)

    async def close(self) -> None:
        """Waits for the reads under way, then closes every connection."""
        self._closed = True
        if self._started:
            await asyncio.to_thread(self._shutdown)
        else:
            self._executor.shutdown()  # no thread, no connection: nothing to wait for

    def _shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)


def _close(conn: Closable) -> None:
    with contextlib.suppress(Exception):  # closing what may be broken already
        conn.close()
