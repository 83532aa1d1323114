"""Where P1's time goes: one mailingest fetch of 5,000 messages, timed by phase.

usage: python bench/profile.py [--messages N] [--repeat N] [--sync full|normal|off] [--py-spy FILE]

Runs ``mailingest fetch`` in this process against a private Dovecot (as bench/run.py does)
with timers wrapped around the phases of the fetch path, without changing the package:

- socket reads: ``SocketIO.readinto`` (waiting for Dovecot and copying its bytes);
- RETR framing etc.: ``retrieval.retrieve_spooled`` minus its socket reads (status lines,
  line-by-line dot-unstuffing, sha256, spool writes), in the retrieval thread;
- header parse: ``retrieval.prepare`` (headers, address normalisation, linking);
- SQLite: ``Store.add_batch`` awaited (statements, each an aiosqlite round trip to its
  thread, and the COMMIT that fsyncs the WAL); the number of round trips is counted;
- the rest of the fetch command (store setup, listing, leases, second session, QUIT).

Only coarse phases are timed: a timer per line would cost more than the work it measures.
The retrieval thread (socket reads, framing, parse) works on the next batch while the
current one commits, so the phases overlap: their sum exceeds the wall time by the
overlap, and the report shows that instead of a negative "rest". Process start-up
(imports) is measured apart.

``--sync off`` runs the same fetch with ``PRAGMA synchronous = OFF``: the difference in the
SQLite phase is what the fsyncs cost. ``--py-spy FILE`` samples all threads with py-spy
(if installed) in a separate child process instead, writing a flame graph.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from mailgen import fill  # noqa: E402
from run import mailbox, warm  # noqa: E402
from tools import Mailingest  # noqa: E402

from dovecot import private_dovecot  # noqa: E402

F = TypeVar("F", bound=Callable[..., Any])

SOCKET = "socket reads (waiting for Dovecot, copying)"
RETRIEVE = "RETR framing, dot-unstuffing, sha256, spool"
PREPARE = "header parse + address matching"
SQLITE = "SQLite add_batch (inserts + fsynced COMMIT)"
ROUND_TRIPS = "aiosqlite round trips (whole fetch)"
PHASES = (SOCKET, RETRIEVE, PREPARE, SQLITE)


class Timers:
    """Seconds per phase, per thread; nested phases are subtracted from their parent."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._local = threading.local()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        stack: list[list[float]] = self._local.__dict__.setdefault("stack", [])
        frame = [time.perf_counter(), 0.0]  # start, time spent in nested phases
        stack.append(frame)
        try:
            yield
        finally:
            stack.pop()
            spent = time.perf_counter() - frame[0]
            self.total[name] += spent - frame[1]
            self.calls[name] += 1
            if stack:
                stack[-1][1] += spent

    def wrap(self, name: str, func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    def wrap_async(self, name: str, func: F) -> F:
        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await func(*args, **kwargs)
            finally:
                self.total[name] += time.perf_counter() - started
                self.calls[name] += 1

        return wrapper  # type: ignore[return-value]


def instrument(timers: Timers, sync: str) -> None:
    """Wrap the phases of the fetch path (monkeypatching; the package is unchanged)."""
    import aiosqlite

    from mailingest import retrieval, store

    # Coarse phases only: a timer per line would cost more than the work it measures.
    socket.SocketIO.readinto = timers.wrap(SOCKET, socket.SocketIO.readinto)  # type: ignore[method-assign]
    retrieval.retrieve_spooled = timers.wrap(RETRIEVE, retrieval.retrieve_spooled)
    retrieval.prepare = timers.wrap(PREPARE, retrieval.prepare)
    store.Store.add_batch = timers.wrap_async(SQLITE, store.Store.add_batch)  # type: ignore[method-assign]
    queue = aiosqlite.Connection._execute

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        timers.calls[ROUND_TRIPS] += 1
        return await queue(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    aiosqlite.Connection._execute = counted  # type: ignore[method-assign]
    if sync != "full":
        execute = aiosqlite.Connection.execute

        def patched(self: Any, sql: str, *args: Any, **kwargs: Any) -> Any:
            if sql.strip().upper() == "PRAGMA SYNCHRONOUS = FULL":
                sql = f"PRAGMA synchronous = {sync.upper()}"
            return execute(self, sql, *args, **kwargs)

        aiosqlite.Connection.execute = patched  # type: ignore[method-assign]


def profile_runs(configs: list[Path], sync: str) -> list[tuple[float, Timers]]:
    """One in-process fetch per config (each a fresh store), timed by phase."""
    timers = Timers()
    instrument(timers, sync)
    from mailingest.cli import main

    results = []
    for config in configs:
        timers.total.clear()
        timers.calls.clear()
        started = time.perf_counter()
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            code = main(["-c", str(config), "fetch", "--json"])
        if code != 0:
            raise SystemExit(f"fetch exited {code}")
        snapshot = Timers()
        snapshot.total.update(timers.total)
        snapshot.calls.update(timers.calls)
        results.append((time.perf_counter() - started, snapshot))
    return results


def report(results: list[tuple[float, Timers]], imports: float, sync: str) -> None:
    walls = [w for w, _ in results]
    wall = statistics.median(walls)
    print(f"\nfetch of one account, synchronous = {sync}, median of {len(results)} runs")
    print(f"process start-up (imports, measured apart): {imports:.2f} s")
    print(f"fetch command wall time: {wall:.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls)})")
    print()
    print("| phase | seconds | share |")
    print("|---|---:|---:|")
    accounted = 0.0
    for name in PHASES:
        spent = statistics.median(t.total.get(name, 0.0) for _, t in results)
        accounted += spent
        print(f"| {name} | {spent:.2f} | {spent / wall:.0%} |")
    rest = wall - accounted
    if rest >= 0:
        print(
            f"| rest (setup, listing, leases, 2nd session, QUIT) | {rest:.2f} | {rest / wall:.0%} |"
        )
    else:
        print(f"| phases overlapping one another (sum minus wall time) | {-rest:.2f} | |")
    trips = statistics.median(t.calls.get(ROUND_TRIPS, 0) for _, t in results)
    print(f"\n{ROUND_TRIPS}: {trips:.0f}")


def import_time() -> float:
    probe = (
        "import time; t = time.perf_counter(); import mailingest.cli; "
        "print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="runs (median reported)")
    parser.add_argument("--sync", choices=("full", "normal", "off"), default="full")
    parser.add_argument("--py-spy", type=Path, help="sample with py-spy into this SVG instead")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailingest-profile-"))
    try:
        with private_dovecot() as server:
            account, box = mailbox(server, "prof")
            fill(box, "prof", args.messages, seed=1)
            warm(account)
            ours = Mailingest()
            configs = []
            for run in range(max(1, args.repeat)):
                (work / str(run)).mkdir()
                configs.append(ours.config(work / str(run), [account]))
            if args.py_spy:
                spy = shutil.which("py-spy") or shutil.which(
                    "py-spy", path=str(Path(sys.executable).parent)
                )
                if spy is None:
                    raise SystemExit("py-spy is not installed (pip install py-spy)")
                fmt = "raw" if args.py_spy.suffix == ".txt" else "flamegraph"
                argv = [spy, "record", "--threads", "-r", "250", "-f", fmt]
                argv += ["-o", str(args.py_spy)]
                subprocess.run([*argv, "--", *ours.argv(configs[0])], check=True)
                return 0
            imports = statistics.median(import_time() for _ in range(3))
            report(profile_runs(configs, args.sync), imports, args.sync)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
