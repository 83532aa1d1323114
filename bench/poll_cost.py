"""Where a daemon's CPU per poll goes: one ``mailingest run`` on PostgreSQL, N empty accounts.

usage: python bench/poll_cost.py [--accounts 1000] [--interval 20] [--warm 70] [--window 60]
                                 [--profile] [--uvloop] [--json F]

The scripted loopback POP3 server (empty mailboxes) and a private PostgreSQL run in this
process; the daemon runs in a child process, in which a thread waits ``--warm`` seconds
(every first poll done), then measures for ``--window`` seconds: the process's CPU and each
thread's (the event loop's thread apart from the worker threads), divided by the polls
completed in the window. ``--profile`` also runs cProfile in the loop's thread for the
window and prints its time by package (the profiler slows what it measures: compare
shares, not totals). ``--uvloop`` runs the daemon on uvloop, if installed (it is not a
dependency of the project: this measures what it would change).

See bench/README.md ("PostgreSQL backend", the fleet case) for results.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
# bench/profile.py would stand in for the stdlib's profile module, which cProfile imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
import cProfile  # noqa: E402
import pstats  # noqa: E402

sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from daemon_idle import TICKS  # noqa: E402
from fleet import on_postgres, report  # noqa: E402


def _threads_cpu() -> dict[str, tuple[str, float]]:
    """Thread id -> (name, CPU seconds) of this process's threads."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:  # ended meanwhile
            continue
        name, _, rest = stat.partition("(")[2].rpartition(")")
        fields = rest.split()
        out[tid] = (name, (int(fields[11]) + int(fields[12])) / TICKS)  # utime, stime
    return out


def _by_package(stats: pstats.Stats, polls: int) -> dict[str, float]:
    """The profile's own time (ms per poll) by package, the loop's idle wait left out."""
    grouped: collections.Counter[str] = collections.Counter()
    for (path, _, name), (_, _, own, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == "<method 'poll' of 'select.epoll' objects>":
            continue  # waiting, not working
        if "mailingest/" in path:
            key = "mailingest"
        elif "/asyncio/" in path or path.endswith("selectors.py") or "epoll" in name:
            key = "asyncio"
        else:
            key = next((p for p in ("psycopg", "structlog", "tenacity") if p in path), "other")
        grouped[key] += own
    return {k: round(1000 * v / max(polls, 1), 3) for k, v in grouped.most_common()}


def child(config: Path, log: Path, warm: float, window: float, profile: bool) -> dict[str, Any]:
    """Run the daemon here; measure from a thread; stop it with SIGTERM after the window."""
    from mailingest import cli

    profiler = cProfile.Profile()
    seen: dict[str, Any] = {}

    def measure() -> None:
        time.sleep(warm)
        loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
        loop = next(o for o in loops if o.is_running())
        seen["before"], seen["start"] = _threads_cpu(), time.time()
        if profile:
            loop.call_soon_threadsafe(profiler.enable)
        time.sleep(window)
        if profile:
            loop.call_soon_threadsafe(profiler.disable)
        seen["after"], seen["end"] = _threads_cpu(), time.time()
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=measure, daemon=True).start()
    code = cli.main(["-c", str(config), "run"])
    polls = 0
    for line in log.read_text(errors="replace").splitlines():
        if '"poll_completed"' in line:
            stamp = datetime.fromisoformat(json.loads(line)["timestamp"].replace("Z", "+00:00"))
            polls += seen["start"] <= stamp.timestamp() < seen["end"]
    threads: collections.Counter[str] = collections.Counter()
    for tid, (name, cpu) in seen["after"].items():
        key = "event loop" if tid == str(os.getpid()) else "worker threads"
        threads[key] += cpu - seen["before"].get(tid, (name, 0.0))[1]
    result: dict[str, Any] = {
        "exit": code,
        "polls": polls,
        "window_s": round(seen["end"] - seen["start"], 1),
        "cpu_ms_per_poll": round(1000 * sum(threads.values()) / max(polls, 1), 3),
        "by_thread_ms_per_poll": {
            k: round(1000 * v / max(polls, 1), 3) for k, v in threads.items()
        },
        "loop": type(asyncio.get_event_loop_policy()).__module__.split(".")[0],
    }
    if profile:
        result["profiled_loop_ms_per_poll"] = _by_package(pstats.Stats(profiler), polls)
    return result


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    with on_postgres(args.accounts, args.interval, work) as config:
        log, out = work / "daemon.log", work / "result.json"
        command = [sys.executable, __file__, "--child", str(config), str(log), str(out)]
        command += ["--warm", str(args.warm), "--window", str(args.window)]
        command += ["--profile"] * args.profile + ["--uvloop"] * args.uvloop
        with log.open("wb") as err:
            subprocess.run(command, stdin=subprocess.DEVNULL, stderr=err, check=True)
        result: dict[str, Any] = {"accounts": args.accounts, "interval_s": args.interval}
        return result | json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=20.0, help="poll interval, s")
    parser.add_argument("--warm", type=float, default=70.0, help="s before measuring")
    parser.add_argument("--window", type=float, default=60.0, help="s measured")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, log, out = args.child
        if args.uvloop:
            import uvloop  # type: ignore[import-not-found,unused-ignore]

            uvloop.install()
        result = child(config, log, args.warm, args.window, args.profile)
        out.write_text(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory(prefix="mailingest-pollcost-") as tmp:
        result = run(args, Path(tmp))
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
