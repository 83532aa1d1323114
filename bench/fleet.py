"""Fleet on PostgreSQL: N accounts (empty mailboxes) shared by 2 daemons on one database.

usage: python bench/fleet.py [--accounts 10000] [--interval 300] [--intervals 2] [--settle 0]
                             [--json F]

A scripted loopback POP3 server serves N empty mailboxes; a private PostgreSQL (fsync on)
holds the store; two ``mailingest run`` processes share one config. After every account's
first poll and ``--settle`` intervals more (the daemons contest each account's first polls
until one of them leaves it to the other), for ``--intervals`` poll intervals: each daemon's
CPU (utime + stime, as a share of one core) and RSS, and how many times each account was
polled (target: once per interval, by either daemon). Then daemon A is SIGKILLed and the
time until every account it polled last has been polled by B is measured (target: within
one interval).

See bench/README.md ("PostgreSQL backend") for results.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from daemon_idle import _accounts, _cpu_seconds, _status_kb, password  # noqa: E402

from pop3d import Mailbox, ThreadedPop3Server  # noqa: E402
from postgres import private_postgres  # noqa: E402
from support import write_config  # noqa: E402


class Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mailingest", "-c", str(config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def polls(self) -> list[tuple[str, float]]:
        """(account, time) of every poll_completed so far."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if '"poll_completed"' in line:
                event = json.loads(line)
                stamp = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                out.append((event["account"], stamp.timestamp()))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def _wait(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(1)


@contextmanager
def on_postgres(accounts: int, interval: float, work: Path) -> Iterator[Path]:
    """A private PostgreSQL and the scripted server with ``accounts`` empty mailboxes, and
    the config of a daemon that polls them all every ``interval`` s; its path."""
    if os.geteuid() != 0:
        raise SystemExit("run as root (the private PostgreSQL runs as the postgres user)")
    boxes = [Mailbox(f"u{i}", password(i), []) for i in range(accounts)]
    with private_postgres(durable=True) as pg, ThreadedPop3Server(boxes, max_clients=256) as pop:
        secret = work / "db-password"
        secret.write_text(pg.password + "\n")
        secret.chmod(0o600)
        yield write_config(
            work,
            _accounts(pop.port, accounts, f"{interval:g}s"),
            storage={"database": pg.new_database(), "password": {"file": str(secret)}},
            daemon={"log_format": "json", "max_concurrent": 16},
        )


def run(
    accounts: int, interval: float, intervals: int, work: Path, settle: int = 0
) -> dict[str, Any]:
    with on_postgres(accounts, interval, work) as config:
        a, b = Daemon(config, work / "a.log"), Daemon(config, work / "b.log")
        try:
            _wait(
                lambda: len({n for d in (a, b) for n, _ in d.polls()}) >= accounts,
                "every account's first poll",
                interval * 3 + 120,
            )
            time.sleep(interval * settle)
            start = time.time()
            cpu0 = {d: _cpu_seconds(d.proc.pid) for d in (a, b)}
            time.sleep(interval * intervals)
            end = time.time()
            cpu = {d: (_cpu_seconds(d.proc.pid) - cpu0[d]) / (end - start) for d in (a, b)}
            rss = {d: _status_kb(d.proc.pid, "VmRSS") / 1024 for d in (a, b)}
            window = Counter(n for d in (a, b) for n, t in d.polls() if start + 1 <= t < end - 1)
            per_account = Counter(window.get(f"a{i}", 0) for i in range(accounts))
            share = {d: sum(1 for _, t in d.polls() if start <= t < end) for d in (a, b)}
            # "Once per interval", per account: the gaps between its consecutive polls (by
            # either daemon) up to the end of the window. A window of one interval cuts
            # some accounts' polls at its edges; the gaps do not.
            times: dict[str, list[float]] = {}
            for d in (a, b):
                for name, stamp in d.polls():
                    if stamp < end:
                        times.setdefault(name, []).append(stamp)
            gaps = sorted(
                later - earlier
                for stamps in times.values()
                for earlier, later in zip(sorted(stamps), sorted(stamps)[1:], strict=False)
            )
            late = sum(1 for g in gaps if g > interval * 1.1 + 2)  # jitter + wake spread
            # Takeover: kill A; every account A polled last must be polled by B.
            last: dict[str, tuple[float, str]] = {}
            for d, name in ((a, "a"), (b, "b")):
                for account, stamp in d.polls():
                    if stamp >= last.get(account, (0.0, ""))[0]:
                        last[account] = (stamp, name)
            orphans = {n for n, (_, who) in last.items() if who == "a"}
            killed = time.time()
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait(30)

            def adopted() -> bool:
                return orphans <= {n for n, t in b.polls() if t >= killed - 1}

            deadline = time.monotonic() + interval * 2
            while not adopted() and time.monotonic() < deadline:
                time.sleep(5)
            after: dict[str, float] = {}
            for account, stamp in b.polls():
                if account in orphans and stamp >= killed - 1:
                    after.setdefault(account, stamp - killed)
            within = sum(1 for s in after.values() if s <= interval)
            takeover = max(after.values(), default=float("nan"))
        finally:
            a.stop()
            b.stop()
    return {
        "accounts": accounts,
        "interval_s": interval,
        "settle_intervals": settle,
        "window_s": round(end - start, 1),
        "cpu_share_of_a_core": {"a": round(cpu[a], 4), "b": round(cpu[b], 4)},
        "rss_mb": {"a": round(rss[a], 1), "b": round(rss[b], 1)},
        "polls_in_window": {"a": share[a], "b": share[b]},
        "accounts_by_polls_in_window": dict(sorted(per_account.items())),
        "gaps_between_polls_s": {
            "count": len(gaps),
            "min": round(gaps[0], 1) if gaps else None,
            "median": round(gaps[len(gaps) // 2], 1) if gaps else None,
            "max": round(gaps[-1], 1) if gaps else None,
            "over_interval_plus_jitter": late,
        },
        "expected_polls_per_account": intervals,
        "orphaned_by_kill": len(orphans),
        "adopted_within_one_interval": within,
        "adopted_within_two_intervals": len(after),
        "last_adopted_after_s": round(takeover, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=300.0, help="poll interval, s")
    parser.add_argument("--intervals", type=int, default=2, help="intervals measured")
    parser.add_argument("--settle", type=int, default=0, help="intervals before measuring")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailingest-fleet-") as tmp:
        result = run(args.accounts, args.interval, args.intervals, Path(tmp), args.settle)
    report(result, args.json)
    return 0


def report(result: dict[str, Any], path: Path | None) -> None:
    """Print ``result`` as JSON, and write it to ``path`` too if given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        path.write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
