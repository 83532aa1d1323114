"""Resource faults: a full disk (a real ENOSPC on a tiny tmpfs) and a locked database.

A deleting fetch that cannot store stops before any DELE, exits 75 with a message that says
why and names the account; once the disk has room or the lock is gone, the next run stores
everything exactly once and empties the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from builders import expected, message
from mailingest.config import Account, Secret
from mailingest.fetch import fetch_account
from mailingest.store import BUSY_TIMEOUT_MS, Store
from pop3d import Faults, Mailbox, Pop3TestServer, ThreadedPop3Server
from support import StoreAt, write_config

USER, PASSWORD, NAME = "alice", "Resource-Pw-31", "acct"


def sized(index: int, size: int = 0) -> bytes:
    """A message of about ``size`` bytes (at least one body line)."""
    return message(index, (f"line {index} " * 8 + "\n").encode() * max(1, size // 80))


def account_table(port: int) -> dict[str, Any]:
    return {
        "name": NAME,
        "owner": "alice",
        "host": "127.0.0.1",
        "port": port,
        "security": "plain",
        "allow_plaintext": True,
        "username": USER,
        "password": PASSWORD,
        "timeout": "10s",
        "leave_on_server": False,
    }


def run_fetch(
    config: Path, preexec: Callable[[], None] | None = None
) -> tuple[int, dict[str, Any] | None, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mailingest", "-c", str(config), "fetch", "--json"],
        capture_output=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec,
    )
    out = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, out, proc.stderr.decode(errors="replace")


# -- disk full ---------------------------------------------------------------------------------


@dataclass
class SmallDisk:
    """A directory whose file system fills up: a 16 MiB tmpfs, or (where mounting is not
    permitted) RLIMIT_FSIZE on the fetch process, which makes its writes fail with EFBIG."""

    path: Path
    kind: str
    limit: int | None = None

    def fill(self, leave: int) -> None:
        """Leave about ``leave`` bytes free."""
        if self.kind == "rlimit":
            self.limit = max(p.stat().st_size for p in self.path.iterdir()) + leave
            return
        filler = self.path / "filler"
        with filler.open("wb") as out:
            block = b"\0" * 65536
            with contextlib.suppress(OSError):  # ENOSPC: the disk is full now
                while True:
                    out.write(block)
                    out.flush()
        usage = os.statvfs(self.path)
        free = usage.f_bavail * usage.f_frsize
        os.truncate(filler, max(0, filler.stat().st_size - (leave - free)))

    def free(self) -> None:
        self.limit = None
        (self.path / "filler").unlink(missing_ok=True)

    def preexec(self) -> Callable[[], None] | None:
        limit = self.limit
        if limit is None:
            return None

        def limited() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails, not the process
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        return limited


def _mount_tmpfs(path: Path) -> bool:
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode == 0


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    path = tmp_path / "disk"
    path.mkdir()
    if request.param == "tmpfs" and not _mount_tmpfs(path):
        pytest.skip("cannot mount a tmpfs here; the rlimit variant covers disk full")
    try:
        yield SmallDisk(path, request.param)
    finally:
        if request.param == "tmpfs":
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([200_000] * 12, id="while-storing"),  # spooled in memory, SQLite full
        pytest.param([3_000_000, 2000], id="while-spooling"),  # spooled to disk, which fills
    ],
)
def test_disk_full_stops_before_any_dele_and_the_next_run_completes(
    small_disk: SmallDisk, sizes: list[int]
) -> None:
    first = [sized(i) for i in range(3)]
    later = [sized(100 + i, size) for i, size in enumerate(sizes)]
    with ThreadedPop3Server([Mailbox(USER, PASSWORD, list(first))]) as server:
        config = write_config(
            small_disk.path.parent, [account_table(server.port)], database="disk/mail.db"
        )
        code, _, err = run_fetch(config)
        assert code == 0, err
        box = server.server.mailbox(USER)
        for raw in later:
            box.add(raw)
        deletes = server.server.commands_seen("DELE")
        small_disk.fill(leave=256 * 1024)

        code, out, err = run_fetch(config, small_disk.preexec())

        assert code == 75, (out, err)
        assert out is not None, err
        [result] = out["accounts"]
        assert result["status"] == "temp_failed", result
        assert result["error"].startswith(f"account {NAME!r}: "), result
        if small_disk.kind == "tmpfs":  # a real ENOSPC names itself; EFBIG is an I/O error
            assert "No space left on device" in result["error"] or "full" in result["error"]
        assert server.server.commands_seen("DELE") == deletes  # none in this run
        assert box.remaining() == len(later)

        small_disk.free()
        code, out, err = run_fetch(config)

        assert code == 0, (out, err)
        assert out is not None and out["accounts"][0]["deleted"] == len(later)
        assert box.remaining() == 0
    assert StoreAt(small_disk.path / "mail.db").stored() == expected(first + later)


# -- locked database ---------------------------------------------------------------------------


def exclusive_lock(database: Path) -> contextlib.AbstractContextManager[None]:
    """Another process's write transaction: BEGIN EXCLUSIVE held until the block ends."""
    return StoreAt(database).write_locked()


