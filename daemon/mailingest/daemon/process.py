"""The daemon's process around its runners: worker threads, asyncio's own error reports,
and the bounded stop.

The stop: polls in flight may finish for part of ``shutdown_timeout``, the rest are
cancelled and unwind, and at the end the process leaves whatever still blocks. A thread
blocked in a socket call cannot be cancelled, so the deadline is kept by exiting anyway.
That is as safe as a kill, which the store is built to survive: every commit is durable,
and no DELE is applied without a QUIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from mailingest.daemon.runner import AccountRunner
from mailingest.errors import EX_OK
from mailingest.logs import get_logger

log = get_logger("mailingest.daemon")

#: Worker threads beyond one per concurrent fetch: header parsing, config reloads.
EXTRA_WORKERS = 4
WORKER_PREFIX = "mailingest-worker"

#: The stop budget, as shares of ``shutdown_timeout`` after the signal: in-flight polls may
#: finish until FINISH_SHARE, cancelled ones unwind until UNWIND_SHARE, then the store
#: closes; at EXIT_SHARE the process leaves whatever still blocks (os._exit: nothing is
#: left to the interpreter). The close gets over a quarter: it waits for a commit still
#: under way and checkpoints SQLite's WAL, two fsyncs that a busy disk makes slow.
FINISH_SHARE = 0.5
UNWIND_SHARE = 0.7
EXIT_SHARE = 0.97
#: The most open files the daemon asks for (within the hard limit).
FD_LIMIT = 65536


def raise_fd_limit() -> None:
    """Up to the hard limit of open files (systemd gives services a soft 1,024): hundreds of
    POP3 sessions, the store and the API's clients each hold descriptors, and the event
    loop (epoll) and socket timeouts (poll) have no 1,024 ceiling of their own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, FD_LIMIT)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(wanted, FD_LIMIT)), hard))


def worker_pool(concurrency: int) -> ThreadPoolExecutor:
    """The loop's worker threads from now on: one per concurrent POP3 session, plus a few
    for parsing and reloads. Named, so that a stack dump (py-spy, gdb) shows which are ours.
    """
    executor = ThreadPoolExecutor(concurrency + EXTRA_WORKERS, thread_name_prefix=WORKER_PREFIX)
    asyncio.get_running_loop().set_default_executor(executor)
    return executor


def log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own reports (a task failed and nobody awaited it) as catalogued events."""
    exc = context.get("exception")
    log.error("task_failed", message=str(context.get("message", "")), exc_info=exc)


async def drain(runners: Sequence[AccountRunner], by: Callable[[float], float]) -> int:
    """Let in-flight polls finish for part of the grace period, then cancel them; ``by``
    gives the monotonic time at a share of the stop budget.

    A cancelled poll is abandoned without QUIT, so the server applies none of its DELEs;
    everything it committed stays committed. Returns how many polls were abandoned.
    """
    tasks = [r.task for r in runners if r.task is not None]
    busy = [r.task for r in runners if r.task is not None and r.in_flight]
    for runner in runners:
        if runner.task is not None and not runner.in_flight:
            runner.task.cancel()  # asleep or queued at the gate: nothing to lose
    pending: set[asyncio.Task[None]] = set()
    if busy:
        left = by(FINISH_SHARE) - time.monotonic()
        _, pending = await asyncio.wait(busy, timeout=max(0.0, left))
        for task in pending:
            task.cancel()
    if tasks:  # cancelled polls unwind (close the session, release the lease)
        left = by(UNWIND_SHARE) - time.monotonic()
        await asyncio.wait(tasks, timeout=max(0.05, left))
    return len(pending)


def exit_at(deadline: float, timeout: float) -> None:
    """Exit the process at ``deadline`` (monotonic) if it is still running then."""

    def force() -> None:
        log.warning("shutdown_forced", timeout_s=timeout)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(EX_OK)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), force)
    timer.daemon = True  # never keeps the process alive by itself
    timer.start()


__all__ = [
    "EXIT_SHARE",
    "EXTRA_WORKERS",
    "FINISH_SHARE",
    "UNWIND_SHARE",
    "WORKER_PREFIX",
    "drain",
    "exit_at",
    "log_loop_error",
    "worker_pool",
]
