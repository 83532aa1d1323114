"""One blocking POP3 session per account (the wire beneath it is in ``wire``).

Every method blocks; callers run them in a worker thread. Every socket has a timeout, so a
worker always finishes. Foreign errors become our typed errors at one boundary
(`_translate`); after an error in the middle of a response the session is marked broken,
its socket closed, and nothing more (no DELE, no QUIT) is ever sent on it.
"""

from __future__ import annotations

import contextlib
import poplib
import socket
import ssl
import threading
from collections.abc import Callable, Generator, Iterable, Iterator

from mailingest.errors import (
    AuthError,
    MailIngestError,
    Pop3Error,
    ProtocolError,
    TemporaryError,
    TLSError,
    UnavailableError,
)
from mailingest.model import Pop3Login
from mailingest.pop3.login import mechanism, sasl, user_pass
from mailingest.pop3.replies import typed_error
from mailingest.pop3.wire import (
    SSLPOP3,
    BoundedLines,
    Capabilities,
    PlainPOP3,
    Sink,
    capa_lines,
    parse_pair,
    quoted,
    reply_text,
    stream_body,
)
from mailingest.tls import client_context

#: RETR commands kept in flight when the server advertises PIPELINING.
PIPELINE_WINDOW = 256
#: DELE commands sent in one write when it does: a reply is one short line, so a window's
#: replies (~10 KiB) fit the socket buffers while the commands are still being written.
DELE_WINDOW = 256


def make_tls_context(login: Pop3Login) -> ssl.SSLContext:
    return client_context(login.ca_file, login.tls_verify)


