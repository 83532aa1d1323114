"""Crash safety (SIGKILL at random instants) and bounded memory for huge messages, on Dovecot."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from dovecot import Dovecot, Mailbox
from support import crlf, dovecot_account, fetch_json, make_message, sha, write_config

ROUNDS = 6


def _stored_hashes(config: Path) -> list[str]:
    db = sqlite3.connect(config.parent / "mail.db")
    try:
        return [r[0] for r in db.execute("SELECT sha256 FROM messages")]
    finally:
        db.close()


def _fetch_process(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailingest", "-c", str(config), "fetch", "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _calibrate(tmp_path: Path, mailbox: Mailbox, messages: list[bytes]) -> float:
    """Seconds one whole fetch process of this many messages takes on this machine."""
    mailbox.deliver_many(messages)
    directory = tmp_path / "calibration"
    directory.mkdir()
    config = write_config(directory, [dovecot_account(mailbox, leave_on_server=False)])
    started = time.monotonic()
    proc = _fetch_process(config)
    assert proc.wait(timeout=60) == 0
    return time.monotonic() - started


def test_sigkill_at_random_instants_loses_and_duplicates_nothing(
    tmp_path: Path, mailbox: Mailbox, dovecot: Dovecot
) -> None:
    """300 messages arrive in rounds; each round's deleting fetch is killed at a random instant."""
    messages = [make_message(i, body=f"body {i}\n".encode() * 40) for i in range(300)]
    per_round = len(messages) // ROUNDS
    whole = _calibrate(tmp_path, dovecot.new_mailbox(), messages[:per_round])
    config = write_config(tmp_path, [dovecot_account(mailbox, leave_on_server=False)])
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    killed = 0
    for start in range(0, len(messages), per_round):
        mailbox.deliver_many(messages[start : start + per_round])
        proc = _fetch_process(config)
        # Anywhere from late start-up to the end: login, RETR, commit, DELE or QUIT.
        time.sleep(rng.uniform(0.4, 1.0) * whole)
        proc.send_signal(signal.SIGKILL)
        killed += proc.wait(timeout=30) == -signal.SIGKILL
    assert killed >= 3, f"seed {seed}: the kills should land while fetches run"

    code, out = fetch_json(config)

    assert code == 0, (seed, out)
    stored = _stored_hashes(config)
    assert len(stored) == len(set(stored)), f"seed {seed}: duplicates stored"
    assert sorted(stored) == sorted(sha(crlf(m)) for m in messages), f"seed {seed}: lost mail"
    assert mailbox.count() == 0


_MEASURED_FETCH = """
import sys
from mailingest.cli import main
code = main(["-c", sys.argv[1], "fetch", "--json"])
# VmHWM is this program's own peak: it excludes the parent's pages before exec.
sys.stderr.write([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
sys.exit(code)
"""


def test_60_mb_message_byte_exact_with_bounded_memory(tmp_path: Path, mailbox: Mailbox) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 27 + b"\n"  # ~1 KB lines
    raw = make_message(1, body=line * (60 * 1024 * 1024 // len(line)))
    mailbox.deliver(raw)
    expected = sha(crlf(raw))
    del raw
    config = write_config(tmp_path, [dovecot_account(mailbox)])

    proc = subprocess.run(
        [sys.executable, "-c", _MEASURED_FETCH, str(config)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )

    assert proc.returncode == 0, proc.stderr.decode()
    peak_kb = int(proc.stderr.decode().rsplit("VmHWM:", 1)[1].split()[0])
    assert peak_kb < 100 * 1024, f"peak RSS {peak_kb / 1024:.0f} MB"
    assert _stored_hashes(config) == [expected]
