"""Test helpers: write configs, run the CLI as a real process, make sample mail."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dovecot import Dovecot, Mailbox
from mailingest.store import Store

TIMEOUT = 120
TESTS = Path(__file__).resolve().parent  # the tests/ folder (support modules, corpus/)
ROOT = TESTS.parent  # the repository


@dataclass(frozen=True)
class StoreAt:
    """Where a test's store lives: a SQLite file, or a database on the private PostgreSQL."""

    database: Path | str
    password_file: Path | None = None

    @property
    def backend(self) -> str:
        return "sqlite" if isinstance(self.database, Path) else "postgresql"

    @property
    def password(self) -> str | None:
        if self.password_file is None:
            return None
        return self.password_file.read_text().strip()

    async def open(self) -> Store:
        return await Store.open(self.database, password=self.password)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` (``?`` placeholders) read as another process would."""
        if isinstance(self.database, Path):
            with contextlib.closing(sqlite3.connect(self.database, timeout=30)) as db:
                return [tuple(r) for r in db.execute(sql, args).fetchall()]
        import psycopg

        with psycopg.connect(self.database, password=self.password) as conn:
            return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), args).fetchall()]

    @contextlib.contextmanager
    def write_locked(self) -> Iterator[None]:
        """Another process's write transaction that blocks every writer until the block ends."""
        if isinstance(self.database, Path):
            db = sqlite3.connect(self.database, timeout=30, isolation_level=None)
            try:
                db.execute("BEGIN EXCLUSIVE")
                yield
                db.execute("ROLLBACK")
            finally:
                db.close()
            return
        import psycopg

        with psycopg.connect(self.database, password=self.password) as conn:
            conn.execute("LOCK TABLE messages, ledger, account_state IN ACCESS EXCLUSIVE MODE")
            yield
            conn.rollback()

    def stored(self) -> list[str]:
        """sha256 of each stored message, checked against its stored chunks."""
        digests = []
        for message_id, digest in self.query("SELECT id, sha256 FROM messages"):
            chunks = self.query(
                "SELECT data FROM message_chunks WHERE message = ? ORDER BY seq", (message_id,)
            )
            assert sha(b"".join(bytes(c) for (c,) in chunks)) == digest
            digests.append(digest)
        return sorted(digests)

    def storage(self) -> dict[str, Any]:
        """The config's [storage] table for it."""
        table: dict[str, Any] = {"database": str(self.database)}
        if self.password_file is not None:
            table["password"] = {"file": str(self.password_file)}
        return table


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(
    directory: Path,
    accounts: Sequence[Mapping[str, Any]],
    *,
    database: str = "mail.db",
    daemon: Mapping[str, Any] | None = None,
    storage: Mapping[str, Any] | None = None,
) -> Path:
    """A config file (mode 0600) with the given account tables; ``storage`` (from
    ``StoreAt.storage()``) replaces the ``database`` file."""
    table = dict(storage) if storage is not None else {"database": database}
    lines = ["[storage]", *(f"{k} = {_toml_value(v)}" for k, v in table.items()), ""]
    if daemon:
        lines += ["[daemon]", *(f"{k} = {_toml_value(v)}" for k, v in daemon.items()), ""]
    for account in accounts:
        lines.append("[[accounts]]")
        smtp = None
        for key, value in account.items():
            if key == "smtp":
                smtp = value
                continue
            lines.append(f"{key} = {_toml_value(value)}")
        if smtp:
            lines.append("[accounts.smtp]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in smtp.items()]
        lines.append("")
    path = directory / "mailingest.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    path.chmod(0o600)
    return path


def dovecot_account(mailbox: Mailbox, name: str = "acct", **overrides: Any) -> dict[str, Any]:
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


def run_cli(
    config: Path | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = TIMEOUT,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """`python -m mailingest [-c CONFIG] ARGS...` as a separate process, as a user runs it
    (``stdin``: what it reads there; else nothing)."""
    cmd = [sys.executable, "-m", "mailingest"]
    if config is not None:
        cmd += ["-c", str(config)]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MAILINGEST_CONFIG", None) if config is not None else None
    stream: dict[str, Any] = (
        {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
    )
    return subprocess.run(
        [*cmd, *args], capture_output=True, timeout=timeout, env=full_env, **stream
    )


def fetch_json(config: Path, *args: str) -> tuple[int, dict[str, Any]]:
    proc = run_cli(config, "fetch", "--json", *args)
    assert proc.stdout, proc.stderr.decode()
    return proc.returncode, json.loads(proc.stdout)


def crlf(raw: bytes) -> bytes:
    """What a POP3 server serves for raw: every line CRLF-terminated, a final CRLF added."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_message(
    index: int, *, body: bytes | None = None, sender: str = "lead@example.org"
) -> bytes:
    """A small, distinct, valid message."""
    text = body if body is not None else f"Hello {index}\nSecond line of {index}.\n".encode()
    return (
        f"From: Lead {index} <{sender}>\n"
        f"To: owner@example.com\n"
        f"Subject: message {index}\n"
        f"Date: Tue, 24 Nov 2026 10:{index % 60:02d}:00 +0000\n"
        f"Message-ID: <m{index}@example.org>\n\n"
    ).encode() + text


async def stored_hashes(store: Store, viewer: str) -> list[str]:
    """sha256 of every message ``viewer`` sees, recomputed from the stored bytes and checked
    against the store's own record, sorted."""
    digests = []
    for item in await store.messages(viewer=viewer):
        raw = b"".join([chunk async for chunk in store.raw_chunks(item.id)])
        assert sha(raw) == item.sha256 and len(raw) == item.size
        digests.append(item.sha256)
    return sorted(digests)


def loopback_account(port: int, /, **fields: Any) -> dict[str, Any]:
    """An account table for a POP3 server on 127.0.0.1, plain POP3 (opted in); ``fields``
    (name, username, password, ...) are added or replace the defaults."""
    return {
        "owner": "alice",
        "host": "127.0.0.1",
        "port": port,
        "security": "plain",
        "allow_plaintext": True,
        "timeout": "5s",
        **fields,
    }
