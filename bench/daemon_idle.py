"""mailingest daemon benchmark: idle cost of 1,000 accounts, and start lag of 200 due polls.

usage: python bench/daemon_idle.py [--accounts 1000] [--seconds 60] [--due 200] [--json]

1. Idle: ``mailingest run`` as a process with N accounts on a long interval (1 h), all on a
   loopback scripted POP3 server with empty mailboxes. Once every account's first poll is
   done, the process's CPU time (utime + stime) and RSS are sampled for ``--seconds``.
   Target: under 1 % of one core and under 150 MB RSS.
2. Due polls: the daemon in-process with ``--due`` accounts whose polls fall due every
   10 s, ``max_concurrent`` as large, the real fetch against the same server. For every
   poll, the lag between its due time and its start. Target: every start within 1 s.

See bench/README.md ("Daemon") for results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))  # write_config and pop3d, as the tests use them

from mailingest import logs  # noqa: E402
from mailingest.config import Account, load_config  # noqa: E402
from mailingest.daemon import Daemon  # noqa: E402
from mailingest.fetch import FetchResult, fetch_account  # noqa: E402
from mailingest.store import Store  # noqa: E402
from pop3d import Mailbox, ThreadedPop3Server  # noqa: E402
from support import write_config  # noqa: E402 (after the path set-up above)

PASSWORD = "Bench-Pass-1"


def password(i: int) -> str:
    """Each account its own password, as in real use (the log mask then holds thousands)."""
    return f"{PASSWORD}-{i}"


TICKS = os.sysconf("SC_CLK_TCK")


def _accounts(port: int, count: int, interval: str) -> list[dict[str, Any]]:
    return [
        {
            "name": f"a{i}",
            "owner": "bench",
            "host": "127.0.0.1",
            "port": port,
            "security": "plain",
            "allow_plaintext": True,
            "username": f"u{i}",
            "password": password(i),
            "poll_interval": interval,
            "timeout": "30s",
        }
        for i in range(count)
    ]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def idle(accounts: int, seconds: float, workdir: Path) -> dict[str, Any]:
    boxes = [Mailbox(f"u{i}", password(i), []) for i in range(accounts)]
    with ThreadedPop3Server(boxes, max_clients=256) as server:
        config = write_config(
            workdir,
            _accounts(server.port, accounts, "1h"),
            daemon={"max_concurrent": 16, "log_format": "json"},
        )
        log_path = workdir / "idle.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mailingest", "-c", str(config), "run"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            started = time.monotonic()
            while log_path.read_text().count('"poll_completed"') < accounts:
                if proc.poll() is not None or time.monotonic() - started > 600:
                    raise RuntimeError(f"first polls did not complete:\n{log_path.read_text()}")
                time.sleep(0.5)
            settle = time.monotonic() - started
            cpu_before, wall_before = _cpu_seconds(proc.pid), time.monotonic()
            peak_rss = 0
            while time.monotonic() - wall_before < seconds:
                peak_rss = max(peak_rss, _status_kb(proc.pid, "VmRSS"))
                time.sleep(1.0)
            cpu = _cpu_seconds(proc.pid) - cpu_before
            wall = time.monotonic() - wall_before
            threads = _status_kb(proc.pid, "Threads")
        finally:
            proc.terminate()
            code = proc.wait(30)
    return {
        "accounts": accounts,
        "first_polls_done_s": round(settle, 1),
        "window_s": round(wall, 1),
        "cpu_percent": round(100 * cpu / wall, 3),
        "peak_rss_mb": round(peak_rss / 1024, 1),
        "threads": threads,
        "exit_code": code,
    }


async def _due(count: int, seconds: float, workdir: Path) -> dict[str, Any]:
    boxes = [Mailbox(f"u{i}", password(i), []) for i in range(count)]
    with ThreadedPop3Server(boxes, max_clients=count + 16) as server:
        config = write_config(
            workdir,
            _accounts(server.port, count, "10s"),
            daemon={"max_concurrent": count, "log_format": "json"},
        )
        lags: list[float] = []
        daemon: Daemon

        async def timed(account: Account, store: Store, **kwargs: Any) -> FetchResult:
            lags.append(daemon.lags()[account.name])  # set just before the fetch starts
            return await fetch_account(account, store, **kwargs)

        logs.configure("json", level=40)  # errors only: the lags are the output
        daemon = Daemon(load_config(config), config, fetch=timed)
        task = asyncio.create_task(daemon.async_run(signals=False))
        await asyncio.sleep(seconds)
        daemon.stop("benchmark over")
        await task
    lags.sort()
    return {
        "accounts": count,
        "interval_s": 10,
        "max_concurrent": count,
        "polls": len(lags),
        "lag_p50_ms": round(1000 * statistics.median(lags), 1),
        "lag_p99_ms": round(1000 * lags[int(0.99 * (len(lags) - 1))], 1),
        "lag_max_ms": round(1000 * lags[-1], 1),
        "late_over_1s": sum(lag > 1.0 for lag in lags),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--due", type=int, default=200)
    parser.add_argument("--due-seconds", type=float, default=35.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mailingest-bench-") as tmp:
        (Path(tmp) / "idle").mkdir()
        (Path(tmp) / "due").mkdir()
        results = {
            "idle": idle(args.accounts, args.seconds, Path(tmp) / "idle"),
            "due": asyncio.run(_due(args.due, args.due_seconds, Path(tmp) / "due")),
        }
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, values in results.items():
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    ok = (
        results["idle"]["cpu_percent"] < 1.0
        and results["idle"]["peak_rss_mb"] < 150
        and results["due"]["late_over_1s"] == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
