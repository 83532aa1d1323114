"""Kill campaign: SIGKILL a deleting `mailingest fetch` of 1,000 messages at random instants.

usage: python bench/kill_campaign.py [--messages 1000] [--kills 50] [--seed N] [--json]

Starts a private Dovecot on loopback (root and dovecot-pop3d, like the test suite), times one
whole deleting fetch process of --messages messages (the calibration), then --kills times:
tops the mailbox up to --messages messages (new, distinct ones), starts a deleting
`mailingest fetch` process and SIGKILLs it at an instant drawn uniformly across the
calibrated duration; a kill that comes after the fetch ended is drawn again, until --kills
kills interrupted a running fetch. A last fetch runs undisturbed. Then every message ever
delivered must be stored exactly once, byte-exact (its sha256 recomputed from the stored
chunks), and the server must be empty. Prints the figures; exit 0 when nothing was lost or
duplicated.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))  # the test suite's private-Dovecot fixture

from dovecot import Mailbox, private_dovecot  # noqa: E402 - needs the path above


def message(index: int) -> bytes:
    """A distinct message of about 1.5 KB (LF line ends, as an MDA stores it)."""
    body = f"Body line of message {index}, with some words to fill it.\n".encode() * 25
    return (
        f"From: Lead {index} <lead{index % 97}@customer.example>\nTo: owner@crm.example\n"
        f"Subject: kill campaign message {index}\nMessage-ID: <k{index}@customer.example>\n"
        f"Date: Tue, 24 Nov 2026 10:{index % 60:02d}:00 +0000\n\n"
    ).encode() + body


def served(raw: bytes) -> bytes:
    """The bytes a POP3 client must store: every line ended by CRLF."""
    return raw.replace(b"\n", b"\r\n")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_config(directory: Path, box: Mailbox) -> Path:
    server = box.dovecot
    path = directory / "mailingest.toml"
    path.write_text(
        f"""[storage]
database = "mail.db"

[[accounts]]
name = "kill"
owner = "alice"
host = "{server.host}"
port = {server.port}
security = "plain"
allow_plaintext = true
username = "{box.user}"
password = "{box.password}"
leave_on_server = false
timeout = "30s"
""",
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


def start_fetch(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailingest", "-c", str(config), "fetch", "--json"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stored(database: Path) -> list[str]:
    """sha256 of each stored message, recomputed from its chunks (byte-exact check)."""
    if not database.exists():
        return []
    db = sqlite3.connect(database)
    try:
        out = []
        for (message_id,) in db.execute("SELECT id FROM messages ORDER BY id"):
            digest = hashlib.sha256()
            for (chunk,) in db.execute(
                "SELECT data FROM message_chunks WHERE message = ? ORDER BY seq", (message_id,)
            ):
                digest.update(chunk)
            out.append(digest.hexdigest())
        return out
    finally:
        db.close()


@dataclass
class Figures:
    seed: int
    messages_per_fetch: int
    calibrated_fetch_s: float
    wanted: int  # kills that must interrupt a running fetch
    kills: int = 0  # SIGKILLs sent, including those that came after the fetch had ended
    kills_interrupting_a_running_fetch: int = 0
    fetches_done_before_their_kill: int = 0
    # Where the killed runs were, judged from what each left behind.
    killed_before_any_commit: int = 0
    killed_after_commits_before_quit: int = 0
    killed_after_a_quit: int = 0
    delivered: int = 0
    stored: int = 0
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0  # stored bytes that match no delivered message (corrupt)
    left_on_server: int = 0
    final_fetch_exit: int | None = None
    duration_s: float = 0.0
    kill_instants_s: list[float] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.kills_interrupting_a_running_fetch >= self.wanted
            and self.lost == 0
            and self.duplicated == 0
            and self.unexpected == 0
            and self.left_on_server == 0
            and self.final_fetch_exit == 0
        )


def calibrate(box: Mailbox, directory: Path, count: int) -> float:
    """Seconds one whole deleting fetch process of ``count`` messages takes here."""
    box.deliver_many(message(-1 - i) for i in range(count))
    config = write_config(directory, box)
    started = time.monotonic()
    code = start_fetch(config).wait(timeout=600)
    elapsed = time.monotonic() - started
    if code != 0 or box.count() != 0:
        raise SystemExit(f"calibration fetch failed (exit {code}, {box.count()} left)")
    return elapsed


def campaign(count: int, kills: int, seed: int) -> Figures:
    rng = random.Random(seed)
    started = time.monotonic()
    with private_dovecot() as server, tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "calibration").mkdir()
        (root / "campaign").mkdir()
        whole = calibrate(server.new_mailbox(), root / "calibration", count)
        figures = Figures(seed, count, round(whole, 3), kills)
        box = server.new_mailbox()
        config = write_config(root / "campaign", box)
        database = root / "campaign" / "mail.db"
        expected: list[str] = []
        serial = 0
        # Kills that land after the fetch ended (it had less to do than the calibration run)
        # do not count: draw again until ``kills`` of them interrupted a running fetch.
        while figures.kills_interrupting_a_running_fetch < kills and figures.kills < 4 * kills:
            missing = count - box.count()
            batch = [message(serial + i) for i in range(missing)]
            box.deliver_many(batch)
            expected += [sha(served(m)) for m in batch]
            serial += missing
            before_stored, before_left = len(stored(database)), box.count()
            proc = start_fetch(config)
            instant = rng.uniform(0, whole)
            time.sleep(instant)
            running = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            figures.kills += 1
            figures.kill_instants_s.append(round(instant, 3))
            if not running:
                figures.fetches_done_before_their_kill += 1
                continue
            figures.kills_interrupting_a_running_fetch += 1
            committed = len(stored(database)) - before_stored
            expunged = before_left - box.count()
            if expunged > 0:
                figures.killed_after_a_quit += 1
            elif committed > 0:
                figures.killed_after_commits_before_quit += 1
            else:
                figures.killed_before_any_commit += 1
        final = subprocess.run(
            [sys.executable, "-m", "mailingest", "-c", str(config), "fetch", "--json"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        figures.final_fetch_exit = final.returncode
        digests = stored(database)
        counts = Counter(digests)
        figures.delivered = len(expected)
        figures.stored = len(digests)
        figures.duplicated = sum(n - 1 for n in counts.values())
        figures.lost = len(set(expected) - set(counts))
        figures.unexpected = len(set(counts) - set(expected))
        figures.left_on_server = box.count()
    figures.duration_s = round(time.monotonic() - started, 1)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="messages per fetch")
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--json", action="store_true", help="the figures as one JSON object")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    figures = campaign(args.messages, args.kills, seed)
    if args.json:
        sys.stdout.write(json.dumps({**asdict(figures), "passed": figures.passed}) + "\n")
    else:
        for key, value in asdict(figures).items():
            if key != "kill_instants_s":
                sys.stdout.write(f"{key:36} {value}\n")
        sys.stdout.write(f"{'result':36} {'PASS' if figures.passed else 'FAIL'}\n")
    return 0 if figures.passed else 1


if __name__ == "__main__":
    sys.exit(main())
