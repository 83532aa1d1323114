"""`fetch` on a terminal shows live progress, one line per account (messages, bytes, rate),
updated as each message arrives; on a pipe or with `--json` it shows none. The CLI runs as a
real process under a pseudo-terminal and its output is read the way a terminal shows it."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

from builders import loopback_account
from mailingest.config import Account, Secret
from mailingest.fetch import fetch_account
from mailingest.output import human_bytes
from mailingest.progress import Progress, Tally
from mailingest.retrieval import BATCH_COUNT
from mailingest.store import Store
from pop3d import Faults, Mailbox, Pop3TestServer, ThreadedPop3Server
from support import TIMEOUT, run_cli, write_config

PASSWORD = "pw-progress"
#: More than two group-commit batches for a1, more than one for a2.
COUNTS = {"a1": 2 * BATCH_COUNT + 50, "a2": BATCH_COUNT + 30}
USERS = {"a1": "alice", "a2": "bob"}
MAIL = {
    name: [
        (
            f"From: lead{i}@example.org\r\nSubject: {name} {i}\r\n\r\n" + f"line {i}\r\n" * 60
        ).encode()
        for i in range(count)
    ]
    for name, count in COUNTS.items()
}
TOTALS = {name: sum(len(m) for m in mail) for name, mail in MAIL.items()}  # CRLF: stored as is
#: Each RETR answered a little late, so the fetch lasts long enough for several redraws.
SLOW = Faults(delay={"RETR": 0.004})
WIDTH = 120
SIZE = r"[\d.]+ [KMG]?B"
LINE = re.compile(rf"^(a[12])\s+(\d+) msgs\s+({SIZE})\s+({SIZE})/s(\s+done)?$")
#: CSI sequences (cursor moves, erase, colours, cursor shown or hidden) and OSC ones.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


def _config(directory: Path, port: int) -> Path:
    """A fresh store in its own directory: each run fetches every message anew."""
    directory.mkdir()
    accounts = [
        loopback_account(port, name=name, username=user, password=PASSWORD, timeout="20s")
        for name, user in USERS.items()
    ]
    return write_config(directory, accounts)


def _server() -> ThreadedPop3Server:
    mailboxes = [Mailbox(USERS[name], PASSWORD, list(mail)) for name, mail in MAIL.items()]
    return ThreadedPop3Server(mailboxes, SLOW)


def _run_on_terminal(config: Path, *args: str, width: int = WIDTH) -> tuple[int, bytes]:
    """`mailingest -c CONFIG ARGS` with stdin, stdout and stderr on a pseudo-terminal of
    ``width`` columns."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, width, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(width), "LINES": "40"}
    for name in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CI"):
        env.pop(name, None)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailingest", "-c", str(config), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env=env,
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


def _screen_lines(out: bytes) -> list[str]:
    """What was written, as lines: escape sequences dropped, CR and LF both end a line."""
    text = ANSI.sub("", out.decode(errors="replace"))
    return [line.strip() for line in re.split(r"\r\n|\r|\n", text)]


def _progress(lines: list[str]) -> dict[str, list[tuple[int, str, str, bool]]]:
    """Each account's progress lines in the order drawn: (messages, bytes, rate, done)."""
    seen: dict[str, list[tuple[int, str, str, bool]]] = {name: [] for name in COUNTS}
    for line in lines:
        match = LINE.match(line)
        if match:
            name, count, size, rate, done = match.groups()
            seen[name].append((int(count), size, rate, done is not None))
    return seen


