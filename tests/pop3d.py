"""The scripted POP3 server of the tests: the product's loopback server, plus faults.

Real servers drop connections, hang, lie in CAPA and lock mailboxes; this server does each on
request (see ``Faults``) so the client's handling of it is tested against real sockets. The
protocol itself is ``mailingest.popserver``'s; this module only adds what goes wrong, TLS and
a log of the commands received.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pytest

from mailingest.popserver import (
    CAPABILITIES,
    Entry,
    LoopbackPop3Server,
    LoopbackSession,
    Mailbox,
    served_chunks,
)

__all__ = [
    "Faults",
    "Mailbox",
    "Pop3TestServer",
    "Pop3d",
    "Pop3dThreaded",
    "ThreadedPop3Server",
    "first_session",
    "marked_faults",
]

_T = TypeVar("_T")
_CHUNK = 64 * 1024
_MAX_LOG = 100_000  # oldest log entries are dropped beyond this
_MAX_LOG_ENTRY = 200


@dataclass
class Faults:
    """What this server does wrong, each imitating a fault real POP3 servers show.

    Command keys match case-insensitively by whole words: "RETR 3" matches "retr 3" but not
    "RETR 30"; "DELE" matches every DELE. The longest matching key wins.
    """

    capa: list[str] | None = field(default_factory=lambda: list(CAPABILITIES))  # None: unknown
    require_stls: bool = False  # USER/PASS refused before STLS (needs an ssl_context)
    login_delay: int | None = None  # advertised LOGIN-DELAY, and enforced per mailbox
    max_list: int | None = None  # a session shows at most this many (oldest first), as Gmail
    drop_after: str | None = None  # close when this command arrives, before any effect
    drop_mid_retr: int | None = None  # RETR of this number: send half the message, close
    err_on: dict[str, str] = field(default_factory=dict)  # command -> reply line; no effect
    hang_on: str | None = None  # never reply to this command (the client must time out)
    delay: dict[str, float] = field(default_factory=dict)  # command -> seconds before replying
    greeting: str = "+OK mailingest test server ready"
    drop_before_greeting: bool = False
    # Break the TLS handshake (implicit TLS on connect, or after "+OK" to STLS): read the
    # ClientHello, then "drop" (close), "reset" (TCP RST) or answer "garbage" (plaintext).
    tls_handshake: Literal["drop", "reset", "garbage"] | None = None
    pass_same_write_drop: bool = False  # Courier: data read together with PASS is lost
    utf8: bool = False  # advertise UTF8 and accept the UTF8 command
    capa_after_login: list[str] = field(default_factory=list)  # CAPA lines once logged in
    reply_override: dict[str, bytes] = field(default_factory=dict)  # raw reply; effect kept
    per_session: Callable[[int], Faults] | None = None  # faults for the Nth connection
    in_use_lock: bool = True  # a second concurrent login gets -ERR [IN-USE] (RFC 2449)
    # Gmail normal mode: mail RETRieved in a session ended by QUIT is not listed again,
    # except to "recent:" logins.
    hide_retrieved: bool = False


def first_session(faults: Faults, rest: Faults | None = None) -> Faults:
    """``faults`` on the first connection only; later ones get ``rest`` (default: none)."""
    later = rest if rest is not None else Faults()
    return Faults(per_session=lambda n: faults if n == 0 else later)


def _matches(command: str, key: str) -> bool:
    want = key.upper().split()
    return command.upper().split()[: len(want)] == want


def _lookup(table: dict[str, _T], command: str) -> _T | None:
    for key in sorted(table, key=len, reverse=True):
        if _matches(command, key):
            return table[key]
    return None


class _ScriptedSession(LoopbackSession):
    """A loopback session that applies its ``Faults`` around each step."""

    server: Pop3TestServer

    def __init__(
        self,
        server: Pop3TestServer,
        number: int,
        faults: Faults,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        super().__init__(server, number, reader, writer)
        self.faults = faults
        self.greeting = faults.greeting
        self.retrieved: set[int] = set()  # keys
        self.tls = False  # until a handshake (implicit TLS or STLS) completes
        self.mute = False

    @property
    def recent(self) -> bool:
        return self.login is not None and self.login.lower().startswith("recent:")

    async def open(self) -> bool:
        # Implicit TLS is started per connection, not by the listener, so faults can break it.
        return not self.server.implicit_tls or await self.start_tls()

    async def run(self) -> None:
        if not self.faults.drop_before_greeting:
            await super().run()

    async def send(self, data: bytes) -> None:
        if not self.mute:
            await super().send(data)

    async def dispatch(self, command: str) -> bool:
        """Apply faults in a fixed order: drop, hang, delay, error, override; then run it."""
        f, verb = self.faults, command.partition(" ")[0].upper()
        self.server.record(self.number, command)
        if verb == "PASS":
            self.server.login_attempts += 1
            if f.pass_same_write_drop:
                self.buf.clear()
        if f.drop_after is not None and _matches(command, f.drop_after):
            return False
        if f.hang_on is not None and _matches(command, f.hang_on):
            await self._drain()
            return False
        if (seconds := _lookup(f.delay, command)) is not None:
            await asyncio.sleep(seconds)
        if (err := _lookup(f.err_on, command)) is not None:
            await self.reply(err)
            return verb != "QUIT"
        override = _lookup(f.reply_override, command)
        self.mute = override is not None
        try:
            keep = await super().dispatch(command)
        finally:
            self.mute = False
        if override is not None:
            await self.send(override)
        return keep

    def knows(self, verb: str) -> bool:
        if verb == "CAPA":
            return self.faults.capa is not None
        if verb == "UTF8":
            return self.faults.utf8
        if verb == "STLS":
            return self.server.ssl_context is not None
        return super().knows(verb)

    def capabilities(self) -> list[str]:
        caps = list(self.faults.capa or [])
        if self.server.ssl_context is not None and not self.tls and not self.box:
            caps.append("STLS")
        if self.faults.login_delay is not None:
            caps.append(f"LOGIN-DELAY {self.faults.login_delay}")
        if self.faults.utf8 and "UTF8" not in caps:
            caps.append("UTF8")
        if self.box:
            caps += self.faults.capa_after_login
        return caps

    async def authorization(self, verb: str, arg: str) -> bool:
        if verb == "UTF8":
            return await self.reply("+OK UTF8 enabled")
        if verb == "STLS":
            return await self._stls()
        if verb == "USER" and self.faults.require_stls and not self.tls:
            return await self.reply("-ERR [SYS/PERM] STLS required first")
        return await super().authorization(verb, arg)

    def admit(self, box: Mailbox) -> str | None:
        """LOGIN-DELAY before the lock, as real servers check them."""
        now, delay = self.server.clock(), self.faults.login_delay
        last = self.server.last_login.get(box)
        if delay is not None and last is not None and now - last < delay:
            return "-ERR [LOGIN-DELAY] wait"
        if self.faults.in_use_lock and (refused := super().admit(box)) is not None:
            return refused
        self.server.last_login[box] = now
        return None

    def listing(self, box: Mailbox) -> list[Entry]:
        hide = self.faults.hide_retrieved and not self.recent
        hidden = self.server.hidden.get(box, set()) if hide else set()
        listed = [e for e in super().listing(box) if e.key not in hidden]
        return listed[: self.faults.max_list]

    async def retrieve(self, index: int, entry: Entry) -> bool:
        if self.faults.drop_mid_retr == index + 1:
            cut, sent = entry.size // 2, 0
            for chunk in served_chunks(entry.raw):
                if sent + len(chunk) >= cut:
                    await self.send(chunk[: cut - sent])
                    await self._hang_up()
                    return False
                await self.send(chunk)
                sent += len(chunk)
        elif not await super().retrieve(index, entry):
            return False
        self.retrieved.add(entry.key)
        return True

    async def quit(self) -> bool:
        if self.box is not None and self.faults.hide_retrieved and not self.recent:
            self.server.hidden.setdefault(self.box, set()).update(self.retrieved)
        return await super().quit()

    async def _stls(self) -> bool:
        if self.tls:
            return await self.reply("-ERR already under TLS")
        await self.reply("+OK begin TLS negotiation")
        self.buf.clear()  # plaintext sent before the handshake must not count (injection)
        return await self.start_tls()

    async def start_tls(self) -> bool:
        """The server side of the TLS handshake, or its fault; False: the session ends here."""
        assert self.server.ssl_context is not None
        how = self.faults.tls_handshake
        if how is None:
            await self.writer.start_tls(self.server.ssl_context)
            self.tls = True
            return True
        # Read the ClientHello first: closing with it unread would make every fault a reset.
        async with asyncio.timeout(self.server.idle_timeout):
            if not await self.reader.read(_CHUNK):
                return False
        if how == "reset":
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        elif how == "garbage":
            # A plaintext POP3 server where TLS was expected; then wait for the client to go.
            self.writer.write(b"+OK plaintext POP3 server, not TLS\r\n")
            await self.writer.drain()
            await self._drain()
        return False

    async def _drain(self) -> None:
        """Swallow input until EOF or autologout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.server.idle_timeout):
                while await self.reader.read(_CHUNK):
                    pass

    async def _hang_up(self) -> None:
        """Close our side (FIN) and wait for the client to go. A close with pipelined
        commands still unread would be a reset, which discards what the client has not yet
        read, and the drop would cut more than the message it is meant to."""
        if not self.writer.can_write_eof():
            return
        self.writer.write_eof()
        await self._drain()