def test_locked_database_exits_75_without_dele_and_the_next_run_completes(
    tmp_path: Path,
) -> None:
    """Held longer than the store's busy timeout (10 s: a CLI run waits that long for the
    daemon's commits, which last milliseconds), so the fetch gives up with a clear message."""
    messages = [sized(i) for i in range(4)]
    with ThreadedPop3Server([Mailbox(USER, PASSWORD, [])]) as server:
        config = write_config(tmp_path, [account_table(server.port)])
        assert run_fetch(config)[0] == 0  # the database exists
        box = server.server.mailbox(USER)
        for raw in messages:
            box.add(raw)
        started = time.monotonic()
        with exclusive_lock(tmp_path / "mail.db"):
            code, out, err = run_fetch(config)
        waited = time.monotonic() - started
        assert code == 75, (out, err)
        assert "locked" in err or (out is not None and "locked" in json.dumps(out)), (out, err)
        assert BUSY_TIMEOUT_MS / 1000 <= waited < BUSY_TIMEOUT_MS / 1000 + 30
        assert server.server.commands_seen("DELE") == 0
        assert box.remaining() == len(messages)

        code, out, err = run_fetch(config)

        assert code == 0, (out, err)
        assert out is not None and out["accounts"][0]["new"] == len(messages)
        assert box.remaining() == 0
    assert StoreAt(tmp_path / "mail.db").stored() == expected(messages)


def test_a_short_lock_is_waited_out(tmp_path: Path) -> None:
    """A lock released within the busy timeout costs a wait, not a failed fetch."""
    messages = [sized(i) for i in range(3)]
    with ThreadedPop3Server([Mailbox(USER, PASSWORD, [])]) as server:
        config = write_config(tmp_path, [account_table(server.port)])
        assert run_fetch(config)[0] == 0
        for raw in messages:
            server.server.mailbox(USER).add(raw)
        release = threading.Event()

        def hold() -> None:
            with exclusive_lock(tmp_path / "mail.db"):
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        time.sleep(0.3)
        timer = threading.Timer(1.5, release.set)
        timer.start()
        try:
            code, out, err = run_fetch(config)
        finally:
            release.set()
            holder.join()
        assert code == 0, (out, err)
        assert server.server.mailbox(USER).remaining() == 0
    assert StoreAt(tmp_path / "mail.db").stored() == expected(messages)


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def test_database_locked_in_the_middle_of_a_cycle_is_temporary_and_typed(
    store: Store, store_at: StoreAt
) -> None:
    """The lock arrives after login, while RETR runs: the commit fails, nothing is DELEted.

    The busy timeout is shortened on this test's own connection so that it runs in a second.
    The lease could not be released either; the next cycle of the same process (the daemon's
    retry) must not take its own leftover for another fetcher's.
    """
    shorter = {"sqlite": "PRAGMA busy_timeout = 300", "postgresql": "SET lock_timeout = 300"}
    await store._db.execute(shorter[store_at.backend])
    messages = [sized(i) for i in range(5)]
    faults = Faults(per_session=lambda n: Faults(delay={"RETR 1": 0.5}) if n == 0 else Faults())
    acc = Account(
        name=NAME,
        owner="alice",
        host="127.0.0.1",
        port=0,
        security="plain",
        username=USER,
        password=Secret(source="literal", ref="", value=PASSWORD),
        allow_plaintext=True,
        timeout=5.0,
        leave_on_server=False,
    )
    async with Pop3TestServer([Mailbox(USER, PASSWORD, list(messages))], faults) as server:
        acc = Account(
            **{**{f: getattr(acc, f) for f in acc.__dataclass_fields__}, "port": server.port}
        )
        locked, release = threading.Event(), threading.Event()

        def hold() -> None:
            with store_at.write_locked():
                locked.set()
                release.wait(10)

        cycle = asyncio.create_task(fetch_account(acc, store))
        await asyncio.to_thread(_wait_for, lambda: server.commands_seen("RETR 1") > 0)
        holder = threading.Thread(target=hold)
        holder.start()
        await asyncio.to_thread(locked.wait, 5)
        try:
            result = await asyncio.wait_for(cycle, 30)
        finally:
            release.set()
            await asyncio.to_thread(holder.join)

        assert result.status == "temp_failed", result
        assert result.error is not None and result.error.startswith(f"account {NAME!r}: ")
        assert "locked" in result.error
        assert server.commands_seen("DELE") == 0
        assert server.mailbox(USER).remaining() == len(messages)

        again = await fetch_account(acc, store)
        assert again.status == "ok" and again.new == len(messages), again
        assert server.mailbox(USER).remaining() == 0
    assert store_at.stored() == expected(messages)