def test_fetch_on_a_terminal_shows_one_live_line_per_account(tmp_path: Path) -> None:
    with _server() as server:
        code, out = _run_on_terminal(_config(tmp_path / "tty", server.port), "fetch")

    text = out.decode(errors="replace")
    assert code == 0, text
    lines = _screen_lines(out)
    # One account per line: never both on one (the old single status line).
    assert not [line for line in lines if "a1 " in line and "a2 " in line and "msgs" in line]
    seen = _progress(lines)
    for name, count in COUNTS.items():
        drawn = seen[name]
        assert drawn, (name, text[-2000:])
        counts = [c for c, _, _, _ in drawn]
        assert counts == sorted(counts), (name, counts)  # only ever grows
        between = sorted({c for c in counts if 0 < c < count})
        # Redrawn as messages arrive, not once per committed batch of BATCH_COUNT.
        assert len(between) >= 3, (name, between)
        assert [c for c in between if c % BATCH_COUNT], (name, between)
        # The lines stay, with what was stored: the last drawing of each is its final one.
        final, size, rate, done = drawn[-1]
        assert (final, size, done) == (count, human_bytes(TOTALS[name]), True), drawn[-1]
        assert float(rate.split()[0]) > 0
        assert not [d for d in drawn if d[3] and d[0] != count]  # "done" only with the total
    # The final lines are drawn once more as the display closes, one under the other, and
    # the result table comes after them.
    last = max(i for i, line in enumerate(lines) if LINE.match(line))
    assert [line.split()[0] for line in lines[last - 1 : last + 1]] == ["a1", "a2"]
    assert all(LINE.match(line) for line in lines[last - 1 : last + 1])
    tail = "\n".join(lines[last + 1 :])
    for name, count in COUNTS.items():
        assert re.search(rf"^{name}\s+ok\s+{count}\s", tail, re.M), tail
    assert "msgs" not in tail


def test_log_lines_print_above_the_live_lines_intact(tmp_path: Path) -> None:
    """With -v every stored message logs a line while the display runs: each comes out
    whole, on its own line, and the display still ends with the right figures. (The
    terminal is wide enough for a log line: rich wraps longer ones at a space.)"""
    with _server() as server:
        config = _config(tmp_path / "logs", server.port)
        code, out = _run_on_terminal(config, "-v", "fetch", width=200)

    text = out.decode(errors="replace")
    assert code == 0, text
    lines = _screen_lines(out)
    stored = [line for line in lines if "message_stored" in line]
    assert len(stored) == sum(COUNTS.values()), text[-2000:]
    for line in stored:
        assert re.search(r"\[debug\s*\] message_stored\s+account=a[12] size=\d+ uidl=\S+$", line)
    seen = _progress(lines)
    for name, count in COUNTS.items():
        assert seen[name][-1][:2] == (count, human_bytes(TOTALS[name])), seen[name][-1]