class Pop3TestServer(LoopbackPop3Server):
    """The scripted server; ``log``, ``sessions`` and the mailboxes tell a test what the client
    did."""

    client_gone = (*LoopbackPop3Server.client_gone, ssl.SSLError)

    def __init__(
        self,
        mailboxes: Iterable[Mailbox],
        faults: Faults | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        if implicit_tls and ssl_context is None:
            raise ValueError("implicit_tls needs an ssl_context")
        super().__init__(mailboxes, **kwargs)
        self.faults = faults if faults is not None else Faults()
        self.ssl_context, self.implicit_tls, self.clock = ssl_context, implicit_tls, clock
        self.log: list[str] = []
        self.login_attempts = 0  # PASS commands received
        self.last_login: dict[Mailbox, float] = {}  # for LOGIN-DELAY
        self.hidden: dict[Mailbox, set[int]] = {}  # keys Gmail normal mode no longer lists

    def session(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _ScriptedSession:
        base = self.faults
        faults = base.per_session(number) if base.per_session else base
        return _ScriptedSession(self, number, faults, reader, writer)

    def commands_seen(self, name: str) -> int:
        """How many received commands match ``name`` ("RETR", "RETR 3"), over all sessions."""
        return sum(_matches(entry.partition(": ")[2], name) for entry in self.log)

    def session_log(self, number: int) -> list[str]:
        """The commands connection ``number`` sent, PASS masked."""
        prefix = f"{number}: "
        return [e.removeprefix(prefix) for e in self.log if e.startswith(prefix)]

    def record(self, number: int, command: str) -> None:
        verb = command.partition(" ")[0].upper()
        if verb in ("PASS", "AUTH"):
            command = f"{verb} ***"  # never keep secrets, even a test's
        self.log.append(f"{number}: {command[:_MAX_LOG_ENTRY]}")
        if len(self.log) > _MAX_LOG:
            del self.log[: len(self.log) - _MAX_LOG]


class ThreadedPop3Server:
    """A ``Pop3TestServer`` on its own event loop in a daemon thread, for sync code and CLIs."""

    def __init__(
        self, mailboxes: Iterable[Mailbox], faults: Faults | None = None, **kwargs: Any
    ) -> None:
        self.server = Pop3TestServer(mailboxes, faults, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    def __enter__(self) -> ThreadedPop3Server:
        return self.start()

    def start(self, port: int = 0) -> ThreadedPop3Server:
        """Start the loop thread and the server; returns once the port is bound."""
        self._loop = loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, daemon=True, name="pop3-test")
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(port), loop).result(10)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close every connection, then end the loop and its thread (bounded waits)."""
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            if not thread.is_alive():
                loop.close()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- for the pop3d fixtures (conftest.py) -----------------------------------------------------


def marked_faults(node: pytest.Item) -> Faults | None:
    """The faults of the test's ``pop3d_faults`` marker: ``Faults`` fields as keywords, or one
    ``Faults`` (e.g. ``first_session(...)``); None without the marker."""
    marker = node.get_closest_marker("pop3d_faults")
    if marker is None:
        return None
    if marker.args:
        [faults] = marker.args
        if not isinstance(faults, Faults) or marker.kwargs:
            raise TypeError("pop3d_faults takes one Faults or Faults fields as keywords")
        return faults
    return Faults(**marker.kwargs)


class Pop3d:
    """Starts scripted POP3 servers (tests/pop3d.py) for one test and stops them after it.

    ``await pop3d(mailboxes, faults, **kw)`` starts a ``Pop3TestServer`` on the test's event
    loop; ``faults`` defaults to the test's ``pop3d_faults`` marker (none: a well-behaved
    server); ``kw`` go to the server (ssl_context, implicit_tls, ...). At the end of the test
    every server is stopped and must have recorded no server error."""

    def __init__(self, marked: Faults | None) -> None:
        self.marked = marked
        self.servers: list[Pop3TestServer] = []

    async def __call__(
        self, mailboxes: Iterable[Mailbox], faults: Faults | None = None, **kw: Any
    ) -> Pop3TestServer:
        server = Pop3TestServer(mailboxes, faults if faults is not None else self.marked, **kw)
        self.servers.append(server)
        await server.start()
        return server

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()
        for server in self.servers:
            assert server.errors == [], server.errors


class Pop3dThreaded:
    """``Pop3d`` for sync tests: each server a ``ThreadedPop3Server``."""

    def __init__(self, marked: Faults | None) -> None:
        self.marked = marked
        self.servers: list[ThreadedPop3Server] = []

    def __call__(
        self, mailboxes: Iterable[Mailbox], faults: Faults | None = None, **kw: Any
    ) -> ThreadedPop3Server:
        server = ThreadedPop3Server(mailboxes, faults if faults is not None else self.marked, **kw)
        self.servers.append(server)
        return server.start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for server in self.servers:
            assert server.server.errors == [], server.server.errors
