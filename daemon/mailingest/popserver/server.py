"""The loopback server's protocol: one session per connection, and the listener that starts them.

RFC 1939 as the demo's client uses it: CAPA (with PIPELINING and RESP-CODES), USER/PASS, STAT,
LIST, UIDL, RETR, TOP, DELE, RSET, NOOP and QUIT, an exclusive lock per mailbox, and an UPDATE
state that only QUIT reaches. The test suite's scripted server subclasses it to inject faults.
The mail it serves, and its form on the wire, are mailbox.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any, Self

from mailingest.popserver.mailbox import CHUNK, Entry, Mailbox, served_chunks, served_size

__all__ = ["CAPABILITIES", "TRANSACTION", "LoopbackPop3Server", "LoopbackSession"]

_MAX_LINE = 4096  # RFC 2449 caps a command at 255 octets; generous, but bounded
CAPABILITIES = ("TOP", "USER", "UIDL", "PIPELINING", "RESP-CODES")
TRANSACTION = frozenset({"STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP"})
_KNOWN = TRANSACTION | {"USER", "PASS", "CAPA", "QUIT"}


class LoopbackSession:
    """One client connection: AUTHORIZATION, then TRANSACTION, then UPDATE on QUIT only.

    The public methods are the steps a subclass may extend (the tests' fault injection).
    """

    greeting = "+OK mailingest loopback server ready"

    def __init__(
        self,
        server: LoopbackPop3Server,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server, self.number = server, number
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.user: str | None = None  # the name USER gave, until PASS
        self.login: str | None = None  # the name that opened the mailbox
        self.box: Mailbox | None = None
        self.entries: list[Entry] = []
        self.deleted: set[int] = set()  # 0-based indices into entries

    async def open(self) -> bool:
        """Set-up before the greeting; False closes the connection."""
        return True

    async def run(self) -> None:
        await self.reply(self.greeting)
        while (line := await self._readline()) is not None:
            if not await self.dispatch(line.decode("utf-8", "replace")):
                return

    def release(self) -> None:
        if self.box is not None and self.box._locked_by == self.number:
            self.box._locked_by = None

    async def _readline(self) -> bytes | None:
        """A line without its terminator; None at EOF. Own buffer, so a subclass may drop it."""
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > _MAX_LINE:
                await self.reply("-ERR line too long")
                return None
            async with asyncio.timeout(self.server.idle_timeout):  # RFC 1939 autologout
                chunk = await self.reader.read(CHUNK)
            if not chunk:
                return None
            self.buf += chunk
        line = bytes(self.buf[:end]).removesuffix(b"\r")
        del self.buf[: end + 1]
        return line

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, line: str) -> bool:
        await self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return True

    async def _multi(self, status: str, lines: Iterable[str]) -> bool:
        body = "".join(("." + s if s.startswith(".") else s) + "\r\n" for s in lines)
        return await self.reply(status + "\r\n" + body + ".")

    async def dispatch(self, command: str) -> bool:
        """Answer one command line; False ends the session."""
        verb = command.partition(" ")[0].upper()
        return await self.execute(verb, command[len(verb) + 1 :])

    def knows(self, verb: str) -> bool:
        """Whether ``verb`` is a command of this server (else "-ERR unknown command")."""
        return verb in _KNOWN

    def capabilities(self) -> list[str]:
        return list(CAPABILITIES)

    async def execute(self, verb: str, arg: str) -> bool:
        if not self.knows(verb):
            return await self.reply("-ERR unknown command")
        if verb == "CAPA":
            return await self._multi("+OK Capability list follows", self.capabilities())
        if verb == "QUIT":
            return await self.quit()
        if (self.box is not None) != (verb in TRANSACTION):
            return await self.reply("-ERR command not valid in this state")
        if verb in TRANSACTION:
            return await self._transaction(verb, arg)
        return await self.authorization(verb, arg)

    async def authorization(self, verb: str, arg: str) -> bool:
        """A command of the AUTHORIZATION state: USER or PASS."""
        if verb == "USER":
            self.user = arg
            return await self.reply("+OK send PASS")
        return await self._pass(arg)

    async def _pass(self, arg: str) -> bool:
        """Checks in the order real servers do: the password, then ``admit`` (the lock)."""
        if self.user is None:
            return await self.reply("-ERR USER first")
        name, self.user = self.user, None
        box = self.server._logins.get(name)
        if box is None or box.password != arg:
            return await self.reply("-ERR [AUTH] invalid login")
        if (refused := self.admit(box)) is not None:
            return await self.reply(refused)
        self.box, self.login = box, name
        self.server.sessions += 1
        box._sync()
        self.entries = self.listing(box)
        return await self.reply(self._maildrop())

    def admit(self, box: Mailbox) -> str | None:
        """Lock the mailbox for this session (None), or the -ERR line that refuses the login."""
        if box._locked_by is not None:
            return "-ERR [IN-USE] mailbox locked"
        box._locked_by = self.number
        return None

    def listing(self, box: Mailbox) -> list[Entry]:
        """The messages this session shows, numbered from 1 in this order."""
        assert box.uidls is not None
        return [
            Entry(k, m, u, served_size(m))
            for k, m, u in zip(box._keys, box.messages, box.uidls, strict=True)
        ]

    def _totals(self) -> tuple[int, int]:
        live = [e for i, e in enumerate(self.entries) if i not in self.deleted]
        return len(live), sum(e.size for e in live)

    def _maildrop(self) -> str:
        return "+OK maildrop has {} messages ({} octets)".format(*self._totals())

    def _msg(self, arg: str) -> int | str:
        """0-based index of a live message number, or the -ERR line."""
        try:
            n = int(arg.split()[0])
        except (ValueError, IndexError):
            return "-ERR invalid message number"
        if not 1 <= n <= len(self.entries):
            return "-ERR no such message"
        if n - 1 in self.deleted:
            return f"-ERR message {n} already deleted"
        assert self.box is not None
        if self.entries[n - 1].key not in self.box._keys:  # another session expunged it
            return f"-ERR message {n} expunged"
        return n - 1

    async def _transaction(self, verb: str, arg: str) -> bool:
        if verb == "NOOP":
            return await self.reply("+OK")
        if verb == "STAT":
            return await self.reply("+OK {} {}".format(*self._totals()))
        if verb == "RSET":
            self.deleted.clear()
            return await self.reply(self._maildrop())
        if verb in ("LIST", "UIDL") and not arg.strip():
            live = [(i, e) for i, e in enumerate(self.entries) if i not in self.deleted]
            lines = [f"{i + 1} {e.size if verb == 'LIST' else e.uidl}" for i, e in live]
            return await self._multi(f"+OK {len(live)} messages", lines)
        i = self._msg(arg)
        if isinstance(i, str):
            return await self.reply(i)
        entry, parts = self.entries[i], arg.split()
        if verb in ("LIST", "UIDL"):
            return await self.reply(f"+OK {i + 1} {entry.size if verb == 'LIST' else entry.uidl}")
        if verb == "DELE":
            self.deleted.add(i)
            return await self.reply(f"+OK message {i + 1} deleted")
        if verb == "TOP":
            if len(parts) != 2 or not parts[1].isdigit():
                return await self.reply("-ERR usage: TOP msg n")
            await self.reply("+OK top of message follows")
            for chunk in served_chunks(entry.raw, int(parts[1])):
                await self.send(chunk)
            return await self.reply(".")
        await self.reply(f"+OK {entry.size} octets")  # RETR
        if not await self.retrieve(i, entry):
            return False
        return await self.reply(".")

    async def retrieve(self, index: int, entry: Entry) -> bool:
        """RETR's message, without the final "."; False: the session ends here."""
        for chunk in served_chunks(entry.raw):
            await self.send(chunk)
        return True

    async def quit(self) -> bool:
        """UPDATE state: only a QUIT expunges; a dropped connection deletes nothing."""
        if self.box is None:
            await self.reply("+OK bye")
            return False
        removed = self.box._expunge({self.entries[i].key for i in self.deleted})
        await self.reply(f"+OK bye ({removed} messages deleted)")
        return False


class LoopbackPop3Server:
    """The server; ``sessions`` and the mailboxes tell what the client did."""

    #: Errors that mean the client went away or was logged out: no UPDATE state, nothing is
    #: expunged; any other error is a server bug, kept in ``errors``.
    client_gone: tuple[type[Exception], ...] = (ConnectionError, TimeoutError)

    def __init__(
        self,
        mailboxes: Iterable[Mailbox],
        *,
        host: str = "127.0.0.1",
        idle_timeout: float = 600.0,
        max_clients: int = 64,
    ) -> None:
        self.mailboxes = list(mailboxes)
        self.host, self.port = host, 0
        self.idle_timeout, self.max_clients = idle_timeout, max_clients
        self.sessions = 0  # successful logins
        self.connections = 0
        self.errors: list[BaseException] = []  # server bugs, kept for the caller to see
        self._logins: dict[str, Mailbox] = {}
        for box in self.mailboxes:
            for name in (box.user, *box.aliases):
                if name in self._logins:
                    raise ValueError(f"login name {name!r} used by two mailboxes")
                self._logins[name] = box
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(host={self.host!r}, port={self.port}, "
            f"mailboxes={[b.user for b in self.mailboxes]}, sessions={self.sessions})"
        )

    async def start(self, port: int = 0) -> int:
        """Listen (port 0: a free one) and return the bound port."""
        self._server = await asyncio.start_server(self._handle, self.host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and close every client connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def mailbox(self, user: str) -> Mailbox:
        """The mailbox a login name (user or alias) opens."""
        return self._logins[user]

    def session(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> LoopbackSession:
        """The session for connection ``number`` (counted from 0)."""
        return LoopbackSession(self, number, reader, writer)

    def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task, not the one asyncio would make for a coroutine callback: stop() cancels
        # these, and Python 3.11 logs an error for a cancelled callback task.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self.connections = self.connections, self.connections + 1
        session = self.session(number, reader, writer)
        try:
            if not await session.open():
                return
            if len(self._tasks) > self.max_clients:
                writer.write(b"-ERR [SYS/TEMP] too many connections\r\n")
            else:
                await session.run()
        except self.client_gone:
            pass
        except Exception as exc:
            self.errors.append(exc)
        finally:
            session.release()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)
