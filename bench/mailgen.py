"""Deterministic synthetic mail, written into Maildirs the way an MDA does (tmp/, then new/).

Messages are stored with LF line ends, as MDAs store them; a POP3 server serves every line
ending CRLF, so the bytes a client must store are ``served(raw)``.
"""

from __future__ import annotations

import hashlib
import os
import random
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path

MEAN_SIZE = 8 * 1024  # bytes of body, exponentially distributed around it
_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua quote invoice meeting proposal"
).split()
_SENDERS = [f"lead{i}@customer{i % 40}.example" for i in range(200)] + [
    "news@list.example",
    "ceo@partner.example",
]


def served(raw: bytes) -> bytes:
    """What a POP3 server serves for an LF-terminated stored message: CRLF line ends."""
    return raw.replace(b"\n", b"\r\n")


def synthetic(rng: random.Random, index: int, user: str) -> bytes:
    """One plain-text message of about MEAN_SIZE bytes (exponential size distribution)."""
    msg = EmailMessage()
    msg["From"] = f"Person {index} <{rng.choice(_SENDERS)}>"
    msg["To"] = f"{user}@crm.example"
    msg["Subject"] = f"Message {index} for {user} " + " ".join(rng.choices(_WORDS, k=5))
    when = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=index)
    msg["Date"] = format_datetime(when)
    msg["Message-ID"] = f"<m{index}.{user}@bench.example>"
    target = max(1, int(rng.expovariate(1 / MEAN_SIZE)))
    lines: list[str] = []
    size = 0
    while size < target:
        line = " ".join(rng.choices(_WORDS, k=10))
        if rng.random() < 0.02:
            line = "." + line  # a line the server must dot-stuff
        lines.append(line)
        size += len(line) + 1
    msg.set_content("\n".join(lines))
    return bytes(msg)


class Maildir:
    """A user's Maildir owned by the mail user (uid/gid taken from the directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        st = path.stat()
        self.uid, self.gid = st.st_uid, st.st_gid
        self._serial = 0

    def _name(self) -> str:
        self._serial += 1
        return f"{1_700_000_000 + self._serial}.M{self._serial}P{os.getpid()}.bench"

    def deliver(self, raw: bytes) -> None:
        name = self._name()
        tmp = self.path / "tmp" / name
        with tmp.open("wb") as handle:
            handle.write(raw)
            os.fchown(handle.fileno(), self.uid, self.gid)
        os.rename(tmp, self.path / "new" / name)

    def deliver_huge(self, size: int) -> tuple[int, str]:
        """Write one message of about ``size`` bytes without holding it in memory.

        Returns the served size and the sha256 of the served bytes (what must be stored).
        """
        name = self._name()
        tmp = self.path / "tmp" / name
        digest = hashlib.sha256()
        total = 0
        head = (
            b"From: Big Sender <big@customer1.example>\nTo: huge@crm.example\n"
            b"Subject: one huge message\nDate: Sun, 01 Nov 2026 00:00:00 +0000\n"
            b"Message-ID: <huge@bench.example>\nContent-Type: text/plain\n\n"
        )
        # 1 KB lines: within every tool's line limit (poplib's is 2048), so all can be compared.
        line = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 28)[:1000] + b"\n"
        block = line * 1024
        with tmp.open("wb") as handle:
            os.fchown(handle.fileno(), self.uid, self.gid)
            for piece in (head, *([block] * max(1, (size - len(head)) // len(block)))):
                handle.write(piece)
                out = served(piece)
                digest.update(out)
                total += len(out)
        os.rename(tmp, self.path / "new" / name)
        return total, digest.hexdigest()


def fill(maildir: Maildir, user: str, count: int, seed: int) -> list[str]:
    """Deliver ``count`` synthetic messages; returns the sha256 of each as served."""
    rng = random.Random(seed)
    hashes = []
    for index in range(count):
        raw = synthetic(rng, index, user)
        maildir.deliver(raw)
        hashes.append(hashlib.sha256(served(raw)).hexdigest())
    return hashes
