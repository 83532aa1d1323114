"""The POP3 wire under the session: ``poplib`` with our line rules, CAPA parsing, and the
streaming of a multi-line reply (dot-unstuffed) into a sink. Only this package touches
``poplib``; everything here runs in the session's worker thread.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import poplib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, cast

from mailingest.errors import ProtocolError, StoreError, TemporaryError
from mailingest.masking import mask_text

#: A status line (``+OK``/``-ERR``) longer than this is a protocol error (the contract's 64 KiB).
MAX_STATUS_LINE = 64 * 1024
#: Message lines of any length are read in chunks of at most this many bytes.
READ_CHUNK = 64 * 1024
#: What one read from the socket may take (io's default is 8 KiB): a window of pipelined
#: RETRs arrives faster than 8 KiB reads drain it, and every read is a trip out of the GIL
#: and back into it (two with a timeout: poll, then recv), which 64 worker threads pay for
#: in contention. P3: 9,200 reads of the POP3 sockets -> 5,500, futex calls 183k -> 115k.
READ_BUFFER = 64 * 1024
_CODE = re.compile(rb"^-ERR\s*\[([A-Za-z0-9/-]+)\]")

#: The longest LOGIN-DELAY honoured (seconds).
MAX_LOGIN_DELAY = 24 * 3600

Sink = Callable[[bytes], object]


def response_code(reply: bytes) -> str | None:
    """The RFC 2449 response code of an ``-ERR`` line (``AUTH``, ``IN-USE``...), upper-cased."""
    match = _CODE.match(reply)
    return match.group(1).decode("ascii").upper() if match else None


def reply_text(reply: bytes, secrets: Iterable[str] = ()) -> str:
    """A reply quoted in an error: the secrets masked first (a server may echo the command
    it refuses, "-ERR unknown command PASS ..."), as errors reach stdout and the store, which
    the log redaction does not cover; then cut to 200 characters."""
    text = reply.decode("utf-8", "replace")
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text[:200].strip()


def quoted(data: bytes, secrets: Iterable[str] = (), limit: int = 80) -> str:
    """A server line quoted in an error: the repr of its first ``limit`` bytes, with
    ``secrets``, the secrets the logs know and PASS/AUTH arguments masked before the cut (a
    cut secret matches no mask; a server out of step may echo our PASS anywhere)."""
    text = data.decode("utf-8", "surrogateescape")  # bytes that are not UTF-8 kept as they are
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return repr(mask_text(text).encode("utf-8", "surrogateescape")[:limit])


class BoundedLines(poplib.POP3):
    """poplib with our line rules: status lines up to 64 KiB, ``+OK`` required, EOF typed."""

    #: The password, or the access token and the SASL response that carries it: masked in
    #: quoted replies; set before the login.
    secrets: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            # poplib reads the greeting in __init__ and leaves its socket open if that fails
            # (drop, timeout, garbage): nobody else holds the object to close it.
            with contextlib.suppress(AttributeError, OSError):
                self.close()
            raise

    @property
    def file(self) -> BinaryIO:
        return self._file

    @file.setter
    def file(self, made: BinaryIO) -> None:
        # poplib sets it right after making it over the socket (connect, STLS), before any
        # read: the same socket's reader is made again with a larger buffer. Detached, the
        # first one can no longer close the socket's reader when it is collected.
        if isinstance(made, io.BufferedReader):
            made = cast(BinaryIO, io.BufferedReader(made.detach(), READ_BUFFER))
        self._file = made

    def _getline(self) -> tuple[bytes, int]:
        line = self.file.readline(MAX_STATUS_LINE + 1)
        if len(line) > MAX_STATUS_LINE:
            raise ProtocolError(f"server sent a line over {MAX_STATUS_LINE} bytes")
        if not line:
            raise TemporaryError("connection closed by the server")
        if line.endswith(b"\r\n"):
            return line[:-2], len(line)
        if line.endswith(b"\n"):
            return line[:-1], len(line)
        # No line end: EOF in the middle of a line.
        raise TemporaryError("connection closed in the middle of a line")

    def command(self, line: str) -> bytes:
        """Send one command and read its status line (poplib's own helper is private)."""
        self.sock.sendall(line.encode("utf-8") + b"\r\n")
        return self._getresp()

    def continuation(self, line: str) -> bytes:
        """Send one SASL step; the reply is ``+OK`` (done) or a ``+`` challenge (go on)."""
        self.sock.sendall(line.encode("ascii") + b"\r\n")
        resp, _ = self._getline()
        if resp.startswith(b"+OK") or resp == b"+" or resp.startswith(b"+ "):
            return resp
        if resp.startswith(b"-ERR"):
            raise poplib.error_proto(resp)
        raise ProtocolError(f"malformed reply {reply_text(resp, self.secrets)!r}")

    def longresp(self) -> list[bytes]:
        """Status line, then the lines of a multi-line reply (dot-unstuffed, no line ends)."""
        self._getresp()
        lines: list[bytes] = []
        while True:
            line, _ = self._getline()
            if line == b".":
                return lines
            lines.append(line[1:] if line.startswith(b"..") else line)

    def _getresp(self) -> bytes:
        resp, _ = self._getline()
        if resp.startswith(b"+OK"):
            return resp
        if resp.startswith(b"-ERR"):
            raise poplib.error_proto(resp)
        # poplib accepts any "+..." (even "+ERR"); a reply that is neither is not success.
        raise ProtocolError(f"malformed reply {reply_text(resp, self.secrets)!r}")


class PlainPOP3(BoundedLines):
    pass


class SSLPOP3(BoundedLines, poplib.POP3_SSL):
    pass


@dataclass
class Capabilities:
    """CAPA as seen before and after login; ``None`` when the server has no CAPA."""

    names: dict[str, list[str]] | None = None
    extra: dict[str, list[str]] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        merged = {**(self.names or {}), **self.extra}
        return name.upper() in merged

    def arg(self, name: str) -> list[str]:
        merged = {**(self.names or {}), **self.extra}
        return merged.get(name.upper(), [])

    def listing(self) -> list[str]:
        merged = {**(self.names or {}), **self.extra}
        return sorted(" ".join([k, *v]) for k, v in merged.items())

    @property
    def login_delay(self) -> int | None:
        args = self.arg("LOGIN-DELAY")
        if not args or not (args[0].isascii() and args[0].isdigit()):
            return None
        # Bounded: a value past datetime's range ("LOGIN-DELAY 99999999999999") crashed the
        # cycle; past a day it is a server bug, and a day between logins still honours it.
        return min(int(args[0]), MAX_LOGIN_DELAY)


def capa_lines(pop: BoundedLines) -> dict[str, list[str]] | None:
    """The reply to CAPA by name (upper-cased) and arguments; ``None`` for ``-ERR``
    (popa3d and others have no CAPA: the basics then), a one-line reply that leaves any
    pipelined replies after it in step."""
    try:
        lines = pop.longresp()
    except poplib.error_proto:
        return None
    names: dict[str, list[str]] = {}
    for line in lines:
        try:
            name, *args = line.decode("ascii").split()
        except (UnicodeDecodeError, ValueError) as exc:  # non-ASCII, or an empty line
            raise ProtocolError(f"malformed CAPA reply: {exc}") from exc
        names[name.upper()] = args
    return names


def sasl_error(reply: bytes) -> str:
    """The error a server's SASL challenge carries (base64 JSON: status, schemes, scope)."""
    raw = reply[1:].strip()
    try:
        data = json.loads(base64.b64decode(raw, validate=True))
    except (ValueError, binascii.Error):
        data = None
    if isinstance(data, dict):
        return ", ".join(f"{k}={v}" for k, v in data.items() if isinstance(v, str | int))[:200]
    return "the server refused the token"


def parse_pair(line: bytes, account: str, what: str) -> tuple[int, str]:
    parts = line.split()
    if len(parts) < 2 or not parts[0].isdigit():
        raise ProtocolError(f"malformed {what} line {quoted(line)}", account=account)
    try:
        return int(parts[0]), parts[1].decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"non-ASCII {what} id {quoted(parts[1])}", account=account) from exc


