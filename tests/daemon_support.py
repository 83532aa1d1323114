"""Helpers for the daemon tests: a stand-in for systemd's notify socket, the daemon as a real
process or in-process, and bounded waiting."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from mailingest.daemon import Daemon
from support import run_cli

#: Nothing here waits longer for one thing to happen (a generous bound, never a benchmark).
WAIT = 30.0


def wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


async def until(check: Callable[[], bool], what: str, within: float = WAIT) -> None:
    """``wait_until`` for a test on the event loop: the loop runs while it waits."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Daemon]:
    """The daemon in-process (no signal handlers), stopped at the end; it must exit 0."""
    task = asyncio.create_task(daemon.async_run(signals=False))
    try:
        await until(lambda: daemon._store is not None or task.done(), "the store to open")
        yield daemon
    finally:
        daemon.stop("test")
        assert await asyncio.wait_for(task, WAIT) == 0


def events(logs: list[dict[str, Any]], name: str, acct: str | None = None) -> list[dict[str, Any]]:
    """The captured events called ``name`` (of account ``acct``)."""
    return [e for e in logs if e["event"] == name and (acct is None or e.get("account") == acct)]


class NotifySocket:
    """A datagram socket at an abstract address, as systemd gives ``$NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        self.address = f"@mailingest-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.messages: list[dict[str, str]] = []

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def _read(self, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
        self.messages.append(fields)

    def wait_for(self, key: str, value: str | None = None, timeout: float = WAIT) -> dict[str, str]:
        """The first message (from now on) carrying ``key`` (= ``value``)."""
        seen = len(self.messages)
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages[seen:]:
                if key in message and (value is None or message[key] == value):
                    return message
            seen = len(self.messages)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value or '*'} in {self.messages}")
            self._read(min(left, 0.5))

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(left)


class DaemonProcess:
    """``python -m mailingest -c CONFIG run`` with its log (JSON lines) in a file."""

    def __init__(self, config: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.log_path = config.parent / f"daemon-{uuid.uuid4().hex[:8]}.log"
        full_env = {**os.environ, **(env or {})}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailingest", "-c", str(config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=full_env,
            )

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(
        self, timeout: float = WAIT, sig: signal.Signals = signal.SIGTERM
    ) -> tuple[int, float]:
        """SIGTERM (or ``sig``); the exit code and how long the process took to exit."""
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """The log's events (every line must be JSON), optionally filtered. A last line
        still being written (no newline yet) is left for the next look."""
        text = self.text()
        if self.proc.poll() is None:
            text = text[: text.rfind("\n") + 1]
        try:
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise AssertionError(f"the daemon wrote a line that is not JSON:\n{text}") from None
        return [
            e
            for e in lines
            if (name is None or e["event"] == name) and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_event(self, name: str, timeout: float = WAIT, **match: Any) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            assert self.proc.poll() is None, f"daemon exited early:\n{self.text()}"
            found[:] = self.events(name, **match)
            return bool(found)

        wait_until(seen, f"{name} {match} in the daemon log")
        return found[0]


def status(config: Path) -> dict[str, dict[str, Any]]:
    """`status --json`, by account name."""
    proc = run_cli(config, "status", "--json")
    assert proc.returncode == 0, proc.stderr.decode()
    return {row["account"]: row for row in json.loads(proc.stdout)["accounts"]}
