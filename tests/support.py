"""Test helpers that run things and read back what they did: write configs, run the CLI as a
real process, a bounded fetch, SQL on a test's store. What tests build (messages, accounts)
is in builders.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import poplib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builders import NAME, OWNER, sha
from mailingest.config import Account
from mailingest.fetch import FetchResult, fetch_account
from mailingest.store import Store

TIMEOUT = 120
FETCH_BOUND = 30.0  # no single fetch of a test may take longer than this
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
        return run_sql(self, sql, *args)

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


def run_sql(
    where: StoreAt | Path, sql: str, *params: Any, readonly: bool = False, timeout: float = 30
) -> list[tuple[Any, ...]]:
    """Run ``sql`` (``?`` placeholders) on a test's store as another process would, in a
    transaction of its own that is committed; its rows (none for a statement without).

    ``where``: a SQLite file (``readonly``: opened read-only, so a missing file is an
    sqlite3.OperationalError, never created) or a ``StoreAt`` on either backend. The only way
    tests reach a store's tables behind its back."""
    at = where if isinstance(where, StoreAt) else StoreAt(where)
    if isinstance(at.database, Path):
        target = f"file:{at.database}?mode=ro" if readonly else str(at.database)
        db = sqlite3.connect(target, uri=readonly, timeout=timeout)
        try:
            cursor = db.execute(sql, params)
            rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
            db.commit()
            return rows
        finally:
            db.close()
    import psycopg

    with psycopg.connect(at.database, password=at.password) as conn:
        cur = conn.execute(sql.replace("?", "%s"), params)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []


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


def cli_json(config: Path, *args: str, env: Mapping[str, str] | None = None) -> Any:
    """The JSON a command prints with ``--json``; it must exit 0."""
    proc = run_cli(config, *args, "--json", env=env)
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


async def stored_hashes(store: Store, viewer: str = OWNER) -> list[str]:
    """sha256 of every message ``viewer`` sees, recomputed from the stored bytes and checked
    against the store's own record, sorted."""
    digests = []
    for item in await store.messages(viewer=viewer):
        raw = b"".join([chunk async for chunk in store.raw_chunks(item.id)])
        assert sha(raw) == item.sha256 and len(raw) == item.size
        digests.append(item.sha256)
    return sorted(digests)


async def fetch(
    acc: Account, store: Store, *, bound: float = FETCH_BOUND, **kw: Any
) -> FetchResult:
    """One fetch cycle, bounded: returning at all (within ``bound`` seconds) is the "process
    survives" check of the fault tests."""
    async with asyncio.timeout(bound):
        return await fetch_account(acc, store, **kw)


def assert_failed(result: FetchResult, *statuses: str, name: str = NAME) -> None:
    """The cycle failed with one of ``statuses``, its error naming the account."""
    assert result.status in statuses, result
    assert result.error is not None and result.error.startswith(f"account {name!r}: "), result


def poplib_digests(
    host: str, port: int, user: str, password: str, timeout: float = 30
) -> list[str]:
    """sha256 of each message as stdlib poplib RETRs it (lines, each ended by CRLF; the line
    limit raised to 8 MiB), in message order: a reference independent of our client."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(poplib, "_MAXLINE", 8 * 1024 * 1024)
        client = poplib.POP3(host, port, timeout=timeout)
        try:
            client.user(user)
            client.pass_(password)
            count, _ = client.stat()
            digests = []
            for number in range(1, count + 1):
                _, lines, _ = client.retr(number)
                digests.append(sha(b"".join(line + b"\r\n" for line in lines)))
            client.quit()
        finally:
            client.close()
    return digests
