"""The loopback server's maildrops, and their messages as the server serves them.

A ``Mailbox`` is mail held in memory between sessions: what the demo's samples and the
tests' scripted server deliver, and what a session's QUIT expunges. ``served_chunks`` turns
a message into its form on the wire (CRLF line ends, dot-stuffed, in bounded pieces), and
``served_size`` counts its octets for LIST without building it. The protocol that uses them
is server.py's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

CHUNK = 64 * 1024  # RETR is written and drained in pieces of this size: memory stays bounded


@dataclass(eq=False)
class Mailbox:
    """One maildrop. Append mail with ``add`` (or to ``messages``) between sessions."""

    user: str
    password: str
    messages: list[bytes] = field(default_factory=list)
    uidls: list[str] | None = None  # default: sha256 of a per-mailbox serial + content
    aliases: tuple[str, ...] = ()  # other login names, e.g. ("recent:dana@example.com",)
    deleted_total: int = 0  # messages expunged at QUIT, over all sessions
    # Kept by the sessions (server.py), not by callers: serial keys identify messages across
    # sessions (numbers are per session, content may repeat), and the lock.
    _keys: list[int] = field(default_factory=list, init=False, repr=False)
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


def served_size(raw: bytes) -> int:
    """Octets of ``raw`` as served: CRLF-normalised, an unterminated last line ended by CRLF."""
    bare_lf = raw.count(b"\n") - raw.count(b"\r\n")
    tail = 0 if not raw or raw.endswith(b"\n") else 1 if raw.endswith(b"\r") else 2
    return len(raw) + bare_lf + tail


def served_chunks(raw: bytes, body_lines: int | None = None) -> Iterator[bytes]:
    """``raw`` CRLF-normalised and dot-stuffed, in pieces of about ``CHUNK`` octets.

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
            take = min(stop - start, CHUNK)
            buf += view[start : start + take]
            start += take
            if len(buf) >= CHUNK:
                yield bytes(buf)
                buf.clear()
        buf += b"\r\n"
        if len(buf) >= CHUNK:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)


@dataclass
class Entry:
    """A message as one session lists it."""

    key: int
    raw: bytes
    uidl: str
    size: int
