"""Scripted loopback POP3 server: sample mail for ``mailingest demo``, fault injection for tests.

Real servers drop connections, hang, lie in CAPA and lock mailboxes; this server does each on
request (see ``Faults``) so the client's handling of it is tested against real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")
_CHUNK = 64 * 1024  # RETR is written and drained in pieces of this size: memory stays bounded
_MAX_LINE = 4096  # RFC 2449 caps a command at 255 octets; generous, but bounded
_MAX_LOG = 100_000  # oldest log entries are dropped beyond this
_MAX_LOG_ENTRY = 200
_TRANSACTION = {"STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP"}


@dataclass(eq=False)
class Mailbox:
    """One maildrop. Append mail with ``add`` (or to ``messages``) between sessions."""

    user: str
    password: str
    messages: list[bytes] = field(default_factory=list)
    uidls: list[str] | None = None  # default: sha256 of a per-mailbox serial + content
    aliases: tuple[str, ...] = ()  # other login names, e.g. ("recent:dana@example.com",)
    deleted_total: int = 0  # messages expunged at QUIT, over all sessions
    # Serial keys identify messages across sessions: numbers are per session, content may repeat.
    _keys: list[int] = field(default_factory=list, init=False, repr=False)
    _hidden: set[int] = field(default_factory=set, init=False, repr=False)
    _last_login: float | None = field(default=None, init=False, repr=False)
    _locked_by: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.uidls is not None and len(self.uidls) != len(self.messages):
            raise ValueError(
                f"mailbox {self.user!r}: {len(self.uidls)} uidls for {len(self.messages)} messages"
            )
        self._sync()

    def __repr__(self) -> str:
        return (
            f"Mailbox(user={self.user!r}, aliases={self.aliases!r}, "
            f"messages={len(self.messages)}, deleted_total={self.deleted_total})"
        )

    def remaining(self) -> int:
        """Messages still on the server (not expunged)."""
        return len(self.messages)

    def add(self, message: bytes, uidl: str | None = None) -> None:
        """Deliver one more message, as new mail arriving between sessions."""
        self._sync()
        self.messages.append(message)
        if uidl is not None and self.uidls is not None:
            self.uidls.append(uidl)

    def _sync(self) -> None:
        """Give messages appended directly to ``messages`` a key and a default UIDL."""
        if self.uidls is None:
            self.uidls = []
        while len(self._keys) < len(self.messages):
            self._keys.append(self._keys[-1] + 1 if self._keys else 0)
        for i in range(len(self.uidls), len(self.messages)):
            digest = hashlib.sha256(f"{self._keys[i]}:".encode() + self.messages[i])
            self.uidls.append(digest.hexdigest()[:40])

    def _expunge(self, keys: set[int]) -> int:
        """Remove messages by key (the UPDATE state); returns how many were still here."""
        assert self.uidls is not None
        keep = [i for i, k in enumerate(self._keys) if k not in keys]
        removed = len(self._keys) - len(keep)
        self.messages[:] = [self.messages[i] for i in keep]
        self.uidls[:] = [self.uidls[i] for i in keep]
        self._keys[:] = [self._keys[i] for i in keep]
        self.deleted_total += removed
        return removed


def _default_capa() -> list[str]:
    return ["TOP", "USER", "UIDL", "PIPELINING", "RESP-CODES"]


@dataclass
class Faults:
    """What this server does wrong, each imitating a fault real POP3 servers show.

    Command keys match case-insensitively by whole words: "RETR 3" matches "retr 3" but not
    "RETR 30"; "DELE" matches every DELE. The longest matching key wins.
    """

    capa: list[str] | None = field(default_factory=_default_capa)  # None: CAPA is unknown
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
    reply_override: dict[str, bytes] = field(default_factory=dict)  # raw reply; effect kept
    per_session: Callable[[int], Faults] | None = None  # faults for the Nth connection
    in_use_lock: bool = True  # a second concurrent login gets -ERR [IN-USE] (RFC 2449)
    # Gmail normal mode: mail RETRieved in a session ended by QUIT is not listed again,
    # except to "recent:" logins.
    hide_retrieved: bool = False


def _matches(command: str, key: str) -> bool:
    want = key.upper().split()
    return command.upper().split()[: len(want)] == want


def _lookup(table: dict[str, _T], command: str) -> _T | None:
    for key in sorted(table, key=len, reverse=True):
        if _matches(command, key):
            return table[key]
    return None


def _served_size(raw: bytes) -> int:
    """Octets of ``raw`` as served: CRLF-normalised, an unterminated last line ended by CRLF."""
    bare_lf = raw.count(b"\n") - raw.count(b"\r\n")
    tail = 0 if not raw or raw.endswith(b"\n") else 1 if raw.endswith(b"\r") else 2
    return len(raw) + bare_lf + tail


def _served_chunks(raw: bytes, body_lines: int | None = None) -> Iterator[bytes]:
    """``raw`` CRLF-normalised and dot-stuffed, in pieces of about ``_CHUNK`` octets.

    ``body_lines`` limits the body to that many lines after the header's blank line (TOP).
    Lines of any length are cut into pieces, so a multi-megabyte line costs no extra memory.
    """
    view, buf, pos, in_body = memoryview(raw), bytearray(), 0, False
    while pos < len(raw):
        eol = raw.find(b"\n", pos)
        start, eol = pos, len(raw) if eol < 0 else eol
        stop, pos = eol - 1 if eol > start and raw[eol - 1] == 0x0D else eol, eol + 1
        if in_body:
            if body_lines is not None:
                if body_lines == 0:
                    break
                body_lines -= 1
        elif start == stop:
            in_body = True
        if start < stop and raw[start] == 0x2E:
            buf += b"."
        while start < stop:
            take = min(stop - start, _CHUNK)
            buf += view[start : start + take]
            start += take
            if len(buf) >= _CHUNK:
                yield bytes(buf)
                buf.clear()
        buf += b"\r\n"
        if len(buf) >= _CHUNK:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


@dataclass
class _Entry:
    key: int
    raw: bytes
    uidl: str
    size: int


class _Session:
    """One client connection: AUTHORIZATION, then TRANSACTION, then UPDATE on QUIT only."""

    def __init__(
        self,
        server: Pop3TestServer,
        number: int,
        faults: Faults,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server, self.number, self.faults = server, number, faults
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.user: str | None = None
        self.box: Mailbox | None = None
        self.recent = False
        self.entries: list[_Entry] = []
        self.deleted: set[int] = set()  # 0-based indices into entries
        self.retrieved: set[int] = set()  # keys
        self.tls = False  # until a handshake (implicit TLS or STLS) completes
        self.mute = False

    async def run(self) -> None:
        if self.faults.drop_before_greeting:
            return
        await self._reply(self.faults.greeting)
        while (line := await self._readline()) is not None:
            if not await self._dispatch(line.decode("utf-8", "replace")):
                return

    def release(self) -> None:
        if self.box is not None and self.box._locked_by == self.number:
            self.box._locked_by = None

    async def _readline(self) -> bytes | None:
        """A line without its terminator; None at EOF. Own buffer, so PASS can drop the rest."""
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > _MAX_LINE:
                await self._reply("-ERR line too long")
                return None
            async with asyncio.timeout(self.server.idle_timeout):  # RFC 1939 autologout
                chunk = await self.reader.read(_CHUNK)
            if not chunk:
                return None
            self.buf += chunk
        line = bytes(self.buf[:end]).removesuffix(b"\r")
        del self.buf[: end + 1]
        return line

    async def _send(self, data: bytes) -> None:
        if not self.mute:
            self.writer.write(data)
            await self.writer.drain()

    async def _reply(self, line: str) -> bool:
        await self._send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return True

    async def _multi(self, status: str, lines: Iterable[str]) -> bool:
        body = "".join(("." + s if s.startswith(".") else s) + "\r\n" for s in lines)
        return await self._reply(status + "\r\n" + body + ".")

    async def _dispatch(self, command: str) -> bool:
        """Apply faults in a fixed order: drop, hang, delay, error, override; then run it."""
        f, verb = self.faults, command.partition(" ")[0].upper()
        self.server._record(self.number, command)
        if verb == "PASS":
            self.server.login_attempts += 1
            if f.pass_same_write_drop:
                self.buf.clear()
        if f.drop_after is not None and _matches(command, f.drop_after):
            return False
        if f.hang_on is not None and _matches(command, f.hang_on):
            with contextlib.suppress(TimeoutError):  # swallow input until EOF or autologout
                async with asyncio.timeout(self.server.idle_timeout):
                    while await self.reader.read(_CHUNK):
                        pass
            return False
        if (seconds := _lookup(f.delay, command)) is not None:
            await asyncio.sleep(seconds)
        if (err := _lookup(f.err_on, command)) is not None:
            await self._reply(err)
            return verb != "QUIT"
        override = _lookup(f.reply_override, command)
        self.mute = override is not None
        try:
            keep = await self._execute(verb, command[len(verb) + 1 :])
        finally:
            self.mute = False
        if override is not None:
            await self._send(override)
        return keep

    async def _execute(self, verb: str, arg: str) -> bool:
        f, known = self.faults, {"USER", "PASS", "STLS", "UTF8", "CAPA", "QUIT", *_TRANSACTION}
        if (
            verb not in known
            or (verb == "CAPA" and f.capa is None)
            or (verb == "UTF8" and not f.utf8)
            or (verb == "STLS" and self.server.ssl_context is None)
        ):
            return await self._reply("-ERR unknown command")
        if verb == "CAPA":
            return await self._capa()
        if verb == "QUIT":
            return await self._quit()
        if (self.box is not None) != (verb in _TRANSACTION):
            return await self._reply("-ERR command not valid in this state")
        if verb == "UTF8":
            return await self._reply("+OK UTF8 enabled")
        if verb == "STLS":
            return await self._stls()
        if verb == "USER":
            if f.require_stls and not self.tls:
                return await self._reply("-ERR [SYS/PERM] STLS required first")
            self.user = arg
            return await self._reply("+OK send PASS")
        if verb == "PASS":
            return await self._pass(arg)
        return await self._transaction(verb, arg)

    async def _capa(self) -> bool:
        caps = list(self.faults.capa or [])
        if self.server.ssl_context is not None and not self.tls and not self.box:
            caps.append("STLS")
        if self.faults.login_delay is not None:
            caps.append(f"LOGIN-DELAY {self.faults.login_delay}")
        if self.faults.utf8 and "UTF8" not in caps:
            caps.append("UTF8")
        return await self._multi("+OK Capability list follows", caps)

    async def _stls(self) -> bool:
        if self.tls:
            return await self._reply("-ERR already under TLS")
        await self._reply("+OK begin TLS negotiation")
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.server.idle_timeout):
                    while await self.reader.read(_CHUNK):
                        pass
        return False

    async def _pass(self, arg: str) -> bool:
        """Checks in the order real servers do: password, LOGIN-DELAY, then the lock."""
        if self.user is None:
            return await self._reply("-ERR USER first")
        name, self.user = self.user, None
        box, now, f = self.server._logins.get(name), self.server.clock(), self.faults
        if box is None or box.password != arg:
            return await self._reply("-ERR [AUTH] invalid login")
        last = box._last_login
        if f.login_delay is not None and last is not None and now - last < f.login_delay:
            return await self._reply("-ERR [LOGIN-DELAY] wait")
        if f.in_use_lock:
            if box._locked_by is not None:
                return await self._reply("-ERR [IN-USE] mailbox locked")
            box._locked_by = self.number
        box._last_login, self.box = now, box
        self.recent = name.lower().startswith("recent:")
        self.server.sessions += 1
        box._sync()
        assert box.uidls is not None
        hidden = box._hidden if f.hide_retrieved and not self.recent else set()
        self.entries = [
            _Entry(k, m, u, _served_size(m))
            for k, m, u in zip(box._keys, box.messages, box.uidls, strict=True)
            if k not in hidden
        ][: f.max_list]
        return await self._reply(self._maildrop())

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
            return await self._reply("+OK")
        if verb == "STAT":
            return await self._reply("+OK {} {}".format(*self._totals()))
        if verb == "RSET":
            self.deleted.clear()
            return await self._reply(self._maildrop())
        if verb in ("LIST", "UIDL") and not arg.strip():
            live = [(i, e) for i, e in enumerate(self.entries) if i not in self.deleted]
            lines = [f"{i + 1} {e.size if verb == 'LIST' else e.uidl}" for i, e in live]
            return await self._multi(f"+OK {len(live)} messages", lines)
        i = self._msg(arg)
        if isinstance(i, str):
            return await self._reply(i)
        entry, parts = self.entries[i], arg.split()
        if verb in ("LIST", "UIDL"):
            return await self._reply(f"+OK {i + 1} {entry.size if verb == 'LIST' else entry.uidl}")
        if verb == "DELE":
            self.deleted.add(i)
            return await self._reply(f"+OK message {i + 1} deleted")
        if verb == "TOP":
            if len(parts) != 2 or not parts[1].isdigit():
                return await self._reply("-ERR usage: TOP msg n")
            await self._reply("+OK top of message follows")
            for chunk in _served_chunks(entry.raw, int(parts[1])):
                await self._send(chunk)
            return await self._reply(".")
        await self._reply(f"+OK {entry.size} octets")  # RETR
        cut = entry.size // 2 if self.faults.drop_mid_retr == i + 1 else None
        sent = 0
        for chunk in _served_chunks(entry.raw):
            if cut is not None and sent + len(chunk) >= cut:
                await self._send(chunk[: cut - sent])
                await self._hang_up()
                return False
            await self._send(chunk)
            sent += len(chunk)
        self.retrieved.add(entry.key)
        return await self._reply(".")

    async def _hang_up(self) -> None:
        """Close our side (FIN) and wait for the client to go. A close with pipelined
        commands still unread would be a reset, which discards what the client has not yet
        read, and the drop would cut more than the message it is meant to."""
        if not self.writer.can_write_eof():
            return
        self.writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.server.idle_timeout):
                while await self.reader.read(_CHUNK):
                    pass

    async def _quit(self) -> bool:
        """UPDATE state: only a QUIT expunges; a dropped connection deletes nothing."""
        if self.box is None:
            await self._reply("+OK bye")
            return False
        removed = self.box._expunge({self.entries[i].key for i in self.deleted})
        if self.faults.hide_retrieved and not self.recent:
            self.box._hidden |= self.retrieved
        await self._reply(f"+OK bye ({removed} messages deleted)")
        return False


class Pop3TestServer:
    """The server; ``log``, ``sessions`` and the mailboxes tell a test what the client did."""

    def __init__(
        self,
        mailboxes: Iterable[Mailbox],
        faults: Faults | None = None,
        *,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        idle_timeout: float = 600.0,
        max_clients: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if implicit_tls and ssl_context is None:
            raise ValueError("implicit_tls needs an ssl_context")
        self.mailboxes = list(mailboxes)
        self.faults = faults if faults is not None else Faults()
        self.host, self.port = host, 0
        self.ssl_context, self.implicit_tls = ssl_context, implicit_tls
        self.idle_timeout, self.max_clients, self.clock = idle_timeout, max_clients, clock
        self.log: list[str] = []
        self.sessions = 0  # successful logins
        self.login_attempts = 0  # PASS commands received
        self.connections = 0
        self.errors: list[BaseException] = []  # server bugs, kept for the test to see
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
            f"Pop3TestServer(host={self.host!r}, port={self.port}, "
            f"mailboxes={[b.user for b in self.mailboxes]}, sessions={self.sessions})"
        )

    async def start(self, port: int = 0) -> int:
        """Listen (port 0: a free one) and return the bound port."""
        # Implicit TLS is started per connection (``_serve``), so faults can break it.
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

    async def __aenter__(self) -> Pop3TestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def mailbox(self, user: str) -> Mailbox:
        """The mailbox a login name (user or alias) opens."""
        return self._logins[user]

    def commands_seen(self, name: str) -> int:
        """How many received commands match ``name`` ("RETR", "RETR 3"), over all sessions."""
        return sum(_matches(entry.partition(": ")[2], name) for entry in self.log)

    def _record(self, number: int, command: str) -> None:
        verb = command.partition(" ")[0].upper()
        if verb in ("PASS", "AUTH"):
            command = f"{verb} ***"  # never keep secrets, even a test's
        self.log.append(f"{number}: {command[:_MAX_LOG_ENTRY]}")
        if len(self.log) > _MAX_LOG:
            del self.log[: len(self.log) - _MAX_LOG]

    def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Our own task, not the one asyncio would make for a coroutine callback: stop() cancels
        # these, and Python 3.11 logs an error for a cancelled callback task.
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number, self.connections = self.connections, self.connections + 1
        base = self.faults
        faults = base.per_session(number) if base.per_session else base
        session = _Session(self, number, faults, reader, writer)
        try:
            if self.implicit_tls and not await session.start_tls():
                return
            if len(self._tasks) > self.max_clients:
                writer.write(b"-ERR [SYS/TEMP] too many connections\r\n")
            else:
                await session.run()
        except (ConnectionError, TimeoutError, ssl.SSLError):
            pass  # client gone or autologout: no UPDATE state, nothing is expunged
        except Exception as exc:
            self.errors.append(exc)
        finally:
            session.release()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)


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
