"""Crash safety (SIGKILL at random instants) and bounded memory for huge messages, on Dovecot."""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from builders import crlf, dovecot_account, make_message, sha
from dovecot import Dovecot, Mailbox
from postgres import Postgres
from proxy import CommandProxy
from support import StoreAt, fetch_json, write_config

MESSAGES = 300
KILLS = 5  # kills that must interrupt a running fetch
MAX_ROUNDS = 15  # a round whose fetch ended before its kill does not count; bounded anyway
OWNER = "alice"  # dovecot_account()'s owner


def _stored_hashes(at: StoreAt) -> list[str]:
    """sha256 of every stored message, recomputed from the bytes the store gives back."""
    if isinstance(at.database, Path) and not at.database.exists():
        return []
    return asyncio.run(_read_hashes(at))


async def _read_hashes(at: StoreAt) -> list[str]:
    store = await at.open()
    try:
        digests = []
        for item in await store.messages(viewer=OWNER):
            digest = hashlib.sha256()
            async for chunk in store.raw_chunks(item.id):
                digest.update(chunk)
            digests.append(digest.hexdigest())
        return digests
    finally:
        await store.close()


def _fetch_process(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailingest", "-c", str(config), "fetch", "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class _QuitGate:
    """Proxy hook: notes when the client's first command and first QUIT pass.

    With ``hold`` a QUIT never reaches the server: the client waits for its reply until it
    is killed, then the proxy drops both connections. To the server that is a client killed
    just before QUIT (DELEs sent, nothing expunged), so no kill round drains the mailbox and
    every round leaves work for the next kill to interrupt. Kills after an expunging QUIT
    are left to bench/kill_campaign.py, which refills the mailbox between kills.
    """

    def __init__(self, *, hold: bool) -> None:
        self.hold = hold
        self.connected = threading.Event()
        self.released = threading.Event()
        self.connected_at = 0.0
        self.quit_at: float | None = None

    def __call__(self, line: bytes) -> None:
        if not self.connected.is_set():
            self.connected_at = time.monotonic()
            self.connected.set()
        if line.strip().upper() != b"QUIT":
            return
        if self.quit_at is None:
            self.quit_at = time.monotonic()
        if self.hold:
            self.released.wait(30)
            raise ConnectionAbortedError("QUIT withheld")  # the proxy closes both sides


def _pop3_seconds(
    mailbox: Mailbox, directory: Path, at: StoreAt, *, leave_on_server: bool
) -> float:
    """How long one fetch of ``mailbox`` talks POP3: from its first command to its QUIT."""
    gate = _QuitGate(hold=False)
    with CommandProxy(mailbox.dovecot.port, gate) as proxy:
        account = dovecot_account(mailbox, port=proxy.port, leave_on_server=leave_on_server)
        config = write_config(directory, [account], storage=at.storage())
        code = _fetch_process(config).wait(timeout=60)
    assert code == 0 and gate.quit_at is not None, "a calibration fetch failed"
    return gate.quit_at - gate.connected_at


def _kill_round(
    mailbox: Mailbox, directory: Path, at: StoreAt, window: float, rng: random.Random
) -> tuple[bool, bool]:
    """Start a deleting fetch; once it has connected, SIGKILL it after uniform(0, window) s.

    Returns whether the kill interrupted the running fetch and whether it had reached QUIT.
    """
    gate = _QuitGate(hold=True)
    with CommandProxy(mailbox.dovecot.port, gate) as proxy:
        account = dovecot_account(mailbox, port=proxy.port, leave_on_server=False)
        proc = _fetch_process(write_config(directory, [account], storage=at.storage()))
        try:
            while not gate.connected.wait(0.01):
                assert proc.poll() is None, f"fetch exited ({proc.returncode}) before connecting"
            time.sleep(rng.uniform(0, window))
            proc.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            gate.released.set()  # before the proxy stops: its thread may wait on a QUIT
    return code == -signal.SIGKILL, gate.quit_at is not None


def test_sigkill_at_random_instants_of_a_deleting_fetch_loses_and_duplicates_nothing(
    tmp_path: Path,
    mailbox: Mailbox,
    dovecot: Dovecot,
    store_at: StoreAt,
    request: pytest.FixtureRequest,
) -> None:
    """300 messages arrive once; fetches of them are SIGKILLed at random instants of their POP3
    talk until 5 kills interrupted one; then one clean fetch. Each is stored exactly once
    (on each backend)."""
    messages = [make_message(i, body=f"body {i}\n".encode() * 40) for i in range(MESSAGES)]
    # Calibration on an identical mailbox: one fetch that retrieves and stores all (deletes
    # none), then one that has nothing new and deletes all.
    (tmp_path / "calibration").mkdir()
    twin = dovecot.new_mailbox()
    twin.deliver_many(messages)
    if isinstance(store_at.database, Path):
        apart = StoreAt(tmp_path / "calibration" / "mail.db")
    else:  # the calibration's own database on the same server
        server: Postgres = request.getfixturevalue("postgres")
        apart = StoreAt(server.new_database(), store_at.password_file)
    calibration = tmp_path / "calibration"
    retrieving = _pop3_seconds(twin, calibration, apart, leave_on_server=True)
    deleting = _pop3_seconds(twin, calibration, apart, leave_on_server=False)
    assert twin.count() == 0
    mailbox.deliver_many(messages)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = at_quit = rounds = 0
    history = []  # per round: messages not yet stored, then K(illed) / Q(killed at QUIT) / E(nded)
    while kills < KILLS and rounds < MAX_ROUNDS:
        rounds += 1
        left = MESSAGES - len(_stored_hashes(store_at))
        # The round's POP3 talk: RETR and commit what is not stored yet, DELE all, QUIT.
        window = deleting + retrieving * left / MESSAGES
        interrupted, reached_quit = _kill_round(mailbox, tmp_path, store_at, window, rng)
        kills += interrupted
        at_quit += interrupted and reached_quit
        history.append(f"{left}{'E' if not interrupted else 'Q' if reached_quit else 'K'}")
    figures = (
        f"seed {seed}: {kills} kills interrupted a fetch in {rounds} rounds ({at_quit} waiting "
        f"on QUIT): {' '.join(history)}; calibrated {retrieving:.3f} s + {deleting:.3f} s"
    )
    print(figures)
    assert kills >= KILLS, figures

    account = dovecot_account(mailbox, leave_on_server=False)
    config = write_config(tmp_path, [account], storage=store_at.storage())
    code, out = fetch_json(config)

    assert code == 0, (figures, out)
    stored = Counter(_stored_hashes(store_at))
    assert max(stored.values()) == 1, f"{figures}: duplicates stored"
    assert stored == Counter(sha(crlf(m)) for m in messages), f"{figures}: lost or foreign mail"
    assert mailbox.count() == 0, figures


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
    assert _stored_hashes(StoreAt(config.parent / "mail.db")) == [expected]
