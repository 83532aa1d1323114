"""The daemon (``mailingest run``): a scheduler that owns one runner per account.

``scheduler.Daemon`` starts, reloads and stops the accounts' ``runner.AccountRunner``
tasks; a runner sees the daemon only through ``runner.RunnerHost``, so runner.py never
imports scheduler.py. Beside them: roster.py (which runners exist), reloads.py (when the
configuration is read again), retag.py (the re-tags a reload calls for), status.py
(STATUS= and the watchdog), timing.py (when a poll is due), pausing.py (a runner's auth
pause), actors.py (who changed an account through the API) and process.py (the worker
threads and the bounded stop).
"""

from __future__ import annotations

from mailingest.daemon.scheduler import Daemon, run_daemon

__all__ = ["Daemon", "run_daemon"]
