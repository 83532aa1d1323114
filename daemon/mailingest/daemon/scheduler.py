"""The daemon: one polling task per account under a concurrency limit, with backoff, the
auth-failure pause, reload on SIGHUP, a bounded stop on SIGTERM/SIGINT and sd_notify.

Shaped like arq's worker: ``Daemon.run()`` owns the event loop and always cleans up,
``Daemon.async_run()`` is the entry for tests; one task per account (``AccountRunner``) so one
account's slowness or failure never moves another's schedule; shutdown is stop taking work
-> grace period -> cancel -> close (process.py). The runners see the daemon only through
``RunnerHost``; protocol work stays in fetch.py. Around the daemon's life here (start,
applying a new configuration, the bounded stop): which runners exist is roster.py's, when
the configuration is read again reloads.py's, the re-tags a reload calls for retag.py's,
STATUS= and the watchdog status.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mailingest import accounts, logs
from mailingest.config import Config, DaemonSettings
from mailingest.daemon import process, timing
from mailingest.daemon.reloads import Reloads
from mailingest.daemon.retag import Retags
from mailingest.daemon.roster import Roster
from mailingest.daemon.runner import AccountRunner, Fetch
from mailingest.daemon.status import StatusLine
from mailingest.daemon.takeover import watch as watch_overdue
from mailingest.errors import EX_OK
from mailingest.fetch import FetchResult, fetch_account
from mailingest.metrics import Metrics
from mailingest.retry import Backoff
from mailingest.store import Store
from mailingest.systemd import Notifier, watchdog_period

log = logs.get_logger("mailingest.daemon")

#: How long a change through the API waits for a poll under way to end before answering,
#: so that the poll's mail is re-tagged before the answer (see accounts_changed).
RETAG_WAIT = 5.0


class Daemon:
    """Polls every configured account until stopped (the runners' ``RunnerHost``)."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        backoff: Backoff | None = None,
        fetch: Fetch = fetch_account,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.backoff = backoff or Backoff()
        self.notifier = notifier or Notifier()
        self.stopping = asyncio.Event()
        self.gate = asyncio.Semaphore(config.daemon.max_concurrent)
        self.fetch = fetch
        self.runners = Roster(self)
        self.retags = Retags(self, self.runners)
        self.status_line = StatusLine(self.notifier, self.runners)
        self.reloads = Reloads(self, config, config_path)
        self._store: Store | None = None
        self._stop_at: float | None = None
        self._executors: list[ThreadPoolExecutor] = []
        self._owns_process = False
        self._shortest: tuple[Config, float] | None = None
        #: /metrics; the gauges read the runners when scraped.
        self.metrics = Metrics()
        self.metrics.watch(lambda: len(self.runners), self.paused_count)
        #: The accounts are loaded and scheduled (the API's /readyz).
        self.ready = False

    def __repr__(self) -> str:
        return (
            f"<Daemon accounts={len(self.runners)} paused={self.paused_count()} "
            f"stopping={self.stopping.is_set()}>"
        )

    @property
    def store(self) -> Store:
        assert self._store is not None, "the store opens in async_run()"
        return self._store

    @property
    def settings(self) -> DaemonSettings:
        return self.config.daemon

    @property
    def file_config(self) -> Config:
        """The config file's own part of ``config`` (the rest: accounts in the database)."""
        return self.reloads.file_config

    @property
    def dormant(self) -> set[AccountRunner]:
        return self.runners.dormant

    @property
    def shortest_interval(self) -> float:
        """The shortest poll interval of any account now (takeover.py's pace)."""
        config = self.config
        if self._shortest is None or self._shortest[0] is not config:
            overrides = (a.poll_interval for a in config.accounts if a.poll_interval)
            self._shortest = (config, min([config.daemon.poll_interval, *overrides]))
        return self._shortest[1]

    @property
    def retag_pending(self) -> set[str]:
        """Accounts whose stored mail may still carry tags of older sharing settings."""
        return self.retags.pending

    # -- entry points ---------------------------------------------------------------------

    def run(self) -> int:
        """Own the event loop and the process; return once stopped. The stop is bounded by
        ``shutdown_timeout`` even when a worker thread blocks (see process.py)."""
        self._owns_process = True
        with asyncio.Runner() as runner:
            code = runner.run(self.async_run())
            for executor in self._executors:
                executor.shutdown(wait=False, cancel_futures=True)
        return code

    async def async_run(self, *, signals: bool = True) -> int:
        """The daemon on the running loop (tests run it with ``signals=False``)."""
        loop = asyncio.get_running_loop()
        self._size_executor(self.config.daemon.max_concurrent)
        previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(process.log_loop_error)  # keep even these lines JSON
        watchdog: asyncio.Task[None] | None = None
        watcher: asyncio.Task[None] | None = None
        takeover: asyncio.Task[None] | None = None
        api = None
        if signals:  # before anything slow: a SIGTERM during start-up is a clean stop too
            loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self.stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            storage = self.config.storage
            self._store = await Store.open(storage.database, password=storage.reveal_password())
            self._store.observer = self.metrics
            version, self.config = await accounts.with_stored(self.store, self.config)
            self._batch_polls()  # from every account's interval, the database's too
            self.reloads.accounts_version = version
            logs.register_secrets(self.config.secrets())
            await self.retags.sync()  # settings changed while stopped: re-tag before polling
            states = await self.store.account_states(counts=False)
            await self.runners.start(list(self.config.accounts), states)
            self.ready = True
            if self.config.api is not None:
                from mailingest.api.app import serve  # the web stack only where it serves

                api = await serve(self, self.config.api)
            log.info("daemon_started", accounts=len(self.runners), paused=self.paused_count())
            self.notifier.ready(self.summary())
            period = watchdog_period()
            if period is not None and self.notifier.enabled:
                watchdog = asyncio.create_task(self.status_line.watchdog(period), name="watchdog")
            watcher = asyncio.create_task(self.reloads.watch_accounts(), name="accounts")
            takeover = asyncio.create_task(watch_overdue(self), name="takeover")
            await self.stopping.wait()
        finally:
            self.stop("error")  # no-op after a signal; after an exception, still drain
            if api is not None:  # first: its requests use the store
                await api.close()
            self.notifier.stopping()
            abandoned = await self._drain()
            side = [task for task in (watchdog, watcher, takeover) if task is not None]
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            self.status_line.close()
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            if self._store is not None:
                await self._store.close()
            self.notifier.close()
            log.info("daemon_stopped", abandoned=abandoned)
            if not self._owns_process:  # else keep it: leftovers are reported at loop close
                loop.set_exception_handler(previous_handler)
        return EX_OK

    def stop(self, reason: str = "requested") -> None:
        """Stop taking work; in-flight polls get the grace period (signal-handler safe)."""
        if self.stopping.is_set():
            return
        self._stop_at = time.monotonic()
        log.info("daemon_stopping", reason=reason)
        self.stopping.set()
        if self._store is not None:
            self._store.batch_polls(0, 0)  # what polls still record goes out at once
        if self._owns_process:
            process.exit_at(self._by(process.EXIT_SHARE), self.config.daemon.shutdown_timeout)
        for runner in self.runners.all():
            runner.wake()

    def reload(self, *, file: bool = True) -> None:
        """SIGHUP: re-read the config file (``file``) and the accounts in the database;
        reloads never overlap (one runs, one may queue)."""
        self.reloads.request(file=file)

    async def accounts_changed(self) -> None:
        """The API changed the accounts kept in the database: apply that now (re-tag,
        add, remove) rather than at the next look, and return once it is applied. An
        account whose poll is still under way under the old settings is re-tagged once
        that poll ends: waited for too, up to RETAG_WAIT s (a poll storing much mail may
        take longer; its re-tag then follows the answer)."""
        before = set(self.retag_pending)
        await self.reloads.now()
        await self.retags.settled(before, RETAG_WAIT)

    def changing(self, account: str, actor: str) -> contextlib.AbstractContextManager[None]:
        """An API request changes ``account``'s settings: its re-tag is ``actor``'s."""
        return self.retags.changed_by.changing(account, actor)

    def poll_now(self, account: str) -> bool | None:
        """Poll ``account`` at once (the API's "fetch now"): None if unknown, False if
        paused."""
        runner = self.runners.get(account)
        return runner.poll_now() if runner is not None else None

    # -- configuration ----------------------------------------------------------------------

    async def apply(self, new: Config) -> None:
        """Switch to ``new``: add, remove and change accounts without dropping in-flight work."""
        logs.register_secrets(new.secrets())
        old = self.config
        restart_needed = [
            key
            for key, before, after in (
                ("storage.database", old.storage.database, new.storage.database),
                ("daemon.log_format", old.daemon.log_format, new.daemon.log_format),
                ("api", old.api, new.api),
            )
            if before != after
        ]
        self.config = new
        self.retags.reloaded(old, new)
        if new.daemon.max_concurrent != old.daemon.max_concurrent:
            # Polls under the old gate keep their slot; new polls queue at the new size.
            self.gate = asyncio.Semaphore(new.daemon.max_concurrent)
            self._size_executor(new.daemon.max_concurrent)
        if not self.stopping.is_set():
            self._batch_polls()
        added, removed, changed = await self.runners.apply(new.accounts)
        # After the runners took the new settings: a poll still under the old ones is then
        # either seen in flight here, or re-tags its account itself once it ends.
        await self.retags.sync()
        log.info(
            "config_reloaded",
            accounts=len(new.accounts),
            added=[a.name for a in added],
            removed=removed,
            changed=changed,
            restart_needed=restart_needed,
        )
        self.status_changed()

    async def retag_after_poll(self, account: str) -> None:
        """A poll of ``account`` ended: re-tag what it stored if the sharing settings changed
        meanwhile (see retag.py)."""
        await self.retags.after_poll(account)

    def _batch_polls(self) -> None:
        """The claims and records of polls close in time go out together (timing.py)."""
        window = min(timing.BATCH_WINDOW, self.shortest_interval * timing.BATCH_SHARE)
        self.store.batch_polls(window, self.settings.max_concurrent)

    def _size_executor(self, concurrency: int) -> None:
        """New worker threads for ``concurrency`` (process.worker_pool); the old ones exit
        once their running jobs finish."""
        executor = process.worker_pool(concurrency)
        for old in self._executors:
            old.shutdown(wait=False)
        self._executors.append(executor)

    # -- state for status and systemd -------------------------------------------------------

    def forget(self, runner: AccountRunner) -> None:
        """A runner's task ended (removed by a reload, or stopped)."""
        self.runners.forget(runner)

    def paused_count(self) -> int:
        return self.runners.paused_count()

    def summary(self) -> str:
        """The one-line STATUS= (status.py)."""
        return self.status_line.summary()

    def lags(self) -> dict[str, float]:
        """How late (seconds) each account's last poll started after it was due."""
        return self.runners.lags()

    def note_result(self, account: str, result: FetchResult) -> None:
        """A poll ended: for /metrics, and the last error for STATUS=."""
        self.metrics.poll_finished(result)
        self.status_line.note_result(account, result)

    def status_changed(self) -> None:
        self.status_line.changed()

    # -- shutdown -----------------------------------------------------------------------------

    def _by(self, share: float) -> float:
        """Monotonic time at ``share`` of the stop budget after the stop began."""
        start = self._stop_at if self._stop_at is not None else time.monotonic()
        return start + self.config.daemon.shutdown_timeout * share

    async def _drain(self) -> int:
        """The runners' bounded stop (process.drain), then the reloads'; returns how many
        polls were abandoned."""
        abandoned = await process.drain(self.runners.all(), self._by)
        await self.reloads.cancel()
        return abandoned


def run_daemon(config: Config, *, config_path: Path | None = None) -> int:
    process.raise_fd_limit()
    return Daemon(config, config_path).run()
