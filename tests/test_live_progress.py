"""`fetch` on a terminal shows live progress (messages, bytes, rate); on a pipe or with
`--json` it shows none. The CLI runs as a real process under a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

from mailingest.fetch import BATCH_COUNT
from mailingest.output import human_bytes
from mailingest.popserver import Mailbox, ThreadedPop3Server
from support import TIMEOUT, loopback_account, run_cli, write_config

PASSWORD = "pw-progress"
#: More than two group-commit batches, so the line is rewritten with growing counts.
COUNT = 2 * BATCH_COUNT + 50
MESSAGES = [
    (f"From: lead{i}@example.org\r\nSubject: progress {i}\r\n\r\n" + f"line {i}\r\n" * 60).encode()
    for i in range(COUNT)
]
TOTAL = sum(len(m) for m in MESSAGES)  # CRLF already: served and stored as they are
PROGRESS = re.compile(rb"\r\x1b\[K(a1: (\d+) msgs, ([\d.]+ [KMG]?B) \(([\d.]+ [KMG]?B)/s\))")


def _config(directory: Path, port: int) -> Path:
    """A fresh store in its own directory: each run fetches every message anew."""
    directory.mkdir()
    account = loopback_account(port, name="a1", username="alice", password=PASSWORD, timeout="20s")
    return write_config(directory, [account])


def _run_on_terminal(config: Path, *args: str) -> tuple[int, bytes]:
    """`mailingest -c CONFIG ARGS` with stdin, stdout and stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailingest", "-c", str(config), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every slave end is closed, the process is gone
                break
            if not chunk:
                break
            out += chunk
        else:
            raise AssertionError(f"no end of output within {TIMEOUT}s: {bytes(out)[-500:]!r}")
        return proc.wait(timeout=TIMEOUT), bytes(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)


def test_fetch_on_a_terminal_shows_live_progress_then_erases_it(tmp_path: Path) -> None:
    with ThreadedPop3Server([Mailbox("alice", PASSWORD, list(MESSAGES))]) as server:
        code, out = _run_on_terminal(_config(tmp_path / "tty", server.port), "fetch")

    assert code == 0, out.decode(errors="replace")
    lines = PROGRESS.findall(out)
    assert lines, out.decode(errors="replace")
    counts = [int(count) for _, count, _, _ in lines]
    assert counts == sorted(counts) and len(set(counts)) >= 2  # rewritten as mail comes in
    final, count, size, rate = lines[-1]
    assert int(count) == COUNT and size.decode() == human_bytes(TOTAL), final
    assert float(rate.split()[0]) > 0
    # The line is erased before the result table, which is the last thing written.
    tail = out[out.rindex(final) + len(final) :]
    assert tail.startswith(b"\r\x1b[K") and b"msgs," not in tail
    assert re.search(rb"a1\s+ok\s+%d\s" % COUNT, tail), tail


def test_fetch_on_a_pipe_or_with_json_shows_no_progress(tmp_path: Path) -> None:
    with ThreadedPop3Server([Mailbox("alice", PASSWORD, list(MESSAGES))]) as server:
        piped = run_cli(_config(tmp_path / "pipe", server.port), "fetch")
        code, out = _run_on_terminal(_config(tmp_path / "json", server.port), "fetch", "--json")

    assert piped.returncode == 0, piped.stderr.decode()
    assert re.search(rb"a1\s+ok\s+%d\s" % COUNT, piped.stdout), piped.stdout
    for stream in (piped.stdout, piped.stderr):
        assert b"msgs," not in stream and b"\x1b" not in stream  # no progress, no colour

    assert code == 0, out.decode(errors="replace")
    assert b"msgs," not in out and not PROGRESS.search(out)
    document = next(line for line in out.splitlines() if line.startswith(b'{"accounts"'))
    [result] = json.loads(document)["accounts"]
    assert result["status"] == "ok" and result["new"] == COUNT and result["bytes"] == TOTAL