class Pop3Session:
    """One POP3 session for one account's login. Not thread-safe: one worker thread at a time,
    except that ``close()`` may come from another thread to end a worker's blocked read."""

    def __init__(self, login: Pop3Login) -> None:
        self.login = login
        self.capabilities = Capabilities()
        self.broken = False
        self.mechanism = "USER"  # how the login went: USER (USER/PASS), XOAUTH2, OAUTHBEARER
        self._pop: BoundedLines | None = None
        #: The CAPA after the login is still to be read: it goes out with the first
        #: commands after the login where the server pipelines (a round trip less).
        self._capa_due = False
        self._closing = threading.Lock()  # a worker and close() may discard at once
        self._deleting = False  # a DELE was sent: QUIT's reply then matters

    def __repr__(self) -> str:
        state = "broken" if self.broken else ("open" if self._pop else "closed")
        return f"<Pop3Session {self.login.name} {self.login.host}:{self.login.port} {state}>"

    # -- error boundary -------------------------------------------------------------------

    @contextlib.contextmanager
    def _translate(self, phase: str) -> Iterator[None]:
        """Map socket/TLS/poplib errors to ours; any failure mid-response breaks the session."""
        name = self.login.name
        try:
            yield
        except Pop3Error as exc:
            if exc.account is None:
                exc.account = name
            if not isinstance(exc, AuthError):
                self._discard()
            raise
        except MailIngestError as exc:  # the sink failed (disk full): the reply is unread
            exc.account = exc.account or name
            self._discard()
            raise
        except poplib.error_proto as exc:
            reply = exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""
            raise self._from_err_reply(phase, reply) from exc
        except ssl.SSLCertVerificationError as exc:
            self._discard()
            raise TLSError(f"certificate rejected: {exc.verify_message}", account=name) from exc
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
            # The peer closed the TLS connection (e.g. a write after its drop): a drop, not a
            # TLS failure, so temporary like the same drop over plain TCP.
            self._discard()
            raise TemporaryError(f"connection lost during {phase}: {exc}", account=name) from exc
        except ssl.SSLError as exc:
            self._discard()
            raise TLSError(f"TLS failed during {phase}: {exc.reason or exc}", account=name) from exc
        except TimeoutError as exc:
            self._discard()
            raise TemporaryError(f"timed out during {phase}", account=name) from exc
        except socket.gaierror as exc:
            self._discard()
            raise UnavailableError(
                f"cannot resolve {self.login.host}: {exc}", account=name
            ) from exc
        except (ConnectionRefusedError, OSError) as exc:
            self._discard()
            if phase == "connect" and not isinstance(exc, ConnectionResetError):
                raise UnavailableError(
                    f"cannot connect to {self.login.host}:{self.login.port}: {exc.strerror or exc}",
                    account=name,
                ) from exc
            raise TemporaryError(
                f"connection lost during {phase}: {exc.strerror or exc}", account=name
            ) from exc

    def _from_err_reply(self, phase: str, reply: bytes) -> Pop3Error:
        """Type an ``-ERR`` reply (see replies); one that ends the session drops it."""
        error, drop = typed_error(
            phase,
            reply,
            account=self.login.name,
            login_delay=self.capabilities.login_delay,
            secrets=self._secrets(),
        )
        if drop:
            self._discard()
        return error

    def _discard(self) -> None:
        """Close the socket without QUIT: the server then applies no DELE of this session."""
        with self._closing:
            self.broken = True
            pop, self._pop = self._pop, None
        if pop is not None:
            # Shut the socket down first: a worker thread blocked reading it returns at once,
            # instead of holding the file's lock (and this caller) until its timeout.
            with contextlib.suppress(OSError):
                pop.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                pop.close()

    def _conn(self) -> BoundedLines:
        if self._pop is None or self.broken:
            raise ProtocolError("session is closed", account=self.login.name)
        return self._pop

    # -- session ------------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, secure the channel, read CAPA, log in with USER/PASS, re-read CAPA."""
        login = self.login
        with self._translate("connect"):
            if login.security == "tls":
                self._pop = SSLPOP3(
                    login.host, login.port, context=make_tls_context(login), timeout=login.timeout
                )
            else:
                self._pop = PlainPOP3(login.host, login.port, timeout=login.timeout)
            self._pop.secrets = (login.password(),)
            # Pipelined commands are small writes: Nagle would hold each until the previous
            # one is acknowledged, a round trip per RETR instead of a window of them.
            with contextlib.suppress(OSError):
                self._pop.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.capabilities.names = self._capa("capa")
        if login.security == "starttls":
            self._starttls()
            self.capabilities.names = self._capa("capa")
        self._login()

    def _capa(self, phase: str) -> dict[str, list[str]] | None:
        with self._translate(phase):
            pop = self._conn()
            pop.sock.sendall(b"CAPA\r\n")
            return capa_lines(pop)

    def _starttls(self) -> None:
        login = self.login
        if "STLS" not in (self.capabilities.names or {}):
            self._discard()
            raise TLSError(
                "server does not offer STLS; refusing to continue in plaintext "
                '(set security = "tls" or, on a trusted network, "plain")',
                account=login.name,
            )
        with self._translate("stls"):
            pop = self._conn()
            pop.command("STLS")
            pop.sock = make_tls_context(login).wrap_socket(pop.sock, server_hostname=login.host)
            pop.file = pop.sock.makefile("rb")

    def _login(self) -> None:
        login = self.login
        with self._translate("login"):
            pop = self._conn()
            if login.sasl is None:
                user_pass(pop, login)
            else:
                self.mechanism = mechanism(login, self.capabilities)
                sasl(pop, login, self.mechanism, lambda reply: self._from_err_reply("login", reply))
        if self.capabilities.has("PIPELINING") and not self.capabilities.has("UTF8"):
            # UTF8 offered before the login is sent right after it, as before; one offered
            # only after it goes after LIST, still before any RETR or TOP.
            self._capa_due = True
            return
        self._after_login(self._capa("capa"))

    def _settle(self) -> None:
        """Read the CAPA after the login (RFC 2449: it may differ, e.g. a per-user
        LOGIN-DELAY) unless done, then switch to UTF-8 where offered."""
        if self._capa_due:
            self._capa_due = False
            self._after_login(self._capa("capa"))

    def _after_login(self, after: dict[str, list[str]] | None) -> None:
        if after:
            self.capabilities.extra = after
        self._utf8()

    def _utf8(self) -> None:
        if self.capabilities.has("UTF8"):
            # RFC 6856: without it Courier wraps raw-UTF-8 mail; only sent when advertised.
            with self._translate("utf8"), contextlib.suppress(poplib.error_proto):
                self._conn().command("UTF8")

    def _secrets(self) -> tuple[str, ...]:
        pop = self._pop
        return pop.secrets if pop is not None and pop.secrets else (self.login.password(),)

    def stat(self) -> tuple[int, int]:
        self._settle()
        with self._translate("stat"):
            # Not poplib's stat(): it raises IndexError/ValueError on a reply such as "+OK".
            reply = self._conn().command("STAT")
            parts = reply.split()
            if len(parts) < 3 or not parts[1].isdigit() or not parts[2].isdigit():
                text = reply_text(reply, self._secrets())
                raise ProtocolError(f"malformed STAT reply {text!r}")
        return int(parts[1]), int(parts[2])

    def uidl(self) -> list[tuple[int, str]]:
        """The (message number, unique id) listing; a malformed line is a protocol error."""
        self._settle()
        with self._translate("uidl"):
            _, lines, _ = self._conn().uidl()
        return [parse_pair(line, self.login.name, "UIDL") for line in lines]

    def sizes(self) -> dict[int, int]:
        self._settle()
        with self._translate("list"):
            _, lines, _ = self._conn().list()
        return self._sizes(lines)

    def listing(self) -> tuple[list[tuple[int, str]], dict[int, int]]:
        """UIDL and LIST: in one write where the server pipelines (a round trip less), with
        the CAPA after the login in front of them if it is still due."""
        pipelined = self.capabilities.has("PIPELINING")
        capa_due, self._capa_due = self._capa_due, False
        if pipelined:
            with self._translate("capa" if capa_due else "uidl"):
                pop = self._conn()
                pop.sock.sendall((b"CAPA\r\n" if capa_due else b"") + b"UIDL\r\nLIST\r\n")
                if capa_due:
                    # Kept at once: a per-user LOGIN-DELAY paces the next login even if the
                    # listing fails. A malformed reply breaks the session (replies in flight).
                    after = capa_lines(pop)
                    if after:
                        self.capabilities.extra = after
        try:
            if not pipelined:
                uidls = self.uidl()
            else:
                with self._translate("uidl"):
                    try:
                        lines = pop.longresp()
                    except poplib.error_proto:
                        self._discard()  # LIST's reply is on its way: out of step for good
                        raise
                uidls = [parse_pair(line, self.login.name, "UIDL") for line in lines]
        except ProtocolError as exc:
            raise ProtocolError(
                f"server refused UIDL ({exc.message}); without UIDL there is no safe dedup",
                account=self.login.name,
            ) from exc
        if not pipelined:
            return uidls, self.sizes()
        with self._translate("list"):
            lines = self._conn().longresp()
        if capa_due:
            self._utf8()
        return uidls, self._sizes(lines)

    def _sizes(self, lines: list[bytes]) -> dict[int, int]:
        out: dict[int, int] = {}
        for line in lines:
            num, size = parse_pair(line, self.login.name, "LIST")
            if not size.isdigit():
                text = quoted(line, self._secrets())  # masked before it is cut
                raise ProtocolError(f"malformed LIST line {text}", account=self.login.name)
            out[num] = int(size)
        return out

    def retrieve(
        self, nums: Iterable[int], open_sink: Callable[[int], Sink], *, header_only: bool = False
    ) -> Generator[int, None, None]:
        """RETR each message, streaming its dot-unstuffed CRLF lines into ``open_sink(num)``.

        Yields each number once its message has been fully written to its sink. With
        PIPELINING a window of RETR commands stays in flight; replies are read in order.
        A plain ``-ERR`` to one RETR (a message the server cannot serve) skips that message
        and is raised once the others are read, the session still usable for DELE and QUIT:
        one such message must not hold back every message after it, cycle after cycle.
        ``header_only``: TOP n 0 instead of RETR (the header and the blank line after it).
        """
        self._settle()
        pending = list(nums)
        window = PIPELINE_WINDOW if self.capabilities.has("PIPELINING") else 1
        done = False
        verb = "top" if header_only else "retr"
        with self._translate(verb):
            pop = self._conn()
            try:
                refused = yield from self._retr_window(pop, pending, window, open_sink, verb)
                done = True
            finally:
                if not done:
                    # Stopped early: replies still in flight would desynchronise the session.
                    self._discard()
        if refused:
            raise refused[0]

    def _retr_window(
        self,
        pop: BoundedLines,
        pending: list[int],
        window: int,
        open_sink: Callable[[int], Sink],
        verb: str,
    ) -> Generator[int, None, list[ProtocolError]]:
        sent = 0
        refused: list[ProtocolError] = []
        tail = " 0" if verb == "top" else ""
        for index, num in enumerate(pending):
            upto = min(len(pending), index + window)
            if sent < upto:  # the window's first commands in one write, then one per reply
                pop.sock.sendall(
                    "".join(f"{verb.upper()} {n}{tail}\r\n" for n in pending[sent:upto]).encode()
                )
                sent = upto
            try:
                pop._getresp()
            except poplib.error_proto as exc:
                reply = exc.args[0] if isinstance(exc.args[0], bytes) else b""
                error = self._from_err_reply(f"{verb} {num}", reply)
                if not isinstance(error, ProtocolError) or self.broken:
                    raise error from exc  # [SYS/TEMP], [IN-USE]...: stop and retry later
                refused.append(error)  # a whole one-line reply: the session is in step
                continue
            stream_body(pop, open_sink(num))
            yield num
        return refused

    def delete(self, nums: Iterable[int]) -> None:
        """DELE each message; the server expunges them only at QUIT."""
        self._settle()
        todo = list(nums)
        window = DELE_WINDOW if self.capabilities.has("PIPELINING") else 1
        with self._translate("dele"):
            pop = self._conn()
            self._deleting = self._deleting or bool(todo)
            try:
                for start in range(0, len(todo), window):
                    chunk = todo[start : start + window]
                    pop.sock.sendall(b"".join(f"DELE {n}\r\n".encode("ascii") for n in chunk))
                    for _ in chunk:
                        pop._getresp()
            except poplib.error_proto:
                # Abandon without QUIT: none of this session's DELEs is applied; the next
                # cycle deletes again from the ledger.
                self._discard()
                raise

    def quit(self) -> None:
        """End the session normally: the server expunges DELEted messages now.

        Its ``+OK`` is awaited only after a DELE: then it says the deletions were applied.
        Without one it says nothing we act on, so the socket closes once QUIT is written
        (a round trip less; the server reads QUIT before the end of the stream)."""
        with self._translate("quit"):
            pop = self._conn()
            self._pop = None
            try:
                if self._deleting:
                    pop.quit()
                else:
                    pop.sock.sendall(b"QUIT\r\n")
            finally:
                with contextlib.suppress(OSError):
                    pop.close()

    def close(self) -> None:
        """Abandon the session without QUIT (nothing DELEted is expunged)."""
        self._discard()
