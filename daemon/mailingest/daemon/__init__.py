"""The daemon (``mailingest run``): a scheduler that owns one runner per account.

``scheduler.Daemon`` starts, reloads and stops the accounts' ``runner.AccountRunner``
tasks; a runner sees the daemon only through ``runner.RunnerHost``, so runner.py never
imports scheduler.py. process.py holds the worker threads and the bounded stop.
"""

from __future__ import annotations

from mailingest.daemon.scheduler import Daemon, run_daemon

__all__ = ["Daemon", "run_daemon"]
