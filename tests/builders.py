"""What tests build: messages, the bytes a POP3 server serves for them, accounts, mailboxes of
the scripted server, a self-signed certificate.

One copy of each, for every test folder. Running things (the CLI, a fetch, SQL) and reading
back what was stored is in support.py; the scripted server itself is in pop3d.py.
"""

from __future__ import annotations

import hashlib
import subprocess
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from dovecot import Dovecot
from dovecot import Mailbox as DovecotMailbox
from mailingest.config import Account, Secret
from pop3d import Mailbox

#: The scripted server's one login, and the account that fetches it.
HOST = "127.0.0.1"
USER, PASSWORD, OWNER, NAME = "alice", "pw-alice", "alice", "acct"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served(raw: bytes) -> bytes:
    """What the scripted server serves, so what a POP3 client must store, for ``raw``: every
    line ended by CRLF, a final CRLF added (an independent reference, not the server's code)."""
    if not raw:
        return b""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    return b"".join(line.removesuffix(b"\r") + b"\r\n" for line in body.split(b"\n"))


def crlf(raw: bytes) -> bytes:
    """What Dovecot serves for a maildir file of ``raw``: every line CRLF-terminated, a final
    CRLF added. The same as ``served`` but for a last line ending in a bare CR."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def expected(messages: list[bytes]) -> list[str]:
    """sha256 of what the scripted server serves for each of ``messages``, sorted."""
    return sorted(sha(served(m)) for m in messages)


def message(index: int, body: bytes | None = None) -> bytes:
    """A small, distinct message with bare-LF line ends, as a sender may hand it over; the
    default body has a line starting with a dot (dot-stuffed on the wire)."""
    text = body if body is not None else f"Hello {index}\n.dot line {index}\n".encode()
    return (
        f"From: Lead {index} <lead{index}@example.org>\nTo: owner@example.com\n"
        f"Subject: message {index}\nMessage-ID: <m{index}@example.org>\n\n"
    ).encode() + text


def make_message(
    index: int, *, body: bytes | None = None, sender: str = "lead@example.org"
) -> bytes:
    """A small, distinct, valid message with a Date, from one sender (records match it)."""
    text = body if body is not None else f"Hello {index}\nSecond line of {index}.\n".encode()
    return (
        f"From: Lead {index} <{sender}>\n"
        f"To: owner@example.com\n"
        f"Subject: message {index}\n"
        f"Date: Tue, 24 Nov 2026 10:{index % 60:02d}:00 +0000\n"
        f"Message-ID: <m{index}@example.org>\n\n"
    ).encode() + text


def mailbox(messages: list[bytes], **kw: Any) -> Mailbox:
    """The scripted server's mailbox of USER/PASSWORD holding ``messages`` (a copy)."""
    return Mailbox(USER, PASSWORD, list(messages), **kw)


def literal(value: str) -> Secret:
    """A secret given in the config itself."""
    return Secret(source="literal", ref="", value=value)


def account(port: int, **overrides: Any) -> Account:
    """The config Account that fetches ``mailbox()`` from the scripted server on ``port``:
    plain POP3 on loopback (opted in), a short socket timeout; ``overrides`` replace fields."""
    fields: dict[str, Any] = {
        "name": NAME,
        "owner": OWNER,
        "host": HOST,
        "port": port,
        "security": "plain",
        "username": USER,
        "password": literal(PASSWORD),
        "allow_plaintext": True,
        "timeout": 2.0,
    }
    fields.update(overrides)
    return Account(**fields)


def loopback_account(port: int, /, **fields: Any) -> dict[str, Any]:
    """An account table (as in the config file) for a POP3 server on 127.0.0.1, plain POP3
    (opted in); ``fields`` (name, username, password, ...) are added or replace the defaults."""
    return {
        "owner": "alice",
        "host": HOST,
        "port": port,
        "security": "plain",
        "allow_plaintext": True,
        "timeout": "5s",
        **fields,
    }


def dovecot_account(
    mailbox: DovecotMailbox, name: str = "acct", **overrides: Any
) -> dict[str, Any]:
    """An account table for a Dovecot test mailbox over plain POP3 on loopback."""
    server: Dovecot = mailbox.dovecot
    fields = {
        "name": name,
        "host": server.host,
        "username": mailbox.user,
        "password": mailbox.password,
        "timeout": "20s",
    }
    return loopback_account(server.port, **(fields | overrides))


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, made with the openssl CLI:
    (cert, key)."""
    key, crt = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return crt, key


#: When ``numbered_mail(0, ...)`` was sent; message n is n minutes later.
MAIL_BASE = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def numbered_mail(
    n: int, sender: str, to: str = "owner@own.example", *, domain: str = "sharing.test"
) -> bytes:
    """Message number ``n`` (Subject "m<n>", Message-ID <m<n>@domain>); a higher n is newer."""
    date = format_datetime(MAIL_BASE + timedelta(minutes=n))
    return (
        f"From: {sender}\nTo: {to}\nSubject: m{n}\nDate: {date}\n"
        f"Message-ID: <m{n}@{domain}>\n\nBody of m{n}.\n"
    ).encode()