def stream_body(pop: BoundedLines, sink: Sink) -> None:
    """Copy one multi-line body to ``sink``: dot-unstuffed, every line end CRLF.

    The whole lines already buffered are handled together (a few bytes operations per
    buffer instead of a Python loop per line: per-line work was a tenth of a fleet fetch's
    CPU). A line that is not yet whole in the buffer is read in chunks of at most
    READ_CHUNK bytes, so a multi-megabyte line never sits in memory whole and poplib's
    2048-byte limit does not apply. The sink gets pieces of about READ_CHUNK: a sink call
    per line (hash, spool write) cost more than reading the line.
    """
    file = cast(io.BufferedReader, pop.file)  # makefile("rb") gives one
    at_line_start = True
    pending_cr = False  # the previous chunk ended with CR, its LF may come next
    parts: list[bytes] = []
    gathered = 0
    while True:
        if at_line_start:
            # Bytes already read from the socket (one read if none): never past the reply.
            # At most half a chunk: made CRLF, bare LFs can double it.
            buffered = file.peek(READ_CHUNK)[: READ_CHUNK // 2]
            whole = buffered.rfind(b"\n") + 1
            if whole:
                taken, lines, done = _whole_lines(buffered[:whole])
                file.read(taken)  # from the buffer, no system call
                if lines:
                    parts.append(lines)
                    gathered += len(lines)
                if done:
                    break
                if gathered >= READ_CHUNK:
                    _to_sink(sink, parts)
                    parts, gathered = [], 0
                continue
        chunk = file.readline(READ_CHUNK)
        if not chunk:
            raise TemporaryError("connection closed in the middle of a message")
        if at_line_start:
            if chunk in (b".\r\n", b".\n"):
                break
            if chunk.startswith(b"."):
                chunk = chunk[1:]
        if chunk.endswith(b"\n"):
            if not (chunk.endswith(b"\r\n") or (chunk == b"\n" and pending_cr)):
                chunk = chunk[:-1] + b"\r\n"
            at_line_start = True
            pending_cr = False
        else:
            at_line_start = False
            pending_cr = chunk.endswith(b"\r")
        parts.append(chunk)
        gathered += len(chunk)
        if gathered >= READ_CHUNK:
            _to_sink(sink, parts)
            parts, gathered = [], 0
    if parts:
        _to_sink(sink, parts)


_BARE_LF = re.compile(rb"(?<!\r)\n")


def _whole_lines(block: bytes) -> tuple[int, bytes, bool]:
    """Whole lines from a line start, up to the terminator line if it is among them:
    (bytes taken from the wire, the lines as stored, whether the terminator was taken).

    Stored means without the first dot of a line that starts with one (RFC 1939
    byte-stuffing) and with every bare LF made CRLF. Such lines are rare apart from the
    terminator, so one search finds them; the line ends are checked with two counts.
    """
    stuffed: list[int] = []  # where the stuffing dots are
    dot = 0 if block.startswith(b".") else _line_start(block.find(b"\n."))
    while dot >= 0:
        after = block[dot + 1 : dot + 3]
        if after == b"\r\n" or after.startswith(b"\n"):  # the "." line: the reply's end
            lines = _stored(block, stuffed, dot)
            return dot + (3 if after == b"\r\n" else 2), lines, True
        stuffed.append(dot)
        dot = _line_start(block.find(b"\n.", dot))
    return len(block), _stored(block, stuffed, len(block)), False


def _line_start(newline: int) -> int:
    return newline + 1 if newline >= 0 else -1


def _stored(block: bytes, stuffed: list[int], end: int) -> bytes:
    """``block[:end]`` without the bytes at ``stuffed``, bare LFs made CRLF."""
    if stuffed:
        bounds = zip(stuffed, [*stuffed[1:], end], strict=True)
        lines = b"".join([block[: stuffed[0]], *(block[a + 1 : b] for a, b in bounds)])
    else:
        lines = block[:end]
    if lines.count(b"\n") != lines.count(b"\r\n"):
        lines = _BARE_LF.sub(b"\r\n", lines)
    return lines


def _to_sink(sink: Sink, parts: list[bytes]) -> None:
    try:
        sink(b"".join(parts))
    except OSError as exc:
        raise StoreError(f"cannot spool the message: {exc.strerror or exc}") from exc