def test_the_cli_imports_rich_only_to_draw_progress() -> None:
    """rich costs start-up time; structlog would import it too (see logs._structlog)."""
    code = (
        "import sys, mailingest.cli; print([m for m in sys.modules if m.split('.')[0] == 'rich'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.strip() == b"[]"


def test_fetch_on_a_pipe_or_with_json_shows_no_progress(tmp_path: Path) -> None:
    with _server() as server:
        piped = run_cli(_config(tmp_path / "pipe", server.port), "fetch")
        code, out = _run_on_terminal(_config(tmp_path / "json", server.port), "fetch", "--json")

    assert piped.returncode == 0, piped.stderr.decode()
    for name, count in COUNTS.items():
        assert re.search(rb"%s\s+ok\s+%d\s" % (name.encode(), count), piped.stdout)
    for stream in (piped.stdout, piped.stderr):
        assert b"msgs" not in stream and b"\x1b" not in stream  # no progress, no colour

    assert code == 0, out.decode(errors="replace")
    assert b"msgs" not in out and not any(LINE.match(line) for line in _screen_lines(out))
    assert b"\x1b[?25l" not in out  # rich never started: the cursor was never hidden
    document = next(line for line in out.splitlines() if line.startswith(b'{"accounts"'))
    results = {r["account"]: r for r in json.loads(document)["accounts"]}
    for name, count in COUNTS.items():
        assert results[name]["status"] == "ok"
        assert (results[name]["new"], results[name]["bytes"]) == (count, TOTALS[name])


Call = tuple[int, str, int, int, bool]  # (thread, account, messages, bytes, done)


def _recorder(calls: list[Call]) -> Progress:
    def progress(account: str, messages: int, nbytes: int, done: bool) -> None:
        calls.append((threading.get_ident(), account, messages, nbytes, done))

    return progress


async def test_tally_counts_arrivals_from_threads_once_and_drops_what_was_not_stored() -> None:
    calls: list[Call] = []
    tally = Tally("a1", _recorder(calls))
    hook = tally.hook()
    await asyncio.to_thread(lambda: [hook(10) for _ in range(3)])  # reported before it returns
    tally.committed(2, 20, [10, 10])  # two stored, the third still pending
    tally.drop()  # the session ended: the third was not stored and is fetched again
    await asyncio.to_thread(hook, 10)  # a late report from the dropped session: ignored
    await asyncio.to_thread(tally.hook(), 5)
    tally.finish(3, 25)
    await asyncio.to_thread(tally.hook(), 5)  # after the end: ignored
    await asyncio.sleep(0)
    here = threading.get_ident()
    assert {thread for thread, *_ in calls} == {here}  # always on the event loop's thread
    assert [c[2:] for c in calls] == [
        (0, 0, False),
        (1, 10, False),
        (2, 20, False),
        (3, 30, False),
        (3, 30, False),  # committed: two stored plus one pending
        (2, 20, False),  # dropped
        (3, 25, False),
        (3, 25, True),
    ]


def _pop_account(port: int) -> Account:
    return Account(
        name="a1",
        owner="alice",
        host="127.0.0.1",
        port=port,
        security="plain",
        username="alice",
        password=Secret(source="literal", ref="", value=PASSWORD),
        allow_plaintext=True,
        timeout=5.0,
        leave_on_server=False,
    )


def _check_calls(calls: list[Call], new: int, nbytes: int) -> list[int]:
    """On the loop's thread, growing, one final call with what was stored; the counts."""
    assert {thread for thread, *_ in calls} == {threading.get_ident()}
    counts = [c[2] for c in calls]
    assert counts == sorted(counts) and counts[0] == 0
    assert [c[4] for c in calls] == [False] * (len(calls) - 1) + [True]
    assert calls[-1][2:4] == (new, nbytes)
    return counts


async def test_a_cycle_of_several_sessions_counts_each_message_once(tmp_path: Path) -> None:
    """The server lists 300 at a time: three sessions, the figures carried across them."""
    mail = MAIL["a1"]
    store = await Store.open(tmp_path / "mail.db")
    try:
        async with Pop3TestServer(
            [Mailbox("alice", PASSWORD, list(mail))], Faults(max_list=300)
        ) as srv:
            calls: list[Call] = []
            result = await fetch_account(_pop_account(srv.port), store, progress=_recorder(calls))
    finally:
        await store.close()
    assert (result.status, result.new, result.bytes) == ("ok", len(mail), TOTALS["a1"])
    assert result.sessions == 3
    counts = _check_calls(calls, len(mail), TOTALS["a1"])
    assert [c for c in counts if c % BATCH_COUNT] and [c for c in counts if 300 < c < len(mail)]


async def test_a_broken_session_ends_the_figures_at_what_was_stored(tmp_path: Path) -> None:
    """The connection drops in the second batch: the messages that came whole are stored
    and counted; the next cycle counts the rest, and nothing twice."""
    mail = MAIL["a1"]
    cut = BATCH_COUNT + 50
    faults = Faults(per_session=lambda n: Faults(drop_mid_retr=cut) if n == 0 else Faults())
    store = await Store.open(tmp_path / "mail.db")
    try:
        async with Pop3TestServer([Mailbox("alice", PASSWORD, list(mail))], faults) as srv:
            first_calls: list[Call] = []
            first = await fetch_account(
                _pop_account(srv.port), store, progress=_recorder(first_calls)
            )
            second_calls: list[Call] = []
            second = await fetch_account(
                _pop_account(srv.port), store, progress=_recorder(second_calls)
            )
    finally:
        await store.close()
    assert (first.status, first.new) == ("temp_failed", cut - 1)
    assert (second.status, second.new) == ("ok", len(mail) - cut + 1)
    assert first.bytes + second.bytes == TOTALS["a1"]
    _check_calls(first_calls, first.new, first.bytes)
    _check_calls(second_calls, second.new, second.bytes)
