"""Test helpers: write configs, run the CLI as a real process, make sample mail."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dovecot import Dovecot, Mailbox
from mailingest.store import Store

TIMEOUT = 120


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
) -> Path:
    """A config file (mode 0600) with the given account tables."""
    lines = ["[storage]", f"database = {_toml_value(database)}", ""]
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
    config: Path | None, *args: str, env: Mapping[str, str] | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """`python -m mailingest [-c CONFIG] ARGS...` as a separate process, as a user runs it."""
    cmd = [sys.executable, "-m", "mailingest"]
    if config is not None:
        cmd += ["-c", str(config)]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("MAILINGEST_CONFIG", None) if config is not None else None
    return subprocess.run(
        [*cmd, *args], capture_output=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL
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
